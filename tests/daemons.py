"""Real `shoal run` daemons as subprocesses on 127.0.0.1, for the tests that run them: a :class:`Node` per
daemon (its own home, ports and log), swarms of them, waiting on their status, stopping them, the CLI
run once, and a test's parametrisations run at the same time (:func:`at_once`)."""

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

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
    return swarms([tmp_path], n, extra, env)[0]


def swarms(paths: list[Path], n: int, extra: str = "", env: dict | None = None) -> list[list[Node]]:
    """Separate swarms of ``n`` daemons, one under each of ``paths``, started together: every swarm's
    first daemon at once, then, once each serves, all the others (each swarm's join its own first)."""
    started: list[Node] = []  # whatever fails, every daemon started so far is stopped

    def start(path: Path, i: int, boot: str | None) -> Node:
        started.append(Node(path / f"node{i}", i, n, boot, extra, env))
        return started[-1].start()

    try:
        firsts = [start(path, 0, None) for path in paths]
        return [
            [first] + [start(path, i, first.address) for i in range(1, n)]
            for path, first in zip(paths, firsts, strict=True)
        ]
    except BaseException:
        stop_all(started)
        raise


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


def go(attacker: subprocess.Popen) -> None:
    """Let an attacker process started with ``--wait-for-go`` and ``stdin=PIPE`` begin (tests/attacker.py).
    One that died meanwhile shows in its exit code and output."""
    try:
        attacker.stdin.write(b"go\n")
        attacker.stdin.close()
    except BrokenPipeError:
        pass


def accuracies(nodes: list[Node]) -> list[float]:
    return [(s and accuracy(s)) or 0.0 for s in (n.status() for n in nodes)]


def peers_of(node: Node) -> set[str]:
    return {p["peer"] for p in (node.status() or {}).get("peers", [])}


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


class Run(threading.Thread):
    """One parametrisation of a test, its body run in a thread (see :func:`at_once`): what it reports,
    what it raised, and the daemons and other processes it started (to kill if it is left running).
    A body may wait for ``previous.cue`` (the run started before it; ``None`` for the first), which the
    previous body sets when it likes (and its thread at its end, at the latest): to stagger runs."""

    def __init__(self, body: Callable[..., None], tmp_path: Path, params: dict) -> None:
        super().__init__(name=f"{body.__name__}-{tmp_path.name}", daemon=True)
        self.body, self.tmp_path, self.params = body, tmp_path, params
        self.report: list[str] = []
        self.error: BaseException | None = None
        self.nodes: list[Node] = []
        self.procs: list[subprocess.Popen] = []
        self.cue = threading.Event()
        self.previous: Run | None = None

    def run(self) -> None:
        try:
            self.body(self, self.tmp_path, **self.params)
        except BaseException as e:  # raised by the test that waits for this run
            self.error = e
        finally:
            self.cue.set()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        stop_all([node for node in self.nodes if node.proc])

    def result(self, timeout: float = 1200) -> None:
        """Wait for the run; print its report and raise what it raised, in the test that asked."""
        self.join(timeout)
        if self.is_alive():
            self.kill()
            raise AssertionError(f"{self.name} still running after {timeout:g} s; its processes were killed")
        if self.report:
            print("\n".join(self.report))
        if self.error is not None:
            raise self.error


def at_once(request, tmp_path_factory, test: str, body: Callable[..., None]) -> Iterator[dict[str, Run]]:
    """For a module fixture: every parametrisation of ``test`` this session runs (those selected), each as
    ``body(run, tmp_path, **params)`` in a thread, all started together (a body may wait for
    ``run.previous.cue`` to overlap the previous run's end only); yields them by parametrisation id
    (``request.node.callspec.id`` in the test). For runs that mostly wait (on attack phases, on paced
    rounds), not compute: two cores are shared. At teardown a run still going is killed."""
    runs: dict[str, Run] = {}
    for item in request.session.items:
        if getattr(item, "originalname", None) == test and item.module is request.module:
            key = item.callspec.id
            if key not in runs:
                runs[key] = Run(body, tmp_path_factory.mktemp(f"{test[5:25]}-{key}"), item.callspec.params)
    for previous, run in zip([None, *runs.values()], runs.values(), strict=False):
        run.previous = previous
        run.start()
    yield runs
    for run in runs.values():
        if run.is_alive():  # its test was interrupted: stop its daemons, then the thread ends
            run.kill()
        run.join(60)
        run.kill()
