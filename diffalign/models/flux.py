"""FLUX.1 (dev, schnell): CLIP-L pooled + T5 conditioning, ``FluxTransformer2DModel`` on 2x2-packed latents.

The only code in diffalign that knows FLUX. What it does, as ``FluxPipeline`` and diffusers'
``examples/dreambooth/train_dreambooth_lora_flux.py`` do:

- Latents are ``(z - shift_factor) * scaling_factor`` (16 channels for the real VAE). The transformer sees them
  packed: (N, C, h, w) -> (N, h/2 * w/2, 4C) (``pack``; ``unpack`` inverts it exactly), with 2-D image ids
  (h/2 * w/2, 3) holding (0, row, column) and 2-D text ids (L, 3) of zeros (3-D ids are deprecated).
- ``cond`` holds ``encoder_hidden_states`` (B, L, D_t5), T5's last hidden state padded to
  ``max_sequence_length`` (512, the pipeline default), and ``pooled_projections`` (B, D_clip), CLIP-L's pooled
  output.
- The timestep goes in as ``sigma`` (the model multiplies by 1000), so ``predict`` divides diffalign's model-unit
  timesteps ``sigma * T`` by ``T``.
- FLUX.1-dev is guidance-distilled: a guidance embedding takes the guidance scale as an input. Training feeds one
  explicit value (``guidance``; diffusers' FLUX LoRA script defaults to 3.5, ``--guidance_scale``); FLUX.1-schnell
  has no guidance embedding and takes none (passing one is an error).
- The forward process is rectified flow (``diffusion.FlowProcess``, velocity target ``eps - x0``) with an explicit
  fixed shift; see ``diffusion.flow`` for why FLUX's dynamic shifting needs one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffalign.models.base import Adapter as _Base
from diffalign.models.base import Cond, tokenize
from diffalign.types import SampleInfo


DEFAULT_GUIDANCE = 3.5  # train_dreambooth_lora_flux.py --guidance_scale default (FLUX.1-dev)


def pack(latents: Tensor) -> Tensor:
    """(N, C, h, w) -> (N, h/2 * w/2, 4C), ``FluxPipeline._pack_latents``'s order (c, 2, 2 within a token)."""
    n, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches: latent size {h}x{w} must be even")
    x = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """(N, h/2 * w/2, 4C) -> (N, C, h, w): the exact inverse of ``pack``."""
    n, _, d = tokens.shape
    x = tokens.view(n, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, d // 4, h, w)


def image_ids(h: int, w: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """2-D image position ids (h/2 * w/2, 3): (0, row, column) per packed token, row-major."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class Adapter(_Base):
    """FLUX.1 adapter. ``guidance``: the guidance-embedding input of guidance-distilled checkpoints (dev)."""

    family = "flux"
    pipeline_class = "FluxPipeline"
    denoiser_name = "transformer"
    shard_blocks = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    tokenizer_classes: ClassVar[dict[str, str]] = {"tokenizer": "CLIPTokenizer", "tokenizer_2": "AutoTokenizer"}

    def __init__(self, *, guidance: float | None = None, max_sequence_length: int = 512, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        distilled = bool(getattr(self.denoiser.config, "guidance_embeds", False))
        if guidance is not None and not distilled:
            raise ValueError(
                f"model.guidance={guidance}: this FLUX transformer has no guidance embedding (guidance_embeds=false, "
                "e.g. FLUX.1-schnell); unset model.guidance"
            )
        self.guidance = (DEFAULT_GUIDANCE if guidance is None else float(guidance)) if distilled else None
        self.max_sequence_length = max_sequence_length

    @classmethod
    def text_encoder_names(cls) -> list[str]:
        return ["text_encoder", "text_encoder_2"]  # CLIP-L (pooled), T5-XXL

    @classmethod
    def lora_text_encoder_names(cls) -> list[str]:
        return ["text_encoder"]  # FluxPipeline saves/loads CLIP LoRA only (as the diffusers FLUX script trains)

    def default_lora_targets(self) -> tuple[str, ...]:
        """train_dreambooth_lora_flux.py's default ``--lora_layers``: attention of both streams and the MLPs.

        Single-stream blocks have no ``to_out``; their ``attn.to_{q,k,v}`` are matched by suffix.
        """
        return (
            "attn.to_k",
            "attn.to_q",
            "attn.to_v",
            "attn.to_out.0",
            "attn.add_k_proj",
            "attn.add_q_proj",
            "attn.add_v_proj",
            "attn.to_add_out",
            "ff.net.0.proj",
            "ff.net.2",
            "ff_context.net.0.proj",
            "ff_context.net.2",
        )

    def encode_prompts(self, prompts: Sequence[str], info: Sequence[SampleInfo] | None = None) -> Cond:
        self.require_text_encoders()
        (clip, t5), (clip_tok, t5_tok) = self.text_encoders, self.tokenizers
        pooled = clip(tokenize(clip_tok, prompts).to(clip.device), output_hidden_states=False).pooler_output
        t5_ids = tokenize(t5_tok, prompts, max_length=self.max_sequence_length).to(t5.device)
        hidden = t5(t5_ids, output_hidden_states=False)[0]
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled}

    def predict(self, x_t: Tensor, timesteps: Tensor, cond: Cond) -> Tensor:
        """Velocity for unpacked latents (N, C, h, w) at model-unit ``timesteps`` (N,) = sigma * T."""
        n, _, h, w = x_t.shape
        dtype, device = self.dtype, x_t.device
        hidden = cond["encoder_hidden_states"].to(device, dtype)
        sigma = torch.as_tensor(timesteps, device=device).float().expand(n) / self.process.num_train_timesteps
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((n,), self.guidance, device=device, dtype=torch.float32)
        tokens, ids = self.image_tokens(x_t.to(dtype), cond)
        out = self.denoiser(
            hidden_states=tokens,
            timestep=sigma.to(dtype),
            guidance=guidance,
            pooled_projections=cond["pooled_projections"].to(device, dtype),
            encoder_hidden_states=hidden,
            txt_ids=torch.zeros(hidden.shape[1], 3, device=device, dtype=dtype),
            img_ids=ids,
            return_dict=False,
        )[0]
        return unpack(out[:, : (h // 2) * (w // 2)], h, w)  # editing (Kontext): drop the condition tokens' output

    def image_tokens(self, x_t: Tensor, cond: Cond) -> tuple[Tensor, Tensor]:
        """The transformer's image sequence and its ids: the packed noisy latents (N, h/2 * w/2, 4C) and
        ``image_ids`` (h/2 * w/2, 3). ``models.fluxkontext`` appends the source image's tokens after them."""
        h, w = x_t.shape[-2:]
        return pack(x_t), image_ids(h, w, x_t.device, x_t.dtype)

    def latent_shape(self, height: int, width: int | None = None) -> tuple[int, int, int]:
        """The VAE's unpacked latents (``models.base.Adapter.latent_shape``); their sides must be even, as
        ``predict`` packs 2x2 patches into tokens (FluxPipeline: a multiple of ``vae_scale_factor * 2`` px)."""
        shape = super().latent_shape(height, width)
        if shape[1] % 2 or shape[2] % 2:
            f = self.vae_scale_factor
            raise ValueError(f"flux: image size must be a multiple of {2 * f} px (2x2-packed latents); got {shape}")
        return shape

    def extra_pipeline_components(self) -> dict[str, object]:
        return {"image_encoder": None, "feature_extractor": None}

    def unpipe_latents(self, latents: Tensor, height: int, width: int) -> Tensor:
        """``FluxPipeline(output_type="latent")`` returns packed tokens; unpack them for the pixel size."""
        if latents.ndim == 4:
            return latents
        return unpack(latents, height // self.vae_scale_factor, width // self.vae_scale_factor)


def load(path: str, **kwargs: object) -> Adapter:
    """``Adapter.from_pretrained`` (hub id or local folder; see ``models.base.Adapter.from_pretrained``)."""
    return Adapter.from_pretrained(path, **kwargs)  # type: ignore[return-value,arg-type]
