"""Optional signing of what tagger keeps in Redis (TAGGER_SIGNING_KEY): HMAC-SHA256 over canonical JSON bytes.

Producers, workers and `apply` share the key; Redis never holds it. With it set, job payloads, published
taxonomies, kept judgements, results, the Batch API state and the structured-output mode remembered per endpoint
carry a signature, and anything unsigned or badly signed is refused (`bad_signature`). Each signature covers what
it signs (its purpose) and where it belongs (the job id, the taxonomy version, the endpoint), so a signed value
cannot be replayed as another kind of value or under another job.
Without the key nothing is signed and a signature found is ignored.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any, Literal

from worker import untrusted
from worker.errors import BadSignature
from worker.settings import Settings

SIGNATURE = "signature"  # the field a signed JSON object carries its signature in
SCHEME = "hmac-sha256:"
Purpose = Literal["job", "taxonomy", "judgement", "result", "batch", "mode"]


def canonical(data: Any) -> bytes:
    """The bytes signed for a JSON value: sorted keys, no spaces, UTF-8 (the same value gives the same bytes)."""
    return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def signature(key: bytes, purpose: Purpose, context: str, data: Any) -> str:
    """The signature of `data` for one purpose and context (a job id, a taxonomy version)."""
    message = b"\0".join((b"tagger", purpose.encode(), context.encode("utf-8"), canonical(data)))
    return SCHEME + hmac.new(key, message, hashlib.sha256).hexdigest()


def key_of(settings: Settings) -> bytes | None:
    """The signing key's bytes, or None when signing is off."""
    return settings.signing_key.get_secret_value().encode("utf-8") if settings.signing_key else None


def sign(settings: Settings, purpose: Purpose, context: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """`data` with its signature added (unchanged, less any old signature, when signing is off)."""
    body = {k: v for k, v in data.items() if k != SIGNATURE}
    key = key_of(settings)
    return body if key is None else {**body, SIGNATURE: signature(key, purpose, context, body)}


def verify(settings: Settings, purpose: Purpose, context: str, data: Any) -> dict[str, Any]:
    """`data` without its signature, once checked (constant-time); BadSignature when unsigned or badly signed.

    With signing off, a JSON object passes as it is (its signature, if any, dropped): the caller still
    validates it like any input.
    """
    if not isinstance(data, Mapping):
        raise BadSignature(f"the {purpose} is not a JSON object ({type(data).__name__})")
    body = {k: v for k, v in data.items() if k != SIGNATURE}
    key = key_of(settings)
    if key is None:
        return body
    given = data.get(SIGNATURE)
    if not isinstance(given, str) or not given:
        raise BadSignature(f"the {purpose} for {context} is not signed (TAGGER_SIGNING_KEY is set)")
    try:
        expected = signature(key, purpose, context, body)
    except (TypeError, ValueError) as exc:  # not JSON data (NaN, odd types): cannot be what tagger signed
        raise BadSignature(f"the {purpose} for {context} cannot be checked: {exc}") from exc
    if not hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8")):
        raise BadSignature(f"the {purpose} for {context} is badly signed (not made with this TAGGER_SIGNING_KEY)")
    return body


def sign_text(settings: Settings, purpose: Purpose, context: str, text: str) -> str:
    """A JSON object's text with its signature added (the text unchanged when signing is off)."""
    if key_of(settings) is None:
        return text
    return json.dumps(sign(settings, purpose, context, json.loads(text)), ensure_ascii=False)


def verify_text(settings: Settings, purpose: Purpose, context: str, text: str | bytes) -> str:
    """A signed JSON object's text checked and returned without its signature; BadSignature otherwise."""
    try:
        data = untrusted.loads(text)
    except ValueError as exc:
        raise BadSignature(f"the {purpose} for {context} is not JSON: {exc}") from exc
    if key_of(settings) is None:
        return text.decode("utf-8") if isinstance(text, bytes) else text
    return json.dumps(verify(settings, purpose, context, data), ensure_ascii=False)
