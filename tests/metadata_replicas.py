"""Deterministic identities, records and replicas of the metadata document, shared by its tests."""

import random
from functools import cache

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from shoal.overlay.metadata import Metadata
from shoal.overlay.records import sign_record


@cache
def key(i: int) -> KeyPair:
    return create_new_key_pair(i.to_bytes(32, "big"))  # deterministic identities


@cache
def peer_id(i: int) -> str:
    return ID.from_pubkey(key(i).public_key).to_base58()


def record(seen: float, state: str = "training", addrs: tuple[str, ...] = ()) -> dict:
    return {"addrs": list(addrs), "seen": seen, "state": state, "models": [], "scores": {}}


def replicas(n: int, **kwargs) -> list[Metadata]:
    return [Metadata("task", key(i), **kwargs) for i in range(n)]


def exchange(nodes: list[Metadata], rng: random.Random) -> None:
    """Deliver every node's outgoing update to every other node, shuffled and each one twice."""
    updates = [(i, u) for i, node in enumerate(nodes) if (u := node.take_outgoing()) is not None]
    for j, node in enumerate(nodes):
        incoming = [u for i, u in updates if i != j] * 2
        rng.shuffle(incoming)
        for update in incoming:
            node.apply(update)


def state(node: Metadata) -> tuple:
    """Everything observable about a replica, to check that a rejected input changed nothing."""
    return node.snapshot(), node.state_vector(), node.diff(b"\x00")


def holder() -> Metadata:
    node = Metadata("task", key(0), max_update=4096, max_state=4000)
    node.heartbeat(1.0, ["/ip4/10.0.0.1/tcp/1"])
    return node


def valid_update() -> bytes:
    node = Metadata("task", key(7))
    node.heartbeat(1.0, ["/ip4/10.0.0.7/tcp/1"])
    node.record_model(3, "ab" * 32, 10)
    node.set_reputation({peer_id(1): 0.5})
    return node.take_outgoing()


def node(i: int = 0, now: float = 1.0, **bounds) -> Metadata:
    meta = Metadata("task", key(i), **bounds)
    meta.heartbeat(now, [f"/ip4/10.0.0.{i}/tcp/1"])
    return meta


def signed(i: int, seen: float = 1.0, counter: int = 1, **fields) -> dict:
    return sign_record("task", key(i), counter, {**record(seen), **fields})
