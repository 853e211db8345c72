"""What a metadata update would insert, judged before yrs applies any of it (``overlay.metadata``).

Every honest node refuses these items when they arrive, so no honest replica ever holds one and an
honest peer never sends one: an update carrying any of them proves its sender wrong
(:class:`Junk`, blamed), and the whole update is refused:

- an item anywhere but directly under the root map ``peers`` (another root, a nested type, a list item
  of the map), or content other than one ``Any`` value or a deleted run;
- a key that is not an Ed25519 peer id (junk keys of any length, a tombstone included);
- a live item (``Any``, not deleted by the update's own delete set) that is not a well-formed record
  within ``max_entry_bytes`` signed for this task by the key its doc key names (``overlay.records``);
- on gossip (``origin`` given: the peer that signed the pubsub message), a live item under any key but
  the origin's own: gossip carries a node's own local writes, and deletions are allowed;
  (these two only for an item whose bytes name its key: see below)
- garbage-collected structs (this layout never writes nested types, whose deletion makes them) and
  origins that form a cycle.

Refused without blame (:class:`Gap`), since an honest update can arrive before what it builds on: an
update whose items follow clocks or origins this replica has not seen. yrs would keep such an update
"pending" in memory until its dependencies arrive, which from a hostile sender is never: measured, 400
of them of 400 kB each held 150 MB for good. Deletions of items not seen yet are dropped from the
update instead (anti-entropy brings them again with the items).

Validly signed records are never blamed here, whatever readers make of them (stale, replayed, over the
member cap): an honest replica may hold such a record and relay it. ``overlay.roster`` judges them.

An item written with an origin carries neither its parent nor its key: it inherits them from its
origin. :class:`KeyIndex` remembers the key of every item this replica holds (one run per client and
key: an honest client writes one key), so that such items are judged like the others, but a broken rule
is not blamed on them (:class:`Unsure`): a hostile writer can give one Yjs client id different histories
on different replicas, and an honest overwrite of an item it wrote would then read as another key here.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from shoal.overlay.records import Verified, public_key, short, verify
from shoal.overlay.yupdate import ANY, DELETED, GC, SKIP, Id, Item, Update, UpdateError, with_deletes

ROOT = "peers"
_U32 = 2**32


class MetadataError(ValueError):
    """An update or state vector that is refused; the message says why, without quoting it.

    ``hostile``: whether it proves the sender wrong (malformed bytes, junk no honest replica holds)
    rather than merely refused (over a bound an honest peer may reach by relaying others' records, or
    not applicable yet): only the first counts against it.
    """

    hostile = True


class MetadataRefused(MetadataError):
    """An update refused without blame: an honest peer can send one. Unapplied, like every refusal."""

    hostile = False


class MetadataFull(MetadataRefused):
    """An update refused because the document would outgrow ``max_state``, or because its sender used
    up its quota of records readers refused this epoch; an honest relayer can send one."""


class MetadataPending(MetadataRefused):
    """An update that builds on items this replica has not seen (an honest update can arrive before
    them): anti-entropy brings both."""


def checked(data: object, what: str, limit: int, parse: Callable[[bytes], Any]) -> tuple[bytes, Any]:
    """``data`` as bytes and as ``parse`` reads it, if it is bytes-like and within ``limit``; else
    MetadataError.

    The type check matters: ``bytes(n)`` of a hostile msgpack int would allocate n bytes. The count
    check too: yrs preallocates for the leading client count, and a 5-byte input claiming 10^8 clients
    made it allocate ~130 MB before failing. Then the whole input is parsed by :mod:`overlay.yupdate`:
    yrs decodes nested ``Any`` values recursively, and an 80 kB update of 40,000 nested arrays
    overflowed its stack (SIGSEGV, which nothing in Python can catch).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MetadataError(f"{what} must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) > limit:
        raise MetadataError(f"{what} of {len(data)} bytes exceeds the {limit}-byte limit")
    count, shift = 0, 0
    for i, byte in enumerate(data[:10]):
        count |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if count > len(data) - i - 1:
                raise MetadataError(f"{what} claims {count} clients in {len(data)} bytes")
            try:
                return data, parse(data)
            except UpdateError as exc:
                raise MetadataError(f"malformed {what}: {exc}") from None
    raise MetadataError(f"{what} does not start with a client count")


def is_panic(exc: BaseException) -> bool:
    """Whether ``exc`` is a yrs panic: pyo3 raises ``PanicException``, a BaseException that every
    ``except Exception`` would let through, and it kills the daemon."""
    return type(exc).__name__ == "PanicException"


def decoding_error(what: str, exc: BaseException) -> MetadataError:
    """A decoding failure as MetadataError; anything else is re-raised.

    Besides ValueError, yrs can panic on rare hostile input (seen once in ~25k mutated updates).
    """
    if isinstance(exc, ValueError) or is_panic(exc):
        return MetadataError(f"malformed {what}: {str(exc)[:200]}")
    raise exc


class Junk(ValueError):
    """An update no honest peer sends; the message says why, without quoting it."""


class Gap(ValueError):
    """An update that builds on items this replica has not seen (yet)."""


class Unsure(ValueError):
    """An update that breaks a rule only through the key an item inherits from this replica's history:
    a writer can give one client id different histories on different replicas (Yjs trusts clients),
    so the same honest update may read differently here than where it was written. Refused, unblamed."""


class KeyIndex:
    """The key of every item of this replica's document, as runs of clocks per client."""

    def __init__(self) -> None:
        self._starts: dict[int, list[int]] = {}
        self._runs: dict[int, list[tuple[int, int, str]]] = {}  # client: [(start, end, key)], by start
        self.keys: Counter[str] = Counter()  # runs per key: the keys this document has ever held

    def end(self, client: int) -> int:
        """The clock up to which this replica holds the client's items (its state vector entry)."""
        runs = self._runs.get(client)
        return runs[-1][1] if runs else 0

    def key(self, id: Id) -> str | None:
        """The key of item ``id``, or None if this replica does not hold it."""
        client, clock = id
        starts = self._starts.get(client)
        if not starts:
            return None
        i = bisect.bisect_right(starts, clock) - 1
        if i < 0:
            return None
        start, end, key = self._runs[client][i]
        return key if start <= clock < end else None

    def add(self, client: int, start: int, end: int, key: str) -> None:
        """Remember ``key`` for the client's clocks ``start..end``, which must follow what is held."""
        runs = self._runs.setdefault(client, [])
        starts = self._starts.setdefault(client, [])
        start = max(start, self.end(client))
        if start >= end:
            return
        if runs and runs[-1][2] == key and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end, key)
            return
        runs.append((start, end, key))
        starts.append(start)
        self.keys[key] += 1


@dataclass
class Admitted:
    """An update that may be applied: its bytes (deletions of unseen items dropped), the keys new to
    this document, the verified live records by key, and the runs to index once it is applied."""

    data: bytes
    new_keys: set[str] = field(default_factory=set)
    live: dict[str, Verified] = field(default_factory=dict)
    runs: list[tuple[int, int, int, str]] = field(default_factory=list)  # client, start, end, key


def admit(
    data: bytes,
    update: Update,
    index: KeyIndex,
    *,
    task: str,
    max_entry_bytes: int,
    origin: str | None = None,
) -> Admitted:
    """Judge ``update`` (``data`` parsed) against what ``index`` holds: :class:`Admitted`, or
    :class:`Junk` or :class:`Gap` (see the module docstring)."""
    known = {client: index.end(client) for client in update.ranges}
    for client, ranges in update.ranges.items():
        for start, end, ref in ranges:
            if ref == GC:
                raise Junk(f"garbage-collected struct of client {client} (never written by this layout)")
            if start > known[client] or (ref == SKIP and end > known[client]):
                raise Gap(
                    f"client {client} continues at clock {start}; this replica holds to {known[client]}"
                )
            known[client] = max(known[client], end)
    fresh = [item for item in update.items if item.clock + item.length > index.end(item.client)]
    keys = _resolve(fresh, index)
    deleted = _covered(update.deletes, lambda client: known.get(client, index.end(client)))
    admitted = Admitted(data if deleted == update.deletes else with_deletes(data, update, deleted))
    gone = _Ranges(deleted)
    for item in fresh:
        key = keys[item.client, item.clock]
        if public_key(key) is None:
            raise Junk(f"key {short(key)!r} is not a peer id")
        if item.content not in (ANY, DELETED) or (item.content == ANY and item.length != 1):
            raise Junk(f"content ref {item.content} of length {item.length} under {short(key)}")
        if key not in index.keys:
            admitted.new_keys.add(key)
        admitted.runs.append((item.client, item.clock, item.clock + item.length, key))
        if item.content != ANY or gone.covers(item.client, item.clock):
            continue
        wrong = Junk if item.key is not None else Unsure  # blame only what the bytes themselves say
        if origin is not None and key != origin:
            raise wrong(f"gossip from {short(origin)} writes the key of {short(key)}")
        record = verify(task, key, item.values[0], max_entry_bytes)
        if record is None:
            raise wrong(f"the value under {short(key)} is not a record signed by its key for this task")
        admitted.live[key] = record
    return admitted


def _resolve(items: list[Item], index: KeyIndex) -> dict[Id, str]:
    """The key of each item: named by its bytes, or inherited from its origin (left, else right), which
    is held by this replica or is in the update. Junk for other parents, Gap for unseen origins."""
    keys: dict[Id, str] = {}
    spans = _Ranges((item.client, item.clock, item.length) for item in items)
    waiting: list[Item] = []
    for item in items:
        if item.origin is None and item.right is None:
            if item.parent is not None or item.root != ROOT or item.key is None:
                where = "a nested type" if item.parent is not None else "another root or a list"
                raise Junk(f"item of client {item.client} in {where} (only keys of {ROOT!r} are written)")
            keys[item.client, item.clock] = item.key
        else:
            waiting.append(item)

    while waiting:
        left = []
        for item in waiting:
            target = item.origin if item.origin is not None else item.right
            assert target is not None
            key = index.key(target)
            if key is None:
                start = spans.start(*target)
                if start is None:
                    raise Gap(f"item of client {item.client} builds on {target}, which this replica lacks")
                key = keys.get((target[0], start))
            if key is None:
                left.append(item)
            else:
                keys[item.client, item.clock] = key
        if len(left) == len(waiting):
            raise Junk(f"{len(left)} items whose origins form a cycle")
        waiting = left
    return keys


def _covered(deletes: list[tuple[int, int, int]], held: Callable[[int], int]) -> list[tuple[int, int, int]]:
    """The delete ranges cut to the clocks this replica holds once the update is applied."""
    kept = []
    for client, clock, length in deletes:
        end = min(clock + length, held(client))
        if end > clock:
            kept.append((client, clock, end - clock))
    return kept


class _Ranges:
    """Clock ranges per client, for lookups by bisection."""

    def __init__(self, ranges: Iterable[tuple[int, int, int]]) -> None:  # (client, start, length)
        self._ranges: dict[int, list[tuple[int, int]]] = {}
        for client, start, length in ranges:
            self._ranges.setdefault(client, []).append((start, start + length))
        for spans in self._ranges.values():
            spans.sort()

    def start(self, client: int, clock: int) -> int | None:
        """The start of the range holding ``clock``, if any."""
        spans = self._ranges.get(client)
        if not spans:
            return None
        i = bisect.bisect_right(spans, (clock, _U32)) - 1
        return spans[i][0] if i >= 0 and spans[i][0] <= clock < spans[i][1] else None

    def covers(self, client: int, clock: int) -> bool:
        return self.start(client, clock) is not None
