"""The README's CLI and configuration references are generated from the code and kept current, and the
Grafana dashboard charts exactly the metrics the daemon exports."""

import argparse
import json
import re
from pathlib import Path

from shoal.node.cli import EXIT_CODES, build_parser
from shoal.node.config import FLAGS, KEYS
from shoal.node.http import StatusCollector
from shoal.node.reference import BLOCKS, cli_reference, config_reference, invocation, main, markers, wrapped

ROOT = Path(__file__).resolve().parents[1]
FIX = "python -m shoal.node.reference --write"


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser(run_flags=False)
    (action,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_command_option_and_exit_code_is_in_the_cli_reference():
    text = cli_reference()
    for name, sub in commands().items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `shoal {name}"))
        assert sub.description.split("<")[0] in row, name
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert invocation(action, short=True) in row, (name, action.dest)
                assert f"| `{invocation(action)}` | {action.help}" in text, (name, action.dest)
    assert f"the {len(FLAGS)} settings that have a flag" in text
    for code, meaning in EXIT_CODES.items():
        assert f"| {code} | {meaning} |" in text


def test_every_key_is_in_the_configuration_reference_with_its_table():
    text = config_reference()
    rows = [line for line in text.splitlines() if line.startswith("| `[")]
    assert len(rows) == len(KEYS)
    assert len([line for line in text.splitlines() if line.startswith("|")]) <= 80  # compact: a row a key
    for name, key in KEYS.items():
        flag = f" `--{name.replace('_', '-')}`" if name in FLAGS else " |"
        row = f"| `[{key.table}]` | `{key.path[-1]}` | "
        assert any(line.startswith(row) and f"`SHOAL_{name.upper()}`{flag}" in line for line in rows), name
    assert "| `local_epochs` | unset |" in text and '| `listen` | `["/ip4/0.0.0.0/tcp/4001"]` |' in text
    assert "dirichlet:&lt;alpha>" in text and "\\| mnist1d \\|" in text  # shown as written


def document(cli: str, config: str) -> str:
    (cli_start, cli_end), (config_start, config_end) = markers("cli-reference"), markers("config-reference")
    cli_block, config_block = f"{cli_start}\n{cli}\n{cli_end}", f"{config_start}\n{config}\n{config_end}"
    return f"# Title\n\n{cli_block}\n\ntext between\n\n{config_block}\nend\n"


def test_write_fills_the_blocks_and_check_fails_on_a_stale_one(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(document("old commands", "old settings"))
    assert main(["--check", str(readme)]) == 1
    error = capsys.readouterr().err
    assert "cli reference and config reference are out of date" in error and f"{FIX} {readme}" in error
    assert main(["--write", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\n") and "\n\ntext between\n\n" in text and text.endswith("-->\nend\n")
    assert main(["--check", str(readme)]) == 0
    assert main([]) == 0
    printed = capsys.readouterr().out
    for block, make in BLOCKS.items():  # as printed, markers included
        assert wrapped(block, make()) in text and wrapped(block, make()) in printed

    readme.write_text(
        text.replace(next(line for line in text.splitlines() if "SHOAL_GOSSIP_FANOUT" in line), "")
    )
    assert main(["--check", str(readme)]) == 1  # a setting missing from the file
    error = capsys.readouterr().err
    assert "its config reference is out of date" in error and f"{FIX} {readme}" in error


def test_a_file_without_markers_is_refused_untouched(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n<!-- cli-reference:start -->\n<!-- cli-reference:end -->\n")
    for mode in ("--write", "--check"):
        assert main([mode, str(readme)]) == 2
        assert "no <!-- config-reference:start --> ... <!-- config-reference:end --> markers" in (
            capsys.readouterr().err
        )
    assert readme.read_text() == "# Title\n<!-- cli-reference:start -->\n<!-- cli-reference:end -->\n"


def test_readme_references_current(capsys):
    assert main(["--check", str(ROOT / "README.md")]) == 0, capsys.readouterr().err


def exported() -> set[str]:
    """The metric names the daemon's /metrics has, as Prometheus stores them (a counter's with _total)."""
    status = {
        "round": 1,
        "peers": [],
        "metrics": {"accuracy": 0.5},
        "bytes_in": {"model": 1},
        "bytes_out": {"model": 1},
        "rejected": 0,
        "liveness": {"suspected": [], "down": 0, "flaps": 0},
    }
    families = StatusCollector(lambda: status).collect()
    return {f.name + "_total" * (f.type == "counter") for f in families}


def test_the_grafana_dashboard_charts_every_exported_metric_and_only_those():
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    source = variables["DS_PROMETHEUS"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    assert "instance" in variables and dashboard["schemaVersion"] >= 39
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    named = {name for expr in exprs for name in re.findall(r"\bshoal_\w+", expr)}
    assert named == exported(), (named, exported())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert all('instance=~"$instance"' in expr for expr in exprs)
