"""The OpenAI provider on the SDK's public API only: the strict schema it sends, and how it reads replies."""

from __future__ import annotations

import ast
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fakellm import FakeLLM, asked_names
from worker.classifier import make_classifier
from worker.errors import Refused, Truncated
from worker.prompts import load_templates
from worker.providers.openai import STRICT_KEYWORDS, OpenAIProvider, response_format, strict_schema
from worker.reply import reply_schema
from worker.settings import Settings

PACKAGE = Path(__file__).resolve().parent.parent / "worker"
NAMES = [("Agile", "Scrum", "Kanban"), ("Only One",), ('Odd "quoted" — ünïcode', "x/y", "C#")]


def private_imports(source: str, libraries: tuple[str, ...] = ("openai", "rq")) -> list[str]:
    """Imports of a private module or name (a part starting with `_`) of `libraries` in one Python source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [(a.name, "") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules = [(node.module, a.name) for a in node.names]
        else:
            continue
        for module, name in modules:
            parts = module.split(".")
            if parts[0] in libraries and any(p.startswith("_") for p in [*parts[1:], name]):
                found.append(f"{module}{'.' + name if name else ''}")
    return found


def test_the_private_import_check_finds_what_it_looks_for() -> None:
    source = (
        "from openai._models import construct_type\nimport openai.lib._parsing._completions\n"
        "from openai.lib import _pydantic\nfrom rq.job import _job_stack\nimport rq._version\n"
        "from openai import OpenAI\nfrom rq.job import Job\nfrom .openai import _x\nimport openai_extra._y\n"
    )
    assert private_imports(source) == [
        "openai._models.construct_type",
        "openai.lib._parsing._completions",
        "openai.lib._pydantic",
        "rq.job._job_stack",
        "rq._version",
    ]


def test_worker_uses_no_private_api_of_openai_or_rq() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    found = {str(f.relative_to(PACKAGE)): private_imports(f.read_text("utf-8")) for f in files}
    assert {f: names for f, names in found.items() if names} == {}
    # attribute access reaches private modules without an import statement
    assert [f for f in files if any(s in f.read_text("utf-8") for s in ("openai._", "openai.lib._", "rq._"))] == []


def check_strict(node: dict[str, Any], where: str = "#") -> None:
    """OpenAI's strict-mode rules, asserted on every node of a schema."""
    assert set(node) <= STRICT_KEYWORDS, where
    assert not ("$ref" in node and len(node) > 1), where
    if node.get("type") == "object":
        assert node["additionalProperties"] is False, where
        assert node["required"] == list(node["properties"]), where
    subs = [*(node.get("$defs") or {}).items(), *(node.get("properties") or {}).items()]
    subs += [("items", node["items"])] if "items" in node else []
    for name, sub in subs:
        check_strict(sub, f"{where}/{name}")


@pytest.mark.parametrize("names", NAMES)
def test_the_strict_schema_follows_openais_rules_and_allows_only_the_terms_asked(names: tuple[str, ...]) -> None:
    fmt = response_format(reply_schema((("tags", names),), "all"))
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["name"] == "Judgements"
    schema = fmt["json_schema"]["schema"]
    check_strict(schema)
    # TAGGER_REPLY=all: one required property per term asked, keyed by its title; nothing else may be named.
    tags = schema["properties"]["judgements"]["properties"]["tags"]
    assert tags["required"] == list(names) and tags["additionalProperties"] is False
    assert all(v == {"$ref": "#/$defs/entry"} for v in tags["properties"].values())
    # Sub-scores are integer enums 0-10 (a grammar ignores minimum/maximum), one shared definition.
    assert schema["$defs"]["score"] == {"type": "integer", "enum": list(range(11))}
    assert schema["$defs"]["entry"]["properties"]["depth"] == {"$ref": "#/$defs/score"}
    relevant = response_format(reply_schema((("tags", names),), "relevant"))["json_schema"]["schema"]
    check_strict(relevant)
    items = relevant["properties"]["judgements"]["properties"]["tags"]
    term = items["items"]["properties"]["term"]
    assert term["enum"] == list(names) and items["maxItems"] == len(names)


def test_a_reply_schema_outside_the_strict_subset_or_limits_is_refused() -> None:
    defaulted = {"type": "object", "properties": {"x": {"type": "string", "default": "x"}}}
    open_object = {"type": "object", "properties": {}, "additionalProperties": {"type": "integer"}}
    with pytest.raises(ValueError, match="default"):
        strict_schema(defaulted)
    with pytest.raises(ValueError, match="additionalProperties"):
        strict_schema(open_object)
    many = tuple(f"Term number {i}" for i in range(1200))
    with pytest.raises(ValueError, match="enum values"):
        strict_schema(reply_schema((("tags", many),), "relevant"))


def test_the_request_the_server_receives_carries_the_strict_schema(
    make_settings: Callable[..., Settings], fake_llm: FakeLLM, site: Path
) -> None:
    classifier = make_classifier(make_settings())
    classifier.classify(site / "site" / "posts" / "limiting-wip.md")
    assert fake_llm.requests
    for body in fake_llm.requests:
        assert body["stream"] is False and body["temperature"] == 0
        fmt = body["response_format"]
        check_strict(fmt["json_schema"]["schema"])
        assert fmt["json_schema"]["strict"] is True
        # the enum names exactly the terms this prompt asks about (the `## term` headings of its system message)
        system = body["messages"][0]["content"]
        assert asked_names(body) and all(f"## {n}\n" in system for n in asked_names(body))


def good_body(fake: FakeLLM, provider: OpenAIProvider, names: tuple[str, ...]) -> dict[str, Any]:
    """A completion body as the fake answers the request the provider sends."""
    messages = [{"role": "system", "content": "judge"}, {"role": "user", "content": "<<<POST\nabout kanban\n"}]
    status, _, body = fake.respond(provider.request(messages, reply_schema((("tags", names),))))
    assert status == 200
    return body


@pytest.fixture
def provider(make_settings: Callable[..., Settings]) -> OpenAIProvider:
    return OpenAIProvider(make_settings(), load_templates())


def test_a_reply_is_read_with_public_types(provider: OpenAIProvider, fake_llm: FakeLLM) -> None:
    names = ("Agile", "Scrum")
    body = good_body(fake_llm, provider, names)
    answer = provider._read(json.dumps(body), (("tags", names),))
    assert answer.error == "" and answer.parsed is not None
    assert [(j.type, j.term) for j in answer.parsed] == [("tags", n) for n in names]
    assert answer.usage.input_tokens == body["usage"]["prompt_tokens"] > 0
    assert answer.usage.output_tokens == body["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize(
    ("change", "raised"),
    [
        ({"finish_reason": "length"}, Truncated),
        ({"finish_reason": "content_filter"}, Refused),
        ({"message": {"role": "assistant", "content": None, "refusal": "I can't help with that."}}, Refused),
    ],
)
def test_cut_filtered_and_refused_replies_raise(
    provider: OpenAIProvider, fake_llm: FakeLLM, change: dict[str, Any], raised: type[Exception]
) -> None:
    body = good_body(fake_llm, provider, ("Agile",))
    body["choices"][0].update(change)
    with pytest.raises(raised):
        provider._read(json.dumps(body), (("tags", ("Agile",)),))


def test_a_compatible_servers_envelope_quirks_do_not_fail_a_good_reply(
    provider: OpenAIProvider, fake_llm: FakeLLM
) -> None:
    body = good_body(fake_llm, provider, ("Agile",))
    for key in ("id", "object", "created", "usage"):
        body.pop(key)
    body["choices"][0]["finish_reason"] = "eos_token"  # what some self-hosted servers say for "stop"
    del body["choices"][0]["index"]
    answer = provider._read(json.dumps(body), (("tags", ("Agile",)),))
    assert answer.error == "" and answer.parsed is not None and answer.usage.calls == 1


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("<html>bad gateway</html>", "not a chat completion"),
        ("[1, 2]", "not a chat completion: a JSON list"),
        ('{"id": "x"}', "not a chat completion"),
        ('{"choices": []}', "no choices in the reply"),
    ],
)
def test_a_body_that_is_no_completion_is_an_error_for_the_re_ask(
    provider: OpenAIProvider, body: str, error: str
) -> None:
    answer = provider._read(body, (("tags", ("Agile",)),))
    assert answer.parsed is None and answer.error.startswith(error)
