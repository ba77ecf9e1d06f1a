"""A throwaway ``recipes/`` folder (one recipe script, two configs) selected with ``DIFFALIGN_RECIPES``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from diffalign.losses import dpo  # noqa: F401  the configs below bind dpo.Config: a broken import fails, never skips


FAKE_RECIPE = '''"""Offline preference optimisation (fake recipe for CLI tests).

Follows the recipe contract: ``recipe.py --config PATH [overrides...]`` and ``diffalign.config.load``.
"""

import argparse
import json
import os
import sys

from diffalign import config

parser = argparse.ArgumentParser()
parser.add_argument("--config", required=True)
args, overrides = parser.parse_known_args()
cfg = config.load(args.config, overrides)
with open(os.environ["DIFFALIGN_TEST_OUT"], "w") as f:
    json.dump({"argv": sys.argv[1:], "config": config.to_dict(cfg)}, f)
sys.exit(int(os.environ.get("DIFFALIGN_TEST_EXIT", "0")))
'''

TOY_DPO = {
    "model": {"family": "sd15", "path": "MODEL"},  # the fixture writes a folder with a model_index.json there
    "data": {"path": "diffalign://assets/pickapic_tiny", "resolution": 64},
    "loss": {"name": "dpo", "beta": 5000},
    "optim": {"lr": 1e-5, "batch_size": 2},
    "run": {"output_dir": "runs/toy", "max_steps": 20, "save_every": 10},
}


@pytest.fixture
def shipped(tmp_path, monkeypatch) -> Path:
    """``tmp/recipes`` with ``offline_pref.py``, a private helper and configs ``toy/dpo``, ``sdxl/dpo_lora``.

    The toy config's model folder exists (a ``model_index.json`` is all ``diffalign run``'s checks look at; the fake
    recipe loads no model) and its data is the shipped fixture, so the configs pass the checks before a launch.
    """
    model = tmp_path / "tiny-sd15"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    toy = {**TOY_DPO, "model": {"family": "sd15", "path": str(model)}}
    root = tmp_path / "recipes"
    (root / "configs" / "toy").mkdir(parents=True)
    (root / "configs" / "sdxl").mkdir()
    (root / "offline_pref.py").write_text(FAKE_RECIPE)
    (root / "_shared.py").write_text('"""Private helper, not a recipe."""\n')
    (root / "configs" / "toy" / "dpo.yaml").write_text("# Toy SD1.5 DPO.\n" + yaml.safe_dump(toy))
    sdxl = {**toy, "model": {"family": "sdxl", "path": "stabilityai/sdxl", "dtype": "bf16"}}
    sdxl["run"] = {**toy["run"], "mixed_precision": "bf16"}
    (root / "configs" / "sdxl" / "dpo_lora.yaml").write_text("# SDXL + LoRA DPO.\n" + yaml.safe_dump(sdxl))
    monkeypatch.setenv("DIFFALIGN_RECIPES", str(root))
    return root
