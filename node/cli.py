"""The ``shoal`` command line."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version

from node import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shoal",
        description="Shoal: a peer-to-peer node daemon for decentralized machine learning.",
        epilog="Run 'shoal COMMAND --help' for a command's options.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("version", help="print the version of Shoal and of its main components")
    return parser


def installed(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "version":
        parts = ", ".join(f"{p} {installed(p)}" for p in ("torch", "libp2p", "trio", "pycrdt"))
        print(f"shoal {__version__} ({parts})")
        return 0
    build_parser().print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
