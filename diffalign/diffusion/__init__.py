"""Pure process math: how to noise latents, what the model regresses, how to invert it; the reverse transition
kernels the samplers step with (DDIM, flow SDEs: mean, std, log-density) are ``diffalign.diffusion.transition``.

Two processes share one duck-typed interface (``ForwardProcess``): ``VPProcess`` (DDPM family, SD1.5/SDXL,
epsilon or v-prediction) and ``FlowProcess`` (SD3 rectified flow). ``from_scheduler`` picks one from a
diffusers scheduler or its config dict; no scheduler object is kept or instantiated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import Tensor

from diffalign.diffusion.flow import FlowProcess
from diffalign.diffusion.vp import VPProcess


__all__ = ["FlowProcess", "ForwardProcess", "VPProcess", "from_scheduler"]

_BETA_KEYS = ("beta_start", "beta_end", "beta_schedule", "trained_betas")


class ForwardProcess(Protocol):
    """What model adapters and term builders need from a forward process."""

    num_train_timesteps: int

    def sample_timesteps(
        self, n: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor: ...

    def add_noise(self, x0: Tensor, eps: Tensor, timesteps: Tensor) -> Tensor: ...

    def target(self, x0: Tensor, eps: Tensor, timesteps: Tensor) -> Tensor: ...

    def pred_x0(self, x_t: Tensor, model_out: Tensor, timesteps: Tensor) -> Tensor: ...

    def pred_eps(self, x_t: Tensor, model_out: Tensor, timesteps: Tensor) -> Tensor: ...


def from_scheduler(scheduler_or_config: Any, shift: float | None = None, **sampling: Any) -> VPProcess | FlowProcess:
    """A process for a diffusers scheduler instance or config dict.

    ``FlowMatch*`` class names (or a config with ``shift`` and no betas) give a ``FlowProcess``; anything with
    beta keys gives a ``VPProcess``. ``sampling`` (weighting, logit_mean, logit_std, mode_scale) is only valid
    for flow processes; VP training samples timesteps uniformly. ``shift`` overrides a flow scheduler's shift
    (required for dynamic-shifting schedulers such as FLUX.1's).
    """
    config = getattr(scheduler_or_config, "config", scheduler_or_config)
    if not isinstance(config, Mapping):
        raise TypeError(
            f"expected a diffusers scheduler or a config mapping; got {type(scheduler_or_config).__name__}"
        )
    if hasattr(scheduler_or_config, "config"):
        class_name = type(scheduler_or_config).__name__
    else:
        class_name = str(config.get("_class_name", ""))
    has_betas = any(key in config for key in _BETA_KEYS)
    if class_name.startswith("FlowMatch") or (not has_betas and "shift" in config):
        return FlowProcess.from_scheduler_config(config, shift=shift, **sampling)
    if has_betas:
        if sampling or shift is not None:
            options = sorted([*sampling, *(["shift"] if shift is not None else [])])
            raise ValueError(f"timestep sampling options {options} apply to flow schedulers only")
        return VPProcess.from_scheduler_config(config)
    raise ValueError(
        f"cannot tell the forward process of scheduler {class_name or '<unnamed config>'!r}: expected a FlowMatch* "
        f"scheduler or a config with one of {_BETA_KEYS}; got keys {sorted(config)}"
    )
