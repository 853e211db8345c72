"""The public API, `import shoal`: the README's example as written, the examples/ scripts, the user's
own loop, and user code that fails (it must not crash the node nor reach its peers)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trio

import shoal
from shoal.learning.anchor import Anchor
from shoal.learning.learner import Learner
from shoal.node.library import UserLoop

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def readme_example() -> str:
    """The first Python block of the README's "Python API" section."""
    section = (ROOT / "README.md").read_text().split("\n## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run(args: list[str], cwd: Path, timeout: float) -> str:
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_the_readme_example_runs_as_written(tmp_path):
    code = readme_example()
    assert len(code.strip().splitlines()) <= 15, code
    accuracy = float(run(["-c", code], tmp_path, 300).split()[-1])
    assert accuracy >= 0.85  # what the README says it prints


@pytest.mark.slow
@pytest.mark.parametrize(
    "script", ["cnn_adamw.py", "own_loop.py"], ids=["callbacks-3-daemons", "own-loop-2-daemons"]
)
def test_an_example_swarm_of_daemons_reaches_its_accuracy(tmp_path, script):
    out = run([str(EXAMPLES / script), "--timeout", "150"], tmp_path, 240)
    assert "reached 90% mean test accuracy" in out
    if script == "own_loop.py":  # the loops' models did travel
        received = re.search(r"received from the other: \[(\d+), (\d+)\]", out).groups()
        assert min(int(r) for r in received) > 0, out


@pytest.mark.slow
def test_the_same_task_runs_unchanged_on_50_simulated_nodes_with_churn(tmp_path):
    out = run([str(EXAMPLES / "simulate_cnn.py"), "--duration", "20", "--out", "run"], tmp_path, 300)
    alive, accuracy = re.search(r"(\d+) live nodes at 20 s: mean accuracy ([\d.]+)", out).groups()
    assert int(alive) < 50 and float(accuracy) >= 0.75, out
    header = (tmp_path / "run" / "rounds.csv").read_text().splitlines()[0].split(",")
    assert {"accuracy_mean", "loss_max"} <= set(header)  # the task's own metrics


# --- user code that fails --------------------------------------------------------------------


def failing(how: str) -> shoal.Task:
    def train(model: torch.nn.Module, round: int) -> None:
        if how == "raises":
            raise RuntimeError("a bug in the user's loop")
        with torch.no_grad():
            if how == "nan":
                model.weight.fill_(float("nan"))
            elif how == "reshapes":
                model.weight = torch.nn.Parameter(torch.zeros(5, 4))
            elif how == "casts":
                model.double()

    return shoal.Task(torch.nn.Linear(4, 3), train)


@pytest.mark.parametrize("how", ["raises", "nan", "reshapes", "casts"])
def test_failed_training_keeps_the_model_it_started_from_and_says_why(how):
    learner = Learner(failing(how))
    start = learner.initial_state()
    state, _ = learner.train(start, round=3)
    assert state is start
    assert learner.error.startswith("round 3: ")
    expected = {
        "raises": "a bug in the user's loop",
        "nan": "non-finite",
        "reshapes": "changed",
        "casts": "changed",
    }
    assert expected[how] in learner.error
    if how == "raises":
        assert "Traceback" in learner.error  # the user's own, to find the bug


def test_a_bad_task_path_fails_in_one_line(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "shoal.node.cli",
            "run",
            "--home",
            str(tmp_path),
            "--task",
            "nowhere.at_all:task",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 4
    assert done.stderr.strip().splitlines() == [
        "shoal: error: task 'nowhere.at_all:task': cannot import 'nowhere.at_all' (No module named 'nowhere')"
    ]


@pytest.mark.slow
def test_a_node_whose_training_raises_goes_on_and_says_so_in_status(tmp_path):
    """Beside a healthy node: the failing one keeps rounds going on its last good model, reports the
    error, and its peer holds nothing against it (its models are the good ones it kept)."""
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    good = shoal.classification(torch.nn.Linear(4, 3), x, y, test=(x, y))
    with (
        shoal.Node(good, home=tmp_path / "good", gossip_period=0.2) as a,
        shoal.Node(failing("raises"), home=tmp_path / "bad", bootstrap=a.addresses, gossip_period=0.2) as b,
    ):
        assert b.wait(round=5, timeout=60) and a.wait(round=5, timeout=60)
        status = b.status()
        assert "a bug in the user's loop" in status["training_error"]
        assert status["round"] >= 5 and a.status()["penalties"] == {}
    with shoal.Node(good, home=tmp_path / "good") as again:  # the home is free again, and resumes
        assert again.round >= 5


def test_a_probe_that_raises_leaves_models_judged_by_distance(caplog):
    class Broken:
        chance = shoal.Score(1.0, float("inf"))

        def __call__(self, module: torch.nn.Module) -> shoal.Score:
            raise RuntimeError("a bug in the user's probe")

    anchor = Anchor(torch.nn.Linear(4, 3), Broken())
    state = {k: v.detach().clone() for k, v in torch.nn.Linear(4, 3).named_parameters()}
    assert anchor.score(state) == (0.0, 0.0)
    assert "a bug in the user's probe" in caplog.text


def test_an_evaluate_returning_what_is_not_a_number_shows_only_the_numbers():
    def evaluate(model: torch.nn.Module) -> dict:
        return {"a": torch.ones(3), "b": torch.tensor(0.5), "c": "text", "d": float("nan"), "e": 2}

    for how, expected in ((evaluate, {"b": 0.5, "d": None, "e": 2.0}), (lambda model: [1, 2], {})):
        learner = Learner(shoal.Task(torch.nn.Linear(4, 3), evaluate=how))
        assert learner.evaluate(learner.initial_state()) == expected


# --- the user's own loop ---------------------------------------------------------------------


async def test_the_users_loop_hands_its_model_over_and_keeps_the_steps_it_made_meanwhile():
    model = torch.nn.Linear(2, 1, bias=False)
    learner, loop = Learner(shoal.Task(model)), UserLoop(every=3)

    def steps(k: int) -> None:  # the user's loop: each step moves the weights by +0.5
        for _ in range(k):
            with torch.no_grad():
                model.weight.add_(0.5)
            loop.step(learner)

    async def round(start: float, user_steps: int) -> torch.Tensor:
        async with trio.open_nursery() as nursery:
            result = {}

            async def train() -> None:
                result["model"] = await loop.train(learner, {"weight": torch.full((1, 2), start)}, 1)

            nursery.start_soon(train)
            await trio.sleep(0.05)  # the protocol waits for the loop
            await trio.to_thread.run_sync(steps, user_steps)
        return result["model"]["weight"]

    # the first round's start is taken whole at the next step; 3 steps later the model is handed over
    assert torch.equal(await round(1.0, 4), torch.full((1, 2), 2.5))
    steps(2)  # the loop goes on meanwhile (no round waits for it): 3.5
    # the integration moved the handed-over model by +1: added at the next step, the 3 steps kept
    handed = await round(2.5 + 1.0, 4)
    assert torch.equal(handed, torch.full((1, 2), 2.5 + 0.5 * 3 + 1.0 + 0.5 * 3))
