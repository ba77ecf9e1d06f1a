"""Full fine-tuning (``models.full``): the reference seam swaps in a frozen base copy, or refuses without one; the
truncated-SVD LoRA of trained - base loads in a stock pipeline and, at full rank, gives the trained weights back."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffalign import losses, models
from diffalign.models import full, lora, tiny
from diffalign.terms.offline import group_errors, pair_terms
from diffalign.types import SampleInfo


FAMILIES = ["sd15", "sdxl", "sd3", "sd35", "flux"]
INFO = SampleInfo(original_size=(32, 32), crop_top_left=(0, 0), target_size=(32, 32))


def _errors(adapter):
    latents = torch.randn(2, 2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    errors = group_errors(adapter, latents, [5, 6], prompts=["a red circle", "a cat"], info=[INFO] * 2)
    return pair_terms(errors, adapter.process.num_train_timesteps)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_mode_dpo_is_log2_at_init_and_the_reference_stays_the_base(tiny_dirs, family):
    adapter = models.load(tiny.adapter_family(family), str(tiny_dirs[family]))
    base = {k: v.clone() for k, v in adapter.denoiser.state_dict().items()}
    handle = full.make_full(adapter, reference_dtype="fp32")
    params = lora.trainable_parameters(adapter)
    assert len(params) == len(list(adapter.denoiser.parameters()))  # every denoiser weight trains
    assert all(p.dtype == torch.float32 for p in params.values()) and handle.has_reference
    terms = _errors(adapter)
    assert torch.equal(terms.policy_w, terms.ref_w) and torch.equal(terms.policy_l, terms.ref_l)
    dpo = losses.get("dpo")
    out = dpo.loss(terms, dpo.Config())
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)

    optimizer = torch.optim.SGD(params.values(), lr=1e-2)
    for _ in range(2):
        dpo.loss(_errors(adapter), dpo.Config()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = _errors(adapter)
    assert torch.equal(after.ref_w, terms.ref_w)  # the reference pass is the unchanged base
    assert not torch.equal(after.policy_w, terms.policy_w)
    ref_state = adapter.reference_denoiser.state_dict()
    assert all(torch.equal(ref_state[k], base[k]) for k in base)
    assert all(not p.requires_grad for p in adapter.reference_denoiser.parameters())


def test_no_reference_copy_refuses_a_reference_pass(tiny_dirs):
    adapter = models.load("sd15", str(tiny_dirs["sd15"]))
    full.make_full(adapter, reference_dtype=None)
    assert adapter.reference_denoiser is None
    with pytest.raises(RuntimeError, match="without a reference copy"), adapter.reference():
        pass


def test_low_precision_reference_still_gives_fp32_errors(tiny_dirs):
    adapter = models.load("sd15", str(tiny_dirs["sd15"]))
    full.make_full(adapter, reference_dtype="bf16")
    assert {p.dtype for p in adapter.reference_denoiser.parameters()} == {torch.bfloat16}
    assert adapter.dtype == torch.float32  # the trained copy
    terms = _errors(adapter)
    assert terms.ref_w.dtype == torch.float32
    torch.testing.assert_close(terms.ref_w, terms.policy_w, rtol=0.05, atol=1e-3)  # bf16 rounding of the weights


def test_svd_of_a_rank_one_delta_is_exact_and_keeps_the_whole_norm():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    base = {k: v.clone() for k, v in layer.state_dict().items()}
    u, v = torch.randn(5, 1), torch.randn(1, 6)
    with torch.no_grad():
        layer.weight.add_(u @ v)
    tensors, ranks, kept = full.extract_lora(nn.Sequential(layer), {f"0.{k}": t for k, t in base.items()}, rank=3)
    assert ranks == {"0": 3}  # min(rank, 5, 6); the two extra singular values are ~0
    torch.testing.assert_close(tensors["0.lora_B.weight"] @ tensors["0.lora_A.weight"], u @ v, atol=1e-5, rtol=0)
    assert kept == pytest.approx(1.0, abs=1e-6)
    one, _, kept_one = full.extract_lora(nn.Sequential(layer), {f"0.{k}": t for k, t in base.items()}, rank=1)
    torch.testing.assert_close(one["0.lora_B.weight"] @ one["0.lora_A.weight"], u @ v, atol=1e-5, rtol=0)
    assert kept_one == pytest.approx(1.0, abs=1e-6)


def test_svd_lora_at_full_rank_gives_the_trained_weights_in_a_stock_pipeline(tiny_dirs, tmp_path):
    """Every Linear and Conv2d weight of the UNet moved at random; the full-rank SVD LoRA, loaded by a stock
    ``load_lora_weights`` and fused, reproduces them to fp32 rounding, and the images change."""
    import diffusers

    adapter = models.load("sd15", str(tiny_dirs["sd15"]))
    base = {k: v.clone() for k, v in adapter.denoiser.state_dict().items()}
    full.make_full(adapter, reference_dtype=None)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter.denoiser.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    tensors, ranks, kept = full.extract_lora(adapter.denoiser, base, rank=4096, conv=True)
    assert 0.9 < kept < 1.0  # biases and norms moved too; a LoRA cannot hold those
    layers = full.trained_delta_layers(adapter.denoiser, conv=True)
    assert set(ranks) == set(layers)
    out = lora.save_lora_layers(adapter, tmp_path / "lora", {"unet": (tensors, full.lora_config(ranks, 4096))})

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_dirs["sd15"]))
    pipe.set_progress_bar_config(disable=True)
    before = _sample(pipe)
    pipe.load_lora_weights(str(out))
    assert not torch.equal(_sample(pipe), before)
    pipe.fuse_lora()
    fused = dict(pipe.unet.named_modules())
    for name, layer in layers.items():
        got = fused[name].base_layer.weight if hasattr(fused[name], "base_layer") else fused[name].weight
        torch.testing.assert_close(got, layer.weight.detach(), atol=2e-5, rtol=1e-4, msg=name)


def _sample(pipe) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return pipe("a red circle", num_inference_steps=2, height=32, width=32, generator=gen, output_type="pt").images


def test_text_encoders_train_fully_with_frozen_copies_for_the_reference(tiny_dirs):
    adapter = models.load("sdxl", str(tiny_dirs["sdxl"]))
    full.make_full(adapter, reference_dtype="fp32", text_encoders=True)
    assert adapter.trains_text_encoders()
    names = set(lora.trainable_parameters(adapter))
    assert any(n.startswith("text_encoder.") for n in names) and any(n.startswith("text_encoder_2.") for n in names)
    terms = _errors(adapter)
    assert torch.equal(terms.policy_w, terms.ref_w)  # DPO = log 2 at init, text encoders included
    with torch.no_grad():
        for p in adapter.text_encoders[0].parameters():
            p.add_(0.1)
    moved = _errors(adapter)
    assert torch.equal(moved.ref_w, terms.ref_w) and not torch.equal(moved.policy_w, terms.policy_w)
    with adapter.reference():
        assert adapter.text_encoders is adapter.reference_text_encoders
    assert all(not p.requires_grad for m in adapter.reference_text_encoders for p in m.parameters())
