"""Compressed updates: bytes to a target accuracy with each codec, for gossip and for MoDeST.

Every run has the same data split, initial model, hyperparameters and seed; only the codec differs
(``learning.compression``: fp32, fp16, bf16, int8, and top-k differences with error feedback and int8
keyframes). Gossip runs asynchronously on a random 4-regular graph; MoDeST, unpaced, samples
--modest-sample-size trainers and one aggregator per round from all nodes. Bytes are everything the
nodes sent (models and MoDeST's pings), as the simulated network counts them.

Writes rounds.csv, summary.json (per protocol and codec: bytes_to_target, rounds_to_target,
final_accuracy_mean, and bytes_to_target as a fraction of fp32's) and accuracy_by_bytes_<protocol>.png
to --out.

    python -m shoal.simulations.compression --nodes 12 --seed 1 --out out/compression
"""

from __future__ import annotations

import sys
from pathlib import Path

import networkx as nx

from shoal.learning.compression import CODECS
from shoal.simulations import report
from shoal.simulations.engine import Simulation
from shoal.simulations.rows import RunResult
from shoal.simulations.topologies import build_graph


def main(argv: list[str] | None = None) -> int:
    p = report.parser(
        "compression",
        __doc__,
        nodes=12,
        duration=200.0,
        eval_every=5.0,
        integrator="weighted",
        modest_sample_size=4,
        modest_period=0.0,  # unpaced, as simulations/modest.py
    )
    g = p.add_argument_group("compression")
    g.add_argument("--codecs", default=",".join(CODECS), help="comma-separated (default %(default)s)")
    g.add_argument(
        "--target", type=float, default=0.9, help="accuracy for the to-target figures (default 0.9)"
    )
    args = p.parse_args(argv)
    codecs = [c for c in args.codecs.split(",") if c]
    if unknown := sorted(set(codecs) - set(CODECS)):
        p.error(f"unknown codec(s) {', '.join(unknown)}; choose from {', '.join(CODECS)}")
    if "fp32" not in codecs:
        codecs.insert(0, "fp32")  # the reference every ratio is taken against
    if not 1 <= args.modest_sample_size <= args.nodes:
        p.error("--modest-sample-size must be between 1 and --nodes")
    report.prepare(args)
    progress = None if args.quiet else print
    protocols = {
        "gossip": lambda codec: Simulation(
            report.config_from(args, codec_name=codec),
            build_graph("regular", args.nodes, args.seed),
            label=f"gossip {codec}",
            progress=progress,
        ),
        "modest": lambda codec: Simulation(
            report.config_from(args, codec_name=codec, dial_any=True, protocol="modest"),
            nx.empty_graph(args.nodes),
            label=f"modest {codec}",
            evaluate="freshest",
            progress=progress,
        ),
    }
    runs: dict[str, dict[str, RunResult]] = {
        name: {codec: build(codec).run() for codec in codecs} for name, build in protocols.items()
    }
    report.write_rounds(args.out, [r for by_codec in runs.values() for r in by_codec.values()])
    results = {name: _table(by_codec, args.target) for name, by_codec in runs.items()}
    report.write_summary(
        args.out,
        report.config_from(args),
        {"name": "compression", "codecs": codecs, "sample": args.modest_sample_size, "target": args.target},
        results,
    )
    for name, by_codec in runs.items():
        report.plot_xy(
            args.out,
            f"accuracy_by_bytes_{name}.png",
            list(by_codec.values()),
            "bytes_sent",
            "MB sent by all nodes (log)",
            f"{name}: accuracy per byte, by codec",
        )
    _print(args.out, results, args.target)
    return 0


def _table(by_codec: dict[str, RunResult], target: float) -> dict[str, dict]:
    out = {}
    for codec, r in by_codec.items():
        out[codec] = {
            **report.headline(r, target),
            "bytes_to_target": report.first_reaching(r.rows, target, "bytes_sent"),
            "rounds_to_target": report.first_reaching(r.rows, target, "round"),
        }
    reference = out["fp32"]["bytes_to_target"]
    for row in out.values():
        b = row["bytes_to_target"]
        row["bytes_to_target_vs_fp32"] = None if b is None or reference is None else round(b / reference, 4)
    return out


def _print(out: Path, results: dict[str, dict[str, dict]], target: float) -> None:
    print(f"wrote {out}: rounds.csv, summary.json and plots")
    print(f"  {'':<7} {'codec':<6} {f'MB to {target:.0%}':>10} {'x fewer':>8} {'rounds':>7} {'final acc':>9}")
    for name, table in results.items():
        for codec, row in table.items():
            b, vs = row["bytes_to_target"], row["bytes_to_target_vs_fp32"]
            print(
                f"  {name:<7} {codec:<6} {'-' if b is None else f'{b / 1e6:.2f}':>10} "
                f"{'-' if not vs else f'{1 / vs:.1f}':>8} {row['rounds_to_target'] or '-'!s:>7} "
                f"{row['final_accuracy_mean']:>9}"
            )


if __name__ == "__main__":
    sys.exit(main())
