"""CLIPScore conventions, each against an independent re-implementation of its reference code's arithmetic on a
tiny CLIP backbone folder laid out like openai/clip-vit-*: torchmetrics' ``clip_score`` (CLIPProcessor, sliced text,
100 * cos, max(mean, 0)) and Hessel et al.'s ``clipscore.py`` (torchvision transform, "A photo depicts " prefix,
``clip.tokenize(truncate=True)`` ids, numpy normalisation, 2.5 * clip(cos, 0))."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign import scorers
from diffalign.scorers import clipscore

from .conftest import CLIP_SIZE
from .test_pickscore import PROMPTS


LONG = " ".join(["a red cat on a blue table"] * 14)  # ~98 tokens: past CLIP's 77


@pytest.fixture(scope="module")
def negated_dir(tmp_path_factory, clip_backbone_dir):
    """The same backbone with text_projection negated: every cosine flips sign, so one of the two backbones has
    negative cosines for each pair and the zero clamps are exercised whatever the random init gives."""
    from transformers import CLIPModel

    out = tmp_path_factory.mktemp("clip_negated")
    model = CLIPModel.from_pretrained(clip_backbone_dir)
    with torch.no_grad():
        model.text_projection.weight.neg_()
    model.save_pretrained(out)
    for f in clip_backbone_dir.iterdir():
        if "token" in f.name or "vocab" in f.name or "merges" in f.name or "preprocessor" in f.name:
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def images(photos):
    """Astronaut, coffee, and astronaut cut to 345x512: at 32 px that resizes to 32x47, crop margin 15, where
    transformers (floor: 7) and torchvision (round(7.5) = 8) crop one column apart."""
    from skimage import data

    return [*photos, Image.fromarray(data.astronaut()[:345])]


def torchmetrics_by_hand(model_dir, images, captions) -> tuple[torch.Tensor, torch.Tensor]:
    """torchmetrics ``_clip_score_update`` + ``clip_score``: CLIPProcessor on images and on text (padding=True, no
    truncation, ids and mask sliced to max_position_embeddings), get_*_features, x / ||x||, 100 * sum; the metric is
    max(mean, 0). Returns (per-image scores, metric). The PIL-backend image processor stands in for the default
    one, which resizes uint8 tensors with torchvision (within 1/255, test_preprocess)."""
    from transformers import CLIPModel, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = CLIPModel.from_pretrained(model_dir).eval()
    proc = CLIPImageProcessorPil.from_pretrained(model_dir)
    tok = CLIPTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        pixels = torch.as_tensor(np.asarray(proc(images=images, return_tensors="np")["pixel_values"]))
        img = model.get_image_features(pixels)
        img = getattr(img, "pooler_output", img)
        text = tok(captions, padding=True, return_tensors="pt")
        n = model.config.text_config.max_position_embeddings
        txt = model.get_text_features(text["input_ids"][..., :n], text["attention_mask"][..., :n])
        txt = getattr(txt, "pooler_output", txt)
    img = img / img.norm(p=2, dim=-1, keepdim=True)
    txt = txt / txt.norm(p=2, dim=-1, keepdim=True)
    score = 100 * (img * txt).sum(axis=-1)
    return score, torch.max(score.mean(0), torch.zeros(()))


def hessel_by_hand(model_dir, images, captions, w: float = 2.5) -> np.ndarray:
    """jmhessel/clipscore: Resize/CenterCrop/ToTensor/Normalize, clip.tokenize("A photo depicts " + c,
    truncate=True) (open_clip's tokenizer is the same BPE with the same truncation), the towers without an attention
    mask (OpenAI CLIP's encode_text has none), numpy normalisation, w * clip(cos, 0, None)."""
    import open_clip
    import torchvision.transforms as T
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(model_dir).eval()
    tf = T.Compose(
        [
            T.Resize(CLIP_SIZE, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(CLIP_SIZE),
            lambda image: image.convert("RGB"),
            T.ToTensor(),
            T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    prefix = "A photo depicts"
    if prefix[-1] != " ":
        prefix += " "
    ids = open_clip.tokenize([prefix + c for c in captions])  # (B, 77), zero-padded, EOT kept on truncation
    with torch.no_grad():
        img = model.visual_projection(
            model.vision_model(pixel_values=torch.stack([tf(im) for im in images])).pooler_output
        )
        txt = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    img, txt = img.numpy(), txt.numpy()
    img = img / np.sqrt(np.sum(img**2, axis=1, keepdims=True))
    txt = txt / np.sqrt(np.sum(txt**2, axis=1, keepdims=True))
    return w * np.clip(np.sum(img * txt, axis=1), 0, None)


def test_torchmetrics_convention(clip_backbone_dir, negated_dir, images):
    prompts = [PROMPTS[0], LONG, PROMPTS[1]]
    for path in (clip_backbone_dir, negated_dir):
        scorer = scorers.load("clipscore", path=path)  # the default convention
        got = scorer(images, prompts)
        want, metric = torchmetrics_by_hand(path, images, prompts)
        assert torch.allclose(got, want, atol=1e-4, rtol=0), (path, got, want)
        assert torch.allclose(scorer.reduce(got), metric, atol=1e-4)
    assert scorer.variant == f"torchmetrics {negated_dir} 100*cos max(mean,0)"
    both = torch.cat([scorers.load("clipscore", path=p)(images, prompts) for p in (clip_backbone_dir, negated_dir)])
    assert (both < 0).any(), "the negated backbone must produce negative per-image scores"


def test_torchmetrics_slices_long_prompts(clip_backbone_dir, images):
    """torchmetrics keeps the first 77 ids of a long prompt (no EOS); BOS + 75 + EOS truncation gives another score."""
    scorer = clipscore.load(clip_backbone_dir)
    sliced = scorer(images[:1], [LONG])
    assert scorer.truncation == "slice"
    scorer.truncation = "eos"
    assert not torch.allclose(scorer(images[:1], [LONG]), sliced, atol=1e-3)


def test_hessel_convention(clip_backbone_dir, negated_dir, images):
    prompts = [PROMPTS[0], LONG, PROMPTS[1]]
    seen_zero = False
    for path in (clip_backbone_dir, negated_dir):
        scorer = scorers.load("clipscore", path=path, convention="hessel")
        got = scorer(images, prompts)
        want = torch.from_numpy(hessel_by_hand(path, images, prompts)).float()
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (path, got, want)
        assert torch.allclose(scorer.reduce(got), want.mean(), atol=1e-5)  # Hessel reports the plain mean
        seen_zero |= bool((got == 0).any())
    assert seen_zero, "one of the two backbones must hit max(cos, 0)"
    assert scorer.variant == f"hessel {negated_dir} 2.5*max(cos,0) prefix='A photo depicts '"
    assert scorer.transform.crop_offset == "round"


def test_conventions_differ_where_their_references_do(clip_backbone_dir, images):
    """The prefix and the crop rounding each change the score, so the tests above can tell the conventions apart:
    Hessel's transform with torchmetrics' scale and no prefix equals torchmetrics on square images only."""
    tm = clipscore.load(clip_backbone_dir)
    like_tm = clipscore.load(clip_backbone_dir, convention="hessel", w=100.0, clip_at_zero=False, prefix="")
    square, odd = images[:1], images[2:]
    assert torch.allclose(like_tm(square, PROMPTS[:1]), tm(square, PROMPTS[:1]), atol=1e-5)
    assert not torch.allclose(like_tm(odd, PROMPTS[:1]), tm(odd, PROMPTS[:1]), atol=1e-4)
    hessel = clipscore.load(clip_backbone_dir, convention="hessel", w=100.0, clip_at_zero=False)
    assert not torch.allclose(hessel(square, PROMPTS[:1]), tm(square, PROMPTS[:1]), atol=1e-3)


def test_overrides_are_labelled_custom(clip_backbone_dir, photos):
    """``w=1, clip_at_zero=false``: the raw cosine (DiffusionDPO's clip_utils), labelled as a custom variant."""
    tm = clipscore.load(clip_backbone_dir)
    raw = scorers.load("clipscore", path=clip_backbone_dir, w=1.0, clip_at_zero=False)
    assert torch.allclose(raw(photos, PROMPTS), tm(photos, PROMPTS) / 100, atol=1e-6)
    assert raw.variant == f"custom:torchmetrics {clip_backbone_dir} 1*cos"
    per_image = clipscore.load(clip_backbone_dir, clip_at_zero=True)
    assert per_image.variant == f"custom:torchmetrics {clip_backbone_dir} 100*max(cos,0)"
    with pytest.raises(ValueError, match="did you mean 'hessel'"):
        clipscore.load(clip_backbone_dir, convention="hesel")
