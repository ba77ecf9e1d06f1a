"""PickScore (Kirstain et al., "Pick-a-Pic", NeurIPS 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences.

Checkpoint: ``yuvalkirstain/PickScore_v1``, a transformers ``CLIPModel`` folder (config.json + model.safetensors).
The processor (tokenizer + image transform) is looked up next to the weights first (a local folder holding
``vocab.json``/``merges.txt`` or ``tokenizer.json`` and ``preprocessor_config.json``, as a ``snapshot_download`` of
the PickScore repo does); otherwise it comes from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, as the model card says. Score (README, ``eval_preference_predictor.py``)::

    s(x, c) = exp(logit_scale) * cos(E_img(x), E_txt(c))          # ~100 * cos, SD1.5 ~20.5, SDXL ~22

and for two images of one prompt ``P(a > b) = softmax([s_a, s_b])[0] = sigmoid(s_a - s_b)``.
``exp(logit_scale)`` is read from the checkpoint in fp32 before any dtype cast (bf16 would turn 100.0 into 98.9).
Note DiffusionDPO's ``pickscore_utils`` reports the raw cosine instead; this module reports the paper's scale.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from diffalign.scorers import _clip
from diffalign.scorers.base import BatchedScorer, ImageTransform


DEFAULT_PATH = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScore(BatchedScorer):
    """``exp(logit_scale) * cos``; ``preference`` gives the pairwise softmax probability."""

    name = "pickscore"

    def __init__(self, model: Any, tokenizer: Any, transform: ImageTransform, *, variant: str, **kwargs: Any) -> None:
        super().__init__(variant=variant, transform=transform, **kwargs)
        self.model = model
        self.tokenizer = tokenizer
        self.logit_scale = float(model.logit_scale.detach().float().exp())

    def _score(self, pixels: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        return self.logit_scale * _clip.cosine(self.model, self.tokenizer, pixels, prompts or [])

    def vision_blocks(self) -> Any:
        return _clip.vision_blocks(self.model)

    def preference(self, images_a: Any, images_b: Any, prompts: Sequence[str]) -> torch.Tensor:
        """``(B,)`` probability that image A is preferred over image B for its prompt: softmax over the pair."""
        return torch.sigmoid(self(images_a, prompts) - self(images_b, prompts))


def load(
    path: str | os.PathLike = DEFAULT_PATH,
    *,
    processor_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
) -> PickScore:
    """PickScore from a hub id or a ``save_pretrained`` folder; ``processor_path`` gives tokenizer + transform
    (default: the weights' own folder when it holds them, else ``DEFAULT_PROCESSOR``)."""
    if processor_path is None:
        processor_path = _clip.processor_next_to(path) or DEFAULT_PROCESSOR
    device = torch.device(device)
    model = _clip.load_model(path, device, torch.float32)
    scorer = PickScore(
        model,
        _clip.load_tokenizer(processor_path),
        _clip.load_transform(processor_path, crop_offset="floor"),
        variant=os.fspath(path),
        device=device,
        dtype=dtype,
        batch_size=batch_size,
    )
    model.to(dtype=dtype)
    return scorer
