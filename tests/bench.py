"""An in-memory internet for sans-IO protocol tests: a discrete-event loop, no trio, no sockets.

Messages (the typed values a driver would decode) take ``latency``; training takes ``train_time`` and
adds 1 to every tensor; messages to a crashed node vanish (its pings simply go unanswered). Timers are
keyed as the driver's are: a timer replaced or cancelled before its time never fires. Everything is
recorded for assertions.
"""

from __future__ import annotations

import heapq
import itertools

import torch

from shoal.learning.protocol import (
    CancelTimer,
    MessageIn,
    Rejected,
    RoundDone,
    Send,
    StartTimer,
    TimerFired,
    Train,
    Trained,
)


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
        self._timers: dict[tuple, int] = {}  # (node, key) -> the event number of its pending timer

    def at(self, time: float, node: str, event) -> int:
        seq = next(self._seq)
        heapq.heappush(self._heap, (time, seq, node, event))
        return seq

    def run(self, until: float, max_events: int = 200_000) -> None:
        for _ in range(max_events):
            if not self._heap or self._heap[0][0] > until:
                self.now = until
                return
            time, seq, node, event = heapq.heappop(self._heap)
            self.now = time
            if isinstance(event, TimerFired):
                if self._timers.get((node, event.key)) != seq:
                    continue  # replaced or cancelled
                del self._timers[node, event.key]
            if node in self.crashed:
                continue
            for action in self.protocols[node].handle(event, time):
                self._act(node, action)
        raise AssertionError("event budget exhausted: a livelock?")

    def _act(self, node: str, action) -> None:
        match action:
            case Send(peer, message):
                self.sent.append((self.now, node, action))
                self.at(self.now + self.latency, peer, MessageIn(node, message))
            case Train(tag, state):
                self.at(self.now + self.train_time, node, Trained(tag, self.train(state)))
            case StartTimer(key, delay):
                self._timers[node, key] = self.at(self.now + delay, node, TimerFired(key))
            case CancelTimer(key):
                self._timers.pop((node, key), None)
            case RoundDone(rnd):
                self.rounds_done.append((self.now, node, rnd))
            case Rejected():
                self.rejected.append((node, action))


def value_of(state) -> float:
    return float(next(iter(state.values())).flatten()[0])


def constant_model(value: float = 0.0):
    return {"w": torch.full((3,), value)}
