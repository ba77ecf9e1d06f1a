"""The offline recipe trains, unchanged, on what ``label`` writes: DPO on the pairs, RankDPO on the ranked lists."""

from __future__ import annotations

import math

import pytest

from diffalign import losses
from tests.recipes.conftest import recipe_module, toy_overrides


@pytest.fixture(scope="module")
def recipe():
    return recipe_module()


def train(recipe, tiny_dir, out_dir, data_path, **extra):
    overrides = toy_overrides(tiny_dir, out_dir, **{"data.path": data_path, "run.max_steps": 2, **extra})
    return recipe.main(["--config", "toy/dpo", *overrides])


def test_dpo_trains_on_the_labelled_pairs(recipe, labelled, tiny_dirs, tmp_path):
    _, summary = labelled
    result = train(recipe, tiny_dirs["sd15"], tmp_path / "dpo", summary["pairs_dir"], **{"optim.batch_size": 2})
    assert result["step"] == 2 and all(math.isfinite(h["loss"]) for h in result["history"])
    assert result["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA init: policy == reference
    assert (result["lora_dir"] / "pytorch_lora_weights.safetensors").is_file()


def test_rankdpo_trains_on_the_labelled_lists(recipe, labelled, tiny_dirs, tmp_path):
    if "rankdpo" not in losses.available():
        pytest.skip("diffalign.losses.rankdpo is not there yet")
    out, _ = labelled
    extra = {"data.format": "ranked", "loss.name": "rankdpo", "optim.batch_size": 2}
    result = train(recipe, tiny_dirs["sd15"], tmp_path / "rankdpo", str(out / "ranked"), **extra)
    assert result["step"] == 2 and all(math.isfinite(h["loss"]) for h in result["history"])
    assert result["history"][-1]["loss"] > 0


def test_labels_carry_their_provenance_and_a_config_for_other_labels_is_refused(recipe, labelled, tiny_dirs, tmp_path):
    """``pairs/`` and ``ranked/`` carry ``provenance.json`` (scorers, prompts, generators); ``data.labelled_by``
    naming another scorer (another toy world's reward) stops before training with one line naming both."""
    import json
    import shutil

    from diffalign.errors import UserError  # ProvenanceError in the loader; a ConfigError from the checks before

    out, summary = labelled
    for folder in (out / "pairs", out / "ranked"):
        record = json.loads((folder / "provenance.json").read_text())
        assert record["scorers"] == ["blue", "contrast", "red"] and record["prompts"]["count"] == 3
        assert record["label_run"] == str(out.resolve()) and [g["name"] for g in record["generators"]] == [
            "base",
            "base+lora",
        ]
    copy = tmp_path / "copied_pairs"  # the record travels with a copied pairs/ folder
    shutil.copytree(out / "pairs", copy)
    for path in (summary["pairs_dir"], str(copy), str(copy / "data" / "*.parquet")):
        with pytest.raises(UserError) as err:
            train(recipe, tiny_dirs["sd15"], tmp_path / "refused", path, **{"data.labelled_by": "duofaithfulness"})
        text = str(err.value)
        assert (
            "\n" not in text
            and f"data.path={path} holds labels ranked by blue, contrast, red (prompts <list>, 3" in text
        )
        assert "but this config is for labels ranked by duofaithfulness (data.labelled_by)" in text
    assert not (tmp_path / "refused" / "lora").exists()
    result = train(recipe, tiny_dirs["sd15"], tmp_path / "ok", summary["pairs_dir"], **{"data.labelled_by": "red"})
    assert result["step"] == 2


def test_a_config_expecting_labels_refuses_data_without_provenance(recipe, tiny_dirs, tmp_path):
    from diffalign.errors import UserError  # ProvenanceError in the loader; a ConfigError from the checks before

    with pytest.raises(UserError, match=r"carries no label provenance \(provenance.json beside the data"):
        train(
            recipe,
            tiny_dirs["sd15"],
            tmp_path / "x",
            "diffalign://assets/pickapic_tiny",
            **{"data.labelled_by": "toyreward"},
        )


def test_every_world_config_that_reads_labels_expects_its_worlds_reward():
    """Both toy worlds' quickstarts label into runs/quickstart/labels: each world's configs name its own reward."""
    from diffalign import config as dconfig
    from diffalign.toy import worlds

    checked = {}
    for name in dconfig.config_names():
        path = getattr(dconfig.load(name).data, "path", "")
        if not path.startswith("runs/quickstart/labels"):
            continue
        world = [w for w in worlds.WORLDS.values() if _is_world_config(name, w.config("{objective}"))]
        assert len(world) == 1, name
        assert dconfig.load(name).data.labelled_by == world[0].reward, name
        checked[world[0].name] = checked.get(world[0].name, 0) + 1
    assert checked.keys() == {"duo", "shapes"} and min(checked.values()) >= 10, checked


def _is_world_config(name: str, pattern: str) -> bool:
    head, _, tail = pattern.partition("{objective}")
    return name.startswith(head) and name.endswith(tail)
