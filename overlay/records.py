"""The signed records of the metadata document (``overlay.metadata``): their shape, bounds and signatures.

A record is the atomic value one peer writes under its own key::

    {"r": {"addrs": [multiaddr, ...], "seen": now, "state": "training",
           "models": [[round, digest, size], ...], "scores": {target: score}},
     "c": counter,      # per peer, only grows
     "s": signature hex}

The signature (Ed25519; the key is the one the peer id embeds) covers canonical JSON of
``[DOMAIN, task, peer_id, c, r]``: a record cannot be moved to another key or another task's document.
Every number is written as a float, which the document returns unchanged (pycrdt returns every number
from the wire as a float, and panics at 2**63), so readers re-encode exactly what was signed; written ints
must lie in 0..2**53-1. Its size is the signed payload plus the signature, at most ``max_entry_bytes``.

Nothing here has state: :func:`unpack` and :func:`verify` judge one value, for the document's readers
(``overlay.roster``) and for the admission of updates before they are applied (``overlay.admission``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

from libp2p.crypto.ed25519 import Ed25519PublicKey
from libp2p.crypto.keys import KeyPair, PublicKey
from libp2p.peer.id import ID

DOMAIN = "shoal/metadata/1"  # signed first, so a record signature is never valid as any other signature
MAX_INT = 2**53 - 1  # numbers travel as JSON (float64) numbers: beyond this, ints lose precision
MAX_PEER_ID = 64  # characters; Ed25519 peer ids are 52, and base58-decoding a longer key costs O(n^2)


@dataclass(frozen=True)
class Member:
    """A peer's liveness entry. Relay addresses are the ``addrs`` containing ``/p2p-circuit``."""

    peer: str
    addrs: tuple[str, ...]
    seen: float
    state: str  # "joining", "training", "left", ...

    def current(self, now: float, expiry: float) -> bool:
        """Not "left", and seen within ``expiry`` of ``now`` either way (clocks differ)."""
        return self.state != "left" and abs(now - self.seen) <= expiry


@dataclass(frozen=True)
class ModelRecord:
    """A model a peer announces for a round; ``digest`` names its bytes for transfer and verification."""

    round: int
    peer: str
    digest: str
    size: int


class Entry(NamedTuple):
    member: Member
    models: tuple[ModelRecord, ...]
    scores: dict[str, float]


class Verified(NamedTuple):
    """A record of one peer, well-formed and within bounds (and, from :func:`verify`, signed)."""

    counter: int
    signature: str
    value: dict[str, Any]  # as read from the doc, to recognise the same record again without verifying
    entry: Entry
    payload: bytes  # what the signature covers

    @property
    def size(self) -> int:
        """Bytes as bounded by ``max_entry_bytes``: the signed payload and the signature."""
        return len(self.payload) + len(self.signature)


def finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def natural(value: object) -> int | None:
    """An int in 0..MAX_INT; the doc returns ints as floats."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and 0 <= value <= MAX_INT else None


def parse_entry(peer: str, value: object) -> Entry | None:
    """The entry if every required field has the right shape (extra fields are allowed), else None."""
    if not isinstance(value, dict):
        return None
    addrs, seen, state = value.get("addrs"), finite(value.get("seen")), value.get("state")
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
        rnd, digest, size = natural(record[0]), record[1], natural(record[2])
        if rnd is None or not isinstance(digest, str) or size is None:
            return None
        records.append(ModelRecord(rnd, peer, digest, size))
    clean_scores = {}
    for target, score in scores.items():
        if not isinstance(target, str) or (value := finite(score)) is None:
            return None
        clean_scores[target] = value
    return Entry(Member(peer, tuple(addrs), seen, state), tuple(records), clean_scores)


def payload(task: str, peer: str, counter: object, record: object) -> bytes:
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
    signed = payload(task, peer_of(key_pair), float(counter), record)
    return {"r": record, "c": float(counter), "s": key_pair.private_key.sign(signed).hex()}


def peer_of(key_pair: KeyPair) -> str:
    return ID.from_pubkey(key_pair.public_key).to_base58()


@lru_cache(maxsize=4096)
def public_key(peer: str) -> PublicKey | None:
    """The Ed25519 key a peer id embeds, or None: then nothing can be signed under it. Other key types
    are refused: a secp256k1 key's ``verify`` raises on our signatures instead of answering False."""
    if not isinstance(peer, str) or len(peer) > MAX_PEER_ID:
        return None
    try:
        key = ID.from_base58(peer).extract_public_key()
    except Exception:  # a hostile id: base58, multihash and key decoding raise assorted types
        return None
    return key if isinstance(key, Ed25519PublicKey) else None


def unpack(task: str, peer: str, value: object, max_entry_bytes: int) -> Verified | None:
    """``value`` as a record of ``peer`` if it is well-formed and within ``max_entry_bytes``, its
    signature not yet checked; else None."""
    if not (isinstance(value, dict) and value.keys() == {"r", "c", "s"}):
        return None
    counter, signature = natural(value["c"]), value["s"]
    entry = parse_entry(peer, value["r"])
    if counter is None or not isinstance(signature, str) or len(signature) != 128 or entry is None:
        return None
    try:
        signed = payload(task, peer, value["c"], value["r"])
    except (ValueError, TypeError, RecursionError):  # TypeError: a binary value JSON cannot hold
        return None
    if len(signed) + len(signature) > max_entry_bytes:
        return None
    return Verified(counter, signature, value, entry, signed)


def verify(task: str, peer: str, value: object, max_entry_bytes: int) -> Verified | None:
    """``value`` as a record of ``peer`` if :func:`unpack` accepts it and it is signed by the key
    ``peer`` embeds, for ``task``; else None."""
    record = unpack(task, peer, value, max_entry_bytes)
    if record is None or (key := public_key(peer)) is None:
        return None
    try:
        signature = bytes.fromhex(record.signature)
    except ValueError:
        return None
    try:
        return record if key.verify(record.payload, signature) else None
    except Exception:  # the key library's own complaint about a hostile signature: not valid
        return None


def short(peer: str) -> str:
    """A peer id fit for a log line: ids are checked before they are kept, but never quote more."""
    return peer if len(peer) <= MAX_PEER_ID else peer[:16] + f"...({len(peer)} chars)"
