"""The worker process's context: built once at worker start, reused by every job (arq's `ctx`, RQ-style)."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from redis import Redis

from worker.classifier import Classifier, make_classifier
from worker.prompts import template_paths
from worker.queue.modes import RedisModeMemory
from worker.queue.throttle import RedisThrottle
from worker.settings import Settings

WARM_VERSIONS = 4  # published taxonomy versions a worker process keeps built for remote jobs

Signature = tuple[tuple[str, int, int], ...]


def _signature(settings: Settings) -> Signature:
    """What, on disk, a built classifier depends on: term files and prompt templates."""
    files = [*settings.taxonomy_dir.rglob("*.md"), *template_paths(settings.prompts_dir)]
    return tuple(sorted((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.is_file()))


@dataclass
class WorkerContext:
    """The worker's settings and its warm classifiers: the shared folder's, and one per published taxonomy version."""

    settings: Settings
    classifier: Classifier | None  # shared-folder jobs (None until needed on a worker without the site's files)
    signature: Signature = ()
    # Remote jobs: a classifier per published taxonomy version, least recently used out (shared with rebuilt copies).
    versions: OrderedDict[str, Classifier] = field(default_factory=OrderedDict)

    @classmethod
    def build(cls, settings: Settings, redis: Redis) -> WorkerContext:
        """Read the taxonomy and templates `settings` name, and set up the provider."""
        return cls(
            settings,
            make_classifier(settings, RedisThrottle(settings, redis), RedisModeMemory(settings, redis)),
            _signature(settings),
        )

    @classmethod
    def start(cls, settings: Settings, redis: Redis) -> WorkerContext:
        """The context a worker starts with: a remote worker has no taxonomy folder (its jobs bring a version)."""
        return cls.build(settings, redis) if settings.job_mode == "shared" else cls(settings, None)

    def reloaded(self, redis: Redis) -> WorkerContext:
        """This context, or one with the shared classifier rebuilt when a term file or template changed on disk."""
        if self.classifier is not None and _signature(self.settings) == self.signature:
            return self
        rebuilt = WorkerContext.build(self.settings, redis)
        return dataclasses.replace(self, classifier=rebuilt.classifier, signature=rebuilt.signature)

    def for_version(self, version: str, build: Callable[[], Classifier]) -> Classifier:
        """The classifier for a published taxonomy version, built (by `build`) once per process."""
        cached = self.versions.get(version)
        if cached is not None:
            self.versions.move_to_end(version)
            return cached
        built = self.versions[version] = build()
        while len(self.versions) > WARM_VERSIONS:
            self.versions.popitem(last=False)
        return built


class WorkerState:
    """The process's one context, set at worker start and read by its jobs and their failure callback."""

    # Process state on purpose: RQ calls a job function and its failure callback by import path, so this is how
    # the settings the worker was started with, and classifiers built once (taxonomy, SSL context, the SDK's
    # per-model classes, open connections), reach every job.
    context: WorkerContext | None = None

    @classmethod
    def settings(cls) -> Settings:
        """The worker's own settings (its secrets), else the environment's (a job run outside `tagger work`)."""
        return cls.context.settings if cls.context is not None else Settings()

    @classmethod
    def current(cls) -> WorkerContext:
        """The process's context, made from the environment's settings if no worker set one."""
        if cls.context is None:
            cls.context = WorkerContext(Settings(), None)
        return cls.context
