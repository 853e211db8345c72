"""The CLI and a daemon's set-up without a swarm: bad config, data and addresses fail with one clear line;
status and id offline; every integrator the config offers; model versions; task ids across releases."""

import json
import signal
import socket
import subprocess
import sys

import pytest
import trio

from shoal.learning.settings import INTEGRATORS
from shoal.node import cli
from shoal.node.config import load
from shoal.node.demo import node_config
from shoal.overlay.identity import load_or_create_identity, peer_id
from tests.daemons import ENV, assert_one_clear_line, run_cli


@pytest.fixture
def in_process(monkeypatch, capsys):
    """The CLI's ``main()`` in this process, as ``run_cli`` runs it in another (each of those spends ~2 s
    importing torch): its exit code and what it printed. A configuration it takes fails the test at
    ``trio.run`` (the daemon would start and serve), and the ``sys.path`` entry ``run`` adds goes."""

    def taken(*_: object) -> None:
        raise AssertionError("the configuration was taken: the daemon was about to start")

    monkeypatch.setattr(trio, "run", taken)
    monkeypatch.setattr(sys, "path", list(sys.path))

    def call(*args: str, home, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        argv = [*args, "--home", str(home)]
        capsys.readouterr()
        with monkeypatch.context() as patched:
            for name, value in (env or {}).items():
                patched.setenv(name, value)
            try:
                code = cli.main(argv)
            except SystemExit as e:  # argparse's refusals
                code = e.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(argv, code, out, err)

    return call


def test_bad_config_data_and_addresses_fail_with_one_clear_line(tmp_path, in_process):
    """Real processes for `init` and one refusal of `run`; the other refusals through the same
    ``main()`` in this process."""
    home = tmp_path / "home"
    assert run_cli("init", home=home).returncode == 0
    config = home / "config.toml"
    text = config.read_text()
    config.write_text(text.replace("lr = 0.05", 'lr = "fast"'))
    assert_one_clear_line(run_cli("run", home=home), 2, "lr must be float")
    assert_one_clear_line(in_process("run", home=home), 2, "lr must be float")  # the same in both
    assert_one_clear_line(in_process("init", home=home), 4, "already holds")
    config.write_text(text + "\n[nonsense]\nx = 1\n")
    assert_one_clear_line(in_process("run", home=home), 2, "unknown setting", "[nonsense]")
    config.write_text(text)
    assert_one_clear_line(
        in_process("run", "--bootstrap", "/ip4/127.0.0.1/tcp/4001", home=home), 2, "no peer id"
    )
    uncovered = {"SHOAL_PARTITION": "shards:2", "SHOAL_SHARDS": "3"}  # 6 of the 10 classes
    assert_one_clear_line(in_process("run", home=home, env=uncovered), 2, "partition", "covers only 6")
    assert_one_clear_line(
        in_process("run", "--data", str(tmp_path / "missing.npz"), home=home), 4, "missing.npz"
    )
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert_one_clear_line(in_process("run", "--data", str(tmp_path / "bad.npz"), home=home), 4, "bad.npz")


# `shoal run` as `python -m shoal.node.cli run` runs it, but with the bootstrap retries' backoff (1, 2, 4
# and 8 s between the 5 attempts) at 0.05 s: the attempts and the final message are the same
FAST_RETRIES = (
    "import sys; import shoal.overlay.host as host; from shoal.node.cli import main;"
    "host.join.__defaults__ = (host.join.__defaults__[0], host.join.__defaults__[1], 0.05);"
    "sys.exit(main())"
)


@pytest.mark.slow
def test_unreachable_bootstrap_says_which_address_and_why(tmp_path, in_process):
    home = tmp_path / "home"
    assert in_process("init", home=home).returncode == 0
    stranger = peer_id(load_or_create_identity(tmp_path / "other.key")[0])
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        address = f"/ip4/127.0.0.1/tcp/{sock.getsockname()[1]}/p2p/{stranger}"
    args = ["run", "--bootstrap", address, "--listen", "/ip4/127.0.0.1/tcp/0", "--api", "127.0.0.1:0"]
    done = subprocess.run(
        [sys.executable, "-c", FAST_RETRIES, *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert_one_clear_line(done, 3, address, "refused")
    assert "attempt 5/5 failed" in done.stderr, done.stderr  # every retry made, then the one line


def test_a_port_another_daemon_listens_on_is_refused_not_shared(tmp_path, in_process):
    """py-libp2p listens with SO_REUSEPORT: without the check a second daemon would share the port."""
    home = tmp_path / "home"
    assert in_process("init", home=home).returncode == 0
    with socket.socket() as taken:  # as libp2p's listener is
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for listen in (f"/ip4/127.0.0.1/tcp/{port}", f"/ip4/0.0.0.0/tcp/{port}"):
            done = run_cli("run", "--listen", listen, "--api", "127.0.0.1:0", home=home)
            assert_one_clear_line(done, 2, "Address already in use", "--listen")
            assert "joined as" not in done.stderr


@pytest.mark.parametrize("name", INTEGRATORS)
def test_every_integrator_the_config_offers_folds_models_in_a_daemon(tmp_path, name):
    from shoal.learning.integrators import Contribution
    from shoal.node.daemon import Daemon

    daemon = Daemon(tmp_path, load(None, env={}, integrator=name, model="frozen-cnn", shards=3))
    own = daemon.learner.initial_state()
    other = {k: v + 0.01 for k, v in own.items()}
    merged = daemon.node.integrator.integrate(Contribution(own, 10), [Contribution(other, 10, "p", (0, 1))])
    daemon.layout.check(merged)
    assert (daemon.node.labels is not None) == (name == "bristle")


def test_bristle_on_a_model_that_shares_more_than_a_head_is_a_config_error(tmp_path, in_process):
    home = tmp_path / "home"
    in_process("init", home=home)
    done = run_cli("run", home=home, env={"SHOAL_INTEGRATOR": "bristle"})
    assert_one_clear_line(done, 2, "bristle", "frozen-cnn or head")


def test_status_without_a_daemon_and_offline_id(tmp_path, in_process):
    home = tmp_path / "home"
    in_process("init", home=home)
    assert_one_clear_line(run_cli("status", home=home), 5, "no daemon running")
    out = run_cli("id", "--json", home=home)
    assert out.returncode == 0
    assert json.loads(out.stdout)["peer"] == peer_id(load_or_create_identity(home / "identity.key")[0])


def test_a_models_version_names_its_encoded_bytes():
    """The metadata registry's model version: the same tensors give the same name, any change another."""
    import torch

    from shoal.node.daemon import Daemon

    name, size = Daemon._version({"w": torch.ones(300)})
    assert len(name) == 64 and size > 1200
    assert Daemon._version({"w": torch.ones(300)}) == (name, size)
    assert Daemon._version({"w": torch.ones(300).index_fill_(0, torch.tensor([7]), 2.0)})[0] != name


def test_releases_that_cannot_read_each_others_messages_are_in_different_tasks(tmp_path, monkeypatch):
    """A peer on another frame, message or model encoding never joins our task, so neither end takes
    the other's messages for malformed ones (and bans it)."""
    from shoal.learning import codecs
    from shoal.learning.models import ParameterLayout
    from shoal.node.daemon import builtin_task, task_id
    from shoal.overlay import framing, wire

    path = tmp_path / "config.toml"
    path.write_text(node_config(0, 2))
    config = load(path)
    task, spec = builtin_task(config)
    layout = ParameterLayout.of(task.module())
    ours = task_id(config, spec, layout)
    assert task_id(config, spec, layout) == ours
    for module, name in ((framing, "VERSION"), (wire, "VERSION"), (codecs, "FORMAT")):
        with monkeypatch.context() as patched:
            patched.setattr(module, name, getattr(module, name) + 1)
            assert task_id(config, spec, layout) != ours, f"{module.__name__}.{name}"


async def test_a_second_signal_while_leaving_cuts_the_goodbyes_short_not_the_checkpoint():
    """The daemon holds its signal receiver until the final checkpoint is written (a second Ctrl-C once
    ended the process before it); what a second signal does meanwhile is to cancel the goodbyes."""
    from shoal.node.daemon import _hurry

    async def again():
        yield signal.SIGINT

    leaving = trio.CancelScope()
    await _hurry(again(), leaving)
    assert leaving.cancel_called
