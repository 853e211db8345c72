"""Attack behaviours and the transfer set-up the Byzantine simulations use."""

import random

import pytest
import torch

from shoal.learning.attacks import Forging, flip_labels, forge
from shoal.learning.datasets import load_dataset
from shoal.learning.gossip import Gossip, GossipConfig
from shoal.learning.integrators import Mean
from shoal.learning.messages import Fetch, GossipModel
from shoal.learning.pretrain import extract, extractor_bytes, load_extractor, pretrain_extractor
from shoal.learning.protocol import MessageIn, PeerUp, Send, Started, Trained
from shoal.overlay.atomic import write_atomic


def model(v):
    return {"w": torch.full((2, 2), float(v))}


def test_forging_replaces_every_sent_model_and_nothing_else():
    inner = Gossip(model(1), 5, Mean(), GossipConfig(fanout=2, period=0.0), random.Random(0))
    attacker = Forging(inner, forge("sign-flip", random.Random(0)))
    for p in ("a", "b"):
        attacker.handle(PeerUp(p), 0.0)
    attacker.handle(Started(), 0.0)
    attacker.handle(MessageIn("a", GossipModel(0, 1, model(3))), 0.1)
    actions = attacker.handle(Trained(0, model(2)), 1.0)
    sends = [a for a in actions if isinstance(a, Send)]
    assert len(sends) == 2 and all(torch.equal(s.message.state["w"], model(-8)["w"]) for s in sends)
    assert torch.equal(attacker.model["w"], model(2.5)["w"])  # it still integrates honestly for itself
    (fetch_reply,) = attacker.handle(MessageIn("b", Fetch()), 1.1)
    assert fetch_reply.message.reply and torch.equal(fetch_reply.message.state["w"], -4 * attacker.model["w"])


def test_alie_sits_a_little_below_the_honest_mean_and_noise_is_random():
    seen = [model(1), model(3)]
    alie = forge("alie", random.Random(0))(model(100), seen)
    expected = 2.0 - torch.tensor([1.0, 3.0]).std()
    assert torch.allclose(alie["w"], torch.full((2, 2), expected.item()))
    assert forge("alie", random.Random(0))(model(7), seen[:1])["w"][0, 0] == 7  # needs two to estimate
    noise = forge("noise", random.Random(0))
    a, b = noise({"w": torch.randn(50, 50)}, []), noise({"w": torch.randn(50, 50)}, [])
    assert not torch.equal(a["w"], b["w"]) and 0.8 < a["w"].std() < 1.2
    assert forge("label-flip", random.Random(0)) is None
    assert flip_labels(torch.tensor([0, 4, 9]), 10).tolist() == [1, 5, 0]
    with pytest.raises(ValueError, match="unknown attack"):
        forge("charm", random.Random(0))


def test_extractor_round_trips_through_safetensors(tmp_path):
    data = load_dataset("digits", seed=0)
    features, accuracy = pretrain_extractor(data.x_train[:300], data.y_train[:300], 10, epochs=3)
    assert accuracy > 0.5 and not any(p.requires_grad for p in features.parameters())
    write_atomic(tmp_path / "f.safetensors", extractor_bytes(features))
    again = load_extractor(tmp_path / "f.safetensors", data.input_shape)
    assert torch.equal(extract(features, data.x_test), extract(again, data.x_test))
    assert extract(again, data.x_test).shape == (len(data.x_test), 128)
