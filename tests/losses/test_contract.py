"""Every objective in diffalign.losses honours the module contract (auto-discovered, nothing to register)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diffalign import losses
from diffalign.types import ListTerms, LossOutput, PairTerms, PolicyTerms, StepTerms, UnpairedTerms


NAMES = losses.available()


def test_discovery_finds_the_core_objectives() -> None:
    assert {"dpo", "mapo"} <= set(NAMES), NAMES


def test_unknown_name_suggests_a_close_one() -> None:
    with pytest.raises(KeyError, match="did you mean 'dpo'"):
        losses.get("dpoo")


def _leaf(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) * 0.2 + 0.05).requires_grad_(True)


def make_terms(module, *, with_ref: bool = True):
    """Random terms of batch 4 with exactly the optional fields the module's REQUIRES asks for."""
    ref = with_ref and "ref" in module.REQUIRES
    if module.TERMS == "pair":
        pred = "pred" in module.REQUIRES
        return PairTerms(
            policy_w=_leaf(4, seed=0),
            policy_l=_leaf(4, seed=1),
            ref_w=_leaf(4, seed=2).detach() if ref else None,
            ref_l=_leaf(4, seed=3).detach() if ref else None,
            timesteps=torch.tensor([10, 200, 500, 900]),
            pred_w=_leaf(4, 2, 3, 3, seed=4) if pred else None,
            pred_l=_leaf(4, 2, 3, 3, seed=5) if pred else None,
            target_w=_leaf(4, 2, 3, 3, seed=6).detach() if pred else None,
            target_l=_leaf(4, 2, 3, 3, seed=6).detach() if pred else None,
            gap_w=_leaf(4, seed=7) if "gap" in module.REQUIRES else None,
        )
    if module.TERMS == "list":
        k = getattr(module, "LIST_K", 3)  # objectives defined for one list length only (SmPO: pairs, K=2)
        return ListTerms(
            policy=_leaf(4, k, seed=0),
            scores=torch.rand(4, k, generator=torch.Generator().manual_seed(1)),
            ref=_leaf(4, k, seed=2).detach() if ref else None,
            timesteps=torch.tensor([10, 200, 500, 900]),
        )
    if module.TERMS == "unpaired":  # single labelled images (Diffusion-KTO)
        return UnpairedTerms(
            policy=_leaf(4, seed=0),
            labels=torch.tensor([True, False, True, False]),
            ref=_leaf(4, seed=2).detach() if ref else None,
            timesteps=torch.tensor([10, 200, 500, 900]),
        )
    if module.TERMS == "step":  # per-pair transition log-probabilities (SPO / LPO)
        return StepTerms(
            policy_w=_leaf(4, seed=0),
            policy_l=_leaf(4, seed=1),
            ref_w=_leaf(4, seed=2).detach() if ref else None,
            ref_l=_leaf(4, seed=3).detach() if ref else None,
            timesteps=torch.tensor([1, 251, 501, 751]),
        )
    if module.TERMS == "policy":  # per-sample transition log-probs of SDE rollouts (GRPO / DDPO)
        return PolicyTerms(
            policy=_leaf(4, seed=0),
            old=_leaf(4, seed=1).detach(),
            advantages=torch.tensor([1.0, -0.5, 0.25, -2.0]),
        )
    raise AssertionError(f"{module.__name__}: TERMS={module.TERMS!r}; teach make_terms about it")


@pytest.mark.parametrize("name", NAMES)
def test_module_surface(name: str) -> None:
    module = losses.get(name)
    first_paragraph = (module.__doc__ or "").strip().split("\n\n")[0]
    assert "arxiv" in first_paragraph.lower(), f"{name}: the docstring must open with the paper and its arXiv link"
    assert module.TERMS in ("pair", "list", "step", "unpaired", "policy")
    assert isinstance(module.REQUIRES, frozenset) and module.REQUIRES.issubset({"ref", "pred", "gap"})
    assert dataclasses.is_dataclass(module.Config)
    cfg = module.Config()  # every field has the paper default
    fields = dataclasses.fields(cfg)
    assert all(f.kw_only for f in fields), f"{name}: Config must be kw_only"
    if fields:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cfg, fields[0].name, getattr(cfg, fields[0].name))


@pytest.mark.parametrize("name", NAMES)
def test_random_terms_give_finite_loss_grads_and_detached_metrics(name: str) -> None:
    module = losses.get(name)
    terms = make_terms(module)
    out = module.loss(terms, module.Config())
    assert isinstance(out, LossOutput)
    assert out.loss.ndim == 0 and out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    leaves = [v for v in vars(terms).values() if isinstance(v, torch.Tensor) and v.requires_grad]
    assert any(leaf.grad is not None for leaf in leaves)
    for leaf in leaves:
        if leaf.grad is not None:
            assert torch.isfinite(leaf.grad).all()
    assert out.metrics, f"{name} logs no metrics"
    for key, value in out.metrics.items():
        assert isinstance(value, torch.Tensor) and value.ndim == 0, key
        assert not value.requires_grad and torch.isfinite(value), key


@pytest.mark.parametrize("name", [n for n in NAMES if "ref" in losses.get(n).REQUIRES])
def test_missing_reference_is_a_clear_error(name: str) -> None:
    module = losses.get(name)
    with pytest.raises(ValueError, match="ref"):
        module.loss(make_terms(module, with_ref=False), module.Config())


@pytest.mark.parametrize(
    "name", [n for n in NAMES if "beta" in {f.name for f in dataclasses.fields(losses.get(n).Config)}]
)
@pytest.mark.parametrize("beta", [0.0, -1.0])
def test_beta_that_switches_off_or_reverses_the_preference_is_refused(name: str, beta: float) -> None:
    """beta = 0 turns the preference term off and beta < 0 rewards the rejected sample in every objective here."""
    with pytest.raises(ValueError, match=rf"{name}: Config\.beta must be > 0.*got {beta}"):
        losses.get(name).Config(beta=beta)
