"""Failure detection: phi accrual over pings, with any traffic from a peer as a sign of life.

py-libp2p 0.8.1 never notices a peer that hangs while its TCP connection stays up: Yamux keep-alives
do not close the connection and a blocked writer waits forever (measured); a peer that
exits or is killed closes its connections and is down at once (``overlay.peers``). So each node
watches when it last received anything from each task peer, on any of its connections
(``connections.last_read``: any bytes count, whatever protocol they belong to), and sends a Yamux ping
(``connections.ping_connections``) to a peer not heard within half the ``interval``, at most one every
``interval`` seconds; the peer's reading loop answers it. Not the libp2p ping protocol: opening its
stream costs two multistream-select round trips through both event loops, which took seconds at 24
daemons on 2 cores while the connections' frames kept arriving, and most "peer down" verdicts were
those stream openings timing out.

Judging silence: a fixed number of missed pings (what this module did first) flapped whenever a
process was starved of CPU: 2,210 "peer down" events in 5 minutes of a 24-daemon demo on 2 cores. A
device busy training looks exactly like that to its peers. So silence is judged against the peer's own
history, by phi accrual (Hayashibara et al., SRDS 2004; Akka's and Cassandra's detector):
phi = -log10(P(a gap at least this long)), with the gaps between the moments a peer was heard, one per
round at most, taken as normal, N(mean, std) over the last ``WINDOW``, std at least ``interval / 2``
(Akka's logistic approximation of the normal CDF). Two verdicts:

- *suspected* once phi >= ``suspect`` (3: a gap one in a thousand of the usual ones, a few seconds):
  shown in ``/status``, changes nothing;
- *down* once phi >= ``down`` (8) with ``pause`` seconds (30) of silence granted on top of the mean: the
  peer is cut off (and may come back: ``overlay.membership`` dials it again later). The bound for a
  hung peer is about ``mean + pause + 5 * std`` of its gaps (~37 s with the defaults 2 s, 30 s on a
  quiet network), plus one round.

Our own loop's lag, how late each round wakes after its ``interval`` (the median of the last
:data:`LAGS`), is in ``/status``: on a CPU shared by many processes it is what every message waits
before its receiver reads it (the testbed records it beside each run).

A peer found down is logged with where our end of its connections stands (``connections.reading_loops``).
When our own loop stalled (SIGSTOP, a CPU hog), everybody looks silent: a round that took far longer
than it can shifts every peer's clock by the stall (:meth:`PhiAccrual.stalled`) rather than blaming
them for it.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID

from shoal.overlay import connections
from shoal.overlay.peers import Peers

log = logging.getLogger("shoal.overlay")

WINDOW = 100  # gaps remembered per peer
LAGS = 30  # our loop's lags remembered: a minute at the default interval


def phi(elapsed: float, mean: float, std: float) -> float:
    """-log10 of the probability that a gap drawn from N(mean, std) is longer than ``elapsed``."""
    y = min(max((elapsed - mean) / std, -10.0), 15.0)  # beyond: 0 and ~114, without over/underflow
    e = math.exp(-y * (1.5976 + 0.070566 * y * y))
    return -math.log10(e / (1.0 + e)) if y > 0 else -math.log10(1.0 - 1.0 / (1.0 + e))


class PhiAccrual:
    """Per-peer history of gaps between the moments each peer was heard, and the verdicts on each
    peer's silence."""

    def __init__(self, *, interval: float, suspect: float, down: float, pause: float) -> None:
        if not 0 < suspect < down or pause < 0 or interval <= 0:
            raise ValueError("need 0 < suspect < down, pause >= 0 and interval > 0")
        self.interval, self.suspect, self.down, self.pause = interval, suspect, down, pause
        self.suspected: set[str] = set()
        self._gaps: dict[str, deque[float]] = {}
        self._beat: dict[str, float] = {}  # the last heartbeat of each peer
        self._heard: dict[str, float] = {}  # when each peer last showed any sign of life

    def watch(self, peer: str, now: float) -> None:
        """Start judging ``peer`` (a new task peer), as if it had just been heard."""
        if peer not in self._heard:
            self._gaps[peer] = deque([self.interval], maxlen=WINDOW)
            self._heard[peer] = now

    def heartbeat(self, peer: str, now: float) -> None:
        """``peer`` was heard at ``now``: one gap of its history; once per moment."""
        if peer in self._heard and now > self._beat.get(peer, -math.inf):
            if peer in self._beat:
                self._gaps[peer].append(now - self._beat[peer])
            self._beat[peer] = now
            self.heard(peer, now)

    def heard(self, peer: str, now: float) -> None:
        """Traffic from ``peer``: alive now (peers we do not judge are ignored, so state stays bounded)."""
        if peer in self._heard:
            self._heard[peer] = max(self._heard[peer], now)

    def stalled(self, seconds: float) -> None:
        """Our own loop was stopped for ``seconds``: nobody's silence during it counts."""
        for clock in (self._beat, self._heard):
            for peer in clock:
                clock[peer] += seconds

    def silence(self, peer: str, now: float) -> float:
        return now - self._heard[peer]

    def phi(self, peer: str, now: float, pause: float = 0.0) -> float:
        mean, std = self._fit(peer)
        return phi(self.silence(peer, now), mean + pause, std)

    def _fit(self, peer: str) -> tuple[float, float]:
        """Mean and std (at least ``interval / 2``) of the peer's gaps; in floats, since ``statistics``
        computes exactly (8x slower, for every peer at every judgement)."""
        gaps = self._gaps[peer]
        mean = math.fsum(gaps) / len(gaps)
        std = math.sqrt(math.fsum((g - mean) ** 2 for g in gaps) / len(gaps))
        return mean, max(std, self.interval / 2)

    def judge(self, now: float) -> tuple[list[str], list[str], list[str]]:
        """``(newly suspected, no longer suspected, down)``; a peer found down is forgotten."""
        suspected, cleared, down = [], [], []
        for peer in list(self._heard):
            (mean, std), silence = self._fit(peer), self.silence(peer, now)
            if phi(silence, mean + self.pause, std) >= self.down:
                down.append(peer)
                self.forget(peer)
            elif phi(silence, mean, std) >= self.suspect:
                if peer not in self.suspected:
                    self.suspected.add(peer)
                    suspected.append(peer)
            elif peer in self.suspected:
                self.suspected.discard(peer)
                cleared.append(peer)
        return suspected, cleared, down

    def forget(self, peer: str) -> None:
        for table in (self._gaps, self._beat, self._heard):
            table.pop(peer, None)
        self.suspected.discard(peer)


class Liveness:
    """Every ``interval`` seconds, notes when each task peer was last heard, pings the quiet ones and
    judges them all (:class:`PhiAccrual`); a peer found down is cut off. Counts what it decided, for
    ``/status`` and ``/metrics``: ``downs`` (peers cut off), ``flaps`` (of those, the ones that came
    back as task peers later)."""

    def __init__(
        self,
        host: IHost,
        *,
        interval: float,
        timeout: float,
        suspect: float,
        down: float,
        pause: float,
        peers: Peers,
    ) -> None:
        self.host, self.interval, self.timeout = host, interval, timeout
        self.detector = PhiAccrual(interval=interval, suspect=suspect, down=down, pause=pause)
        self.downs = self.flaps = 0
        self._peers = peers
        self._declared: set[str] = set()  # peers we found down: one that comes back is a flap
        self._pinging: set[str] = set()
        self._lags: deque[float] = deque(maxlen=LAGS)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            last = trio.current_time()
            while True:
                for peer in self._peers.peers():
                    self._watch(peer, last)
                    read = connections.last_read(self.host, ID.from_base58(peer))
                    if read is not None:
                        self.detector.heard(peer, read)
                    silence = self.detector.silence(peer, last)
                    if silence < self.interval:  # heard in this round
                        self.detector.heartbeat(peer, last - silence)
                    if silence >= self.interval / 2 and peer not in self._pinging:
                        self._pinging.add(peer)  # one ping per peer at a time (see _ping)
                        nursery.start_soon(self._ping, peer)
                await trio.sleep(self.interval)
                now = trio.current_time()
                lag = now - last - self.interval
                self._lags.append(lag)
                if lag > self.interval:  # our loop was stopped or starved
                    log.info("our loop stalled for %.1f s: peers' silence in it does not count", now - last)
                    self.detector.stalled(lag)
                last = now
                for peer in self._judge(now):
                    nursery.start_soon(self._peers.disconnect, peer)

    def status(self) -> dict[str, object]:
        """Peers suspected now, peers found down since start, of those the ones that came back, and our
        loop's lag (seconds)."""
        return {
            "suspected": sorted(self.detector.suspected),
            "down": self.downs,
            "flaps": self.flaps,
            "loop_lag_s": round(statistics.median(self._lags), 3) if self._lags else 0.0,
        }

    @staticmethod
    def idle_status() -> dict[str, object]:
        """:meth:`status` of a node whose monitor has not started (no overlay yet)."""
        return {"suspected": [], "down": 0, "flaps": 0, "loop_lag_s": 0.0}

    def forget(self, peer: str) -> None:
        self.detector.forget(peer)

    def _watch(self, peer: str, now: float) -> None:
        if peer in self._declared:
            self._declared.discard(peer)
            self.flaps += 1
        self.detector.watch(peer, now)

    async def _ping(self, peer: str) -> None:
        """A Yamux ping on each connection to the peer, its answer to be seen as traffic next round.

        Not awaited by the round: writing to a peer whose TCP buffers are full (a stopped process we
        kept sending models to) waits for buffer space, up to ``timeout`` for its turn and up to the
        host's frame-write bound once written; measured, a ping that held the round held every peer's
        verdict with it, for 10 s.
        """
        try:
            with trio.move_on_after(self.timeout):
                await connections.ping_connections(self.host, ID.from_base58(peer))
        except Exception:  # a broken connection: its reading loop ends it, and the peer is down
            pass
        finally:
            self._pinging.discard(peer)

    def _judge(self, now: float) -> list[str]:
        """Log the detector's verdicts (suspicions at debug: they come and go, and a log is bounded);
        the peers found down, to be cut off."""
        suspected, cleared, down = self.detector.judge(now)
        for peer in suspected:
            log.debug("%s suspected: silent for %.1f s", peer, self.detector.silence(peer, now))
        for peer in cleared:
            log.debug("%s answers again", peer)
        for peer in down:
            log.info(
                "%s is down: silent far beyond its usual gaps (%s)",
                peer,
                connections.reading_loops(self.host, ID.from_base58(peer)),
            )
            self.downs += 1
            self._declared.add(peer)
        return down
