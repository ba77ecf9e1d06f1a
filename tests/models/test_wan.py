"""The Wan 2.1 T2V adapter on a tiny random-init Wan: 5-D video latents as WanPipeline makes them, the pipeline's
text encoding and decoding, the UniPC ``flow_shift`` forward process, ELBO terms that average over frames, LoRA
export to a stock ``WanPipeline``."""

from __future__ import annotations

import math

import pytest
import torch

from diffalign import losses, models
from diffalign.models import lora, tiny, wan
from diffalign.terms.offline import group_errors, pair_terms, per_sample_error


FRAMES = 5  # 2 latent frames


@pytest.fixture(scope="module")
def components():
    return tiny.wan(seed=0)


@pytest.fixture(scope="module")
def adapter(components):
    return models.from_components("wan", components, num_frames=FRAMES)


@pytest.fixture(scope="module")
def pipe(components):
    import diffusers

    p = diffusers.WanPipeline(**components)
    p.set_progress_bar_config(disable=True)
    return p


def test_latent_shape_has_a_frame_axis_and_matches_the_pipeline(adapter, pipe):
    shape = adapter.latent_shape(16, 32)
    c = adapter.vae.config.z_dim
    assert shape == (c, wan.latent_frames(FRAMES), 2, 4) == (c, 2, 2, 4)
    latents = pipe.prepare_latents(1, c, 16, 32, FRAMES, torch.float32, "cpu", torch.Generator().manual_seed(0))
    assert tuple(latents.shape[1:]) == shape
    assert adapter.vae_scale_factor == pipe.vae_scale_factor_spatial == 8
    assert adapter.temporal_scale_factor == pipe.vae_scale_factor_temporal == 4
    with pytest.raises(ValueError, match="multiple of 16"):
        adapter.latent_shape(8)  # one latent cell: the (1, 2, 2) patch does not fit
    assert wan.latent_frames(81) == 21 and wan.latent_frames(33) == 9


def test_num_frames_must_be_4k_plus_1(components):
    with pytest.raises(ValueError, match=r"data.num_frames=6: .* use 5 or 9"):
        models.from_components("wan", components, num_frames=6)
    assert models.from_components("wan", components).num_frames == 81  # WanPipeline's default


def test_forward_process_reads_unipc_flow_shift(adapter, components):
    assert type(components["scheduler"]).__name__ == "UniPCMultistepScheduler"
    assert adapter.process.shift == components["scheduler"].config.flow_shift == 3.0
    assert adapter.process.num_train_timesteps == 1000
    shifted = wan.Adapter.make_process(components["scheduler"], shift=5.0)
    assert shifted.shift == 5.0
    with pytest.raises(ValueError, match=r"model\.flow_shift=resolution"):
        adapter.resolution_shift(480)


def test_prompt_embeddings_match_the_pipeline(adapter, pipe):
    prompts = ["a red  ball\nbouncing ", ""]
    ours = adapter.encode_prompts(prompts)["encoder_hidden_states"]
    theirs, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=512)
    assert ours.shape == theirs.shape == (2, 512, 32)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    length = int(pipe.tokenizer(["a red ball bouncing"]).attention_mask[0].__len__())
    assert ours[0, length:].abs().max() == 0  # cut to the true length, zero-padded back


def test_encode_decode_use_the_vae_mean_std_as_the_pipeline(adapter):
    video = torch.rand(2, 3, FRAMES, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = adapter.encode_images(video)
    assert latents.shape == (2, *adapter.latent_shape(16))
    raw = adapter.vae.encode(video).latent_dist.mean
    mean = torch.tensor(adapter.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(adapter.vae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(latents, (raw - mean) / std)
    # WanPipeline decodes with latents / (1 / std) + mean (pipeline_wan.py, the output_type != "latent" branch)
    decoded = adapter.decode_latents(latents)
    expected = adapter.vae.decode(latents / (1.0 / std) + mean).sample.clamp(-1, 1)
    assert decoded.shape == video.shape
    torch.testing.assert_close(decoded, expected)
    with pytest.raises(ValueError, match="videos"):
        adapter.encode_images(video[:, :, 0])


def test_per_sample_error_averages_over_frames():
    """The ELBO term of a video is the mean over C, frames, h, w: an error confined to one of F' latent frames
    counts 1/F' of the same error on every frame."""
    target = torch.zeros(2, 4, 3, 2, 2)
    pred = target.clone()
    pred[0, :, 1] = 1.0  # sample 0: one latent frame of three is off by 1
    pred[1] = 1.0  # sample 1: every frame off by 1
    err = per_sample_error(pred, target)
    assert err.shape == (2,)
    assert err[0].item() == pytest.approx(1 / 3) and err[1].item() == 1.0


def test_dpo_is_log2_at_init_on_video_latents():
    a = models.from_components("wan", tiny.wan(seed=0), num_frames=FRAMES)
    lora.add_lora(a, lora.LoraSpec(rank=4))
    latents = torch.randn(2, 2, *a.latent_shape(16), generator=torch.Generator().manual_seed(0))
    errors = group_errors(a, latents, [3, 4], prompts=["a red ball", "a cat"])
    terms = pair_terms(errors, a.process.num_train_timesteps)
    assert torch.equal(terms.policy_w, terms.ref_w) and torch.equal(terms.policy_l, terms.ref_l)
    dpo = losses.get("dpo")
    assert dpo.loss(terms, dpo.Config()).loss.item() == pytest.approx(math.log(2), abs=1e-7)


def test_lora_targets_attention_of_every_block_and_exports_to_wan_pipeline(pipe, tmp_path):
    a = models.from_components("wan", tiny.wan(seed=0), num_frames=FRAMES)
    handle = lora.add_lora(a, lora.LoraSpec(rank=4, init="default"))
    assert handle.targets == wan.LORA_TARGETS
    names = {n.rsplit(".lora_A", 1)[0] for n in lora.trainable_parameters(a) if ".lora_A" in n}
    for block in range(len(a.denoiser.blocks)):
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                assert f"transformer.blocks.{block}.{attn}.{proj}" in names
    assert not any("ffn" in n for n in names)
    with torch.no_grad():
        for p in lora.trainable_parameters(a).values():
            p.add_(0.1 * torch.randn_like(p))
    lora.save_lora(a, tmp_path)

    def sample():
        gen = torch.Generator().manual_seed(0)
        return pipe("a red ball", num_inference_steps=2, height=16, width=16, num_frames=FRAMES, generator=gen,
                    output_type="pt").frames  # fmt: skip

    before = sample()
    pipe.load_lora_weights(str(tmp_path), adapter_name="t")
    try:
        assert not torch.equal(sample(), before)
        pipe.disable_lora()
        assert torch.equal(sample(), before)
    finally:
        pipe.enable_lora()
        pipe.delete_adapters("t")


def test_no_text_encoder_lora(components):
    a = models.from_components("wan", components, num_frames=FRAMES)
    with pytest.raises(ValueError, match=r"lora\.text_encoder=true"):
        lora.add_lora(a, lora.LoraSpec(rank=4, text_encoder=True))


def test_reference_is_the_base_and_gradient_checkpointing_keeps_gradients():
    base = models.from_components("wan", tiny.wan(seed=0), num_frames=FRAMES)
    grads = []
    for checkpointing in (False, True):
        a = models.from_components("wan", tiny.wan(seed=0), num_frames=FRAMES)
        torch.manual_seed(0)
        lora.add_lora(a, lora.LoraSpec(rank=4, init="default"))
        with torch.no_grad():
            for p in lora.trainable_parameters(a).values():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        if checkpointing:
            a.denoiser.enable_gradient_checkpointing()
        a.denoiser.train()
        x = torch.randn(2, *a.latent_shape(16), generator=torch.Generator().manual_seed(0))
        t = torch.tensor([100.0, 700.0])
        cond = a.encode_prompts(["a", "b"])
        with torch.no_grad(), a.reference():
            assert torch.equal(a.predict(x, t, cond), base.predict(x, t, cond))
        a.predict(x, t, cond).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in lora.trainable_parameters(a).values()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_adapter_pipeline_is_a_stock_wan_pipeline(adapter):
    pipe = adapter.pipeline()
    assert type(pipe).__name__ == "WanPipeline" and pipe.transformer is adapter.denoiser


def test_unipc_grid_is_the_wan_scheduler_grid(components):
    """online.spacing=unipc steps on exactly the sigmas WanPipeline's UniPC scheduler (and flow_grpo's Wan rollout)
    steps on."""
    from diffalign.sampling.grids import flow_sigmas

    scheduler = components["scheduler"]
    for n in (2, 5, 20):
        scheduler.set_timesteps(n)
        assert torch.equal(flow_sigmas(n, scheduler.config.flow_shift, 1000, "unipc"), scheduler.sigmas.float())


def test_flow_grpo_wan_sde_step():
    """form=flow_grpo_wan: std s sqrt(-dt) with s = sigma_min + (sigma_max - sigma_min) sigma, the Flow-GRPO mean, and
    the KL scale s sqrt(-dt) (flow_grpo wan_pipeline_with_logprob.sde_step_with_logprob, scripts/train_wan2_1.py)."""
    from diffalign.sampling.grids import flow_sigmas
    from diffalign.sampling.sde import Grid, SDESpec, sde_step

    sigmas = flow_sigmas(4, 3.0, 1000, "unipc")
    grid = Grid(sigmas[:-1] * 1000, sigmas, "flow")
    gen = torch.Generator().manual_seed(0)
    x, v, noise = (torch.randn(2, 4, 2, 2, 2, generator=gen) for _ in range(3))
    for j in range(4):
        out = sde_step(grid, SDESpec(form="flow_grpo_wan", noise_level=1.0), v, x, j, noise=noise)
        sigma, nxt = sigmas[j], sigmas[j + 1]
        dt = nxt - sigma
        s = sigmas[-1] + (sigmas[1] - sigmas[-1]) * sigma
        mean = x * (1 + s**2 / (2 * sigma) * dt) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
        std = s * torch.sqrt(-dt)
        torch.testing.assert_close(out.mean, mean)
        torch.testing.assert_close(out.prev_sample, mean + std * noise)
        torch.testing.assert_close(out.std.flatten(), std.expand(2))
        torch.testing.assert_close(out.kl_scale, out.std)
        log_prob = -((out.prev_sample - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
        torch.testing.assert_close(out.log_prob, log_prob.mean(dim=(1, 2, 3, 4)))


def test_image_only_tools_refuse_the_video_family_in_one_line():
    from diffalign.eval.runner import EvalError, GenerationProtocol
    from diffalign.label.config import Generator, LabelError

    with pytest.raises(EvalError, match="video families are not supported"):
        GenerationProtocol(family="wan", model="Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    with pytest.raises(LabelError, match="makes videos; label scores images only"):
        Generator(name="w", family="wan", path="Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
