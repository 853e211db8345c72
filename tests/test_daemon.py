"""Real `shoal run` daemons as subprocesses on 127.0.0.1: learning, status, kills, restarts, bad input."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from shoal.learning.settings import INTEGRATORS
from shoal.node import checkpoint
from shoal.node.config import load
from shoal.node.demo import accuracy, node_config, status
from shoal.node.home import Home
from shoal.overlay.identity import load_or_create_identity, peer_id

ENV = dict(os.environ, OMP_NUM_THREADS="1")
ACCURACY = 0.85  # stated test accuracy on the digits data


class Node:
    """A daemon process with its own home, ports and log."""

    def __init__(
        self, home: Path, i: int, nodes: int, bootstrap: str | None, extra: str = "", env: dict | None = None
    ) -> None:
        self.home = Home(home)
        self.env = {**ENV, **(env or {})}
        self.peer = peer_id(load_or_create_identity(self.home.identity)[0])
        self.home.config.write_text(node_config(i, nodes, [bootstrap] if bootstrap else []) + extra)
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        """Its libp2p address, once it serves (its port is the kernel's choice)."""
        wait_for(lambda: self.home.running() is not None, 60, "the daemon to serve", [self])
        return self.home.running()["addresses"][0]

    @property
    def api(self) -> str:
        return self.home.running()["api"]

    def start(self) -> "Node":
        with open(self.home.path / "daemon.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "shoal.node.cli", "run", "--home", str(self.home.path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        return self

    def status(self) -> dict | None:
        return status(self.home)

    def full_log(self) -> str:
        return (self.home.path / "daemon.log").read_text(errors="replace")

    def log(self) -> str:
        return self.full_log()[-3000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def wait_for(predicate, timeout: float, what: str, nodes: list[Node]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for node in nodes:
            assert node.proc.poll() is None, f"daemon exited with {node.proc.returncode}:\n{node.log()}"
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last log:\n{nodes[-1].log()}")


def swarm(tmp_path: Path, n: int, extra: str = "", env: dict | None = None) -> list[Node]:
    first = Node(tmp_path / "node0", 0, n, None, extra, env).start()
    boot = first.address
    others = [Node(tmp_path / f"node{i}", i, n, boot, extra, env) for i in range(1, n)]
    return [first] + [node.start() for node in others]


def stop_all(nodes: list[Node]) -> None:
    for node in nodes:
        if node.proc and node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait()


def sigterm_all(nodes: list[Node]) -> None:
    """SIGTERM every daemon at once (each leaves while the others still send to it): all exit 0 with a
    final checkpoint and no traceback."""
    for node in nodes:
        node.proc.send_signal(signal.SIGTERM)
    codes = [node.proc.wait(timeout=30) for node in nodes]
    assert codes == [0] * len(nodes), [n.log() for n in nodes]
    for node in nodes:
        assert "Traceback" not in node.full_log(), node.log()
        assert "checkpoint written" in node.log()


def accuracies(nodes: list[Node]) -> list[float]:
    return [(s and accuracy(s)) or 0.0 for s in (n.status() for n in nodes)]


@pytest.mark.slow
def test_four_daemons_learn_see_each_other_and_exit_cleanly(tmp_path):
    nodes = swarm(tmp_path, 4)
    try:
        wait_for(lambda: min(accuracies(nodes)) >= ACCURACY, 240, f"every node at {ACCURACY:.0%}", nodes)
        for node in nodes:
            out = subprocess.run(
                [sys.executable, "-m", "shoal.node.cli", "status", "--json", "--home", str(node.home.path)],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout
            shown = json.loads(out)
            assert shown["peer"] == node.peer
            assert {p["peer"] for p in shown["peers"]} == {m.peer for m in nodes} - {node.peer}
            assert set(shown["peer_set"]["outbound"]) <= {m.peer for m in nodes}, shown["peer_set"]
        metrics = urllib.request.urlopen(f"http://{nodes[0].api}/metrics", timeout=5).read().decode()
        assert "shoal_peers 3.0" in metrics and 'shoal_metric{name="accuracy"} 0.' in metrics, metrics
        assert 'shoal_bytes_out_total{kind="msg:model"}' in metrics, metrics
        rounds = [n.status()["round"] for n in nodes]
        task = nodes[0].status()["task"]
        start = time.monotonic()
        sigterm_all(nodes)
        assert time.monotonic() - start < 30
        for node, rnd in zip(nodes, rounds, strict=True):
            saved = checkpoint.load(node.home.checkpoint, task)
            assert saved is not None and saved.round >= rnd  # the final checkpoint, written at exit
            assert not node.home.api.exists()
    finally:
        stop_all(nodes)


@pytest.mark.slow
def test_a_killed_daemon_is_marked_down_and_resumes_from_its_checkpoint(tmp_path):
    nodes = swarm(tmp_path, 3, "checkpoint_every = 2\n")
    victim, others = nodes[2], nodes[:2]
    try:
        wait_for(
            lambda: (
                all((n.status() or {}).get("round", 0) >= 6 for n in nodes)
                and victim.home.checkpoint.exists()
            ),
            180,
            "six rounds and the victim's checkpoint (written after its evaluation, which may lag under load)",
            nodes,
        )
        task = victim.status()["task"]
        victim.stop(signal.SIGKILL)
        saved = checkpoint.load(victim.home.checkpoint, task)
        assert saved is not None and saved.round >= 2
        # a killed daemon's connections close: its peers mark it down at once, well within the bound for
        # a hung one (README "Failure detection": ~37 s of silence with the defaults, plus a ping round)
        wait_for(
            lambda: all(victim.peer not in {p["peer"] for p in o.status()["peers"]} for o in others),
            15,
            "the others to mark the killed node down",
            others,
        )
        before = [o.status()["round"] for o in others]
        wait_for(
            lambda: all(o.status()["round"] > r for o, r in zip(others, before, strict=True)),
            30,
            "the others to keep training",
            others,
        )

        victim.start()
        wait_for(lambda: victim.status() is not None, 60, "the restarted daemon's API", nodes)
        restarted = victim.status()
        assert restarted["peer"] == victim.peer
        assert restarted["round"] >= saved.round  # resumed, not from round 0
        wait_for(
            lambda: all(victim.peer in {p["peer"] for p in o.status()["peers"]} for o in others),
            60,
            "the others to see it again",
            nodes,
        )
        wait_for(lambda: (accuracy(victim.status()) or 0) >= ACCURACY, 120, "it to catch up", nodes)
    finally:
        stop_all(nodes)


def peers_of(node: Node) -> set[str]:
    return {p["peer"] for p in (node.status() or {}).get("peers", [])}


@pytest.mark.slow
def test_a_daemon_starved_of_cpu_for_10_s_is_suspected_not_dropped_and_rejoins_the_rounds(tmp_path):
    """SIGSTOP for 10 s is a device busy (or swapped out) beyond anything its peers saw of it: they
    suspect it, and neither cut it off nor ban it; after SIGCONT it trains on with them."""
    nodes = swarm(tmp_path, 3)
    sleeper, others = nodes[2], nodes[:2]
    try:
        wait_for(
            lambda: all(len(peers_of(n)) == 2 and n.status()["round"] >= 3 for n in nodes),
            180,
            "three rounds with every peer",
            nodes,
        )
        before = sleeper.status()["round"]
        sleeper.proc.send_signal(signal.SIGSTOP)
        suspected, start = set(), time.monotonic()
        try:
            while time.monotonic() - start < 10:
                for o in others:
                    if sleeper.peer in o.status()["liveness"]["suspected"]:
                        suspected.add(o.peer)
                time.sleep(0.5)
        finally:
            sleeper.proc.send_signal(signal.SIGCONT)
        assert suspected, [o.log() for o in others]
        wait_for(lambda: sleeper.status()["round"] > before + 2, 60, "the sleeper to train on", nodes)
        wait_for(
            lambda: all(
                sleeper.peer in peers_of(o) and sleeper.peer not in o.status()["liveness"]["suspected"]
                for o in others
            ),
            10,
            "its peers to clear the suspicion",
            nodes,
        )
        for o in others:
            assert o.status()["liveness"]["down"] == 0, o.log()  # never cut off, so never banned either
            assert "banning" not in o.full_log(), o.log()
        assert {o.peer for o in others} <= peers_of(sleeper)
    finally:
        stop_all(nodes)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "target"),
    [
        ({"SHOAL_INTEGRATOR": "bristle", "SHOAL_MODEL": "frozen-cnn", "SHOAL_CODEC_NAME": "int8"}, 0.75),
        # a sample the swarm can fill; top-k differences with error feedback over real libp2p streams
        ({"SHOAL_PROTOCOL": "modest", "SHOAL_MODEST_SAMPLE_SIZE": "2", "SHOAL_CODEC_NAME": "topk"}, ACCURACY),
    ],
    ids=["bristle", "modest"],
)
def test_three_daemons_learn_with_the_other_protocol_and_rules(tmp_path, env, target):
    """Over libp2p: Bristle's labels travel with the models and nobody is refused; MoDeST's rounds fill;
    both with compressed models."""
    nodes = swarm(tmp_path, 3, env=env)
    try:
        wait_for(lambda: min(accuracies(nodes)) >= target, 180, f"every node at {target:.0%}", nodes)
        for shown in (n.status() for n in nodes):
            assert shown["integrator"] == env.get("SHOAL_INTEGRATOR", "clipped")
            assert shown["protocol"] == env.get("SHOAL_PROTOCOL", "gossip")
            assert shown["codec"] == env["SHOAL_CODEC_NAME"]
            assert len(shown["peers"]) == 2 and shown["rejected"] == 0
        sigterm_all(nodes)
    finally:
        stop_all(nodes)


@pytest.mark.slow
def test_repeated_sigkills_of_a_checkpointing_daemon_leave_a_loadable_checkpoint(tmp_path):
    """A lone daemon checkpointing every round, SIGKILLed at arbitrary moments, three times (the kill
    exactly inside a write is tests/test_atomic.py's job)."""
    node = Node(tmp_path / "solo", 0, 1, None, "checkpoint_every = 1\n")
    try:
        for delay in (0.4, 1.1, 1.9):
            node.start()
            wait_for(
                lambda: node.home.checkpoint.exists() and (node.status() or {}).get("round", 0) >= 3,
                90,
                "a few checkpoints",
                [node],
            )
            task = node.status()["task"]
            time.sleep(delay)
            node.stop(signal.SIGKILL)
            saved = checkpoint.load(node.home.checkpoint, task)  # raises if damaged
            assert saved is not None and saved.round >= 1
    finally:
        stop_all([node])


def run_cli(*args: str, home: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shoal.node.cli", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**ENV, **(env or {})},
    )


def assert_one_clear_line(done: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("shoal: error:")]
    assert len(errors) == 1, done.stderr
    for word in words:
        assert word in done.stderr, done.stderr


def test_bad_config_data_and_addresses_fail_with_one_clear_line(tmp_path):
    home = tmp_path / "home"
    assert run_cli("init", home=home).returncode == 0
    assert_one_clear_line(run_cli("init", home=home), 4, "already holds")
    config = home / "config.toml"
    text = config.read_text()
    config.write_text(text.replace("lr = 0.05", 'lr = "fast"'))
    assert_one_clear_line(run_cli("run", home=home), 2, "lr must be float")
    config.write_text(text + "\n[nonsense]\nx = 1\n")
    assert_one_clear_line(run_cli("run", home=home), 2, "unknown setting", "[nonsense]")
    config.write_text(text)
    assert_one_clear_line(
        run_cli("run", "--bootstrap", "/ip4/127.0.0.1/tcp/4001", home=home), 2, "no peer id"
    )
    uncovered = {"SHOAL_PARTITION": "shards:2", "SHOAL_SHARDS": "3"}  # 6 of the 10 classes
    assert_one_clear_line(run_cli("run", home=home, env=uncovered), 2, "partition", "covers only 6")
    assert_one_clear_line(
        run_cli("run", "--data", str(tmp_path / "missing.npz"), home=home), 4, "missing.npz"
    )
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert_one_clear_line(run_cli("run", "--data", str(tmp_path / "bad.npz"), home=home), 4, "bad.npz")


@pytest.mark.slow
def test_unreachable_bootstrap_says_which_address_and_why(tmp_path):
    home = tmp_path / "home"
    run_cli("init", home=home)
    stranger = peer_id(load_or_create_identity(tmp_path / "other.key")[0])
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        address = f"/ip4/127.0.0.1/tcp/{sock.getsockname()[1]}/p2p/{stranger}"
    done = run_cli(
        "run", "--bootstrap", address, "--listen", "/ip4/127.0.0.1/tcp/0", "--api", "127.0.0.1:0", home=home
    )
    assert_one_clear_line(done, 3, address, "refused")


@pytest.mark.parametrize("name", INTEGRATORS)
def test_every_integrator_the_config_offers_folds_models_in_a_daemon(tmp_path, name):
    from shoal.learning.integrators import Contribution
    from shoal.node.daemon import Daemon

    daemon = Daemon(tmp_path, load(None, env={}, integrator=name, model="frozen-cnn", shards=3))
    own = daemon.learner.initial_state()
    other = {k: v + 0.01 for k, v in own.items()}
    merged = daemon.node.integrator.integrate(Contribution(own, 10), [Contribution(other, 10, "p", (0, 1))])
    daemon.layout.check(merged)
    assert (daemon.node.labels is not None) == (name == "bristle")


def test_bristle_on_a_model_that_shares_more_than_a_head_is_a_config_error(tmp_path):
    home = tmp_path / "home"
    run_cli("init", home=home)
    done = run_cli("run", home=home, env={"SHOAL_INTEGRATOR": "bristle"})
    assert_one_clear_line(done, 2, "bristle", "frozen-cnn or head")


def test_status_without_a_daemon_and_offline_id(tmp_path):
    home = tmp_path / "home"
    run_cli("init", home=home)
    assert_one_clear_line(run_cli("status", home=home), 5, "no daemon running")
    out = run_cli("id", "--json", home=home)
    assert out.returncode == 0
    assert json.loads(out.stdout)["peer"] == peer_id(load_or_create_identity(home / "identity.key")[0])


def test_a_models_version_names_its_encoded_bytes():
    """The metadata registry's model version: the same tensors give the same name, any change another."""
    import torch

    from shoal.node.daemon import Daemon

    name, size = Daemon._version({"w": torch.ones(300)})
    assert len(name) == 64 and size > 1200
    assert Daemon._version({"w": torch.ones(300)}) == (name, size)
    assert Daemon._version({"w": torch.ones(300).index_fill_(0, torch.tensor([7]), 2.0)})[0] != name


def test_releases_that_cannot_read_each_others_messages_are_in_different_tasks(tmp_path, monkeypatch):
    """A peer on another frame, message or model encoding never joins our task, so neither end takes
    the other's messages for malformed ones (and bans it)."""
    from shoal.learning import codecs
    from shoal.learning.models import ParameterLayout
    from shoal.node.daemon import builtin_task, task_id
    from shoal.overlay import framing, wire

    path = tmp_path / "config.toml"
    path.write_text(node_config(0, 2))
    config = load(path)
    task, spec = builtin_task(config)
    layout = ParameterLayout.of(task.module())
    ours = task_id(config, spec, layout)
    assert task_id(config, spec, layout) == ours
    for module, name in ((framing, "VERSION"), (wire, "VERSION"), (codecs, "FORMAT")):
        with monkeypatch.context() as patched:
            patched.setattr(module, name, getattr(module, name) + 1)
            assert task_id(config, spec, layout) != ours, f"{module.__name__}.{name}"
