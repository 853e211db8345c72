"""What refused input costs a peer: penalties, expiring bans, per-peer message rates, bounded logs.

A plain object with the time passed in (``now``, any monotonic clock), so the libp2p overlay and the
simulated one apply the same policy, and tests drive it without a loop.

Two kinds of refused input, told apart by the caller:

- *wrong*: it proves the sender misbehaves (malformed bytes, implausible values, a flood over the
  rate limit). Each one is a penalty; at ``max_penalty`` the peer is banned for ``ban_duration``.
- *slow or gone*: a timeout, a truncated stream, a stream that ended before its first byte, input
  refused for load or for size alone. An honest peer on a bad link, or any peer while we are busy,
  produces these, so they are counted separately and never move a peer toward a ban.

Nothing is forever: a ban ends after ``ban_duration`` and clears the peer's penalties; penalties of a
peer that stayed clean for ``ban_duration`` are forgotten. Measured against real daemons, honest peers
did ban each other (metadata inflated by an attacker made their updates too big), and a permanent ban
cannot be recovered from without a restart.

Logs are bounded node-wide, not per peer, since identities cost nothing: per ``log_interval`` at most
``log_lines`` lines name a single event (the first rejection of a peer per reason class, with its
reason, or a ban); the rest is counted and summarised in one line per interval, e.g.
``rejected 312 more inputs in the last 60 s: 12D3..: 300 flood, 12 malformed model``.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import dataclass, field

log = logging.getLogger("shoal.overlay.penalties")

SUMMARY_PEERS = 3  # peers named in a summary line, the busiest first
MAX_REASON = 200  # characters of a reason kept and logged: reasons may quote a peer's input


@dataclass(frozen=True)
class Rejection:
    peer: str
    kind: str  # reason class, e.g. "flood", "malformed message": what summaries count by
    reason: str
    wrong: bool
    at: float


@dataclass
class _Record:
    penalties: int = 0
    slow: int = 0
    last: float = 0.0
    banned_until: float | None = None
    logged: set[str] = field(default_factory=set)  # kinds whose first rejection was logged


class Penalties:
    """Per-peer penalties and bans, the latest rejections, and rate-limited logging of them."""

    def __init__(
        self,
        max_penalty: int,
        ban_duration: float,
        *,
        log_interval: float = 60.0,
        log_lines: int = 20,
        keep: int = 100,
    ) -> None:
        if max_penalty < 1 or ban_duration <= 0 or log_interval <= 0 or log_lines < 0:
            raise ValueError("max_penalty >= 1, positive ban_duration and log_interval, log_lines >= 0")
        self.max_penalty = max_penalty
        self.ban_duration = ban_duration
        self.log_interval = log_interval
        self.log_lines = log_lines
        self.rejections: deque[Rejection] = deque(maxlen=keep)  # the latest, with reasons
        self.rejected = 0  # all of them, wrong or not
        self._records: dict[str, _Record] = {}
        self._window: float | None = None  # start of the current logging interval
        self._lines = 0  # single-event lines logged in it
        self._unlogged: Counter[tuple[str, str]] = Counter()  # (peer, kind) counted instead of logged
        self._unlogged_bans = 0

    def reject(self, peer: str, kind: str, reason: str, now: float, *, wrong: bool = True) -> bool:
        """Record refused input from ``peer``; True when this made it banned (the caller cuts it off)."""
        self._roll(now)
        record = self._fresh(peer, now)
        record.last = now
        self.rejected += 1
        reason = reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 3] + "..."
        self.rejections.append(Rejection(peer, kind, reason, wrong, now))
        if kind in record.logged or not self._line():
            self._unlogged[peer, kind] += 1
        else:
            record.logged.add(kind)
            log.warning("rejected input from %s (%s): %s; more like it are summarised", peer, kind, reason)
        if not wrong:
            record.slow += 1
            return False
        record.penalties += 1
        if record.penalties < self.max_penalty or record.banned_until is not None:
            return False
        record.banned_until = now + self.ban_duration
        if self._line():
            log.warning(
                "banning %s for %g s after %d wrong inputs (last: %s)",
                peer,
                self.ban_duration,
                record.penalties,
                reason,
            )
        else:
            self._unlogged_bans += 1
        return True

    def banned(self, peer: str, now: float) -> bool:
        record = self._records.get(peer)
        return record is not None and record.banned_until is not None and now < record.banned_until

    def penalty(self, peer: str) -> int:
        record = self._records.get(peer)
        return record.penalties if record else 0

    def slow(self, peer: str) -> int:
        """Inputs from ``peer`` refused as slow or gone (never a reason to ban)."""
        record = self._records.get(peer)
        return record.slow if record else 0

    def counts(self) -> Counter[str]:
        """Current penalties per peer, for status and tests."""
        return Counter({p: r.penalties for p, r in self._records.items() if r.penalties})

    def tick(self, now: float) -> list[str]:
        """Call about once a second: ends expired bans (returned, so the caller can let those peers back
        in), forgets peers that stayed clean for ``ban_duration``, and logs a due summary."""
        self._roll(now)
        ended = []
        for peer, record in list(self._records.items()):
            if record.banned_until is not None and now >= record.banned_until:
                ended.append(peer)
                log.info("ban of %s ended after %g s", peer, self.ban_duration)
                self._records[peer] = _Record(last=now)
            elif record.banned_until is None and now - record.last >= self.ban_duration:
                del self._records[peer]
        return ended

    def _fresh(self, peer: str, now: float) -> _Record:
        record = self._records.get(peer)
        if record is None or (record.banned_until is None and now - record.last >= self.ban_duration):
            record = self._records[peer] = _Record()
        return record

    def _line(self) -> bool:
        """Take one of this interval's single-event lines, if any is left."""
        if self._lines >= self.log_lines:
            return False
        self._lines += 1
        return True

    def _roll(self, now: float) -> None:
        """Start a new logging interval once the current one is over, summarising what went unlogged."""
        if self._window is not None and now - self._window < self.log_interval:
            return
        if self._unlogged or self._unlogged_bans:
            self._summarise(now - self._window if self._window is not None else 0.0)
        self._window, self._lines = now, 0

    def _summarise(self, elapsed: float) -> None:
        by_peer: dict[str, Counter[str]] = {}
        for (peer, kind), n in self._unlogged.items():
            by_peer.setdefault(peer, Counter())[kind] += n
        busiest = sorted(by_peer.items(), key=lambda item: -item[1].total())
        parts = [
            f"{peer}: " + ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
            for peer, kinds in busiest[:SUMMARY_PEERS]
        ]
        if len(busiest) > SUMMARY_PEERS:
            parts.append(f"and {len(busiest) - SUMMARY_PEERS} more peers")
        if self._unlogged_bans:
            parts.append(f"{self._unlogged_bans} more bans")
        log.warning(
            "rejected %d more inputs in the last %.0f s: %s",
            self._unlogged.total(),
            elapsed,
            "; ".join(parts),
        )
        self._unlogged.clear()
        self._unlogged_bans = 0


class RateLimit:
    """A token bucket per peer: ``burst`` at once, ``rate`` per second sustained.

    Why: a stream costs the sender one round trip and us a task, a parse and a log line; without a
    bound, measured floods reached 13,500 streams in 25 s from one peer.
    """

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}  # peer -> (tokens, at)

    def allow(self, peer: str, now: float) -> bool:
        tokens, at = self._buckets.get(peer, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[peer] = (tokens, now)
            return False
        self._buckets[peer] = (tokens - 1.0, now)
        return True

    def forget_idle(self, now: float) -> None:
        """Drop buckets that have refilled (the same as none), so sybils leave no state behind."""
        self._buckets = {
            p: (t, at) for p, (t, at) in self._buckets.items() if t + (now - at) * self.rate < self.burst
        }
