"""Optimizer and learning-rate schedule for the trainable parameters (a LoRA's, or every denoiser weight in full mode).

Adafactor (transformers) keeps factored second moments (a row and a column vector) for 2-D and larger weights and a
full one for vectors (biases, norms): its state over a full UNet is ~O(rows + cols) per matrix, which is why the
Salesforce Diffusion-DPO script forces it for SDXL (``train.py`` lines 667-674).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def build_optimizer(params: Iterable[nn.Parameter], cfg: Any, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW (default), bitsandbytes' 8-bit AdamW, or Adafactor with a fixed learning rate (Salesforce SDXL DPO).

    ``cfg`` is the recipe's ``optim`` section (name, lr, weight_decay, betas, eps); ``lr`` replaces ``cfg.lr``
    (``config.effective_lr``: scaled by the global batch under ``optim.scale_lr``).
    """
    params = list(params)
    lr = cfg.lr if lr is None else lr
    if not params:
        raise ValueError("no trainable parameters: add a LoRA before building the optimizer")
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            params,
            lr=lr,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            fused=fusable(params),
        )
    if cfg.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError("optim.name=adamw8bit needs bitsandbytes: pip install 'diffalign[memory]'") from e
        # 8-bit block-wise quantized moments (Dettmers et al. 2022); tensors under 4096 values keep fp32 states
        return bnb.optim.AdamW8bit(params, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params,
            lr=lr,
            weight_decay=cfg.weight_decay,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
            clip_threshold=1.0,
        )
    raise ValueError(f"unknown optimizer {cfg.name!r}; choices: adamw, adamw8bit, adafactor")


def fusable(params: list[nn.Parameter]) -> bool:
    """Whether to use torch's fused AdamW: on an accelerator that has it (one update kernel, step counts on the
    device, so no host read of them). Not on the CPU, where a step's kernels cost no launch latency and the fused
    kernel's different rounding would move the CPU runs away from the numbers the tests pin."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices()) - {"cpu"}
    return all(p.is_floating_point() and p.device.type in devices for p in params)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, max_steps: int) -> Any:
    """A diffusers/transformers-style LambdaLR schedule stepped once per optimizer step."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=max_steps)
