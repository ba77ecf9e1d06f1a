"""The differentiable path: ``scorer(x, prompts, grad=True)`` on a (B, 3, H, W) tensor keeps the graph through
preprocessing and the frozen towers for every image scorer; gradient checkpointing changes nothing but memory."""

from __future__ import annotations

import pytest
import torch

from diffalign import scorers
from diffalign.toy import duo, world

from .test_aesthetic import head_dir  # noqa: F401 (fixture)
from .test_clipscore import negated_dir  # noqa: F401 (fixture)
from .test_hpsv2 import ARCH, arch, hps_dir  # noqa: F401 (fixtures)
from .test_imagereward import VIT, published, tokenizer  # noqa: F401 (fixtures)
from .test_pickscore import PROMPTS


SCENES = world.sample_scenes(2, torch.Generator().manual_seed(3))
TOY_CAPTIONS = [world.caption(sc.fg, sc.shape, sc.bg) for sc in SCENES]
DUO_SCENES = duo.sample_scenes(2, torch.Generator().manual_seed(3))
DUO_CAPTIONS = [duo.caption(*sc.objects) for sc in DUO_SCENES]
NO_GRAD = {"duocorrect"}  # a 0/1 score: grad=True raises (tests/toy/test_duo.py)
NEEDS_SOURCES = {"source_similarity"}  # scores edits against sources: its grad path is in test_source_similarity.py
SPECS = {
    "pickscore": lambda d: {"path": d["clip"]},
    "clipscore-torchmetrics": lambda d: {"path": d["clip"]},
    "clipscore-hessel": lambda d: {"path": d["negated"], "convention": "hessel"},  # cos > 0 here: no clamp
    "hpsv2": lambda d: {"path": d["hps"], "model_name": ARCH},
    "hpsv2-open_clip": lambda d: {"path": d["hps"], "model_name": ARCH, "preprocess": "open_clip"},
    "aesthetic": lambda d: {"path": d["head"], "clip_path": d["clip"]},
    "imagereward": lambda d: {"path": d["ir"], "tokenizer_path": d["bert"], "vision_config": VIT},
    "toyreward": lambda d: {},
    "toyfaithfulness": lambda d: {},
    "toyprominence": lambda d: {},
    "duofaithfulness": lambda d: {},
    "duocolor": lambda d: {},
    "duoshape": lambda d: {},
    "duoposition": lambda d: {},
}


@pytest.fixture(scope="module")
def dirs(clip_backbone_dir, negated_dir, hps_dir, head_dir, published, bert_tokenizer_dir):  # noqa: F811
    return {
        "clip": clip_backbone_dir,
        "negated": negated_dir,
        "hps": hps_dir,
        "head": head_dir,
        "ir": published[0],
        "bert": bert_tokenizer_dir,
    }


def load(key: str, dirs, **kwargs):
    return scorers.load(key.split("-")[0], **SPECS[key](dirs), **kwargs)


def test_every_scorer_is_covered():
    assert {k.split("-")[0] for k in SPECS} | NO_GRAD | NEEDS_SOURCES == set(scorers.available())


@pytest.mark.parametrize("key", list(SPECS))
def test_scores_backpropagate_to_the_input(key, dirs):
    """Non-square input (crop or pad path; toy rewards get rendered toy / duo scenes plus noise); the scores equal the
    no-grad ones; d score / d x is finite, non-zero, and each image's gradient comes from its own score only."""
    scorer = load(key, dirs)
    torch.manual_seed(0)
    if key.startswith("toy"):
        prompts, x = TOY_CAPTIONS, world.render(SCENES) + 0.05 * torch.randn(2, 3, world.SIZE, world.SIZE)
    elif key.startswith("duo"):
        prompts, x = DUO_CAPTIONS, duo.render(DUO_SCENES) + 0.05 * torch.randn(2, 3, duo.SIZE, duo.SIZE)
    else:
        prompts, x = PROMPTS, 0.5 + 0.3 * torch.randn(2, 3, 40, 52)
    x = x.clamp(0.02, 0.98).requires_grad_(True)
    with torch.no_grad():  # grad=True builds the graph even inside no_grad
        scores = scorer(x, prompts, grad=True)
    assert scores.requires_grad and scores.dtype == torch.float32 and scores.shape == (2,)
    assert torch.allclose(scores.detach(), scorer(x.detach(), prompts), atol=1e-5)
    if key in ("clipscore-hessel", "toyprominence"):
        assert scores[0] > 0  # not in the clamped (zero-gradient) regime
    (g,) = torch.autograd.grad(scores[0], x)
    assert torch.isfinite(g).all() and g[0].abs().sum() > 0, key
    assert g[1].abs().sum() == 0  # batch items do not mix
    assert not scorer(x, prompts).requires_grad  # the default path stays graph-free


def test_grad_needs_a_tensor(dirs, photos):
    scorer = load("pickscore", dirs)
    with pytest.raises(TypeError, match="grad=True needs images as one"):
        scorer(photos, PROMPTS, grad=True)
    with pytest.raises(TypeError, match="grad=True needs images as one"):
        scorers.load("toyreward")(photos, TOY_CAPTIONS, grad=True)


@pytest.mark.parametrize("key", ["pickscore", "hpsv2", "imagereward"])
def test_gradient_checkpointing_same_gradients(key, dirs, monkeypatch):
    """Checkpointed vision blocks: every block goes through torch.utils.checkpoint; scores and input gradients are
    unchanged; turning it off restores the plain forward."""
    import torch.utils.checkpoint as tuc

    calls = []
    real = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    scorer = load(key, dirs)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    prompts = PROMPTS
    (plain,) = torch.autograd.grad(scorer(x, prompts, grad=True).sum(), x)
    scorer.gradient_checkpointing(True)
    blocks = len(scorer.vision_blocks())
    scores = scorer(x, prompts, grad=True)
    assert len(calls) == blocks
    (ckpt,) = torch.autograd.grad(scores.sum(), x)
    assert torch.allclose(ckpt, plain, atol=1e-6, rtol=1e-5)
    scorer(x, prompts)  # no-grad scoring does not checkpoint
    assert len(calls) == blocks
    scorer.gradient_checkpointing(False)
    scorer(x, prompts, grad=True)
    assert len(calls) == blocks
    assert "forward" not in vars(scorer.vision_blocks()[0])


def test_grad_in_bf16(dirs):
    """The towers run in the scorer's dtype; the input gradient comes back in the input's dtype, finite."""
    scorer = load("pickscore", dirs, dtype=torch.bfloat16)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    (g,) = torch.autograd.grad(scorer(x, PROMPTS, grad=True).sum(), x)
    assert g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0
