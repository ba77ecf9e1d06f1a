"""FLUX.2-dev (32B MMDiT): Mistral-3 text conditioning, ``Flux2Transformer2DModel`` on patchified latent tokens.

The only code in diffalign that knows FLUX.2. What it does, as diffusers 0.42's ``Flux2Pipeline``
(``pipelines/flux2/pipeline_flux2.py``) does:

- **VAE** ``AutoencoderKLFlux2`` (32 latent channels, x8). The pipeline patchifies its latents 2x2 to (4C, h/2, w/2)
  (``patchify``: channel order (c, dy, dx)) and normalises those 4C channels with the VAE's BatchNorm running
  mean and variance (``bn``, eps ``batch_norm_eps``). diffalign keeps the VAE's own layout, (N, C, h, w) with C = 32
  the latent channel count: ``encode_images`` normalises in the patchified space and un-patchifies back, so the
  latents are exactly the pipeline's up to that fixed permutation, and the noise, the flow process and every
  per-element error are the same.
- **Tokens**: the transformer's patch size is 1; the patchified latents are flattened row-major to (N, h/2 * w/2, 4C)
  with 4-D position ids (T, H, W, L) = (0, row, col, 0); text ids are (0, 0, 0, l).
- **Text**: each prompt as [system ``SYSTEM_MESSAGE``, user prompt] through the processor's chat template
  (``add_generation_prompt=False``), padded to ``max_sequence_length`` (512); the hidden states of layers 10, 20
  and 30 of Mistral Small 3.1 stacked on features (3 x 5120 = 15360). No text mask reaches the transformer.
- **Timestep** ``sigma`` (the pipeline passes ``t / 1000``). **Guidance** is guidance-distilled: a guidance
  embedding takes the scale (pipeline default 4.0, ``guidance``); there is no negative prompt and no true CFG.
- **Schedule**: ``mu = compute_empirical_mu(tokens, num_steps)`` depends on the step count too; training takes one
  fixed shift (``models.base.process_for``; ``model.flow_shift`` a number to pick another), and the samplers step
  on diffalign's fixed-shift grids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffalign.models.base import Adapter as _Base
from diffalign.models.base import Cond
from diffalign.types import SampleInfo


DEFAULT_GUIDANCE = 4.0  # Flux2Pipeline.__call__ guidance_scale default
HIDDEN_LAYERS = (10, 20, 30)  # Flux2Pipeline text_encoder_out_layers default
# diffusers examples/dreambooth/train_dreambooth_lora_flux2.py:1292-1308: the attention projections of the double
# blocks, the single blocks' fused QKV+MLP input and their attention output
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj", "single_transformer_blocks.*.attn.to_out")


def patchify(latents: Tensor) -> Tensor:
    """(N, C, h, w) -> (N, 4C, h/2, w/2), ``Flux2Pipeline._patchify_latents``'s order (c, dy, dx)."""
    n, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX.2 patchifies 2x2 latent patches: latent size {h}x{w} must be even")
    x = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, c * 4, h // 2, w // 2)


def unpatchify(latents: Tensor) -> Tensor:
    """(N, 4C, h/2, w/2) -> (N, C, h, w): the exact inverse of ``patchify``."""
    n, c4, h, w = latents.shape
    x = latents.reshape(n, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(n, c4 // 4, h * 2, w * 2)


def image_ids(h: int, w: int, device: torch.device | str | None = None) -> Tensor:
    """(h/2 * w/2, 4) position ids (0, row, col, 0) of the patchified latents, row-major."""
    grid = torch.cartesian_prod(torch.arange(1), torch.arange(h // 2), torch.arange(w // 2), torch.arange(1))
    return grid.to(device)


class Adapter(_Base):
    """FLUX.2 adapter. ``guidance``: the guidance-embedding input (None -> 4.0, the pipeline's default)."""

    family = "flux2"
    pipeline_class = "Flux2Pipeline"
    denoiser_name = "transformer"
    shard_blocks = ("Flux2TransformerBlock", "Flux2SingleTransformerBlock")  # FSDP2 wrap units (training.sharding)
    tokenizer_classes: ClassVar[dict[str, str]] = {"tokenizer": "AutoProcessor"}

    def __init__(self, *, guidance: float | None = None, max_sequence_length: int = 512, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.guidance = DEFAULT_GUIDANCE if guidance is None else float(guidance)
        self.max_sequence_length = max_sequence_length

    @classmethod
    def text_encoder_names(cls) -> list[str]:
        return ["text_encoder"]  # Mistral Small 3.1 (Mistral3ForConditionalGeneration)

    @classmethod
    def lora_text_encoder_names(cls) -> list[str]:
        return []  # Flux2Pipeline saves/loads transformer LoRA only

    def default_lora_targets(self) -> tuple[str, ...]:
        """``LORA_TARGETS`` with the single blocks' ``attn.to_out`` spelled out per block (peft matches names, not
        globs): the diffusers script builds the same list in a loop."""
        singles = len(getattr(self.denoiser, "single_transformer_blocks", ()))
        plain = [t for t in LORA_TARGETS if "*" not in t]
        return (*plain, *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(singles)))

    def resolution_shift(self, resolution: int) -> float:
        """Refused: ``Flux2Pipeline``'s ``mu = compute_empirical_mu(tokens, num_steps)`` depends on the step count as
        well (1024 px: 2.02 at 50 steps; 512 px: 1.70 at 50, 1.99 at 10), so no one shift belongs to a resolution."""
        raise ValueError(
            "model.flow_shift=resolution: FLUX.2's shift depends on the step count too (compute_empirical_mu); set "
            "model.flow_shift to a number, e.g. 7.54 = exp(2.02) for 1024 px at 50 steps"
        )

    # ---- latents ------------------------------------------------------------------------------------
    def latent_shape(self, height: int, width: int | None = None) -> tuple[int, int, int]:
        """The VAE's latents (C, h, w); their sides must be even (2x2 patches)."""
        shape = super().latent_shape(height, width)
        if shape[1] % 2 or shape[2] % 2:
            f = self.vae_scale_factor
            raise ValueError(f"flux2: image size must be a multiple of {2 * f} px (2x2 patches); got {shape}")
        return shape

    def _bn(self, like: Tensor) -> tuple[Tensor, Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, torch.float32)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(
            like.device, torch.float32
        )
        return mean, std

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        """Pixels (N, 3, H, W) in [-1, 1] -> normalised latents (N, C, H/8, W/8) fp32 (posterior mode, as the
        pipeline's ``retrieve_latents(sample_mode="argmax")``)."""
        z = patchify(self.vae.encode(pixels.to(self.vae.device, torch.float32)).latent_dist.mode())
        mean, std = self._bn(z)
        return unpatchify((z - mean) / std)

    def decode_pixels(self, latents: Tensor) -> Tensor:
        """Normalised latents (N, C, h, w) -> the decoder's output (N, 3, H, W), differentiable."""
        z = patchify(latents.to(self.vae.device, torch.float32))
        mean, std = self._bn(z)
        return self.vae.decode(unpatchify(z * std + mean)).sample

    # ---- conditioning and forward -------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str], info: Sequence[SampleInfo] | None = None) -> Cond:
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        self.require_text_encoders()
        (encoder,), (tokenizer,) = self.text_encoders, self.tokenizers
        inputs = tokenizer.apply_chat_template(
            format_input(prompts=list(prompts), system_message=SYSTEM_MESSAGE),
            add_generation_prompt=False,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=self.max_sequence_length,
        )
        out = encoder(
            input_ids=inputs["input_ids"].to(encoder.device),
            attention_mask=inputs["attention_mask"].to(encoder.device),
            output_hidden_states=True,
            use_cache=False,
        )
        hidden = torch.stack([out.hidden_states[k] for k in HIDDEN_LAYERS], dim=1)  # (B, 3, L, D)
        n, k, length, d = hidden.shape
        return {"encoder_hidden_states": hidden.permute(0, 2, 1, 3).reshape(n, length, k * d)}

    def predict(self, x_t: Tensor, timesteps: Tensor, cond: Cond) -> Tensor:
        """Velocity for latents (N, C, h, w) at model-unit ``timesteps`` (N,) = sigma * T."""
        n, _, h, w = x_t.shape
        dtype, device = self.dtype, x_t.device
        hidden = cond["encoder_hidden_states"].to(device, dtype)
        tokens = patchify(x_t.to(dtype)).flatten(2).transpose(1, 2)  # Flux2Pipeline._pack_latents
        sigma = torch.as_tensor(timesteps, device=device).float().expand(n) / self.process.num_train_timesteps
        text_ids = torch.zeros(hidden.shape[1], 4, dtype=torch.long, device=device)
        text_ids[:, 3] = torch.arange(hidden.shape[1], device=device)
        out = self.denoiser(
            hidden_states=tokens,
            encoder_hidden_states=hidden,
            timestep=sigma.to(dtype),
            img_ids=image_ids(h, w, device).expand(n, -1, -1),
            txt_ids=text_ids.expand(n, -1, -1),
            guidance=torch.full((n,), self.guidance, device=device, dtype=torch.float32),
            return_dict=False,
        )[0]
        return unpatchify(out.transpose(1, 2).reshape(n, -1, h // 2, w // 2))

    # ---- pipelines ----------------------------------------------------------------------------------
    def pipeline_guidance(self, scale: float, negative_prompt: list[str] | None, batch: int) -> dict[str, Any]:
        """``Flux2Pipeline`` has no negative prompt and no true CFG: the scale is its guidance-embedding input."""
        if negative_prompt:
            raise ValueError("flux2: Flux2Pipeline takes no negative prompt (guidance-distilled); unset it")
        return {"guidance_scale": scale}

    def unpipe_latents(self, latents: Tensor, height: int, width: int) -> Tensor:
        """``Flux2Pipeline(output_type="latent")`` returns (N, h/2 * w/2, 4C) tokens: back to (N, C, h, w)."""
        if latents.ndim == 4:
            return latents
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        return unpatchify(latents.transpose(1, 2).reshape(latents.shape[0], -1, h // 2, w // 2))


def load(path: str, **kwargs: object) -> Adapter:
    """``Adapter.from_pretrained`` (hub id or local folder; see ``models.base.Adapter.from_pretrained``)."""
    return Adapter.from_pretrained(path, **kwargs)  # type: ignore[return-value,arg-type]
