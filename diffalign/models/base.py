"""The model-adapter contract shared by SD1.5, SDXL and SD3.

An adapter is the only code that knows a denoiser's call signature. It owns the frozen parts (VAE,
text encoders, tokenizers), the trainable denoiser, and the forward process read from the checkpoint's
scheduler config. It never knows which loss is being trained.

The reference model is the same object with its LoRA adapters switched off (``with adapter.reference():``);
no second copy of the denoiser is ever made.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from diffalign import diffusion
from diffalign.types import SampleInfo


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
Cond = dict[str, Tensor]


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bf16"`` -> ``torch.bfloat16``; unknown names raise with the valid choices."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choices: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def tokenize(tokenizer: Any, prompts: Sequence[str], max_length: int | None = None) -> Tensor:
    """Pad/truncate to the tokenizer's max length, as the diffusers pipelines do. Shape (B, L)."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def has_adapters(module: nn.Module) -> bool:
    """True when peft LoRA layers were injected into ``module``."""
    return bool(getattr(module, "_hf_peft_config_loaded", False) or getattr(module, "peft_config", None))


def set_lora_enabled(module: nn.Module, enabled: bool) -> None:
    """Switch every peft LoRA layer in ``module`` on or off (peft's own layer API, no library version gate).

    The same operation as diffusers' ``ModelMixin.disable_adapters`` and transformers' ``disable_adapters``, but
    it works on both kinds of model whatever transformers' minimum peft version says.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.enable_adapters(enabled)


class Adapter:
    """Shared behaviour of the family adapters (``sd15.Adapter``, ``sdxl.Adapter``, ``sd3.Adapter``).

    Attributes:
        denoiser: the UNet or SD3 transformer (the module that gets the LoRA).
        vae: kept in fp32 (the SDXL VAE overflows in fp16), frozen.
        text_encoders / tokenizers: in checkpoint order (``text_encoder``, ``text_encoder_2``, ...).
        scheduler: the checkpoint's scheduler, used for sampling pipelines.
        process: the training forward process (``VPProcess`` or ``FlowProcess``) from the scheduler config.
    """

    family: ClassVar[str]
    pipeline_class: ClassVar[str]
    denoiser_name: ClassVar[str] = "unet"

    def __init__(
        self,
        *,
        denoiser: nn.Module,
        vae: nn.Module,
        text_encoders: Sequence[nn.Module],
        tokenizers: Sequence[Any],
        scheduler: Any,
        process: Any | None = None,
    ) -> None:
        self.denoiser = denoiser
        self.vae = vae if vae.dtype == torch.float32 else vae.to(torch.float32)
        self.text_encoders = list(text_encoders)
        self.tokenizers = list(tokenizers)
        self.scheduler = scheduler
        self.process = process if process is not None else diffusion.from_scheduler(scheduler)
        for module in self.frozen_modules():
            module.requires_grad_(False).eval()
        self.denoiser.requires_grad_(False).eval()  # recipes call .train() (LoRA dropout) when training

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_components(cls, components: dict[str, Any], **kwargs: Any) -> Adapter:
        """Build from a pipeline-style component dict (``pipe.components`` or ``models.tiny.sd15()``)."""
        names = cls.text_encoder_names()
        return cls(
            denoiser=components[cls.denoiser_name],
            vae=components["vae"],
            text_encoders=[components[name] for name in names],
            tokenizers=[components[name.replace("text_encoder", "tokenizer")] for name in names],
            scheduler=components["scheduler"],
            **kwargs,
        )

    @classmethod
    def text_encoder_names(cls) -> list[str]:
        raise NotImplementedError

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        dtype: str | torch.dtype = "fp32",
        variant: str | None = None,
        revision: str | None = None,
        vae_path: str | None = None,
        **process_kwargs: Any,
    ) -> Adapter:
        """Load a hub id or a local diffusers folder exactly as users do.

        Args:
            path: ``"stabilityai/stable-diffusion-xl-base-1.0"`` or a folder with ``model_index.json``.
            dtype: dtype of the frozen denoiser and text encoders (the VAE stays fp32).
            variant: weight variant such as ``"fp16"`` (``diffusion_pytorch_model.fp16.safetensors``).
            vae_path: optional replacement VAE (e.g. ``madebyollin/sdxl-vae-fp16-fix``), a folder or hub id.
            process_kwargs: forwarded to the forward process (e.g. SD3 timestep sampling).
        """
        from diffalign.models import loading

        components = loading.load_components(
            cls, path, dtype=resolve_dtype(dtype), variant=variant, revision=revision, vae_path=vae_path
        )
        process = diffusion.from_scheduler(components["scheduler"], **process_kwargs)
        return cls.from_components(components, process=process)

    # ---- modules ------------------------------------------------------------------------------
    def frozen_modules(self) -> list[nn.Module]:
        return [self.vae, *self.text_encoders]

    def named_modules(self) -> dict[str, nn.Module]:
        """Trainable-capable modules by their pipeline component name."""
        names = {self.denoiser_name: self.denoiser}
        names.update(dict(zip(self.text_encoder_names(), self.text_encoders, strict=True)))
        return names

    def to(self, device: torch.device | str) -> Adapter:
        for module in (self.denoiser, self.vae, *self.text_encoders):
            module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Switch every LoRA adapter off (denoiser and text encoders): the frozen base model."""
        modules = [m for m in self.named_modules().values() if has_adapters(m)]
        for module in modules:
            set_lora_enabled(module, False)
        try:
            yield
        finally:
            for module in modules:
                set_lora_enabled(module, True)

    # ---- VAE ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        """Pixels (N, 3, H, W) in [-1, 1] -> scaled latents (N, C, H/f, W/f) in fp32.

        Uses the posterior mean rather than a sample: the SD VAEs' posterior std is tiny, and the mean
        makes cached latents exactly equal to latents computed on the fly.
        """
        dist = self.vae.encode(pixels.to(self.vae.device, torch.float32)).latent_dist
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (dist.mean - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents -> pixels (N, 3, H, W) in [-1, 1]."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = latents.to(self.vae.device, torch.float32) / self.vae.config.scaling_factor + shift
        return self.vae.decode(z).sample.clamp(-1, 1)

    # ---- family-specific ----------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str], info: Sequence[SampleInfo] | None = None) -> Cond:
        """Prompts (and per-sample geometry) -> conditioning tensors, each with batch dim first."""
        raise NotImplementedError

    def predict(self, x_t: Tensor, timesteps: Tensor, cond: Cond) -> Tensor:
        """The denoiser's raw output for noisy latents (N, C, h, w) at model-unit ``timesteps`` (N,)."""
        raise NotImplementedError

    def pipeline(self, scheduler: Any | None = None) -> Any:
        """A stock diffusers pipeline sharing this adapter's modules (LoRA state as it is now)."""
        import diffusers

        components: dict[str, Any] = dict(self.named_modules().items())
        components["vae"] = self.vae
        components["scheduler"] = scheduler or self.scheduler
        for name, tok in zip(self.text_encoder_names(), self.tokenizers, strict=True):
            components[name.replace("text_encoder", "tokenizer")] = tok
        components.update(self.extra_pipeline_components())
        pipe = getattr(diffusers, self.pipeline_class)(**components)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def extra_pipeline_components(self) -> dict[str, Any]:
        return {}


def repeat_cond(cond: Cond, k: int) -> Cond:
    """Repeat each group's conditioning for its K images (group-major order: b0k0, b0k1, b1k0, ...)."""
    return {key: value.repeat_interleave(k, dim=0) for key, value in cond.items()}
