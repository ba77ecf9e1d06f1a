"""Every user-facing failure reaches the terminal as ONE line, ``error: <what and the fix>``, exit status 1, and
the cheap ones arrive before any model loads; a fresh run never destroys another run's work.

In-process through ``diffalign.cli.main.main`` (the checks of ``diffalign run`` fail before it launches anything),
and as subprocesses for what happens inside a recipe process: a bad row under ``data.on_bad_row=raise`` with one
and two processes, Ctrl-C to a run started in the background, and ``--debug``.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from diffalign.cli.main import main
from diffalign.fileio import FolderLock
from tests.conftest import unused_port
from tests.recipes.conftest import ROOT, child_env, recipe_module, toy_overrides


DIFFALIGN = [sys.executable, "-m", "diffalign"]


def one_error_line(err: str) -> str:
    """The single line of ``err``; fails on a traceback or on more lines."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def tree_digest(folder: Path) -> dict[str, str]:
    """Content hash of every file under ``folder`` except the lock (which holds only who trains there)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def trained(tiny_dirs, tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished 4-step toy DPO run (checkpoints at 2 and 4, metrics every 2 steps) and its overrides."""
    out = tmp_path_factory.mktemp("used") / "run"
    extra = {"run.max_steps": 4, "run.save_every": 2, "run.keep_last": 100, "run.log_every": 2}
    overrides = toy_overrides(tiny_dirs["sd15"], out, **extra)
    recipe_module().main(["--config", "toy/dpo", *overrides])
    return out, overrides


def test_a_fresh_run_into_a_used_folder_is_refused_and_overwrite_moves_it_aside(trained, tmp_path, capsys):
    out, overrides = trained
    copy = tmp_path / "run"
    subprocess.run(["cp", "-a", str(out), str(copy)], check=True)
    overrides = [o for o in overrides if not o.startswith("run.output_dir=")] + [f"run.output_dir={copy}"]
    before = tree_digest(copy)
    argv = ["run", "offline_pref", "--config", "toy/dpo", *overrides, "run.max_steps=2", "lora.rank=8"]
    assert main(argv) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"run.output_dir={copy} already holds a run (checkpoints to step-00000004" in line
    assert "lora/ written" in line and "metrics.jsonl to step 4" in line
    assert "run.resume_from=latest" in line and "run.overwrite=true" in line
    assert tree_digest(copy) == before  # byte for byte
    # the recipe itself refuses too (a direct `python recipe.py` or `accelerate launch`), before the model loads
    with pytest.raises(Exception, match="already holds a run"):
        recipe_module().main(["--config", "toy/dpo", *argv[4:]])
    assert tree_digest(copy) == before
    recipe_module().main(["--config", "toy/dpo", *argv[4:], "run.overwrite=true"])
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and tree_digest(aside[0]) == before  # moved, nothing lost
    assert (copy / "lora").is_dir() and len((copy / "metrics.jsonl").read_text().splitlines()) >= 1
    assert [p.name for p in (copy / "checkpoints").iterdir() if p.name.startswith("step-")] == ["step-00000002"]


def test_resume_refusal_held_lock_and_overwrite_with_resume(trained, capsys):
    out, overrides = trained
    run = ["run", "offline_pref", "--config", "toy/dpo", *overrides]
    assert main([*run, "run.resume_from=latest", "optim.lr=0.5"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "cannot resume from" in line and "optim.lr: 0.001 -> 0.5" in line
    assert main([*run, "run.resume_from=latest", "run.overwrite=true"]) == 1
    assert "contradict" in one_error_line(capsys.readouterr().err)
    with FolderLock(out, "another trainer"):
        assert main([*run, "run.resume_from=latest", "run.max_steps=6"]) == 1
        line = one_error_line(capsys.readouterr().err)
    assert "is in use by another process: another trainer: pid" in line


def test_missing_model_data_column_prompts_tracker_and_folder_are_one_line_before_launch(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    base = toy_overrides(tiny_dirs["sd15"], out)
    run = ["run", "offline_pref", "--config", "toy/dpo"]
    cases = {
        "model.path=runs/tiny/sd15": "model.path='runs/tiny/sd15': no such folder (a local path; Hub ids are "
        "owner/name): write a tiny offline model there with `python -m diffalign.models.tiny sd15 runs/tiny/sd15`",
        "model.path=nobody/no-such-model": "model.path='nobody/no-such-model' is a Hub id that is not in the local "
        "cache, and HF_HUB_OFFLINE=1",
        f"data.path={tmp_path / 'nothing'}": f"data.path: data path '{tmp_path / 'nothing'}' does not exist",
        "validation.prompts_file=./missing.txt": "validation.prompts_file='./missing.txt': no such file or folder",
        "run.report_to=[tensorbord]": "run.report_to: unknown tracker 'tensorbord'; accelerate knows",
        f"run.output_dir={ROOT / 'README.md'}/x": "cannot be created:",
    }
    for override, words in cases.items():
        assert main([*run, *base, override]) == 1, override
        line = one_error_line(capsys.readouterr().err)
        assert words in line, (override, line)
    # a parquet without a column the format reads: named with the file, the format's columns and the fix
    table = pq.read_table(ROOT / "assets" / "pickapic_tiny" / "data" / "train-00000-of-00001.parquet")
    pq.write_table(table.drop(["label_1"]), tmp_path / "pairs.parquet")
    assert main([*run, *base, f"data.path={tmp_path / 'pairs.parquet'}"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "has no column 'label_1' (data.format=pickapic reads caption, jpg_0, jpg_1, label_0, label_1" in line
    assert not out.exists()  # nothing was created


def test_online_rl_batch_arithmetic_is_checked_for_the_process_count(capsys):
    assert main(["run", "--config", "duo/grpo", "--num-processes", "3", "--dry-run"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "optim.grad_accum=8 does not fit one round on 3 processes" in line
    assert main(["validate", "duo/grpo", "--num-processes", "3"]) == 1
    assert "does not fit one round on 3 processes" in one_error_line(capsys.readouterr().err)
    assert main(["run", "--config", "duo/grpo", "--num-processes", "2", "--dry-run"]) == 1
    assert "set optim.grad_accum=4" in one_error_line(capsys.readouterr().err)  # the fix, computed
    assert main(["run", "--config", "duo/grpo", "--num-processes", "2", "optim.grad_accum=4", "--dry-run"]) == 0


def test_dry_run_reports_every_launch_problem_in_one_line(capsys):
    """The flags' problems and the recipe's launch checks (``register_launch_check``) together, in the one
    ``N problems: a | b`` format that config loading and ``diffalign validate`` use too."""
    argv = ["run", "--config", "duo/grpo", "--num-processes", "3", "--num-machines", "2", "--dry-run"]
    assert main(argv) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: 3 problems: --num-processes 3 is not a multiple of --num-machines 2")
    assert " | --num-machines > 1 needs --main-process-ip" in line
    assert " | optim.grad_accum=8 does not fit one round on 3 processes" in line
    assert main(["validate", "toy/dpo", "optim.lrr=1", "loss.bta=2"]) == 1
    assert one_error_line(capsys.readouterr().err).startswith("error: 2 problems: ")


def test_shipped_configs_name_the_command_that_prepares_them(tmp_path, monkeypatch, capsys):
    """From an empty folder: the toy configs' tiny model and the world configs' labels are named with the command
    that writes them."""
    monkeypatch.chdir(tmp_path)
    assert main(["run", "offline_pref", "--config", "toy/dpo", "run.max_steps=2", "run.output_dir=X"]) == 1
    assert "`python -m diffalign.models.tiny sd15 runs/tiny/sd15`" in one_error_line(capsys.readouterr().err)
    assert main(["run", "--config", "duo/dpo", "run.output_dir=X"]) == 1
    assert "`diffalign quickstart --objective dpo` writes them" in one_error_line(capsys.readouterr().err)
    assert main(["run", "--config", "toy/dpo_world", "run.output_dir=X"]) == 1
    assert "`diffalign quickstart --world shapes --objective dpo`" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "X").exists()


def test_run_takes_the_recipe_from_the_config(capsys):
    assert main(["run", "--config", "duo/grpo", "run.max_steps=3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "recipes/online_rl.py" in out and "max_steps: 3" in out


def test_eval_with_a_missing_lora_folder_says_so_before_loading(tiny_dirs, tmp_path, capsys):
    argv = ["eval", "generate", "--family", "sd15", "--model", str(tiny_dirs["sd15"]), "--scorer", "clipscore"]
    argv += ["--prompts", str(ROOT / "assets" / "prompts" / "validation.txt"), "--out", str(tmp_path / "e")]
    assert main([*argv, "--lora", "runs/none/lora"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "LoRA folder runs/none/lora does not exist" in line


def _diffalign(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*DIFFALIGN, *args], cwd=cwd, env=child_env(), capture_output=True, text=True, **kw)


@pytest.mark.parametrize("processes", [1, 2])
def test_a_bad_row_under_raise_ends_in_one_error_line(tiny_dirs, tmp_path, processes):
    """Inside the recipe process (after training started): the child prints the line; with 2 processes the
    launcher's report of the failed child is dropped and the first child's line printed again at the end."""
    argv = ["run", "offline_pref", "--config", "toy/dpo", *toy_overrides(tiny_dirs["sd15"], tmp_path / "o")]
    argv += ["data.on_bad_row=raise", "run.max_steps=8", "--num-processes", str(processes)]
    if processes > 1:
        argv += ["--main-process-port", str(unused_port())]
    proc = _diffalign(argv, tmp_path, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "row 13: column 'jpg_1'" in last, proc.stderr[-3000:]
    assert "data.on_bad_row=skip skips such rows" in last


def test_debug_shows_the_traceback(tmp_path):
    proc = _diffalign(["validate", "toy/dpo", "optim.lrr=1", "--debug"], tmp_path, timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown key 'optim.lrr'")


def test_ctrl_c_to_a_background_run_stops_it_with_where_and_how_to_resume(tiny_dirs, tmp_path):
    """A shell starts background jobs with SIGINT ignored; SIGINT to the wrapper still stops the recipe, which
    says at which step it stopped and which checkpoint a resume continues from."""
    out = tmp_path / "o"
    argv = ["run", "offline_pref", "--config", "toy/dpo", *toy_overrides(tiny_dirs["sd15"], out)]
    argv += ["run.max_steps=100000", "run.save_every=2", "run.log_every=1"]
    proc = subprocess.Popen(
        [*DIFFALIGN, *argv],
        cwd=tmp_path,
        env=child_env(),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        deadline = time.time() + 180
        while not list((out / "checkpoints").glob("step-00000002")) and time.time() < deadline:
            time.sleep(0.5)
        assert (out / "checkpoints" / "step-00000002").is_dir()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: interrupted at step "), err[-2000:]
    assert "; last checkpoint step-0000000" in last and last.endswith("resume with run.resume_from=latest")
    assert not (out / ".lock").exists() or FolderLock(out, "test").release() is None  # the lock was let go
