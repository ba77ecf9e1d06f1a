"""Stable Diffusion 3/3.5: CLIP-L + CLIP-G + T5, MMDiT transformer, rectified-flow velocity target.

SD3.5 is the same ``SD3Transformer2DModel`` with two config switches (read by ``architecture``):
``qk_norm`` (RMSNorm on q/k; weights that are not Linear layers, so never LoRA targets) and
``dual_attention_layers`` (SD3.5-Medium: blocks 0-12 carry a second, image-only attention ``attn2``). peft matches
a target by exact name or ``.``-suffix, so the ``attn.to_q``-style lists of diffusers' SD3 script and Flow-GRPO
silently skip ``attn2``; ``resolve_lora_targets`` adds the ``attn2`` twin of every ``attn.`` projection target.
Skip-layer guidance (``skip_layers``) is a sampling option of ``StableDiffusion3Pipeline`` only: ``predict``,
the training forward, never skips a layer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.models.base import Adapter as _Base
from diffalign.models.base import Cond, tokenize
from diffalign.types import SampleInfo


logger = logging.getLogger(__name__)
# the joint-attention projections of both streams (train_dreambooth_lora_sd3.py, flow_grpo's SD3 configs)
JOINT_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
CONTEXT_TARGETS = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
DUAL_TARGETS = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")


class Adapter(_Base):
    """SD3 adapter.

    ``cond`` holds ``encoder_hidden_states`` (B, 77 + L_t5, D_t5): the CLIP-L and CLIP-G penultimate hidden
    states concatenated on features, zero-padded to the T5 width, then joined with T5's output on the
    sequence axis (as ``StableDiffusion3Pipeline.encode_prompt`` does); and ``pooled_projections``
    (B, P_l + P_g). Latents are ``(z - shift_factor) * scaling_factor``.
    """

    family = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_name = "transformer"
    shard_blocks = ("JointTransformerBlock",)
    max_t5_length = 256  # StableDiffusion3Pipeline's default max_sequence_length

    @classmethod
    def text_encoder_names(cls) -> list[str]:
        return ["text_encoder", "text_encoder_2", "text_encoder_3"]

    @property
    def architecture(self) -> dict[str, Any]:
        """SD3.5 switches from the transformer config: ``qk_norm`` (None or "rms_norm"), ``dual_attention_layers``."""
        cfg = self.denoiser.config
        return {
            "qk_norm": getattr(cfg, "qk_norm", None),
            "dual_attention_layers": tuple(getattr(cfg, "dual_attention_layers", None) or ()),
        }

    def default_lora_targets(self) -> tuple[str, ...]:
        """Joint attention of both streams, plus ``attn2`` of SD3.5-Medium's dual-attention blocks."""
        return self.resolve_lora_targets((*JOINT_TARGETS, *CONTEXT_TARGETS))

    def resolve_lora_targets(self, targets: Sequence[str] | None) -> tuple[str, ...]:
        """Add the ``attn2.`` twin of each ``attn.`` projection target when the model has dual-attention blocks."""
        if targets is None:
            return self.default_lora_targets()
        out = list(targets)
        if self.architecture["dual_attention_layers"]:
            twins = [f"attn2.{t[len('attn.') :]}" for t in targets if t in JOINT_TARGETS]
            added = [t for t in twins if t not in out]
            if added:
                logger.info(
                    "dual-attention blocks %s: LoRA also on %s", self.architecture["dual_attention_layers"], added
                )
            out += added
        return tuple(out)

    def encode_prompts(self, prompts: Sequence[str], info: Sequence[SampleInfo] | None = None) -> Cond:
        self.require_text_encoders()
        clip_hidden, pooled = [], []
        for encoder, tokenizer in zip(self.text_encoders[:2], self.tokenizers[:2], strict=True):
            out = encoder(tokenize(tokenizer, prompts).to(encoder.device), output_hidden_states=True)
            clip_hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        t5, t5_tok = self.text_encoders[2], self.tokenizers[2]
        t5_hidden = t5(tokenize(t5_tok, prompts, max_length=self.max_t5_length).to(t5.device))[0]
        clip = torch.cat(clip_hidden, dim=-1)
        clip = F.pad(clip, (0, t5_hidden.shape[-1] - clip.shape[-1]))
        return {
            "encoder_hidden_states": torch.cat([clip, t5_hidden.to(clip.dtype)], dim=-2),
            "pooled_projections": torch.cat(pooled, dim=-1),
        }

    def predict(self, x_t: Tensor, timesteps: Tensor, cond: Cond) -> Tensor:
        """Velocity of the full model: no ``skip_layers`` (skip-layer guidance is for sampling only)."""
        return self.denoiser(
            hidden_states=x_t.to(self.dtype),
            timestep=timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"].to(self.dtype),
            pooled_projections=cond["pooled_projections"].to(self.dtype),
        ).sample


def load(path: str, **kwargs: object) -> Adapter:
    """``Adapter.from_pretrained`` (hub id or local folder; see ``models.base.Adapter.from_pretrained``)."""
    return Adapter.from_pretrained(path, **kwargs)  # type: ignore[return-value,arg-type]
