"""Qwen-Image, Z-Image and FLUX.2 adapters against their stock diffusers pipelines on tiny random-init models: the
prompt encoding equals the pipeline's, ``predict`` equals the transformer called as the pipeline calls it, the VAE
round trip and latent geometry use the VAE's channel count, and the shipped configs validate."""

from __future__ import annotations

import math

import pytest
import torch

from diffalign import models
from diffalign.models import lora, tiny


@pytest.fixture(scope="module")
def qwen():
    components = tiny.qwenimage(0)
    pipe = tiny.pipeline("qwenimage")
    return models.from_components("qwenimage", pipe.components), pipe, components


def test_qwenimage_prompt_encoding_and_forward_match_the_pipeline(qwen):
    from diffalign.models.flux import pack, unpack

    adapter, pipe, _ = qwen
    prompts = ["a red circle", "dog"]
    cond = adapter.encode_prompts(prompts)
    embeds, mask = pipe.encode_prompt(prompts, max_sequence_length=512)
    width = embeds.shape[1]
    assert cond["encoder_hidden_states"].shape[1] == 512 and not cond["encoder_hidden_states"][:, width:].any()
    assert torch.equal(cond["encoder_hidden_states"][:, :width], embeds)
    assert torch.equal(cond["encoder_hidden_states_mask"][:, :width], mask)
    x = torch.randn(2, *adapter.latent_shape(32))
    with torch.no_grad():
        out = adapter.predict(x, torch.tensor([700.0, 300.0]), cond)
        ref = pipe.transformer(
            hidden_states=pack(x),
            timestep=torch.tensor([0.7, 0.3]),
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, 8, 8)]] * 2,
            return_dict=False,
        )[0]
    assert torch.equal(out, unpack(ref, 16, 16))


def test_qwenimage_geometry_vae_and_guidance(qwen):
    from diffalign.models.flux import pack

    adapter, _, _ = qwen
    assert adapter.latent_shape(32) == (4, 16, 16) and adapter.vae_scale_factor == 2  # z_dim, 2 ** len(temporal)
    with pytest.raises(ValueError, match="multiple of 4"):
        adapter.latent_shape(34)
    latents = adapter.encode_images(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert latents.shape == (1, 4, 16, 16) and adapter.decode_latents(latents).shape == (1, 3, 32, 32)
    u, c = torch.randn(2, 1, 4, 4, 4)
    guided = adapter.combine_guidance(u, c, 4.0)  # QwenImagePipeline: per-token rescale to the conditional norm
    expect = pack(u + 4.0 * (c - u))
    expect = expect * pack(c).norm(dim=-1, keepdim=True) / expect.norm(dim=-1, keepdim=True)
    assert torch.allclose(pack(guided), expect)
    assert adapter.pipeline_guidance(4.0, None, 2) == {"true_cfg_scale": 4.0, "negative_prompt": [" ", " "]}
    tokens = (
        64 // 4
    ) ** 2  # 2x2-packed tokens of the tiny VAE's x2 latents; the hub scheduler's 0.5..0.9 over 256..8192
    assert adapter.resolution_shift(64) == pytest.approx(math.exp(0.5 + 0.4 * (tokens - 256) / (8192 - 256)))
    with pytest.raises(ValueError, match=r"lora\.text_encoder"):  # QwenImagePipeline exports transformer LoRA only
        lora.add_lora(adapter, lora.LoraSpec(text_encoder=True))


def test_zimage_prompt_encoding_and_forward_match_the_pipeline():
    pipe = tiny.pipeline("zimage")
    adapter = models.from_components("zimage", pipe.components)
    prompts = ["a red circle", "dog"]
    cond = adapter.encode_prompts(prompts)
    embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    mask = cond["cap_mask"].bool()
    assert all(torch.equal(cond["cap_feats"][i][mask[i]], embeds[i]) for i in range(2))
    x = torch.randn(2, *adapter.latent_shape(32))
    with torch.no_grad():  # the model takes 1 - sigma and predicts -(eps - x0)
        out = adapter.predict(x, torch.tensor([700.0, 300.0]), cond)
        ref = pipe.transformer(list(x.unsqueeze(2).unbind(0)), torch.tensor([0.3, 0.7]), embeds, return_dict=False)[0]
    assert torch.equal(out, -torch.stack(ref).squeeze(2))
    assert adapter.pipeline_guidance(6.0, None, 1) == {"guidance_scale": 5.0}  # pos + 5 (pos - neg) = u + 6 (c - u)
    assert adapter.pipeline_guidance(1.0, None, 1) == {"guidance_scale": 0.0}
    assert adapter.resolution_shift(1024) == 3.0  # a static scheduler ignores the pipeline's mu


def test_flux2_prompt_encoding_latents_and_forward_match_the_pipeline():
    from diffalign.models.flux2 import patchify, unpatchify

    pipe = tiny.pipeline("flux2")
    adapter = models.from_components("flux2", pipe.components)
    prompts = ["a red circle", "dog"]
    cond = adapter.encode_prompts(prompts)
    embeds, text_ids = pipe.encode_prompt(prompts)
    assert torch.equal(cond["encoder_hidden_states"], embeds)  # layers 10, 20, 30 stacked on features
    x = torch.randn(2, *adapter.latent_shape(32))
    assert torch.equal(unpatchify(patchify(x)), x)
    with torch.no_grad():
        out = adapter.predict(x, torch.tensor([700.0, 300.0]), cond)
        ids = pipe._prepare_latent_ids(patchify(x))
        ref = pipe.transformer(
            hidden_states=pipe._pack_latents(patchify(x)),
            encoder_hidden_states=embeds,
            timestep=torch.tensor([0.7, 0.3]),
            img_ids=ids,
            txt_ids=text_ids,
            guidance=torch.full((2,), 4.0),
            return_dict=False,
        )[0]
    assert torch.equal(out, unpatchify(pipe._unpack_latents_with_ids(ref, ids)))
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1  # the pipeline's BatchNorm-normalised patchified latents, un-patchified
    z = pipe._encode_vae_image(pixels, generator=None)
    assert torch.allclose(adapter.encode_images(pixels), unpatchify(z), atol=1e-6)
    assert adapter.decode_latents(unpatchify(z)).shape == (1, 3, 32, 32)
    assert "single_transformer_blocks.0.attn.to_out" in adapter.default_lora_targets()
    with pytest.raises(ValueError, match=r"model\.flow_shift"):  # FLUX.2's mu depends on the step count
        adapter.resolution_shift(1024)


@pytest.mark.parametrize("name", ["qwenimage/dpo_lora", "qwenimage/grpo_geneval", "zimage/dpo_lora", "flux2/dpo_lora"])
def test_new_family_configs_are_listed_and_validate(capsys, name):
    from diffalign.cli.main import main

    assert main(["ls", "configs"]) == 0
    assert name in capsys.readouterr().out
    extra = ["--num-processes", "32"] if "grpo" in name else []
    assert main(["validate", name, "--no-paths", *extra]) == 0, name


@pytest.mark.parametrize(("family", "mask"), [("qwenimage", "encoder_hidden_states_mask"), ("zimage", "cap_mask")])
def test_zeros_unconditional_branch_keeps_the_text_mask(family, mask):
    """uncond "zeros": zero embeddings at the prompt's valid positions (an all-zero Z-Image mask leaves no caption)."""
    from diffalign.sampling import guidance

    adapter = models.from_components(family, getattr(tiny, family)(0))
    info = [guidance.default_info(adapter, (16, 16))] * 2
    cond, uncond = guidance.encode_condition(adapter, ["a cat", "dog"], info, "zeros")
    assert torch.equal(uncond[mask], cond[mask]) and not any(v.any() for k, v in uncond.items() if k != mask)
    out = guidance.guided_output(adapter, torch.randn(2, 4, 16, 16), torch.tensor([500.0, 500.0]), cond, uncond, 4.0)
    assert torch.isfinite(out).all()
