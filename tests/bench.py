"""An in-memory internet for sans-IO protocol tests: a discrete-event loop, no trio, no sockets.

Messages take ``latency``; training takes ``train_time`` and adds 1 to every tensor; messages to a
crashed node vanish (its pings simply go unanswered). Everything is recorded for assertions.
"""

from __future__ import annotations

import heapq
import itertools

import torch

from shoal.learning.protocol import (
    MessageIn,
    Rejected,
    RoundDone,
    Send,
    StartTimer,
    TimerFired,
    Train,
    Trained,
)
from shoal.learning.training import TrainStats


def plus_one(state):
    return {k: v + 1 for k, v in state.items()}


class Bench:
    def __init__(self, protocols: dict, *, latency: float = 0.01, train_time: float = 0.5, train=plus_one):
        self.protocols = protocols
        self.latency = latency
        self.train_time = train_time
        self.train = train
        self.crashed: set[str] = set()
        self.now = 0.0
        self.sent: list[tuple[float, str, Send]] = []
        self.rounds_done: list[tuple[float, str, int]] = []
        self.rejected: list[tuple[str, Rejected]] = []
        self._heap: list = []
        self._seq = itertools.count()

    def at(self, time: float, node: str, event) -> None:
        heapq.heappush(self._heap, (time, next(self._seq), node, event))

    def run(self, until: float, max_events: int = 200_000) -> None:
        for _ in range(max_events):
            if not self._heap or self._heap[0][0] > until:
                self.now = until
                return
            time, _, node, event = heapq.heappop(self._heap)
            self.now = time
            if node in self.crashed:
                continue
            for action in self.protocols[node].handle(event, time):
                self._act(node, action)
        raise AssertionError("event budget exhausted: a livelock?")

    def _act(self, node: str, action) -> None:
        match action:
            case Send(peer, kind, body, tensors):
                self.sent.append((self.now, node, action))
                self.at(self.now + self.latency, peer, MessageIn(node, kind, body, tensors))
            case Train(tag, state):
                stats = TrainStats(1, 1, 0.0, 0.0)
                self.at(self.now + self.train_time, node, Trained(tag, self.train(state), stats))
            case StartTimer(name, delay):
                self.at(self.now + delay, node, TimerFired(name))
            case RoundDone(rnd):
                self.rounds_done.append((self.now, node, rnd))
            case Rejected():
                self.rejected.append((node, action))

    def kinds_sent(self, kind: str) -> list[tuple[str, str]]:
        return [(src, send.peer) for _, src, send in self.sent if send.kind == kind]


def value_of(state) -> float:
    return float(next(iter(state.values())).flatten()[0])


def constant_model(value: float = 0.0):
    return {"w": torch.full((3,), value)}
