"""The ``shoal`` command line: init, run, id, peers, status, allowlist, demo, version.

Its exit codes are :data:`EXIT_CODES`, which ``shoal --help`` and the README's CLI reference show.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from shoal.node import __version__

EXIT_CONFIG, EXIT_JOIN, EXIT_FILES, EXIT_NO_DAEMON, EXIT_NOT_REACHED = 2, 3, 4, 5, 6
EXIT_CODES: dict[int, str] = {  # scripts tell failures apart by these: the one list of them
    0: "done",
    1: "unexpected failure (a bug: the traceback is printed)",
    EXIT_CONFIG: "bad usage or configuration",
    EXIT_JOIN: "could not join the swarm",
    EXIT_FILES: "unusable files (identity, data, checkpoint, home in use)",
    EXIT_NO_DAEMON: "no daemon answering at the API address",
    EXIT_NOT_REACHED: "the demo did not reach its target in time",
}

DEFAULT_HOME = Path(os.environ.get("SHOAL_HOME", Path.home() / ".shoal"))


def build_parser(run_flags: bool = True) -> argparse.ArgumentParser:
    """The whole command line; ``run_flags=False`` leaves out the settings flags of ``shoal run``, whose
    definitions import torch and libp2p (seconds that ``shoal status`` or ``--help`` need not wait)."""
    parser = argparse.ArgumentParser(
        prog="shoal",
        description="Shoal: a peer-to-peer node daemon for decentralized machine learning.",
        epilog="Run 'shoal COMMAND --help' for a command's options. Exit codes: "
        + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items())
        + ".",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=description or help)
        if name not in {"version", "demo"}:
            sub.add_argument(
                "--home",
                type=Path,
                default=DEFAULT_HOME,
                # the same on every machine, as the README's CLI reference is generated from it
                help="the node's directory (default: $SHOAL_HOME, else ~/.shoal)",
            )
        return sub

    command(
        "init",
        "create a node's identity key and a commented config.toml",
        "Create HOME/identity.key (the node's permanent peer id) and HOME/config.toml. Refuses to "
        "touch an existing identity.",
    )
    run = command(
        "run",
        "run the daemon (flags override config.toml, SHOAL_<KEY> variables too)",
        "Run the node until SIGINT/SIGTERM, then leave the swarm gracefully with a final "
        "checkpoint. Values come from HOME/config.toml, then SHOAL_<KEY> environment variables "
        "(e.g. SHOAL_BOOTSTRAP), then these flags.",
    )
    if run_flags:
        from shoal.node.config import add_flags

        add_flags(run)
    run.add_argument("-v", "--verbose", action="store_true", help="debug logs, libp2p's included")
    for name, help in (
        ("id", "print this node's peer id and addresses"),
        ("peers", "list the peers the running daemon is connected to"),
        ("status", "show the running daemon's round, metrics, peers and traffic"),
    ):
        sub = command(name, help)
        sub.add_argument("--api", metavar="HOST:PORT", help="ask the daemon at this API address instead")
        sub.add_argument("--json", action="store_true", help="machine-readable output")
    allow = command(
        "allowlist",
        "sign a closed swarm's allowlist with this node's identity (the founder's)",
        "Write a file admitting PEER_IDs to a closed swarm, signed with HOME's identity key, and print "
        "the founder's peer id. Give every node the file (allowlist = ...) and that id (founder = ...); "
        "peers not on it, relays and bootstrap nodes included, are disconnected.",
    )
    allow.add_argument("peers", nargs="+", metavar="PEER_ID", help="peer ids to admit (`shoal id` prints it)")
    allow.add_argument(
        "--output", type=Path, metavar="FILE", help="where to write it (default: HOME/allowlist.json)"
    )
    demo = command(
        "demo",
        "run a local swarm of real daemons on 127.0.0.1 until it learns",
        "Start N daemons as separate processes on 127.0.0.1 (one bootstraps the others), each with "
        "its own shard of the workload's data (digits: offline digits; language: a byte-level "
        "transformer on the Python standard library's source, DiLoCo outer step, top-k codec); show "
        "their progress; stop when their mean metric reaches --target or after --timeout seconds; "
        "print a summary.",
    )
    demo.add_argument("--nodes", type=int, default=4, metavar="N", help="daemons to start (default 4)")
    demo.add_argument(
        "--task",
        choices=("digits", "language"),
        default="digits",
        help="what the swarm learns: digits (default) or language",
    )
    demo.add_argument(
        "--target",
        type=float,
        default=None,
        metavar="VALUE",
        help="mean metric to reach: digits: test accuracy at least VALUE (default 0.9); language: "
        "held-out bits per byte at most VALUE (default 2.6)",
    )
    demo.add_argument(
        "--timeout", type=float, default=300, metavar="SECONDS", help="seconds before giving up (default 300)"
    )
    demo.add_argument("--keep", type=Path, metavar="DIR", help="keep the nodes' homes in DIR (default: temp)")
    command("version", "print the version of Shoal and of its main components")
    return parser


def installed(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def fail(message: str, code: int) -> int:
    print(f"shoal: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(run_flags=argv[:1] == ["run"])
    args = parser.parse_args(argv)
    if args.command == "version":
        parts = ", ".join(f"{p} {installed(p)}" for p in ("torch", "libp2p", "trio", "pycrdt"))
        print(f"shoal {__version__} ({parts})")
        return 0
    if args.command is None:
        parser.print_help()
        return EXIT_CONFIG
    commands = {"init": init, "run": run, "id": ask, "peers": ask, "status": ask, "demo": demo}
    return {**commands, "allowlist": allowlist}[args.command](args)


def init(args: argparse.Namespace) -> int:
    from shoal.node.config import template
    from shoal.node.home import Home
    from shoal.overlay.atomic import write_atomic
    from shoal.overlay.identity import load_or_create_identity, peer_id

    home = Home(args.home)
    if home.identity.exists():
        return fail(
            f"{home.identity} already holds this node's identity; use another --home for a new node",
            EXIT_FILES,
        )
    key_pair, _ = load_or_create_identity(home.identity)
    if not home.config.exists():
        write_atomic(home.config, template())
    print(f"initialised {args.home}\npeer id: {peer_id(key_pair)}\nconfig:  {home.config}")
    return 0


def allowlist(args: argparse.Namespace) -> int:
    from shoal.node.home import Home
    from shoal.overlay.allowlist import sign_allowlist
    from shoal.overlay.atomic import write_atomic
    from shoal.overlay.identity import IdentityError, load_identity

    home = Home(args.home)
    try:
        signed = sign_allowlist(load_identity(home.identity), args.peers)
    except IdentityError as e:
        return fail(f"{e} (run: shoal init --home {args.home})", EXIT_FILES)
    except ValueError as e:
        return fail(str(e), EXIT_CONFIG)
    output = args.output or home.path / "allowlist.json"
    try:
        write_atomic(output, json.dumps(signed, indent=1).encode())
    except OSError as e:
        return fail(f"{output}: {e.strerror}", EXIT_FILES)
    print(f'wrote {output}: {len(signed["peers"])} peers admitted\nfounder = "{signed["founder"]}"')
    return 0


def run(args: argparse.Namespace) -> int:
    from shoal.node.config import FLAGS, ConfigError, load
    from shoal.node.home import Home

    try:
        config = load(Home(args.home).config, **{key: getattr(args, key) for key in FLAGS})
    except ConfigError as e:
        return fail(f"bad configuration: {e}", EXIT_CONFIG)

    import trio  # the heavy imports (torch, libp2p) only once the configuration is known to be good

    # --task and --model name the user's modules as package.module:function, found from the current
    # directory as well (as uvicorn and gunicorn find an application)
    sys.path.insert(0, os.getcwd())

    from shoal.learning.datasets import DatasetError
    from shoal.learning.models import ModelError
    from shoal.node.checkpoint import CheckpointError
    from shoal.node.daemon import Daemon
    from shoal.node.home import HomeInUse
    from shoal.overlay.host import BootstrapError, quiet_libp2p_logs
    from shoal.overlay.identity import IdentityError

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    quiet_libp2p_logs(args.verbose)
    try:
        trio.run(Daemon(args.home, config).run)
    except ConfigError as e:  # a setting that only the data or model shows to be wrong
        return fail(f"bad configuration: {e}", EXIT_CONFIG)
    except BootstrapError as e:
        return fail(
            f"{e}\n  check the addresses (shoal id on those nodes prints them) and that they run", EXIT_JOIN
        )
    except (DatasetError, ModelError, CheckpointError, IdentityError, HomeInUse) as e:
        return fail(str(e), EXIT_FILES)
    except OSError as e:
        if e.filename:  # a file we could not read or write
            return fail(f"{e.filename}: {e.strerror}", EXIT_FILES)
        return fail(f"{e.strerror or e} (check the --listen and --api addresses)", EXIT_CONFIG)
    except KeyboardInterrupt:
        return 0
    # Skip the interpreter's finalisation: an abandoned training thread may still be inside torch, and
    # finalising under it can abort the process (seen: exit -6 after a clean leave and checkpoint).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def ask(args: argparse.Namespace) -> int:
    """id, peers, status: read the running daemon's /status."""
    from shoal.node.home import Home

    address = args.api
    if address is None:
        address = (Home(args.home).running() or {}).get("api")
        if address is None:
            if args.command == "id":
                return offline_id(args)
            return fail(
                f"no daemon running for {args.home} (start one with: shoal run --home {args.home})",
                EXIT_NO_DAEMON,
            )
    try:
        with urllib.request.urlopen(f"http://{address}/status", timeout=5) as response:
            status = json.load(response)
    except (OSError, ValueError) as e:
        return fail(f"no daemon answers at {address} ({e})", EXIT_NO_DAEMON)
    if args.command == "id":
        shown = {"peer": status["peer"], "addresses": status["addresses"]}
    elif args.command == "peers":
        shown = status["peers"]
    else:
        shown = status
    if args.json:
        print(json.dumps(shown, indent=1))
    elif args.command == "id":
        print("\n".join([f"peer id: {status['peer']}", *status["addresses"]]))
    elif args.command == "peers":
        print("\n".join(f"{p['peer']}  {p['connection']}" for p in status["peers"]) or "no peers")
    else:
        print(human_status(status))
    return 0


def offline_id(args: argparse.Namespace) -> int:
    from shoal.node.home import Home
    from shoal.overlay.identity import IdentityError, load_identity, peer_id

    try:
        pid = peer_id(load_identity(Home(args.home).identity))
    except IdentityError as e:
        return fail(f"{e} (run: shoal init --home {args.home})", EXIT_FILES)
    print(json.dumps({"peer": pid, "addresses": []}) if args.json else f"peer id: {pid} (daemon not running)")
    return 0


def human_status(s: dict[str, Any]) -> str:
    from shoal.node.http import describe

    traffic = (
        f"{sum(s['bytes_in'].values()) / 1e6:.1f} MB in, {sum(s['bytes_out'].values()) / 1e6:.1f} MB out"
    )
    lines = [
        f"peer id:      {s['peer']}",
        f"task:         {s['task']} ({s['protocol']}, {s['integrator']}, {s['samples']} local samples)",
        f"reachability: {s['reachability']}"
        + (f" (relays: {', '.join(s['relays'])})" if s["relays"] else ""),
        f"round:        {s['round']}   metrics: {describe(s['metrics'])}",
        f"peers:        {len(s['peers'])}"
        + "".join(f"\n  {p['peer']}  {p['connection']}" for p in s["peers"]),
        f"traffic:      {traffic}, {s['rejected']} inputs rejected",
        f"uptime:       {s['uptime']:.0f} s",
    ]
    return "\n".join(lines)


def demo(args: argparse.Namespace) -> int:
    from shoal.node.demo import WORKLOADS, run_demo

    workload = WORKLOADS[args.task]
    target = workload.target if args.target is None else args.target
    if args.nodes < 2 or not 0 < target <= workload.bound or args.timeout <= 0:
        return fail(
            f"--nodes must be at least 2, --target in (0, {workload.bound:g}] for {args.task}, --timeout "
            "positive",
            EXIT_CONFIG,
        )
    reached = run_demo(args.nodes, target, args.timeout, args.keep, workload)
    return 0 if reached else EXIT_NOT_REACHED


if __name__ == "__main__":
    sys.exit(main())
