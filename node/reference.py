"""The README's CLI and configuration references, generated from the code.

Hand-kept lists drift: a setting or command added in code goes unseen in the README. Both blocks are
made here from ``shoal``'s parser (node/cli.py) and the settings' metadata (node/config.py), and the tests
run ``--check`` on README.md, so a stale reference fails them.

    python -m shoal.node.reference                    # print both blocks, markers included
    python -m shoal.node.reference --write README.md  # replace them between their markers
    python -m shoal.node.reference --check README.md  # exit 1 if the file's differ
"""

from __future__ import annotations

import argparse
import stat
import sys
from collections.abc import Callable
from pathlib import Path

from shoal.node.cli import EXIT_CODES, build_parser
from shoal.node.config import FLAGS, KEYS, toml_value
from shoal.overlay.atomic import write_atomic


class MarkerError(ValueError):
    """The file has no place for a block: its start and end markers are missing."""


def markers(block: str) -> tuple[str, str]:
    return f"<!-- {block}:start -->", f"<!-- {block}:end -->"


def markdown(text: str) -> str:
    """``text`` shown as written: outside code spans a ``<name>`` would be taken for an HTML tag, and
    anywhere in a table a ``|`` ends its cell."""
    parts = text.split("`")
    parts[::2] = [part.replace("<", "&lt;") for part in parts[::2]]
    return "`".join(parts).replace("|", "\\|")


def invocation(action: argparse.Action, short: bool = False) -> str:
    """How an option is written on the command line (``-v, --verbose``, ``--output FILE``, ``PEER_ID ...``);
    ``short``: by its long name only, and in brackets unless it is a positional argument."""
    name = action.metavar or (action.dest.upper() if action.option_strings else action.dest)
    value = "" if action.nargs == 0 else f"{name} ..." if action.nargs in {"+", "*"} else name
    names = action.option_strings[-1:] if short else action.option_strings
    text = " ".join(part for part in (", ".join(names), value) if part)
    return f"[{text}]" if short and action.option_strings else text


def cli_reference() -> str:
    """Every command with its synopsis and description, the options' meanings once each, the exit codes."""
    parser = build_parser(run_flags=False)  # the settings flags are the configuration reference's
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    lines = ["| command | what it does |", "|---|---|"]
    meanings: dict[str, str] = {}
    for name, sub in commands.choices.items():
        options = [a for a in sub._actions if not isinstance(a, argparse._HelpAction)]
        words = [invocation(a, short=True) for a in options]
        if name == "run":
            words.append("[SETTING FLAGS]")
        lines.append(f"| `shoal {' '.join([name, *words])}` | {markdown(sub.description)} |")
        for a in options:  # an option shared by commands is listed once: it must mean one thing
            if meanings.setdefault(invocation(a), a.help or "") != (a.help or ""):
                raise ValueError(f"{invocation(a)} has two meanings; make them one or rename one")
    also = f"the {len(FLAGS)} settings that have a flag in the configuration reference"
    lines += ["", f"Every command takes `--help`. `SETTING FLAGS`: {also}.", ""]
    lines += ["| option | meaning |", "|---|---|"]
    lines += [f"| `{option}` | {markdown(meaning)} |" for option, meaning in meanings.items()]
    lines += ["", "| exit code | meaning |", "|---|---|"]
    lines += [f"| {code} | {markdown(meaning)} |" for code, meaning in EXIT_CODES.items()]
    return "\n".join(lines)


def config_reference() -> str:
    """Every key of ``config.toml``, by table: default, environment variable and flag, meaning."""
    lines = [
        "Each key is read from `config.toml` (`shoal init` writes them all, commented), then from its "
        "`SHOAL_<KEY>` environment variable, then from its `shoal run` flag if it has one. There, and as a "
        "`shoal.Node` keyword, a sub-table's keys are prefixed by its name (`fanout` of `[protocol.gossip]`: "
        "`SHOAL_GOSSIP_FANOUT`, `--gossip-fanout`, `gossip_fanout=3`). A list's items go into a variable "
        "separated by spaces or commas.",
        "",
        "| table | key | default | variable, flag | meaning |",
        "|---|---|---|---|---|",
    ]
    for key in KEYS.values():
        default = "unset" if key.default is None else f"`{toml_value(key.default)}`"
        flag = f" `--{key.name.replace('_', '-')}`" if key.name in FLAGS else ""
        help = markdown(key.field.metadata["help"])
        lines.append(
            f"| `[{key.table}]` | `{key.path[-1]}` | {default} | `SHOAL_{key.name.upper()}`{flag} | {help} |"
        )
    return "\n".join(lines)


BLOCKS: dict[str, Callable[[], str]] = {"cli-reference": cli_reference, "config-reference": config_reference}


def wrapped(block: str, body: str) -> str:
    """``body`` between its block's markers, blank lines apart so markdown sees its tables."""
    start, end = markers(block)
    return f"{start}\n\n{body}\n\n{end}"


def replaced(text: str, blocks: dict[str, str], name: str) -> str:
    """``text`` (of the file ``name``) with each block's markers holding ``blocks``'s body for it."""
    for block, body in blocks.items():
        start, end = markers(block)
        head, found_start, rest = text.partition(start)
        _, found_end, tail = rest.partition(end)
        if not (found_start and found_end):
            raise MarkerError(
                f"{name}: no {start} ... {end} markers; put them, on lines of their own, where the "
                f"{block.replace('-', ' ')} belongs"
            )
        text = head + wrapped(block, body) + tail
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shoal.node.reference",
        description="Print the CLI and configuration references, or update or check FILE's copies of them.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", type=Path, metavar="FILE", help="replace the blocks between their markers")
    mode.add_argument("--check", type=Path, metavar="FILE", help="exit 1 if FILE's blocks are not current")
    args = parser.parse_args(argv)
    made = {block: make() for block, make in BLOCKS.items()}
    path = args.write or args.check
    if path is None:
        print("\n\n".join(wrapped(block, body) for block, body in made.items()))
        return 0
    try:
        text = path.read_text()
        new = replaced(text, made, str(path))
    except OSError as e:
        print(f"{path}: {e.strerror}", file=sys.stderr)
        return 2
    except MarkerError as e:
        print(e, file=sys.stderr)
        return 2
    if args.check:
        stale = [block for block, body in made.items() if replaced(text, {block: body}, str(path)) != text]
        if stale:
            what = " and ".join(block.replace("-", " ") for block in stale)
            print(
                f"{path}: its {what} {'are' if len(stale) > 1 else 'is'} out of date with the code; "
                f"run: python -m shoal.node.reference --write {path}",
                file=sys.stderr,
            )
            return 1
    elif new != text:
        write_atomic(path, new, stat.S_IMODE(path.stat().st_mode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
