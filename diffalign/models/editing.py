"""What the instruction-editing families (``fluxkontext``, ``qwenimageedit``) share: a source image per prompt.

An editing adapter's ``encode_prompts(prompts, info, sources=...)`` takes the source pixels (B, 3, H, W) in [-1, 1]
beside the prompts and stores the source's VAE latents in the conditioning under ``SOURCE`` (B, C, h', w'), so they
travel wherever prompt embeddings travel (repeated per image of a group by ``base.repeat_cond``, the same for the
policy and the reference pass). ``predict`` appends the source's tokens to the noisy target's and drops the model
output on them; the ELBO terms (noisy target latents, the error on the target tokens only) are the base family's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from torch import Tensor

from diffalign.types import SampleInfo


SOURCE = "source_latents"  # the conditioning key of the source image's latents (B, C, h', w')


class EditingMixin:
    """Mixed in before a family adapter: ``is_editing`` and the source-image checks and encoding."""

    is_editing: ClassVar[bool] = True
    family: ClassVar[str]

    def source_latents(self, sources: Tensor | None, batch: int) -> Tensor:
        """Source pixels (B, 3, H, W) in [-1, 1] -> the family's normalised VAE latents (B, C, H/f, W/f), fp32."""
        return self.encode_images(self.require_sources(sources, batch))  # type: ignore[attr-defined]

    def require_sources(self, sources: Tensor | None, batch: int) -> Tensor:
        """``sources`` when they are (B, 3, H, W); else the one-line error saying how to give them."""
        if sources is None:
            raise ValueError(
                f"{self.family} is an editing model: it needs a source image per prompt "
                "(set data.source_image_column, or a 'source_image' per prompt in the prompts file)"
            )
        if sources.ndim != 4 or sources.shape[0] != batch:
            raise ValueError(f"{self.family}: need sources (B={batch}, 3, H, W), got {tuple(sources.shape)}")
        return sources

    def pipeline_inputs(self, sources: Tensor) -> dict[str, Any]:
        """The stock pipeline's ``image`` argument for source pixels (B, 3, H, W) in [-1, 1]: PIL images, as the
        pipelines resize and normalise them themselves."""
        from torchvision.transforms.functional import to_pil_image

        return {"image": [to_pil_image(((s.float().cpu() + 1) / 2).clamp(0, 1)) for s in sources]}


def encode(adapter: Any, prompts: Sequence[str], info: Sequence[SampleInfo] | None, sources: Tensor | None) -> Any:
    """``adapter.encode_prompts`` with the source images of an editing family (``sources`` (B, 3, H, W)); a text-to-image
    family takes none."""
    if sources is None:
        return adapter.encode_prompts(list(prompts), None if info is None else list(info))
    if not getattr(adapter, "is_editing", False):
        raise ValueError(f"source images were given but {adapter.family} is not an editing family; unset them")
    return adapter.encode_prompts(list(prompts), None if info is None else list(info), sources=sources)
