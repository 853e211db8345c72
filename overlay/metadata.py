"""One task's replicated swarm metadata: a pycrdt (Yjs) document and the sans-IO half of its sync.

The libp2p overlay does the I/O: it publishes :meth:`Metadata.take_outgoing` over gossipsub, feeds
what it receives to :meth:`Metadata.apply`, and repairs gaps with anti-entropy (send
:meth:`Metadata.state_vector`, answer with :meth:`Metadata.diff`, apply the answer). Nothing here reads a
clock, sleeps or touches a socket; ``now`` is always passed in.

Layout: a single root map ``peers``, one key per peer, holding one atomic (JSON) dict that only that
peer writes::

    peers[peer_id] = {"addrs": [multiaddr, ...], "seen": now, "state": "training",
                      "models": [[round, digest, size], ...],   # its last ``keep_rounds`` rounds
                      "scores": {target: score}}                # its reputation row

Why one key per peer rather than separate ``members`` / ``models["%08d/peer"]`` / ``reputation`` maps
(../shared/DATA.md §A): every overwrite or delete leaves a tombstone, and Yjs merges tombstones only when
they are consecutive items of one client in one key's chain. A peer that always overwrites the same key
stays flat; a peer alternating between keys leaves ~12 B per overwrite forever, and write-once keys
leave their whole key per record. Measured with 20 peers writing a heartbeat and a model record each
round for 1,000 rounds: write-once model keys grew the full state to 1.69 MB (~1.7 kB per round, without
bound), one key per peer in two maps by ~480 B per round, while this layout stays at ~19 kB plus ~90 B
per departed peer (tests/test_metadata.py). The cost is that each write re-sends the peer's whole entry:
~800 B with one address, 5 model records and 5 scores (~60 B per scored target).

Merge semantics:

- A map key resolves concurrent sets last-writer-wins, ordered by the writers' Yjs client ids. Because
  each peer writes only its own key, no two peers set a key concurrently and no field is lost; entries
  are atomic dicts, never nested containers (two peers creating a container at one key lose one whole).
- A delete removes only the items it has seen. When one peer expires another while that peer
  concurrently heartbeats, the new heartbeat survives the merge and the peer stays a member.
- Yjs has no counters, so reputation is one row per observer (``scores``) and readers average the rows;
  concurrent ``+=`` on a shared key would lose updates.
- Liveness uses the wall-clock ``seen`` the peer wrote, so expiry assumes loosely synchronised clocks
  (skew well under ``expiry``). An entry more than ``expiry`` in the future is treated like a stale one,
  otherwise a broken or hostile clock would keep it forever.
- Writes are not authenticated: any peer can overwrite or delete any key. Readers therefore validate
  every entry's shape and skip a malformed one without raising, and :meth:`Metadata.expire` removes it.
  Trust in content (who really wrote it) belongs to the application layer.

Bounded under churn: one entry per live peer, at most ``keep_rounds`` model records per entry, expiry of
departed peers (a peer that sets state ``"left"`` is removed at the next expiry), and flat tombstones
(one short run per departed peer or per restart, since each process gets a fresh random client id, as it
must: reusing a client id without its state corrupts Yjs clocks).

pycrdt pitfalls this respects (DATA.md §A): small ints come back as floats; nothing writes inside an
observe callback; the Doc is not thread-safe, so touch a ``Metadata`` from one thread (the trio thread).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from pycrdt import Doc, Map, TransactionEvent, merge_updates


class MetadataError(ValueError):
    """An update or state vector that is malformed or too large; the message says why.

    ``hostile``: whether it proves the sender wrong (malformed bytes) rather than merely refused (over
    a bound an honest peer may reach by relaying others' records): only the first counts against it.
    """

    hostile = True


@dataclass(frozen=True)
class Member:
    """A peer's liveness entry. Relay addresses are the ``addrs`` containing ``/p2p-circuit``."""

    peer: str
    addrs: tuple[str, ...]
    seen: float
    state: str  # "joining", "training", "left", ...


@dataclass(frozen=True)
class ModelRecord:
    """A model a peer announces for a round; ``digest`` names its bytes for transfer and verification."""

    round: int
    peer: str
    digest: str
    size: int


class _Entry(NamedTuple):
    member: Member
    models: tuple[ModelRecord, ...]
    scores: dict[str, float]


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _natural(value: object) -> int | None:
    """A non-negative int; the doc returns small ints as floats."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and value >= 0 else None


def _parse(peer: str, value: object) -> _Entry | None:
    """The entry if every required field has the right shape (extra fields are allowed), else None."""
    if not isinstance(value, dict):
        return None
    addrs, seen, state = value.get("addrs"), _finite(value.get("seen")), value.get("state")
    models, scores = value.get("models"), value.get("scores")
    if not (
        isinstance(addrs, list)
        and all(isinstance(a, str) for a in addrs)
        and seen is not None
        and isinstance(state, str)
        and isinstance(models, list)
        and isinstance(scores, dict)
    ):
        return None
    records = []
    for record in models:
        if not (isinstance(record, list) and len(record) == 3):
            return None
        rnd, digest, size = _natural(record[0]), record[1], _natural(record[2])
        if rnd is None or not isinstance(digest, str) or size is None:
            return None
        records.append(ModelRecord(rnd, peer, digest, size))
    clean_scores = {}
    for target, score in scores.items():
        if not isinstance(target, str) or (value := _finite(score)) is None:
            return None
        clean_scores[target] = value
    return _Entry(Member(peer, tuple(addrs), seen, state), tuple(records), clean_scores)


def _checked(data: object, what: str, limit: int) -> bytes:
    """``data`` as bytes if it is bytes-like, within ``limit`` and plausibly sized, else MetadataError.

    The type check matters: ``bytes(n)`` of a hostile msgpack int would allocate n bytes. The count
    check too: yrs preallocates for the leading client count, and a 5-byte input claiming 10^8 clients
    made it allocate ~130 MB before failing.
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
            return data
    raise MetadataError(f"{what} does not start with a client count")


def _decoding_error(what: str, exc: BaseException) -> MetadataError:
    """A decoding failure as MetadataError; anything else is re-raised.

    Besides ValueError, yrs can panic on rare hostile input (seen once in ~25k mutated updates); pyo3
    raises that as ``PanicException``, a BaseException that every ``except Exception`` would let through.
    """
    if isinstance(exc, ValueError) or type(exc).__name__ == "PanicException":
        return MetadataError(f"malformed {what}: {exc}")
    raise exc


_BLANK: dict[str, Any] = {"addrs": [], "seen": 0.0, "state": "", "models": [], "scores": {}}


class Metadata:
    """The replicated metadata of task ``task`` as seen by ``peer_id``; see the module docstring."""

    def __init__(
        self,
        task: str,
        peer_id: str,
        *,
        expiry: float = 60.0,
        keep_rounds: int = 5,
        max_update: int = 4 * 2**20,
    ) -> None:
        if expiry <= 0 or keep_rounds < 1 or max_update < 1:
            raise ValueError("expiry, keep_rounds and max_update must be positive")
        self.task, self.peer_id = task, peer_id
        self.expiry, self.keep_rounds, self.max_update = expiry, keep_rounds, max_update
        self._doc: Doc = Doc()
        self._peers: Map = self._doc.get("peers", type=Map)
        # This peer's own entry is kept here and rewritten whole: the doc copy may have been
        # overwritten by a hostile peer, and each rewrite restores it.
        self._entry: dict[str, Any] = {
            "addrs": [],
            "seen": None,
            "state": "joining",
            "models": [],
            "scores": {},
        }
        self._applying = False
        self._outgoing: list[bytes] = []
        self._doc.observe(self._on_transaction)

    def _on_transaction(self, event: TransactionEvent) -> None:
        if not self._applying:  # only local writes are published; remote ones came from the network
            self._outgoing.append(event.update)

    def _write(self, **changes: Any) -> None:
        """Rewrite this peer's entry with ``changes``; there is no entry before the first heartbeat.

        A change that would make the entry unreadable to peers is a ``ValueError`` and changes nothing.
        """
        if _parse(self.peer_id, {**_BLANK, **changes}) is None:  # only the changes need checking
            raise ValueError(f"refusing to write a malformed entry: {changes}")
        self._entry = entry = {**self._entry, **changes}
        if entry["seen"] is not None:
            self._peers[self.peer_id] = entry

    # -- local writes -------------------------------------------------------------------------------

    def heartbeat(self, now: float, addrs: Sequence[str], state: str = "training") -> None:
        """Announce this peer as alive at ``now`` with its current addresses and state."""
        self._write(addrs=list(addrs), seen=now, state=state)

    def record_model(self, round: int, digest: str, size: int) -> None:
        """Announce this peer's model for ``round`` (replacing an earlier record of that round) and keep
        only the records of its last ``keep_rounds`` rounds. Visible from the first heartbeat on."""
        records = [m for m in self._entry["models"] if m[0] != round] + [[round, digest, size]]
        newest = max(m[0] for m in records)
        self._write(
            models=sorted((m for m in records if m[0] > newest - self.keep_rounds), key=lambda m: -m[0])
        )

    def set_reputation(self, scores: Mapping[str, float]) -> None:
        """Replace this peer's reputation row (its score per target). Visible from the first heartbeat on."""
        self._write(scores=dict(scores))

    def expire(self, now: float) -> list[str]:
        """Delete other peers' entries that are stale, too far in the future, ``"left"`` or malformed.

        Returns the removed peer ids, sorted. Safe against a concurrent heartbeat (module docstring).
        """
        removed = []
        for peer, value in self._peers.items():
            if peer == self.peer_id:
                continue
            entry = _parse(peer, value)
            if entry is None or entry.member.state == "left" or abs(now - entry.member.seen) > self.expiry:
                removed.append(peer)
        if removed:
            with self._doc.transaction():
                for peer in removed:
                    del self._peers[peer]
        return sorted(removed)

    # -- reads --------------------------------------------------------------------------------------

    def _entries(self) -> list[_Entry]:
        return [e for peer, value in self._peers.items() if (e := _parse(peer, value)) is not None]

    def members(self) -> dict[str, Member]:
        """Every well-formed entry, including this peer's and those in state ``"left"``."""
        return {e.member.peer: e.member for e in self._entries()}

    def models(self) -> list[ModelRecord]:
        """Every announced model, newest round first (ties by peer id)."""
        records = [r for e in self._entries() for r in e.models]
        return sorted(records, key=lambda r: (-r.round, r.peer))

    def reputation(self) -> dict[str, float]:
        """Mean score per target over the observers that scored it; self-scores are ignored."""
        sums: dict[str, list[float]] = {}
        for entry in self._entries():
            for target, score in entry.scores.items():
                if target != entry.member.peer:
                    sums.setdefault(target, []).append(score)
        return {target: math.fsum(scores) / len(scores) for target, scores in sums.items()}

    def snapshot(self) -> dict[str, Any]:
        """The document as plain Python values (unvalidated), for tests and status output."""
        return {"task": self.task, "peers": self._peers.to_py()}

    # -- sync, sans-IO ------------------------------------------------------------------------------

    def state_vector(self) -> bytes:
        """What this replica has seen, to send to a peer that answers with :meth:`diff`."""
        return self._doc.get_state()

    def diff(self, state_vector: bytes) -> bytes:
        """Everything the holder of ``state_vector`` lacks (``b"\\x00"`` asks for the full state)."""
        state_vector = _checked(state_vector, "state vector", self.max_update)
        try:
            return self._doc.get_update(state_vector)
        except BaseException as exc:
            raise _decoding_error("state vector", exc) from None

    def apply(self, update: bytes) -> None:
        """Merge a remote update. Duplicates and reordering are harmless; an update whose dependencies
        have not arrived stays pending (invisible) until they do. On error the doc is unchanged."""
        update = _checked(update, "update", self.max_update)
        self._applying = True
        try:
            self._doc.apply_update(update)  # yrs decodes the whole update before integrating any of it
        except BaseException as exc:
            raise _decoding_error("update", exc) from None
        finally:
            self._applying = False

    def take_outgoing(self) -> bytes | None:
        """All local writes since the last call, merged into one update; None if there were none.

        Held in memory until taken, so the overlay should take and publish after each batch of writes.
        """
        if not self._outgoing:
            return None
        pending, self._outgoing = self._outgoing, []
        return pending[0] if len(pending) == 1 else merge_updates(*pending)
