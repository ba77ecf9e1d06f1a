"""Training from the latent cache gives the same losses and LoRA as training from pixels (same seed)."""

from __future__ import annotations

import json

import pytest

from diffalign import config as dconfig
from diffalign import models
from diffalign.data import latent_cache
from tests.recipes.conftest import averaged_gradients, toy_overrides


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_cache_equals_pixels(recipe, tiny_dirs, tmp_path, family):
    extra = {"run.max_steps": 3, "run.log_every": 1, "run.save_every": 1, "run.keep_last": 3, "model.family": family}
    extra["data.crop"] = "random"
    pixel_over = toy_overrides(tiny_dirs[family], tmp_path / "pixels", **extra)
    cache_dir = tmp_path / "cache"
    cache_over = toy_overrides(tiny_dirs[family], tmp_path / "cached", **extra, **{"data.latent_cache": cache_dir})

    cfg = dconfig.load("toy/dpo", cache_over)
    adapter = models.load(family, str(tiny_dirs[family]))
    latent_cache.build(cfg, adapter, cache_dir)
    meta = json.loads((cache_dir / "meta.json").read_text())
    assert meta["items"] == 42 and meta["family"] == family  # 48 rows - 5 ties - 1 unlabeled; bad row kept as skipped

    recipe.main(["--config", "toy/dpo", *pixel_over])
    recipe.main(["--config", "toy/dpo", *cache_over])
    rows = [
        [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("pixels", "cached")
    ]
    assert len(rows[0]) == len(rows[1]) == 3
    for step, (a, b) in enumerate(zip(*rows, strict=True), start=1):
        # per-sample errors agree to float rounding (the VAE/text encoders ran on different batch sizes); the
        # policy errors only before any update (an AdamW element with a near-zero gradient may move by lr on either
        # side of 0, moving one error by up to lr times its gradient); the loss multiplies error differences by
        # beta/2 = 2500, so it gets a looser bound (the flipped elements move it only to second order)
        policy = ("loss/policy_err_w", "loss/policy_err_l") if step == 1 else ()
        for key in (*policy, "loss/ref_err_w", "loss/ref_err_l"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
    # the averaged gradients, not the weights after AdamW steps (ill-conditioned: see test_offline_pref's
    # test_two_processes_match_one_process_first_step): step 1 has policy == reference, so only the errors'
    # rounding (rel 1e-5, above) reaches it, through the winner-minus-loser difference that cancels ~10x: 1e-4;
    # later steps add DPO's beta/2 = 2500 times the rounding of four errors near 1: 2500 * 4e-5 = 0.1
    grads = [averaged_gradients(tmp_path / d, 3) for d in ("pixels", "cached")]
    for step, (ga, gb) in enumerate(zip(*grads, strict=True), start=1):
        tol = 1e-4 if step == 1 else 1e-4 + 2500 * 4e-5
        assert float((gb - ga).norm()) <= tol * float(ga.norm()), (step, float((gb - ga).norm() / ga.norm()))


def test_cache_mismatch_is_an_error(tiny_dirs, tmp_path):
    cache_dir = tmp_path / "cache"
    cfg = dconfig.load(
        "toy/dpo",
        toy_overrides(tiny_dirs["sd15"], tmp_path / "r", **{"data.latent_cache": cache_dir, "data.max_rows": 12}),
    )
    latent_cache.build(cfg, models.load("sd15", str(tiny_dirs["sd15"])), cache_dir)
    other = dconfig.load(
        "toy/dpo",
        toy_overrides(tiny_dirs["sd15"], tmp_path / "r", **{"data.latent_cache": cache_dir, "data.resolution": 64}),
    )
    with pytest.raises(ValueError, match=r"resolution: cache 32 != config 64"):
        latent_cache.LatentCache(cache_dir).check(other)
    with pytest.raises(FileNotFoundError, match=r"meta\.json"):
        latent_cache.LatentCache(tmp_path / "nowhere")
