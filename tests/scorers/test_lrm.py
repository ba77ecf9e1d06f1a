"""LPO's latent reward model on tiny SD1.5 / SDXL / SD3: the trunk reproduces the denoiser's own down/mid (or MMDiT
block) activations, VFE guides the mid feature only, the score is exp(tau) cos, it learns a separable toy preference
from noisy latents, and save_pretrained/load reproduce scores exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffalign import models, scorers
from diffalign.models import tiny
from diffalign.scorers import _stepaware, lrm


PROMPTS = ["a cat", "a dog", "a cat"]


@pytest.fixture(scope="module")
def adapters():
    return {family: models.from_components(family, getattr(tiny, family)(seed=0)) for family in lrm.FAMILIES}


def timesteps(family: str) -> torch.Tensor:
    return torch.tensor([10.0, 500.0, 990.0]) if family == "sd3" else torch.tensor([1, 501, 951])


def reference_features(adapter, latents, t, prompts, num_blocks):
    """Pooled activations captured by hooks during the adapter's full denoiser forward (up blocks included)."""
    den, caps, hooks = adapter.denoiser, [], []
    if adapter.family == "sd3":
        hooks.append(
            den.transformer_blocks[num_blocks - 1].register_forward_hook(lambda m, i, o: caps.append(o[1].mean(1)))
        )
    else:
        for block in den.down_blocks:  # a down block returns (hidden, res_samples); the stage is before downsampling
            hooks.append(
                block.register_forward_hook(lambda m, i, o: caps.append(o[1][len(m.resnets) - 1].mean((2, 3))))
            )
        hooks.append(den.mid_block.register_forward_hook(lambda m, i, o: caps.append(o.mean((2, 3)))))
    info = _stepaware.default_info(latents, adapter.vae_scale_factor)
    with torch.no_grad():
        adapter.predict(latents, t, adapter.encode_prompts(prompts, info))
    for hook in hooks:
        hook.remove()
    return caps


@pytest.mark.parametrize("family", lrm.FAMILIES)
def test_trunk_and_text_reproduce_the_diffusion_model(adapters, family):
    adapter = adapters[family]
    torch.manual_seed(0)
    scorer = lrm.from_adapter(adapter, guidance_scale=1.0)
    model = scorer.model
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    t = timesteps(family)
    cond, text = model.encode_text(PROMPTS, adapter, like=latents)
    with torch.no_grad():
        feats = model.trunk(latents, t, cond)
    want = reference_features(adapter, latents, t, PROMPTS, model.config.sd3_num_blocks)
    assert len(feats) == len(want) == (1 if family == "sd3" else 3)
    for got, ref in zip(feats, want, strict=True):
        assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    info = _stepaware.default_info(latents, adapter.vae_scale_factor)
    for key, value in adapter.encode_prompts(PROMPTS, info).items():
        assert torch.allclose(cond[key].float(), value.float(), atol=1e-6), key
    assert not hasattr(model.trunk, "unet") or len(model.trunk.unet.up_blocks) == 0  # no up blocks, no decoder
    assert torch.equal(text[0], text[2]) and not torch.equal(text[0], text[1])  # distinct prompts encoded once
    dims = {"sd15": (16 + 32 + 32, 32), "sdxl": (16 + 32 + 32, 16), "sd3": (16, 32)}[family]
    assert (model.visual_projection.in_features, model.config.text_dim) == dims


def test_vfe_guides_the_mid_feature_and_score_is_scaled_cosine(adapters):
    adapter = adapters["sd15"]
    torch.manual_seed(0)
    model = lrm.from_adapter(adapter, guidance_scale=7.5).model
    latents, t = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(2)), timesteps("sd15")
    with torch.no_grad():
        cond, text = model.encode_text(PROMPTS, like=latents)
        uncond, _ = model.encode_text([""] * 3, like=latents)
        fc, fu = model.trunk(latents, t, cond), model.trunk(latents, t, uncond)
        mid = fu[-1] + 7.5 * (fc[-1] - fu[-1])
        v = model.visual_projection(torch.cat([*fc[:-1], mid], dim=-1))
        want = model.logit_scale.exp() * F.cosine_similarity(v, model.text_projection(text), dim=-1)
        got = model(latents, t, PROMPTS)
    assert torch.allclose(got, want, atol=1e-5)
    assert model.logit_scale.item() == pytest.approx(2.6592)
    assert torch.equal(model.text_projection.weight, torch.eye(32))  # text_projection_init="identity"


def toy_pairs(n: int, gen: torch.Generator):
    """Separable in latent space, by prompt: for "a bright photo" the brighter latent wins, for "a dark photo" the
    darker one. Brightness alone does not decide, so an untrained model sits near chance."""
    which = torch.randint(0, 2, (n,), generator=gen)
    sign = (1 - 2 * which).float().view(-1, 1, 1, 1)
    win = torch.randn(n, 4, 8, 8, generator=gen) + 0.5 * sign
    lose = torch.randn(n, 4, 8, 8, generator=gen) - 0.5 * sign
    return win, lose, [("a bright photo", "a dark photo")[i] for i in which]


def test_lrm_learns_a_separable_toy_preference_from_noisy_latents(adapters):
    adapter, grid = adapters["sd15"], torch.tensor(lrm.TIMESTEP_GRID)
    torch.manual_seed(0)
    model = lrm.from_adapter(adapter).model
    gen = torch.Generator().manual_seed(100)
    train_w, train_l, train_p = toy_pairs(128, gen)
    eval_w, eval_l, eval_p = toy_pairs(64, gen)
    eval_t = grid[torch.arange(64) % len(grid)]
    eval_gen = torch.Generator().manual_seed(7)
    eval_xw = adapter.process.add_noise(eval_w, torch.randn(eval_w.shape, generator=eval_gen), eval_t)
    eval_xl = adapter.process.add_noise(eval_l, torch.randn(eval_l.shape, generator=eval_gen), eval_t)

    def accuracy() -> float:
        with torch.no_grad():
            return (model(eval_xw, eval_t, eval_p) > model(eval_xl, eval_t, eval_p)).float().mean().item()

    before = accuracy()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    labels = torch.tensor([[1.0, 0.0]]).expand(16, 2)
    for _ in range(25):
        idx = torch.randint(0, 128, (16,), generator=gen)
        t = grid[torch.randint(0, len(grid), (16,), generator=gen)]
        x_w = adapter.process.add_noise(train_w[idx], torch.randn(16, 4, 8, 8, generator=gen), t)
        x_l = adapter.process.add_noise(train_l[idx], torch.randn(16, 4, 8, 8, generator=gen), t)
        prompts = [train_p[i] for i in idx]
        scores = model(torch.cat([x_w, x_l]), torch.cat([t, t]), prompts + prompts)
        loss = _stepaware.pairwise_loss(scores[:16], scores[16:], labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = accuracy()
    assert 0.3 <= before <= 0.7, before  # untrained: near chance (measured 0.55)
    assert after >= 0.85, (before, after)  # measured 1.0


@pytest.mark.parametrize("family", lrm.FAMILIES)
def test_save_load_round_trip_reproduces_scores(adapters, family, tmp_path):
    adapter = adapters[family]
    torch.manual_seed(0)
    scorer = lrm.from_adapter(adapter, batch_size=2)
    with torch.no_grad():  # move every trained part away from its copy of the base model
        for p in scorer.model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 1e-2)
    latents, t = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(3)), timesteps(family)
    before = scorer(latents, t, PROMPTS, adapter=adapter)
    out = scorer.save_pretrained(tmp_path / "lrm")
    back = scorers.load_step_aware("lrm", out, adapter=adapter if family == "sd3" else None, batch_size=2)
    after = back(latents, t, PROMPTS)
    assert before.shape == (3,) and before.dtype == torch.float32 and before.device.type == "cpu"
    assert torch.equal(before, after), (before, after)
    assert back.config == scorer.config and back.name == "lrm"
    assert isinstance(back, _stepaware.StepScorer)


def test_text_projection_from_a_clip_checkpoint(adapters, clip_model_dir):
    from transformers import CLIPModel

    model = lrm.from_adapter(adapters["sd15"], projection_dim=16, text_projection_init=clip_model_dir).model
    want = CLIPModel.from_pretrained(clip_model_dir).text_projection.weight
    assert torch.equal(model.text_projection.weight, want)


def test_errors_name_the_problem(adapters):
    from diffalign.models import lora

    with pytest.raises(ValueError, match="must be in \\[1, 2\\]"):
        lrm.from_adapter(adapters["sd3"], sd3_num_blocks=3)
    sd3 = lrm.from_adapter(adapters["sd3"])
    with pytest.raises(ValueError, match="pass adapter="):
        sd3.model(torch.zeros(1, 4, 16, 16), torch.tensor([10.0]), ["x"])
    with pytest.raises(ValueError, match="square"):
        lrm.from_adapter(adapters["sd15"], projection_dim=8)
    policy = models.from_components("sd15", tiny.sd15(seed=0))
    lora.add_lora(policy, lora.LoraSpec(rank=2))
    with pytest.raises(ValueError, match="carries LoRA layers"):
        lrm.from_adapter(policy)
