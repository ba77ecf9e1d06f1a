"""``diffalign plot`` and the curve drawing it shares with the end of every run (``diffalign.training.curves``)."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from diffalign.cli.main import main
from diffalign.training import curves


def write_run(folder, rows, torn_tail=False):
    folder.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (folder / "metrics.jsonl").write_text(text + ('{"step": 9, "lo' if torn_tail else ""))
    return folder


@pytest.fixture
def two_runs(tmp_path):
    a = write_run(
        tmp_path / "dpo",
        [{"step": s, "loss": 0.7 - 0.01 * s, "lr": 1e-4, "grad_norm": 1.0 / s} for s in (1, 10, 20, 25)],
        torn_tail=True,  # a writer killed mid-line
    )
    b = write_run(
        tmp_path / "grpo",
        [
            {"step": 1, "loss": 0.1, "reward/pick/mean": 0.2, "reward/pick/std": 0.1, "lr": 1e-4},
            {"step": 2, "loss": float("nan"), "lr": 1e-4},  # a step without a new round: no reward keys
            {"step": 3, "loss": 0.05, "reward/pick/mean": 0.3, "reward/pick/std": 0.1, "lr": 1e-4},
        ],
    )
    return a, b


def png_size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_metric_keys_series_and_select(two_runs):
    rows = curves.read_metrics(two_runs[1])
    assert len(curves.read_metrics(two_runs[0])) == 4  # the torn last line is skipped
    keys = curves.metric_keys([*rows, {"step": 4, "note": "text", "flag": True}])
    assert keys == ["loss", "reward/pick/mean", "reward/pick/std", "lr"]  # no step, strings or booleans
    steps, values = curves.series(rows, "reward/pick/mean")
    assert steps == [1.0, 3.0] and values == [0.2, 0.3]  # a gap, not a zero
    assert math.isnan(curves.series(rows, "loss")[1][1])
    assert curves.select(keys, ["reward", "lr", "kl"]) == (["reward/pick/mean", "reward/pick/std", "lr"], ["kl"])
    assert curves.select(keys, ["reward/pick"]) == (["reward/pick/mean", "reward/pick/std"], [])


def test_plot_one_run_writes_curves_png_in_the_run(two_runs, capsys):
    assert main(["plot", str(two_runs[0])]) == 0
    out = two_runs[0] / "curves.png"
    assert capsys.readouterr().out.strip() == str(out)
    assert png_size(out) == (1260, 340)  # loss, lr, grad_norm: one row of three 4.2 x 2.8 in subplots at 100 dpi


def test_plot_several_runs_overlaid_into_cwd(two_runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["plot", str(two_runs[0]), str(two_runs[1])]) == 0
    assert capsys.readouterr().out.strip() == "curves.png"
    # the union of both runs' metrics, five subplots (two rows of three); the legend adds a band on top
    width, height = png_size(tmp_path / "curves.png")
    assert width == 1260 and height > 2 * 280


def test_plot_metrics_picks_families_and_out(two_runs, tmp_path, capsys):
    out = tmp_path / "figs" / "cmp.png"
    assert main(["plot", str(two_runs[0]), str(two_runs[1]), "--metrics", "loss,reward", "--out", str(out)]) == 0
    assert png_size(out) == (1260, 340)  # loss, reward/pick/mean, reward/pick/std


def test_plot_same_folder_names_are_told_apart(tmp_path):
    from diffalign.cli import plot

    a, b = tmp_path / "x" / "run", tmp_path / "y" / "run"
    assert plot.labels([a, b]) == [str(a), str(b)]
    assert plot.labels([a, tmp_path / "z"]) == ["run", "z"]


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda p: p / "missing", "missing: no such folder"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "empty: no metrics.jsonl in it"),
        (lambda p: write_run(p / "fresh", []), "metrics.jsonl has no rows yet"),
    ],
)
def test_plot_refuses_a_folder_without_metrics_in_one_line(two_runs, tmp_path, capsys, make, words):
    bad = make(tmp_path)
    assert main(["plot", str(two_runs[0]), str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}") and words in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "curves.png").exists()


def test_plot_unknown_metric_names_what_the_runs_log(two_runs, capsys):
    assert main(["plot", str(two_runs[0]), "--metrics", "loss,rewrd"]) == 1
    err = capsys.readouterr().err
    assert err == "error: --metrics: no metric named 'rewrd' in these runs; they log: loss, lr, grad_norm\n"


def test_plot_rows_without_numbers_and_an_unwritable_out_are_one_line_errors(two_runs, tmp_path, capsys):
    bare = write_run(tmp_path / "bare", [{"step": 1, "note": "x"}])
    assert main(["plot", str(bare)]) == 1
    assert capsys.readouterr().err == "error: no numeric metrics in the metrics.jsonl of bare\n"
    (tmp_path / "file").write_text("")
    assert main(["plot", str(two_runs[0]), "--out", str(tmp_path / "file" / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {tmp_path / 'file' / 'x.png'}: cannot write it") and err.count("\n") == 1
