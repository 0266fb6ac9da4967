"""The `tagger` command: one click group; subcommands parse and print, the work is in library functions."""

from __future__ import annotations

import sys
from typing import Any

import click
from pydantic import ValidationError
from redis import RedisError

from worker import __version__
from worker.cli.app import App, Fail, Misconfigured, use_env_file
from worker.cli.apply import apply_command
from worker.cli.batch_commands import batch
from worker.cli.classify import classify
from worker.cli.eval import eval_command
from worker.cli.init import init_command
from worker.cli.oncall import failed, resume, status
from worker.cli.queue import backfill, cancel, enqueue, work
from worker.cli.records import records
from worker.cli.taxonomy import taxonomy
from worker.cli.verify import verify
from worker.errors import TaggerError
from worker.logs import redact, redact_url, secrets_of
from worker.queue.startup import EXIT_CONFIG


def one_line(exc: BaseException, app: App | None) -> str:
    """The one line an error prints: what went wrong and, where it helps, what to do."""
    settings = app.loaded if app else None
    secrets = secrets_of(settings) if settings else []
    if isinstance(exc, TaggerError):
        # An error whose message already names its path (a missing folder) names it once.
        text = exc.message if exc.path and exc.path in exc.message else str(exc)
        return redact(f"{exc.kind}: {text}", secrets)
    if isinstance(exc, RedisError):
        url = redact_url(settings.redis_url) if settings else "REDIS_URL"
        detail = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
        return redact(f"redis: cannot use Redis at {url} (REDIS_URL): {detail}; start Redis or fix REDIS_URL", secrets)
    if isinstance(exc, ValidationError):
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors(include_url=False)[:3]
        )
        return f"settings: {problems} (see .env.example)"
    raise exc


# One example per command: listed under `tagger --help` (in the help's command order) and in each command's help.
EXAMPLES = {
    "init": "tagger init ~/sites/blog",
    "taxonomy": "tagger taxonomy check",
    "classify": "tagger classify --dry-run content/posts/hello.md",
    "records": "tagger records move",
    "backfill": "tagger backfill content --estimate",
    "enqueue": "tagger enqueue --changed-since HEAD~1 --priority high",
    "work": "tagger work --processes 2",
    "cancel": "tagger cancel --all --queue low",
    "status": "tagger status",
    "failed": "tagger failed retry --all --error rate_limit",
    "resume": "tagger resume",
    "verify": "tagger verify content --fix",
    "batch": "tagger batch collect",
    "apply": "tagger apply --wait --commit",
    "eval": "tagger eval content --limit 40 --report eval.html",
}


class MisconfiguredFail(Fail):
    """The one line, and exit EXIT_CONFIG: a worker that cannot start until its settings or files are fixed."""

    exit_code = EXIT_CONFIG


class TaggerGroup(click.Group):
    """The command group; it turns tagger's own errors, Redis errors and bad settings into one line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The commands in the order a user meets them (as added), not alphabetical."""
        return list(self.commands)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """One example per command, in the order the commands are listed."""
        rows = [(name, EXAMPLES[name]) for name in self.list_commands(ctx) if name in EXAMPLES]
        if rows:
            with formatter.section("Examples"):
                formatter.write_dl(rows)
        super().format_epilog(ctx, formatter)

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand; an expected error becomes `tagger: kind: message` and exit 1, never a traceback."""
        try:
            result = super().invoke(ctx)
            sys.stdout.flush()  # a closed pipe (`tagger status | head -1`) surfaces here, where click handles it
            return result
        except (TaggerError, RedisError, ValidationError) as exc:
            raise Fail(one_line(exc, ctx.find_object(App))) from exc
        except Misconfigured as exc:
            raise MisconfiguredFail(one_line(exc.cause, ctx.find_object(App))) from exc.cause


@click.group(
    "tagger", cls=TaggerGroup, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.option(
    "--env-file",
    metavar="FILE",
    help="Read settings from FILE instead of ./.env (also TAGGER_ENV_FILE); its relative folders are relative to it.",
)
@click.version_option(__version__, prog_name="tagger", message="%(prog)s %(version)s")
@click.pass_context
def main(ctx: click.Context, env_file: str | None) -> None:
    """LLM-backed taxonomy tagging for markdown posts.

    Settings come from, in order: command-line options, the environment, the env file (--env-file or
    TAGGER_ENV_FILE, else .env in the current folder), then defaults. Every setting is in .env.example.
    """
    ctx.obj = App(env_file=use_env_file(env_file))  # the one context every command gets (`pass_app`)
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


# Setup, classifying one post, the queue, on-call, quality, then the Batch API: `tagger --help` lists them so.
COMMANDS: tuple[click.Command, ...] = (init_command, taxonomy, classify, records)
COMMANDS += (enqueue, backfill, work, cancel, status, failed, resume)
COMMANDS += (verify, apply_command, eval_command, batch)
for command in COMMANDS:
    if command.name in EXAMPLES and not command.epilog:
        command.epilog = f"Example: {EXAMPLES[command.name]}"
    main.add_command(command)

__all__ = ["Fail", "main"]
