"""The model-adapter contract shared by SD1.5, SDXL, SD3/SD3.5 and FLUX.1.

An adapter is the only code that knows a denoiser's call signature. It owns the frozen parts (VAE,
text encoders, tokenizers), the trainable denoiser, and the forward process read from the checkpoint's
scheduler config. It never knows which loss is being trained.

The reference model is the same object with its LoRA adapters switched off (``with adapter.reference():``);
no second copy of the denoiser is made in LoRA mode. In full fine-tuning (``models.full``) the same context
swaps in the frozen base copy instead, so the callers of ``reference()`` never branch on the mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from diffalign import diffusion
from diffalign.diffusion import flow
from diffalign.types import SampleInfo


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
Cond = dict[str, Tensor]
Quantize = Literal["none", "nf4", "float8"]


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


def compile_denoiser(module: nn.Module, recompile_limit: int = 64) -> None:
    """``torch.compile`` the forward of ``module`` in place (``nn.Module.compile``: parameter names, state dicts and
    the LoRA layers stay as they are), with static shapes.

    Dynamo specialises each graph on the input shapes, on grad mode and on each LoRA layer's on/off flag, so a run
    compiles two graphs per resolution bucket, the policy forward (LoRA on, with grad) and the reference forward
    (LoRA off, no grad), and then only looks them up: toggling the adapter never recompiles. ``recompile_limit``
    bounds the graphs kept per code object (torch's default, 8, is four buckets).
    """
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, recompile_limit)
    module.compile(dynamic=False)


class Adapter:
    """Shared behaviour of the family adapters (``sd15``, ``sdxl``, ``sd3`` (SD3 and SD3.5), ``flux``).

    Attributes:
        denoiser: the UNet or transformer (the module that gets the LoRA).
        vae: kept in fp32 (the SDXL VAE overflows in fp16), frozen.
        text_encoders / tokenizers: in checkpoint order (``text_encoder``, ``text_encoder_2``, ...); both empty
            when the model was loaded without text encoders (training from cached prompt embeddings).
        scheduler: the checkpoint's scheduler, used for sampling pipelines.
        process: the training forward process (``VPProcess`` or ``FlowProcess``) from the scheduler config.
    """

    family: ClassVar[str]
    pipeline_class: ClassVar[str]
    denoiser_name: ClassVar[str] = "unet"
    is_video: ClassVar[bool] = False  # True: pixels (N, 3, F, H, W) and latents (N, C, F', h, w) (``models.wan``)
    is_editing: ClassVar[bool] = False  # True: conditioned on a source image per prompt (``models.editing``)
    # pipeline components beside the text encoders and tokenizers that prompt encoding needs (Qwen-Image-Edit: processor)
    extra_component_names: ClassVar[tuple[str, ...]] = ()
    # the denoiser's FSDP2 wrap units (class names; training.sharding): the UNet's down, mid and up blocks
    shard_blocks: ClassVar[tuple[str, ...]] = (
        "CrossAttnDownBlock2D",
        "DownBlock2D",
        "UNetMidBlock2DCrossAttn",
        "CrossAttnUpBlock2D",
        "UpBlock2D",
    )
    # transformers class per tokenizer component (the slow CLIP tokenizer loads the shipped tiny vocab exactly)
    tokenizer_classes: ClassVar[dict[str, str]] = {
        "tokenizer": "CLIPTokenizer",
        "tokenizer_2": "CLIPTokenizer",
        "tokenizer_3": "AutoTokenizer",
    }

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
        if self.text_encoders and len(self.text_encoders) != len(self.text_encoder_names()):
            raise ValueError(f"{self.family}: expected text encoders {self.text_encoder_names()} or none")
        self.scheduler = scheduler
        self.process = process if process is not None else self.make_process(scheduler)
        for module in self.frozen_modules():
            module.requires_grad_(False).eval()
        self.denoiser.requires_grad_(False).eval()  # recipes call .train() (LoRA dropout) when training
        self.full: Any = None  # models.full.FullHandle once set up for full fine-tuning
        self.reference_denoiser: nn.Module | None = None  # full fine-tuning's frozen base copy, when one is kept
        self.reference_text_encoders: list[nn.Module] | None = None  # ... and of the text encoders it trains

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_components(cls, components: dict[str, Any], **kwargs: Any) -> Adapter:
        """Build from a pipeline-style component dict (``pipe.components`` or ``models.tiny.sd15()``)."""
        names = [n for n in cls.text_encoder_names() if components.get(n) is not None]
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
    def make_process(cls, scheduler: Any, **kwargs: Any) -> Any:
        """The training forward process of the checkpoint's ``scheduler`` (``process_for``; a family whose pipeline
        samples with a non-flow-match scheduler class, e.g. Wan's UniPC, overrides it)."""
        return process_for(scheduler, **kwargs)

    @classmethod
    def lora_text_encoder_names(cls) -> list[str]:
        """The text encoders ``lora.text_encoder=true`` adapts (the CLIP ones the family's pipeline can save)."""
        return cls.text_encoder_names()[:2]

    def default_lora_targets(self) -> tuple[str, ...]:
        """Denoiser LoRA targets when the config names none (the diffusers DPO scripts' attention projections)."""
        return ("to_q", "to_k", "to_v", "to_out.0")

    def resolve_lora_targets(self, targets: Sequence[str] | None) -> tuple[str, ...]:
        """The denoiser targets actually used for a requested list (``None`` = ``default_lora_targets``)."""
        return tuple(targets) if targets is not None else self.default_lora_targets()

    def trains_text_encoders(self) -> bool:
        """Whether a text encoder trains (a text-encoder LoRA, or full fine-tuning of it): prompts are then encoded
        with grad for the policy, and again for the reference pass."""
        return any(has_adapters(m) or any(p.requires_grad for p in m.parameters()) for m in self.text_encoders)

    def require_text_encoders(self) -> None:
        if not self.text_encoders:
            raise RuntimeError(
                f"{self.family} model was loaded without text encoders (model.load_text_encoders=false): prompts "
                "cannot be encoded; train from a latent cache (data.latent_cache) that holds the prompt embeddings"
            )

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        dtype: str | torch.dtype = "fp32",
        variant: str | None = None,
        revision: str | None = None,
        vae_path: str | None = None,
        quantize: Quantize = "none",
        load_text_encoders: bool = True,
        adapter_kwargs: dict[str, Any] | None = None,
        **process_kwargs: Any,
    ) -> Adapter:
        """Load a hub id or a local diffusers folder exactly as users do.

        Args:
            path: ``"stabilityai/stable-diffusion-xl-base-1.0"`` or a folder with ``model_index.json``.
            dtype: dtype of the frozen denoiser and text encoders (the VAE stays fp32).
            variant: weight variant such as ``"fp16"`` (``diffusion_pytorch_model.fp16.safetensors``).
            vae_path: optional replacement VAE (e.g. ``madebyollin/sdxl-vae-fp16-fix``), a folder or hub id.
            quantize: ``"nf4"`` (bitsandbytes 4-bit) or ``"float8"`` (torchao) frozen denoiser weights; the LoRA
                stays fp32 and the reference is this same quantized base with the adapter off.
            load_text_encoders: ``False`` skips the text encoders (training from cached prompt embeddings).
            adapter_kwargs: family options of the adapter (FLUX: ``guidance``).
            process_kwargs: forwarded to the forward process (flow models: timestep sampling, ``shift``).
        """
        from diffalign.models import loading

        components = loading.load_components(
            cls,
            path,
            dtype=resolve_dtype(dtype),
            variant=variant,
            revision=revision,
            vae_path=vae_path,
            quantize=quantize,
            load_text_encoders=load_text_encoders,
        )
        process = cls.make_process(components["scheduler"], **process_kwargs)
        return cls.from_components(components, process=process, **(adapter_kwargs or {}))

    # ---- modules ------------------------------------------------------------------------------
    def frozen_modules(self) -> list[nn.Module]:
        return [self.vae, *self.text_encoders]

    def named_modules(self) -> dict[str, nn.Module]:
        """Trainable-capable modules by their pipeline component name."""
        names = {self.denoiser_name: self.denoiser}
        if self.text_encoders:
            names.update(dict(zip(self.text_encoder_names(), self.text_encoders, strict=True)))
        return names

    def to(self, device: torch.device | str) -> Adapter:
        for module in (self.vae, *self.text_encoders):
            module.to(device)
        if not getattr(self.denoiser, "is_quantized", False):  # bitsandbytes weights live where they were loaded
            self.denoiser.to(device)
        for ref in (self.reference_denoiser, *(self.reference_text_encoders or ())):  # full fine-tuning's copies
            if ref is not None:
                ref.to(device)
        if hasattr(self.process, "to"):  # the process's tables next to the model: no copy per step
            self.process = self.process.to(device)
        return self

    # ---- latent geometry ----------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        """Channels of the VAE's latents (``latent_channels``; the 3-D VAEs of Qwen-Image/Wan call it ``z_dim``)."""
        return int(self.vae.config.latent_channels)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell, ``2 ** (len(block_out_channels) - 1)`` as the diffusers pipelines (8 for SD/FLUX)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, height: int, width: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of the latents of a ``height`` x ``width`` px image (square when ``width`` is None).

        ``C`` is the VAE's ``latent_channels``: the one truth for every family. What the denoiser's input layer
        takes (FLUX: 2x2-packed tokens of 4 C channels) is ``predict``'s business, never the sampler's.
        """
        f, width = self.vae_scale_factor, height if width is None else width
        if height % f or width % f:
            raise ValueError(f"{self.family}: image size {height}x{width} is not a multiple of the VAE factor {f}")
        return (self.latent_channels, height // f, width // f)

    def resolution_shift(self, resolution: int) -> float:
        """The shift a flow pipeline samples with at ``resolution`` px (``flow.resolution_shift``)."""
        if not isinstance(self.process, diffusion.FlowProcess):
            raise ValueError(f"{self.family} is not a flow model; a timestep shift does not apply")
        factor = self.vae_scale_factor
        patch = int(getattr(self.denoiser.config, "patch_size", 1) or 1)
        patch = 2 if patch == 1 else patch  # FLUX: patch_size 1 on 2x2-packed latents
        tokens = (resolution // (factor * patch)) ** 2
        return flow.resolution_shift(self.scheduler.config, tokens)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's compute dtype (a quantized base: its first floating-point parameter, not the packed
        uint8 NF4 weights)."""
        if getattr(self.denoiser, "is_quantized", False):
            return self.denoiser.dtype
        return next(self.denoiser.parameters()).dtype

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The frozen base model: every LoRA adapter off (denoiser and text encoders), or in full fine-tuning
        (``models.full.make_full``) the frozen copy of the base denoiser in place of the trained one."""
        if getattr(self, "full", None) is not None:
            ref = getattr(self, "reference_denoiser", None)
            if ref is None:
                raise RuntimeError(
                    "full fine-tuning was set up without a reference copy (the objective was said to need none), "
                    "but a reference pass was asked for"
                )
            trained, self.denoiser = self.denoiser, ref
            encoders = self.text_encoders
            if self.reference_text_encoders is not None:
                self.text_encoders = self.reference_text_encoders
            try:
                yield
            finally:
                self.denoiser, self.text_encoders = trained, encoders
            return
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
        dist = self.vae.encode(pixels.to(self.vae.device, torch.float32, non_blocking=True)).latent_dist
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (dist.mean - shift) * self.vae.config.scaling_factor

    def unscale_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents -> the VAE's own latent space (differentiable): the inverse of ``encode_images``' scaling."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return latents / self.vae.config.scaling_factor + shift

    def decode_pixels(self, latents: Tensor) -> Tensor:
        """Scaled latents -> the VAE decoder's raw output (N, 3, H, W) (videos: (N, 3, F, H, W)), fp32 and
        differentiable (reward gradients)."""
        return self.vae.decode(self.unscale_latents(latents.to(self.vae.device, torch.float32))).sample

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents -> pixels (N, 3, H, W) in [-1, 1]."""
        return self.decode_pixels(latents).clamp(-1, 1)

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

        self.require_text_encoders()
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

    # the prompt of the unconditional branch (``sampling.guidance.encode_condition``'s "empty_prompt")
    negative_prompt: ClassVar[str] = ""

    def combine_guidance(self, uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
        """Classifier-free guidance ``u + w (c - u)`` of fp32 outputs (N, C, h, w); Qwen-Image renormalises it."""
        return uncond + scale * (cond - uncond)

    def pipeline_guidance(self, scale: float, negative_prompt: list[str] | None, batch: int) -> dict[str, Any]:
        """The family pipeline's call keywords for diffalign's guidance scale ``scale`` (``u + w (c - u)``) and an
        optional negative prompt per image (``batch`` images): ``guidance_scale`` for SD/SDXL/SD3/FLUX.1."""
        extra = {"negative_prompt": negative_prompt} if negative_prompt else {}
        return {"guidance_scale": scale, **extra}

    def default_image_size(self, pipe: Any) -> int:
        """The pipeline's default height/width in pixels (``sample_size`` x VAE factor; FLUX: 1024)."""
        sample = getattr(pipe, "default_sample_size", None) or self.denoiser.config.sample_size
        return int(sample) * int(pipe.vae_scale_factor)

    def unpipe_latents(self, latents: Tensor, height: int, width: int) -> Tensor:
        """A pipeline's ``output_type="latent"`` result -> latents (N, C, h, w) for ``decode_latents``."""
        return latents


def process_for(scheduler: Any, shift: float | None = None, **sampling: Any) -> Any:
    """The training forward process of ``scheduler``; a dynamic-shifting flow scheduler (FLUX.1) without an
    explicit ``shift`` trains on the table diffusers' FLUX script indexes (``flow.training_shift``: 1.0)."""
    config = getattr(scheduler, "config", scheduler)
    if shift is None and config.get("use_dynamic_shifting"):
        shift = flow.training_shift(config)
    return diffusion.from_scheduler(scheduler, shift=shift, **sampling)


def repeat_cond(cond: Cond, k: int) -> Cond:
    """Repeat each group's conditioning for its K images (group-major order: b0k0, b0k1, b1k0, ...)."""
    return {key: value.repeat_interleave(k, dim=0) for key, value in cond.items()}
