"""Training curves from ``metrics.jsonl``: one subplot per metric, one line per run, drawn to a PNG.

Used at the end of every training run (``curves.png`` beside ``metrics.jsonl``, ``loop.train``) and by
``diffalign plot RUN_DIR [RUN_DIR...]``, which overlays several runs. The rows are the ones ``loop.log`` writes:
``{"step": N, "<metric>": value, ...}``; a metric missing from a row (online RL's rewards appear on the steps that
sampled a round) is a gap in its series, not a zero. matplotlib is imported only when drawing, and only through
its object-oriented API on an Agg canvas: no pyplot, no global backend switch, so drawing from a notebook or a
training process leaves its matplotlib state alone.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from diffalign.fileio import read_jsonl, write_atomic


METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
Rows = list[dict]


def read_metrics(run_dir: str | Path) -> Rows:
    """The rows of ``run_dir/metrics.jsonl`` in file order (``FileNotFoundError`` when it has none)."""
    return read_jsonl(Path(run_dir) / METRICS_FILE)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def metric_keys(rows: Rows) -> list[str]:
    """The numeric keys of ``rows`` other than ``step``, in the order they first appear."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update((k, None) for k, v in row.items() if k != "step" and _is_number(v))
    return list(keys)


def select(keys: Sequence[str], wanted: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(chosen keys, names that matched none)`` for the names a user asked for.

    A name matches a key equal to it or a ``/``-separated family under it: ``reward`` picks ``reward/pickscore/mean``
    and ``reward/pickscore/std``, ``loss`` picks ``loss`` and ``loss/implicit_acc``. Chosen keys keep the order
    of ``wanted``, then of ``keys``.
    """
    chosen: dict[str, None] = {}
    missing = []
    for name in wanted:
        hits = [k for k in keys if k == name or k.startswith(f"{name}/")]
        chosen.update(dict.fromkeys(hits))
        if not hits:
            missing.append(name)
    return list(chosen), missing


def series(rows: Rows, key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of the rows that hold a number for ``key`` (non-finite values included)."""
    points = [(float(r["step"]), float(r[key])) for r in rows if _is_number(r.get(key)) and _is_number(r.get("step"))]
    return [s for s, _ in points], [v for _, v in points]


def draw(runs: Mapping[str, Rows], out: str | Path, keys: Sequence[str] | None = None, columns: int = 3) -> Path:
    """Draw ``runs`` (legend label -> its ``metrics.jsonl`` rows) to the PNG ``out``, written atomically.

    One subplot per key of ``keys`` (default: every metric of every run, ``metric_keys`` order), each run's series
    overlaid on it in the run's own colour; x is the optimizer step. With one run the figure is titled by its label,
    with several a legend names them in order. Returns ``out``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    if keys is None:
        keys = metric_keys([row for rows in runs.values() for row in rows])
    if not keys:
        raise ValueError("no numeric metrics to draw")
    columns = max(1, min(columns, len(keys)))
    nrows = math.ceil(len(keys) / columns)
    fig = Figure(figsize=(4.2 * columns, 2.8 * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, columns, squeeze=False).ravel()
    for ax, key in zip(axes, keys, strict=False):
        for i, (label, rows) in enumerate(runs.items()):  # one colour per run on every subplot
            steps, values = series(rows, key)
            if steps:
                marker = "." if len(steps) <= 30 else None
                ax.plot(steps, values, label=label, color=f"C{i % 10}", marker=marker, linewidth=1.2)
        ax.set_title(key, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    for ax in axes[len(keys) - columns :]:
        ax.set_xlabel("step", fontsize=8)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    if len(runs) == 1:
        fig.suptitle(next(iter(runs)), fontsize=10)
    else:
        handles = [Line2D([], [], color=f"C{i % 10}", marker=".") for i in range(len(runs))]
        fig.legend(handles, list(runs), loc="outside upper center", ncols=min(len(runs), 4))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, buf.getvalue())
    return out


def write_run_curves(run_dir: str | Path) -> Path:
    """``run_dir/curves.png`` from ``run_dir/metrics.jsonl``, labelled by the folder's name."""
    run_dir = Path(run_dir)
    return draw({run_dir.resolve().name: read_metrics(run_dir)}, run_dir / CURVES_FILE)
