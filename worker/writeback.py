"""The write protocol: announce the decision in the record, replace the post atomically, confirm.

Shared by the classifier (workers, `tagger classify`, the Batch collector) and `tagger apply`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog

from worker.errors import PostChanged, PostMissing, PostReadOnly, PostWriteFailed, RecordWriteFailed
from worker.posts import Post, Staged, clean_stale_temps, file_hash, replace_file, stage_file
from worker.records import EARLIER_KEPT, Pending, Record, RecordStore

log = structlog.get_logger("tagger.classifier")  # the name its events always had: log filters keep working
_helper: tuple[int, ThreadPoolExecutor] | None = None  # the process's write-back helper thread, and its pid
_helper_lock = threading.Lock()


def write_back(
    store: RecordStore, path: Path, post: Post, stored: Record, record: Record, new_text: str | None, new_record: Record
) -> bool:
    """Write a decision: announce it in the record, replace the post atomically, confirm; True when written.

    `record` is `stored` reconciled with `post`. A post that changed since it was read raises PostChanged
    after its new judgements are cached in the record (so judging it again is cheap).
    """
    for folder in {path.parent, store.path_for(path).parent}:
        for stale in clean_stale_temps(folder):  # a killed writer's, before this write adds its own
            log.info("stale_temp_removed", file=str(stale))
    with writing(path.parent):
        # Another writer of this post (a person, or another tagger: a worker and `classify`, two collects) may have
        # replaced the post or its record since they were read: a decision made from them would undo that write.
        try:
            on_disk = path.read_bytes()
        except FileNotFoundError as exc:
            raise PostMissing("post was deleted while it was being classified", path=path) from exc
        if on_disk != post.raw or not _same(store.load(path), stored):
            keep_judgements(store, path, stored, unwritten(new_record, record, post))
            raise PostChanged("post changed on disk while it was being classified", path=path)
        return _write(store, path, post, stored, record, new_text, new_record)


@contextlib.contextmanager
def writing(folder: Path) -> Iterator[None]:
    """Hold the folder's write lock while a post in it is written: writers of one post take turns.

    An flock on the folder itself (no file added to a site), held for the write alone (milliseconds), never
    while a model thinks. Where the file system has no such lock (some NFS mounts) the write goes on without it:
    the checks before each rename still see another writer's finished write.
    """
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and with it the lock


def cache_record(store: RecordStore, path: Path, stored: Record, record: Record) -> None:
    """Save `record` (judgements added to the cache, no assignment changed) under the folder's write lock, unless
    another writer replaced the record read (`stored`) meanwhile: theirs names what the post holds and stands."""
    with writing(path.parent):
        keep_judgements(store, path, stored, record)


def keep_judgements(store: RecordStore, path: Path, expected: Record, record: Record) -> None:
    """Save `record` unless another writer's record replaced `expected` meanwhile (the write lock held)."""
    if _same(store.load(path), expected):
        save(store, path, record)
    else:
        log.warning("record_kept", post=str(path), reason="another writer's record replaced the one read")


def _write(
    store: RecordStore, path: Path, post: Post, stored: Record, record: Record, new_text: str | None, new_record: Record
) -> bool:
    """write_back's steps, under the folder's write lock."""
    if new_text is None:
        save(store, path, new_record.model_copy(update={"file_hash": post.file_hash}), previous=stored)
        return False
    announced = new_record.model_copy(
        update={
            "file_hash": file_hash(new_text.encode("utf-8")),
            "before_file_hash": post.file_hash,
            "earlier_file_hashes": earlier(record, post.file_hash),
            "pending": Pending(
                before_file_hash=post.file_hash,
                assigned=record.assigned,
                removed_by_people=record.removed_by_people,
                added_keys=record.added_keys,
            ),
        }
    )
    # The order that matters is of renames: the announcing record is durable before the post is replaced, and
    # the post before the confirmation. The data behind each rename is written and fsynced beforehand in a helper
    # thread, beside the step before it (fsyncs running together cost about one): 3 waits for the disk, not 6.
    staging = in_background(stage_file, post.path, new_text.encode("utf-8"))
    # Announce the write first: a failed record write leaves the post untouched, and a kill or any other
    # failure after this line is settled by `reconcile` from the post's file hash at the next run.
    try:
        save(store, path, announced)
    except BaseException:
        abandon(staging)
        raise
    try:
        try:
            staged = staging.result()
        except BaseException:
            abandon(staging)
            raise
        confirming = in_background(store.stage, path, announced.model_copy(update={"pending": None}))
        try:
            replace_post(post, staged)
        except BaseException:
            staged.discard()
            abandon(confirming)
            raise
    except PostChanged:
        # Judgements already made are cached in the record, so the next pass is cheap (a person edited the post
        # meanwhile; a writer that takes no lock may have written the record too).
        keep_judgements(store, path, announced, unwritten(new_record, record, post))
        raise
    except PostReadOnly:
        # The announcement is taken back and no judgement kept: the post stays due, reported until it is unlocked.
        save(store, path, record.model_copy(update={"pending": None}))
        raise
    except OSError as exc:
        # The announced record is settled from the post's file hash at the next run, as after a kill.
        raise PostWriteFailed(f"cannot replace the post: {exc.strerror or exc}", path=path) from exc
    try:
        # Not made durable (no fsync of its folder): a confirmation a power cut loses leaves the announcing record,
        # which the next run settles from the post's hash with no call, as after a kill before this line.
        store.commit(path, confirming.result(), durable=False)
    except OSError as exc:
        # The announced record already names this write: the next run confirms it from the file hash.
        log.warning(
            "record_confirm_failed", post=str(path), error=f"cannot write the result record: {exc.strerror or exc}"
        )
    except BaseException:
        abandon(confirming)  # interrupted: the announced record stands, settled at the next run
        raise
    return True


def replace_post(post: Post, staged: Staged) -> None:
    """Put the post's staged new bytes in place, unless the post changed since it was read."""
    replace_file(staged, expected=post.raw)


def in_background(fn: Callable[..., Staged], *args: Any) -> Future[Staged]:
    """Run `fn` in this process's write-back helper thread (a forked child starts its own)."""
    global _helper
    with _helper_lock:
        if _helper is None or _helper[0] != os.getpid():
            _helper = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="tagger-writeback"))
        pool = _helper[1]
    try:
        return pool.submit(fn, *args)
    except RuntimeError:  # the interpreter is shutting down and takes no new thread work: do it here
        done: Future[Staged] = Future()
        try:
            done.set_result(fn(*args))
        except Exception as exc:
            done.set_exception(exc)
        return done


def abandon(staging: Future[Staged]) -> None:
    """A staged write that will not be made: its temp file is removed once the helper has written it."""
    with contextlib.suppress(Exception):  # a staging that failed removed its own temp file
        staging.result().discard()


def earlier(record: Record, before: str) -> list[str]:
    """The versions tagger knew before this write (the last one's before and after bytes), oldest first, bounded."""
    known = [*record.earlier_file_hashes, record.before_file_hash, record.file_hash]
    kept = [h for h in dict.fromkeys(reversed(known)) if h and h != before][:EARLIER_KEPT]
    return kept[::-1]


def unwritten(new_record: Record, record: Record, post: Post) -> Record:
    """The new judgements with the earlier assignments: the post was not replaced."""
    return new_record.model_copy(
        update={
            "assigned": record.assigned,
            "removed_by_people": record.removed_by_people,
            "added_keys": record.added_keys,
            "file_hash": post.file_hash,
            "before_file_hash": record.before_file_hash,
            "pending": None,
        }
    )


def save(store: RecordStore, path: Path, record: Record, previous: Record | None = None) -> None:
    """Write a post's record (not when only its time stamp would change); a failure is RecordWriteFailed."""
    if previous is not None and _same(previous, record) and store.path_for(path).exists():
        return  # nothing but the time would change: keep the file (and its git history) as it is
    try:
        store.save(path, record)
    except OSError as exc:
        raise RecordWriteFailed(f"cannot write the result record: {exc.strerror or exc}", path=path) from exc


def post_mode(path: Path) -> int:
    """The post file's permission bits (0 when it cannot be read)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0


def _same(old: Record, new: Record) -> bool:
    """True when two records differ at most in their time stamp."""
    skip = {"updated_at", "post"}
    return old.model_dump(exclude=skip) == new.model_dump(exclude=skip)
