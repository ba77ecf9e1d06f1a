"""``diffalign label`` in-process: generator specs, protocol overrides, outputs, resume, one-line errors."""

from __future__ import annotations

import json

import pytest

from diffalign.cli.main import main
from tests.label.helpers import make_lora


@pytest.fixture(scope="module")
def lora(tiny_dirs, tmp_path_factory):
    return make_lora(tiny_dirs["sd15"], tmp_path_factory.mktemp("cli_label_lora"))


def base_args(tiny, lora, prompts, out, *extra):
    return [
        "label",
        "--prompts", str(prompts),
        "--generator", f"name=sd15,family=sd15,path={tiny},images=3",
        "--generator", f"name=sd15-dpo,family=sd15,path={tiny},lora={lora},images=1,cfg=3",
        "--scorer", "tests.label.helpers:red",
        "--scorer", "tests.label.helpers:blue,batch_size=2",
        "--steps", "2", "--cfg", "5",
        "--out", str(out),
        *extra,
    ]  # fmt: skip


def test_label_command_writes_both_datasets_and_resumes(tiny_dirs, lora, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"caption": c, "tag": "x"}) + "\n" for c in ("a cat", "a dog")))
    out = tmp_path / "out"
    args = base_args(tiny_dirs["sd15"], lora, prompts, out, "--ranking", "zscore", "--pairs", "all", "--seed", "5")
    assert main(args) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out[: captured.out.index("\ntrain on")])
    assert (summary["records"], summary["images_per_prompt"], summary["pair_rows"]) == (2, 4, 12)
    assert summary["ranking"] == "zscore" and f"data.path={out / 'pairs'}" in captured.out
    assert "labelling: 100%" in captured.err  # the progress bar
    rows = [json.loads(line) for line in (out / "ranked" / "train.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a cat", "a dog"]
    assert rows[1]["models"] == ["sd15", "sd15", "sd15", "sd15-dpo"] and rows[1]["seeds"] == [9, 10, 11, 12]
    assert sum(rows[0]["scores"]) == pytest.approx(0.0, abs=1e-9)  # mean z-scores sum to zero over the list
    generators = json.loads((out / "label.json").read_text())["generation"]["generators"]
    assert [g["protocol"]["guidance_scale"] for g in generators] == [5.0, 3.0]
    assert [g["protocol"]["steps"] for g in generators] == [2, 2]

    assert main([*args, "--no-progress"]) == 0  # resume: nothing left to do
    assert json.loads(capsys.readouterr().out.split("\ntrain on")[0])["labelled_now"] == 0
    assert main([*args[:-2], "--seed", "6"]) == 1
    err = capsys.readouterr().err
    assert "other generation settings (differing: seed)" in err and "--overwrite" in err
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert main([*args[:-2], "--seed", "6", "--overwrite", "--no-progress"]) == 0  # the old run moved aside, whole
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("out.old-")]
    assert {
        p.relative_to(aside): p.read_bytes() for p in aside.rglob("*") if p.is_file() and p.name != ".lock"
    } == before
    assert json.loads((out / "label.json").read_text())["generation"]["seed"] == 6


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--generator", "name=x,family=sd15,pth=m"], "unknown key 'pth'; did you mean 'path'"),
        (["--resolution", "64", "--height", "64"], "pass --resolution or --height/--width, not both"),
        (["--ranking", "win_fractions"], "unknown ranking 'win_fractions'; did you mean 'win_fraction'"),
        (["--ranking", "raw:green"], "ranking raw:green names no scorer; scorers: red, blue"),
        (["--scorer", "pikscore"], "unknown scorer 'pikscore'"),
        (["--scorer", "hpsv2,variant=v2.1"], "scorer 'hpsv2' has no option 'variant'; choices: path, version,"),
        (["-k", "5"], "sum to 4, not images_per_prompt=5"),
    ],
)
def test_label_errors_are_one_line(tiny_dirs, lora, tmp_path, capsys, extra, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    assert main([*base_args(tiny_dirs["sd15"], lora, prompts, tmp_path / "out"), *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "records.jsonl").exists()
