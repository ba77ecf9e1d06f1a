"""Z-Image / Z-Image-Turbo (6B single-stream DiT): Qwen3 text conditioning, ``ZImageTransformer2DModel``.

The only code in diffalign that knows Z-Image. What it does, as diffusers 0.42's ``ZImagePipeline``
(``pipelines/z_image/pipeline_z_image.py``) does:

- **VAE** ``AutoencoderKL`` (16 channels, x8), latents ``(z - shift_factor) * scaling_factor`` as FLUX.1's; the
  transformer patchifies 2x2 itself, so the latents' sides must be even.
- **Transformer inputs are lists**: one (C, 1, h, w) latent and one caption (L_i, D) per sample, captions of their
  own lengths (the transformer pads each to a multiple of 32 internally). ``predict`` builds those lists.
- **Text**: each prompt as a single user message through the tokenizer's chat template
  (``add_generation_prompt=True, enable_thinking=True``), padded to ``max_sequence_length`` (512), the text encoder's
  **second-to-last** hidden layer, the valid tokens kept by the attention mask. ``cond`` stores them zero-padded
  with their 0/1 ``cap_mask`` (fixed shapes); ``predict`` hands the transformer each row's valid tokens only, as the
  pipeline does.
- **Time and sign**: the model takes ``1 - sigma`` (the pipeline's ``(1000 - t) / 1000``) and predicts the
  **negated** velocity (the pipeline negates it before ``scheduler.step``): ``predict`` returns ``-output``, the
  velocity ``eps - x0`` of diffalign's flow process.
- **Guidance**: standard CFG, but the pipeline's ``guidance_scale`` g is the *extra* weight,
  ``pos + g (pos - neg)`` = ``u + (g + 1)(c - u)``: diffalign's ``guidance_scale`` w is g + 1
  (``pipeline_guidance`` passes w - 1). Pipeline defaults: g = 5.0 (w = 6), 50 steps, 1024 px, negative prompt "";
  Z-Image-Turbo samples with g = 0 (w = 1, no CFG) in 8 steps. ``cfg_normalization`` / ``cfg_truncation`` (off by
  default) are not reproduced in training.
- **Schedule**: ``mu = calculate_shift(tokens)`` only when the checkpoint's scheduler uses dynamic shifting; the
  static-shift configs train and sample on their ``shift`` (``models.base.process_for``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffalign.models.base import Adapter as _Base
from diffalign.models.base import Cond
from diffalign.types import SampleInfo


# diffusers examples/dreambooth/train_dreambooth_lora_z_image.py:1280-1290 (default --lora_layers: the attention
# projections; the names also match the noise/context refiner blocks, as in that script)
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


class Adapter(_Base):
    """Z-Image adapter. ``max_sequence_length``: the prompt's token budget (pipeline default 512)."""

    family = "zimage"
    pipeline_class = "ZImagePipeline"
    denoiser_name = "transformer"
    shard_blocks = ("ZImageTransformerBlock",)  # FSDP2 wrap units (training.sharding)
    tokenizer_classes: ClassVar[dict[str, str]] = {"tokenizer": "AutoTokenizer"}

    def __init__(self, *, max_sequence_length: int = 512, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_sequence_length = max_sequence_length

    @classmethod
    def text_encoder_names(cls) -> list[str]:
        return ["text_encoder"]  # Qwen3

    @classmethod
    def lora_text_encoder_names(cls) -> list[str]:
        return []  # ZImagePipeline saves/loads transformer LoRA only

    def default_lora_targets(self) -> tuple[str, ...]:
        return LORA_TARGETS

    def latent_shape(self, height: int, width: int | None = None) -> tuple[int, int, int]:
        """The VAE's latents (C, h, w); the sides must be even (the transformer's 2x2 patches)."""
        shape = super().latent_shape(height, width)
        if shape[1] % 2 or shape[2] % 2:
            f = self.vae_scale_factor
            raise ValueError(f"zimage: image size must be a multiple of {2 * f} px (2x2 patches); got {shape}")
        return shape

    def resolution_shift(self, resolution: int) -> float:
        """The shift ``ZImagePipeline`` samples with: ``exp(mu)`` for a dynamic-shifting scheduler, else the
        scheduler's static ``shift`` (the pipeline passes ``mu``, which a static scheduler ignores)."""
        if not self.scheduler.config.get("use_dynamic_shifting"):
            return float(self.scheduler.config.get("shift", 1.0))
        return super().resolution_shift(resolution)

    def encode_prompts(self, prompts: Sequence[str], info: Sequence[SampleInfo] | None = None) -> Cond:
        self.require_text_encoders()
        (encoder,), (tokenizer,) = self.text_encoders, self.tokenizers
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=True
            )
            for p in prompts
        ]
        tokens = tokenizer(
            texts, padding="max_length", max_length=self.max_sequence_length, truncation=True, return_tensors="pt"
        ).to(encoder.device)
        mask = tokens.attention_mask.bool()
        hidden = encoder(input_ids=tokens.input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return {"cap_feats": hidden * mask[..., None], "cap_mask": mask.long()}

    def predict(self, x_t: Tensor, timesteps: Tensor, cond: Cond) -> Tensor:
        """Velocity ``eps - x0`` for latents (N, C, h, w) at model-unit ``timesteps`` (N,) = sigma * T."""
        n = x_t.shape[0]
        dtype, device = self.dtype, x_t.device
        feats, mask = cond["cap_feats"].to(device, dtype), cond["cap_mask"].to(device).bool()
        sigma = torch.as_tensor(timesteps, device=device).float().expand(n) / self.process.num_train_timesteps
        out = self.denoiser(
            list(x_t.to(dtype).unsqueeze(2).unbind(0)),
            (1 - sigma).to(dtype),
            [feats[i][mask[i]] for i in range(n)],
            return_dict=False,
        )[0]
        return -torch.stack(out).squeeze(2)

    def pipeline_guidance(self, scale: float, negative_prompt: list[str] | None, batch: int) -> dict[str, Any]:
        """``ZImagePipeline``'s ``guidance_scale`` is w - 1 (see the module docstring); 0 turns CFG off."""
        extra = {"negative_prompt": negative_prompt} if negative_prompt else {}
        return {"guidance_scale": max(scale - 1.0, 0.0), **extra}

    def default_image_size(self, pipe: Any) -> int:
        return 1024  # ZImagePipeline: height = height or 1024


def load(path: str, **kwargs: object) -> Adapter:
    """``Adapter.from_pretrained`` (hub id or local folder; see ``models.base.Adapter.from_pretrained``)."""
    return Adapter.from_pretrained(path, **kwargs)  # type: ignore[return-value,arg-type]
