"""The penalty policy without a loop: what bans, what never does, when bans end, how much gets logged."""

import logging

import pytest

from shoal.overlay.penalties import Penalties, RateLimit


def test_wrong_input_bans_at_max_penalty_and_the_ban_ends():
    policy = Penalties(max_penalty=3, ban_duration=10.0)
    assert not policy.reject("a", "malformed frame", "bad magic", now=0.0)
    assert not policy.reject("a", "malformed frame", "bad magic", now=1.0)
    assert policy.reject("a", "flood", "too many streams", now=2.0)  # the third: banned now
    assert policy.banned("a", 2.0) and policy.penalty("a") == 3
    assert not policy.reject("a", "flood", "more", now=3.0)  # already banned: not banned twice
    assert policy.tick(11.9) == [] and policy.banned("a", 11.9)
    assert policy.tick(12.0) == ["a"]
    assert not policy.banned("a", 12.0) and policy.penalty("a") == 0  # a fresh start
    assert policy.rejected == 4 and [r.kind for r in policy.rejections][-1] == "flood"


def test_slow_or_gone_input_never_bans():
    policy = Penalties(max_penalty=2, ban_duration=10.0)
    for i in range(100):
        assert not policy.reject("a", "slow", "under 64 KiB/s", now=float(i) / 10, wrong=False)
    assert not policy.banned("a", 10.0)
    assert policy.penalty("a") == 0 and policy.slow("a") == 100 and policy.rejected == 100


def test_penalties_are_forgotten_after_a_clean_ban_duration():
    policy = Penalties(max_penalty=2, ban_duration=10.0)
    policy.reject("a", "malformed message", "x", now=0.0)
    assert not policy.reject("a", "malformed message", "x", now=10.0)  # the first one has decayed
    assert policy.penalty("a") == 1
    policy.tick(25.0)
    assert policy.counts() == {}  # nor is any state kept for a peer that went quiet


def test_log_lines_are_bounded_and_the_rest_summarised(caplog):
    """10,000 rejections from 200 identities in 3 intervals: a bounded number of lines, all counted."""
    policy = Penalties(max_penalty=5, ban_duration=1000.0, log_interval=60.0, log_lines=20)
    with caplog.at_level(logging.INFO, logger="shoal.overlay.penalties"):
        for i in range(10_000):
            policy.reject(f"p{i % 200}", "flood" if i % 2 else "malformed model", "reason", now=i * 0.018)
        policy.tick(200.0)
    lines = [r.getMessage() for r in caplog.records]
    summaries = [line for line in lines if "more inputs" in line]
    assert len(lines) <= 4 * (20 + 1), len(lines)
    assert 3 <= len(summaries) <= 4
    assert "flood" in summaries[0] and "malformed model" in summaries[0] and "more peers" in summaries[0]
    shown = sum(1 for line in lines if line.startswith("rejected input from"))
    summarised = sum(int(line.split()[1]) for line in summaries)
    assert shown + summarised == 10_000
    assert policy.rejected == 10_000 and len(policy.rejections) == 100


def test_first_rejection_per_peer_and_kind_is_logged_with_its_reason(caplog):
    policy = Penalties(max_penalty=100, ban_duration=1000.0)
    with caplog.at_level(logging.WARNING, logger="shoal.overlay.penalties"):
        policy.reject("a", "malformed frame", "not a Shoal frame", now=0.0)
        policy.reject("a", "malformed frame", "not a Shoal frame", now=1.0)
        policy.reject("a", "flood", "streams faster than 20/s", now=2.0)
        policy.reject("a", "flood", "streams faster than 20/s", now=3.0)
        policy.tick(61.0)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "not a Shoal frame" in lines[0] and "streams faster" in lines[1]
    assert lines[2].startswith("rejected 2 more inputs in the last 61 s: a: ")


def test_rate_limit_allows_the_burst_then_the_rate():
    limit = RateLimit(rate=20.0, burst=50)
    assert sum(limit.allow("a", 0.0) for _ in range(100)) == 50
    assert sum(limit.allow("a", 1.0) for _ in range(100)) == 20  # refilled at 20/s
    assert limit.allow("b", 1.0)  # per peer
    limit.forget_idle(1.0)
    assert set(limit._buckets) == {"a", "b"}
    limit.forget_idle(10.0)
    assert limit._buckets == {}  # refilled buckets are dropped: sybils leave nothing behind


@pytest.mark.parametrize(
    "kwargs", [{"max_penalty": 0, "ban_duration": 1.0}, {"max_penalty": 1, "ban_duration": 0.0}]
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        Penalties(**kwargs)
