"""NAT traversal through real NATs: relay, hole punching, and staying on the relay when punching fails.

Two nodes, each behind its own MASQUERADE NAT with a stateful firewall (tests/netns.py), and a public
node serving as relay. Needs root and iptables; skipped with the reason otherwise.
"""

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shoal.overlay.nat import RECHECK, RESERVE_RETRY, Reachability, ReachabilityMonitor
from tests.netns import nat_lab, unavailable_reason

PEER = str(Path(__file__).with_name("p2p_peer.py"))
TASK = "nat-test"
HOLD = 15.0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason())),
]


class Node:
    """A p2p_peer.py process in a namespace, its JSON lines collected by a reader thread."""

    def __init__(self, lab, ns: str, *args: str) -> None:
        argv = [sys.executable, PEER, "--task", TASK, *args]
        self.proc = lab.popen(ns, argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.received: list[dict] = []
        self.status: dict = {}
        threading.Thread(target=self._read, daemon=True).start()
        self.hello = self.wait(lambda line: isinstance(line, dict) and "peer" in line, 30)

    def _read(self) -> None:
        for raw in self.proc.stdout:
            try:
                self.lines.put(json.loads(raw))
            except ValueError:
                continue

    def wait(self, predicate, timeout: float):
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if isinstance(line, dict) and "received" in line:
                self.received.append(line)
            if isinstance(line, dict) and "status" in line:
                self.status = line["status"]
            if predicate(line):
                return line
        raise AssertionError(f"timed out after {timeout} s; status {self.status}, received {self.received}")

    @property
    def peer(self) -> str:
        return self.hello["peer"]


def link(line: object, peer: str) -> str | None:
    """How a status line says we are connected to ``peer`` ("direct", "relayed"), if it is one."""
    return line.get("status", {}).get("peers", {}).get(peer) if isinstance(line, dict) else None


def swarm_behind_nats(lab):
    relay = Node(lab, lab.pub, "--listen", f"/ip4/{lab.pub_ip}/tcp/4001", "--relay-service")
    boot = relay.hello["addrs"][0]
    assert boot.startswith(f"/ip4/{lab.pub_ip}/tcp/4001/p2p/")
    a = Node(
        lab,
        lab.priv1,
        "--listen",
        f"/ip4/{lab.priv1_ip}/tcp/4002",
        "--bootstrap",
        boot,
        "--status",
        "--send-mb",
        "1",
    )
    b = Node(
        lab,
        lab.priv2,
        "--listen",
        f"/ip4/{lab.priv2_ip}/tcp/4003",
        "--bootstrap",
        boot,
        "--status",
        "--send-mb",
        "1",
    )
    for node in (a, b):  # the relay's dial-back fails: both know they are private and reserve a slot
        node.wait(
            lambda s: (
                isinstance(s, dict)
                and s.get("status", {}).get("reachability") == "private"
                and s["status"]["relays"] == [relay.peer]
            ),
            40,
        )
    for node, other in ((a, b), (b, a)):  # a model crosses between the two private nodes
        if not any(r["from"] == other.peer for r in node.received):
            node.wait(lambda s, o=other: isinstance(s, dict) and s.get("from") == o.peer, 60)
    return relay, a, b


def test_hole_punch_through_port_preserving_nats():
    with nat_lab(random_ports=False) as lab:
        _, a, b = swarm_behind_nats(lab)
        a.wait(lambda line: link(line, b.peer) == "direct", 60)
        assert any(r["from"] == b.peer and r["received"] == "model" for r in a.received)


def test_port_randomising_nats_stay_on_the_relay_and_still_exchange_models():
    with nat_lab(random_ports=True) as lab:
        _, a, b = swarm_behind_nats(lab)
        a.wait(lambda line: link(line, b.peer) == "relayed", 10)
        count = len([r for r in a.received if r["from"] == b.peer])
        links = []  # every status line for HOLD seconds, longer than the hole punch's 10 s deadline
        with pytest.raises(AssertionError, match="timed out"):
            a.wait(
                lambda line: isinstance(line, dict) and "status" in line and links.append(link(line, b.peer)),
                HOLD,
            )
        assert links and set(links) <= {"relayed", None}, links  # None: a line before b reconnected
        assert links[-1] == "relayed"
        assert len([r for r in a.received if r["from"] == b.peer]) > count


def test_a_private_node_without_a_relay_checks_again_soon_then_less_often():
    """At 24 daemons starting at once every reservation timed out at first; waiting RECHECK (5 min)
    after that left the node unreachable from other homes for the whole run."""

    class Relaying:
        def __init__(self) -> None:
            self.relays: list[str] = []

    async def nothing(*_: object) -> None:
        pass

    relaying = Relaying()
    monitor = ReachabilityMonitor(None, relaying, verdict=nothing, readvertise=nothing)
    assert monitor._next_check() == 1.0  # no verdict yet
    monitor.reachability = Reachability.PRIVATE
    waits = [monitor._next_check() for _ in range(7)]
    assert waits[0] == RESERVE_RETRY and waits[1] == 2 * RESERVE_RETRY and waits[-1] == RECHECK
    relaying.relays = ["relay"]
    assert monitor._next_check() == RECHECK
    relaying.relays = []
    assert monitor._next_check() == RESERVE_RETRY  # a lost reservation starts the backoff afresh


def test_a_relay_whose_peerstore_record_expired_is_no_circuit_and_no_crash():
    """A daemon starved of CPU at 24 daemons on 2 cores found its relay's peerstore record expired, and
    py-libp2p's ``addrs`` raised out of the metadata heartbeat: the daemon died. Such a relay now
    simply gives no circuit address."""
    from libp2p import new_host
    from libp2p.crypto.secp256k1 import create_new_key_pair
    from libp2p.peer.id import ID

    from shoal.overlay.nat import Relaying

    relaying = Relaying(new_host(key_pair=create_new_key_pair()), serve=False)
    relaying.relays = [ID.from_pubkey(create_new_key_pair().public_key)]  # no record in our peerstore
    assert relaying.circuit_addrs() == []
    assert all("p2p-circuit" not in a for a in relaying.addresses())
