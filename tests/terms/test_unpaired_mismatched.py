"""KTO's mismatched-prompt errors: the same noise and timestep per image, the previous row's prompt, no gradient."""

from __future__ import annotations

import torch

from diffalign import models
from diffalign.models import lora
from diffalign.terms.unpaired import roll_cond, unpaired_terms
from diffalign.types import SampleInfo


def test_mismatched_errors_are_the_rolled_prompts_errors(tiny_dirs):
    adapter = models.load("sd15", str(tiny_dirs["sd15"]))
    lora.add_lora(adapter, lora.LoraSpec(rank=4, init="default"))
    with torch.no_grad():
        for p in lora.trainable_parameters(adapter).values():
            p.add_(0.05 * torch.randn_like(p))
    latents = torch.randn(3, 1, 4, 16, 16)
    info = [SampleInfo((32, 32), (0, 0), (32, 32))] * 3
    labels = torch.tensor([True, False, True])
    prompts = ["a red circle", "a blue square", "a green star"]
    terms = unpaired_terms(adapter, latents, labels, [5, 6, 7], prompts=prompts, info=info, need_mismatched=True)
    assert terms.policy.requires_grad and not terms.policy_mismatched.requires_grad
    rolled = unpaired_terms(
        adapter, latents, labels, [5, 6, 7], prompts=[prompts[2], prompts[0], prompts[1]], info=info
    )
    torch.testing.assert_close(terms.policy_mismatched, rolled.policy.detach())
    torch.testing.assert_close(terms.ref_mismatched, rolled.ref)
    assert not torch.allclose(terms.policy_mismatched, terms.policy.detach())
    same = unpaired_terms(adapter, latents, labels, [5, 6, 7], prompts=["a"] * 3, info=info, need_mismatched=True)
    torch.testing.assert_close(same.policy_mismatched, same.policy.detach())  # one prompt: the roll changes nothing
    plain = unpaired_terms(adapter, latents, labels, [5, 6, 7], prompts=prompts, info=info)
    assert plain.policy_mismatched is None and plain.ref_mismatched is None
    cond = {"encoder_hidden_states": torch.arange(3.0).view(3, 1), "time_ids": torch.arange(3.0).view(3, 1)}
    out = roll_cond(cond)
    assert out["encoder_hidden_states"].flatten().tolist() == [2.0, 0.0, 1.0]
    assert out["time_ids"].flatten().tolist() == [0.0, 1.0, 2.0]  # the image's own geometry is kept
