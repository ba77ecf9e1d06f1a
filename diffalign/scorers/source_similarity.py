"""Source similarity: how much of its source image an edit keeps, as the CLIP image-image cosine of the two.

Flow-GRPO's editing runs (FLUX.1-Kontext, Qwen-Image-Edit) add this term to a task reward so that an edit stays
faithful to its source: ``image_similarity_score`` embeds the edited image and the reference image with the image
tower of its CLIP scorer and rewards their cosine (yifan123/flow_grpo@54809b5 ``flow_grpo/rewards.py``:61-78; weights
0.5 / 0.5 with GenEval counting in ``counting_flux_kontext``, 0.2 / 0.8 for Qwen-Image-Edit, ``config/grpo.py``).

Per image ``cos(E(edit), E(source))`` of L2-normalised projected image embeddings, in [-1, 1], higher = closer; no
text is read (``prompts`` may be None). Both images go through the same CLIP eval transform
(``preprocessor_config.json``). Call as every scorer plus ``sources``: ``scorer(edits, prompts, sources=sources)``,
``sources`` in the same form as ``images`` (PIL list or (B, 3, H, W) in [0, 1]); the source side never carries a
graph. Default backbone ``openai/clip-vit-large-patch14`` (a hub id or a ``save_pretrained`` folder).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from diffalign.scorers import _clip
from diffalign.scorers.base import BatchedScorer, check_images, preprocess_images


DEFAULT_PATH = "openai/clip-vit-large-patch14"


class SourceSimilarity(BatchedScorer):
    """CLIP image-image cosine of each edit with its source (``needs_sources``: callers pass ``sources=``)."""

    name = "source_similarity"
    needs_prompts = False
    needs_sources = True

    def __init__(self, model: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model
        self._source_embeds: torch.Tensor | None = None

    def __call__(  # type: ignore[override]
        self, images: Any, prompts: Sequence[str] | None = None, *, grad: bool = False, sources: Any = None
    ) -> torch.Tensor:
        n = check_images(images)
        if sources is None:
            raise ValueError(
                "source_similarity scores an edit against its source image: pass sources= (online RL: set "
                "data.source_image_column)"
            )
        if check_images(sources) != n:
            raise ValueError(f"source_similarity: {n} images but {check_images(sources)} sources")
        with torch.no_grad():
            embeds = [
                _clip.image_embeds(self.model, preprocess_images(sources[lo : lo + self.batch_size], self.transform,
                                                                 self.device).to(self.dtype))
                for lo in range(0, n, self.batch_size)
            ]  # fmt: skip
        self._source_embeds = torch.cat(embeds) if embeds else None
        try:  # BatchedScorer batches the edits in the same order: _score takes the sources' rows in turn
            return super().__call__(images, prompts, grad=grad)
        finally:
            self._source_embeds = None

    def _score(self, pixels: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        assert self._source_embeds is not None
        ref, self._source_embeds = self._source_embeds[: len(pixels)], self._source_embeds[len(pixels) :]
        return (_clip.image_embeds(self.model, pixels) * ref).sum(dim=-1)

    def vision_blocks(self) -> Any:
        return _clip.vision_blocks(self.model)


def load(
    path: str | os.PathLike | None = None,
    *,
    processor_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
) -> SourceSimilarity:
    """The CLIP ``CLIPModel`` at ``path`` (default ``openai/clip-vit-large-patch14``) and its image transform (from
    ``processor_path``, default the same place)."""
    path = DEFAULT_PATH if path is None else path
    device = torch.device(device)
    return SourceSimilarity(
        _clip.load_model(path, device, dtype),
        variant=f"{os.fspath(path)} image-image cos",
        transform=_clip.load_transform(path if processor_path is None else processor_path, crop_offset="floor"),
        device=device,
        dtype=dtype,
        batch_size=batch_size,
    )
