"""Rectified-flow forward process as used by Stable Diffusion 3 (Esser et al. 2024, arXiv 2403.03206).

``x_t = (1 - sigma) x0 + sigma eps`` and the model regresses the velocity ``v = eps - x0`` (Eq. 2-3 of the
paper, in diffusers' sign convention). Training timesteps follow diffusers' SD3 LoRA script: draw
``u`` from a density on [0, 1] (logit-normal, "mode" or uniform; paper Sec. 3.1), take
``index = int(u * T)`` and look up the *shifted* sigma table of ``FlowMatchEulerDiscreteScheduler``
(``sigma' = shift * s / (1 + (shift - 1) s)``, paper Eq. 23 with ``shift = sqrt(m/n)``; SD3 uses 3.0).
The model is called with ``timesteps = sigma * T`` (floats in model units). Deviation: an index of ``T``
(``u == 1``, possible under "mode" sampling) is clamped to ``T - 1`` instead of raising IndexError.

FLUX.1 schedulers use *dynamic* (resolution-dependent) shifting: ``FluxPipeline`` samples with
``mu = calculate_shift(image_seq_len)`` (linear in the packed sequence length: 0.5 at 256 tokens, 1.15 at 4096)
and ``sigma' = e^mu / (e^mu + 1/s - 1)``, which is the fixed-shift formula with ``shift = e^mu``
(``resolution_shift``). A training process needs one fixed shift, so it is always explicit here:
``training_shift`` gives the table diffusers' training scripts index (for a dynamic-shifting scheduler the
table stored at init is *unshifted*, shift 1, which is what ``train_dreambooth_lora_flux.py`` trains on), and
``resolution_shift`` gives the shift the pipeline samples with at a resolution.

Shapes: data tensors are (B, ...) with any trailing dims; ``timesteps`` / ``sigmas`` are (B,) fp32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffalign.registry import suggest


WEIGHTINGS = ("logit_normal", "mode", "uniform")
LOSS_WEIGHTS = ("none", "sigma_sqrt", "cosmap")
_SAMPLING_KEYS = ("weighting", "logit_mean", "logit_std", "mode_scale")


def resolution_shift(config: Mapping[str, Any], image_seq_len: int) -> float:
    """``exp(mu)`` of ``FluxPipeline``'s ``calculate_shift`` for ``image_seq_len`` packed tokens (4096 at 1024 px).

    Uses the scheduler config's ``base_image_seq_len`` / ``max_image_seq_len`` / ``base_shift`` / ``max_shift``
    (diffusers' defaults 256 / 4096 / 0.5 / 1.15 where absent). 1024 px FLUX: mu = 1.15, shift = 3.158.
    """
    base_len = int(config.get("base_image_seq_len") or 256)
    max_len = int(config.get("max_image_seq_len") or 4096)
    base_shift = float(config.get("base_shift") or 0.5)
    max_shift = float(config.get("max_shift") or 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    mu = image_seq_len * slope + base_shift - slope * base_len
    return math.exp(mu)


def training_shift(config: Mapping[str, Any]) -> float:
    """The shift of the sigma table diffusers' training scripts index (``noise_scheduler.timesteps[u * T]``).

    A fixed-shift scheduler (SD3: 3.0) stores its shifted table; a dynamic-shifting one (FLUX.1) stores the
    unshifted table at init, so the FLUX LoRA script trains on shift 1.
    """
    return 1.0 if config.get("use_dynamic_shifting") else float(config.get("shift", 1.0))


def shifted_sigmas(num_train_timesteps: int, shift: float) -> Tensor:
    """The (T,) fp32 sigma table of ``FlowMatchEulerDiscreteScheduler.__init__``: from 1 down to ~shift/T."""
    sigmas = torch.arange(num_train_timesteps, 0, -1, dtype=torch.float32) / num_train_timesteps
    return shift * sigmas / (1 + (shift - 1) * sigmas)


@dataclass(frozen=True, kw_only=True)
class FlowProcess:
    """Rectified flow with a fixed timestep shift and an SD3-style training-timestep density."""

    num_train_timesteps: int = 1000
    shift: float = 3.0
    weighting: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; {suggest(self.weighting, WEIGHTINGS)}")
        if self.shift <= 0 or self.num_train_timesteps < 1:
            raise ValueError(
                f"need shift > 0 and num_train_timesteps >= 1; got {self.shift}, {self.num_train_timesteps}"
            )

    @classmethod
    def from_scheduler_config(
        cls, config: Mapping[str, Any], shift: float | None = None, **sampling: Any
    ) -> FlowProcess:
        """Build from a ``FlowMatchEulerDiscreteScheduler`` config; ``sampling`` sets the timestep density.

        ``shift`` overrides the config's. A dynamic (resolution-dependent) scheduler needs it: training needs
        one fixed shift (``training_shift`` or ``resolution_shift`` give the usual choices).
        """
        if config.get("use_dynamic_shifting") and shift is None:
            raise ValueError(
                "scheduler config has use_dynamic_shifting=True; training needs a fixed shift. Pass shift= "
                "(diffalign.diffusion.flow.training_shift: 1.0 as diffusers' FLUX script; resolution_shift: the "
                "pipeline's shift at a resolution) or a config with use_dynamic_shifting=False (SD3 uses 3.0)."
            )
        for key in sampling:
            if key not in _SAMPLING_KEYS:
                raise ValueError(f"unknown sampling option {key!r}; {suggest(key, _SAMPLING_KEYS)}")
        return cls(
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
            shift=float(config.get("shift", 1.0)) if shift is None else float(shift),
            **sampling,
        )

    @property
    def sigma_table(self) -> Tensor:
        """(T,) shifted sigmas, index 0 = pure noise."""
        return shifted_sigmas(self.num_train_timesteps, self.shift)

    @property
    def timestep_table(self) -> Tensor:
        """(T,) model-unit timesteps ``sigma * T`` (= the scheduler's initial ``timesteps``)."""
        return self.sigma_table * self.num_train_timesteps

    def sample_u(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """(n,) draws in [0, 1] from the configured density, on the generator's device (CPU by default)."""
        where = generator.device if generator is not None else None
        if self.weighting == "logit_normal":
            z = torch.normal(self.logit_mean, self.logit_std, size=(n,), generator=generator, device=where)
            return torch.sigmoid(z)
        u = torch.rand(n, generator=generator, device=where)
        if self.weighting == "mode":
            u = 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return u

    def sample_timesteps(
        self, n: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """(n,) fp32 model-unit timesteps ``sigma[index] * T``, ``index = int(u * T)``, on ``device`` (or u's)."""
        u = self.sample_u(n, generator=generator)
        index = (u.cpu() * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return self.timestep_table[index].to(device if device is not None else u.device)

    def sigmas(self, timesteps: Tensor) -> Tensor:
        """sigma = t / T in fp32 (exact inverse of the table lookup up to one ulp)."""
        return torch.as_tensor(timesteps).float() / self.num_train_timesteps

    def _sigma(self, timesteps: Tensor, like: Tensor) -> Tensor:
        sigma = self.sigmas(timesteps).to(like.device)
        if sigma.ndim > 1 or sigma.numel() not in (1, like.shape[0]):
            raise ValueError(f"timesteps of shape {tuple(sigma.shape)} do not fit a batch of {like.shape[0]}")
        return sigma.reshape(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, x0: Tensor, eps: Tensor, timesteps: Tensor) -> Tensor:
        """x_t = (1 - sigma) x0 + sigma eps, in the dtype of ``x0``."""
        sigma = self._sigma(timesteps, x0)
        return ((1 - sigma) * x0.float() + sigma * eps.float()).to(x0.dtype)

    def target(self, x0: Tensor, eps: Tensor, timesteps: Tensor | None = None) -> Tensor:
        """The velocity ``eps - x0`` (independent of t; ``timesteps`` is accepted for interface parity)."""
        return (eps.float() - x0.float()).to(x0.dtype)

    def pred_x0(self, x_t: Tensor, model_out: Tensor, timesteps: Tensor) -> Tensor:
        """x0 = x_t - sigma v."""
        sigma = self._sigma(timesteps, x_t)
        return (x_t.float() - sigma * model_out.float()).to(x_t.dtype)

    def pred_eps(self, x_t: Tensor, model_out: Tensor, timesteps: Tensor) -> Tensor:
        """eps = x_t + (1 - sigma) v."""
        sigma = self._sigma(timesteps, x_t)
        return (x_t.float() + (1 - sigma) * model_out.float()).to(x_t.dtype)

    def loss_weight(self, timesteps: Tensor, scheme: str = "none") -> Tensor:
        """(B,) fp32 per-sample weights of diffusers' SD3 script: 1, sigma^-2, or 2 / (pi (1 - 2s + 2s^2))."""
        sigma = self.sigmas(timesteps)
        if scheme == "none":
            return torch.ones_like(sigma)
        if scheme == "sigma_sqrt":
            return sigma**-2.0
        if scheme == "cosmap":
            return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
        raise ValueError(f"unknown loss weighting {scheme!r}; {suggest(scheme, LOSS_WEIGHTS)}")
