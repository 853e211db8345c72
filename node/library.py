"""``shoal.Node``: a daemon inside the user's own program, on a thread of its own.

The node is the daemon ``shoal run`` starts (``node.daemon``), built from the user's
:class:`~learning.task.Task`: it joins the swarm over libp2p, runs its trio loop on a background
thread, and leaves gracefully (goodbyes, final checkpoint) when the ``with`` block ends.

Two shapes, because protocols differ in who drives training:

- the task has a ``train`` function: the protocol calls it when it needs training (any protocol);
- the task has none: the user's loop trains (gossip only) and calls :meth:`Node.step` after each
  optimizer step. Every ``every`` steps the node takes the model as trained so far (a copy: the
  user's loop goes on at once); the protocol sends it and integrates its peers' models into it on its
  own thread. The next :meth:`Node.step` after that folds what the integration changed into the
  user's model (it adds the difference, so the steps the loop made meanwhile are kept): the loop
  never waits for the network, only for that addition.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import trio

from shoal.learning.learner import Learner
from shoal.learning.models import ModelError
from shoal.learning.protocol import State
from shoal.learning.task import Task
from shoal.node import config as node_config
from shoal.node.daemon import Daemon
from shoal.overlay.host import quiet_libp2p_logs
from shoal.overlay.identity import peer_id

START_TIMEOUT = 60.0  # seconds for the node to be up on libp2p
STOP_TIMEOUT = 30.0  # seconds for it to leave (the daemon bounds its own leaving well within)


class UserLoop:
    """The ``Compute`` of a node whose user's loop trains: the driver's ``Train`` waits for the loop's
    next ``every`` steps (see the module's docstring). Two threads meet here: the driver's (trio) in
    :meth:`train`, the user's in :meth:`step`; ``_lock`` guards what they share."""

    def __init__(self, every: int) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.every = every
        self._lock = threading.Lock()
        self._start: State | None = None  # the model a round starts from, until the loop takes it
        self._handed: State | None = None  # the last model handed to the protocol
        self._steps = -1  # steps since the round's start was taken; -1: no round is waiting
        self._round: tuple[trio.lowlevel.TrioToken, trio.Event] | None = None
        self._trained: State | None = None
        self._refused = ""  # why the loop's model was not handed over

    async def train(self, learner: Learner, state: State, round: int) -> State:
        start = learner.start(state, round)
        done = trio.Event()
        with self._lock:
            self._start, self._trained = start, None
            self._round = (trio.lowlevel.current_trio_token(), done)
        await done.wait()
        if self._trained is None:  # the loop changed its model's tensors: nothing of it reaches peers
            learner.failed(round, self._refused)
            return start
        kept = learner.trained(start, self._trained, round)
        if kept is start:  # refused (not finite): the next round's start replaces the user's model
            with self._lock:
                self._handed = None
        return kept

    def step(self, learner: Learner) -> None:
        with self._lock:
            if self._start is not None:
                self._take(learner, self._start)
                self._start, self._steps = None, 0
            elif self._steps >= 0:
                self._steps += 1
            if self._steps < self.every or self._round is None:
                return
            try:
                self._trained = learner.snapshot()
            except ModelError as exc:
                self._trained, self._refused = None, str(exc)
            self._handed = self._trained
            (token, done), self._round, self._steps = self._round, None, -1
        with contextlib.suppress(trio.RunFinishedError):  # the node stopped meanwhile
            token.run_sync_soon(done.set)  # not waiting for the node's thread to be free

    def _take(self, learner: Learner, start: State) -> None:
        """Fold the round's start into the user's model: add what the integration changed since the
        model was handed over (the first time, or after a refused one: take it whole)."""
        params = dict(learner.model.named_parameters())
        with torch.no_grad():
            for name, value in start.items():
                param = params[name]
                if self._handed is None:
                    param.copy_(value)
                else:
                    param.add_((value - self._handed[name]).to(param.device, param.dtype))


class Node:
    """A Shoal node learning ``task``, as a context manager.

    ``home``: its directory (identity key, checkpoint, optional ``config.toml``, created if absent).
    ``bootstrap``: addresses of nodes of the swarm (none: this node starts one). ``listen``: where
    peers reach it (default: a free port on 127.0.0.1). ``every``: for a task without ``train``, the
    user's loop steps per round. ``settings``: any key of ``config.toml`` by the name its flag has
    (``protocol``, ``integrator``, ``codec_name``, ``gossip_fanout``, ``gossip_period``, ...;
    ``node.config``), over the file's.
    """

    def __init__(
        self,
        task: Task,
        *,
        home: str | Path,
        bootstrap: Sequence[str] = (),
        listen: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
        every: int = 1,
        **settings: Any,
    ) -> None:
        home = Path(home)
        unknown = set(settings) - set(node_config.KEYS)
        if unknown:
            raise node_config.ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        settings.setdefault("api", "127.0.0.1:0")
        config = node_config.load(
            home / "config.toml", env={}, bootstrap=tuple(bootstrap), listen=tuple(listen), **settings
        )
        self._loop = UserLoop(every) if task.train is None else None
        if self._loop is not None and config.protocol.protocol != "gossip":
            raise node_config.ConfigError(
                "a task without train (your own loop calling Node.step) runs on gossip only: MoDeST "
                "trains only the nodes it samples, when it samples them"
            )
        home.mkdir(parents=True, exist_ok=True)
        quiet_libp2p_logs(verbose=False)  # as `shoal run` does (set the "libp2p" logger after to see them)
        self.daemon = Daemon(home, config, task, compute=self._loop)
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._stop: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    # --- lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> Node:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Join the swarm; returns once the node listens (raises what stopped it otherwise)."""
        if self._thread is not None:
            raise RuntimeError("this node was started already")
        self._thread = threading.Thread(target=self._run, name="shoal-node", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.addresses:
            if not self._thread.is_alive():
                self._raise_failure()
                raise RuntimeError("the node stopped before it was up")
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"the node was not up within {timeout:g} s")
            time.sleep(0.02)

    def close(self, timeout: float = STOP_TIMEOUT) -> None:
        """Leave the swarm gracefully (goodbyes, a final checkpoint) and stop the node's thread."""
        if self._thread is None:
            return
        if self._stop is not None and self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the node did not stop within {timeout:g} s")
        self._raise_failure()

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # handed to the user's thread by start() or close()
            self._failure = exc

    async def _main(self) -> None:
        self._stop, self._token = trio.Event(), trio.lowlevel.current_trio_token()
        await self.daemon.run(self._stop)

    def _running(self) -> None:
        """Raise what stopped the node's thread, or RuntimeError if it is not running."""
        if self._thread is None or self._token is None or not self._thread.is_alive():
            self._raise_failure()
            raise RuntimeError("the node is not running (start it, or use it as a context manager)")

    def _raise_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    # --- the user's loop --------------------------------------------------------------------------

    def step(self) -> None:
        """Call after each step of your own loop (a task without ``train``): every ``every`` calls the
        node takes your model's parameters for its next round, and a later call adds in what its peers'
        models changed. Cheap otherwise: a counter."""
        if self._loop is None:
            raise RuntimeError("this task has a train function: the node trains it; step() is for your loop")
        self._running()
        self._loop.step(self.daemon.learner)

    # --- what the node knows ----------------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return peer_id(self.daemon.key_pair)

    @property
    def addresses(self) -> list[str]:
        """Where peers reach this node (give one to others as ``bootstrap``); empty until it is up."""
        overlay = self.daemon.overlay
        return overlay.addresses() if overlay is not None else []

    @property
    def round(self) -> int:
        """The node's current round (0 until it learns with a peer)."""
        protocol = self.daemon.protocol
        return protocol.round if protocol is not None else self.daemon.start_round

    @property
    def metrics(self) -> dict[str, float | None]:
        """What the task's ``evaluate`` returned for the newest round evaluated."""
        return dict(self.daemon.metrics)

    def status(self) -> dict[str, Any]:
        """What ``/status`` shows (round, metrics, peers, traffic, penalties), read on the node's thread."""
        self._running()
        return trio.from_thread.run_sync(self.daemon.status, trio_token=self._token)

    def wait(self, round: int, timeout: float) -> bool:
        """Block until the node reaches ``round`` (True) or ``timeout`` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        while self.round < round:
            if time.monotonic() > deadline or self._thread is None or not self._thread.is_alive():
                self._raise_failure()
                return False
            time.sleep(0.05)
        return True
