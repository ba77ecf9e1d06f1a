"""``diffalign run``: validation before launch, ``--dry-run``, the launch command, exit-code propagation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from diffalign.cli import run as run_cmd
from diffalign.cli.main import main


@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if anything tries to start a child process."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"launched {args}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)


def test_dry_run_prints_config_summary_and_command(shipped, capsys, no_launch):
    argv = ["run", "offline_pref", "--config", "toy/dpo", "optim.grad_accum=4", "--dry-run", "--num-processes", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "grad_accum: 4" in out and "beta: 5000.0" in out
    assert "effective batch: 16 pairs = 2 per device x 2 processes x 4 accumulation" in out
    assert "images per optimizer step: 32" in out
    assert "--multi_gpu --num_processes 2 --num_machines 1" in out
    assert str(shipped / "configs" / "toy" / "dpo.yaml") in out and "optim.grad_accum=4" in out


def test_accelerate_command_for_two_processes(tmp_path):
    cmd = run_cmd.build_command(
        tmp_path / "r.py",
        tmp_path / "c.yaml",
        ["optim.lr=1e-4"],
        num_processes=2,
        main_process_port=29613,
        accelerate_args=["--mixed_precision", "no"],
        python="py",
    )
    assert cmd == [
        "py", "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", "29613",
        "--mixed_precision", "no",
        str(tmp_path / "r.py"), "--config", str(tmp_path / "c.yaml"), "optim.lr=1e-4",
    ]  # fmt: skip


def test_single_process_runs_the_script_directly(tmp_path):
    cmd = run_cmd.build_command("r.py", "c.yaml", ["a.b=1"], python="py")
    assert cmd == ["py", "r.py", "--config", "c.yaml", "a.b=1"]
    with_args = run_cmd.build_command("r.py", "c.yaml", accelerate_args=["--cpu"], python="py")
    assert with_args[:3] == ["py", "-m", "accelerate.commands.launch"] and "--multi_gpu" not in with_args


def test_num_processes_must_be_positive(shipped, capsys, no_launch):
    assert main(["run", "offline_pref", "--config", "toy/dpo", "--num-processes", "0"]) == 1
    assert "--num-processes" in capsys.readouterr().err


def test_child_env_uses_cpu_for_multi_process_without_cuda():
    assert run_cmd.child_env(2, {"A": "1"}, cuda_available=False) == {"A": "1", "ACCELERATE_USE_CPU": "true"}
    assert "ACCELERATE_USE_CPU" not in run_cmd.child_env(2, {}, cuda_available=True)
    assert "ACCELERATE_USE_CPU" not in run_cmd.child_env(1, {}, cuda_available=False)
    assert run_cmd.child_env(2, {"ACCELERATE_USE_CPU": "false"}, cuda_available=False)["ACCELERATE_USE_CPU"] == "false"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--config", "toy/dpo", "loss.bta=1"], "did you mean 'beta'?"),
        (["--config", "toy/dpo", "data.format=ranked"], "data.format='ranked'"),
        (["--config", "toy/nope"], "did you mean 'toy/dpo'?"),
    ],
)
def test_bad_config_fails_before_launch(shipped, capsys, no_launch, argv, needle):
    assert main(["run", "offline_pref", *argv]) == 1
    assert needle in capsys.readouterr().err


def test_unknown_recipe(shipped, capsys, no_launch):
    assert main(["run", "offline_prefs", "--config", "toy/dpo"]) == 1
    assert "did you mean 'offline_pref'?" in capsys.readouterr().err


def test_launch_passes_config_and_overrides_and_propagates_exit_code(shipped, tmp_path, monkeypatch):
    out = tmp_path / "child.json"
    monkeypatch.setenv("DIFFALIGN_TEST_OUT", str(out))
    monkeypatch.setenv("DIFFALIGN_TEST_EXIT", "3")
    assert main(["run", "offline_pref", "--config", "toy/dpo", "loss.beta=7", "run.max_steps=11"]) == 3
    child = json.loads(out.read_text())
    assert child["argv"][-2:] == ["loss.beta=7", "run.max_steps=11"]
    assert child["config"]["loss"]["beta"] == 7.0 and child["config"]["run"]["max_steps"] == 11


def test_recipe_given_as_a_path(shipped, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFALIGN_TEST_OUT", str(tmp_path / "child.json"))
    assert main(["run", str(shipped / "offline_pref.py"), "--config", "toy/dpo"]) == 0
    assert json.loads((tmp_path / "child.json").read_text())["config"]["loss"]["name"] == "dpo"


@pytest.mark.slow
def test_two_process_accelerate_launch(shipped, tmp_path, monkeypatch, free_port):
    """Two real processes (gloo on CPU); each writes its rank (~20 s)."""
    script = tmp_path / "ranks.py"
    script.write_text(
        "import os, sys\n"
        "from accelerate import Accelerator\n"
        "acc = Accelerator()\n"
        "open(os.path.join(os.environ['RANK_DIR'], str(acc.process_index)), 'w').write(str(acc.num_processes))\n"
    )
    monkeypatch.setenv("RANK_DIR", str(tmp_path))
    argv = ["run", str(script), "--config", "toy/dpo", "--num-processes", "2", "--main-process-port", str(free_port)]
    assert main(argv) == 0
    assert (tmp_path / "0").read_text() == "2" and (tmp_path / "1").read_text() == "2"


# SIG_DFL for SIGINT: a job started in the background by a script inherits SIGINT ignored (and Python then installs
# no KeyboardInterrupt handler); the test is about the wrapper forwarding it, not about that inheritance.
SLEEPER = """import os, signal, time
signal.signal(signal.SIGINT, signal.SIG_DFL)
with open(os.environ["SLEEPER_PID"] + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(os.environ["SLEEPER_PID"] + ".tmp", os.environ["SLEEPER_PID"])
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stopping_the_wrapper_stops_its_child(shipped, tmp_path, sig):
    """``kill`` (or Ctrl-C) on ``diffalign run`` reaches the recipe process, and the wrapper exits 128 + N."""
    script, pid_file = tmp_path / "sleeper.py", tmp_path / "child.pid"
    script.write_text(SLEEPER)
    env = {**os.environ, "SLEEPER_PID": str(pid_file)}
    cmd = [sys.executable, "-m", "diffalign", "run", str(script), "--config", "toy/dpo"]
    wrapper = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    child = None
    try:
        deadline = time.time() + 60
        while not pid_file.exists():
            assert time.time() < deadline and wrapper.poll() is None, "the child never started"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        wrapper.send_signal(sig)
        assert wrapper.wait(timeout=30) == 128 + sig
        deadline = time.time() + 10
        while _alive(child) and time.time() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the recipe process outlived its wrapper"
    finally:
        wrapper.kill()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)


def test_distributed_kind_selects_a_shipped_accelerate_config_and_passes_multi_node_flags():
    launch = run_cmd.Launch(
        num_processes=16, distributed="fsdp", num_machines=2, machine_rank=1, main_process_ip="10.0.0.1",
        main_process_port=29500,
    )  # fmt: skip
    cmd = run_cmd.build_command("r.py", "c.yaml", ["a.b=1"], python="py", launch=launch)
    assert cmd == [
        "py", "-m", "accelerate.commands.launch", "--config_file", str(run_cmd.accelerate_config("fsdp")),
        "--num_processes", "16", "--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "10.0.0.1",
        "--main_process_port", "29500", "r.py", "--config", "c.yaml", "a.b=1",
    ]  # fmt: skip
    for kind in run_cmd.DISTRIBUTED:
        assert run_cmd.accelerate_config(kind).is_file(), kind
    one = run_cmd.build_command("r.py", "c.yaml", python="py", launch=run_cmd.Launch(distributed="fsdp_offload"))
    assert "--config_file" in one and "--multi_gpu" not in one  # FSDP (offload) on one GPU still launches


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--distributed", "fsdpp"], "did you mean 'fsdp'"),
        (["--distributed", "zero3", "optim.name=adafactor"], "optim.name=adafactor under DeepSpeed: use adamw"),
        (["--num-processes", "3", "--num-machines", "2"], "not a multiple of --num-machines 2"),
        (["--num-processes", "4", "--num-machines", "2"], "needs --main-process-ip"),
        (["--num-processes", "4", "--num-machines", "2", "--machine-rank", "2", "--main-process-ip", "h"],
         "--machine-rank 2 must be in 0..1"),
    ],
)  # fmt: skip
def test_bad_launch_flags_fail_in_one_line_before_launch(shipped, capsys, no_launch, flags, needle):
    assert main(["run", "offline_pref", "--config", "toy/dpo", "--dry-run", *flags]) == 1
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_fsdp_is_refused_for_recipes_not_proven_sharded():
    from pathlib import Path

    assert run_cmd.sharding_problem("fsdp", Path("recipes/offline_pref.py")) is None
    assert run_cmd.sharding_problem("ddp", Path("recipes/online_rl.py")) is None
    assert run_cmd.sharding_problem("fsdp", Path("recipes/online_rl.py")) is None
    assert run_cmd.sharding_problem("fsdp", Path("recipes/reward_grad.py")) is None
    assert run_cmd.sharding_problem("fsdp", Path("recipes/dro.py")) is None
    assert "recipe my_recipe is not proven under FSDP" in run_cmd.sharding_problem("fsdp", Path("x/my_recipe.py"))


def test_deepspeed_is_checked_per_recipe_and_config():
    """``--distributed zero2|zero3``: the recipes proven under DeepSpeed run (other kinds are not its business), the
    others and the settings ZeRO cannot honour are one line each, before anything loads."""
    from pathlib import Path

    from diffalign import config

    dpo = config.load("toy/dpo")
    assert run_cmd.deepspeed_problem("zero2", Path("recipes/offline_pref.py"), dpo) is None
    assert run_cmd.deepspeed_problem("fsdp", Path("recipes/stepwise_pref.py"), dpo) is None
    assert set(run_cmd.ZERO_RECIPES) == {"offline_pref", "online_rl", "reward_grad", "selfnpo", "dro", "stepwise_pref"}
    for name, cfg in (("selfnpo", "toy/selfnpo"), ("stepwise_pref", "toy/lpo")):
        for kind in run_cmd.DEEPSPEED:
            assert run_cmd.deepspeed_problem(kind, Path(f"recipes/{name}.py"), config.load(cfg)) is None, (name, kind)
    dro = config.load("toy/dro")  # its shared EMA (ema.enabled) runs under ZeRO-2; ZeRO-3 needs it off
    assert run_cmd.deepspeed_problem("zero2", Path("recipes/dro.py"), dro) is None
    assert "ema.enabled=true under ZeRO-3" in run_cmd.deepspeed_problem("zero3", Path("recipes/dro.py"), dro)
    no_ema = config.load("toy/dro", ["ema.enabled=false"])
    assert run_cmd.deepspeed_problem("zero3", Path("recipes/dro.py"), no_ema) is None
    for name in ("train_lrm", "train_spm", "pretrain_toy"):  # the others keep FSDP2 / DDP
        assert f"recipe {name} is not proven under DeepSpeed" in run_cmd.deepspeed_problem(
            "zero3", Path(f"recipes/{name}.py"), dpo
        )
    ema = config.load("toy/dpo", ["ema.enabled=true"])
    assert run_cmd.deepspeed_problem("zero2", Path("recipes/offline_pref.py"), ema) is None
    assert "ema.enabled=true under ZeRO-3" in run_cmd.deepspeed_problem("zero3", Path("recipes/offline_pref.py"), ema)
    fp16 = config.load("toy/dpo", ["run.mixed_precision=fp16"])
    assert "fp16 under DeepSpeed" in run_cmd.deepspeed_problem("zero2", Path("recipes/offline_pref.py"), fp16)


def test_shipped_accelerate_configs_are_valid_for_accelerate():
    """Every shipped accelerate config loads as accelerate's ``ClusterConfig`` (unknown keys are its error), and every
    key of its ``fsdp_config`` / ``deepspeed_config`` is an ``accelerate launch`` option it turns into that option.
    tests/recipes/test_zero.py trains under zero2.yaml / zero3.yaml."""
    import yaml
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    options = {a.dest for a in launch_command_parser()._actions}  # argparse has no public list of its options
    expected = {
        "ddp": ("MULTI_GPU", {}),
        "fsdp": ("FSDP", {"fsdp_version": 2, "fsdp_offload_params": False}),
        "fsdp_offload": ("FSDP", {"fsdp_version": 2, "fsdp_offload_params": True}),
        "zero2": ("DEEPSPEED", {"zero_stage": 2}),
        "zero3": ("DEEPSPEED", {"zero_stage": 3}),
    }
    for kind in run_cmd.DISTRIBUTED:
        path = run_cmd.accelerate_config(kind)
        ClusterConfig.from_yaml_file(str(path))
        raw = yaml.safe_load(path.read_text())
        kind_type, settings = expected[kind]
        assert raw["distributed_type"] == kind_type and raw["mixed_precision"] == "no", kind
        section = raw.get("fsdp_config") or raw.get("deepspeed_config") or {}
        unknown = sorted(set(section) - options)
        assert not unknown, (kind, unknown)
        assert {k: section[k] for k in settings} == settings, kind


@pytest.mark.parametrize("kind", ["zero2", "zero3"])
def test_shipped_deepspeed_configs_build_accelerates_plugin(kind):
    """Every key of zero2.yaml / zero3.yaml's ``deepspeed_config`` is a field of accelerate's ``DeepSpeedPlugin`` (what
    ``accelerate launch`` builds from it), and the plugin built from them is the ZeRO stage the name says, with no
    offload; without deepspeed installed (the plugin's config is plain data)."""
    import dataclasses

    import yaml
    from accelerate.utils import DeepSpeedPlugin

    section = yaml.safe_load(run_cmd.accelerate_config(kind).read_text())["deepspeed_config"]
    fields = {f.name for f in dataclasses.fields(DeepSpeedPlugin)}
    assert set(section) <= fields, sorted(set(section) - fields)
    zero = DeepSpeedPlugin(**section).deepspeed_config["zero_optimization"]
    assert zero["stage"] == int(kind[-1])
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "none"
