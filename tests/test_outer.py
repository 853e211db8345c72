"""DiLoCo's outer step (learning/outer.py): torch's Nesterov SGD on start − averaged, inside gossip's
round, and its momentum through a checkpoint."""

import random

import pytest
import torch

from shoal.learning.gossip import Gossip, GossipConfig
from shoal.learning.integrators import Mean
from shoal.learning.messages import GossipModel
from shoal.learning.models import ParameterLayout
from shoal.learning.outer import Outer, OuterConfig, partition
from shoal.learning.protocol import MessageIn, PeerUp, Rejected, RoundDone, Send, Started, Train, Trained
from shoal.learning.settings import ProtocolSettings
from shoal.node import checkpoint


def states(seed: int, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(4, 3, generator=g), "steps": torch.tensor(i)} for i in range(n)]


def test_plain_averaging_takes_the_integrated_model_itself_and_keeps_no_momentum():
    start, averaged = states(0, 2)
    outer = Outer(OuterConfig(), momentum={"w": torch.ones(4, 3)})  # a DiLoCo run's checkpoint
    assert outer.step(start, averaged) is averaged and outer.momentum == {}


def test_the_outer_step_is_torch_sgd_with_nesterov_momentum_on_the_pseudo_gradient():
    config = OuterConfig(lr=0.7, momentum=0.9)
    outer = Outer(config)
    param = torch.nn.Parameter(states(1, 1)[0]["w"].clone())
    sgd = torch.optim.SGD([param], lr=config.lr, momentum=config.momentum, nesterov=True)
    model = {"w": param.detach().clone(), "steps": torch.tensor(0)}
    for averaged in states(2, 5):
        param.grad = param.detach() - averaged["w"]  # the pseudo-gradient: start - averaged
        sgd.step()
        model = outer.step(model, averaged)
        torch.testing.assert_close(model["w"], param.detach(), rtol=0, atol=1e-6)
        assert model["steps"] is averaged["steps"]  # counters are taken as averaged
    assert outer.momentum["w"].shape == (4, 3) and "steps" not in outer.momentum


def test_gossip_steps_from_where_its_round_began_towards_the_integrated_model():
    config = OuterConfig(lr=0.5, momentum=0.0)
    g = Gossip(
        {"w": torch.zeros(3)},
        10,
        Mean(),
        GossipConfig(fanout=None, period=0.0, max_norm_ratio=1e9),
        random.Random(0),
        outer=Outer(config),
    )
    g.handle(PeerUp("p"), 0.0)
    g.handle(Started(), 0.0)
    g.handle(MessageIn("p", GossipModel(0, 10, {"w": torch.full((3,), 4.0)})), 0.1)
    g.handle(Trained(0, {"w": torch.full((3,), 2.0)}), 0.2)  # integrated: mean(2, 4) = 3
    torch.testing.assert_close(g.model["w"], torch.full((3,), 1.5))  # 0 - 0.5 * (0 - 3)


def test_the_momentum_rides_in_the_checkpoint_and_old_checkpoints_have_none(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    model = {"w": torch.ones(3), "steps": torch.tensor(4)}
    checkpoint.save(path, checkpoint.Checkpoint(model, 7, "t", {"w": torch.full((3,), 0.25)}))
    saved = checkpoint.load(path, "t")
    assert saved.state.keys() == model.keys() and saved.round == 7
    torch.testing.assert_close(saved.momentum, {"w": torch.full((3,), 0.25)})
    checkpoint.save(path, checkpoint.Checkpoint(model, 8, "t"))
    assert checkpoint.load(path, "t").momentum == {}


@pytest.mark.parametrize(
    "bad",
    [
        {"lr": 0.0},
        {"lr": float("nan")},
        {"momentum": 1.0},
        {"momentum": -0.1},
        {"fragments": 0},
    ],
)
def test_outer_settings_out_of_range_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        OuterConfig(**bad)


@pytest.mark.parametrize(
    "momentum",
    [{"w": torch.full((3,), float("nan"))}, {"w": torch.ones(3, dtype=torch.float64)}, {"v": torch.ones(3)}],
)
def test_a_checkpoint_whose_momentum_does_not_fit_the_model_is_refused(tmp_path, momentum):
    path = tmp_path / "checkpoint.safetensors"
    checkpoint.save(path, checkpoint.Checkpoint({"w": torch.ones(3)}, 1, "t", momentum))
    layout = ParameterLayout(("w",), ((3,),), (torch.float32,))
    with pytest.raises(checkpoint.CheckpointError, match="does not fit the model"):
        checkpoint.load(path, "t", layout)


def test_the_model_is_cut_into_consecutive_parts_of_about_equal_size_none_empty():
    model = {n: torch.zeros(k) for n, k in (("a", 100), ("b", 5), ("c", 50), ("d", 50), ("e", 1))}
    assert partition(model, 1) == [("a", "b", "c", "d", "e")]
    assert partition(model, 2) == [("a", "b"), ("c", "d", "e")]
    assert partition(model, 5) == [("a",), ("b",), ("c",), ("d",), ("e",)]
    with pytest.raises(ValueError, match="6 fragments"):
        partition(model, 6)


def streaming(**outer) -> Gossip:
    """A synchronous node holding w = 0 and b = 0 (two parts: w and b), with one neighbour p."""
    config = GossipConfig(synchronous=True, period=0.0, max_norm_ratio=1e9)
    g = Gossip(
        {"w": torch.zeros(4), "b": torch.zeros(2)},
        10,
        Mean(),
        config,
        random.Random(0),
        outer=Outer(OuterConfig(**outer)),
    )
    g.handle(PeerUp("p"), 0.0)
    g.handle(Started(), 0.0)
    return g


def full(value: float, n: int) -> torch.Tensor:
    return torch.full((n,), value)


def test_fragments_are_exchanged_in_turn_each_stepping_from_where_its_last_step_ended():
    g = streaming(fragments=2, lr=0.5)
    out = g.handle(Trained(0, {"w": full(2.0, 4), "b": full(2.0, 2)}), 0.1)
    assert [a.message.state.keys() for a in out if isinstance(a, Send)] == [{"w"}]  # round 0: part w only
    wrong = g.handle(MessageIn("p", GossipModel(0, 10, {"b": full(4.0, 2)})), 0.2)  # another part's names
    assert isinstance(wrong[0], Rejected) and wrong[0].blame
    g.handle(MessageIn("p", GossipModel(0, 10, {"w": full(4.0, 4)})), 0.3)
    torch.testing.assert_close(g.model["w"], full(1.5, 4))  # 0 - 0.5 * (0 - mean(2, 4))
    assert torch.equal(g.model["b"], torch.zeros(2))  # its model: b as its last outer step left it
    out = g.handle(Trained(1, {"w": full(5.0, 4), "b": full(6.0, 2)}), 0.4)
    assert [a.message.state.keys() for a in out if isinstance(a, Send)] == [{"b"}]
    g.handle(MessageIn("p", GossipModel(1, 10, {"b": full(8.0, 2)})), 0.5)
    torch.testing.assert_close(g.model["b"], full(3.5, 2))  # from b's origin, 0: 0 - 0.5 * (0 - 7)
    torch.testing.assert_close(g.model["w"], full(1.5, 4))
    g.handle(Trained(2, {"w": full(7.0, 4), "b": full(6.0, 2)}), 0.6)  # round 2: w's turn again
    g.handle(MessageIn("p", GossipModel(2, 10, {"w": full(9.0, 4)})), 0.7)
    torch.testing.assert_close(g.model["w"], full(4.75, 4))  # from where w last stepped: 1.5 - 0.5 (1.5 - 8)


def test_with_overlap_an_exchange_is_integrated_a_round_late_and_lands_on_what_trained_since():
    g = streaming(overlap=True)
    out = g.handle(Trained(0, {"w": full(2.0, 4), "b": full(2.0, 2)}), 0.1)
    assert RoundDone(1) in out and isinstance(out[-1], Train)  # round 1 trains while round 0's travels
    assert g.handle(MessageIn("p", GossipModel(0, 10, {"w": full(4.0, 4), "b": full(4.0, 2)})), 0.2) == []
    out = g.handle(Trained(1, {"w": full(6.0, 4), "b": full(6.0, 2)}), 0.3)  # round 0's is all in
    assert RoundDone(2) in out and isinstance(out[-1], Train)
    torch.testing.assert_close(out[-1].state["w"], full(7.0, 4))  # trains on mean(2, 4) + (6 - 2)
    torch.testing.assert_close(g.model["w"], full(3.0, 4))  # its model (evaluated, served) is the outer one
    assert g.handle(MessageIn("p", GossipModel(0, 10, {"w": full(9.0, 4), "b": full(9.0, 2)})), 0.4) == []


def test_streaming_needs_synchronous_gossip():
    with pytest.raises(ValueError, match="synchronous"):
        ProtocolSettings(outer=OuterConfig(fragments=2))
