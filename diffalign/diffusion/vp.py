"""Variance-preserving forward process (DDPM family: SD1.5, SD2, SDXL), epsilon or v-prediction.

The forward marginal is ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` with ``a_t = alphas_cumprod[t]``
(Ho et al. 2020, arXiv 2006.11239, Eq. 4). The velocity target is ``v = sqrt(a_t) eps - sqrt(1 - a_t) x0``
(Salimans & Ho 2022, arXiv 2202.00512, Sec. 4). ``alphas_cumprod`` is built in fp32 exactly the way the
diffusers schedulers build it, so ``add_noise`` / ``target`` match ``DDPMScheduler.add_noise`` /
``get_velocity`` bit for bit in fp32. Unlike diffusers, coefficients are always computed in fp32 (diffusers
casts them to the input dtype first); outputs are cast back to the dtype of the data tensor.

Shapes: data tensors are (B, ...) with any trailing dims; ``timesteps`` is a (B,) LongTensor (or a single
value shared by the batch) of indices into ``alphas_cumprod``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# What a diffusers DDPM-style scheduler assumes when a key is missing from its config.
_CONFIG_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "rescale_betas_zero_snr": False,
    "prediction_type": "epsilon",
}


def _cosine_betas(num_steps: int, max_beta: float = 0.999) -> Tensor:
    """Glide / improved-DDPM cosine schedule (Nichol & Dhariwal 2021, arXiv 2102.09672, Eq. 17), fp32."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float32)


def _zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and rescale sqrt(alphas_cumprod) so the last step has SNR 0 (arXiv 2305.08891, Alg. 1)."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alphas_cumprod = root**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


def _with_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` over the diffusers defaults; ``None`` values (e.g. ``trained_betas: null``) mean "default"."""
    return {**_CONFIG_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}


def betas_from_config(config: Mapping[str, Any]) -> Tensor:
    """The (T,) fp32 beta schedule a diffusers scheduler with this config would build."""
    cfg = _with_defaults(config)
    steps = int(cfg["num_train_timesteps"])
    schedule = cfg["beta_schedule"]
    if cfg["trained_betas"] is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
        if betas.shape != (steps,):
            raise ValueError(
                f"trained_betas has shape {tuple(betas.shape)}; expected ({steps},) = num_train_timesteps"
            )
    elif schedule == "linear":
        betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], steps, dtype=torch.float32)
    elif schedule == "scaled_linear":
        betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, steps, dtype=torch.float32) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(steps)
    else:
        raise ValueError(f"unsupported beta_schedule {schedule!r}; supported: {', '.join(BETA_SCHEDULES)}")
    if cfg["rescale_betas_zero_snr"]:
        betas = _zero_terminal_snr(betas)
    return betas


def _broadcast(coef: Tensor, like: Tensor) -> Tensor:
    """(B,) or (1,) -> (B, 1, ..., 1) with ``like.ndim`` dims."""
    return coef.reshape(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True, eq=False)
class VPProcess:
    """DDPM forward process with a fixed ``alphas_cumprod`` table (T,) in fp32 (or fp64 if given so).

    With zero-terminal-SNR schedules ``a_{T-1} = 0``; there ``pred_x0`` for epsilon-prediction divides by
    zero (as in diffusers), which is why such schedules are paired with v-prediction.
    """

    alphas_cumprod: Tensor
    prediction_type: str = "epsilon"
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {self.prediction_type!r} is not supported; choose one of {PREDICTION_TYPES}"
            )
        if self.alphas_cumprod.shape != (self.num_train_timesteps,):
            raise ValueError(
                f"alphas_cumprod has shape {tuple(self.alphas_cumprod.shape)}; "
                f"expected ({self.num_train_timesteps},) = num_train_timesteps"
            )

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> VPProcess:
        """Build from a diffusers scheduler config dict (DDPM, DDIM, PNDM, Euler, ... all share these keys)."""
        cfg = _with_defaults(config)
        alphas_cumprod = torch.cumprod(1.0 - betas_from_config(config), dim=0)
        return cls(
            alphas_cumprod=alphas_cumprod,
            prediction_type=cfg["prediction_type"],
            num_train_timesteps=int(cfg["num_train_timesteps"]),
        )

    def to(self, device: torch.device | str) -> VPProcess:
        """A copy whose table lives on ``device`` (avoids a host-to-device copy per call)."""
        return dataclasses.replace(self, alphas_cumprod=self.alphas_cumprod.to(device))

    def sample_timesteps(
        self, n: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """``n`` integer timesteps uniform in [0, T), sampled on the generator's device, returned on ``device``."""
        where = generator.device if generator is not None else device
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=where)
        return t.to(device) if device is not None else t

    def coefficients(self, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(a_t), sqrt(1 - a_t)) as fp32 tensors shaped like ``timesteps``."""
        t = torch.as_tensor(timesteps).long()
        if t.ndim > 1:
            raise ValueError(f"timesteps must be a scalar or (B,); got shape {tuple(t.shape)}")
        try:  # no host read: raises here on the CPU, as a device-side assert on an accelerator
            torch._assert_async(((t >= 0) & (t < self.num_train_timesteps)).all(), "timesteps out of range")
        except RuntimeError:
            raise ValueError(
                f"timesteps must lie in [0, {self.num_train_timesteps}); got {t.min()}..{t.max()}"
            ) from None
        table = self.alphas_cumprod.to(t.device, non_blocking=True)  # a no-op once ``to(device)`` put it there
        a = table[t].float()
        return a.sqrt(), (1.0 - a).sqrt()

    def _coefs(self, timesteps: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        alpha, sigma = self.coefficients(timesteps)
        if alpha.numel() not in (1, like.shape[0]):
            raise ValueError(f"{alpha.numel()} timesteps for a batch of {like.shape[0]}")
        return _broadcast(alpha, like).to(like.device), _broadcast(sigma, like).to(like.device)

    def add_noise(self, x0: Tensor, eps: Tensor, timesteps: Tensor) -> Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, in the dtype of ``x0``."""
        alpha, sigma = self._coefs(timesteps, x0)
        return (alpha * x0.float() + sigma * eps.float()).to(x0.dtype)

    def velocity(self, x0: Tensor, eps: Tensor, timesteps: Tensor) -> Tensor:
        """v = sqrt(a_t) eps - sqrt(1 - a_t) x0, in the dtype of ``x0``."""
        alpha, sigma = self._coefs(timesteps, x0)
        return (alpha * eps.float() - sigma * x0.float()).to(x0.dtype)

    def target(self, x0: Tensor, eps: Tensor, timesteps: Tensor) -> Tensor:
        """The regression target for the model output: ``eps`` or ``v`` depending on ``prediction_type``."""
        if self.prediction_type == "epsilon":
            return eps.to(x0.dtype)
        return self.velocity(x0, eps, timesteps)

    def pred_x0(self, x_t: Tensor, model_out: Tensor, timesteps: Tensor) -> Tensor:
        """Clean-sample estimate: (x_t - sqrt(1-a) eps)/sqrt(a), or sqrt(a) x_t - sqrt(1-a) v."""
        alpha, sigma = self._coefs(timesteps, x_t)
        x, out = x_t.float(), model_out.float()
        x0 = (x - sigma * out) / alpha if self.prediction_type == "epsilon" else alpha * x - sigma * out
        return x0.to(x_t.dtype)

    def pred_eps(self, x_t: Tensor, model_out: Tensor, timesteps: Tensor) -> Tensor:
        """Noise estimate: the output itself, or sqrt(1-a) x_t + sqrt(a) v."""
        if self.prediction_type == "epsilon":
            return model_out.to(x_t.dtype)
        alpha, sigma = self._coefs(timesteps, x_t)
        return (sigma * x_t.float() + alpha * model_out.float()).to(x_t.dtype)
