"""``diffalign plot RUN_DIR [RUN_DIR...] [--metrics loss,reward] [--out FILE]``: training curves as a PNG.

Reads each run folder's ``metrics.jsonl`` (what every training recipe writes) and draws one subplot per metric,
the runs overlaid and named by their folder in the legend (``diffalign.training.curves``, which also draws the
``curves.png`` a run writes at its end).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffalign.cli import CLIError
from diffalign.training import curves


def labels(run_dirs: list[Path]) -> list[str]:
    """Legend labels: each run folder's name, or the path as given where two runs share a name."""
    names = [(d.resolve().name or str(d)) for d in run_dirs]
    return [name if names.count(name) == 1 else str(d) for name, d in zip(names, run_dirs, strict=True)]


def load_runs(run_dirs: list[Path]) -> dict[str, curves.Rows]:
    """Label -> rows for every run folder; a folder without metrics, or with no rows yet, is a ``CLIError``."""
    runs = {}
    for label, run_dir in zip(labels(run_dirs), run_dirs, strict=True):
        path = run_dir / curves.METRICS_FILE
        if not path.is_file():
            what = "no such folder" if not run_dir.is_dir() else f"no {curves.METRICS_FILE} in it"
            raise CLIError(f"{run_dir}: {what}; give a run's output folder (its run.output_dir)")
        rows = curves.read_metrics(run_dir)
        if not rows:
            raise CLIError(f"{path} has no rows yet; a run writes its first row after step 1")
        runs[label] = rows
    return runs


def choose_keys(runs: dict[str, curves.Rows], metrics: str | None) -> list[str]:
    """The keys ``--metrics`` names (default: every metric), or a ``CLIError`` naming what matched nothing."""
    available = curves.metric_keys([row for rows in runs.values() for row in rows])
    if not available:
        raise CLIError(f"no numeric metrics in the {curves.METRICS_FILE} of {', '.join(runs)}")
    if not metrics:
        return available
    wanted = [m.strip() for m in metrics.split(",") if m.strip()]
    keys, missing = curves.select(available, wanted)
    if missing or not keys:
        raise CLIError(
            f"--metrics: no metric named {', '.join(map(repr, missing or [metrics]))} in these runs; "
            f"they log: {', '.join(available)}"
        )
    return keys


def default_out(run_dirs: list[Path]) -> Path:
    """``RUN_DIR/curves.png`` for one run, ``./curves.png`` for several."""
    return run_dirs[0] / curves.CURVES_FILE if len(run_dirs) == 1 else Path(curves.CURVES_FILE)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``plot`` subcommand."""
    p = subparsers.add_parser(
        "plot",
        help="draw the training curves of one or several runs",
        description="Draw the curves of one or several runs from their metrics.jsonl: one subplot per metric, "
        "the runs overlaid (legend: the run folder's name).",
    )
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="a run's output folder (run.output_dir)")
    p.add_argument(
        "--metrics",
        default=None,
        help="comma-separated metrics to draw, e.g. loss,reward; a name also picks its family "
        "(reward: reward/pickscore/mean, ...). Default: all",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="PNG to write (default: RUN_DIR/curves.png for one run, else ./curves.png)",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Draw and print the written path."""
    runs = load_runs(args.run_dirs)
    keys = choose_keys(runs, args.metrics)
    out = args.out or default_out(args.run_dirs)
    try:
        written = curves.draw(runs, out, keys)
    except OSError as e:
        raise CLIError(f"--out {out}: cannot write it ({e.strerror or e})") from e
    print(written)
    return 0
