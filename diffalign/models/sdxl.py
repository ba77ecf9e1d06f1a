"""Stable Diffusion XL: two CLIP encoders, pooled embeddings and per-sample size/crop ``time_ids``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffalign.models.base import Adapter as _Base
from diffalign.models.base import Cond, tokenize
from diffalign.types import SampleInfo


def time_ids(info: Sequence[SampleInfo]) -> Tensor:
    """SDXL micro-conditioning (B, 6): original (h, w), crop (top, left), target (h, w) per sample."""
    rows = [(*s.original_size, *s.crop_top_left, *s.target_size) for s in info]
    return torch.tensor(rows, dtype=torch.float32)


class Adapter(_Base):
    """SDXL adapter.

    ``cond`` holds ``encoder_hidden_states`` (B, 77, D1 + D2): the penultimate hidden states of both encoders
    concatenated on features; ``text_embeds`` (B, P): the projected pooled output of encoder 2; and
    ``time_ids`` (B, 6) from each sample's ``SampleInfo``, as in the SDXL training scripts.
    """

    family = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"

    @classmethod
    def text_encoder_names(cls) -> list[str]:
        return ["text_encoder", "text_encoder_2"]

    def encode_prompts(self, prompts: Sequence[str], info: Sequence[SampleInfo] | None = None) -> Cond:
        self.require_text_encoders()
        if info is None or len(info) != len(prompts):
            raise ValueError("SDXL needs one SampleInfo (original size, crop, target size) per prompt")
        hidden, pooled = [], None
        for encoder, tokenizer in zip(self.text_encoders, self.tokenizers, strict=True):
            out = encoder(tokenize(tokenizer, prompts).to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # text_embeds of CLIPTextModelWithProjection (the last encoder)
        return {
            "encoder_hidden_states": torch.cat(hidden, dim=-1),
            "text_embeds": pooled,
            "time_ids": time_ids(info).to(pooled.device),
        }

    def predict(self, x_t: Tensor, timesteps: Tensor, cond: Cond) -> Tensor:
        added = {"text_embeds": cond["text_embeds"].to(self.dtype), "time_ids": cond["time_ids"].to(self.dtype)}
        hidden = cond["encoder_hidden_states"].to(self.dtype)
        return self.denoiser(
            x_t.to(self.dtype), timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added
        ).sample


def load(path: str, **kwargs: object) -> Adapter:
    """``Adapter.from_pretrained`` (hub id or local folder; see ``models.base.Adapter.from_pretrained``)."""
    return Adapter.from_pretrained(path, **kwargs)  # type: ignore[return-value,arg-type]
