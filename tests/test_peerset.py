"""The peer set's policy (overlay/peerset.py) on given times and addresses: who is admitted, who goes."""

import math
import random

import pytest

from shoal.overlay.peerset import NEUTRAL, REJOIN, SETTLE, PeerSet, group_of, ip_of


def policy(**kw) -> PeerSet:
    return PeerSet(**{"high": 8, "outbound": 2, "per_ip": 0, "rng": random.Random(1), **kw})


def fill(ps: PeerSet, names, *, at: float, outbound=False, ip=None) -> list[str]:
    """Admit each of ``names``; returns the refused ones."""
    refused = []
    for name in names:
        reason, displaced = ps.admit(name, outbound=outbound, ip=ip, now=at)
        assert not displaced or reason is None or name not in displaced
        if reason is not None:
            refused.append(name)
    return refused


def test_a_wave_of_fresh_inbound_identities_never_displaces_settled_peers_and_the_set_stays_bounded():
    ps = policy()
    fill(ps, ["h1", "h2", "h3"], at=0.0)
    now = SETTLE + 10
    sybils = [f"s{i}" for i in range(50)]
    refused = fill(ps, sybils, at=now)
    assert {"h1", "h2", "h3"} <= set(ps.slots) and len(ps.slots) == 8
    assert len(refused) == 45  # the first five took the free slots; later ones met a full set
    # and later sybils are refused rather than displacing the earlier ones (test-before-evict)
    assert set(ps.slots) == {"h1", "h2", "h3", "s0", "s1", "s2", "s3", "s4"}


def test_a_long_lived_peer_whose_connection_dropped_keeps_its_age_if_back_soon():
    """While it was away a newcomer took its slot: back within REJOIN it is the elder and the newcomer
    goes; back later, or never long-lived, it is a newcomer itself."""
    ps = policy(high=3, outbound=0)
    fill(ps, ["h1", "h2", "h3"], at=0.0)
    now = SETTLE + 1
    ps.remove("h1", now)
    fill(ps, ["s1"], at=now)
    assert ps.admit("h1", outbound=False, ip=None, now=now + 5) == (None, ["s1"])
    assert ps.slots["h1"].since == 0.0
    ps.remove("h2", now + 5)
    fill(ps, ["s2"], at=now + 5)
    assert fill(ps, ["h2"], at=now + 5 + REJOIN) == ["h2"]  # too late: the newest, refused
    ps.remove("s2", now + 10)  # held 5 s: not long-lived
    assert fill(ps, ["s2"], at=now + 11) == [] and ps.slots["s2"].since == now + 11


def test_before_settling_the_newest_inbound_goes_first_and_old_ones_stay():
    ps = policy(high=3)
    fill(ps, ["a"], at=0.0)
    fill(ps, ["b"], at=1.0)
    fill(ps, ["c"], at=2.0)
    reason, displaced = ps.admit("d", outbound=False, ip=None, now=3.0)
    assert reason is not None and displaced == [] and set(ps.slots) == {"a", "b", "c"}


def test_outbound_slots_cannot_be_taken_by_inbound_newcomers_even_when_young():
    ps = policy(high=4, outbound=2)
    fill(ps, ["i1", "i2"], at=0.0)  # old inbound, but not settled yet at t=10
    fill(ps, ["o1", "o2"], at=9.0, outbound=True)
    ps.credit("i1", 0.0, 9.0)  # inbound with refused models: the first to go
    for n in range(20):
        ps.admit(f"new{n}", outbound=False, ip=None, now=10.0 + n)
    assert {"o1", "o2"} <= set(ps.slots) and len(ps.slots) == 4
    assert "i1" not in ps.slots  # displaced by a neutral newcomer: lower score goes first
    assert ps.outbound_wanted() == 0


def test_outbound_beyond_the_quota_goes_after_inbound():
    ps = policy(high=3, outbound=1)
    fill(ps, ["o1", "o2"], at=0.0, outbound=True)
    fill(ps, ["i1"], at=0.0)
    reason, displaced = ps.admit("o3", outbound=True, ip=None, now=1.0)
    assert reason is None and displaced == ["i1"]  # inbound first, whatever its age
    reason, displaced = ps.admit("o4", outbound=True, ip=None, now=2.0)
    assert reason is not None or displaced  # among outbound beyond the quota, the newest goes
    assert "o1" in ps.slots and len(ps.slots) == 3


def test_per_ip_limit_refuses_newcomers_beyond_it_with_loopback_and_relayed_peers_exempt():
    ps = policy(high=32, per_ip=2)
    assert fill(ps, ["a", "b", "c"], at=0.0, ip="203.0.113.5") == ["c"]
    assert fill(ps, ["d"], at=0.0, ip="203.0.113.6") == []  # another IP of the same /16: fine
    assert fill(ps, [f"l{i}" for i in range(10)], at=0.0, ip=ip_of("127.0.0.1")) == []
    assert fill(ps, [f"r{i}" for i in range(10)], at=0.0, ip=None) == []  # relayed: IP unknown
    ps.remove("a", 1.0)
    assert fill(ps, ["c"], at=1.0, ip="203.0.113.5") == []  # room again once one left
    assert ip_of("127.0.0.1") is None and ip_of("::1") is None and ip_of("::ffff:10.0.0.1") == "10.0.0.1"
    assert group_of("203.0.113.5") == "203.0.0.0/16" and group_of("2001:db8::1") == "2001:db8::/32"


def test_the_most_crowded_range_loses_first_among_equals():
    ps = policy(high=4, outbound=0)
    fill(ps, ["x1", "x2"], at=0.0, ip="198.51.7.1")
    fill(ps, ["x3"], at=0.0, ip="198.51.8.1")  # same /16 as x1, x2
    fill(ps, ["y1"], at=0.0, ip="192.0.2.1")
    reason, displaced = ps.admit("z", outbound=False, ip="10.1.2.3", now=0.0)
    assert reason is None and displaced[0].startswith("x")


def test_credit_is_a_bounded_moving_average_and_unscored_peers_are_neutral():
    ps = policy(alpha=0.5, max_scores=3, half_life=1e9)
    assert ps.score("p", 0.0) == NEUTRAL and not ps.scored("p")
    ps.credit("p", 1.0, 0.0)  # from neutral
    assert ps.score("p", 0.0) == pytest.approx(0.75)
    ps.credit("p", 0.0, 1.0)
    assert ps.score("p", 1.0) == pytest.approx(0.375)
    ps.credit("p", 7.0, 2.0)  # clamped to 1
    assert ps.score("p", 2.0) == pytest.approx(0.6875)
    ps.credit("q", math.nan, 3.0)  # NaN counts as refused
    assert ps.score("q", 3.0) == pytest.approx(0.25)
    fill(ps, ["p"], at=0.0)  # a peer we hold keeps its score when room is made
    ps.credit("r", 1.0, 4.0)
    ps.credit("s", 1.0, 5.0)
    assert ps.scored("p") and not ps.scored("q") and ps.scored("r") and ps.scored("s")
    # without verdicts a score drifts back to neutral, half way per half-life
    ps = policy(half_life=100.0, alpha=1.0)
    ps.credit("p", 0.0, 0.0)
    assert ps.score("p", 100.0) == pytest.approx(0.25) and ps.score("p", 1e6) == pytest.approx(NEUTRAL)


def test_useful_peers_are_protected_and_peers_whose_models_were_refused_go_first():
    ps = policy(high=6, outbound=1, useful=1)  # long-lived: up to 6 // 2 protected in all
    fill(ps, ["old"], at=0.0)
    fill(ps, ["out"], at=0.0, outbound=True)
    fill(ps, ["good"], at=SETTLE)
    ps.credit("good", 1.0, SETTLE)
    now = SETTLE + 1
    assert ps.protected(now) == {"out", "good", "old"}
    fill(ps, ["s1", "s2", "s3"], at=now)
    for _ in range(10):
        for peer in ("old", "out", "s1"):
            ps.credit(peer, 0.0, now)  # refused by the learner: an attacker's, or honest ones it misjudges
    # protections stay (a learner's verdicts on honest peers can be wrong), but among the others the
    # refused one goes first, before neutral newcomers
    assert ps.protected(now) == {"out", "good", "old"} and ps.outbound_wanted() == 0
    reason, displaced = ps.admit("n1", outbound=False, ip=None, now=now)
    assert reason is None and displaced == ["s1"]
    reason, displaced = ps.admit("n2", outbound=False, ip=None, now=now)
    assert reason is not None and displaced == []  # then neutral incumbents stay


def test_protection_never_covers_more_than_high_peers():
    ps = policy(high=3, outbound=3, useful=3)
    fill(ps, ["o1", "o2", "o3"], at=0.0, outbound=True)
    assert len(ps.protected(SETTLE)) == 3
    reason, _ = ps.admit("o4", outbound=True, ip=None, now=SETTLE)
    assert reason is not None and len(ps.slots) == 3


def test_choose_spreads_dials_over_ranges_and_prefers_useful_and_long_known_members():
    ps = policy(high=32, per_ip=2)
    fill(ps, ["held1", "held2"], at=0.0, ip="203.0.113.9")
    sybils = {f"s{i}": f"198.51.{i}.1" for i in range(20)}  # one /16
    honest = {"h1": "192.0.2.1", "h2": "10.9.0.1"}
    candidates = {**sybils, **honest, "full": "203.0.113.9"}  # its IP is at the limit
    chosen = ps.choose(candidates, 3, now=0.0)
    assert set(chosen) >= {"h1", "h2"} and "full" not in chosen
    assert sum(c in sybils for c in chosen) == 1

    # on one address (loopback: no range to spread over), members known for long come first, then
    # new ones; peers that were useful before come before both; those mostly refused come last
    ps = policy(high=32)
    ps.seen(["old1", "old2"], now=0.0)
    ps.seen([f"new{i}" for i in range(30)], now=SETTLE)
    ps.credit("useful", 1.0, 0.0)
    for _ in range(5):
        ps.credit("bad", 0.0, 0.0)
    loopback = dict.fromkeys(["old1", "old2", "useful", "bad", *(f"new{i}" for i in range(30))])
    chosen = ps.choose(loopback, 3, now=SETTLE + 1)
    assert chosen[0] == "useful" and set(chosen[1:]) == {"old1", "old2"}
    assert ps.choose(loopback, 40, now=SETTLE + 1)[-1] == "bad"  # dialled last, not never


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        PeerSet(high=0, outbound=0, per_ip=0)
    with pytest.raises(ValueError):
        PeerSet(high=4, outbound=1, per_ip=0, alpha=0.0)
