import subprocess
import sys
from pathlib import Path

import shoal.node
from shoal.node.cli import main


def test_help_and_version_from_the_installed_script():
    out = subprocess.run(
        [Path(sys.executable).with_name("shoal"), "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert "peer-to-peer" in out and "version" in out
    out = subprocess.run(
        [sys.executable, "-m", "shoal.node.cli", "version"], capture_output=True, text=True, timeout=60
    )
    assert (
        out.returncode == 0
        and out.stdout.startswith(f"shoal {shoal.node.__version__}")
        and "libp2p 0.8.1" in out.stdout
    )


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: shoal" in capsys.readouterr().out
