"""The language-model workload (learning/language.py): the corpus split, a node's training lowering
held-out bits per byte, and a simulated swarm of them learning together."""

import csv
import functools
import json
import logging
import math
from collections import Counter

import pytest
import torch

import shoal
from shoal.learning.language import BLOCK, ByteGPT, adamw, corpus, make_task, shard, step, windows


def test_every_split_deals_the_training_text_once_and_keeps_the_held_out_text_apart():
    held, files = corpus(max_bytes=300_000)
    text = b"".join(files)
    assert held and held not in text
    by_file = [shard(files, i, 4, "files") for i in range(4)]
    assert b"".join(by_file) == text and all(by_file)  # whole files, in order, every node some
    iid = [shard(files, i, 4, "iid", seed=3) for i in range(4)]
    assert Counter(b"".join(iid)) == Counter(text) and all(len(part) >= BLOCK for part in iid)
    assert shard(files, 1, 4, "iid", seed=3) == iid[1] != shard(files, 1, 4, "iid", seed=4)
    with pytest.raises(ValueError, match="split must be one of"):
        shard(files, 0, 2, "by-topic")


def test_a_node_training_its_share_lowers_held_out_bits_per_byte():
    task = make_task(0, 2, max_bytes=300_000, width=32)
    first = task.evaluate(task.model)["bits_per_byte"]
    assert 7.5 < first < 9  # a guess among 256 bytes is 8 bits
    for r in range(5):
        metrics = task.train(task.model, r)
    assert metrics["samples"] == 20 * 16 * 64 and math.isfinite(metrics["loss"])
    assert task.evaluate(task.model)["bits_per_byte"] < 5.5
    score = task.probe(task.model)  # next-byte predictions on its own text, every position
    assert task.probe.chance.loss == pytest.approx(math.log(256)) and score.loss < task.probe.chance.loss


def test_a_task_goes_on_from_given_adamw_moments_without_changing_them():
    """A fresh Adam's first step moves every weight by about its learning rate; one that goes on from a
    pretraining run's moments moves less, and the moments handed in stay as they were."""
    _, files = corpus(max_bytes=300_000)
    torch.manual_seed(0)
    model = ByteGPT(width=16)
    pretraining = adamw(model, 3e-3)
    draw = torch.Generator().manual_seed(0)
    for _ in range(10):
        step(model, pretraining, *windows(files[0], 64, 16, draw))
    moments = pretraining.state_dict()
    kept = {k: v["exp_avg"].clone() for k, v in moments["state"].items()}
    moved = []
    for given in (None, moments):
        task = make_task(0, 2, max_bytes=300_000, width=16, steps=1, moments=given)
        task.model.load_state_dict(model.state_dict())
        start = torch.nn.utils.parameters_to_vector(task.model.parameters()).clone()
        task.train(task.model, 0)
        moved.append((torch.nn.utils.parameters_to_vector(task.model.parameters()) - start).norm().item())
    assert moved[1] < 0.9 * moved[0]
    assert all(torch.equal(moments["state"][k]["exp_avg"], v) for k, v in kept.items())


@pytest.mark.slow
def test_a_simulated_swarm_of_language_models_learns_together():
    torch.set_num_threads(1)
    make = functools.partial(make_task, max_bytes=300_000, width=32, split="files")
    result = shoal.simulate(make, nodes=6, duration=40, progress=None, seed=1)
    first, final = result.rows[0].metrics, result.final.metrics
    assert first["bits_per_byte_mean"] > 7.5
    assert final["bits_per_byte_max"] < 5.0, final


@pytest.mark.slow
def test_the_language_scenario_compares_every_arm_at_equal_compute(tmp_path):
    """A small run of simulations/language.py: every arm learns; fewer exchanges and compression cut
    bytes; MoDeST goes on after half its nodes crash."""
    from shoal.simulations import language

    small = "--nodes 6 --steps 20 --inner 4 --warmup 10 --lm-width 16 --lm-max-bytes 200000"
    small += " --modest-sample-size 2 --target 7.5 --fragments 2"
    quiet = logging.getLogger("shoal.learner")  # the scenario quiets it (report.prepare): for this run only
    level = quiet.level
    try:
        language.main([*small.split(), "--evals", "4", "--out", str(tmp_path), "--quiet"])
    finally:
        quiet.setLevel(level)
    results = json.loads((tmp_path / "summary.json").read_text())["results"]
    assert list(results) == list(language.ARMS)
    for arm, r in results.items():
        assert r["final_bits_per_byte"] is not None and r["final_bits_per_byte"] < 7.5, (arm, r)
        assert r["bytes_to_target"] is not None, (arm, r)
    sent = {arm: r["bytes_sent"] for arm, r in results.items()}
    assert sent["diloco"] < sent["dpsgd"] / 3 and sent["diloco-topk"] < sent["diloco"] / 4, sent
    # streaming: the same bytes in all, half of them at a time (two parts, each every --inner steps)
    at_once = {arm: r["bytes_per_round_per_node"] for arm, r in results.items()}
    for arm in ("streaming", "streaming-overlap"):
        assert 0.5 < sent[arm] / sent["diloco-topk"] < 1.5, sent
        assert 0.3 < at_once[arm] / at_once["diloco-topk"] < 0.7, at_once
    assert results["modest-crash"]["final_alive"] == 3
    with open(tmp_path / "rounds.csv") as f:
        assert "steps" in next(csv.reader(f))
