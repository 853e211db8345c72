"""The inbound guard: what every stream a peer opens to us passes, and what refused input costs it.

``overlay.penalties`` holds the policy as a plain object (the simulated overlay applies it too); this
module enforces it on libp2p streams:

- a banned peer's streams are reset on arrival, and the ban cuts the peer off (``cut_off``); so are
  the streams of a peer ``refused`` by the peer set (no slot for it, or not on a closed swarm's
  allowlist: ``overlay.peers``), without a penalty;
- every peer's inbound streams (messages, metadata syncs, dial-back requests) are rate limited per
  peer (``message_rate``, ``message_burst``): the excess is a flood, which is wrong input;
- a stream handler never raises: an exception leaving one stops libp2p's whole swarm, so one peer's
  input would take the node down; a failure is contained to its stream (reset) and recorded;
- every incoming frame is read under the node's bounds (:meth:`Guard.read`): it reserves its
  announced length from a node-wide and a per-peer budget (``max_inflight``, ``max_peer_inflight``)
  and must keep up ``min_rate`` and finish within ``receive_timeout`` (``overlay.framing``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import INetStream

from shoal.overlay.config import P2PConfig
from shoal.overlay.framing import Inflight, Libp2pStream, Pace, TransferError, Truncated, read_frame
from shoal.overlay.host import reset_stream
from shoal.overlay.penalties import Penalties, RateLimit
from shoal.overlay.streams import RECEIVE_IDLE
from shoal.overlay.tasks import Tasks

log = logging.getLogger("shoal.overlay")

Handler = Callable[[INetStream], Awaitable[None]]


class _Metered:
    """Counts what is read from a stream into ``counter[key]`` while it lasts (transfers' progress)."""

    def __init__(self, stream: Libp2pStream, counter: Counter[str], key: str) -> None:
        self.stream, self.counter, self.key, self.count = stream, counter, key, 0

    async def read(self, max_bytes: int) -> bytes:
        data = await self.stream.read(max_bytes)
        self.counter[self.key] += len(data)
        self.count += len(data)
        return data

    def done(self) -> None:
        self.counter[self.key] -= self.count
        if self.counter[self.key] <= 0:
            del self.counter[self.key]


class Guard:
    """Penalties and bans, per-peer stream rates, the inbound byte budgets and bounded frame reads."""

    def __init__(
        self,
        config: P2PConfig,
        tasks: Tasks,
        cut_off: Callable[[str], Awaitable[None]],
        refused: Callable[[str], bool] = lambda peer: False,
    ) -> None:
        self.config = config
        self.policy = Penalties(config.max_penalty, config.ban_duration, log_interval=config.log_interval)
        self.inflight = Inflight(config.max_inflight, config.peer_inflight)
        self.receiving: Counter[str] = Counter()  # bytes so far of messages arriving now, by sender
        self._streams = RateLimit(config.message_rate, config.message_burst)
        self._seconds: dict[str, tuple[int, int]] = {}  # peer -> (whole second, streams in it)
        self.peak_rate = 0  # the most inbound streams and messages one peer sent in one second, for status
        self._pace = Pace(config.min_rate, config.rate_window)
        self._tasks, self._cut_off, self._refused = tasks, cut_off, refused

    async def run(self) -> None:
        """Once a second: end expired bans, forget idle rate-limit state, log a due summary."""
        while True:
            await trio.sleep(1.0)
            now = trio.current_time()
            self.policy.tick(now)
            self._streams.forget_idle(now)
            self._seconds = {p: (t, n) for p, (t, n) in self._seconds.items() if t >= int(now) - 1}

    def banned(self, peer: str) -> bool:
        return self.policy.banned(peer, trio.current_time())

    def reject(self, peer: str, kind: str, reason: str, *, wrong: bool) -> None:
        """Refused input, under the node's policy; a peer it bans is cut off: streams, connection, and its
        gossip is dropped on arrival (``overlay.announce``). Not pubsub's blacklist: py-libp2p 0.8.1
        removes a blacklisted peer at once and then again when its connection closes, and that second
        removal raises KeyError out of pubsub's service and ended the daemon (seen in
        tests/test_hostile.py)."""
        if self.policy.reject(peer, kind, reason, trio.current_time(), wrong=wrong):
            self._tasks.spawn(self._cut_off, peer)

    def allow(self, peer: str, what: str) -> bool:
        """Take one inbound stream or message from ``peer``'s rate; over it, record a flood of ``what``
        and return False."""
        now = trio.current_time()
        second = int(now)
        then, count = self._seconds.get(peer, (second, 0))
        count = count + 1 if then == second else 1
        self._seconds[peer] = (second, count)
        self.peak_rate = max(self.peak_rate, count)
        if self._streams.allow(peer, now):
            return True
        rate = f"{self.config.message_rate:g}/s, burst {self.config.message_burst}"
        self.reject(peer, "flood", f"{what} faster than {rate}", wrong=True)
        return False

    def handler(self, handle: Handler) -> Handler:
        """``handle`` behind the checks every inbound stream passes: banned peers are reset, and streams
        over the peer's rate are a flood (wrong input). Never raising: a failure is contained to its
        stream (reset) and recorded, not logged per stream."""

        async def run(stream: INetStream) -> None:
            peer = str(stream.muxed_conn.peer_id)
            if (
                self.banned(peer)
                or self._refused(peer)
                or not self._tasks.running
                or not self.allow(peer, "streams")
            ):
                await reset_stream(stream)
                return
            try:
                await handle(stream)
            except Exception as e:  # not the peer's fault as far as we know: not a penalty
                reason = f"{handle.__name__}: {type(e).__name__}: {e}"
                self.reject(peer, "handler failed", reason, wrong=False)
                await reset_stream(stream)

        return run

    async def read(
        self, peer: str, stream: INetStream, limit: int, admit: Callable[[int], None], what: str
    ) -> memoryview | None:
        """One frame from ``peer`` under the node's bounds (size, rate, budget, ``receive_timeout``), or
        None, the stream reset, once it ended between frames or went idle (quietly) or after recording
        why its input was refused."""
        metered = _Metered(Libp2pStream(stream), self.receiving, peer)
        try:
            frame = await read_frame(
                metered,
                limit,
                pace=self._pace,
                admit=admit,
                idle=RECEIVE_IDLE,
                timeout=self.config.receive_timeout,
            )
            return frame
        except TransferError as e:
            if isinstance(e, Truncated) and e.empty:  # ended between frames or idle: done with it
                log.debug("%s %s stream: %s", peer, what, e)
            else:
                self.reject(peer, e.kind, f"{what}: {e}", wrong=e.hostile)
        finally:
            metered.done()
        await reset_stream(stream)
        return None
