"""Exponential moving average of the trained weights (LoRA or full), as diffusers' ``EMAModel``.

The arithmetic is diffusers' ``training_utils.EMAModel`` (huggingface/diffusers ``src/diffusers/training_utils.py``,
lines 636-645 for the defaults ``decay=0.9999, min_decay=0.0, update_after_step=0, use_ema_warmup=False,
inv_gamma=1.0, power=2/3``, lines 744-761 for ``get_decay`` and 780-820 for ``step``), which
``examples/text_to_image/train_text_to_image.py`` uses (lines 634-642: the shadow starts as the initial weights;
line 1058: one ``step`` after every optimizer step; lines 1100-1103: validation with the EMA weights swapped in).
After optimizer step ``n`` (1-based), with ``k = max(0, n - update_after_step - 1)``::

    decay_n = 0                                              if k == 0
            = 1 - (1 + k / inv_gamma) ** -power              if use_warmup
            = (1 + k) / (10 + k)                             otherwise
    decay_n = max(min(decay_n, decay), min_decay)
    shadow <- shadow - (1 - decay_n) * (shadow - param)

Shadows are fp32 copies (a bf16 shadow would round away updates of size 1e-4 of the weight) on the parameters'
device, or in CPU memory with ``offload`` (as the script's ``--offload_ema``, lines 1056-1060, for a full model
whose fp32 shadow would not fit beside it; each update then copies the weights to the CPU). ``state_tensors``
holds the shadows and the step count, so a resumed run continues bitwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True, kw_only=True)
class EmaSpec:
    """diffusers ``EMAModel``'s options, with its defaults."""

    decay: float = 0.9999
    min_decay: float = 0.0
    update_after_step: int = 0
    use_warmup: bool = False
    inv_gamma: float = 1.0
    power: float = 2 / 3


def decay_at(spec: EmaSpec, step: int) -> float:
    """The decay applied by the EMA update after optimizer step ``step`` (1-based), ``EMAModel.get_decay``."""
    k = max(0, step - spec.update_after_step - 1)
    if k <= 0:
        return 0.0
    value = 1 - (1 + k / spec.inv_gamma) ** (-spec.power) if spec.use_warmup else (1 + k) / (10 + k)
    return max(min(value, spec.decay), spec.min_decay)


class EMA:
    """fp32 shadows of ``params`` (name -> parameter), updated by ``update`` after each optimizer step."""

    def __init__(self, params: dict[str, nn.Parameter], spec: EmaSpec, offload: bool = False) -> None:
        self.spec = spec
        self.params = params
        self.shadow = {
            k: p.detach().to("cpu" if offload else p.device, torch.float32, copy=True) for k, p in params.items()
        }
        self.step = 0

    @torch.no_grad()
    def update(self) -> float:
        """One EMA step over the current parameter values; returns the decay used."""
        self.step += 1
        decay = decay_at(self.spec, self.step)
        keys = list(self.shadow)
        shadows = [self.shadow[k] for k in keys]
        current = [self.params[k].detach().to(self.shadow[k].device, torch.float32) for k in keys]
        torch._foreach_sub_(shadows, torch._foreach_sub(shadows, current), alpha=1.0 - decay)
        return decay

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The EMA weights in the parameters for the duration (validation, export); the trained ones put back."""
        saved = {k: p.detach().to("cpu", copy=True) for k, p in self.params.items()}  # off the device
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.shadow[k].to(p.device))
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(saved[k])

    def state_tensors(self, prefix: str) -> dict[str, Tensor]:
        """Shadows (CPU) under ``prefix + name`` and the step count as a 0-d int64 tensor under ``prefix + '#step'``."""
        out = {prefix + k: v.detach().cpu().contiguous().clone() for k, v in self.shadow.items()}
        out[prefix + "#step"] = torch.tensor(self.step, dtype=torch.int64)
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor], prefix: str) -> None:
        """Restore ``state_tensors`` output; a missing or extra key is an error naming it."""
        mine = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        step = mine.pop("#step", None)
        missing, extra = sorted(set(self.shadow) - set(mine)), sorted(set(mine) - set(self.shadow))
        if step is None or missing or extra:
            raise KeyError(
                f"checkpoint EMA does not match the trained weights: missing {missing[:3]}, unexpected {extra[:3]}"
                + ("" if step is not None else ", no step count")
            )
        with torch.no_grad():
            for k, v in mine.items():
                self.shadow[k].copy_(v)
        self.step = int(step)
