"""Memory and time of a LoRA DPO pair step vs a plain LoRA step on real-size denoisers, per memory option.

The denoisers are built from their published configs (``bench/configs/*.json``: SDXL UNet, SD3.5-Medium,
SD3.5-Large, FLUX.1-dev, Wan2.1-T2V-1.3B and -14B transformers) with random init: no weights are downloaded. Latents
and prompt embeddings are random tensors of the real shapes at 1024 px (Wan: 81 frames at 480 x 832, the
WanPipeline defaults; a "pair" is two videos), i.e. every row assumes the latent cache with T5/CLIP embeddings
(the text encoders and the VAE are never resident; their bf16 sizes are printed below the table).

Memory options (model/optim config keys): ``bf16`` base (``model.dtype``), ``ckpt`` gradient checkpointing,
``nf4`` bitsandbytes 4-bit base / ``float8`` torchao weight-only e4m3 base (``model.quantize``), ``8bit``
8-bit AdamW (``optim.name=adamw8bit``). The LoRA (family default targets, ``--rank``) is fp32 in every row.

On CPU the models are built on the meta device and the script prints what it can count exactly: parameter bytes
of the frozen base per option, LoRA parameter, gradient and optimizer-state bytes. The peak memory and the step
times need a CUDA GPU; on one (``--device cuda``) each (model, option) runs in a fresh subprocess and reports:

* **peak GB**: ``torch.cuda.max_memory_allocated`` over a DPO pair step (batch 1 pair = 2 images); the same over a
  plain step beside it, and **static GB** (what is allocated before the first step: base, LoRA, inputs). A CUDA
  out-of-memory error is a row of its own, with the peak reached until then.
* **dpo s / plain s / fwd s**: median time of one DPO pair step (policy forward + backward on the 2 images + one
  no-grad reference forward with the LoRA switched off + optimizer step), of one plain LoRA fine-tuning step on the
  same 2 images (forward + backward + optimizer step), and of one no-grad forward of the same 2 images.
* **(dpo-plain)/fwd**: the extra cost of DPO in no-grad forwards; the floor is 1 (the reference pass).

Run::

    python bench/memory.py                              # CPU: byte counts only (~1 min)
    python bench/memory.py --device cuda --repeats 5    # GPU: the full table
    python bench/memory.py --device cuda --rows flux1-dev:nf4+ckpt sd35-large:bf16 --json rows.json   # some rows
    python bench/memory.py --device cpu --tiny --resolution 64 --rows flux1-dev:bf16+ckpt   # CPU smoke of the step

Full fine-tuning (``--full``, CPU, the meta device; sd15 joins the models): per-GPU bytes of the trained weights,
gradients, optimizer state (AdamW, 8-bit AdamW, Adafactor), the frozen reference copy and the EMA under DDP, FSDP2,
ZeRO-2 and ZeRO-3 on 1-8 GPUs, and which of 24/48/80 GB each fits (``full_bytes`` states the accounting)::

    python bench/memory.py --full                       # ~10 s

``--rows MODEL:OPTION`` / ``--options`` take any ``bf16|nf4|float8`` base with ``+ckpt`` and/or ``+8bit``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import MethodType
from typing import Any

import torch


HERE = Path(__file__).resolve().parent
GB = 1024**3
RESOLUTION = 1024


@dataclass(frozen=True)
class Spec:
    config: str
    family: str
    latent_channels: int
    text_len: int  # prompt-embedding tokens (CLIP 77 + T5 256 for SD3; T5 512 for FLUX and Wan's UMT5)
    text_dim: int
    pooled_dim: int
    video: tuple[int, int, int] | None = None  # video families: (frames, height, width) of a sample, not --resolution


MODELS = {
    "sd15": Spec("sd15_unet.json", "sd15", 4, 77, 768, 768),
    "sdxl": Spec("sdxl_unet.json", "sdxl", 4, 77, 2048, 1280),
    "sd35-medium": Spec("sd35_medium_transformer.json", "sd3", 16, 77 + 256, 4096, 2048),
    "sd35-large": Spec("sd35_large_transformer.json", "sd3", 16, 77 + 256, 4096, 2048),
    "flux1-dev": Spec("flux1_dev_transformer.json", "flux", 16, 512, 4096, 768),
}
# video: Wan 2.1 T2V at WanPipeline's defaults (480 x 832, 81 frames: 21 x 60 x 104 latents, 32760 tokens), no pooled
WAN_VIDEO = (81, 480, 832)
MODELS["wan21-1.3b"] = Spec("wan21_t2v_1_3b_transformer.json", "wan", 16, 512, 4096, 0, WAN_VIDEO)
MODELS["wan21-14b"] = Spec("wan21_t2v_14b_transformer.json", "wan", 16, 512, 4096, 0, WAN_VIDEO)
# issue 24: prompt tokens as their pipelines pass them (Qwen-Image: the template-stripped prompt, ~64 tokens at most
# for typical prompts, padded to the batch's longest; FLUX.2 and Z-Image: 512); no pooled embedding (0)
MODELS.update(
    {
        "qwen-image": Spec("qwen_image_transformer.json", "qwenimage", 16, 64, 3584, 0),
        "flux2-dev": Spec("flux2_dev_transformer.json", "flux2", 32, 512, 15360, 0),
        "z-image-turbo": Spec("z_image_transformer.json", "zimage", 16, 512, 2560, 0),
    }
)
# instruction editing: the released transformers have their base's configs (FLUX.1-Kontext-dev = FLUX.1-dev's
# FluxTransformer2DModel, 12B; Qwen-Image-Edit = Qwen-Image's QwenImageTransformer2DModel, 20B); the step adds the
# source's tokens to the sequence: Kontext's at the target size, Qwen-Image-Edit's at ~1024^2 area (SOURCE_SIDE)
MODELS.update(
    {
        "flux1-kontext-dev": Spec("flux1_dev_transformer.json", "fluxkontext", 16, 512, 4096, 768),
        "qwen-image-edit": Spec("qwen_image_transformer.json", "qwenimageedit", 16, 64, 3584, 0),
    }
)
SOURCE_SIDE = {"qwenimageedit": 1024}  # source px side per editing family (others: the target's)
# option name -> (base, gradient checkpointing, optimizer)
OPTIONS = {
    "bf16": ("bf16", False, "adamw"),
    "bf16+ckpt": ("bf16", True, "adamw"),
    "bf16+ckpt+8bit": ("bf16", True, "adamw8bit"),
    "nf4+ckpt+8bit": ("nf4", True, "adamw8bit"),
    "float8+ckpt+8bit": ("float8", True, "adamw8bit"),
}


def parse_option(name: str) -> tuple[str, bool, str]:
    """``base[+ckpt][+8bit]`` (e.g. ``nf4+ckpt``) -> (base, gradient checkpointing, optimizer); ``OPTIONS`` are
    the table's defaults, any such combination runs with ``--options``."""
    base, *flags = name.split("+")
    if base not in ("bf16", "nf4", "float8") or not set(flags) <= {"ckpt", "8bit"} or len(set(flags)) < len(flags):
        raise argparse.ArgumentTypeError(f"option {name!r}: expected bf16|nf4|float8 then +ckpt and/or +8bit")
    return base, "ckpt" in flags, "adamw8bit" if "8bit" in flags else "adamw"


def option_name(name: str) -> str:
    parse_option(name)
    return name


# frozen text encoders a run without the latent cache keeps resident (bf16 bytes; param counts of the releases)
TEXT_ENCODERS = {"CLIP-L": 123e6, "OpenCLIP-G": 695e6, "T5-XXL encoder": 4.76e9}
FAMILY_ENCODERS = {"sdxl": ["CLIP-L", "OpenCLIP-G"], "sd3": ["CLIP-L", "OpenCLIP-G", "T5-XXL encoder"]}
FAMILY_ENCODERS["flux"] = ["CLIP-L", "T5-XXL encoder"]
# UMT5-XXL encoder of Wan (vocab 256384, d_model 4096, d_ff 10240, 64 heads, 24 layers): counted on the meta device
TEXT_ENCODERS["UMT5-XXL encoder"] = 5_680_910_336
FAMILY_ENCODERS["wan"] = ["UMT5-XXL encoder"]
# Qwen2.5-VL-7B-Instruct 8.29 B, Mistral-Small-3.1-24B 24.0 B, Qwen3-4B 4.02 B (the releases' model cards)
TEXT_ENCODERS.update({"Qwen2.5-VL-7B": 8.29e9, "Mistral-Small-3.1-24B": 24.0e9, "Qwen3-4B": 4.02e9})
FAMILY_ENCODERS.update(qwenimage=["Qwen2.5-VL-7B"], flux2=["Mistral-Small-3.1-24B"], zimage=["Qwen3-4B"])
FAMILY_ENCODERS.update(fluxkontext=FAMILY_ENCODERS["flux"], qwenimageedit=FAMILY_ENCODERS["qwenimage"])


# ---- model construction ---------------------------------------------------------------------------------------
def load_config(spec: Spec) -> dict[str, Any]:
    config = json.loads((HERE / "configs" / spec.config).read_text())  # an absolute spec.config is used as is
    return {k: v for k, v in config.items() if k != "_source"}


def build(spec: Spec, device: str, dtype: torch.dtype) -> torch.nn.Module:
    import diffusers

    config = load_config(spec)
    cls = getattr(diffusers, config.pop("_class_name"))
    with torch.device(device):
        model = cls.from_config(config)
    return model.to(dtype) if device != "meta" else model


def lora_targets(spec: Spec, model: torch.nn.Module) -> list[str]:
    """The family's default LoRA targets (as ``models.<family>.Adapter.default_lora_targets``)."""
    from types import SimpleNamespace

    from diffalign import models
    from diffalign.models import sd3, wan

    if spec.family == "wan":
        return list(wan.LORA_TARGETS)
    if spec.family in ("flux", "qwenimage", "zimage", "flux2", "fluxkontext", "qwenimageedit"):  # FLUX.2: per block
        return list(models.get(spec.family).Adapter.default_lora_targets(SimpleNamespace(denoiser=model)))
    if spec.family == "sd3":
        dual = getattr(model.config, "dual_attention_layers", None)
        return [*sd3.JOINT_TARGETS, *sd3.CONTEXT_TARGETS, *(sd3.DUAL_TARGETS if dual else ())]
    return ["to_q", "to_k", "to_v", "to_out.0"]


def add_lora(spec: Spec, model: torch.nn.Module, rank: int) -> list[torch.nn.Parameter]:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=lora_targets(spec, model)
    )
    inject_adapter_in_model(config, model)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
    return params


def count(model: torch.nn.Module) -> dict[str, int]:
    """Frozen base parameters split into Linear weights (what nf4/float8 quantize) and the rest; LoRA params."""
    from torch import nn

    linear = sum(m.weight.numel() for n, m in model.named_modules() if type(m) is nn.Linear and "lora_" not in n)
    total = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return {"linear": linear, "other": total - linear, "lora": lora}


def static_bytes(counts: dict[str, int], option: str) -> dict[str, float]:
    """Exact-as-counted bytes: base weights per option, LoRA fp32 params + grads, optimizer states."""
    base, _, optim = parse_option(option)
    per_linear = {"bf16": 2.0, "nf4": 0.5 + 4 / 64, "float8": 1.0}[base]  # nf4: 4 bits + fp32 absmax per 64
    lora = counts["lora"]
    return {
        "base": counts["linear"] * per_linear + counts["other"] * 2.0,
        "lora+grad": lora * 8.0,
        "optim": lora * (8.0 if optim == "adamw" else 2.0),  # AdamW: two fp32 moments; 8-bit: two uint8
    }


# ---- CPU: byte table --------------------------------------------------------------------------------------------
GPU_SIZES = (24, 40, 48, 80, 141)  # GB: RTX 4090 / A100-40G / L40S, A6000 / A100-80G, H100 / H200


def smallest_gpu(static: float) -> str:
    """The smallest common GPU whose memory (GB, as marketed: 1e9 bytes) holds ``static`` bytes with a quarter to
    spare for activations, the CUDA context and the allocator; the measured peak (``--device cuda``) decides."""
    fits = [g for g in GPU_SIZES if static * 1.25 <= g * 1e9]
    return f"{fits[0]} GB" if fits else f"> {GPU_SIZES[-1]} GB"


def cpu_table(models: list[str], rank: int, options: list[str] | None = None) -> None:
    print(f"CPU: byte counts at rank {rank}; peak memory and step times need a CUDA GPU (--device cuda).\n")
    print("| model | base params | LoRA params | option | base GB | LoRA+grad GB | optimizer GB | static GB | "
          "static fits |")  # fmt: skip
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |")
    for name in models:
        spec = MODELS[name]
        model = build(spec, "meta", torch.float32)
        add_lora(spec, model, rank)
        counts = count(model)
        for option in options or OPTIONS:
            b = static_bytes(counts, option)
            print(
                f"| {name} | {(counts['linear'] + counts['other']) / 1e9:.2f} B | {counts['lora'] / 1e6:.1f} M | "
                f"{option} | {b['base'] / GB:.2f} | {b['lora+grad'] / GB:.3f} | {b['optim'] / GB:.3f} | "
                f"{sum(b.values()) / GB:.2f} | {smallest_gpu(sum(b.values()))} |"
            )
    print("\nText encoders kept resident without cached embeddings (bf16):")
    for family in FAMILY_ENCODERS:
        names = FAMILY_ENCODERS[family]
        print(f"  {family}: {' + '.join(names)} = {sum(TEXT_ENCODERS[n] for n in names) * 2 / GB:.1f} GB")


# ---- CPU: full fine-tuning, per-GPU bytes under each sharding ------------------------------------------------------
FULL_OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")
STRATEGIES = {"DDP": (1,), "FSDP2": (2, 4, 8), "ZeRO-2": (2, 4, 8), "ZeRO-3": (2, 4, 8)}
CAPACITIES_GB = (24, 48, 80)
BNB_BLOCK, BNB_MIN_8BIT = 256, 4096  # bitsandbytes' blockwise 8-bit optimizers: block size, smallest 8-bit tensor


def optimizer_bytes(shape: tuple[int, ...], name: str) -> int:
    """Exact optimizer-state bytes of one fp32 trained tensor of ``shape``.

    AdamW: two fp32 moments. 8-bit AdamW (bitsandbytes): two uint8 moments + one fp32 absmax per 256-element block
    each; tensors under 4096 elements keep 32-bit moments. Adafactor (transformers, ``beta1=None`` as the recipes use
    it): a matrix (ndim >= 2) keeps a row factor ``shape[:-1]`` and a column factor ``shape[:-2] + shape[-1:]``, a
    vector its full second moment, all fp32.
    """
    n = math.prod(shape)
    if name == "adamw":
        return 8 * n
    if name == "adamw8bit":
        return 8 * n if n < BNB_MIN_8BIT else 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK)
    if len(shape) >= 2:
        return 4 * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1])
    return 4 * n


def fsdp_shard(shape: tuple[int, ...], n: int) -> tuple[int, ...]:
    """FSDP2's per-process shard of a parameter: dim 0 split in ``n`` (padded to ``ceil``)."""
    return (math.ceil(shape[0] / n), *shape[1:]) if shape else shape


def full_bytes(shapes: list[tuple[int, ...]], strategy: str, n: int, optimizer: str) -> dict[str, float]:
    """Per-GPU bytes of full fine-tuning with bf16 mixed precision on ``n`` GPUs: trained weights (with the fp32
    master copy), gradients, optimizer state, the frozen bf16 reference copy and the fp32 EMA. Activations and the
    transient all-gather buffers are not included (they depend on batch and resolution, not on the sharding).

    * DDP (diffalign's loop): fp32 weights, fp32 gradients, optimizer state, bf16 reference and fp32 EMA, all
      replicated.
    * FSDP2 (``--distributed fsdp``): each of them sharded per parameter (``fsdp_shard``); Adafactor factors the local
      shard (its row factor is sharded, its column factor is not).
    * ZeRO-2 / ZeRO-3 (DeepSpeed's bf16 accounting: bf16 parameters, bf16 gradients, the fp32 master copy in the
      partitioned optimizer state; flat partitions of ``ceil(total / n)``): ZeRO-2 partitions gradients and optimizer
      state and replicates the bf16 weights, the reference copy (a frozen module outside the engine) and the EMA;
      ZeRO-3 partitions everything.
    """
    p = sum(math.prod(s) for s in shapes)
    opt_full = sum(optimizer_bytes(s, optimizer) for s in shapes)
    if strategy == "DDP":
        return {"weights": 4 * p, "grads": 4 * p, "optim": opt_full, "ref": 2 * p, "ema": 4 * p}
    if strategy == "FSDP2":
        local = [fsdp_shard(s, n) for s in shapes]
        q = sum(math.prod(s) for s in local)
        opt = sum(optimizer_bytes(s, optimizer) for s in local)
        return {"weights": 4 * q, "grads": 4 * q, "optim": opt, "ref": 2 * q, "ema": 4 * q}
    part = math.ceil(p / n)
    master = 4 * part
    opt = math.ceil(opt_full / n) + master
    if strategy == "ZeRO-2":
        return {"weights": 2 * p, "grads": 2 * part, "optim": opt, "ref": 2 * p, "ema": 4 * p}
    return {"weights": 2 * part, "grads": 2 * part, "optim": opt, "ref": 2 * part, "ema": 4 * part}


def fits(total: float) -> str:
    """The smallest of ``CAPACITIES_GB`` that holds ``total`` bytes (GB = 2**30 bytes), or ``-``."""
    return next((f"{c}" for c in CAPACITIES_GB if total <= c * GB), "-")


def full_table(models: list[str]) -> None:
    """The full fine-tuning table: per (model, sharding, GPUs), the per-GPU GB of each part and the totals with
    AdamW, 8-bit AdamW and Adafactor, and the smallest of 24/48/80 GB each fits in (state only, no activations)."""
    print("Full fine-tuning, per-GPU state in GB (2^30 bytes), bf16 mixed precision, reference copy + EMA kept;")
    print("activations and all-gather buffers not included. fits: smallest of 24/48/80 GB that holds the state.\n")
    print(
        "| model | params | sharding | GPUs | weights | grads | AdamW | 8-bit AdamW | Adafactor | ref copy | EMA | "
        "total AdamW | total 8-bit | total Adafactor | fits (AdamW / 8-bit / Adafactor) |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name in models:
        model = build(MODELS[name], "meta", torch.float32)
        shapes = [tuple(p.shape) for p in model.parameters()]
        params = sum(math.prod(s) for s in shapes)
        for strategy, counts in STRATEGIES.items():
            for n in counts:
                parts = {o: full_bytes(shapes, strategy, n, o) for o in FULL_OPTIMIZERS}
                b = parts["adamw"]
                totals = {o: sum(parts[o].values()) for o in FULL_OPTIMIZERS}
                cells = [b["weights"], b["grads"], *(parts[o]["optim"] for o in FULL_OPTIMIZERS), b["ref"], b["ema"]]
                cells += list(totals.values())
                print(
                    f"| {name} | {params / 1e9:.2f} B | {strategy} | {n if strategy != 'DDP' else '1-8'} | "
                    + " | ".join(f"{c / GB:.1f}" for c in cells)
                    + f" | {' / '.join(fits(totals[o]) for o in FULL_OPTIMIZERS)} |"
                )


# ---- GPU: one (model, option) per subprocess ----------------------------------------------------------------------
def quantize(model: torch.nn.Module, kind: str) -> None:
    """NF4 (bitsandbytes ``Linear4bit``, as diffusers' BitsAndBytesConfig builds) or torchao float8 weight-only."""
    from torch import nn

    if kind == "float8":
        from torchao.quantization import Float8WeightOnlyConfig, quantize_

        quantize_(model, Float8WeightOnlyConfig())
        return
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=torch.bfloat16,
                    quant_type="nf4",
                )
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, q.cuda())
    torch.cuda.empty_cache()


class Shim:
    """The attributes a family adapter's ``predict`` reads, so the bench runs the same forward code as training."""

    def __init__(self, spec: Spec, model: torch.nn.Module) -> None:
        from diffalign.diffusion import FlowProcess

        self.denoiser, self.dtype = model, torch.bfloat16
        self.process = FlowProcess(shift=1.0)
        self.guidance = {"flux": 3.5, "flux2": 4.0, "fluxkontext": 3.5}.get(spec.family)
        self.max_sequence_length = spec.text_len


def inputs(
    spec: Spec, n: int, resolution: int, device: str
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    h = resolution // 8
    x = torch.randn(n, spec.latent_channels, h, h, device=device)
    t = torch.full((n,), 500.0, device=device)
    if spec.video is not None:  # (N, C, F', h, w) video latents and the UMT5 states alone (models.wan)
        from diffalign.models import wan

        frames, height, width = spec.video
        x = torch.randn(n, spec.latent_channels, wan.latent_frames(frames), height // 8, width // 8, device=device)
        return x, t, {"encoder_hidden_states": torch.randn(n, spec.text_len, spec.text_dim, device=device)}
    cond = {
        "encoder_hidden_states": torch.randn(n, spec.text_len, spec.text_dim, device=device),
        "pooled_projections": torch.randn(n, spec.pooled_dim, device=device),
    }
    if spec.family in ("qwenimage", "flux2", "qwenimageedit"):
        cond = {"encoder_hidden_states": cond["encoder_hidden_states"]}
        if spec.family in ("qwenimage", "qwenimageedit"):
            cond["encoder_hidden_states_mask"] = torch.ones(n, spec.text_len, dtype=torch.long, device=device)
    if spec.family == "zimage":
        cond = {
            "cap_feats": cond["encoder_hidden_states"],
            "cap_mask": torch.ones(n, spec.text_len, dtype=torch.long, device=device),
        }
    if spec.family in ("fluxkontext", "qwenimageedit"):  # the source image's latents (models.editing.SOURCE)
        side = SOURCE_SIDE.get(spec.family, resolution) * h // resolution
        cond["source_latents"] = torch.randn(n, spec.latent_channels, side, side, device=device)
    if spec.family == "sdxl":
        size = [resolution, resolution, 0, 0, resolution, resolution]
        cond = {
            "encoder_hidden_states": cond["encoder_hidden_states"],
            "text_embeds": cond["pooled_projections"],
            "time_ids": torch.tensor([size] * n, device=device),
        }
    return x, t, cond


def run_one(
    name: str, option: str, rank: int, repeats: int, *, device: str = "cuda", resolution: int = RESOLUTION
) -> dict[str, Any]:
    """One (model, option): peak memory of a DPO pair step and median step times. ``device="cpu"`` (with a small
    ``resolution``) only smoke-tests the code path: no peak, and quantized bases need CUDA."""
    from diffalign import models
    from diffalign.losses import dpo
    from diffalign.models.base import set_lora_enabled
    from diffalign.training import optim
    from diffalign.types import PairTerms

    spec = MODELS[name]
    base, checkpointing, optim_name = parse_option(option)
    cuda = device == "cuda"
    if base != "bf16" and not cuda:
        raise RuntimeError(f"option {option!r}: the {base} base needs a CUDA GPU")
    model = build(spec, device, torch.bfloat16).requires_grad_(False)
    if base != "bf16":
        quantize(model, base)
    params = add_lora(spec, model, rank)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    cfg = argparse.Namespace(name=optim_name, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    opt = optim.build_optimizer(params, cfg)
    adapter_cls = models.get(spec.family).Adapter
    predict = adapter_cls.predict
    shim = Shim(spec, model)
    if hasattr(adapter_cls, "image_tokens"):  # FLUX.1 / Qwen-Image and their editing variants build the sequence
        shim.image_tokens = MethodType(adapter_cls.image_tokens, shim)
    x, t, cond = inputs(spec, 2, resolution, device)
    target = torch.randn_like(x)

    def errors(out: torch.Tensor) -> torch.Tensor:
        return (out.float() - target).pow(2).flatten(1).mean(1)

    def plain() -> None:
        errors(predict(shim, x, t, cond)).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def dpo_step() -> None:
        policy = errors(predict(shim, x, t, cond))
        with torch.no_grad():
            set_lora_enabled(model, False)
            ref = errors(predict(shim, x, t, cond))
            set_lora_enabled(model, True)
        terms = PairTerms(policy_w=policy[:1], policy_l=policy[1:], ref_w=ref[:1], ref_l=ref[1:], timesteps=t[:1],
                          num_train_timesteps=1000)  # fmt: skip
        dpo.loss(terms, dpo.Config(beta=100.0)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def forward() -> None:
        predict(shim, x, t, cond)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(fn: Any) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    static = float("nan")
    if cuda:  # what stays allocated (base, LoRA, inputs); an OOM below then reports the peak from here on
        sync()
        static = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    for fn in (plain, dpo_step, forward):  # warm-up (allocator, kernels, optimizer states)
        fn()
    peak = peak_plain = float("nan")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        dpo_step()
        sync()
        peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        plain()
        sync()
        peak_plain = torch.cuda.max_memory_allocated()
    times: dict[str, list[float]] = {"plain": [], "dpo": [], "fwd": []}
    for _ in range(repeats):  # interleaved so drift hits every variant alike
        times["plain"].append(timed(plain))
        times["dpo"].append(timed(dpo_step))
        times["fwd"].append(timed(forward))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "option": option, "peak_gb": peak / GB, "peak_plain_gb": peak_plain / GB,
            "static_gb": static / GB, **med}  # fmt: skip


def tiny_specs(names: list[str], workdir: Path) -> dict[str, Spec]:
    """Tiny configs of the same architectures (``diffalign.models.tiny``) under the real models' names, for a CPU
    smoke run of the step table (``--tiny``): same code path, seconds per row, no memory figure."""
    from diffalign.models import tiny

    shapes = {  # tiny builder, denoiser key, Spec fields after the config path
        "sdxl": ("sdxl", "unet", ("sdxl", 4, 8, 32, 16)),
        "sd35-medium": ("sd35", "transformer", ("sd3", 4, 8, 32, 32)),
        "sd35-large": ("sd35", "transformer", ("sd3", 4, 8, 32, 32)),
        "flux1-dev": ("flux", "transformer", ("flux", 4, 8, 32, 16)),
        "wan21-1.3b": ("wan", "transformer", ("wan", 4, 8, 32, 0, (5, 16, 16))),
        "wan21-14b": ("wan", "transformer", ("wan", 4, 8, 32, 0, (5, 16, 16))),
        "qwen-image": ("qwenimage", "transformer", ("qwenimage", 4, 8, 16, 0)),
        "flux1-kontext-dev": ("fluxkontext", "transformer", ("fluxkontext", 4, 8, 32, 16)),
        "qwen-image-edit": ("qwenimageedit", "transformer", ("qwenimageedit", 4, 8, 16, 0)),
        "flux2-dev": ("flux2", "transformer", ("flux2", 4, 8, 24, 0)),
        "z-image-turbo": ("zimage", "transformer", ("zimage", 4, 8, 16, 0)),
    }
    specs = {}
    for name in names:
        builder, key, fields = shapes[name]
        model = getattr(tiny, builder)(0)[key]
        path = workdir / f"{name}.json"
        path.write_text(json.dumps({"_class_name": type(model).__name__, **dict(model.config)}, default=list))
        specs[name] = Spec(str(path), *fields)
    return specs


def one_row(args: argparse.Namespace) -> dict[str, Any]:
    """``run_one`` for ``--one``; a CUDA out-of-memory error is a row (``error``), with the peak reached until then."""
    name, option = args.one
    try:
        return run_one(name, option, args.rank, args.repeats, device=args.device, resolution=args.resolution)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
        if "out of memory" not in str(err).lower():
            raise
        peak = torch.cuda.max_memory_allocated() / GB if torch.cuda.is_available() else float("nan")
        detail = str(err).strip().splitlines()[0][:200]
        return {"model": name, "option": option, "error": "out of memory", "detail": detail, "peak_gb": peak}


def gpu_table(
    rows: list[tuple[str, str]], args: argparse.Namespace, json_path: str | None = None
) -> list[dict[str, Any]]:
    """One fresh subprocess per (model, option); prints a markdown row as each finishes and, with ``json_path``,
    rewrites the rows so far (failures too) after each one."""
    # the GPU's name is printed after the rows: asking for it first would hold a CUDA context in this process
    where = "GPU" if args.device == "cuda" else "CPU (smoke: tiny configs, no memory figure)"
    print(f"{where}, rank {args.rank}, {args.resolution} px, batch 1 pair, median of {args.repeats}\n")
    print("| model | option | static GB | peak GB, DPO | peak GB, plain | dpo s | plain s | fwd s | dpo/plain "
          "| (dpo-plain)/fwd |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    results: list[dict[str, Any]] = []
    for name, option in rows:
        cmd = [sys.executable, __file__, "--one", name, option, "--rank", str(args.rank), "--repeats",
               str(args.repeats), "--device", args.device, "--resolution", str(args.resolution)]  # fmt: skip
        cmd += ["--tiny"] if args.tiny else []
        r: dict[str, Any] = {"model": name, "option": option}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                r["error"] = (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]
            else:
                r = json.loads(lines[-1])
        except subprocess.TimeoutExpired:
            r["error"] = f"timed out after {args.timeout} s"
        results.append(r)
        if "error" in r:
            failed_at = r.get("peak_gb", float("nan"))
            peak = f" (peak {failed_at:.1f} GB when it failed)" if failed_at == failed_at else ""
            print(f"| {name} | {option} | n/a: {r['error'][:90]}{peak} | | | | | | | |", flush=True)
        else:
            print(
                f"| {name} | {option} | {r['static_gb']:.1f} | {r['peak_gb']:.1f} | {r['peak_plain_gb']:.1f} "
                f"| {r['dpo']:.3f} | {r['plain']:.3f} | {r['fwd']:.3f} | {r['dpo'] / r['plain']:.2f} "
                f"| {(r['dpo'] - r['plain']) / r['fwd']:.2f} |",
                flush=True,
            )
        if json_path:
            Path(json_path).write_text(json.dumps(results, indent=2) + "\n")
    if args.device == "cuda":
        print(f"\nGPU: {torch.cuda.get_device_name()}")
    return results


def main(argv: list[str] | None = None) -> None:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", choices=list(MODELS), help="default: all but sd15 (LoRA), all (--full)")
    p.add_argument("--full", action="store_true", help="the full fine-tuning table (CPU, meta device, exact bytes)")
    p.add_argument("--options", nargs="+", type=option_name, help="base[+ckpt][+8bit]; default: the five of OPTIONS")
    p.add_argument("--rows", nargs="+", metavar="MODEL:OPTION", help="explicit (model, option) rows, in this order")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--resolution", type=int, default=RESOLUTION, help="image side in pixels (latents: side / 8)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per (model, option) subprocess")
    p.add_argument("--tiny", action="store_true", help="tiny configs of the same architectures (CPU smoke run)")
    p.add_argument("--json", help="write the step table's rows to this file, rewritten after each row")
    p.add_argument("--one", nargs=2, metavar=("MODEL", "OPTION"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.full:
        full_table(args.models or list(MODELS))
        return
    args.models = args.models or [m for m in MODELS if m != "sd15"]  # the LoRA step rows start at SDXL
    if args.rows:
        rows = [tuple(r.split(":", 1)) for r in args.rows]
        bad = [r for r in rows if len(r) != 2 or r[0] not in MODELS]
        if bad:
            p.error(f"--rows: expected MODEL:OPTION with MODEL in {', '.join(MODELS)}; got {bad}")
        for _, option in rows:
            option_name(option)
    else:
        rows = [(m, o) for m in args.models for o in args.options or OPTIONS]
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            MODELS.update(tiny_specs(sorted({m for m, _ in rows} | ({args.one[0]} if args.one else set())), Path(tmp)))
        if args.one:
            print(json.dumps(one_row(args)))
            return
        if args.device == "cuda" or args.tiny:
            if args.device == "cuda" and not torch.cuda.is_available():
                raise SystemExit("--device cuda: no CUDA GPU here; run without --device for the CPU byte table")
            gpu_table(rows, args, args.json)
        else:
            cpu_table(args.models, args.rank, args.options)


if __name__ == "__main__":
    main()
