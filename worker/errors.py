"""Every error tagger raises on purpose: named for the condition, carrying `kind`, `transient` and the facts.

The hierarchy (`kind`; * = transient, worth retrying):

    TaggerError                       error            base: message, path, raw_reply, usage spent before it
    ├── BadPost                       bad_post         the post cannot be read, or its front matter parsed or edited
    │   ├── PostMissing               post_missing     the post file does not exist
    │   └── PostTooLarge              post_too_large   above what a remote job carries (TAGGER_MAX_JOB_BYTES)
    ├── PostChanged                 * post_changed     the post changed between reading and writing back
    ├── RecordWriteFailed           * record_write     the result record could not be written
    ├── PostWriteFailed             * post_write       the post could not be replaced
    ├── PostReadOnly                  post_read_only   the post file is locked: left as it is
    ├── OutsideContentRoot            outside_root     a path resolves outside the content root
    ├── NotAPost                      not_a_post       a path inside the root that is not a post
    ├── UsageError                    usage            a command was given something that does not exist
    ├── SettingsError                 settings         a setting is wrong or an env file is missing
    ├── BadSettingsFile               bad_settings     an `eval --compare` settings file is unreadable
    ├── BadGold                       bad_gold         an `eval --gold` file is unreadable
    ├── BadPayload                    bad_payload      a remote job's payload from Redis is not tagger's
    ├── BadSignature                  bad_signature    unsigned or badly signed while TAGGER_SIGNING_KEY is set
    ├── BadResult                     bad_result       a remote job's result fails apply's checks: not written
    ├── StateUnreadable               state            apply's state file cannot be read
    ├── CommitFailed                  commit           `apply --commit` wrote posts but git refused the commit
    ├── TaxonomyError                 taxonomy         the taxonomy cannot be loaded
    │   ├── TaxonomyUnpublished       taxonomy_unpublished  a remote job names a version not in Redis
    │   └── TaxonomyTampered          taxonomy_tampered  a published version altered in Redis (name, signature, types)
    ├── TemplateUnreadable            templates        a prompt template cannot be read
    ├── NotInBatch                  * not_in_batch     collecting, a request the batch did not answer
    └── ProviderError                 provider         the provider failed; retrying will not fix it (a 400)
        ├── ProviderUnsupported       provider_unsupported  the server rejects the request itself (400/404/422)
        ├── AuthError                 auth             the provider rejected the credentials
        ├── QuotaExhausted            quota            the account is out of quota
        ├── BatchUnsupported          batch_unsupported  the endpoint has no Batch API
        ├── ProviderUnavailable     * unavailable      5xx or connection trouble past the retry budget
        │   ├── RateLimited         * rate_limit       429s past the retry budget
        │   └── ProviderTimeout     * timeout          timeouts past the retry budget
        └── InvalidReply              invalid_reply    failed validation even after one re-ask
            ├── Refused               refused          the model refused
            └── Truncated             truncated        the reply was cut at the token limit

One translation point per edge: the CLI turns these into one line (`worker/cli/__init__.py`), the job runtime
into a failed job's meta (`worker/queue/jobs.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TaggerError(Exception):
    """Base of every error tagger raises on purpose."""

    kind = "error"
    transient = False

    def __init__(self, message: str, *, path: Path | str | None = None, raw_reply: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = str(path) if path is not None else None
        self.raw_reply = raw_reply
        self.usage: Any = None  # the calls and tokens spent before the failure (a `Usage`), counted by eval

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class BadPost(TaggerError):
    """The post cannot be read or its front matter cannot be parsed or edited safely."""

    kind = "bad_post"


class PostMissing(BadPost):
    """The post file does not exist (deleted after it was enqueued, or a typo)."""

    kind = "post_missing"


class PostChanged(TaggerError):
    """The post changed on disk between reading it and writing it back."""

    kind = "post_changed"
    transient = True


class RecordWriteFailed(TaggerError):
    """The result record could not be written (a full disk, say): the post was left as it was."""

    kind = "record_write"
    transient = True


class PostWriteFailed(TaggerError):
    """The post could not be replaced (a full disk, say): it was left as it was."""

    kind = "post_write"
    transient = True


class PostReadOnly(TaggerError):
    """The post file is locked (no write bit for tagger's user class, e.g. mode 0444): it is left as it is."""

    kind = "post_read_only"


class OutsideContentRoot(TaggerError):
    """A path resolves outside the configured content root."""

    kind = "outside_root"


class NotAPost(TaggerError):
    """A path inside the content root that is not a post (wrong name, hidden, excluded, tagger's own file)."""

    kind = "not_a_post"


class UsageError(TaggerError):
    """A command was given something that does not exist (a folder, a job, a type): a typo, not a no-op."""

    kind = "usage"


class SettingsError(TaggerError):
    """A setting or an env file that tagger cannot use."""

    kind = "settings"


class BadSettingsFile(TaggerError):
    """A settings file for `eval --compare` that cannot be read or names no real setting."""

    kind = "bad_settings"


class BadGold(TaggerError):
    """An `eval --gold` file that cannot be read as the labels it should hold."""

    kind = "bad_gold"


class BadPayload(TaggerError):
    """A remote job's payload read back from Redis is not one tagger's producer made."""

    kind = "bad_payload"


class TaxonomyError(TaggerError):
    """The taxonomy cannot be loaded (no terms, unreadable folder)."""

    kind = "taxonomy"


class TaxonomyUnpublished(TaxonomyError):
    """A remote job names a taxonomy version nobody published in Redis (`tagger taxonomy publish`)."""

    kind = "taxonomy_unpublished"


class WrongJobMode(TaggerError):
    """A shared-folder job reached a worker for remote jobs (TAGGER_JOB_MODE=remote), which has no site files."""

    kind = "job_mode"


class TaxonomyTampered(TaxonomyError):
    """A published taxonomy version whose content does not match its name (or its signature), or that breaks the
    rules a local taxonomy follows: someone else wrote it in Redis."""

    kind = "taxonomy_tampered"


class BadSignature(TaggerError):
    """Something read from Redis is unsigned or badly signed while TAGGER_SIGNING_KEY is set: refused."""

    kind = "bad_signature"


class BadResult(TaggerError):
    """A remote job's result that fails apply's checks (shape, signature, the post's rules): not written."""

    kind = "bad_result"


class StateUnreadable(TaggerError):
    """`apply`'s state file (TAGGER_STATE_FILE) cannot be read or is not what tagger writes there."""

    kind = "state"


class CommitFailed(TaggerError):
    """`apply --commit` wrote posts but git refused the commit (a hook, no identity): kept for the next run."""

    kind = "commit"


class PostTooLarge(BadPost):
    """A post is too big to travel inside a job (TAGGER_MAX_JOB_BYTES)."""

    kind = "post_too_large"


class TemplateUnreadable(TaggerError):
    """A prompt template is missing or unreadable (TAGGER_PROMPTS_DIR or the installed package)."""

    kind = "templates"


class ProviderError(TaggerError):
    """The LLM provider failed in a way that retrying will not fix (e.g. a 400)."""

    kind = "provider"


class ProviderUnsupported(ProviderError):
    """The server rejected the request itself (400/404/422, or a 500 saying it is invalid): retrying cannot help."""

    kind = "provider_unsupported"
    format_rejected = False  # the server named the response format: TAGGER_STRUCTURED=auto tries the next mode


class AuthError(ProviderError):
    """The provider rejected the credentials."""

    kind = "auth"


class QuotaExhausted(ProviderError):
    """The account has no quota left (`insufficient_quota`)."""

    kind = "quota"


class ProviderUnavailable(ProviderError):
    """Transient provider trouble (5xx, connection) that outlived the retry budget."""

    kind = "unavailable"
    transient = True


class RateLimited(ProviderUnavailable):
    """429s that outlived the retry budget."""

    kind = "rate_limit"


class ProviderTimeout(ProviderUnavailable):
    """Requests timed out until the retry budget ran out."""

    kind = "timeout"


class InvalidReply(ProviderError):
    """The reply failed validation even after one re-ask; holds the raw reply."""

    kind = "invalid_reply"


class Refused(InvalidReply):
    """The model refused to answer."""

    kind = "refused"


class Truncated(InvalidReply):
    """The reply was cut off by the token limit."""

    kind = "truncated"


class BatchUnsupported(ProviderError):
    """The provider has no Batch API (`/v1/files`, `/v1/batches`), or the provider is the offline one."""

    kind = "batch_unsupported"


class NotInBatch(TaggerError):
    """Collecting a batch, the classifier asked for a request the batch did not answer (the post or a term changed)."""

    kind = "not_in_batch"
    transient = True


def kind_of(exc: BaseException) -> str:
    """A short failure kind for any exception, for `failed list` and logs."""
    if isinstance(exc, TaggerError):
        return exc.kind
    return "crash"
