"""Memory options of a frozen base with an fp32 LoRA: each is a config key and keeps the reference pass exact.

On CPU: training from cached T5/CLIP embeddings with the text encoders never loaded (FLUX), the resolution shift,
8-bit AdamW (when bitsandbytes is installed), clear errors for the GPU-only quantized bases. On a GPU
(``-m gpu``): an NF4 FLUX base whose reference pass equals the quantized base exactly.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffalign import config as dconfig
from diffalign import models
from diffalign.data import latent_cache
from diffalign.models import loading, lora
from tests.recipes.conftest import toy_overrides


def test_flux_trains_from_cached_embeddings_without_loading_text_encoders(recipe, tiny_dirs, tmp_path, monkeypatch):
    extra = {"run.max_steps": 2, "run.log_every": 1, "model.family": "flux", "data.max_rows": 16}
    pixel_over = toy_overrides(tiny_dirs["flux"], tmp_path / "pixels", **extra)
    cache_dir = tmp_path / "cache"
    cached = {"data.latent_cache": cache_dir, "model.load_text_encoders": "false"}
    cache_over = toy_overrides(tiny_dirs["flux"], tmp_path / "cached", **extra, **cached)
    cfg = dconfig.load("toy/dpo", cache_over)
    latent_cache.build(cfg, models.load("flux", str(tiny_dirs["flux"])), cache_dir)

    loaded = []
    real = loading.load_components

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        loaded.append(sorted(out))
        return out

    monkeypatch.setattr(loading, "load_components", spy)
    recipe.main(["--config", "toy/dpo", *pixel_over])
    recipe.main(["--config", "toy/dpo", *cache_over])
    assert "text_encoder_2" in loaded[0]
    assert loaded[1] == ["scheduler", "transformer", "vae"]  # no CLIP, no T5
    rows = [
        [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("pixels", "cached")
    ]
    assert rows[1][0]["loss"] == pytest.approx(math.log(2), rel=1e-6)  # reference == base at LoRA init
    # the policy errors only before any update: after an AdamW step an element with a near-zero gradient may move
    # by lr on either side of 0 (see test_offline_pref), which moves one error by up to lr times its gradient; the
    # reference errors (LoRA off) do not depend on the updates
    for step, (a, b) in enumerate(zip(*rows, strict=True), start=1):
        policy = ("loss/policy_err_w", "loss/policy_err_l") if step == 1 else ()
        for key in (*policy, "loss/ref_err_w", "loss/ref_err_l"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key


def test_adapter_without_text_encoders_says_what_to_do(tiny_dirs):
    adapter = models.load("flux", str(tiny_dirs["flux"]), load_text_encoders=False)
    assert adapter.text_encoders == [] and list(adapter.named_modules()) == ["transformer"]
    with pytest.raises(RuntimeError, match=r"without text encoders.*data\.latent_cache"):
        adapter.encode_prompts(["a"])
    with pytest.raises(RuntimeError, match="without text encoders"):
        lora.add_lora(adapter, lora.LoraSpec(text_encoder=True))


def test_flow_shift_resolution_is_the_pipeline_shift_at_the_training_resolution(tiny_dirs, tmp_path):
    from diffalign.training import loop

    cfg = dconfig.load(
        "toy/dpo",
        toy_overrides(tiny_dirs["flux"], tmp_path, **{"model.family": "flux", "model.flow_shift": "resolution"}),
    )
    adapter = loop.build_adapter(cfg, torch.device("cpu"))
    assert adapter.process.shift == pytest.approx(adapter.resolution_shift(cfg.data.resolution))
    assert adapter.process.shift != 1.0
    number = dconfig.load(
        "toy/dpo", toy_overrides(tiny_dirs["flux"], tmp_path, **{"model.family": "flux", "model.flow_shift": 2.5})
    )
    assert loop.build_adapter(number, torch.device("cpu")).process.shift == 2.5


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"model.quantize": "nf4"}, "model.quantize='nf4' computes in model.dtype"),
        ({"model.load_text_encoders": "false"}, "needs data.latent_cache"),
        ({"model.guidance": 3.5}, "model.guidance applies to guidance-distilled FLUX.1"),
        ({"model.flow_shift": "resolution"}, "model.flow_shift='resolution' applies to flow models"),
        ({"model.timestep_sampling": "mode"}, "applies to flow models"),
        ({"optim.name": "adamw9bit"}, "did you mean 'adamw8bit'"),
    ],
)
def test_memory_option_config_errors(tiny_dirs, tmp_path, overrides, needle):
    with pytest.raises(dconfig.ConfigError, match=None) as err:
        dconfig.load("toy/dpo", toy_overrides(tiny_dirs["sd15"], tmp_path, **overrides))
    assert needle in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU messages of GPU-only options")
@pytest.mark.parametrize(("kind", "needle"), [("nf4", "needs a CUDA GPU"), ("float8", "compute capability >= 8.9")])
def test_quantized_base_on_cpu_says_it_needs_a_gpu(tiny_dirs, kind, needle):
    with pytest.raises(RuntimeError, match=needle):
        models.load("flux", str(tiny_dirs["flux"]), dtype="bf16", quantize=kind)


def test_adamw8bit_runs(recipe, tiny_dirs, tmp_path):
    pytest.importorskip("bitsandbytes", reason="optim.name=adamw8bit needs the 'memory' extra (bitsandbytes)")
    over = toy_overrides(tiny_dirs["sd15"], tmp_path / "r", **{"run.max_steps": 2, "optim.name": "adamw8bit"})
    result = recipe.main(["--config", "toy/dpo", *over])
    assert result["history"][0]["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert all(math.isfinite(h["loss"]) for h in result["history"])
    assert (result["lora_dir"] / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["nf4", "float8"])
def test_quantized_flux_reference_is_the_quantized_base(tiny_dirs, kind):
    pytest.importorskip("bitsandbytes" if kind == "nf4" else "torchao")
    base = models.load("flux", str(tiny_dirs["flux"]), dtype="bf16", quantize=kind).to("cuda")
    adapter = models.load("flux", str(tiny_dirs["flux"]), dtype="bf16", quantize=kind).to("cuda")
    lora.add_lora(adapter, lora.LoraSpec(rank=4, init="default"))
    assert all(p.dtype == torch.float32 for p in lora.trainable_parameters(adapter).values())
    x, t = torch.randn(2, 4, 16, 16, device="cuda"), torch.tensor([100.0, 700.0], device="cuda")
    cond = base.encode_prompts(["a", "b"])
    with torch.no_grad():
        base_out = base.predict(x, t, cond)
        with adapter.reference():
            ref_out = adapter.predict(x, t, cond)
    assert torch.equal(ref_out, base_out)
    adapter.predict(x, t, cond).float().pow(2).mean().backward()
    assert all(p.grad is not None for p in lora.trainable_parameters(adapter).values())


def test_new_configs_are_listed_and_validate(capsys):
    from diffalign.cli.main import main

    assert main(["ls", "configs"]) == 0
    out = capsys.readouterr().out
    for name in ("flux/dpo_lora", "flux/dpo_lora_24gb", "sd35/dpo_lora", "sd35/dpo_lora_large"):
        assert name in out
        assert main(["validate", name, "--no-paths"]) == 0, name  # hub ids, not cached here
    out = capsys.readouterr().out
    assert "family: flux" in out and "guidance: 3.5" in out and "quantize: nf4" in out


def test_quantized_denoiser_dtype_is_its_compute_dtype():
    """bitsandbytes stores NF4 weights as uint8 parameters (FLUX's first one is a Linear weight): the adapter feeds
    its inputs in the compute dtype, the first floating-point parameter, as diffusers' ``ModelMixin.dtype``."""
    from diffalign.models import tiny

    adapter = models.from_components("flux", tiny.flux(0))
    den = adapter.denoiser
    name, weight = next(den.named_parameters())
    owner, _, attr = name.rpartition(".")
    packed = torch.zeros(weight.numel() // 2, 1, dtype=torch.uint8)
    setattr(den.get_submodule(owner), attr, torch.nn.Parameter(packed, requires_grad=False))
    den.is_quantized = True
    assert next(den.parameters()).dtype == torch.uint8
    assert adapter.dtype == torch.float32
