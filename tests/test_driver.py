"""The driver on the simulated network: what it decodes for a protocol (a refusal costs the sender, and so
does a ValueError a protocol raises on a message; our own bugs end the node), models through every codec,
training off the event loop, and keyed timers (a replaced or cancelled timer never fires)."""

import enum
import random
from collections.abc import Callable

import pytest
import torch
import trio

from shoal.learning.compression import CodecConfig, Compression
from shoal.learning.gossip import Gossip, GossipConfig
from shoal.learning.integrators import Mean
from shoal.learning.learner import Learner
from shoal.learning.messages import CodecReset, Fetch, GossipModel, Ping, Pong, TrainedModel
from shoal.learning.models import build_model
from shoal.learning.protocol import Action, CancelTimer, Event, MessageIn, Started, StartTimer, TimerFired
from shoal.learning.task import classification
from shoal.node.driver import Driver, ThreadCompute, VirtualCompute
from shoal.overlay.sim import SimNetwork
from shoal.overlay.wire import Message


class Key(enum.Enum):
    A = "a"
    B = "b"
    C = "c"


class Scripted:
    """Answers each event with what ``script`` returns for it; records the timers that fired, and when,
    and the messages it was handed."""

    model: dict = {}  # noqa: RUF012 (never changed)
    round = 0

    def __init__(self, script: Callable[[Event], list[Action]]):
        self.script = script
        self.fired: list[tuple[object, float]] = []
        self.messages: list[MessageIn] = []

    def handle(self, event: Event, now: float) -> list[Action]:
        if isinstance(event, TimerFired):
            self.fired.append((event.key, now))
        if isinstance(event, MessageIn):
            self.messages.append(event)
        return self.script(event)


async def run(nursery: trio.Nursery, script: Callable[[Event], list[Action]], seconds: float) -> Scripted:
    net = SimNetwork()
    await nursery.start(net.run)
    protocol = Scripted(script)
    nursery.start_soon(Driver(protocol, net.add_node("me"), None, VirtualCompute(1.0)).run)
    await trio.sleep(seconds)
    return protocol


async def test_a_replaced_timer_fires_once_at_its_new_time_and_a_cancelled_one_never(nursery, autojump_clock):
    def script(event: Event) -> list[Action]:
        match event:
            case Started():
                return [StartTimer(Key.A, 5.0), StartTimer(Key.B, 5.0), StartTimer(Key.C, 1.0)]
            case TimerFired(Key.C):
                return [StartTimer(Key.A, 10.0), CancelTimer(Key.B), CancelTimer("never started")]
        return []

    protocol = await run(nursery, script, 30.0)
    assert protocol.fired == [(Key.C, 1.0), (Key.A, 11.0)]


async def test_a_timer_cancelled_after_it_ran_out_does_not_fire(nursery, autojump_clock):
    """Two timers run out together, so both expiries are queued before the protocol hears of either;
    whichever it hears of first cancels the other, whose queued expiry is dropped. Keys are values: equal
    tuples built anew name the same timer."""

    def script(event: Event) -> list[Action]:
        match event:
            case Started():
                return [StartTimer((Key.A, 1), 1.0), StartTimer((Key.A, 2), 1.0)]
            case TimerFired((Key.A, n)):
                return [CancelTimer((Key.A, 3 - n))]
        return []

    protocol = await run(nursery, script, 5.0)
    assert len(protocol.fired) == 1 and protocol.fired[0][1] == 1.0


MODEL = {"w": torch.zeros(3)}
UNDECODABLE = [  # what a peer may put on the wire, and the driver's reason for refusing it
    (GossipModel.KIND, {"round": -1, "samples": 1}, MODEL, "model message: round must be an integer"),
    (GossipModel.KIND, {"round": "0", "samples": 1}, MODEL, "round must be an integer"),
    (GossipModel.KIND, {"samples": 1}, MODEL, "round must be an integer"),
    (GossipModel.KIND, {"round": 0, "samples": 1, "labels": ["x"]}, MODEL, "labels must be a list"),
    (GossipModel.KIND, {"round": 0, "samples": 1}, {}, "model message: carries no model"),
    (TrainedModel.KIND, {"round": 3}, MODEL, "trained message: samples must be an integer"),
    (Ping.KIND, {"sel": 0, "round": -1}, {}, "ping message: round must be an integer"),
    (Pong.KIND, {"sel": 0, "round": 1}, MODEL, "pong message: takes no tensors"),
    (CodecReset.KIND, {}, MODEL, "codec-reset message: takes no tensors"),
    (
        "advert",
        {"round": 1, "index": 1, "joined": True},
        {},
        "unknown message kind 'advert'",
    ),  # views are gone
    ("vote", {"round": 1}, {}, "unknown message kind 'vote'"),
]


async def test_what_cannot_be_decoded_costs_its_sender_and_only_typed_messages_reach_the_protocol(
    nursery, autojump_clock
):
    net = SimNetwork(max_penalty=len(UNDECODABLE) + 1)  # no ban: every message is heard
    await nursery.start(net.run)
    evil, me = net.add_node("evil"), net.add_node("me", neighbours=["evil"])
    protocol = Scripted(lambda event: [])
    nursery.start_soon(Driver(protocol, me, None, VirtualCompute(1.0)).run)
    await trio.sleep(1)
    for kind, body, tensors, _ in UNDECODABLE:
        await evil.send("me", Message(kind, body, tensors))
    await evil.send("me", Message(CodecReset.KIND, {}))  # the codec's own: the driver's, not the protocol's
    await evil.send("me", Message(Fetch.KIND, {"later": 1}))  # fields a later release may add are ignored
    await evil.send("me", Message(Ping.KIND, {"sel": 2, "round": 5}))
    await trio.sleep(1)
    reasons = [r.reason for r in me.policy.rejections]
    assert len(reasons) == len(UNDECODABLE)
    assert all(why in reason for (*_, why), reason in zip(UNDECODABLE, reasons))
    assert protocol.messages == [MessageIn("evil", Fetch()), MessageIn("evil", Ping(2, 5))]


@pytest.mark.parametrize("codec", ["fp32", "int8", "topk"])
async def test_the_driver_rejects_a_bad_model_and_keeps_going(nursery, autojump_clock, codec):
    net = SimNetwork(latency=0.01)
    await nursery.start(net.run)
    model = build_model("mlp", (4,), 3, seed=0)
    learner = Learner(classification(model, torch.randn(20, 4), torch.randint(0, 3, (20,)), steps=2))
    protocol = Gossip(
        learner.initial_state(),
        learner.samples,
        Mean(),
        GossipConfig(fanout=None, period=1.0),
        random.Random(0),
    )
    attacker = net.add_node("evil")
    good = net.add_node("good", neighbours=["evil"])
    driver = Driver(protocol, good, learner, VirtualCompute(1000), codec=CodecConfig(codec))
    nursery.start_soon(driver.run)
    await trio.sleep(2.5)
    bad = {n: torch.full_like(t, float("inf")) for n, t in protocol.model.items()}
    await attacker.send("good", Message(GossipModel.KIND, {"round": 0, "samples": 5}, bad))
    await attacker.send("good", Message(GossipModel.KIND, {"round": 0}, {}))
    if codec == "topk":  # a difference to a reference we never held: dropped, a keyframe asked for, no blame
        _, wire = Compression(CodecConfig("topk"), protocol.model).encode("good", {}, protocol.model)
        await attacker.send(
            "good",
            Message(GossipModel.KIND, {"round": 0, "samples": 5, "z": {"seq": 8, "base": 7, "ref": 1}}, wire),
        )
    await trio.sleep(3)
    assert good.penalties["evil"] == 2
    assert protocol.round >= 5 and all(torch.isfinite(t).all() for t in protocol.model.values())


async def test_thread_compute_trains_off_the_event_loop(nursery):
    """The daemon's set-up: real clock, training in a worker thread while the loop keeps running."""
    import threading

    net = SimNetwork(latency=0.001)
    await nursery.start(net.run)
    loop_thread = threading.get_ident()
    threads = set()

    class Recording(Learner):
        def train(self, state, round):
            threads.add(threading.get_ident())
            return super().train(state, round)

    drivers = []
    for name, peers in (("a", []), ("b", ["a"])):
        learner = Recording(
            classification(
                build_model("mlp", (4,), 3, seed=0), torch.randn(40, 4), torch.randint(0, 3, (40,)), steps=3
            )
        )
        protocol = Gossip(
            learner.initial_state(), 40, Mean(), GossipConfig(fanout=None, period=0.05), random.Random(0)
        )
        drivers.append(Driver(protocol, net.add_node(name, neighbours=peers), learner, ThreadCompute()))
        nursery.start_soon(drivers[-1].run)
    with trio.fail_after(30):
        while min(d.protocol.round for d in drivers) < 5:
            await trio.sleep(0.05)
    assert threads and loop_thread not in threads
    assert net.traffic.messages[GossipModel.KIND] >= 8


class Raising:
    """A protocol that raises ``error`` on every message: a slip past its own parsing."""

    def __init__(self, error: Exception):
        self.error, self.model, self.round, self.messages = error, {}, 0, 0

    def handle(self, event, now):
        if type(event).__name__ == "MessageIn":
            self.messages += 1
            raise self.error
        return []


async def test_the_driver_contains_value_errors_on_messages_but_not_our_bugs(nursery, autojump_clock):
    net = SimNetwork(latency=0.01)
    await nursery.start(net.run)
    learner = Learner(
        classification(
            build_model("mlp", (4,), 3), torch.randn(4, 4), torch.randint(0, 3, (4,)), steps=None, epochs=1.0
        )
    )
    sender, good = net.add_node("evil"), net.add_node("good", neighbours=["evil"])
    protocol = Raising(ValueError("implausible"))
    nursery.start_soon(Driver(protocol, good, learner, VirtualCompute(1000)).run)
    await sender.send("good", Message(Fetch.KIND, {}))
    await sender.send("good", Message(Fetch.KIND, {}))
    await trio.sleep(1)
    assert protocol.messages == 2 and good.penalties["evil"] == 2  # both seen: the node went on

    bug = net.add_node("buggy", neighbours=["evil"])
    with pytest.raises(BaseExceptionGroup) as info:
        async with trio.open_nursery() as inner:
            inner.start_soon(Driver(Raising(KeyError("our bug")), bug, learner, VirtualCompute(1000)).run)
            await sender.send("buggy", Message(Fetch.KIND, {}))
            await trio.sleep(1)

    def leaves(exc):
        return (
            [e for sub in exc.exceptions for e in leaves(sub)]
            if isinstance(exc, BaseExceptionGroup)
            else [exc]
        )

    assert any(isinstance(e, KeyError) for e in leaves(info.value))  # not swallowed
