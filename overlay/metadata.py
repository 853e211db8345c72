"""One task's replicated swarm metadata: a pycrdt (Yjs) document of signed records, and the sans-IO half
of its sync.

What: :class:`Metadata` is this peer's replica for task ``task``: a single root map ``peers``, one key per
peer, holding one atomic (JSON) value that only that peer writes, signed with its libp2p identity key
(``overlay.records``: the record, its bounds, its signature bound to the task, the peer id and a counter
that only grows). Readers see the verified records through ``overlay.roster``.

Inputs: local writes (:meth:`Metadata.heartbeat`, :meth:`Metadata.record_model`,
:meth:`Metadata.set_reputation`), remote updates (:meth:`Metadata.apply`, judged whole by
``overlay.admission`` before yrs applies any of it) and ``now``: nothing here reads a clock, sleeps or
touches a socket. ``overlay.metasync`` does the I/O: it publishes :meth:`Metadata.take_outgoing` over
gossipsub, feeds what it receives to :meth:`Metadata.apply`, and repairs gaps with anti-entropy (send
:meth:`Metadata.state_vector`, answer with :meth:`Metadata.diff`, apply the answer).

Outputs: :meth:`Metadata.members`, :meth:`Metadata.models` and :meth:`Metadata.reputation` (one
``scores`` row per observer, averaged): every peer's last valid record, kept when its doc copy is deleted
or replayed, until it expires (:meth:`Metadata.expire`, which returns who is gone).

Errors: a local write peers could not read (malformed, over ``max_entry_bytes``) is a ValueError and
changes nothing; local writes are never refused for size. :meth:`Metadata.apply` changes nothing when it
raises: :class:`MetadataError` for junk (keys that are not peer ids, values not signed by their key for
this task, other roots and types, gossip writing another peer's key; ``hostile``, blamed on its sender),
:class:`MetadataPending` for an update that builds on what we have not seen (yrs would hold it in memory
until its dependencies arrive, from a hostile sender never), :class:`MetadataFull` over ``max_state`` or
the sender's ``junk_quota`` of signed records readers refuse per epoch; these two, and updates whose
verdict hangs on this replica's history, are :class:`MetadataRefused`, not blamed.

Semantics, and why:

- One key per peer, overwritten whole: Yjs merges tombstones only when they are consecutive items of one
  client in one key's chain, so an owner that always overwrites its key stays flat (write-once keys grow
  the state without bound); each write re-sends the whole entry (~1 kB).
- A key resolves concurrent sets last-writer-wins (by Yjs client id); honest peers write only their own
  key, atomic values, never nested containers. A delete removes only the items it has seen, so a
  heartbeat concurrent with another peer's expiry of it survives.
- Liveness uses the wall-clock ``seen`` the peer signed: expiry assumes clock skew well under
  ``expiry``; an entry more than ``expiry`` ahead counts as stale.
- Epochs of ``epoch_length`` wall-clock seconds: :meth:`Metadata.roll` starts a fresh document holding
  only our record; sync frames and gossip carry the epoch, updates of another epoch are not applied,
  readers keep their verified records across the boundary. Why: tombstones never leave a Yjs document
  and junk is cheap to write, so they, and whatever a hostile peer got in, last at most one epoch.
- Trust: nobody else can forge A's record, move it to another key or task, replay an older one or mark
  A "left"; deleting or replaying A's doc copy hides nothing from readers. Validly signed records are
  never blamed, whatever readers make of them: an honest peer may relay them. Sybils share the member
  cap by who delivered them; our own record and our direct peers' always have a place.
- Bounds: ``max_entries`` slots of ``slot_bytes`` (``overlay.roster``); ``max_entry_bytes`` per record
  (signed payload plus signature); ``max_state`` of encoded state, beyond which an update that brings a
  new key or a record readers refuse is refused (members' heartbeats, deletions and local writes never
  are: a full document must not silence its members). ``max_state`` is below ``max_update`` by a margin
  those cannot use up in an epoch, since a diff is at most the whole state: honest replicas never
  refuse each other's diffs as oversized.
- Bounded under churn: one entry per live peer, ``keep_rounds`` model records, expiry, one epoch of
  tombstones; each document gets a fresh random client id (reusing one without its state corrupts Yjs
  clocks).
- pycrdt: numbers are written as floats (small ints come back as floats, and the signature covers them);
  nothing writes inside an observe callback; the Doc is not thread-safe, so touch a ``Metadata`` from
  one thread (the trio thread).

Measurements behind these choices: docs/measurements.md, "Overlay internals".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from libp2p.crypto.keys import KeyPair
from pycrdt import Doc, Map, TransactionEvent, merge_updates

from shoal.overlay import records
from shoal.overlay.admission import (
    Gap,
    Junk,
    KeyIndex,
    MetadataError,
    MetadataFull,
    MetadataPending,
    MetadataRefused,
    Unsure,
    admit,
    checked,
    decoding_error,
    is_panic,
)
from shoal.overlay.records import Member, ModelRecord, Verified, finite, natural
from shoal.overlay.roster import Roster
from shoal.overlay.yupdate import parse_state_vector, parse_update


class Metadata:
    """The replicated metadata of task ``task`` as seen by the peer of ``key_pair``, which signs its own
    record with it; see the module docstring for the layout, trust model, epochs and bounds."""

    def __init__(
        self,
        task: str,
        key_pair: KeyPair,
        *,
        expiry: float = 60.0,
        keep_rounds: int = 5,
        max_update: int = 4 * 2**20,
        max_state: int = 3 * 2**20,
        max_entries: int = 1000,
        max_entry_bytes: int = 4096,
        slot_bytes: int = 1536,
        epoch_length: float = 300.0,
        junk_quota: int | None = None,
    ) -> None:
        bounds = (keep_rounds, max_update, max_state, max_entries, max_entry_bytes, slot_bytes)
        if expiry <= 0 or epoch_length <= 0 or min(bounds) < 1:
            raise ValueError("expiry, epoch_length, keep_rounds and the bounds must be positive")
        if max_state >= max_update:
            raise ValueError("max_state must be below max_update, or peers would refuse honest diffs")
        self.task, self.key_pair = task, key_pair
        self.peer_id = records.peer_of(key_pair)
        self.expiry, self.keep_rounds, self.epoch_length = expiry, keep_rounds, epoch_length
        self.max_update, self.max_state = max_update, max_state
        self.max_entries, self.max_entry_bytes = max_entries, max_entry_bytes
        self.junk_quota = max(1, max_entries // 4) if junk_quota is None else junk_quota
        self.roster = Roster(
            task,
            self.peer_id,
            expiry=expiry,
            max_entries=max_entries,
            max_entry_bytes=max_entry_bytes,
            slot_bytes=slot_bytes,
        )
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
        self.epoch = 0
        self._new_document()

    def _new_document(self) -> None:
        """Start an empty document (at an epoch boundary); readers keep what they verified."""
        self._doc: Doc = Doc()
        self._peers: Map = self._doc.get("peers", type=Map)
        self._index = KeyIndex()  # the key of every item the document holds (``overlay.admission``)
        self._junk: set[str] = set()  # keys whose doc value readers ignore, for expire to delete
        self._junk_by: Counter[str] = Counter()  # keys readers refused, per sender, this epoch
        self._changed: set[str] = set()  # keys changed in the doc since the last _refresh
        self._size = 0  # estimated encoded state: exact at the last measurement, plus updates since
        self._exact = True  # whether nothing changed since that measurement
        self._applying = False
        self._outgoing: list[bytes] = []
        self._doc.observe(self._on_transaction)
        # pycrdt's own Map.observe converts every old and new value of an event to Python (most of a
        # write's time); the raw observer yields the changed keys only
        self._subscription = self._peers.integrated.observe(self._on_change)

    def _on_transaction(self, event: TransactionEvent) -> None:
        self._size += len(event.update)
        self._exact = False
        if not self._applying:  # only local writes are published; remote ones came from the network
            self._outgoing.append(event.update)
            for item in parse_update(event.update).items:  # our own key's items: we write no other
                self._index.add(item.client, item.clock, item.clock + item.length, self.peer_id)

    def _on_change(self, event: Any) -> None:
        try:
            self._changed.update(event.keys)
        except BaseException as exc:  # yrs can panic listing a hostile update's keys
            if not is_panic(exc):
                raise
            self._changed.update(self._peers.keys())  # so re-judge every key

    def _write(self, **changes: Any) -> None:
        """Sign and write this peer's entry with ``changes``; there is no entry before the first heartbeat.

        A change that would make the entry unreadable to peers (malformed, over ``max_entry_bytes``) is a
        ``ValueError`` and changes nothing. Numbers must already be floats: the signature covers them.
        Never refused for the document's size: our own record always has a place.
        """
        entry = {**self._entry, **changes}
        parsed = records.parse_entry(self.peer_id, {**entry, "seen": entry["seen"] or 0.0})
        if parsed is None:
            raise ValueError(f"refusing to write a malformed entry: {str(changes)[:200]}")
        if entry["seen"] is not None:
            # survives restarts without storage, as long as the clock does not go back past it
            counter = max(self._counter + 1, int(entry["seen"] * 1e6))
            if counter > records.MAX_INT:
                raise ValueError(f"refusing to write a malformed entry: seen {entry['seen']} is too late")
            try:
                payload = records.payload(self.task, self.peer_id, float(counter), entry)
            except ValueError as e:  # e.g. a lone surrogate, which would make pycrdt panic
                raise ValueError(f"refusing to write a malformed entry: {e}") from None
            signature = self.key_pair.private_key.sign(payload).hex()
            if len(payload) + len(signature) > self.max_entry_bytes:  # as readers measure it
                raise ValueError(f"refusing to write an entry over {self.max_entry_bytes} bytes")
            value = {"r": entry, "c": float(counter), "s": signature}
            try:
                self._peers[self.peer_id] = value
            except BaseException as exc:
                if is_panic(exc):
                    raise ValueError(f"pycrdt refused the entry: {exc}") from None
                raise
            self._counter = counter
            self.roster.set_own(Verified(counter, signature, value, parsed, payload))
        self._entry = entry

    # -- local writes -------------------------------------------------------------------------------

    def heartbeat(self, now: float, addrs: Sequence[str], state: str = "training") -> None:
        """Announce this peer as alive at ``now`` with its current addresses and state."""
        if (seen := finite(now)) is None:
            raise ValueError(f"refusing to write a malformed entry: seen {now!r}")
        self._write(addrs=list(addrs), seen=seen, state=state)
        self.roster.tick(now)

    def record_model(self, round: int, digest: str, size: int) -> None:
        """Announce this peer's model for ``round`` (replacing an earlier record of that round) and keep
        only the records of its last ``keep_rounds`` rounds. Visible from the first heartbeat on.

        ``round`` and ``size`` must be ints in 0..2**53-1 (beyond, JSON numbers lose precision and
        pycrdt panics at 2**63)."""
        if natural(round) is None or natural(size) is None:
            raise ValueError(f"refusing to write a malformed entry: round {round!r}, size {size!r}")
        records = [m for m in self._entry["models"] if m[0] != round] + [[float(round), digest, float(size)]]
        newest = max(m[0] for m in records)
        self._write(
            models=sorted((m for m in records if m[0] > newest - self.keep_rounds), key=lambda m: -m[0])
        )

    def set_reputation(self, scores: Mapping[str, float]) -> None:
        """Replace this peer's reputation row (its score per target). Visible from the first heartbeat on."""
        self._write(scores={target: finite(score) for target, score in scores.items()})

    def roll(self, now: float) -> bool:
        """Move to the epoch of ``now`` if it is later than ours: a fresh document holding only our
        record (rewritten with ``seen`` = ``now``); readers keep every record. True if it moved."""
        epoch = int(now // self.epoch_length)
        if epoch <= self.epoch:
            return False
        self._subscription = None
        self._new_document()
        self.epoch = epoch
        if self._entry["seen"] is not None:
            self.heartbeat(now, self._entry["addrs"], self._entry["state"])
        return True

    def protect(self, peers: Iterable[str]) -> None:
        """Our direct peers now: their own records always have a place under the member cap."""
        self.roster.protect(peers)

    def expire(self, now: float) -> list[str]:
        """Forget peers whose record is stale, too far in the future or ``"left"``, and delete their doc
        entries and those readers ignore (invalid, replayed, over the cap, evicted); never our own.

        Returns the peers readers no longer see, sorted: those forgotten and those whose ignored entry was
        deleted (a live peer whose doc copy was forged stays). Safe against a concurrent heartbeat.
        """
        forgotten = self.roster.expire(now)
        doomed = [
            peer for peer in self._junk.union(forgotten) if peer != self.peer_id and peer in self._peers
        ]
        if doomed:
            with self._doc.transaction():
                for peer in doomed:
                    del self._peers[peer]
            self._refresh(self.peer_id)
        return sorted(peer for peer in set(forgotten).union(doomed) if peer not in self.roster.records)

    def _refresh(self, introducer: str, verified: Mapping[str, Verified] | None = None) -> None:
        """Re-judge the doc values changed since the last call, as delivered by ``introducer``. A deleted
        or ignored value leaves the peer's last valid record in place, so a hostile delete or replay
        does not hide a live peer."""
        changed, self._changed = self._changed, set()
        verified = verified or {}
        for peer in changed - {self.peer_id}:
            value = self._peers.get(peer)
            if value is None or self.roster.accept(peer, value, introducer, verified.get(peer)):
                self._junk.discard(peer)
            else:
                self._junk.add(peer)
        self._junk.update(self.roster.take_evicted())

    # -- reads --------------------------------------------------------------------------------------

    def members(self) -> dict[str, Member]:
        """Every peer's last valid record, including this peer's and those in state ``"left"``."""
        return {peer: record.entry.member for peer, record in self.roster.records.items()}

    def models(self) -> list[ModelRecord]:
        """Every announced model, newest round first (ties by peer id)."""
        records = [r for v in self.roster.records.values() for r in v.entry.models]
        return sorted(records, key=lambda r: (-r.round, r.peer))

    def reputation(self) -> dict[str, float]:
        """Mean score per target over the observers that scored it; self-scores are ignored."""
        sums: dict[str, list[float]] = {}
        for peer, record in self.roster.records.items():
            for target, score in record.entry.scores.items():
                if target != peer:
                    sums.setdefault(target, []).append(score)
        return {target: sum(scores) / len(scores) for target, scores in sums.items()}

    def snapshot(self) -> dict[str, Any]:
        """The document as plain Python values (unverified), for tests and status output."""
        return {"task": self.task, "epoch": self.epoch, "peers": self._peers.to_py()}

    def size(self) -> int:
        """The document's encoded state in bytes, measured (about 10 ms a MB)."""
        self._size, self._exact = len(self._doc.get_update()), True
        return self._size

    # -- sync, sans-IO ------------------------------------------------------------------------------

    def state_vector(self) -> bytes:
        """What this replica has seen, to send to a peer that answers with :meth:`diff`."""
        return self._doc.get_state()

    def diff(self, state_vector: bytes) -> bytes:
        """Everything the holder of ``state_vector`` lacks (``b"\\x00"`` asks for the full state)."""
        state_vector, _ = checked(state_vector, "state vector", self.max_update, parse_state_vector)
        try:
            return self._doc.get_update(state_vector)
        except BaseException as exc:
            raise decoding_error("state vector", exc) from None

    def apply(self, update: bytes, *, sender: str | None = None, origin: str | None = None) -> None:
        """Merge a remote update delivered by ``sender`` (the sync partner or gossip forwarder) and, for
        gossip, signed by ``origin``. Duplicates and reordering are harmless. On error the doc is
        unchanged: MetadataError if it is junk (``hostile``), MetadataPending if it builds on what we
        have not seen, MetadataFull if it is over the document's bound or the sender's quota."""
        data, parsed = checked(update, "update", self.max_update, parse_update)
        try:
            admitted = admit(
                data, parsed, self._index, task=self.task, max_entry_bytes=self.max_entry_bytes, origin=origin
            )
        except Junk as e:
            raise MetadataError(f"junk update: {e}") from None
        except Gap as e:
            raise MetadataPending(f"update not applicable yet: {e}") from None
        except Unsure as e:
            raise MetadataRefused(f"update refused: {e}") from None
        relayer = sender if sender is not None else ""
        # records readers would refuse (stale, replayed, over the cap) and keys that only bring a tombstone
        tombstones = len(admitted.new_keys - admitted.live.keys())
        refused = tombstones + sum(
            1 for key, record in admitted.live.items() if not self.roster.judge(key, record, relayer)
        )
        if refused and self._junk_by[relayer] >= self.junk_quota:  # one diff may cross it: honest relays
            raise MetadataFull(
                f"update brings {refused} records readers refuse, from a sender that brought "
                f"{self._junk_by[relayer]} in this epoch (quota {self.junk_quota})"
            )
        if (refused or admitted.new_keys) and self._size + len(admitted.data) > self.max_state:
            if not self._exact:  # the estimate only grows; measure (~10 ms at 1 MB) before refusing
                self.size()
            if self._size + len(admitted.data) > self.max_state:
                raise MetadataFull(
                    f"update of {len(admitted.data)} bytes with {len(admitted.new_keys)} new keys would"
                    f" grow the {self._size}-byte document over its {self.max_state}-byte bound"
                )
        self._applying = True
        try:
            self._doc.apply_update(admitted.data)  # yrs decodes the whole update before integrating it
        except BaseException as exc:
            raise decoding_error("update", exc) from None
        finally:
            self._applying = False
        for client, start, end, key in admitted.runs:
            self._index.add(client, start, end, key)
        self._refresh(relayer, admitted.live)
        self._junk_by[relayer] += tombstones + sum(1 for key in admitted.live if key in self._junk)

    def take_outgoing(self) -> bytes | None:
        """All local writes since the last call, merged into one update; None if there were none.

        Held in memory until taken, so the overlay should take and publish after each batch of writes.
        """
        if not self._outgoing:
            return None
        pending, self._outgoing = self._outgoing, []
        return pending[0] if len(pending) == 1 else merge_updates(*pending)
