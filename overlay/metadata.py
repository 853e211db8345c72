"""One task's replicated swarm metadata: a pycrdt (Yjs) document of signed records, and the sans-IO half
of its sync.

``overlay.metasync`` does the I/O: it publishes :meth:`Metadata.take_outgoing` over gossipsub, feeds
what it receives to :meth:`Metadata.apply`, and repairs gaps with anti-entropy (send
:meth:`Metadata.state_vector`, answer with :meth:`Metadata.diff`, apply the answer). Nothing here reads a
clock, sleeps or touches a socket; ``now`` is always passed in.

Layout: a single root map ``peers``, one key per peer, holding one atomic (JSON) value that only that
peer writes, signed with its libp2p identity key::

    peers[peer_id] = {"r": {"addrs": [multiaddr, ...], "seen": now, "state": "training",
                            "models": [[round, digest, size], ...],   # its last ``keep_rounds`` rounds
                            "scores": {target: score}},               # its reputation row
                      "c": counter,                                   # per-peer, only grows
                      "s": signature hex}

The signature (Ed25519; the key is the one the peer id embeds) covers canonical JSON of
``[DOMAIN, task, peer_id, c, r]``: a record cannot be moved to another key or another task's document.
Every number is written as a float, which the doc returns unchanged (it returns ints below 2**53 as
floats, and pycrdt panics at 2**63), so readers re-encode exactly what was signed; written ints must lie
in 0..2**53-1. The counter is ``max(last + 1, seen in microseconds)``: it survives a restart without
storage unless the clock goes back past it.

Why one key per peer rather than separate ``members`` / ``models["%08d/peer"]`` / ``reputation`` maps
(../shared/DATA.md §A): every overwrite or delete leaves a tombstone, and Yjs merges tombstones only when
they are consecutive items of one client in one key's chain. A peer that always overwrites the same key
stays flat; a peer alternating between keys leaves ~12 B per overwrite forever, and write-once keys
leave their whole key per record. Measured with 20 peers writing a heartbeat and a model record each
round for 1,000 rounds: write-once model keys grew the full state to 1.69 MB (~1.7 kB per round, without
bound), one key per peer in two maps by ~480 B per round, while this layout stays at ~22 kB plus ~100 B
per departed peer (tests/test_metadata.py). The cost is that each write re-sends the peer's whole entry:
~940 B with one address, 5 model records and 5 scores (~60 B per scored target), of which ~200 B are
counter and signature.

Merge semantics:

- A map key resolves concurrent sets last-writer-wins, ordered by the writers' Yjs client ids. Each
  honest peer writes only its own key; entries are atomic values, never nested containers (two peers
  creating a container at one key lose one whole).
- A delete removes only the items it has seen. When one peer expires another while that peer
  concurrently heartbeats, the new heartbeat survives the merge and the peer stays a member.
- Yjs has no counters, so reputation is one row per observer (``scores``) and readers average the rows;
  concurrent ``+=`` on a shared key would lose updates.
- Liveness uses the wall-clock ``seen`` the peer signed, so expiry assumes loosely synchronised clocks
  (skew well under ``expiry``). An entry more than ``expiry`` in the future is treated like a stale one,
  otherwise a broken or hostile clock would keep it forever.

Trust model. Readers never read the doc directly: they read a cache of each peer's last valid record,
updated from the keys each transaction changed. A doc value is valid if it is well-formed, within the
bounds below, signed for this task by the key its doc key names, and its counter exceeds the highest
this node has accepted for that peer. A valid value already in the cache is recognised by equality,
without verifying again, so reads and re-deliveries cost no signature check. Hence what another peer
can do to A's record:

- It cannot forge or alter it, move it to another key or task, replay an older one, or mark A "left":
  readers ignore such values and :meth:`Metadata.expire` deletes them from the doc.
- It can delete A's doc copy, or overwrite it so that A's concurrent write (one not yet merged with the
  overwrite) loses in the doc. Readers keep A's last valid record until it expires; A's next write
  after syncing restores the doc copy.
- It can create Sybil identities, each signing its own records: the entry cap bounds how many a reader
  keeps (first come, first kept; one slot is always this peer's own).
- A peer leaves readers' view only on this node's expiry: its signed ``seen`` too old or too far ahead,
  or its own signed ``"left"``; an older record replayed after that is refused (``"left"`` peers keep a
  counter floor for ``expiry``, bounded at ``max_entries``; older records are stale anyway).

Bounds, so that no input exhausts a node and honest diffs always fit in a peer's update limit:

- ``max_entries`` (1,000) records kept, this peer's included; further peers are ignored and their doc
  entries deleted by expire.
- ``max_entry_bytes`` (4 KiB) per record, counted as its signed payload plus signature; larger ones
  are ignored and deleted, and refused locally with ValueError.
- ``max_state`` (2 MiB) of encoded state: an update that would grow the doc beyond it is refused with
  :class:`MetadataFull` (``hostile`` False: an honest peer relaying others' records can send one) and
  changes nothing. It must be below ``max_update`` (4 MiB), the limit on one received update or state
  vector, since a diff is at most the whole state: honest replicas never refuse each other's diffs as
  oversized, which is how ~6,000 fake records once made honest nodes ban each other.
- Local writes are validated before they reach pycrdt, and a pycrdt panic on one (a BaseException) is
  turned into ValueError.

Bounded under churn: one entry per live peer, at most ``keep_rounds`` model records per entry, expiry of
departed peers (a peer that sets state ``"left"`` is removed at the next expiry), and flat tombstones
(one short run per departed peer or per restart, since each process gets a fresh random client id, as it
must: reusing a client id without its state corrupts Yjs clocks). Deleted entries' tombstones (~100 B
each) never compact, so a peer that keeps pushing junk entries, which expire deletes, grows the state
towards ``max_state``; compaction needs all peers to move to a new document together (DATA.md §A).

pycrdt pitfalls this respects (DATA.md §A): small ints come back as floats; nothing writes inside an
observe callback; the Doc is not thread-safe, so touch a ``Metadata`` from one thread (the trio thread).

Size: the document and the verification of its records stay together (the verified cache is
updated inside the document's transactions); the update parser already lives in ``yupdate.py``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

from libp2p.crypto.ed25519 import Ed25519PublicKey
from libp2p.crypto.keys import KeyPair, PublicKey
from libp2p.peer.id import ID
from pycrdt import Doc, Map, TransactionEvent, merge_updates

from shoal.overlay.yupdate import UpdateError, check_state_vector, check_update

DOMAIN = "shoal/metadata/1"  # signed first, so a record signature is never valid as any other signature
MAX_INT = 2**53 - 1  # numbers travel as JSON (float64) numbers: beyond this, ints lose precision
MAX_PEER_ID = 64  # characters; Ed25519 peer ids are 52, and base58-decoding a longer key costs O(n^2)


class MetadataError(ValueError):
    """An update or state vector that is malformed or too large; the message says why.

    ``hostile``: whether it proves the sender wrong (malformed bytes) rather than merely refused (over
    a bound an honest peer may reach by relaying others' records): only the first counts against it.
    """

    hostile = True


class MetadataFull(MetadataError):
    """An update refused because the document would outgrow ``max_state``; an honest peer relaying
    others' records can send one, so it does not count against the sender."""

    hostile = False


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


class _Verified(NamedTuple):
    """The last valid record of one peer, as readers see it."""

    counter: int
    signature: str
    value: dict[str, Any]  # as read from the doc, to recognise the same record again without verifying
    entry: _Entry
    payload: bytes  # what the signature covers


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _natural(value: object) -> int | None:
    """An int in 0..MAX_INT; the doc returns ints as floats."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and 0 <= value <= MAX_INT else None


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


def _payload(task: str, peer: str, counter: object, record: object) -> bytes:
    """The signed bytes: canonical JSON of the record with the task, signer and counter it is bound to.

    Canonical because the doc does not keep key order; exact because writers store every number as a
    float, which the doc returns unchanged. Raises ValueError (or RecursionError) for what JSON or UTF-8
    cannot hold, e.g. NaN or a lone surrogate.
    """
    text = json.dumps(
        [DOMAIN, task, peer, counter, record],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )
    return text.encode()


def sign_record(task: str, key_pair: KeyPair, counter: int, record: dict[str, Any]) -> dict[str, Any]:
    """The doc value under which ``key_pair``'s peer publishes ``record`` (numbers as floats)."""
    payload = _payload(task, _peer_id(key_pair), float(counter), record)
    return {"r": record, "c": float(counter), "s": key_pair.private_key.sign(payload).hex()}


def _peer_id(key_pair: KeyPair) -> str:
    return ID.from_pubkey(key_pair.public_key).to_base58()


@lru_cache(maxsize=4096)
def _public_key(peer: str) -> PublicKey | None:
    """The Ed25519 key a peer id embeds, or None: then nothing can be signed under it. Other key types
    are refused: a secp256k1 key's ``verify`` raises on our signatures instead of answering False."""
    if len(peer) > MAX_PEER_ID:
        return None
    try:
        key = ID.from_base58(peer).extract_public_key()
    except Exception:  # a hostile id: base58, multihash and key decoding raise assorted types
        return None
    return key if isinstance(key, Ed25519PublicKey) else None


def _checked(data: object, what: str, limit: int, parse: Callable[[bytes], None]) -> bytes:
    """``data`` as bytes if it is bytes-like, within ``limit`` and ``parse`` accepts it, else MetadataError.

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
                parse(data)
            except UpdateError as exc:
                raise MetadataError(f"malformed {what}: {exc}") from None
            return data
    raise MetadataError(f"{what} does not start with a client count")


def _is_panic(exc: BaseException) -> bool:
    """Whether ``exc`` is a yrs panic: pyo3 raises ``PanicException``, a BaseException that every
    ``except Exception`` would let through, and it kills the daemon."""
    return type(exc).__name__ == "PanicException"


def _decoding_error(what: str, exc: BaseException) -> MetadataError:
    """A decoding failure as MetadataError; anything else is re-raised.

    Besides ValueError, yrs can panic on rare hostile input (seen once in ~25k mutated updates).
    """
    if isinstance(exc, ValueError) or _is_panic(exc):
        return MetadataError(f"malformed {what}: {exc}")
    raise exc


class Metadata:
    """The replicated metadata of task ``task`` as seen by the peer of ``key_pair``, which signs its own
    record with it; see the module docstring for the layout, trust model and bounds."""

    def __init__(
        self,
        task: str,
        key_pair: KeyPair,
        *,
        expiry: float = 60.0,
        keep_rounds: int = 5,
        max_update: int = 4 * 2**20,
        max_state: int = 2 * 2**20,
        max_entries: int = 1000,
        max_entry_bytes: int = 4096,
    ) -> None:
        if expiry <= 0 or min(keep_rounds, max_update, max_state, max_entries, max_entry_bytes) < 1:
            raise ValueError("expiry, keep_rounds and the bounds must be positive")
        if max_state >= max_update:
            raise ValueError("max_state must be below max_update, or peers would refuse honest diffs")
        self.task, self.key_pair = task, key_pair
        self.peer_id = _peer_id(key_pair)
        self.expiry, self.keep_rounds = expiry, keep_rounds
        self.max_update, self.max_state = max_update, max_state
        self.max_entries, self.max_entry_bytes = max_entries, max_entry_bytes
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
        self._counter = 0
        self._valid: dict[str, _Verified] = {}  # what readers see, this peer's own record included
        self._junk: set[str] = set()  # keys whose doc value readers ignore, for expire to delete
        self._floors: dict[str, tuple[int, float]] = {}  # counter and seen of peers forgotten on "left"
        self._changed: set[str] = set()  # keys changed in the doc since the last _refresh
        self._now: float | None = None  # the latest ``now`` passed in
        self._size = 0  # estimated encoded state: exact at the last measurement, plus updates since
        self._exact = True  # whether nothing changed since that measurement
        self._applying = False
        self._outgoing: list[bytes] = []
        self._doc.observe(self._on_transaction)
        # pycrdt's own Map.observe converts every old and new value of an event to Python (3/4 of the
        # time of a write, measured); the raw observer yields the changed keys only
        self._subscription = self._peers.integrated.observe(self._on_change)

    def _on_transaction(self, event: TransactionEvent) -> None:
        self._size += len(event.update)
        self._exact = False
        if not self._applying:  # only local writes are published; remote ones came from the network
            self._outgoing.append(event.update)

    def _on_change(self, event: Any) -> None:
        try:
            self._changed.update(event.keys)
        except BaseException as exc:  # yrs can panic listing a hostile update's keys (seen in CI)
            if not _is_panic(exc):
                raise
            self._changed.update(self._peers.keys())  # so re-judge every key

    def _tick(self, now: float) -> None:
        self._now = now if self._now is None else max(self._now, now)

    def _write(self, **changes: Any) -> None:
        """Sign and write this peer's entry with ``changes``; there is no entry before the first heartbeat.

        A change that would make the entry unreadable to peers (malformed, over ``max_entry_bytes``) is a
        ``ValueError`` and changes nothing. Numbers must already be floats: the signature covers them.
        """
        entry = {**self._entry, **changes}
        parsed = _parse(self.peer_id, {**entry, "seen": entry["seen"] or 0.0})
        if parsed is None:
            raise ValueError(f"refusing to write a malformed entry: {changes}")
        if entry["seen"] is not None:
            # survives restarts without storage, as long as the clock does not go back past it
            counter = max(self._counter + 1, int(entry["seen"] * 1e6))
            if counter > MAX_INT:
                raise ValueError(f"refusing to write a malformed entry: seen {entry['seen']} is too late")
            try:
                payload = _payload(self.task, self.peer_id, float(counter), entry)
            except ValueError as e:  # e.g. a lone surrogate, which would make pycrdt panic
                raise ValueError(f"refusing to write a malformed entry: {e}") from None
            signature = self.key_pair.private_key.sign(payload).hex()
            if len(payload) + len(signature) > self.max_entry_bytes:  # as readers measure it
                raise ValueError(f"refusing to write an entry over {self.max_entry_bytes} bytes")
            value = {"r": entry, "c": float(counter), "s": signature}
            verified = _Verified(counter, signature, value, parsed, payload)
            try:
                self._peers[self.peer_id] = value
            except BaseException as exc:
                if _is_panic(exc):
                    raise ValueError(f"pycrdt refused the entry: {exc}") from None
                raise
            self._counter, self._valid[self.peer_id] = counter, verified
        self._entry = entry

    # -- local writes -------------------------------------------------------------------------------

    def heartbeat(self, now: float, addrs: Sequence[str], state: str = "training") -> None:
        """Announce this peer as alive at ``now`` with its current addresses and state."""
        if (seen := _finite(now)) is None:
            raise ValueError(f"refusing to write a malformed entry: seen {now!r}")
        self._write(addrs=list(addrs), seen=seen, state=state)
        self._tick(now)

    def record_model(self, round: int, digest: str, size: int) -> None:
        """Announce this peer's model for ``round`` (replacing an earlier record of that round) and keep
        only the records of its last ``keep_rounds`` rounds. Visible from the first heartbeat on.

        ``round`` and ``size`` must be ints in 0..2**53-1 (beyond, JSON numbers lose precision and
        pycrdt panics at 2**63)."""
        if _natural(round) is None or _natural(size) is None:
            raise ValueError(f"refusing to write a malformed entry: round {round!r}, size {size!r}")
        records = [m for m in self._entry["models"] if m[0] != round] + [[float(round), digest, float(size)]]
        newest = max(m[0] for m in records)
        self._write(
            models=sorted((m for m in records if m[0] > newest - self.keep_rounds), key=lambda m: -m[0])
        )

    def set_reputation(self, scores: Mapping[str, float]) -> None:
        """Replace this peer's reputation row (its score per target). Visible from the first heartbeat on."""
        self._write(scores={target: _finite(score) for target, score in scores.items()})

    def expire(self, now: float) -> list[str]:
        """Forget peers whose record is stale, too far in the future or ``"left"``, and delete their doc
        entries and those readers ignore (invalid, replayed, oversized, over the cap); never our own.

        Returns the peers readers no longer see, sorted: those forgotten and those whose ignored entry was
        deleted (a live peer whose doc copy was forged stays). Safe against a concurrent heartbeat.
        """
        self._tick(now)
        forgotten = []
        for peer, record in list(self._valid.items()):
            member = record.entry.member
            if peer != self.peer_id and (member.state == "left" or abs(now - member.seen) > self.expiry):
                forgotten.append(peer)
                del self._valid[peer]
                if member.state == "left":  # older records of its, replayed, must not revive it
                    self._floors[peer] = (record.counter, member.seen)
        # a replayed record older than a floor that aged out is stale, which _accept refuses anyway
        floors = sorted(self._floors.items(), key=lambda f: -f[1][1])
        self._floors = {p: f for p, f in floors[: self.max_entries] if abs(now - f[1]) <= self.expiry}
        doomed = [peer for peer in self._junk.union(forgotten) if peer in self._peers]
        if doomed:
            with self._doc.transaction():
                for peer in doomed:
                    del self._peers[peer]
            self._refresh()
        return sorted(peer for peer in set(forgotten).union(doomed) if peer not in self._valid)

    # -- verification -------------------------------------------------------------------------------

    def _unpack(self, peer: str, value: object) -> _Verified | None:
        """``value`` as a record of ``peer`` if it is well-formed and within ``max_entry_bytes``, its
        signature not yet checked; else None."""
        if not (isinstance(value, dict) and value.keys() == {"r", "c", "s"}):
            return None
        counter, signature = _natural(value["c"]), value["s"]
        entry = _parse(peer, value["r"])
        if counter is None or not isinstance(signature, str) or len(signature) != 128 or entry is None:
            return None
        try:
            payload = _payload(self.task, peer, value["c"], value["r"])
        except (ValueError, TypeError, RecursionError):  # TypeError: a binary value JSON cannot hold
            return None
        if len(payload) + len(signature) > self.max_entry_bytes:
            return None
        return _Verified(counter, signature, value, entry, payload)

    def _verify(self, peer: str, value: object) -> _Verified | None:
        """``value`` as a record of ``peer`` if :meth:`_unpack` accepts it and it is signed by the key
        ``peer`` embeds, for this task; else None."""
        if (record := self._unpack(peer, value)) is None or (key := _public_key(peer)) is None:
            return None
        try:
            signature = bytes.fromhex(record.signature)
        except ValueError:
            return None
        try:
            return record if key.verify(record.payload, signature) else None
        except Exception:  # the key library's own complaint about a hostile signature: not valid
            return None

    def _accept(self, peer: str, value: object) -> bool:
        """Whether the doc's ``value`` for ``peer`` is (now) the record readers see of it."""
        known = self._valid.get(peer)
        if known is not None and isinstance(value, dict) and value == known.value:
            return True  # already verified: reads and re-deliveries cost no signature check
        if known is None and len(self._valid) - (self.peer_id in self._valid) >= self.max_entries - 1:
            return False  # over the cap (one slot stays ours), refused before paying for a check
        record = self._verify(peer, value)
        if record is None:
            return False
        floor = max(known.counter if known else -1, self._floors.get(peer, (-1, 0.0))[0])
        if record.counter <= floor:
            return False  # a replay (or an equivocation) of an older record
        if self._now is not None and self._now - record.entry.member.seen > self.expiry:
            return False  # stale: it would only be forgotten again
        self._valid[peer] = record
        self._floors.pop(peer, None)
        return True

    def _refresh(self) -> None:
        """Re-judge the doc values changed since the last call. A deleted or ignored value leaves the
        peer's last valid record in place, so a hostile delete or replay does not hide a live peer."""
        changed, self._changed = self._changed, set()
        for peer in changed - {self.peer_id}:
            value = self._peers.get(peer)
            if value is None or self._accept(peer, value):
                self._junk.discard(peer)
            else:
                self._junk.add(peer)

    # -- reads --------------------------------------------------------------------------------------

    def members(self) -> dict[str, Member]:
        """Every peer's last valid record, including this peer's and those in state ``"left"``."""
        return {peer: record.entry.member for peer, record in self._valid.items()}

    def models(self) -> list[ModelRecord]:
        """Every announced model, newest round first (ties by peer id)."""
        records = [r for v in self._valid.values() for r in v.entry.models]
        return sorted(records, key=lambda r: (-r.round, r.peer))

    def reputation(self) -> dict[str, float]:
        """Mean score per target over the observers that scored it; self-scores are ignored."""
        sums: dict[str, list[float]] = {}
        for peer, record in self._valid.items():
            for target, score in record.entry.scores.items():
                if target != peer:
                    sums.setdefault(target, []).append(score)
        return {target: math.fsum(scores) / len(scores) for target, scores in sums.items()}

    def snapshot(self) -> dict[str, Any]:
        """The document as plain Python values (unverified), for tests and status output."""
        return {"task": self.task, "peers": self._peers.to_py()}

    # -- sync, sans-IO ------------------------------------------------------------------------------

    def state_vector(self) -> bytes:
        """What this replica has seen, to send to a peer that answers with :meth:`diff`."""
        return self._doc.get_state()

    def diff(self, state_vector: bytes) -> bytes:
        """Everything the holder of ``state_vector`` lacks (``b"\\x00"`` asks for the full state)."""
        state_vector = _checked(state_vector, "state vector", self.max_update, check_state_vector)
        try:
            return self._doc.get_update(state_vector)
        except BaseException as exc:
            raise _decoding_error("state vector", exc) from None

    def apply(self, update: bytes) -> None:
        """Merge a remote update. Duplicates and reordering are harmless; an update whose dependencies
        have not arrived stays pending (invisible) until they do. On error the doc is unchanged:
        MetadataFull if the document would outgrow ``max_state``, else MetadataError."""
        update = _checked(update, "update", self.max_update, check_update)
        if self._size + len(update) > self.max_state:
            if not self._exact:  # the estimate only grows; measure (~10 ms at 1 MB) before refusing
                self._size, self._exact = len(self._doc.get_update()), True
            if self._size + len(update) > self.max_state:
                raise MetadataFull(
                    f"update of {len(update)} bytes would grow the {self._size}-byte document"
                    f" over its {self.max_state}-byte bound"
                )
        self._applying = True
        try:
            self._doc.apply_update(update)  # yrs decodes the whole update before integrating any of it
        except BaseException as exc:
            raise _decoding_error("update", exc) from None
        finally:
            self._applying = False
        self._refresh()

    def take_outgoing(self) -> bytes | None:
        """All local writes since the last call, merged into one update; None if there were none.

        Held in memory until taken, so the overlay should take and publish after each batch of writes.
        """
        if not self._outgoing:
            return None
        pending, self._outgoing = self._outgoing, []
        return pending[0] if len(pending) == 1 else merge_updates(*pending)
