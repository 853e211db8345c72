"""One task's replicated swarm metadata: a pycrdt (Yjs) document, and its sync as plain calls.

Content: one map, ``peers``, with one record per peer, written only by that peer, whole (a plain
dict; ../shared/DATA.md §A pitfall 1: two peers creating a nested map at one key lose one of them)::

    peers[peer] = {"addrs": [multiaddr, ...],            # membership: where to reach it (relays too)
                   "seen": unix time, "state": "joining" | "training" | "left",
                   "models": [{"round", "digest", "size"}, ...],   # registry: versions it holds
                   "reputation": {target: score}}                  # its scores of other peers

Why one record per peer: Yjs keeps no history for a key its owner overwrites (flat over 1,000
rounds, DATA.md §A), but one client writing several keys in turn leaves a tombstone per overwrite
that cannot merge with its neighbours: measured here, two keys per peer per round grew the document
by ~25 B per peer-round without end, one key stays flat. Reputation is a row per observer (Yjs has
no counters: a shared ``+=`` would lose updates); readers average the rows.

Merge semantics (Yjs maps): concurrent writes of one key resolve to the same winner on every replica
(ordered by client id); a delete removes only the versions it has seen, so a live peer's record
written concurrently with someone's expiry of it survives; updates are idempotent and commutative,
and one that arrives before its dependencies waits, invisible, until they come. As every peer writes
only its own record, the only conflicts are expiries, which are benign. Records not refreshed for
``expiry`` seconds (or marked "left") are deleted by whoever notices first, which keeps the document
bounded under churn; ``seen`` is wall-clock time, so expiry assumes clocks agree to well within it.

Trust: nothing authenticates a write (any peer could overwrite any key), so readers validate every
value and skip malformed ones; updates are size-bounded and malformed ones rejected whole.

Sync, sans-IO: :meth:`state_vector` / :meth:`diff` / :meth:`apply` for anti-entropy (the overlay
exchanges them with each new peer and periodically with a random one), :meth:`take_outgoing` for
the incremental updates of local edits (published over gossipsub).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pycrdt import Doc, Map, TransactionEvent, merge_updates

STATES = ("joining", "training", "left")
MAX_ADDRS = 16


class MetadataError(ValueError):
    """A malformed or oversized update or state vector; the message says why."""


@dataclass(frozen=True)
class Member:
    peer: str
    addrs: tuple[str, ...]
    seen: float
    state: str


@dataclass(frozen=True)
class ModelRecord:
    round: int
    peer: str
    digest: str
    size: int


class Metadata:
    def __init__(
        self,
        task: str,
        peer_id: str,
        *,
        expiry: float = 60.0,
        keep_rounds: int = 5,
        max_update: int = 4 * 2**20,
    ) -> None:
        self.task = task
        self.peer = peer_id
        self.expiry = expiry
        self.keep_rounds = keep_rounds
        self.max_update = max_update
        self.doc = Doc()
        self._peers = self.doc.get("peers", type=Map)
        self._own: dict[str, Any] = {
            "addrs": [],
            "seen": 0.0,
            "state": "joining",
            "models": [],
            "reputation": {},
        }
        self._outgoing: list[bytes] = []
        self._applying = False  # remote updates are not ours to publish again
        self._subscription = self.doc.observe(self._on_transaction)

    def _on_transaction(self, event: TransactionEvent) -> None:
        if not self._applying:
            self._outgoing.append(event.update)

    # -- local writes: each one rewrites our record ------------------------------------------------

    def _write(self, **changes: Any) -> None:
        self._own.update(changes)
        self._peers[self.peer] = dict(self._own)

    def heartbeat(self, now: float, addrs: Sequence[str], state: str = "training") -> None:
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        self._write(addrs=list(addrs)[:MAX_ADDRS], seen=float(now), state=state)

    def record_model(self, round: int, digest: str, size: int) -> None:
        """A model version we hold; the oldest beyond ``keep_rounds`` versions is dropped."""
        older = [m for m in self._own["models"] if m["round"] != round]
        self._write(models=[{"round": round, "digest": digest, "size": size}, *older][: self.keep_rounds])

    def set_reputation(self, scores: Mapping[str, float]) -> None:
        self._write(reputation={str(k): float(v) for k, v in scores.items()})

    def expire(self, now: float) -> list[str]:
        """Delete the records of peers gone quiet for ``expiry`` seconds, marked "left", or malformed."""
        members = self.members()
        gone = [
            peer
            for peer in self._peers.keys()  # noqa: SIM118 (a pycrdt Map)
            if peer != self.peer
            and (
                peer not in members or members[peer].state == "left" or now - members[peer].seen > self.expiry
            )
        ]
        with self.doc.transaction():
            for peer in gone:
                del self._peers[peer]
        return gone

    # -- reads (every value validated: any peer can write anything) --------------------------------

    def members(self) -> dict[str, Member]:
        out = {}
        for peer, record in self._peers.items():
            member = _member(peer, record)
            if member is not None:
                out[peer] = member
        return out

    def models(self) -> list[ModelRecord]:
        """Every model version peers hold, newest round first."""
        out = []
        for peer, record in self._peers.items():
            versions = record.get("models") if isinstance(record, dict) else None
            for v in versions if isinstance(versions, list) else []:
                if (
                    isinstance(v, dict)
                    and _is_count(v.get("round"))
                    and isinstance(v.get("digest"), str)
                    and _is_count(v.get("size"))
                ):
                    out.append(ModelRecord(int(v["round"]), peer, v["digest"], int(v["size"])))
        return sorted(out, key=lambda r: (-r.round, r.peer))

    def reputation(self) -> dict[str, float]:
        """Mean score per target over the observers' rows."""
        scores: dict[str, list[float]] = {}
        for record in self._peers.values():
            row = record.get("reputation") if isinstance(record, dict) else None
            for target, score in row.items() if isinstance(row, dict) else []:
                if isinstance(score, int | float) and not isinstance(score, bool) and math.isfinite(score):
                    scores.setdefault(target, []).append(float(score))
        return {target: sum(v) / len(v) for target, v in scores.items()}

    def snapshot(self) -> dict[str, Any]:
        return self._peers.to_py()

    # -- sync --------------------------------------------------------------------------------------

    def state_vector(self) -> bytes:
        return self.doc.get_state()

    def diff(self, state_vector: bytes) -> bytes:
        """The update that brings the holder of ``state_vector`` up to date with us."""
        if not isinstance(state_vector, bytes | bytearray) or len(state_vector) > self.max_update:
            raise MetadataError("state vector must be bytes within the size limit")
        try:
            return self.doc.get_update(bytes(state_vector))
        except ValueError as e:
            raise MetadataError(f"bad state vector: {e}") from None

    def apply(self, update: bytes) -> None:
        if not isinstance(update, bytes | bytearray):
            raise MetadataError(f"update must be bytes, got {type(update).__name__}")
        if len(update) > self.max_update:
            raise MetadataError(f"update of {len(update)} bytes is over the {self.max_update}-byte limit")
        self._applying = True
        try:
            self.doc.apply_update(bytes(update))
        except ValueError as e:
            raise MetadataError(f"bad update: {e}") from None
        finally:
            self._applying = False

    def take_outgoing(self) -> bytes | None:
        """Our own edits since the last call, merged into one update; None if there were none."""
        if not self._outgoing:
            return None
        update = merge_updates(*self._outgoing) if len(self._outgoing) > 1 else self._outgoing[0]
        self._outgoing.clear()
        return update


def _is_count(x: object) -> bool:
    """A whole number >= 0 (Yjs gives small integers back as floats: DATA.md §A pitfall 2)."""
    return (
        isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x >= 0 and x == int(x)
    )


def _member(peer: str, value: object) -> Member | None:
    if not isinstance(value, dict):
        return None
    addrs, seen, state = value.get("addrs"), value.get("seen"), value.get("state")
    if not (isinstance(addrs, list) and len(addrs) <= MAX_ADDRS and all(isinstance(a, str) for a in addrs)):
        return None
    if not (isinstance(seen, int | float) and not isinstance(seen, bool) and math.isfinite(seen)):
        return None
    if state not in STATES:
        return None
    return Member(peer, tuple(addrs), float(seen), state)
