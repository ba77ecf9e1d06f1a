"""Stable Diffusion 1.x/2.x: one CLIP text encoder, ``UNet2DConditionModel``, epsilon or v-prediction."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from diffalign.models.base import Adapter as _Base
from diffalign.models.base import Cond, tokenize
from diffalign.types import SampleInfo


class Adapter(_Base):
    """SD1.5-style adapter; ``cond = {"encoder_hidden_states": (B, 77, D)}`` (last hidden state)."""

    family = "sd15"
    pipeline_class = "StableDiffusionPipeline"

    @classmethod
    def text_encoder_names(cls) -> list[str]:
        return ["text_encoder"]

    def encode_prompts(self, prompts: Sequence[str], info: Sequence[SampleInfo] | None = None) -> Cond:
        self.require_text_encoders()
        (encoder,), (tokenizer,) = self.text_encoders, self.tokenizers
        ids = tokenize(tokenizer, prompts).to(encoder.device, non_blocking=True)
        return {"encoder_hidden_states": encoder(ids)[0]}

    def predict(self, x_t: Tensor, timesteps: Tensor, cond: Cond) -> Tensor:
        hidden = cond["encoder_hidden_states"].to(self.dtype)
        return self.denoiser(x_t.to(self.dtype), timesteps, encoder_hidden_states=hidden).sample

    def extra_pipeline_components(self) -> dict[str, object]:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def load(path: str, **kwargs: object) -> Adapter:
    """``Adapter.from_pretrained`` (hub id or local folder; see ``models.base.Adapter.from_pretrained``)."""
    return Adapter.from_pretrained(path, **kwargs)  # type: ignore[return-value,arg-type]
