"""LAION aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor): prompt-free 1-10 aesthetics.

Head: ``sac+logos+ava1-l14-linearMSE.pth``, a plain state dict with keys ``layers.{0,2,4,6,7}.{weight,bias}``
(768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations; see ``_mlp.py``). Hub copy used by default:
``camenduru/improved-aesthetic-predictor``; a local file or folder works the same (a ``.safetensors`` conversion
with the same keys too). Backbone: OpenAI CLIP ViT-L/14 (``openai/clip-vit-large-patch14``, transformers)::

    e = E_img(x) / ||E_img(x)||          # projected 768-d image embedding, L2-normalised
    score = MLP(e)                       # raw scale: SD1.5 ~5.4, SDXL ~5.9-6.0

Because the head is affine, ``score = w . e + b`` (||w|| = 18.0, b = 5.24 for the released head). The transform is
OpenAI CLIP's (Resize 224 bicubic, CenterCrop 224 with torchvision rounding, OpenAI mean/std); the head runs in fp32.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from diffalign.scorers import _clip, _files
from diffalign.scorers._mlp import RewardMLP, mlp_input_size
from diffalign.scorers.base import BatchedScorer, ImageTransform, load_checkpoint, resolve_file, tensor_state_dict


DEFAULT_PATH = "camenduru/improved-aesthetic-predictor"
HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
CLIP_SUBFOLDERS = ("clip", "clip-vit-large-patch14")  # beside or inside the head's folder (DiffSynth's layout)


class Aesthetic(BatchedScorer):
    """``MLP(normalize(clip_image_embed))``; ``prompts`` may be ``None`` (and are ignored)."""

    name = "aesthetic"
    needs_prompts = False

    def __init__(self, clip: Any, head: RewardMLP, transform: ImageTransform, **kwargs: Any) -> None:
        super().__init__(transform=transform, **kwargs)
        self.clip = clip
        self.head = head

    def _score(self, pixels: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        return self.head(_clip.image_embeds(self.clip, pixels)).squeeze(-1)

    def vision_blocks(self) -> Any:
        return _clip.vision_blocks(self.clip)


def load(
    path: str | os.PathLike = DEFAULT_PATH,
    *,
    filename: str = HEAD_FILE,
    clip_path: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
) -> Aesthetic:
    """The head from a hub repo / folder (``filename`` in it) or a file; the CLIP backbone and its
    ``preprocessor_config.json`` from ``clip_path``: by default a local CLIP folder next to the head (the head's
    folder itself, or ``clip/`` / ``clip-vit-large-patch14/`` inside or beside it), else ``DEFAULT_CLIP``."""
    file = resolve_file(path, filename, also=(os.path.splitext(filename)[0] + ".safetensors",), what="aesthetic head")
    if clip_path is None:
        expected = (*_files.CLIP_MODEL_FILES, *_files.CLIP_TOKENIZER_FILES, *_files.PREPROCESSOR_FILES)
        clip_path = _files.companion(path, expected=expected, subfolders=CLIP_SUBFOLDERS) or DEFAULT_CLIP
    state = tensor_state_dict(load_checkpoint(file, allow_pickle=allow_pickle), file)
    head = RewardMLP(mlp_input_size(state, "", file))
    missing, unexpected = head.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"{file} is not an aesthetic-v2 head: missing {missing}, unexpected {unexpected[:8]}")
    device = torch.device(device)
    clip = _clip.load_model(clip_path, device, dtype)
    embed_dim = int(clip.config.projection_dim)
    if embed_dim != head.layers[0].in_features:
        raise ValueError(f"{file} expects {head.layers[0].in_features}-d embeddings; {clip_path} gives {embed_dim}")
    return Aesthetic(
        clip,
        head.eval().requires_grad_(False).to(device),
        _clip.load_transform(clip_path, crop_offset="round"),
        variant=f"{os.path.basename(file)} on {os.fspath(clip_path)}",
        device=device,
        dtype=dtype,
        batch_size=batch_size,
    )
