"""The driver: runs a sans-IO learning protocol on any Overlay.

It is the only place where a protocol meets I/O. It feeds the protocol overlay events (peers
connected and disconnected, passed on as they are; messages), timer expiries and finished training,
one at a time, and carries out the actions the protocol returns: sends (each under ``send_timeout``,
the one deadline of a protocol's send; failures reported back as ``SendFailed``), training (through a
:class:`Compute`), timers. The daemon runs it on libp2p with training in a worker thread;
simulations run it on ``overlay.sim`` with training charged in virtual time.

Timers are keyed (``learning.protocol``): each pending one is a task under its own CancelScope, which a
StartTimer of the same key or a CancelTimer cancels. An expiry goes through the event queue like
everything else and is handed on only if its timer is still the pending one for its key, so a timer
replaced or cancelled after its delay ran out (its expiry already queued) does not fire either.

Messages are typed between driver and protocols (``learning.messages``): on the way in, the node's
:class:`~learning.compression.Compression` decodes the model and :func:`~learning.messages.decode` the
body into its message class, once, so protocols always see whole models whatever the codec and bodies
within their bounds; on the way out, a message's kind, body and model (encoded by the codec) make the
wire ``Message``. ``codec-reset`` is the codec's own and never reaches a protocol.

Input from peers is contained to that input (every peer is a possible adversary: docs/security.md): a
body or model that cannot be decoded, a protocol's ``Rejected`` and a ValueError a protocol raises on a
peer's message all become ``overlay.penalize``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

import trio

from shoal.learning.codecs import CodecError
from shoal.learning.compression import CodecConfig, Compression, Stale
from shoal.learning.learner import Learner
from shoal.learning.messages import CodecReset, decode
from shoal.learning.protocol import (
    Action,
    CancelTimer,
    Credited,
    Event,
    LearningProtocol,
    Members,
    MessageIn,
    PeerDown,
    PeerUp,
    Rejected,
    RoundDone,
    Send,
    SendFailed,
    Started,
    StartTimer,
    State,
    Stopping,
    TimerFired,
    TimerKey,
    Train,
    Trained,
)
from shoal.overlay import offloop
from shoal.overlay.interface import (
    Delivered,
    MembersChanged,
    Overlay,
    PeerConnected,
    PeerDisconnected,
    PeerUnreachable,
)
from shoal.overlay.wire import Message

log = logging.getLogger("shoal.driver")
FP32 = CodecConfig()
RESET_INTERVAL = 5.0
T = TypeVar("T")
MAX_RESET_PEERS = 1024
OFF_LOOP_ELEMENTS = 1 << 20  # models with more values are encoded and decoded in a worker thread


@dataclass(frozen=True)
class _Expired:
    """A timer's delay ran out; it fires only if ``scope`` is still the pending timer of ``key``."""

    key: TimerKey
    scope: trio.CancelScope


async def _codec_call(
    compression: Compression, fn: Callable[..., T], peer: str, body: Mapping, tensors: Mapping
) -> T:
    """``fn(peer, body, tensors)``, in a worker thread when a codec has a big model to work on, so the
    loop keeps answering pings (a 25M-parameter keyframe takes seconds); fp32 passes models through.
    Simulations run small models on the loop: a thread would let the virtual clock jump."""
    if compression.config.name != "fp32" and sum(t.numel() for t in tensors.values()) > OFF_LOOP_ELEMENTS:
        return await offloop.run_sync(fn, peer, body, tensors)
    return fn(peer, body, tensors)


class Compute(Protocol):
    async def train(self, learner: Learner, state: State, round: int) -> State: ...


class ThreadCompute:
    """Train in a worker thread so the event loop keeps answering peers (a stall over 5 s resets Yamux)."""

    async def train(self, learner: Learner, state: State, round: int) -> State:
        state, _ = await offloop.run_sync(learner.train, state, round, abandon_on_cancel=True)
        return state


class VirtualCompute:
    """Train on the loop's thread, then let ``samples / samples_per_second`` of virtual time pass.

    For simulations under a MockClock: a worker thread would let the clock jump while it runs.
    """

    def __init__(self, samples_per_second: float):
        if samples_per_second <= 0:
            raise ValueError(f"compute speed must be positive, got {samples_per_second}")
        self.samples_per_second = samples_per_second

    async def train(self, learner: Learner, state: State, round: int) -> State:
        state, stats = learner.train(state, round)
        await trio.sleep(stats["samples"] / self.samples_per_second)
        return state


class Driver:
    def __init__(
        self,
        protocol: LearningProtocol,
        overlay: Overlay,
        learner: Learner,
        compute: Compute,
        *,
        send_timeout: float = 60.0,
        on_round: Callable[[int], None] | None = None,
        codec: CodecConfig = FP32,
        fragments: int = 1,
    ):
        self.protocol = protocol
        self.overlay = overlay
        self.learner = learner
        self.compute = compute
        self.send_timeout = send_timeout
        self.on_round = on_round
        self.compression = Compression(codec, protocol.model, fragments)  # the protocol's (learning.outer)
        self._inbox, self._events = trio.open_memory_channel[Event | _Expired](math.inf)
        self._training = trio.Lock()  # one model, one training at a time (a newer Train waits its turn)
        self._nursery: trio.Nursery | None = None
        self._encoding = trio.Lock()  # fair: encodings run in the order their sends started
        self._resets: dict[str, float] = {}  # when we last asked each peer for a keyframe
        self._timers: dict[TimerKey, trio.CancelScope] = {}  # the pending timer of each key
        self.trainings, self.training_seconds = 0, 0.0  # rounds trained, and the (wall or virtual) time taken

    async def run(self) -> None:
        """Run until cancelled, or until the overlay closes its event channel (the node went down)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for peer in self.overlay.peers():
                self._handle(PeerUp(peer))
            self._handle(Members(frozenset(self.overlay.members())))
            self._handle(Started())
            nursery.start_soon(self._pump_overlay)
            async for event in self._events:
                if not isinstance(event, _Expired):
                    self._handle(event)
                elif self._timers.get(event.key) is event.scope:  # not replaced or cancelled meanwhile
                    del self._timers[event.key]
                    self._handle(TimerFired(event.key))

    async def leave(self, timeout: float = 5.0) -> None:
        """Graceful departure: give the protocol ``Stopping``, send its goodbyes within ``timeout``."""
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                for action in self.protocol.handle(Stopping(), trio.current_time()):
                    if isinstance(action, Send):
                        self._act(action, nursery)

    async def _pump_overlay(self) -> None:
        async for event in self.overlay.events:
            match event:
                case Delivered(peer, message):
                    await self._deliver(peer, message)
                case PeerConnected(peer):
                    self._inbox.send_nowait(PeerUp(peer))
                case PeerDisconnected(peer):
                    self._inbox.send_nowait(PeerDown(peer))
                case MembersChanged(peers):
                    self._inbox.send_nowait(Members(peers))
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()  # the overlay closed: this node is down

    async def _deliver(self, peer: str, message: Message) -> None:
        try:
            body, model = await _codec_call(
                self.compression, self.compression.decode, peer, message.body, message.tensors
            )
        except Stale as exc:
            log.debug("%s message from %s dropped: %s", message.kind, peer, exc)
            self._ask_for_keyframe(peer)
            return
        except CodecError as exc:
            self.overlay.penalize(peer, f"{message.kind} message could not be decoded: {exc}")
            return
        match decode(message.kind, body, model):
            case str(reason):
                self.overlay.penalize(peer, reason)
            case CodecReset():
                self.compression.forget(peer)
            case typed:
                self._inbox.send_nowait(MessageIn(peer, typed))

    def _ask_for_keyframe(self, peer: str) -> None:
        """``codec-reset`` to ``peer``, at most once per RESET_INTERVAL: a burst of stale differences (or a
        peer sending them on purpose) costs one small message."""
        now = trio.current_time()
        if now - self._resets.get(peer, -math.inf) < RESET_INTERVAL:
            return
        if len(self._resets) >= MAX_RESET_PEERS:
            self._resets = {p: t for p, t in self._resets.items() if now - t < RESET_INTERVAL}
        self._resets[peer] = now
        self._act(Send(peer, CodecReset()), self._nursery)

    def _handle(self, event: Event) -> None:
        """Feed one event to the protocol. A ValueError raised on a peer's message is that message's fault
        (its bounds were checked when it was decoded; this catches what slipped through): the sender is
        penalised and the node goes on. Any other exception is a bug of ours and ends the node loudly."""
        assert self._nursery is not None
        try:
            actions = self.protocol.handle(event, trio.current_time())
        except ValueError as exc:
            if not isinstance(event, MessageIn):
                raise
            self.overlay.penalize(event.peer, f"{event.message.KIND} message could not be handled: {exc}")
            return
        for action in actions:
            self._act(action, self._nursery)

    def _act(self, action: Action, nursery: trio.Nursery) -> None:
        match action:
            case Send():
                nursery.start_soon(self._send, action)
            case Train():
                nursery.start_soon(self._train, action)
            case StartTimer(key, delay):
                self._cancel_timer(key)
                scope = self._timers[key] = trio.CancelScope()
                nursery.start_soon(self._timer, key, delay, scope)
            case CancelTimer(key):
                self._cancel_timer(key)
            case RoundDone(rnd):
                if self.on_round is not None:
                    self.on_round(rnd)
            case Credited(peer, value):
                self.overlay.credit(peer, value)
            case Rejected(peer, reason, blame=True):
                self.overlay.penalize(peer, reason)
            case Rejected(peer, reason):
                log.debug("dropped input from %s: %s", peer, reason)

    async def _encode(self, send: Send) -> Message:
        """The wire message, its model in the codec, big models in a worker thread. One at a time, in the
        order the sends were started: a top-k difference names the previous message to that peer, and
        the codec's references are not shared between threads."""
        msg = send.message
        if not msg.tensors:
            return Message(msg.KIND, msg.body())
        async with self._encoding:
            body, wire = await _codec_call(
                self.compression, self.compression.encode, send.peer, msg.body(), msg.tensors
            )
        return Message(msg.KIND, body, wire)

    async def _send(self, send: Send) -> None:
        kind = send.message.KIND
        try:
            message = await self._encode(send)
        except ValueError as exc:  # our own model cannot be encoded (non-finite): our bug, not the peer's
            log.error("not sending %s to %s: %s", kind, send.peer, exc)
            self._inbox.send_nowait(SendFailed(send.peer, send.message))
            return
        try:
            with trio.fail_after(self.send_timeout):
                await self.overlay.send(send.peer, message)
        except (PeerUnreachable, trio.TooSlowError) as exc:
            log.debug("send of %s to %s failed: %s", kind, send.peer, str(exc) or "timeout")
            if send.message.tensors:
                self.compression.forget(send.peer)
            if not isinstance(send.message, CodecReset):  # the codec's own: the protocol never sent it
                self._inbox.send_nowait(SendFailed(send.peer, send.message))

    async def _train(self, train: Train) -> None:
        async with self._training:
            began = trio.current_time()
            state = await self.compute.train(self.learner, train.state, train.tag)
            self.trainings += 1
            self.training_seconds += trio.current_time() - began
        self._inbox.send_nowait(Trained(train.tag, state))

    def _cancel_timer(self, key: TimerKey) -> None:
        scope = self._timers.pop(key, None)
        if scope is not None:
            scope.cancel()

    async def _timer(self, key: TimerKey, delay: float, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep(delay)
            self._inbox.send_nowait(_Expired(key, scope))
