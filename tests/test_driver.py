"""The driver's keyed timers, in virtual time: a replaced or cancelled timer never fires."""

import enum
from collections.abc import Callable

import trio

from shoal.learning.protocol import Action, CancelTimer, Event, Started, StartTimer, TimerFired
from shoal.node.driver import Driver, VirtualCompute
from shoal.overlay.sim import SimNetwork


class Key(enum.Enum):
    A = "a"
    B = "b"
    C = "c"


class Scripted:
    """Answers each event with what ``script`` returns for it; records the timers that fired, and when."""

    model: dict = {}  # noqa: RUF012 (never changed)
    round = 0

    def __init__(self, script: Callable[[Event], list[Action]]):
        self.script = script
        self.fired: list[tuple[object, float]] = []

    def handle(self, event: Event, now: float) -> list[Action]:
        if isinstance(event, TimerFired):
            self.fired.append((event.key, now))
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
