#!/usr/bin/env python3
"""Set up Shoal in ./.venv and run its main job or its tests: the README's two commands.

    python3 dev.py demo [ARGS]   set up, then run the main job, `shoal demo` (README, "Quick start")
    python3 dev.py test [ARGS]   set up, then run ruff and the whole test suite (ARGS go to pytest)
    python3 dev.py setup         set up only

Set-up is idempotent: it is skipped when .venv already holds what pyproject.toml and the torch
requirement ask for. torch comes first and on its own, as `torch==2.13.0`, which pip resolves to the
CPU wheel on this kind of machine; a bare `torch` requirement would pull a multi-GB CUDA build.
On a GPU machine set SHOAL_TORCH to the pip arguments of a CUDA build of the same release before
the first set-up (see README, "GPU machines").
The NAT traversal tests build NATs in network namespaces with iptables: run as root on a Debian or
Ubuntu machine without iptables, `test` installs it with apt-get while pip sets up (elsewhere they
are skipped, saying why).
The tests run two at a time, except those marked `alone` (swarms whose time bounds a second test's
CPU load breaks), which run one at a time after them.
Only the standard library is used here: this runs before anything is installed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / "shoal-setup.sha256"
TORCH = os.environ.get("SHOAL_TORCH", "torch==2.13.0")
NO_TESTS = 5  # pytest's exit code when a selection (e.g. one test file) leaves a phase empty


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def wanted_stamp() -> str:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    digest.update(TORCH.encode())
    return digest.hexdigest()


def run(*cmd: str | Path) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def setup() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 -- dev.py may be run by an older python3
        sys.exit(f"Shoal needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    stamp = wanted_stamp()
    if STAMP.exists() and STAMP.read_text().strip() == stamp and venv_python().exists():
        return
    if not venv_python().exists():
        print(f"creating virtual environment {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = (venv_python(), "-m", "pip", "install", "--disable-pip-version-check", "--quiet")
    run(*pip, *TORCH.split())
    run(*pip, "-e", ".[dev]")
    tmp = STAMP.with_suffix(".tmp")
    tmp.write_text(stamp + "\n")
    tmp.replace(STAMP)


def compile_sources() -> None:
    """Byte-compile our own sources beside them. Where PYTHONDONTWRITEBYTECODE is set (as in many
    container images) nothing caches them, and every daemon a test or the demo starts would compile
    them again (importing a daemon's modules: 4.5 s of CPU, 4.0 s compiled)."""
    import tomllib  # here: Python 3.11's, and setup() has said so to an older python3 already

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    sources = (*packages.values(), "examples", "tests")
    subprocess.run([venv_python(), "-m", "compileall", "-q", "-j", "0", *sources], cwd=ROOT, check=True)


def nat_test_tools() -> None:
    """iptables for the NAT tests, where we may install it (root, apt-get); a failure only skips them."""
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("iptables") or not shutil.which("apt-get"):
        return
    print("+ apt-get install iptables iproute2 (for the NAT traversal tests)", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "iptables", "iproute2"]
    for attempt in (install, ["apt-get", "update", "-q"], install):  # package lists may be missing
        done = subprocess.run(attempt, env=env, capture_output=True, text=True)
        if done.returncode == 0 and attempt is install:
            return
    print(f"could not install iptables (the NAT tests will be skipped): {done.stderr.strip()[-300:]}")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help", "help"} or argv[0] not in {"demo", "test", "setup"}:
        print(__doc__)
        return 0 if argv and argv[0] in {"-h", "--help", "help"} else 2
    command, rest = argv[0], argv[1:]
    with ThreadPoolExecutor(1) as beside:  # leaving it waits for apt-get
        if command == "test":  # apt-get beside pip: on a fresh machine both mostly wait on downloads
            beside.submit(nat_test_tools)
        try:
            setup()
        except subprocess.CalledProcessError as exc:
            print(f"set-up failed: {exc}", file=sys.stderr)
            return 1
    compile_sources()
    python = str(venv_python())
    if command == "demo":
        return subprocess.call([python, "-m", "shoal.node.cli", "demo", *rest], cwd=ROOT)
    if command == "test":
        lint = subprocess.call([python, "-m", "ruff", "check", "."], cwd=ROOT)
        phases = (["-m", "not alone", "-n", "2", "--dist", "worksteal"], ["-m", "alone"])
        tests = [subprocess.call([python, "-m", "pytest", *phase, *rest], cwd=ROOT) for phase in phases]
        return lint or max(0 if code == NO_TESTS else code for code in tests)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
