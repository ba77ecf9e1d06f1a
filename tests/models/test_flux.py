"""FLUX.1 adapter against FluxPipeline; SD3.5 (qk-norm, dual attention) LoRA targets and skip-layer guidance."""

from __future__ import annotations

import math

import pytest
import torch

from diffalign import models
from diffalign.diffusion import flow
from diffalign.models import editing, flux, lora, tiny
from diffalign.types import SampleInfo


# image families (video families have 5-D latents: tests/models/test_wan.py)
IMAGE_FAMILIES = [f for f in tiny.FAMILIES if tiny.adapter_family(f) not in models.VIDEO_FAMILIES]


def test_pack_unpack_and_ids_match_flux_pipeline():
    from diffusers import FluxPipeline

    lat = torch.randn(2, 16, 12, 20)
    packed = flux.pack(lat)
    assert packed.shape == (2, 6 * 10, 64)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(lat, 2, 16, 12, 20), rtol=0, atol=0)
    assert torch.equal(flux.unpack(packed, 12, 20), lat)
    # the pipeline's unpack takes pixel sizes (vae_scale_factor 8): latent 12x20 = 96x160 px
    assert torch.equal(FluxPipeline._unpack_latents(packed, 96, 160, 8), lat)
    ids = flux.image_ids(12, 20)
    assert ids.shape == (60, 3) and ids.ndim == 2  # 2-D ids (3-D ids are deprecated)
    torch.testing.assert_close(ids, FluxPipeline._prepare_latent_image_ids(1, 6, 10, "cpu", torch.float32))
    with pytest.raises(ValueError, match="must be even"):
        flux.pack(torch.randn(1, 4, 7, 8))


def test_predict_is_what_flux_pipeline_computes(tiny_dirs):
    """One pipeline step: the transformer call FluxPipeline makes equals our predict on the unpacked latents
    (CLIP pooled + T5 at max_sequence_length 512, ids, timestep / 1000, guidance 3.5)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(tiny_dirs["flux"]))
    pipe.set_progress_bar_config(disable=True)
    calls = []
    inner = pipe.transformer.forward

    def spy(*args, **kwargs):
        out = inner(*args, **kwargs)
        calls.append((kwargs, out[0]))
        return out

    pipe.transformer.forward = spy
    pipe("a red circle", height=32, width=32, num_inference_steps=1, guidance_scale=3.5, output_type="latent")
    del pipe.transformer.forward
    ((kwargs, out),) = calls
    assert kwargs["img_ids"].ndim == 2 and kwargs["txt_ids"].ndim == 2
    assert kwargs["encoder_hidden_states"].shape[1] == 512

    adapter = flux.Adapter.from_components(pipe.components)
    assert adapter.guidance == 3.5 == kwargs["guidance"][0].item()
    x_t = flux.unpack(kwargs["hidden_states"], 16, 16)
    t = kwargs["timestep"] * 1000
    with torch.no_grad():
        ours = adapter.predict(x_t, t, adapter.encode_prompts(["a red circle"]))
    torch.testing.assert_close(ours, flux.unpack(out, 16, 16), rtol=1e-5, atol=1e-6)


def test_guidance_is_explicit_and_absent_for_schnell():
    dev = tiny.flux(0)
    assert flux.Adapter.from_components(dev).guidance == flux.DEFAULT_GUIDANCE == 3.5
    assert flux.Adapter.from_components(dev, guidance=1.0).guidance == 1.0
    schnell = tiny.flux(0, guidance_embeds=False)
    adapter = flux.Adapter.from_components(schnell)
    assert adapter.guidance is None
    adapter.predict(torch.randn(1, 4, 8, 8), torch.tensor([500.0]), adapter.encode_prompts(["x"]))
    with pytest.raises(ValueError, match="no guidance embedding"):
        flux.Adapter.from_components(schnell, guidance=3.5)


def test_flow_shift_is_explicit_for_dynamic_scheduler(tiny_dirs):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    adapter = models.load("flux", str(tiny_dirs["flux"]), weighting="logit_normal")
    assert adapter.scheduler.config.use_dynamic_shifting
    # diffusers' FLUX LoRA script indexes the scheduler's init table, which is unshifted under dynamic shifting
    assert adapter.process.shift == 1.0 == flow.training_shift(adapter.scheduler.config)
    torch.testing.assert_close(adapter.process.timestep_table, adapter.scheduler.timesteps, rtol=0, atol=0)
    assert adapter.process.weighting == "logit_normal"
    for tokens in (256, 1024, 4096):
        assert flow.resolution_shift(adapter.scheduler.config, tokens) == pytest.approx(
            math.exp(calculate_shift(tokens)), rel=1e-12
        )
    assert flow.resolution_shift({}, 4096) == pytest.approx(math.exp(1.15))  # FLUX at 1024 px: 3.158
    # the tiny VAE downsamples by 2: 32 px -> 16x16 latents -> 64 packed tokens
    assert adapter.resolution_shift(32) == pytest.approx(math.exp(calculate_shift(64)))
    fixed = models.load("flux", str(tiny_dirs["flux"]), shift=3.0)
    assert fixed.process.shift == 3.0
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        flow.FlowProcess.from_scheduler_config(adapter.scheduler.config)


def test_flux_vae_shift_and_scale(tiny_dirs):
    adapter = models.load("flux", str(tiny_dirs["flux"]))
    cfg = adapter.vae.config
    assert (cfg.shift_factor, cfg.scaling_factor) == (0.1159, 0.3611)
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    z = adapter.vae.encode(pixels).latent_dist.mean
    torch.testing.assert_close(adapter.encode_images(pixels), (z - cfg.shift_factor) * cfg.scaling_factor)


def test_flux_default_lora_targets_follow_the_diffusers_script(tiny_dirs):
    adapter = models.load("flux", str(tiny_dirs["flux"]))
    handle = lora.add_lora(adapter, lora.LoraSpec(rank=4))
    assert handle.targets == adapter.default_lora_targets()
    names = set(lora.trainable_parameters(adapter))
    for part in (
        "transformer_blocks.0.attn.to_add_out",
        "transformer_blocks.0.ff_context.net.2",
        "single_transformer_blocks.0.attn.to_q",
    ):
        assert any(part in n for n in names), part
    # text-encoder LoRA goes on CLIP only: FluxPipeline.save_lora_weights has no T5 slot
    adapter = models.load("flux", str(tiny_dirs["flux"]))
    handle = lora.add_lora(adapter, lora.LoraSpec(rank=4, text_encoder=True))
    assert handle.modules == ["transformer", "text_encoder"]


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_gradient_checkpointing_gives_the_same_gradients(tiny_dirs, family):
    grads = []
    for checkpointing in (False, True):
        small_source = {"adapter_kwargs": {"source_resolution": 32}} if family == "qwenimageedit" else {}
        adapter = models.load(tiny.adapter_family(family), str(tiny_dirs[family]), **small_source)
        torch.manual_seed(0)
        lora.add_lora(adapter, lora.LoraSpec(rank=4, init="default"))
        with torch.no_grad():
            for p in lora.trainable_parameters(adapter).values():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        if checkpointing:
            adapter.denoiser.enable_gradient_checkpointing()
        assert adapter.denoiser.is_gradient_checkpointing == checkpointing
        adapter.denoiser.train()
        x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        sources = torch.zeros(2, 3, 32, 32) if adapter.is_editing else None  # editing families: a source each
        cond = editing.encode(adapter, ["a", "b"], [SampleInfo((32, 32), (0, 0), (32, 32))] * 2, sources)
        adapter.predict(x, torch.tensor([100.0, 700.0]), cond).pow(2).mean().backward()
        # Qwen-Image's last block's text-stream outputs are discarded: its to_add_out / txt_mlp LoRA get no gradient
        grads.append({k: p.grad.clone() for k, p in lora.trainable_parameters(adapter).items() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-5, atol=1e-7)


# ---- SD3.5 ------------------------------------------------------------------------------------------------------
def test_sd35_reads_qk_norm_and_dual_attention(tiny_dirs):
    adapter = models.load("sd3", str(tiny_dirs["sd35"]))
    assert adapter.architecture == {"qk_norm": "rms_norm", "dual_attention_layers": (0,)}
    assert models.load("sd3", str(tiny_dirs["sd3"])).architecture == {"qk_norm": None, "dual_attention_layers": ()}


@pytest.mark.parametrize(
    "targets",
    [None, ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]],  # family default; the public scripts' list
)
def test_sd35_medium_lora_targets_hit_attn2(tiny_dirs, tmp_path, targets):
    """peft matches ``attn.to_q`` exactly or by suffix, so it misses ``attn2.to_q``: the adapter adds the twins."""
    import diffusers
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapter = models.load("sd3", str(tiny_dirs["sd35"]))
    handle = lora.add_lora(adapter, lora.LoraSpec(rank=4, targets=targets))
    assert {"attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"} <= set(handle.targets)
    dual = adapter.denoiser.transformer_blocks[0].attn2
    hit = {n for n, m in dual.named_modules() if isinstance(m, BaseTunerLayer)}
    assert hit == {"to_q", "to_k", "to_v", "to_out.0"}
    qk_norms = [m for n, m in adapter.denoiser.named_modules() if n.endswith(("norm_q", "norm_k"))]
    assert qk_norms and not any(isinstance(m, BaseTunerLayer) for m in qk_norms)  # RMSNorm: not a target
    # the stock pipeline loads the attn2 layers too
    with torch.no_grad():
        for p in lora.trainable_parameters(adapter).values():
            p.add_(0.1)
    lora.save_lora(adapter, tmp_path / "lora")
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(tiny_dirs["sd35"]))
    pipe.load_lora_weights(str(tmp_path / "lora"))
    loaded = {
        n for n, m in pipe.transformer.transformer_blocks[0].attn2.named_modules() if isinstance(m, BaseTunerLayer)
    }
    assert loaded == hit


def test_plain_sd3_targets_are_unchanged(tiny_dirs):
    adapter = models.load("sd3", str(tiny_dirs["sd3"]))
    assert adapter.resolve_lora_targets(["attn.to_q"]) == ("attn.to_q",)
    assert not any(t.startswith("attn2") for t in adapter.default_lora_targets())


def test_skip_layer_guidance_is_never_in_the_training_forward(tiny_dirs):
    """Sampling with SLG calls the transformer with skip_layers; ``predict`` (every training forward) never does."""
    from diffalign.terms.offline import group_errors
    from diffalign.types import SampleInfo

    adapter = models.load("sd3", str(tiny_dirs["sd35"]))
    lora.add_lora(adapter, lora.LoraSpec(rank=4))
    seen = []
    inner = adapter.denoiser.forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("skip_layers"))
        return inner(*args, **kwargs)

    adapter.denoiser.forward = spy
    info = [SampleInfo((32, 32), (0, 0), (32, 32))]
    group_errors(adapter, torch.randn(1, 2, 4, 16, 16), [0], prompts=["a"], info=info)
    assert seen == [None, None]  # policy and reference
    pipe = adapter.pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe(
        "a",
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=3.0,
        skip_guidance_layers=[1],
        skip_layer_guidance_start=0.0,
        skip_layer_guidance_stop=1.0,
        output_type="latent",
    )
    assert [1] in seen[2:]
    del adapter.denoiser.forward


def test_flux_loads_a_bf16_variant_and_the_reference_is_the_bf16_base(tiny_dirs, tmp_path):
    """Local folder with ``*.fp16.safetensors`` weights (``variant="fp16"``), loaded in bf16: the LoRA is fp32 and
    the reference (adapter off) equals a LoRA-free bf16 base bit for bit."""
    from diffusers import FluxPipeline

    FluxPipeline.from_pretrained(str(tiny_dirs["flux"])).save_pretrained(tmp_path / "m", variant="fp16")
    assert list((tmp_path / "m" / "transformer").glob("*.fp16.safetensors"))
    short = {"max_sequence_length": 32}  # bf16 matmuls are slow on CPU; the T5 length does not matter here
    base = models.load("flux", str(tmp_path / "m"), dtype="bf16", variant="fp16", adapter_kwargs=short)
    adapter = models.load("flux", str(tmp_path / "m"), dtype="bf16", variant="fp16", adapter_kwargs=short)
    assert adapter.dtype == torch.bfloat16 and adapter.vae.dtype == torch.float32
    lora.add_lora(adapter, lora.LoraSpec(rank=4, init="default"))
    assert {p.dtype for p in lora.trainable_parameters(adapter).values()} == {torch.float32}
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([100.0, 700.0])
    with torch.no_grad():
        cond = base.encode_prompts(["a", "b"])
        base_out = base.predict(x, t, cond)
        with adapter.reference():
            ref_out = adapter.predict(x, t, cond)
    assert base_out.dtype == torch.bfloat16 and torch.equal(ref_out, base_out)


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_latent_shape_is_the_vaes_and_matches_the_stock_pipeline(family):
    """One truth for every family: the VAE's latent channels and scale factor, which is what the stock pipeline
    samples (FLUX's transformer sees 4x as many channels, packed: not the latent shape)."""
    import diffusers

    components = getattr(tiny, family)(seed=0)
    adapter = models.from_components(tiny.adapter_family(family), components)
    pipe = getattr(diffusers, tiny.PIPELINES[family])(**components)
    assert adapter.vae_scale_factor == pipe.vae_scale_factor
    vae = components["vae"].config
    channels = vae.get("latent_channels") or vae["z_dim"]  # Qwen-Image's 3-D VAE calls it z_dim
    f = adapter.vae_scale_factor
    assert adapter.latent_shape(32) == (channels, 32 // f, 32 // f)
    assert adapter.latent_shape(32, 64) == (channels, 32 // f, 64 // f)
    if family in ("flux", "qwenimage", "flux2"):
        assert adapter.denoiser.config.in_channels == 4 * channels  # the packed input is not the latent shape
    if family in ("flux", "qwenimage", "zimage", "flux2"):
        with pytest.raises(ValueError, match="multiple of"):
            adapter.latent_shape(3 * f)  # an odd latent side cannot be packed 2x2
    with pytest.raises(ValueError, match="VAE factor"):
        adapter.latent_shape(f + 1)
