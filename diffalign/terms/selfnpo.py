"""Self-NPO terms: EMA-teacher DDIM rollout with negative guidance, re-noising, student x0 vs teacher x0.

Self-NPO ("Self-NPO: Data-Free Diffusion Model Enhancement via Truncated Diffusion Fine-Tuning", F.-Y. Wang et
al., arXiv 2505.11777v2, AAAI 2026) trains a *negative* model from images + captions alone. The arithmetic follows the authors'
``Self-NPO/train.py`` (SD1.5) and ``train_xl.py`` (SDXL). Per group, with ``a_t = alphas_cumprod[t]``,
``alpha_t = sqrt(a_t)``, ``sigma_t = sqrt(1 - a_t)``:

1. **Start.** A DDIM grid index ``k ~ U{0..N-1}`` (``N = num_ddim_steps``); ``s = grid[k + 1]`` (see
   ``ddim_grid``) and ``x_s = alpha_s x0 + sigma_s eps`` from the real image's latent ``x0``.
2. **Teacher rollout** (no grad, EMA weights). ``n = min(max_teacher_steps, k + 1)`` deterministic DDIM
   steps (eta 0) down the grid with the guided output ``o = o_c + w (o_c - o_u)``:
   ``x_prev = alpha_prev x0_hat + sigma_prev eps_hat`` (Song et al. 2021, arXiv 2010.02502, Eq. 12 with
   sigma = 0). One more guided evaluation at the truncated state ``(x_e, e)`` gives the target ``x0_hat_e``.
   The last grid step goes to timestep 0 (``alphas_cumprod[0]``, like DDIM with ``set_alpha_to_one=False``), and
   a sample that gets there takes its target from one more evaluation at timestep 0. (The authors' loop does
   that too, except when *every* sample of the batch has finished early: then it stops and keeps the x0 of the
   previous state, so a sample's target depends on its batch-mates. That special case is not reproduced.)
3. **Re-noise** to a noisier ``u ~ U{e+1 .. T-1}`` with the forward transition kernel
   ``x_u = (alpha_u/alpha_e) x_e + sqrt(1 - a_u/a_e) z``; this is the note's
   ``alpha_u (x_e/alpha_e + sqrt(nsr_u^2 - nsr_e^2) z)`` with ``nsr = sigma/alpha`` rewritten so it stays
   finite when ``alpha_u = 0`` (zero-terminal-SNR). If ``x_e ~ alpha_e x0 + sigma_e eps`` then
   ``x_u ~ alpha_u x0 + sigma_u eps'``: the forward marginal.
4. **Student** (trainable LoRA on, real prompt): ``x0_student = pred_x0(x_u, model(x_u, u, c), u)``.
5. **Loss** ``mean(sqrt((x0_student - x0_hat_e)^2 + c^2) - c)`` (pseudo-Huber, c = 1e-3) or the MSE.

Guidance is applied to the raw model output. ``pred_x0`` / ``pred_eps`` are affine in the output with
weights that do not depend on it, and ``1 + w - w = 1``, so this equals guiding x0 and eps separately as the
authors do, for epsilon- and v-prediction alike. Shortcuts: ``w = 0`` evaluates only the conditional branch and
``w = -1`` only the unconditional one (the SD1.5 teacher: ``c - (c - u) = u``, at half the cost); otherwise both branches go
through one concatenated forward. SD3 (rectified flow) is not covered: the rollout is DDIM on a VP process.

The teacher is the base model plus an EMA of the LoRA tensors (``ema_update``, swapped into the one denoiser
by ``swapped_in``); the authors train the full UNet and keep an EMA of all its weights. With a LoRA the EMA is
over the factors A and B separately, so the teacher's offset is EMA(B) EMA(A), not EMA(B A); both start at the
LoRA init, where B = 0 and the teacher is the base model.

Randomness per group comes from that group's own seed (``draw``), so a batch split across processes or a
resumed run draws the same values. Shapes: latents ``(B, C, h, w)``; timesteps and indices ``(B,)`` long.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diffalign.diffusion.vp import VPProcess


Cond = dict[str, Tensor]
Denoise = Callable[[Tensor, Tensor, Cond], Tensor]  # (x_t, timesteps, cond) -> raw model output
MICRO_COND_KEYS = ("time_ids",)  # SDXL size/crop conditioning: kept as is in the unconditional branch
LOSS_TYPES = ("huber", "l2")


# ---- grid, guidance, DDIM, re-noising ---------------------------------------------------------------
def _coefs(process: VPProcess, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha_t, sigma_t) fp32, shaped (B, 1, ..., 1) to broadcast against ``like`` and on its device."""
    alpha, sigma = process.coefficients(t)
    shape = (-1, *([1] * (like.ndim - 1)))
    return alpha.reshape(shape).to(like.device), sigma.reshape(shape).to(like.device)


def ddim_grid(num_train_timesteps: int, num_ddim_steps: int) -> Tensor:
    """``(N + 1,)`` long: ``[0, r - 1, 2r - 1, ..., N r - 1]`` with ``r = T // N`` (T=1000, N=25: 0, 39, ..., 999).

    Entries 1..N are the authors' DDIM timesteps; entry 0 is where the last DDIM step lands (timestep 0).
    """
    if not 1 <= num_ddim_steps <= num_train_timesteps:
        raise ValueError(f"num_ddim_steps={num_ddim_steps} must be in [1, num_train_timesteps={num_train_timesteps}]")
    ratio = num_train_timesteps // num_ddim_steps
    steps = torch.arange(1, num_ddim_steps + 1, dtype=torch.long) * ratio - 1
    return torch.cat([torch.zeros(1, dtype=torch.long), steps])


def guide(cond_out: Tensor, uncond_out: Tensor, w: float) -> Tensor:
    """``cond + w (cond - uncond)`` in fp32 (w = -1: the unconditional output; w = 0: the conditional one)."""
    c = cond_out.float()
    return c + w * (c - uncond_out.float())


def ddim_step(process: VPProcess, x_t: Tensor, model_out: Tensor, t: Tensor, t_prev: Tensor) -> Tensor:
    """Deterministic DDIM (eta 0): ``alpha_prev x0_hat + sigma_prev eps_hat``, fp32. ``t``/``t_prev``: (B,)."""
    x0_hat = process.pred_x0(x_t.float(), model_out.float(), t)
    eps_hat = process.pred_eps(x_t.float(), model_out.float(), t)
    alpha, sigma = _coefs(process, t_prev, x_t)
    return alpha * x0_hat + sigma * eps_hat


def renoise(process: VPProcess, x_t: Tensor, t: Tensor, u: Tensor, z: Tensor) -> Tensor:
    """Sample ``q(x_u | x_t)``: ``(alpha_u / alpha_t) x_t + sqrt(1 - a_u / a_t) z`` for ``u >= t``, fp32.

    Equals the note's ``alpha_u (x_t / alpha_t + sqrt(nsr_u^2 - nsr_t^2) z)``; ``u == t`` returns ``x_t``.
    """
    if bool((u < t).any()):
        raise ValueError(f"re-noising needs u >= t; got u={u.tolist()} t={t.tolist()}")
    a_t, s_t = _coefs(process, t, x_t)
    a_u, s_u = _coefs(process, u, x_t)
    ratio = a_u / a_t
    std = (s_u**2 - (ratio * s_t) ** 2).clamp_min(0).sqrt()
    out = ratio * x_t.float() + std * z.float()
    same = (u == t).to(x_t.device).reshape(-1, *([1] * (x_t.ndim - 1)))
    return torch.where(same, x_t.float(), out)


def later_timesteps(t_end: Tensor, r: Tensor, num_train_timesteps: int) -> Tensor:
    """``u = t_end + 1 + floor(r (T - 1 - t_end))`` for ``r ~ U[0, 1)``: uniform on ``{t_end + 1 .. T - 1}``.

    Where ``t_end = T - 1`` there is no noisier timestep and ``u = t_end`` (re-noising is then the identity).
    """
    top = num_train_timesteps - 1
    span = (top - t_end).to(r.device).float()
    u = t_end.to(r.device) + 1 + torch.floor(r.float() * span).long()
    return u.clamp(max=top).to(t_end.device)


# ---- loss --------------------------------------------------------------------------------------------
def pseudo_huber(pred: Tensor, target: Tensor, c: float) -> Tensor:
    """Per-sample ``mean_{C,h,w}(sqrt((pred - target)^2 + c^2) - c)`` in fp32; (B, ...) -> (B,)."""
    d = pred.float() - target.float()
    return (torch.sqrt(d.pow(2) + c * c) - c).flatten(1).mean(dim=1)


def x0_loss(pred: Tensor, target: Tensor, loss_type: str = "huber", huber_c: float = 1e-3) -> Tensor:
    """Per-sample Self-NPO loss (B,): pseudo-Huber with ``huber_c`` or the mean squared error."""
    if loss_type == "huber":
        return pseudo_huber(pred, target, huber_c)
    if loss_type == "l2":
        return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    raise ValueError(f"unknown loss_type {loss_type!r}; choices: {', '.join(LOSS_TYPES)}")


# ---- conditioning ------------------------------------------------------------------------------------
def uncond_like(cond: Cond, empty: Mapping[str, Tensor] | None = None) -> Cond:
    """The unconditional branch for a conditional batch ``cond``.

    ``empty=None``: zero prompt embeddings (SDXL Self-NPO / LCM convention). Otherwise ``empty`` holds the
    encoded empty prompt (batch 1), broadcast to the batch. ``MICRO_COND_KEYS`` (SDXL ``time_ids``) are kept.
    """
    out = {}
    for key, value in cond.items():
        if key in MICRO_COND_KEYS:
            out[key] = value
        elif empty is None:
            out[key] = torch.zeros_like(value)
        else:
            out[key] = empty[key].to(value.device, value.dtype).expand_as(value)
    return out


def _take(cond: Cond | None, idx: Tensor | None) -> Cond | None:
    if cond is None or idx is None:
        return cond
    return {k: v[idx] for k, v in cond.items()}


def guided_output(denoise: Denoise, x: Tensor, t: Tensor, cond: Cond, uncond: Cond | None, w: float) -> Tensor:
    """The guided raw output (fp32); one forward for w in {0, -1}, else one 2B forward (cond rows first)."""
    if w == 0:
        return denoise(x, t, cond).float()
    if uncond is None:
        raise ValueError(f"guidance_scale={w} needs unconditional embeddings")
    if w == -1:
        return denoise(x, t, uncond).float()
    both = {k: torch.cat([cond[k], uncond[k].to(cond[k].dtype)]) for k in cond}
    out_c, out_u = denoise(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
    return guide(out_c, out_u, w)


# ---- teacher rollout ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rollout:
    """Teacher result: truncated state ``x_end`` (B, C, h, w) at ``t_end`` (B,), its guided x0 ``x0`` and ``steps``."""

    x_end: Tensor
    t_end: Tensor
    x0: Tensor
    steps: Tensor


@torch.no_grad()
def teacher_rollout(
    denoise: Denoise,
    process: VPProcess,
    x_start: Tensor,
    position: Tensor,
    grid: Tensor,
    cond: Cond,
    uncond: Cond | None,
    w: float,
    max_steps: int,
    calls: Callable[[int], int] | None = None,
) -> Rollout:
    """Up to ``max_steps`` guided DDIM steps from ``grid[position]`` down the grid, then the guided x0 there.

    Each sample takes ``min(max_steps, position)`` steps; only samples with steps left are evaluated.
    ``position`` (B,) long in ``[0, N]`` indexes ``grid`` (``ddim_grid``). ``calls`` maps the step forwards this
    batch needs to the number to make (a sharded run: the maximum over processes, so that every process makes the
    same denoiser calls); a call with no sample left evaluates the first sample and discards the result.
    """
    x, pos = x_start.float().clone(), position.clone()
    steps = position.clamp(max=max_steps)
    left = steps.clone()
    need = int(steps.max()) if steps.numel() else 0
    for _ in range(calls(need) if calls is not None else need):
        idx = (left > 0).nonzero().squeeze(1)
        if idx.numel() == 0:  # only to keep the processes' forwards in step
            first = torch.zeros(1, dtype=torch.long, device=x.device)
            guided_output(denoise, x[first], grid[pos[first]], _take(cond, first), _take(uncond, first), w)
            continue
        t, t_prev = grid[pos[idx]], grid[pos[idx] - 1]
        out = guided_output(denoise, x[idx], t, _take(cond, idx), _take(uncond, idx), w)
        x = x.index_copy(0, idx, ddim_step(process, x[idx], out, t, t_prev))
        pos, left = pos.index_add(0, idx, -torch.ones_like(idx)), left.index_add(0, idx, -torch.ones_like(idx))
    t_end = grid[pos]
    out = guided_output(denoise, x, t_end, cond, uncond, w)
    return Rollout(x_end=x, t_end=t_end, x0=process.pred_x0(x, out, t_end), steps=steps)


# ---- random draws ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Draws:
    """Per-group randomness: DDIM ``index`` (B,) long, start noise ``eps`` and re-noise ``z`` (B, C, h, w), ``r`` (B,)."""

    index: Tensor
    eps: Tensor
    r: Tensor
    z: Tensor

    def to(self, device: torch.device | str) -> Draws:
        return Draws(*(getattr(self, k).to(device) for k in ("index", "eps", "r", "z")))


def draw(seeds: Sequence[int], shape: Sequence[int], num_ddim_steps: int) -> Draws:
    """One generator per group seeded with its seed; draws in the order index, eps, r, z (CPU, fp32)."""
    parts: dict[str, list[Tensor]] = {"index": [], "eps": [], "r": [], "z": []}
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        parts["index"].append(torch.randint(0, num_ddim_steps, (), generator=gen))
        parts["eps"].append(torch.randn(tuple(shape), generator=gen))
        parts["r"].append(torch.rand((), generator=gen))
        parts["z"].append(torch.randn(tuple(shape), generator=gen))
    return Draws(**{k: torch.stack(v) for k, v in parts.items()})


# ---- one Self-NPO forward ----------------------------------------------------------------------------
@dataclass(frozen=True)
class SelfNPOTerms:
    """``student_x0`` (with grad) and ``target_x0`` (B, C, h, w) fp32; ``t_start``/``t_end``/``u``/``steps`` (B,)."""

    student_x0: Tensor
    target_x0: Tensor
    t_start: Tensor
    t_end: Tensor
    u: Tensor
    steps: Tensor


def selfnpo_terms(
    denoise: Denoise,
    process: VPProcess,
    x0: Tensor,
    draws: Draws,
    cond: Cond,
    uncond: Cond | None,
    *,
    guidance_scale: float,
    max_teacher_steps: int,
    grid: Tensor,
    teacher: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    u: Tensor | None = None,
    teacher_calls: Callable[[int], int] | None = None,
) -> SelfNPOTerms:
    """Steps 1-4 of the module docstring for clean latents ``x0`` (B, C, h, w).

    ``teacher()`` is entered around the rollout (the recipe swaps the EMA LoRA tensors in); ``u`` overrides the
    re-noising timesteps (tests use ``u = t_end`` for the no-re-noising invariant); ``teacher_calls``: the
    rollout's ``calls`` (a sharded run's lockstep).
    """
    if not isinstance(process, VPProcess):
        raise TypeError(f"Self-NPO needs a VP (DDPM-family) process, got {type(process).__name__}")
    device = x0.device
    grid = grid.to(device)
    position = draws.index.to(device) + 1
    t_start = grid[position]
    x_start = process.add_noise(x0.float(), draws.eps.to(device), t_start)
    with torch.no_grad(), teacher():
        roll = teacher_rollout(
            denoise, process, x_start, position, grid, cond, uncond, guidance_scale, max_teacher_steps, teacher_calls
        )
    u = later_timesteps(roll.t_end, draws.r.to(device), process.num_train_timesteps) if u is None else u.to(device)
    x_u = renoise(process, roll.x_end, roll.t_end, u, draws.z.to(device))
    student_x0 = process.pred_x0(x_u, denoise(x_u, u, cond).float(), u)
    return SelfNPOTerms(student_x0, roll.x0.detach(), t_start, roll.t_end, u, roll.steps)


# ---- EMA teacher over LoRA tensors -------------------------------------------------------------------
@torch.no_grad()
def ema_update(ema: Mapping[str, Tensor], params: Mapping[str, Tensor], decay: float) -> None:
    """In place: ``ema <- decay * ema + (1 - decay) * param`` for every key (the authors' ``update_ema``)."""
    if ema.keys() != params.keys():
        raise KeyError(f"EMA keys differ from the parameters: {sorted(set(ema) ^ set(params))[:5]}")
    for key, value in ema.items():
        value.mul_(decay).add_(params[key].detach().to(value.dtype), alpha=1 - decay)


@contextlib.contextmanager
def swapped_in(params: Mapping[str, torch.nn.Parameter], values: Mapping[str, Tensor]) -> Iterator[None]:
    """Temporarily point each parameter's storage at ``values[key]`` (no copy); restored exactly on exit.

    With the EMA of the LoRA tensors as ``values`` the adapter becomes the teacher (base + EMA LoRA) without a
    second denoiser. Use under ``torch.no_grad()``.
    """
    if params.keys() != values.keys():
        raise KeyError(f"swapped tensors differ from the parameters: {sorted(set(params) ^ set(values))[:5]}")
    saved = {}
    try:
        for key, param in params.items():
            value = values[key]
            if value.shape != param.shape or value.dtype != param.dtype or value.device != param.device:
                raise ValueError(f"{key}: cannot swap in {value.dtype} {tuple(value.shape)} on {value.device}")
            saved[key] = param.data
            param.data = value
        yield
    finally:
        for key, data in saved.items():
            params[key].data = data
