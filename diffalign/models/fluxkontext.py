"""FLUX.1-Kontext-dev (instruction editing): FLUX.1 conditioned on a source image joined to the image sequence.

Everything but the source image is FLUX.1-dev (``models.flux``: CLIP-L pooled + T5 text, 2x2 packing, guidance
embedding, default 3.5 as diffusers' FLUX scripts). What Kontext adds, as diffusers 0.42.1's ``FluxKontextPipeline``
(``diffusers/pipelines/flux/pipeline_flux_kontext.py``) does it:

- The source image is VAE-encoded with the FLUX scaling ``(z - shift_factor) * scaling_factor``
  (``_encode_vae_image``, :599-611; the posterior mode, which for the Gaussian posterior is ``encode_images``'
  mean) and packed 2x2 like the noisy latents (``prepare_latents``, :655-658).
- Its position ids are the latent ids of its own size with the **first coordinate set to 1** (:659-663); the
  noisy target's ids keep 0. Ids are concatenated along the sequence, target first (:961-962).
- At every step the model input is ``cat([latents, image_latents], dim=1)`` (:1036-1038) and the output for the
  condition tokens is dropped, ``noise_pred[:, : latents.size(1)]`` (:1052). ``predict`` does the same, so the
  ELBO terms (noisy target, error on target tokens only) are FLUX.1's.
- The schedule's ``mu`` counts the target's tokens only (:964-972); the pipeline auto-resizes the source to the
  ``PREFERRED_KONTEXT_RESOLUTIONS`` entry nearest its aspect (:82, :934-944; tests pass ``_auto_resize=False``).

LoRA targets: FLUX.1's list plus the single blocks' ``proj_mlp``, as diffusers'
``examples/dreambooth/train_dreambooth_lora_flux_kontext.py`` (default ``--lora_layers``, :1442-1473) and
Flow-GRPO's Kontext script (yifan123/flow_grpo ``scripts/train_flux_kontext.py``:411-430, r 64 / alpha 128) choose.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffalign.models import flux
from diffalign.models.base import Cond
from diffalign.models.editing import SOURCE, EditingMixin
from diffalign.types import SampleInfo


class Adapter(EditingMixin, flux.Adapter):
    """FLUX.1-Kontext adapter: ``encode_prompts(..., sources=)`` adds the source latents to the conditioning."""

    family = "fluxkontext"
    pipeline_class = "FluxKontextPipeline"

    def default_lora_targets(self) -> tuple[str, ...]:
        return (*flux.Adapter.default_lora_targets(self), "proj_mlp")  # explicit: bench/memory.py calls it unbound

    def encode_prompts(
        self, prompts: Sequence[str], info: Sequence[SampleInfo] | None = None, sources: Tensor | None = None
    ) -> Cond:
        cond = super().encode_prompts(prompts, info)
        cond[SOURCE] = self.source_latents(sources, len(prompts))
        return cond

    def image_tokens(self, x_t: Tensor, cond: Cond) -> tuple[Tensor, Tensor]:
        """Target tokens then source tokens (N, h/2 * w/2 + h'/2 * w'/2, 4C); source ids (1, row, column)."""
        tokens, ids = flux.Adapter.image_tokens(self, x_t, cond)  # explicit: bench/memory.py binds it to a shim
        source = cond[SOURCE].to(x_t.device, x_t.dtype)
        hs, ws = source.shape[-2:]
        source_ids = flux.image_ids(hs, ws, x_t.device, x_t.dtype)
        source_ids[:, 0] = 1
        return torch.cat([tokens, flux.pack(source)], dim=1), torch.cat([ids, source_ids], dim=0)


def load(path: str, **kwargs: object) -> Adapter:
    """``Adapter.from_pretrained`` (hub id or local folder; see ``models.base.Adapter.from_pretrained``)."""
    return Adapter.from_pretrained(path, **kwargs)  # type: ignore[return-value,arg-type]
