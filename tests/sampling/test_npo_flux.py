"""NPO guidance on FLUX.1: it runs on true CFG (the negative-prompt call takes the negative LoRA) and says clearly
why it cannot run on guidance-distilled sampling alone (no unconditional branch)."""

from __future__ import annotations

import pytest
import torch

from diffalign import models
from diffalign.models import lora, tiny
from diffalign.sampling.npo import npo_guidance


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("npo_flux")
    adapter = models.from_components("flux", tiny.flux(0))
    lora.add_lora(adapter, lora.LoraSpec(rank=4, alpha=8))
    lora.save_lora(adapter, root / "zero")
    for name, seed in (("pos", 1), ("neg", 2)):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in lora.trainable_parameters(adapter).values():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        lora.save_lora(adapter, root / name)
    return root


@pytest.fixture
def pipe():
    pipe = tiny.pipeline("flux", seed=0)
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe


def generate(pipe, **kwargs) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    args = {"height": 32, "width": 32, "num_inference_steps": 2, "output_type": "latent", "generator": gen}
    return pipe("a red cube", **{**args, **kwargs}).images


def test_guidance_distilled_sampling_has_no_branch_for_the_negative_model(pipe, loras):
    cls = type(pipe)
    with npo_guidance(pipe, negative=loras / "neg"):
        with pytest.raises(ValueError, match=r"guidance-distilled.*true_cfg_scale > 1 and a negative_prompt"):
            generate(pipe, guidance_scale=3.5)
        with pytest.raises(ValueError, match="needs an unconditional branch"):
            generate(pipe, true_cfg_scale=4.0)  # no negative prompt: FluxPipeline would skip true CFG
    assert type(pipe) is cls and "cache_context" not in vars(pipe.transformer)


def test_true_cfg_runs_the_negative_prompt_call_with_the_negative_lora(pipe, loras):
    plain = generate(pipe, true_cfg_scale=4.0, negative_prompt="")
    with npo_guidance(pipe, negative=loras / "zero"):  # a negative LoRA that adds exactly nothing
        assert torch.equal(generate(pipe, true_cfg_scale=4.0, negative_prompt=""), plain)

    seen = []
    den = pipe.transformer
    with npo_guidance(pipe, negative=loras / "neg", positive=loras / "pos") as npo:
        inner = den.forward  # the NPO wrapper

        def spy(*args, **kwargs):
            out = inner(*args, **kwargs)
            seen.append(tuple(den.active_adapters()))
            return out

        den.forward = spy
        guided = generate(pipe, true_cfg_scale=4.0, negative_prompt="")
        den.forward = inner
    assert seen == [(npo.positive,), (npo.positive, npo.negative)] * 2  # cond, uncond per step
    assert not torch.equal(guided, plain)
    assert torch.equal(generate(pipe, true_cfg_scale=4.0, negative_prompt=""), plain)  # pipeline left as it was
