"""The daemon: one node's life from start to graceful exit, in one trio nursery.

Start: identity from the home directory (created once), data and model from the configuration, the
last checkpoint if there is one; then the libp2p overlay joins the swarm, the node advertises its
task in the DHT and connects to the task's providers while the learning protocol runs on the driver
(training in a worker thread). Each finished round is evaluated (also off the loop), logged, and
checkpointed every ``checkpoint_every`` rounds. SIGINT/SIGTERM: announce departure, give the
protocol its goodbyes within a bound (a second signal cuts them short), write a final checkpoint,
exit 0.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import trio
from blake3 import blake3
from torch import nn

from shoal.learning import codecs, messages
from shoal.learning.datasets import Dataset, load_dataset, load_npz
from shoal.learning.learner import Learner
from shoal.learning.models import ParameterLayout, build_model
from shoal.learning.node import build_node
from shoal.learning.partition import partition
from shoal.learning.protocol import LearningProtocol, State
from shoal.learning.task import Task, load_task
from shoal.node import checkpoint, http
from shoal.node.config import Config, ConfigError
from shoal.node.driver import Compute, Driver, ThreadCompute
from shoal.node.home import Home
from shoal.overlay import framing, offloop, wire
from shoal.overlay.atomic import write_atomic
from shoal.overlay.identity import load_or_create_identity, peer_id
from shoal.overlay.liveness import Liveness
from shoal.overlay.p2p import Libp2pOverlay
from shoal.overlay.wire import DEFAULT_LIMITS, Limits, Message, encode_parts, encoded_size

log = logging.getLogger("shoal")

EVAL_SAMPLES = 1000  # test samples per evaluation: enough for +-1.5% at 90%, fast on a CPU
LEAVE_TIMEOUT = 5.0
PEER_POLL = 0.1  # seconds between looks for a first task peer at start
CLOSE_TIMEOUT = 5.0
# a model version is recorded in the metadata document at most this often: every write is gossiped to
# the whole swarm, and one per round (~1 a second) made applying them a large part of each daemon's
# loop at 24 daemons on 2 cores
RECORD_INTERVAL = 5.0
STATUS_PEERS = 20  # peers listed by penalty in /status


def load_data(config: Config) -> tuple[Dataset, torch.Tensor, torch.Tensor]:
    """The dataset (for its test split) and this node's training samples."""
    t = config.task
    if t.data:
        data = load_npz(t.data, seed=t.seed)
        return data, data.x_train, data.y_train
    data = load_dataset(t.dataset, seed=t.seed)
    try:
        parts = partition(data.y_train.numpy(), t.shards, t.partition, t.seed)
    except ValueError as e:
        raise ConfigError(f"partition: {e}") from None
    shard = torch.as_tensor(parts[t.shard])
    return data, data.x_train[shard], data.y_train[shard]


def builtin_task(config: Config) -> tuple[Task, dict[str, Any]]:
    """The ``[task]`` settings' task on this node's shard, and what peers must share to be its swarm."""
    data, x, y = load_data(config)
    t = config.task
    model = build_model(t.model, data.input_shape, data.num_classes, seed=t.seed)
    n = min(EVAL_SAMPLES, len(data.y_test))
    test = (data.x_test[:n], data.y_test[:n])
    task = t.builtin(model, x, y, test, data.num_classes, seed=t.seed, node=t.shard)
    return task, {"model": t.model, "input": list(data.input_shape), "classes": data.num_classes}


def task_id(config: Config, spec: dict[str, Any], layout: ParameterLayout) -> str:
    """What peers must agree on to average models: the task's ``spec`` (the built-in's model, input
    shape and classes; a user's model class), the tensors, the protocol, and the encodings of frames,
    messages and models."""
    spec = {
        **spec,
        "tensors": [[name, list(shape)] for name, shape in zip(layout.names, layout.shapes, strict=True)],
        "protocol": config.protocol.protocol,
        "codec": config.protocol.codec.task_name,  # with topk_bits if not 8; not topk_fraction: any k decodes
        # the encodings: releases that cannot read each other's messages are in different tasks, rather
        # than in one where each refuses the other's messages as malformed
        "encoding": [framing.VERSION, wire.VERSION, messages.VERSION, codecs.FORMAT],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def configured_task(config: Config, task: Task | None = None) -> tuple[Task, nn.Module, str]:
    """The task a node of ``config`` learns (``task`` if given, else the user's ``--task``, else the
    built-in one), the module it computes in, and its task id. A user's task is one swarm with every
    node whose model is of a class of the same name with the same tensors."""
    if task is None and config.task.task:
        task = load_task(config.task.task, config.task.shard, config.task.shards)
    spec = None
    if task is None:
        task, spec = builtin_task(config)
    module = task.module()
    spec = spec or {"model": type(module).__qualname__}  # not its module: __main__ when run as a script
    return task, module, task_id(config, spec, ParameterLayout.of(module))


def message_limit(state: State) -> int:
    """The largest message a peer of this task may send us: one model of the task plus the largest
    header (a Bristle node's labels included). Anything bigger is refused at its frame prefix, so a
    peer cannot make us buffer more than a model's worth per message."""
    return encoded_size(Message(messages.GossipModel.KIND, {}, state)) + DEFAULT_LIMITS.max_header + 4096


class Daemon:
    def __init__(
        self, home: Path, config: Config, task: Task | None = None, compute: Compute | None = None
    ) -> None:
        """A node in ``home`` learning ``task`` (the user's, from ``shoal.Node``), else the one
        ``config`` names: a user's ``--task`` or the built-in one. ``compute``: who trains (default:
        the task's ``train`` in a worker thread; ``shoal.Node``: the user's loop)."""
        self.compute = compute or ThreadCompute()
        self.config = config
        task, module, self.task = configured_task(config, task)  # a bad --task writes nothing
        self.home = Home(home)
        self._home_lock = self.home.claim()
        try:
            self._load(task, module)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Let go of the home (``shoal.Node`` may open it again in this process)."""
        os.close(self._home_lock)

    def _load(self, task: Task, module: nn.Module) -> None:
        """Identity, checkpoint and the node's learning, from the claimed home."""
        config = self.config
        self.home.api.unlink(missing_ok=True)  # left by a daemon that was killed: its ports are not ours
        self.key_pair, created = load_or_create_identity(self.home.identity)
        if created:
            log.info("new identity created in %s", self.home.identity)
        self.layout = ParameterLayout.of(module)
        saved = checkpoint.load(self.home.checkpoint, self.task, self.layout)
        self.start_round = saved.round if saved else 0
        if saved:
            log.info("resuming from checkpoint at round %d", saved.round)
        self.rng = random.Random(f"{config.task.seed}/{peer_id(self.key_pair)}")
        try:
            self.node = build_node(
                task,
                config.protocol,
                self.rng,
                module=module,
                initial=saved.state if saved else None,
                momentum=saved.momentum if saved else None,
            )
        except ValueError as e:
            raise ConfigError(f"integrator {config.protocol.integrator}: {e}") from None
        self.learner = self.node.learner
        self.evaluator = Learner(task, copy.deepcopy(module))  # evaluates while training runs
        self.metrics: dict[str, float | None] = {}
        self.started = time.time()
        self.overlay: Libp2pOverlay | None = None
        self.protocol: LearningProtocol | None = None
        self.driver: Driver | None = None
        self._rounds = trio.open_memory_channel[int](math.inf)
        self._checkpointing = threading.Lock()
        self._checkpointed = -1

    # -- lifecycle ---------------------------------------------------------------------------------

    async def run(self, stop: trio.Event | None = None) -> None:
        """Run until SIGINT or SIGTERM, or until ``stop`` is set when given (``shoal.Node`` runs the
        daemon in a thread of its own, where signals cannot be received); then leave gracefully and
        let go of the home."""
        try:
            await self._live(stop)
        finally:
            self.home.api.unlink(missing_ok=True)
            self.release()

    async def _live(self, stop: trio.Event | None) -> None:
        p2p = replace(self.config.network, limits=Limits(max_message=message_limit(self.node.initial)))
        with trio.CancelScope() as closing:
            async with (
                Libp2pOverlay.start(self.key_pair, self.task, p2p) as overlay,
                trio.open_nursery() as nursery,
            ):
                self.overlay = overlay
                nursery.start_soon(self._serve, nursery)
                if stop is not None:
                    await stop.wait()
                    log.info("stopped: leaving the swarm")
                    await self._leave(overlay, None)
                else:  # held until the checkpoint is written: a second signal must not lose it
                    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                        async for signum in signals:
                            log.info("%s: leaving the swarm", signal.Signals(signum).name)
                            break
                        await self._leave(overlay, signals)
                # all that matters is on disk; closing libp2p (every connection, its services) took
                # over 40 s at 24 daemons on 2 cores, so it gets a bound
                closing.deadline = trio.current_time() + CLOSE_TIMEOUT
                nursery.cancel_scope.cancel()
        if closing.cancelled_caught:
            log.info("libp2p did not close within %g s: exiting without waiting for it", CLOSE_TIMEOUT)

    async def _leave(self, overlay: Libp2pOverlay, signals: AsyncIterator[int] | None) -> None:
        """Goodbyes within LEAVE_TIMEOUT (cut short by another of ``signals``), then the final checkpoint."""
        leaving = trio.CancelScope(deadline=trio.current_time() + LEAVE_TIMEOUT)
        async with trio.open_nursery() as watching:
            if signals is not None:
                watching.start_soon(_hurry, signals, leaving)
            with leaving:
                if self.driver is not None:
                    await self.driver.leave(LEAVE_TIMEOUT / 2)
                await overlay.leave(LEAVE_TIMEOUT / 2)
            watching.cancel_scope.cancel()
        self._checkpoint(self._snapshot())

    async def _serve(self, nursery: trio.Nursery) -> None:
        """Everything after joining: the API, the protocol from the first task peer, discovery beside it."""
        overlay = self.overlay
        log.info(
            "joined as %s (task %s, %d training samples)", overlay.peer_id, self.task, self.learner.samples
        )
        for addr in overlay.addresses():
            log.info("others can join with: shoal run --bootstrap %s", addr)
        port = await nursery.start(http.serve, self.config.node.api, self.status)
        host = self.config.node.api.rpartition(":")[0]
        write_atomic(self.home.api, json.dumps({"api": f"{host}:{port}", "addresses": overlay.addresses()}))
        log.info("status API on http://%s:%d/status", host, port)
        await self._first_peer(nursery)
        self.protocol = self._protocol(overlay.peers())
        self.driver = Driver(
            self.protocol,
            overlay,
            self.learner,
            self.compute,
            send_timeout=overlay.config.send_timeout,  # also the overlay's own bound on a send
            on_round=self._rounds[0].send_nowait,
            codec=self.config.protocol.codec,
        )
        nursery.start_soon(self.driver.run)
        nursery.start_soon(self._after_rounds)

    async def _first_peer(self, nursery: trio.Nursery) -> None:
        """Advertise our task and connect to its providers in the background; return once a task peer
        is connected (a joiner can fetch its model) or discovery is over (the first node of a swarm).

        Waiting for discovery cost a joiner ~22 s at 24 daemons (``provide`` and ``find_providers``
        each wait up to LOOKUP_TIMEOUT for lookups that dial unreachable nodes); the protocol learns
        of every later peer from the overlay's events.
        """
        discovered = trio.Event()

        async def discover() -> None:
            await self.overlay.provide(self.provider_key)
            await self.overlay.find_providers(self.provider_key)
            discovered.set()

        nursery.start_soon(discover)
        while not (discovered.is_set() or self.overlay.peers()):
            await trio.sleep(PEER_POLL)

    @property
    def provider_key(self) -> str:
        return f"shoal/{self.task}"

    def _protocol(self, peers: list[str]) -> LearningProtocol:
        return self.node.protocol(
            self.overlay.peer_id, peers, joining=bool(self.config.network.bootstrap), round=self.start_round
        )

    async def _after_rounds(self) -> None:
        """Per finished round: evaluate off the loop, log, record the model version (every
        RECORD_INTERVAL), checkpoint."""
        last_checkpoint, last_record = self.start_round, -RECORD_INTERVAL
        async for rnd in self._rounds[1]:
            while True:  # rounds that finished while we evaluated: only the newest is worth a look
                try:
                    rnd = self._rounds[1].receive_nowait()
                except trio.WouldBlock:
                    break
            state = self.protocol.model
            self.metrics = await offloop.run_sync(self.evaluator.evaluate, state)
            peers = len(self.overlay.peers())
            log.info("round %d done: %s, %d peers", rnd, http.describe(self.metrics), peers)
            if trio.current_time() - last_record >= RECORD_INTERVAL:
                last_record = trio.current_time()
                self.overlay.metadata.record_model(rnd, *await offloop.run_sync(self._version, state))
            if rnd - last_checkpoint >= self.config.node.checkpoint_every:
                last_checkpoint = rnd
                await offloop.run_sync(self._checkpoint, self._snapshot())

    @staticmethod
    def _version(state: State) -> tuple[str, int]:
        """The model's version for the metadata registry: the hash and size of its tensors' encoding."""
        parts, hasher = encode_parts(Message(messages.GossipModel.KIND, {}, state)), blake3()
        for part in parts:
            hasher.update(part)
        return hasher.hexdigest(), sum(len(p) for p in parts)

    def _snapshot(self) -> checkpoint.Checkpoint | None:
        """Model, round and outer momentum as one: taken on the loop, between two protocol events."""
        if self.protocol is None:
            return None
        return checkpoint.Checkpoint(
            self.protocol.model, self.protocol.round, self.task, self.node.outer.momentum
        )

    def _checkpoint(self, saved: checkpoint.Checkpoint | None) -> None:
        """Write ``saved`` (from a worker thread or, at exit, the loop: hence the lock)."""
        if saved is None:
            return
        with self._checkpointing:  # the newest wins: a late older write must not replace it
            if saved.round < self._checkpointed:
                return
            checkpoint.save(self.home.checkpoint, saved)
            self._checkpointed = saved.round
        log.info("checkpoint written at round %d", saved.round)

    # -- status ------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        overlay = self.overlay
        peers = overlay.peers() if overlay else []
        return {
            "peer": overlay.peer_id if overlay else None,
            "addresses": overlay.addresses() if overlay else [],
            "task": self.task,
            "reachability": overlay.reachability.value if overlay else "unknown",
            "relays": [str(r) for r in overlay.relaying.relays] if overlay else [],
            "protocol": self.config.protocol.protocol,
            "integrator": self.config.protocol.integrator,
            "codec": self.config.protocol.codec.name,
            "learning": self.protocol is not None,  # false until its first task peer (alone: discovery done)
            "round": self.protocol.round if self.protocol else self.start_round,
            "metrics": self.metrics,  # what the task's evaluate returned for the newest round evaluated
            "training_error": self.learner.error,  # why the last round's training was dropped, if it was
            "samples": self.learner.samples,
            # how long its trainings took, contention included (the testbed's MoDeST prediction: its speed)
            "trained": {
                "rounds": self.driver.trainings if self.driver else 0,
                "seconds": round(self.driver.training_seconds, 3) if self.driver else 0.0,
            },
            "peers": [{"peer": p, "connection": overlay.connection_kind(p)} for p in peers],
            "members": sorted(overlay.metadata.members()) if overlay else [],
            "bytes_in": dict(overlay.bytes_in) if overlay else {},
            "bytes_out": dict(overlay.bytes_out) if overlay else {},
            "rejected": overlay.rejected if overlay else 0,
            "peak_rate": overlay.peak_rate if overlay else 0,  # per peer per second, the busiest
            # the peers our refusals count against most (bounded: sybils may be many), and the banned
            "penalties": dict(overlay.penalties.most_common(STATUS_PEERS)) if overlay else {},
            "banned": sorted(p for p in overlay.penalties if overlay.banned(p))[:STATUS_PEERS]
            if overlay
            else [],
            "peer_set": overlay.peer_set() if overlay else {},
            "metadata": {"epoch": overlay.metadata.epoch, "bytes": overlay.metadata.size()}
            if overlay
            else {},
            "liveness": overlay.liveness() if overlay else Liveness.idle_status(),
            "uptime": round(time.time() - self.started, 1),
        }


async def _hurry(signals: AsyncIterator[int], leaving: trio.CancelScope) -> None:
    """A second SIGINT/SIGTERM while leaving (Ctrl-C pressed again) cuts the goodbyes short; the final
    checkpoint is still written."""
    async for signum in signals:
        log.info("%s again: skipping the goodbyes, writing the checkpoint", signal.Signals(signum).name)
        leaving.cancel()
        return
