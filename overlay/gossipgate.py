"""The per-origin rate of gossiped metadata updates (``overlay.metasync``), judged on the times the
origins signed, so that a relay that holds an honest peer's messages back and releases them at once
cannot get it blamed. Sans-IO: ``now`` comes from the caller."""

from __future__ import annotations


class GossipGate:
    """Per-origin rate of gossiped updates, on the times the origins signed (sans-IO).

    Tokens refill at ``rate`` per second of the origin's own clock, up to ``burst``. A message whose
    time is not after the origin's last one (a replay, or reordered) or more than ``skew`` ahead of
    ``now`` is dropped; one past the rate is a flood. Origins idle for ``idle`` seconds are forgotten,
    and at most ``max_origins`` are kept (the least recently heard go first).
    """

    def __init__(
        self, rate: float, burst: int, skew: float, *, idle: float = 600.0, max_origins: int = 4096
    ) -> None:
        self.rate, self.burst, self.skew, self.idle, self.max_origins = rate, burst, skew, idle, max_origins
        self._state: dict[str, tuple[float, float, float]] = {}  # origin: (tokens, its last time, heard)

    def judge(self, origin: str, sent: float, now: float) -> str | None:
        """None if the message may pass; else "replay", "ahead" (drop) or "flood" (blame)."""
        if sent > now + self.skew:
            return "ahead"
        if origin in self._state:
            tokens, last, _ = self._state.pop(origin)
            if sent <= last:
                self._state[origin] = (tokens, last, now)
                return "replay"
            tokens = min(float(self.burst), tokens + (sent - last) * self.rate)
        else:
            tokens = float(self.burst)
        if tokens < 1.0:
            self._state[origin] = (tokens, sent, now)
            return "flood"
        self._state[origin] = (tokens - 1.0, sent, now)
        while len(self._state) > self.max_origins:
            del self._state[next(iter(self._state))]  # insertion order: the least recently heard
        return None

    def forget_idle(self, now: float) -> None:
        self._state = {o: s for o, s in self._state.items() if now - s[2] < self.idle}
