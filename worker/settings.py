"""One frozen settings object, read from the environment and an env file (`.env` or `TAGGER_ENV_FILE`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ProviderName = Literal["openai", "offline"]
# How replies are constrained: a strict JSON schema, a JSON object (schema in the prompt and, for grammar-based
# servers, beside the format), the prompt alone; `auto` starts strict and falls back once per rejection.
StructuredMode = Literal["json_schema", "json_object", "prompt"]
STRUCTURED_MODES: tuple[StructuredMode, ...] = ("json_schema", "json_object", "prompt")


class SelectionRule(BaseModel):
    """How many terms of one type a post gets, and the confidence they need."""

    model_config = {"frozen": True}

    top: int = Field(ge=0)
    min_confidence: float = Field(ge=0, le=100)
    # Most terms of this type a post ends with, the people's terms counted (default: `top`).
    max_total: int | None = Field(default=None, ge=0)

    @property
    def cap(self) -> int:
        """The most terms of this type a post may end with once tagger has added its own."""
        return self.top if self.max_total is None else self.max_total


DEFAULT_RULES: dict[str, SelectionRule] = {
    "concepts": SelectionRule(top=1, min_confidence=80),
    "categories": SelectionRule(top=3, min_confidence=75),
    "tags": SelectionRule(top=15, min_confidence=80),
}
OTHER_TYPES_RULE = SelectionRule(top=5, min_confidence=80)


class Price(BaseModel):
    """US dollars per million tokens for one model."""

    model_config = {"frozen": True}

    input: float
    cached_input: float
    output: float
    # Through the Batch API (default: half of each price above, as OpenAI charges).
    batch_input: float | None = None
    batch_cached_input: float | None = None
    batch_output: float | None = None

    def batch(self) -> Price:
        """The prices a request costs through the Batch API."""
        return Price(
            input=self.input / 2 if self.batch_input is None else self.batch_input,
            cached_input=self.cached_input / 2 if self.batch_cached_input is None else self.batch_cached_input,
            output=self.output / 2 if self.batch_output is None else self.batch_output,
        )


DEFAULT_PRICES: dict[str, Price] = {
    "gpt-4o-mini": Price(input=0.15, cached_input=0.075, output=0.60),
    "gpt-4o": Price(input=2.50, cached_input=1.25, output=10.00),
    "gpt-4.1-mini": Price(input=0.40, cached_input=0.10, output=1.60),
}


class Weights(BaseModel):
    """Weights (summing to 100) that turn the six sub-scores into a confidence."""

    model_config = {"frozen": True}

    mentions: float = 15
    alignment: float = 25
    depth: float = 25
    intent: float = 15
    audience: float = 10
    signal: float = 10


DEFAULT_ENV_FILE = Path(".env")
ENV_FILE_VARIABLE = "TAGGER_ENV_FILE"
# Folders named in an env file are relative to that file's folder, so a script works from any folder.
FOLDER_SETTINGS = ("TAGGER_TAXONOMY_DIR", "TAGGER_CONTENT_DIR", "TAGGER_PROMPTS_DIR", "TAGGER_RECORDS_DIR")
DEFAULT_POST_GLOBS = ("*.md", "*.markdown")


def env_file_path() -> Path:
    """The env file settings are read from: `TAGGER_ENV_FILE` if set, else `.env` in the current folder."""
    return Path(os.environ.get(ENV_FILE_VARIABLE) or DEFAULT_ENV_FILE)


class _EnvFileSource(DotEnvSettingsSource):
    """The env file, with its relative folders resolved against the file's own folder."""

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        env_file = self.env_file
        if isinstance(env_file, str | Path):
            folder = Path(env_file).expanduser().parent
            for key in FOLDER_SETTINGS:
                value = data.get(key)
                if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                    data[key] = str(folder / value)
        return data


def _globs(value: Any) -> Any:
    """A list of globs from JSON (`["*.md"]`) or commas (`*.md,*.markdown`)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Everything tagger can be told; see `.env.example` for each setting."""

    # An empty value (`TAGGER_PROVIDER=` as in .env.example, or an EnvironmentFile made from it) means unset.
    model_config = SettingsConfigDict(
        env_file=DEFAULT_ENV_FILE,
        env_file_encoding="utf-8",
        env_ignore_empty=True,
        extra="ignore",
        frozen=True,
        populate_by_name=True,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then the environment, then the env file (`TAGGER_ENV_FILE`, else `.env`), then defaults."""
        env_file = getattr(dotenv_settings, "env_file", None)
        if env_file is not None and Path(env_file) == DEFAULT_ENV_FILE:
            env_file = env_file_path()
        return init_settings, env_settings, _EnvFileSource(settings_cls, env_file=env_file), file_secret_settings

    openai_api_key: SecretStr | None = Field(default=None, alias="OPENAI_API_KEY")
    openai_base_url: str | None = Field(default=None, alias="OPENAI_BASE_URL")
    model: str = Field(default="gpt-4o-mini", alias="TAGGER_MODEL")
    provider_choice: ProviderName | None = Field(default=None, alias="TAGGER_PROVIDER")
    structured: Literal["auto", "json_schema", "json_object", "prompt"] | None = Field(
        default=None, alias="TAGGER_STRUCTURED"
    )
    # The older switch, kept as an alias: TAGGER_JSON_MODE=true is TAGGER_STRUCTURED=json_object.
    json_mode: bool = Field(default=False, alias="TAGGER_JSON_MODE")
    taxonomy_dir: Path = Field(default=Path("categories"), alias="TAGGER_TAXONOMY_DIR")
    # Unset: the current folder (so `tagger classify some/post.md` works from a site's folder).
    content_dir: Path | None = Field(default=None, alias="TAGGER_CONTENT_DIR")
    prompts_dir: Path | None = Field(default=None, alias="TAGGER_PROMPTS_DIR")
    records_dir: Path | None = Field(default=None, alias="TAGGER_RECORDS_DIR")
    max_front_matter_bytes: int = Field(default=256 * 1024, ge=1024, alias="TAGGER_MAX_FRONT_MATTER_BYTES")
    # Jekyll copies a file without front matter as a static file: giving it one would publish it as a page.
    no_front_matter: Literal["skip", "add"] = Field(default="skip", alias="TAGGER_NO_FRONT_MATTER")
    post_globs: Annotated[tuple[str, ...], NoDecode] = Field(default=DEFAULT_POST_GLOBS, alias="TAGGER_POST_GLOBS")
    exclude: Annotated[tuple[str, ...], NoDecode] = Field(default=(), alias="TAGGER_EXCLUDE")

    selection: dict[str, SelectionRule] = Field(default_factory=lambda: dict(DEFAULT_RULES), alias="TAGGER_SELECTION")
    weights: Weights = Field(default_factory=Weights, alias="TAGGER_WEIGHTS")
    chunk_size: int = Field(default=200, ge=1, alias="TAGGER_CHUNK_SIZE")
    definitions: Literal["compact", "full"] = Field(default="compact", alias="TAGGER_DEFINITIONS")
    reply: Literal["all", "relevant"] = Field(default="all", alias="TAGGER_REPLY")
    # The terms of several types that fit one chunk are judged in one call (the post paid once, not once per type).
    pack_types: bool = Field(default=True, alias="TAGGER_PACK_TYPES")
    shortlist_min: float = Field(default=0.0, ge=0, le=100, alias="TAGGER_SHORTLIST_MIN")
    concurrency: int = Field(default=4, ge=1, alias="TAGGER_CONCURRENCY")
    max_post_tokens: int = Field(default=15_000, ge=250, alias="TAGGER_MAX_POST_TOKENS")

    request_timeout: float = Field(default=60.0, gt=0, alias="TAGGER_REQUEST_TIMEOUT")
    retry_attempts: int = Field(default=5, ge=1, alias="TAGGER_RETRY_ATTEMPTS")
    retry_deadline: float = Field(default=300.0, gt=0, alias="TAGGER_RETRY_DEADLINE")
    retry_max_wait: float = Field(default=60.0, gt=0, alias="TAGGER_RETRY_MAX_WAIT")

    rpm: int = Field(default=0, ge=0, alias="TAGGER_RPM")
    tpm: int = Field(default=0, ge=0, alias="TAGGER_TPM")
    quota_pause: float = Field(default=600.0, ge=0, alias="TAGGER_QUOTA_PAUSE")
    prices: dict[str, Price] = Field(default_factory=lambda: dict(DEFAULT_PRICES), alias="TAGGER_PRICES")

    # The provider's Batch API limits per input file (OpenAI: 50,000 requests, 200 MB).
    batch_max_requests: int = Field(default=50_000, ge=1, alias="TAGGER_BATCH_MAX_REQUESTS")
    batch_max_bytes: int = Field(default=200_000_000, ge=1024, alias="TAGGER_BATCH_MAX_BYTES")
    batch_poll: float = Field(default=30.0, gt=0, alias="TAGGER_BATCH_POLL")

    redis_url: str = Field(default="redis://127.0.0.1:6379/0", alias="REDIS_URL")
    redis_prefix: str = Field(default="tagger", alias="TAGGER_REDIS_PREFIX")
    job_retries: int = Field(default=5, ge=0, alias="TAGGER_JOB_RETRIES")
    job_retry_delays: list[int] = Field(default_factory=lambda: [10, 30, 60, 120, 300], alias="TAGGER_JOB_RETRY_DELAYS")
    lease_seconds: float = Field(default=30.0, gt=0, alias="TAGGER_LEASE_SECONDS")
    abandoned_requeues: int = Field(default=3, ge=0, alias="TAGGER_ABANDONED_REQUEUES")
    shutdown_grace: float = Field(default=120.0, ge=0, alias="TAGGER_SHUTDOWN_GRACE")
    # An idle worker beats after each wait on the queues (RQ's dequeue timeout; whole seconds, as RQ's TTL).
    idle_beat: int = Field(default=20, ge=1, alias="TAGGER_IDLE_BEAT")
    # A worker whose beat is overdue by this is presumed dead: a slow Redis, a loaded machine, clocks apart.
    silent_margin: float = Field(default=10.0, gt=0, alias="TAGGER_SILENT_MARGIN")

    # Remote jobs (workers on other machines): the job carries the post; results come back through Redis.
    job_mode: Literal["shared", "remote"] = Field(default="shared", alias="TAGGER_JOB_MODE")
    max_job_bytes: int = Field(default=2 * 1024 * 1024, ge=1024, alias="TAGGER_MAX_JOB_BYTES")
    result_ttl: int = Field(default=7 * 86400, ge=60, alias="TAGGER_RESULT_TTL")
    state_file: Path | None = Field(default=None, alias="TAGGER_STATE_FILE")
    # Shared by producers, workers and `apply` (never stored in Redis): what tagger keeps there is signed.
    signing_key: SecretStr | None = Field(default=None, alias="TAGGER_SIGNING_KEY")

    log_format: Literal["auto", "json", "console"] = Field(default="auto", alias="TAGGER_LOG_FORMAT")
    log_level: str = Field(default="INFO", alias="TAGGER_LOG_LEVEL")

    @field_validator("job_retry_delays")
    @classmethod
    def _delays_not_empty(cls, value: list[int]) -> list[int]:
        if not value or any(v < 0 for v in value):
            raise ValueError("TAGGER_JOB_RETRY_DELAYS needs at least one non-negative number of seconds")
        return value

    @field_validator("selection")
    @classmethod
    def _over_defaults(cls, value: dict[str, SelectionRule]) -> dict[str, SelectionRule]:
        # Naming one type's rule must not silently drop the defaults of the others.
        return {**DEFAULT_RULES, **value}

    @field_validator("post_globs", "exclude", mode="before")
    @classmethod
    def _split_globs(cls, value: Any) -> Any:
        return _globs(value)

    @field_validator("post_globs")
    @classmethod
    def _some_globs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("TAGGER_POST_GLOBS needs at least one pattern, e.g. *.md")
        return value

    @property
    def provider(self) -> ProviderName:
        """The provider in effect: explicit, else openai when configured, else offline."""
        if self.provider_choice:
            return self.provider_choice
        return "openai" if (self.openai_api_key or self.openai_base_url) else "offline"

    @property
    def structured_mode(self) -> Literal["auto", "json_schema", "json_object", "prompt"]:
        """The structured-output mode asked for: TAGGER_STRUCTURED, else json_object for TAGGER_JSON_MODE, else auto."""
        if self.structured:
            return self.structured
        return "json_object" if self.json_mode else "auto"

    def rule_for(self, term_type: str) -> SelectionRule:
        """The selection rule for one classification type."""
        return self.selection.get(term_type, OTHER_TYPES_RULE)

    def content_root(self) -> Path:
        """The resolved content root that every post path must stay inside (the current folder when unset)."""
        return (self.content_dir or Path.cwd()).expanduser().resolve()

    def content_root_label(self) -> str:
        """The content root as messages name it, saying where it came from."""
        if self.content_dir is None:
            return f"{self.content_root()} (TAGGER_CONTENT_DIR is unset: the current folder)"
        return f"{self.content_root()} (TAGGER_CONTENT_DIR)"
