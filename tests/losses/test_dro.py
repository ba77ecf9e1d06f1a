"""Diffusion-DRO: the hinge on delta, hand-derived values and gradients, and the authors' arithmetic."""

from __future__ import annotations

import pytest
import torch

from diffalign import config
from diffalign.losses import dro
from diffalign.terms.offline import per_sample_error
from diffalign.types import PairTerms


def pair(pw, pl, rw, rl) -> PairTerms:
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return PairTerms(
        policy_w=t(pw).requires_grad_(True), policy_l=t(pl).requires_grad_(True), ref_w=t(rw), ref_l=t(rl)
    )


def test_hand_computed_values_and_gradients():
    """Pair 0: delta = (0.10 - 0.20) - (0.30 - 0.25) = -0.15, ranked by more than the margin: relu(-0.149) = 0.
    Pair 1: delta = (0.30 - 0.20) - (0.10 - 0.20) = 0.2: relu(0.201) = 0.201. Mean over 2 pairs: 0.1005;
    d/dpolicy_w = [0, 1/2], d/dpolicy_l = [0, -1/2] (the 1/B of the mean, zero where the hinge is flat)."""
    terms = pair([0.10, 0.30], [0.30, 0.10], [0.20, 0.20], [0.25, 0.20])
    out = dro.loss(terms, dro.Config())
    assert out.loss.item() == pytest.approx(0.1005, abs=1e-7)  # fp32
    gw, gl = torch.autograd.grad(out.loss, [terms.policy_w, terms.policy_l])
    assert gw.tolist() == pytest.approx([0.0, 0.5]) and gl.tolist() == pytest.approx([0.0, -0.5])
    assert out.metrics["implicit_acc"].item() == 0.5  # pair 0 already ranked (delta < 0)
    assert out.metrics["active"].item() == 0.5
    assert out.metrics["reward_margin"].item() == pytest.approx((0.15 - 0.2) / 2)
    assert out.samples["reward_margin"].tolist() == pytest.approx([0.15, -0.2])


def test_policy_equal_to_reference_pays_the_margin():
    """delta = 0 for every pair: loss = margin exactly, and every pair pulls with 1/B."""
    terms = pair([0.3, 0.2, 0.7], [0.4, 0.1, 0.9], [0.3, 0.2, 0.7], [0.4, 0.1, 0.9])
    out = dro.loss(terms, dro.Config(margin=0.001))
    assert out.loss.item() == pytest.approx(0.001, abs=1e-9)
    (gw,) = torch.autograd.grad(out.loss, terms.policy_w)
    assert gw.tolist() == pytest.approx([1 / 3] * 3)
    # margin 0: the hinge sits at its kink, relu'(0) = 0, nothing pulls
    out0 = dro.loss(pair([0.3], [0.4], [0.3], [0.4]), dro.Config(margin=0.0))
    assert out0.loss.item() == 0.0


def test_config_checks_and_ls_listing():
    with pytest.raises(ValueError, match="margin"):
        dro.Config(margin=-0.1)
    with pytest.raises(ValueError, match=r"needs terms\.ref_w"):
        dro.loss(PairTerms(policy_w=torch.zeros(2), policy_l=torch.zeros(2)), dro.Config())
    assert dro.__doc__.splitlines()[0].startswith("Diffusion-DRO: Wu, Ruan, Tseng, Shuai, NeurIPS 2025")


def test_offline_pref_refuses_the_dro_loss_in_one_line(tmp_path):
    text = config.resolve_config_path("toy/dpo").read_text()
    lines = ["loss: {name: dro, margin: 0.001}" if line.startswith("loss:") else line for line in text.splitlines()]
    (tmp_path / "dpo_as_dro.yaml").write_text("\n".join(lines) + "\n")
    with pytest.raises(
        config.ConfigError, match=r"loss\.name='dro' builds its own pairs: train it with the dro recipe"
    ):
        config.load(tmp_path / "dpo_as_dro.yaml", schema=config.OfflinePrefConfig)


def test_equals_the_authors_arithmetic_on_fixed_tensors():
    """basiclab/DiffusionDRO@b0693ec train.py L748-768, written as they write it, on fixed predictions and targets;
    the same tensors through diffalign's per-sample errors and ``dro.loss`` give the same loss and gradient."""
    g = torch.Generator().manual_seed(0)
    B, C, H, W = 3, 4, 5, 5
    eps_expert, eps_policy = torch.randn(B, C, H, W, generator=g), torch.randn(B, C, H, W, generator=g)
    pred_eps_ref = torch.randn(2 * B, C, H, W, generator=g)
    pred_eps = (pred_eps_ref + 0.3 * torch.randn(2 * B, C, H, W, generator=g)).requires_grad_(True)
    margin = 0.001

    # --- the authors' lines -----------------------------------------------------------------------------
    eps = torch.cat([eps_expert, eps_policy], dim=0)
    losses0 = (pred_eps_ref - eps).square().mean(dim=[1, 2, 3])
    loss_expert0, loss_policy0 = losses0.chunk(2)
    losses = (pred_eps - eps).square().mean(dim=[1, 2, 3])
    loss_expert, loss_policy = losses.chunk(2)
    loss_expert_diff = loss_expert - loss_expert0
    loss_policy_diff = loss_policy - loss_policy0
    diff = loss_expert_diff - loss_policy_diff
    loss = torch.maximum(diff + margin, torch.zeros_like(diff)).mean()
    (grad_theirs,) = torch.autograd.grad(loss, pred_eps)

    # --- diffalign ------------------------------------------------------------------------------------------
    policy_w, policy_l = per_sample_error(pred_eps, eps).chunk(2)
    ref_w, ref_l = per_sample_error(pred_eps_ref, eps).chunk(2)
    out = dro.loss(
        PairTerms(policy_w=policy_w, policy_l=policy_l, ref_w=ref_w, ref_l=ref_l), dro.Config(margin=margin)
    )
    (grad_ours,) = torch.autograd.grad(out.loss, pred_eps)
    assert 0 < (diff + margin > 0).sum() < B  # both sides of the hinge are exercised
    assert torch.allclose(out.loss, loss, rtol=0, atol=1e-7)
    assert torch.allclose(grad_ours, grad_theirs, rtol=1e-5, atol=1e-9)


def test_ls_losses_lists_dro_with_its_paper(capsys):
    from diffalign.cli.main import main

    assert main(["ls", "losses"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("dro "))
    end = next(i for i in range(start + 1, len(lines) + 1) if i == len(lines) or not lines[i].startswith(" "))
    row = " ".join(line.strip() for line in lines[start:end])
    assert "Diffusion-DRO" in row and "NeurIPS 2025" in row and "2510.18353" in row and "margin=0.001" in row
