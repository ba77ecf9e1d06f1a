"""``diffalign ls scorers``, whole-sentence ``ls configs`` descriptions, and the ``key=value`` usage lines."""

from __future__ import annotations

import pytest

from diffalign import scorers
from diffalign.cli import ls
from diffalign.cli.main import main


@pytest.mark.parametrize(
    ("text", "sentence"),
    [
        ("Toy DPO. Second sentence.", "Toy DPO."),
        ("DDPO (Black et al. 2023; x) on the\n   duo world. More.", "DDPO (Black et al. 2023; x) on the duo world."),
        (
            "ReFL (ImageReward, Sec. 4.1) as a LoRA, e.g. sd15. Next.",
            "ReFL (ImageReward, Sec. 4.1) as a LoRA, e.g. sd15.",
        ),
        ("The quickstart (`diffalign quickstart. --x`). DRaFT-K.", "The quickstart (`diffalign quickstart. --x`)."),
        ("Version 2.1 of it (v2. 1) ends here! Not here.", "Version 2.1 of it (v2. 1) ends here!"),
        ("no end at all", "no end at all"),
        ("", ""),
    ],
)
def test_first_sentence(text, sentence):
    assert ls.first_sentence(text) == sentence


def test_ls_configs_shows_the_whole_first_sentence_wrapped(shipped, capsys, monkeypatch):
    long = (
        "# Long SDXL DPO: a first sentence that runs over three comment lines (Wallace et al. 2023, Sec. 4)\n"
        "# and goes on past the first line, so a listing of the first line alone would cut it in the middle,\n"
        "# ending here. A second sentence that is not shown.\n"
    )
    path = shipped / "configs" / "sdxl" / "dpo_lora.yaml"
    path.write_text(long + "\n# a later comment\n" + path.read_text().split("\n", 1)[1])
    monkeypatch.setenv("COLUMNS", "60")
    assert main(["ls", "configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("sdxl/dpo_lora  Long SDXL DPO:")
    assert all(len(line) <= 60 for line in lines)
    desc_lines = lines[: lines.index("toy/dpo        Toy SD1.5 DPO.")]
    assert all(line.startswith(" " * 15) for line in desc_lines[1:])  # wrapped under the description column
    shown = " ".join(line.strip() for line in desc_lines).removeprefix("sdxl/dpo_lora ").strip()
    assert shown == ls.first_sentence(long.replace("#", ""))
    assert shown.endswith("ending here.") and "second sentence" not in shown


def test_every_shipped_config_description_is_whole_sentences():
    rows = ls.configs()
    assert len(rows) > 50
    cut = [(name, desc) for name, desc in rows if not desc.endswith((".", "!", "?"))]
    assert cut == []


def test_ls_scorers_lists_every_registered_scorer_with_its_docstring(capsys):
    assert main(["ls", "scorers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines if not line.startswith(" ")}
    assert sorted(rows) == sorted(scorers.available() + scorers.available_step_aware())
    assert "PickScore" in rows["pickscore"] and "HPSv2" in rows["hpsv2"]
    assert rows["toyreward"].split(None, 1)[1].startswith("the toy world's preference")  # no ``toyreward``: prefix
    assert "[step-aware]" in rows["spm"] and "[step-aware]" in rows["lrm"]
    assert "[step-aware]" not in rows["pickscore"]


def test_ls_everything_includes_scorers(shipped, capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "\nscorers:\n" in out and "  pickscore" in out


@pytest.mark.parametrize(
    ("command", "usage_tail"), [("validate", "config [key=value ...]"), ("run", "[recipe] [key=value ...]")]
)
def test_usage_shows_key_value_overrides(command, usage_tail, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    usage = out.split("\n\n", 1)[0]
    assert usage.startswith(f"usage: diffalign {command} [-h]")
    assert usage.endswith(usage_tail)
    assert "config overrides (key=value):" in out and "optim.lr=1e-5" in out
    assert main([command]) == 2  # a usage error repeats the usage line
    assert usage_tail in capsys.readouterr().err


def test_overrides_still_reach_validate_anywhere_after_the_subcommand(shipped, capsys):
    assert main(["validate", "toy/dpo", "loss.beta=7", "--recipe", "offline_pref", "optim.lr=3"]) == 0
    out = capsys.readouterr().out
    assert "beta: 7.0" in out and "lr: 3.0" in out


def test_a_listing_piped_into_head_ends_quietly(tmp_path):
    """`diffalign ls configs | head -1`: the reader closes the pipe after one line; no BrokenPipeError traceback."""
    import subprocess
    import sys

    script = f"{sys.executable} -m diffalign ls configs | head -n 1"
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.count("\n") == 1
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
