"""CLIPScore: prompt-image agreement of a frozen CLIP, in the two conventions papers report.

There is no single CLIPScore (research note §1.6); ``convention`` picks one and reproduces its reference code:

``"torchmetrics"`` (default; what most text-to-image papers report), torchmetrics ``CLIPScore`` /
``clip_score`` (Lightning-AI/torchmetrics ``src/torchmetrics/functional/multimodal/clip_score.py``):

- backbone ``openai/clip-vit-large-patch14`` (L266), its ``CLIPProcessor`` for images (L132; shortest side 224
  bicubic, center crop with transformers' floor offset) and text (``padding=True`` with no truncation, then the ids
  and mask sliced to 77 columns, L137-148);
- per image ``100 * cos(E_I, E_C)`` (L197-201), **not** clamped;
- the reported number is ``max(mean, 0)``: the clamp acts on the mean over all images (L357-358; the class,
  ``src/torchmetrics/multimodal/clip_score.py`` L218-223). ``CLIPScore.reduce(scores)`` gives it. For real images
  the mean is positive (~25-35), so the mean of the per-image column equals torchmetrics' number.

``"hessel"``: Hessel et al., EMNLP 2021, eq. 1, as jmhessel/clipscore ``clipscore.py`` computes it:

- backbone ViT-B/32 (OpenAI weights; ``openai/clip-vit-base-patch32`` is the transformers copy);
- images: ``Resize(224, BICUBIC)``, ``CenterCrop(224)`` on PIL (torchvision rounding), OpenAI mean/std (L88-95);
- text: the prefix ``"A photo depicts "`` before each caption (L67-75), ``clip.tokenize(truncate=True)``: BOS +
  75 tokens + EOS;
- per image ``w * max(cos, 0)`` with ``w = 2.5`` (L135-160); the reported number is the plain mean.

Overrides: ``w``, ``clip_at_zero`` (per-image clamp on/off) and ``prefix`` replace the convention's values; the
``variant`` (recorded in ``summary.json``) then starts with ``custom:`` and spells out backbone, formula and prefix,
e.g. ``"torchmetrics openai/clip-vit-large-patch14 100*cos max(mean,0)"``. The raw cosine that DiffusionDPO's
``clip_utils.py`` and ImageReward's ``CLIPScore.py`` report is ``w=1, clip_at_zero=false``.

Not reproduced: torchmetrics passes uint8 tensors to the processor (transformers 5 then resizes them with
torchvision on uint8, within ~1/255 of the PIL resize used here for PIL input); Hessel's script runs the towers in
fp16 on CUDA and normalises in numpy (pass ``dtype`` for the former; the latter is rounding).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch

from diffalign.registry import suggest
from diffalign.scorers import _clip
from diffalign.scorers.base import BatchedScorer, ImageTransform


Clamp = Literal["image", "mean", "none"]


@dataclass(frozen=True, kw_only=True)
class Convention:
    """One published CLIPScore: default backbone, scale ``w``, where the zero clamp acts, caption prefix, crop
    rounding of its image transform, and how long prompts are cut (``_clip.tokenize``)."""

    path: str
    w: float
    clamp: Clamp
    prefix: str
    crop_offset: Literal["floor", "round"]
    truncation: Literal["eos", "slice"]


CONVENTIONS = {
    "torchmetrics": Convention(
        path="openai/clip-vit-large-patch14", w=100.0, clamp="mean", prefix="", crop_offset="floor", truncation="slice"
    ),
    "hessel": Convention(
        path="openai/clip-vit-base-patch32",
        w=2.5,
        clamp="image",
        prefix="A photo depicts ",
        crop_offset="round",
        truncation="eos",
    ),
}
DEFAULT_CONVENTION = "torchmetrics"
DEFAULT_PATH = CONVENTIONS[DEFAULT_CONVENTION].path


class CLIPScore(BatchedScorer):
    """Per image ``w * cos`` (``clamp="none"`` or ``"mean"``) or ``w * max(cos, 0)`` (``clamp="image"``), with
    ``prefix`` prepended to every prompt. ``reduce`` gives the convention's reported number."""

    name = "clipscore"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        transform: ImageTransform,
        *,
        w: float,
        clip_at_zero: bool | None = None,
        clamp: Clamp | None = None,
        prefix: str = "",
        truncation: Literal["eos", "slice"] = "eos",
        variant: str,
        **kwargs: Any,
    ) -> None:
        super().__init__(variant=variant, transform=transform, **kwargs)
        if clamp is None:
            clamp = "image" if clip_at_zero or clip_at_zero is None else "none"
        if clamp not in ("image", "mean", "none"):
            raise ValueError(f"clamp must be 'image', 'mean' or 'none', got {clamp!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.w = w
        self.clamp = clamp
        self.prefix = prefix
        self.truncation = truncation

    def _score(self, pixels: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        texts = [self.prefix + p for p in prompts or []]
        cos = _clip.cosine(self.model, self.tokenizer, pixels, texts, truncation=self.truncation)
        return self.w * (cos.clamp(min=0.0) if self.clamp == "image" else cos)

    def reduce(self, scores: torch.Tensor) -> torch.Tensor:
        """The convention's corpus-level number from per-image scores: ``max(mean, 0)`` for torchmetrics, the mean
        otherwise."""
        mean = scores.float().mean()
        return mean.clamp(min=0.0) if self.clamp == "mean" else mean

    def vision_blocks(self) -> Any:
        return _clip.vision_blocks(self.model)


def describe(convention: str, path: str, w: float, clamp: Clamp, prefix: str, custom: bool) -> str:
    """The ``variant`` string: convention (or ``custom:<convention>``), backbone, formula, prefix."""
    formula = {"image": f"{w:g}*max(cos,0)", "mean": f"{w:g}*cos max(mean,0)", "none": f"{w:g}*cos"}[clamp]
    label = f"custom:{convention}" if custom else convention
    return f"{label} {path} {formula}" + (f" prefix={prefix!r}" if prefix else "")


def load(
    path: str | os.PathLike | None = None,
    *,
    convention: str = DEFAULT_CONVENTION,
    w: float | None = None,
    clip_at_zero: bool | None = None,
    prefix: str | None = None,
    processor_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
) -> CLIPScore:
    """CLIPScore of ``convention`` on the transformers ``CLIPModel`` at ``path`` (default: the convention's
    backbone; a hub id or a local folder); tokenizer and ``preprocessor_config.json`` from the same place unless
    ``processor_path`` is given. ``w``, ``clip_at_zero`` and ``prefix`` override the convention."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown CLIPScore convention {convention!r}; {suggest(convention, list(CONVENTIONS))}")
    conv = CONVENTIONS[convention]
    path = conv.path if path is None else path
    device = torch.device(device)
    processor_path = path if processor_path is None else processor_path
    clamp: Clamp = conv.clamp if clip_at_zero is None else ("image" if clip_at_zero else "none")
    w_value = conv.w if w is None else float(w)
    prefix_value = conv.prefix if prefix is None else prefix
    custom = (w_value, clamp, prefix_value) != (conv.w, conv.clamp, conv.prefix)
    return CLIPScore(
        _clip.load_model(path, device, dtype),
        _clip.load_tokenizer(processor_path),
        _clip.load_transform(processor_path, crop_offset=conv.crop_offset),
        w=w_value,
        clamp=clamp,
        prefix=prefix_value,
        truncation=conv.truncation,
        variant=describe(convention, os.fspath(path), w_value, clamp, prefix_value, custom),
        device=device,
        dtype=dtype,
        batch_size=batch_size,
    )
