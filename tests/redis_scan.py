"""Look for secrets where data lands: every key and value under some prefixes in Redis, decompressed.

RQ compresses job data with zlib, and the exception strings in its results stream with zlib then base64; a
plain substring search of raw values would miss a key stored there, so every value (and every field, member and
stream entry) is tried as it is, zlib-decompressed, and base64-decoded then zlib-decompressed.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import redis as redis_lib


@dataclass(frozen=True)
class Hit:
    """One place in Redis where a secret was found."""

    key: str
    where: str  # "name", "value", "field f", "member", "entry <id> field f"
    secret: str

    def __str__(self) -> str:
        return f"{self.key} ({self.where}) holds {self.secret[:4]}..."


def _texts(data: bytes | str) -> Iterator[str]:
    raw = data.encode() if isinstance(data, str) else data
    yield raw.decode("latin-1")
    for decode in (lambda b: b, base64.b64decode):
        try:
            text = zlib.decompress(decode(raw)).decode("latin-1")
        except (zlib.error, binascii.Error, ValueError):
            continue
        yield text


def _parts(client: redis_lib.Redis, key: bytes) -> Iterator[tuple[str, bytes]]:
    kind = client.type(key)
    kind = kind.decode() if isinstance(kind, bytes) else kind
    if kind == "string":
        value = client.get(key)
        if value is not None:
            yield "value", value
    elif kind == "hash":
        for field, value in client.hgetall(key).items():
            yield f"field {field!r}", field
            yield f"field {field!r}", value
    elif kind == "list":
        for value in client.lrange(key, 0, -1):
            yield "item", value
    elif kind == "set":
        for value in client.smembers(key):
            yield "member", value
    elif kind == "zset":
        for value, _ in client.zrange(key, 0, -1, withscores=True):
            yield "member", value
    elif kind == "stream":
        for entry_id, fields in client.xrange(key):
            for field, value in fields.items():
                yield f"entry {entry_id!r} field {field!r}", field
                yield f"entry {entry_id!r} field {field!r}", value


def scan_for_secrets(client: redis_lib.Redis, patterns: Iterable[str], secrets: Iterable[str]) -> list[Hit]:
    """Every place under the key patterns where one of the secrets appears (key names included)."""
    wanted = [s for s in secrets if s]
    hits: list[Hit] = []
    keys = sorted({k for pattern in patterns for k in client.scan_iter(pattern, count=1000)})
    for key in keys:
        name = key.decode("latin-1")
        hits += [Hit(name, "name", s) for s in wanted if s in name]
        for where, data in _parts(client, key):
            for text in _texts(data):
                hits += [Hit(name, where, s) for s in wanted if s in text]
    return hits


def count_keys(client: redis_lib.Redis, patterns: Iterable[str]) -> int:
    """How many keys the patterns match (to show a scan looked at something)."""
    return len({k for pattern in patterns for k in client.scan_iter(pattern, count=1000)})
