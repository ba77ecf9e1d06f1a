"""Wan 2.1 text-to-video (T2V-1.3B, T2V-14B): UMT5 conditioning, ``WanTransformer3DModel`` on 5-D video latents.

The only code in diffalign that knows Wan. What it does, as ``diffusers.WanPipeline`` (0.42,
``pipelines/wan/pipeline_wan.py``) does:

- **Latents have a frame axis**: (N, C, F', h, w) with C = the VAE's ``z_dim`` (16), F' = (F - 1) // 4 + 1 latent
  frames for F video frames (the causal 3-D VAE keeps frame 0 and compresses the rest 4x, ``prepare_latents``
  :341), h, w = H / 8, W / 8. F must satisfy (F - 1) % 4 == 0 (the pipeline rounds other values, :494-498; here
  they are an error). The transformer patchifies (1, 2, 2), so h and w must be even.
- **Normalisation**: per-channel ``latents_mean`` / ``latents_std`` of the VAE config, ``(z - mean) / std``; the
  pipeline decodes with ``latents / (1 / std) + mean`` (:664-672). Encoding uses the posterior mean, as every family.
- **Text**: ``prompt_clean`` (ftfy + whitespace, the pipeline's own function), UMT5 tokens padded to
  ``max_sequence_length`` (512, the ``__call__`` default, :404) with the attention mask passed to the encoder; the
  hidden states are cut to each prompt's true length and zero-padded back to 512 (``_get_t5_prompt_embeds``
  :158-198). No mask reaches the transformer.
- **Schedule**: Wan checkpoints ship a ``UniPCMultistepScheduler`` with flow sigmas and a fixed ``flow_shift``
  (the pipeline docstring: 3.0 for 480P, 5.0 for 720P, :58). Training and rollouts use rectified flow
  (``diffusion.FlowProcess``, velocity target ``eps - x0``) with that shift (``make_process``); a
  ``FlowMatchEulerDiscreteScheduler`` checkpoint's ``shift`` is read as for SD3. The model gets ``sigma * 1000``
  (the pipeline passes the scheduler's timesteps, which UniPC truncates to integers; not reproduced).
- **Guidance**: true classifier-free guidance, two passes with the empty negative prompt, 5.0 by default
  (``__call__`` :392; flow_grpo's Wan config: 4.5). diffalign's sampler batches the two passes
  (``sampling.guidance.guided_output``); the value is the same.
- **LoRA**: flow_grpo's Wan targets (``scripts/train_wan2_1.py``, r=32, alpha=64: ``to_q``, ``to_k``, ``to_v``,
  ``to_out.0``; its ``add_*`` names exist only in the I2V model and match nothing in T2V), which hit both the self-
  (``attn1``) and cross-attention (``attn2``) of every block. diffusers ships no Wan LoRA training example.
  ``WanPipeline.save_lora_weights`` saves the transformer's LoRA only, so there is no text-encoder LoRA.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffalign import diffusion
from diffalign.models.base import Adapter as _Base
from diffalign.models.base import Cond, process_for
from diffalign.types import SampleInfo


DEFAULT_NUM_FRAMES = 81  # WanPipeline.__call__ default
DEFAULT_GUIDANCE = 5.0  # WanPipeline.__call__ default
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # flow_grpo scripts/train_wan2_1.py (T2V: attn1 and attn2)


def latent_frames(num_frames: int, temporal: int = 4) -> int:
    """Latent frames of a ``num_frames`` video: ``(F - 1) // temporal + 1`` (``WanPipeline.prepare_latents``)."""
    return (int(num_frames) - 1) // temporal + 1


def check_num_frames(num_frames: int, temporal: int = 4, key: str = "data.num_frames") -> None:
    """``num_frames`` must be ``temporal * k + 1`` (the causal VAE's first frame plus groups of ``temporal``)."""
    if num_frames < 1 or (num_frames - 1) % temporal:
        lower = max(1, (num_frames - 1) // temporal * temporal + 1)
        raise ValueError(
            f"{key}={num_frames}: a Wan video has 4k + 1 frames (the causal VAE compresses time {temporal}x after "
            f"frame 0); use {lower} or {lower + temporal}"
        )


class Adapter(_Base):
    """Wan 2.1 T2V adapter. ``num_frames``: video frames per sample (4k + 1); ``max_sequence_length``: UMT5 tokens."""

    family = "wan"
    pipeline_class = "WanPipeline"
    denoiser_name = "transformer"
    tokenizer_classes: ClassVar[dict[str, str]] = {"tokenizer": "AutoTokenizer"}
    is_video: ClassVar[bool] = True
    shard_blocks = ("WanTransformerBlock",)  # FSDP2 wrap units (training.sharding)

    def __init__(self, *, num_frames: int | None = None, max_sequence_length: int = 512, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_frames = DEFAULT_NUM_FRAMES if num_frames is None else int(num_frames)
        check_num_frames(self.num_frames, self.temporal_scale_factor)
        self.max_sequence_length = max_sequence_length

    @classmethod
    def text_encoder_names(cls) -> list[str]:
        return ["text_encoder"]  # UMT5-XXL

    @classmethod
    def lora_text_encoder_names(cls) -> list[str]:
        raise ValueError(
            "lora.text_encoder=true: WanPipeline saves and loads a transformer LoRA only; set lora.text_encoder=false"
        )

    @classmethod
    def make_process(cls, scheduler: Any, shift: float | None = None, **sampling: Any) -> Any:
        """Rectified flow with the checkpoint's fixed shift: UniPC's ``flow_shift`` (Wan's hub scheduler) or a
        flow-match scheduler's ``shift``; an explicit ``shift`` (``model.flow_shift``) wins."""
        config = getattr(scheduler, "config", scheduler)
        if "flow_shift" in config and not str(config.get("_class_name", type(scheduler).__name__)).startswith(
            "FlowMatch"
        ):
            if not config.get("use_flow_sigmas", False):
                raise ValueError(
                    f"wan: scheduler {type(scheduler).__name__} does not use flow sigmas (use_flow_sigmas)"
                )
            value = float(config["flow_shift"]) if shift is None else float(shift)
            return diffusion.FlowProcess(
                num_train_timesteps=int(config.get("num_train_timesteps", 1000)), shift=value, **sampling
            )
        return process_for(scheduler, shift=shift, **sampling)

    def default_lora_targets(self) -> tuple[str, ...]:
        return LORA_TARGETS

    # ---- geometry ---------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell in height and width (``AutoencoderKLWan.config.scale_factor_spatial``: 8)."""
        return int(self.vae.config.scale_factor_spatial)

    @property
    def temporal_scale_factor(self) -> int:
        """Video frames per latent frame after the first (``scale_factor_temporal``: 4)."""
        return int(self.vae.config.scale_factor_temporal)

    def latent_shape(self, height: int, width: int | None = None) -> tuple[int, ...]:
        """(C, F', h, w) of the latents of a ``num_frames`` x ``height`` x ``width`` video; h and w must be even
        (the transformer's (1, 2, 2) patches)."""
        width = height if width is None else width
        f = self.vae_scale_factor
        patch = tuple(self.denoiser.config.patch_size)
        if height % (f * patch[1]) or width % (f * patch[2]):
            raise ValueError(
                f"wan: video size {height}x{width} must be a multiple of {f * patch[1]} px (VAE {f}x, patch {patch})"
            )
        frames = latent_frames(self.num_frames, self.temporal_scale_factor)
        return (int(self.vae.config.z_dim), frames, height // f, width // f)

    def resolution_shift(self, resolution: int) -> float:
        raise ValueError(
            "model.flow_shift=resolution: Wan samples with the scheduler's fixed flow_shift (3.0 at 480P, 5.0 at "
            "720P), not a resolution-dependent one; use 'scheduler' or a number"
        )

    # ---- VAE ----------------------------------------------------------------------------------------
    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        c = int(self.vae.config.z_dim)
        shape = (1, c, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean, dtype=torch.float32).view(shape)
        std = torch.tensor(self.vae.config.latents_std, dtype=torch.float32).view(shape)
        return mean.to(like.device), std.to(like.device)

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        """Videos (N, 3, F, H, W) in [-1, 1] -> normalised latents (N, C, F', H/8, W/8) fp32 (posterior mean)."""
        if pixels.ndim != 5:
            raise ValueError(f"wan encodes videos (N, 3, F, H, W); got a tensor of shape {tuple(pixels.shape)}")
        check_num_frames(pixels.shape[2], self.temporal_scale_factor, key="video frames")
        z = self.vae.encode(pixels.to(self.vae.device, torch.float32, non_blocking=True)).latent_dist.mean
        mean, std = self._stats(z)
        return (z - mean) / std

    def unscale_latents(self, latents: Tensor) -> Tensor:
        """Normalised latents -> the VAE's latents ``z * std + mean`` (differentiable)."""
        mean, std = self._stats(latents)
        return latents * std + mean

    # ---- conditioning and the denoiser ----------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str], info: Sequence[SampleInfo] | None = None) -> Cond:
        """UMT5 last hidden states (B, max_sequence_length, D), zeroed past each prompt's length."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        self.require_text_encoders()
        (encoder,), (tokenizer,) = self.text_encoders, self.tokenizers
        tokens = tokenizer(
            [prompt_clean(p) for p in prompts],
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(encoder.device)
        hidden = encoder(tokens.input_ids.to(encoder.device), mask).last_hidden_state
        keep = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < mask.gt(0).sum(1)[:, None]
        return {"encoder_hidden_states": hidden * keep[..., None].to(hidden.dtype)}

    def predict(self, x_t: Tensor, timesteps: Tensor, cond: Cond) -> Tensor:
        """Velocity for latents (N, C, F', h, w) at model-unit ``timesteps`` (N,) = sigma * T."""
        n, device = x_t.shape[0], x_t.device
        t = torch.as_tensor(timesteps, device=device).float().expand(n)
        return self.denoiser(
            hidden_states=x_t.to(self.dtype),
            timestep=t,
            encoder_hidden_states=cond["encoder_hidden_states"].to(device, self.dtype),
            return_dict=False,
        )[0]

    def default_image_size(self, pipe: Any) -> int:
        """``WanPipeline``'s default height (480; its width is 832)."""
        return 480


def load(path: str, **kwargs: object) -> Adapter:
    """``Adapter.from_pretrained`` (hub id or local folder; see ``models.base.Adapter.from_pretrained``)."""
    return Adapter.from_pretrained(path, **kwargs)  # type: ignore[return-value,arg-type]
