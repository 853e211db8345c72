"""Failure detection: phi accrual over pings, with any traffic from a peer as a sign of life.

py-libp2p 0.8.1 never notices a peer that hangs while its TCP connection stays up: Yamux keep-alives
do not close the connection and a blocked writer waits forever (../shared/LIBP2P.md §7); a peer that
exits or is killed closes its connections and is down at once (``overlay.peers``). So each node pings
every peer every ``interval`` seconds, each ping on its own (``timeout`` each) on a stream kept per
peer. We do not use ``PingService``: it holds one lock across peers while opening streams, so one hung
peer would delay the pings of all the others and make them look dead too.

Judging silence: a fixed number of missed pings (what this module did before) flapped whenever a
process was starved of CPU: 2,210 "peer down" events in 5 minutes of a 24-daemon demo on 2 cores. A
device busy training looks exactly like that to its peers. So silence is judged against the peer's own
history, by phi accrual (Hayashibara et al., SRDS 2004; Akka's and Cassandra's detector):
phi = -log10(P(a gap at least this long)), with the gaps between a peer's answered pings taken as
normal, N(mean, std) over the last ``WINDOW``, std at least ``interval / 2`` (Akka's logistic
approximation of the normal CDF). Two verdicts:

- *suspected* once phi >= ``suspect`` (3: a gap one in a thousand of the usual ones, a few seconds):
  shown in ``/status``, changes nothing;
- *down* once phi >= ``down`` (8) with ``pause`` seconds (30) of silence granted on top of the mean: the
  peer is cut off (and may come back: ``overlay.membership`` dials it again later). The bound for a
  hung peer is about ``mean + pause + 5 * std`` of its gaps (~37 s with the defaults 2 s, 30 s on a
  quiet network), plus one ping round.

A peer found down is logged with where our end of its connections stands (``host.reading_loops``).

Any frame received from a peer also proves it alive (:meth:`PhiAccrual.heard`), and a peer heard
within the last interval is not pinged in this round: gossip neighbours send models every cycle, so
most pings are saved (they were ~16% of a daemon's loop at 24 daemons on 2 cores). When our own loop
stalled (SIGSTOP, a CPU hog), everybody looks silent: a ping round that took far longer than it can
shifts every peer's clock by the stall (:meth:`PhiAccrual.stalled`) rather than blaming them for it.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections import deque

import trio
from libp2p.abc import IHost, INetStream
from libp2p.host.ping import ID as PING_PROTOCOL
from libp2p.host.ping import PING_LENGTH
from libp2p.peer.id import ID

from shoal.overlay.host import reading_loops, reset_stream
from shoal.overlay.peers import Peers

log = logging.getLogger("shoal.overlay")

WINDOW = 100  # gaps remembered per peer


def phi(elapsed: float, mean: float, std: float) -> float:
    """-log10 of the probability that a gap drawn from N(mean, std) is longer than ``elapsed``."""
    y = min(max((elapsed - mean) / std, -10.0), 15.0)  # beyond: 0 and ~114, without over/underflow
    e = math.exp(-y * (1.5976 + 0.070566 * y * y))
    return -math.log10(e / (1.0 + e)) if y > 0 else -math.log10(1.0 - 1.0 / (1.0 + e))


class PhiAccrual:
    """Per-peer history of gaps between answered pings, and the verdicts on each peer's silence."""

    def __init__(self, *, interval: float, suspect: float, down: float, pause: float) -> None:
        if not 0 < suspect < down or pause < 0 or interval <= 0:
            raise ValueError("need 0 < suspect < down, pause >= 0 and interval > 0")
        self.interval, self.suspect, self.down, self.pause = interval, suspect, down, pause
        self.suspected: set[str] = set()
        self._gaps: dict[str, deque[float]] = {}
        self._beat: dict[str, float] = {}  # when each peer last answered a ping
        self._heard: dict[str, float] = {}  # when each peer last showed any sign of life

    def watch(self, peer: str, now: float) -> None:
        """Start judging ``peer`` (a new task peer), as if it had just answered."""
        if peer not in self._heard:
            self._gaps[peer] = deque([self.interval], maxlen=WINDOW)
            self._heard[peer] = now

    def watching(self, peer: str) -> bool:
        return peer in self._heard

    def heartbeat(self, peer: str, now: float) -> None:
        """``peer`` answered a ping, or was heard (at ``now``) instead; once per moment."""
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


async def echo(stream: INetStream) -> bool:
    """One libp2p ping on ``stream``: whether our random payload came back intact."""
    payload = secrets.token_bytes(PING_LENGTH)
    await stream.write(payload)
    echoed = b""
    while len(echoed) < PING_LENGTH:
        chunk = await stream.read(PING_LENGTH - len(echoed))
        if not chunk:
            return False
        echoed += chunk
    return echoed == payload


class Liveness:
    """Pings each task peer every ``interval`` seconds and judges them (:class:`PhiAccrual`); a peer
    found down is cut off. Counts what it decided, for ``/status`` and ``/metrics``: ``downs`` (peers
    cut off), ``flaps`` (of those, the ones that came back as task peers later)."""

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
        self._streams: dict[str, INetStream] = {}  # one ping stream per peer, kept between pings

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            last = trio.current_time()
            while True:
                for peer in self._peers.peers():
                    self._watch(peer, last)
                    silence = self.detector.silence(peer, last)
                    if silence < self.interval:  # its traffic then was as good as an answered ping
                        self.detector.heartbeat(peer, last - silence)
                        continue
                    if peer not in self._pinging:  # one ping per peer at a time (see _ping)
                        self._pinging.add(peer)
                        nursery.start_soon(self._ping, peer)
                await trio.sleep(self.interval)
                now = trio.current_time()
                if now - last > 2 * self.interval:  # our loop was stopped or starved
                    log.info("our loop stalled for %.1f s: peers' silence in it does not count", now - last)
                    self.detector.stalled(now - last - self.interval)
                last = now
                for peer in self._judge(now):
                    nursery.start_soon(self._peers.disconnect, peer)

    def heard(self, peer: str) -> None:
        self.detector.heard(peer, trio.current_time())

    def status(self) -> dict[str, object]:
        """Peers suspected now, peers found down since start, and of those the ones that came back."""
        return {"suspected": sorted(self.detector.suspected), "down": self.downs, "flaps": self.flaps}

    def forget(self, peer: str) -> None:
        self.detector.forget(peer)
        self._streams.pop(peer, None)  # the peer's handler closes it after 10 s without pings

    def _watch(self, peer: str, now: float) -> None:
        if peer in self._declared:
            self._declared.discard(peer)
            self.flaps += 1
        self.detector.watch(peer, now)

    async def _ping(self, peer: str) -> None:
        """One ping on the peer's ping stream (opened on first use, dropped on any failure).

        Not awaited by the round: a ping to a peer whose TCP buffers are full (a stopped process we
        kept sending models to) can outlast its timeout, since resetting its stream waits for buffer
        space; measured, it held a round that awaited it, and so every peer's verdict, for 10 s. The
        stream is kept since opening one per ping (Yamux SYN, multistream-select) cost 2.5 ms of CPU
        against 0.5 ms on a kept stream (benchmarks/ping_cost.py): at 24 daemons pinging ~20 peers every
        2 s, about 0.4 of a 2-core machine.
        """
        stream = self._streams.get(peer)
        answered = False
        try:
            with trio.move_on_after(self.timeout):
                if stream is None:
                    stream = await self.host.new_stream(ID.from_base58(peer), [PING_PROTOCOL])
                answered = await echo(stream)
        except Exception:  # any failure to open, write or read is a missed ping
            pass
        finally:
            self._pinging.discard(peer)
        if answered:
            self.detector.heartbeat(peer, trio.current_time())
            if self.detector.watching(peer):  # not forgotten while the ping was out
                self._streams[peer] = stream
        else:
            self._streams.pop(peer, None)
            if stream is not None:  # it may hold a late echo: never reuse it
                await reset_stream(stream)

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
                reading_loops(self.host, ID.from_base58(peer)),
            )
            self.downs += 1
            self._declared.add(peer)
        return down
