"""The phi-accrual failure detector as a plain object: verdicts from given times, no network; and the
ping policy of its monitor."""

import time

import pytest
import trio
import trio.testing
from libp2p.crypto.ed25519 import create_new_key_pair

from shoal.overlay import connections
from shoal.overlay.identity import peer_id
from shoal.overlay.liveness import Liveness, PhiAccrual, phi


def detector(**kw) -> PhiAccrual:
    return PhiAccrual(**{"interval": 2.0, "suspect": 3.0, "down": 8.0, "pause": 10.0, **kw})


def beating(d: PhiAccrual, peer: str, times: list[float]) -> None:
    d.watch(peer, times[0])
    for t in times:
        d.heartbeat(peer, t)


def test_phi_grows_with_silence_and_stays_finite():
    values = [phi(t, 2.0, 0.5) for t in (0, 1, 2, 3, 4, 6, 100, 1e9)]
    assert values == sorted(values) and values[0] < 0.01 and 0.2 < values[2] < 0.4
    assert values[-1] < 200  # clamped: no overflow for any silence
    assert phi(-1e9, 2.0, 0.5) >= 0


def test_a_silent_peer_is_suspected_first_and_down_only_past_the_pause():
    d = detector()
    beating(d, "a", [0, 2, 4, 6, 8])
    assert d.judge(12) == ([], [], [])
    assert d.judge(14) == (["a"], [], [])  # 6 s of silence: suspected (phi >= 3)
    assert d.judge(15) == ([], [], [])  # reported once
    assert d.judge(24) == ([], [], []) and "a" in d.suspected  # 16 s: still inside the pause
    assert d.judge(26) == ([], [], ["a"])  # 18 s: down, and forgotten
    assert "a" not in d.suspected and d.judge(100) == ([], [], [])


def test_any_traffic_clears_a_suspicion():
    d = detector()
    beating(d, "a", [0, 2, 4])
    assert d.judge(10) == (["a"], [], [])
    d.heard("a", 10.5)
    assert d.judge(11) == ([], ["a"], [])


def test_a_peer_with_irregular_gaps_is_judged_by_them():
    steady, jittery = detector(), detector()
    beating(steady, "a", [0, 2, 4, 6, 8, 10, 12])
    beating(jittery, "a", [0, 1, 5, 6, 10, 11, 15])  # a starved process: gaps of 1 and 4 s
    assert steady.phi("a", 12 + 6) > 3 > jittery.phi("a", 15 + 6)


def test_our_own_stall_blames_nobody():
    d = detector()
    beating(d, "a", [0, 2, 4])
    d.stalled(30)  # our loop was stopped from t=4 to t=34
    assert d.judge(35) == ([], [], [])


def test_state_is_only_kept_for_watched_peers():
    d = detector()
    d.heard("stranger", 1.0)
    d.heartbeat("stranger", 1.0)
    assert d.judge(1000) == ([], [], [])
    beating(d, "a", [0, 2])
    d.forget("a")
    assert d.judge(1000) == ([], [], [])


def test_a_moment_heard_twice_is_one_heartbeat():
    """A skipped ping's heartbeat is the moment the peer was last heard: the same moment again, or an
    earlier one, adds no gap of 0 that would make the detector think the peer answers instantly."""
    once, twice = detector(), detector()
    for d in (once, twice):
        beating(d, "a", [0, 2, 4])
    for t in (4, 4, 3):
        twice.heartbeat("a", t)
    assert twice.judge(9) == once.judge(9) and twice.phi("a", 9) == once.phi("a", 9)


@pytest.mark.parametrize("kw", [{"suspect": 8.0}, {"suspect": 0.0}, {"pause": -1.0}, {"interval": 0.0}])
def test_bad_thresholds_are_refused(kw):
    with pytest.raises(ValueError):
        detector(**kw)


def test_a_peer_heard_within_the_interval_is_not_pinged(monkeypatch):
    """The policy only: a peer whose connection keeps receiving is not pinged, a quiet one is, and
    suspected (the pings and the reading loop's clock are tested over real hosts in test_p2p.py)."""
    chatty, quiet = (peer_id(create_new_key_pair()) for _ in range(2))
    pinged: list[str] = []

    async def ping(host: object, peer: object) -> None:  # never answered
        pinged.append(str(peer))

    def last_read(host: object, peer: object) -> float | None:
        return trio.current_time() if str(peer) == chatty else None

    monkeypatch.setattr(connections, "ping_connections", ping)
    monkeypatch.setattr(connections, "last_read", last_read)

    class Peers:
        def peers(self) -> list[str]:
            return [chatty, quiet]

    monitor = Liveness(None, interval=2.0, timeout=1.0, suspect=3.0, down=8.0, pause=30.0, peers=Peers())

    async def main() -> None:
        with trio.move_on_after(10):
            await monitor.run()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert pinged.count(quiet) >= 2 and chatty not in pinged
    assert monitor.status()["suspected"] == [quiet] and monitor.status()["down"] == 0


def test_our_loops_lag_is_how_late_its_rounds_wake():
    """What /status shows as loop_lag_s: near zero on an idle loop, the hold's length past the interval
    on a loop that a computation holds for 0.5 s at a time (as many daemons on few cores do)."""

    class NoPeers:
        def peers(self) -> list[str]:
            return []

    async def lag(held: bool) -> float:
        monitor = Liveness(
            None, interval=0.1, timeout=1.0, suspect=3.0, down=8.0, pause=30.0, peers=NoPeers()
        )

        async def hold() -> None:
            while True:
                time.sleep(0.5)  # the loop is not ours meanwhile
                await trio.sleep(0)

        with trio.move_on_after(2):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(monitor.run)
                if held:
                    nursery.start_soon(hold)
        return monitor.status()["loop_lag_s"]

    assert trio.run(lag, True) >= 0.3
    assert trio.run(lag, False) < 0.1
