"""``diffalign ls | cp | validate`` and the top-level dispatcher, run in-process through ``main``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from diffalign import config
from diffalign.cli import ls
from diffalign.cli.main import main


def test_ls_recipes_skips_private_scripts(shipped, capsys):
    assert main(["ls", "recipes"]) == 0
    out = capsys.readouterr().out
    assert "offline_pref  Offline preference optimisation (fake recipe for CLI tests)." in out
    assert "_shared" not in out


def test_ls_configs_lists_names_with_first_comment(shipped, capsys):
    assert main(["ls", "configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["sdxl/dpo_lora  SDXL + LoRA DPO.", "toy/dpo        Toy SD1.5 DPO."]


def test_ls_losses_shows_docstring_and_defaults(capsys):
    assert main(["ls", "losses"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("dpo "))
    end = next(i for i in range(start + 1, len(lines) + 1) if i == len(lines) or not lines[i].startswith(" "))
    dpo_row = " ".join(line.strip() for line in lines[start:end])  # a long row wraps under its description
    assert "Diffusion-DPO" in dpo_row and "beta=5000.0" in dpo_row


def test_ls_everything_has_headings(shipped, capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for heading in ("recipes:", "configs:", "losses:"):
        assert heading in out
    assert "  toy/dpo" in out


def test_ls_new_kind_is_one_entry(shipped, capsys, monkeypatch):
    monkeypatch.setitem(ls.KINDS, "widgets", lambda: [("toy_brightness", "mean brightness")])
    assert main(["ls", "widgets"]) == 0
    assert capsys.readouterr().out == "toy_brightness  mean brightness\n"


def test_ls_unknown_kind_is_a_usage_error(shipped, capsys):
    assert main(["ls", "recipe"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_cp_recipe_and_refuse_overwrite(shipped, tmp_path, capsys):
    dest = tmp_path / "mine" / "my_recipe.py"
    assert main(["cp", "offline_pref", str(dest)]) == 0
    assert dest.read_text() == (shipped / "offline_pref.py").read_text()
    dest.write_text("edited")
    assert main(["cp", "offline_pref", str(dest)]) == 1
    assert "--force" in capsys.readouterr().err
    assert dest.read_text() == "edited"
    assert main(["cp", "offline_pref", str(dest), "--force"]) == 0
    assert dest.read_text() == (shipped / "offline_pref.py").read_text()


def test_cp_config_into_a_folder(shipped, tmp_path, capsys):
    assert main(["cp", "sdxl/dpo_lora", str(tmp_path)]) == 0
    copied = tmp_path / "dpo_lora.yaml"
    assert copied.read_text() == (shipped / "configs" / "sdxl" / "dpo_lora.yaml").read_text()
    assert str(copied) in capsys.readouterr().out


def test_cp_unknown_name_suggests(shipped, tmp_path, capsys):
    assert main(["cp", "toy/dop", str(tmp_path / "x.yaml")]) == 1
    assert "did you mean 'toy/dpo'?" in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()


def test_validate_prints_resolved_config(shipped, capsys):
    assert main(["validate", "toy/dpo", "loss.beta=10", "optim.grad_accum=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = {
        "recipe": "offline_pref",
        **config.to_dict(config.load("toy/dpo", ["loss.beta=10", "optim.grad_accum=3"])),
    }
    assert printed == expected
    assert printed["loss"]["beta"] == 10.0 and printed["lora"]["rank"] == 8


def test_validate_failure_exits_1_without_traceback(shipped, capsys):
    assert main(["validate", "toy/dpo", "optim.lrr=1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown key 'optim.lrr'") and "did you mean 'lr'?" in err
    assert "Traceback" not in err


def test_validate_yaml_path_and_cross_field_failure(shipped, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text((shipped / "configs" / "toy" / "dpo.yaml").read_text().replace("max_steps: 20", "max_steps: 0"))
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and "run.max_steps=0" in err


@pytest.mark.parametrize(
    "argv",
    [[], ["validate", "toy/dpo", "--bogus"], ["cp", "a", "b", "x=1"], ["validate", "toy/dpo", "--", "x"], ["nope"]],
)
def test_usage_errors_exit_2(shipped, argv, capsys):
    assert main(argv) == 2


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "validate" in capsys.readouterr().out


def test_python_dash_m_diffalign():
    proc = subprocess.run([sys.executable, "-m", "diffalign", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "usage: diffalign" in proc.stdout


def test_validate_checks_local_paths_in_one_line(shipped, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    out = f"run.output_dir={tmp_path / 'new' / 'out'}"
    assert main(["validate", "toy/dpo", f"validation.prompts_file={prompts}", out]) == 0
    assert not (tmp_path / "new").exists()  # checked, not created
    capsys.readouterr()
    argv = ["validate", "toy/dpo", "data.path=/data/toy_pairs", "validation.prompts_file=/no/prompts.txt", out]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: 2 problems: data.path: data path '/data/toy_pairs'")
    assert "validation.prompts_file='/no/prompts.txt': no such file or folder" in err and "Traceback" not in err
    assert main([*argv, "--no-paths"]) == 0  # a config written for another machine
