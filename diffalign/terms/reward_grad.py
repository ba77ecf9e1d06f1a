"""Reward-gradient fine-tuning: sample with the policy, decode, score with a differentiable reward, backpropagate.

Four methods share one sampler (``diffalign.sampling.sampler.Sampler``: the family's DDIM grid on VP models, an Euler
ODE grid on flow models) and differ in which denoiser calls keep a graph (``rollout``):

* **ReFL** (Xu et al. 2023, ImageReward, arXiv 2304.05977, Sec. 4; code: THUDM/ImageReward @ c1392c6,
  ``ImageReward/ReFL.py`` lines 714-756): no-grad sampling with ``set_timesteps(40)`` (DDPMScheduler, no CFG) to a step index
  ``m ~ U{30, ..., 39}`` (``random.randint(30, 39)``, line 717), ONE grad-enabled denoiser call at ``timesteps[m]``
  and the reward on its predicted x0 (``scheduler.step(...).pred_original_sample``, line 737), decoded by the VAE
  and clamped to [0, 1] (lines 739-741). Loss ``relu(2 - r) * grad_scale`` with ``grad_scale = 1e-3`` (lines
  755-756, default at line 70). A DDPM step on a strided grid is DDIM with eta = 1, which is what ``Sampler`` runs.
* **DRaFT-K** (Clark et al. 2023, arXiv 2309.17400, Sec. 4.1, Alg. 1 with truncation): the full sampling chain, the
  graph kept only through the last ``K`` steps (stop-gradient on ``x_t`` before them); reward on the final sample.
  The paper finds K = 1 (DRaFT-1) best per compute. No official code exists; this follows the paper.
* **DRaFT-LV** (same paper, Sec. 4.2, Alg. 2): the chain runs without grad to ``x_0``, which is noised back to the
  last grid timestep ``n`` times with fresh noise (``x_1 = sqrt(a_1) sg(x_0) + sqrt(1 - a_1) eps_i``); each copy takes
  the last sampler step with grad, and the rewards of the ``n`` copies are averaged (paper: n = 2).
* **AlignProp** (Prabhudesai et al. 2023, arXiv 2310.03739; code: mihirp1998/AlignProp @ b22918a, the public
  release, ``sd_pipeline.py`` lines 124-132 and 206-225): a full DDIM chain (50 steps, eta 1, CFG 5: ``config/alignprop_config.py`` lines 103-110)
  with every denoiser call under gradient checkpointing and the model outputs of steps before a random truncation
  index ``b`` detached (``b = int(N(42, 5))`` by default, redrawn until ``1 <= b < N``; "uniform" and "fixed"
  strategies as there). Parameter gradients are then those of DRaFT-K with ``K = N - b``; the method is that
  randomised truncation plus checkpointing (``GradSpec.checkpointing``). Their loss is ``loss_coeff * (1 - r)``
  (HPS, ``alignprop_trainer.py`` lines 102 and 331, ``loss_coeff = 0.01``).

**Reference regularisation** (``kl``): at every grad-enabled step the reference model (the same denoiser with the
LoRA off, ``adapter.reference()``) makes a no-grad prediction on the same input, and ``kl`` is the mean over steps
of the mean squared difference of the (guided) outputs. For a Gaussian sampler step both transitions share their
variance, so their KL is this squared distance times a per-step constant; it is exactly 0 at LoRA init.

Randomness: each prompt's initial noise and step noise come from its own generator (``seeds``); the ReFL step, the
AlignProp truncation and the LV noise draws from ``batch_seed``; so a rollout is a deterministic function of its
seeds and the weights. Shapes: latents (B, C, h, w); images (B * n, 3, H, W) in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from diffalign.config.reward_grad import spec_problems
from diffalign.models.base import Adapter
from diffalign.sampling.guidance import UNCOND_MODES, default_info, encode_condition, guided_output
from diffalign.sampling.sampler import Sampler
from diffalign.sampling.seeds import draw_noise


METHODS = ("refl", "draft", "draft_lv", "alignprop")
TRUNCATIONS = ("gaussian", "uniform", "fixed")
LOSS_FORMS = ("relu", "linear")


@dataclass(frozen=True, kw_only=True)
class GradSpec:
    """How a rollout samples and where it keeps the graph (defaults: ReFL as in the ImageReward code).

    ``refl_steps``: inclusive range of the grad step's index on the grid. ``k``: DRaFT-K's window. ``lv_samples``:
    DRaFT-LV's n. ``truncation`` / ``truncation_args``: AlignProp's strategy and its (mean, std) / (min, max) /
    (value,). ``checkpointing``: recompute each grad-enabled denoiser call and the VAE decode in the backward.
    """

    method: str = "refl"
    num_steps: int = 40
    guidance_scale: float = 1.0
    eta: float = 1.0
    uncond: str = "empty_prompt"
    resolution: int = 512
    refl_steps: tuple[int, int] = (30, 39)
    k: int = 1
    lv_samples: int = 2
    truncation: str = "gaussian"
    truncation_args: tuple[float, ...] = (42.0, 5.0)
    checkpointing: bool = False

    def __post_init__(self) -> None:
        for key, value, choices in (
            ("method", self.method, METHODS),
            ("truncation", self.truncation, TRUNCATIONS),
            ("uncond", self.uncond, UNCOND_MODES),
        ):
            if value not in choices:
                raise ValueError(f"GradSpec.{key}={value!r}; choices: {', '.join(choices)}")
        for problem in spec_problems(self):
            raise ValueError(problem)


# ---- decode and rollouts ------------------------------------------------------------------------------
def decode(adapter: Adapter, latents: Tensor, *, use_checkpoint: bool = False) -> Tensor:
    """Differentiable VAE decode: scaled latents -> images (B, 3, H, W) (videos: (B, 3, F, H, W)) in [0, 1]
    (``(x / 2 + 0.5).clamp(0, 1)`` as ReFL.py line 741), fp32; ``Adapter.decode_pixels``, the inverse of
    ``Adapter.encode_images``."""
    run = adapter.decode_pixels
    z = latents.to(adapter.vae.device, torch.float32)
    pixels = checkpoint(run, z, use_reentrant=False) if use_checkpoint and z.requires_grad else run(z)
    return (pixels.float() / 2 + 0.5).clamp(0, 1)


@dataclass
class Rollout:
    """Decoded images to score and what the step logs. ``images`` (B * n, 3, H, W) keep the graph; row ``j`` belongs
    to prompt ``j // n``. ``kl``: scalar reference regularisation. ``grad_start``: first grid index with a graph."""

    images: Tensor
    prompts: list[str]
    n: int
    kl: Tensor
    grad_start: int
    grad_steps: int


def grad_start(spec: GradSpec, gen: torch.Generator) -> int:
    """The first grid index whose denoiser call keeps a graph (ReFL: the one grad step)."""
    n = spec.num_steps
    if spec.method == "refl":
        lo, hi = spec.refl_steps
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))
    if spec.method == "draft":
        return n - spec.k
    if spec.method == "draft_lv":
        return n - 1
    a = spec.truncation_args
    for _ in range(10_000):  # AlignProp redraws until 1 <= b < N (sd_pipeline.py line 126)
        if spec.truncation == "gaussian":
            b = int(torch.normal(a[0], a[1], (1,), generator=gen))
        elif spec.truncation == "uniform":
            b = int(torch.randint(int(a[0]), int(a[1]), (1,), generator=gen))
        else:
            b = int(a[0])
        if 1 <= b < n:
            return b
    raise ValueError(f"truncation {spec.truncation} {list(a)} never gave an index in [1, {n})")


class _Model:
    """The guided denoiser of one batch: conditioning encoded once, optional checkpointing and reference pass.

    With a text-encoder LoRA the prompts are encoded once with it on (and with grad); the reference pass reuses
    those embeddings, so ``kl`` then regularises the denoiser's LoRA only."""

    def __init__(self, adapter: Adapter, prompts: Sequence[str], spec: GradSpec, hw: Sequence[int]) -> None:
        self.adapter, self.spec = adapter, spec
        info = [default_info(adapter, hw)] * len(prompts)
        text_lora = adapter.trains_text_encoders()
        self.cond, self.uncond = encode_condition(adapter, prompts, info, spec.uncond, grad=text_lora)
        self.kl_sum, self.kl_terms = torch.zeros((), device=adapter.device), 0

    def repeat(self, n: int) -> None:
        """Repeat every row's conditioning ``n`` times (DRaFT-LV's copies), group-major."""
        self.cond = {k: v.repeat_interleave(n, 0) for k, v in self.cond.items()}
        self.uncond = {k: v.repeat_interleave(n, 0) for k, v in self.uncond.items()}

    def __call__(self, x: Tensor, t: Tensor, grad: bool, kl: bool) -> Tensor:
        def run(x_in: Tensor) -> Tensor:
            return guided_output(self.adapter, x_in, t, self.cond, self.uncond, self.spec.guidance_scale)

        if not grad:
            with torch.no_grad():
                return run(x)
        with torch.enable_grad():
            out = checkpoint(run, x, use_reentrant=False) if self.spec.checkpointing else run(x)
        if kl:
            with torch.no_grad(), self.adapter.reference():
                ref = run(x.detach())
            self.kl_sum = self.kl_sum + (out - ref).square().mean()
            self.kl_terms += 1
        return out


def rollout(
    adapter: Adapter,
    prompts: Sequence[str],
    seeds: Sequence[int],
    spec: GradSpec,
    *,
    batch_seed: int,
    kl: bool = False,
) -> Rollout:
    """Sample ``prompts`` with the policy (LoRA on) and decode, keeping the graph where ``spec.method`` says.

    Args:
        seeds: one per prompt: its initial noise and step noise.
        batch_seed: the ReFL step / AlignProp truncation and the DRaFT-LV noise.
        kl: also run the reference at every grad-enabled step (``Rollout.kl``; 0 when False).
    """
    b = len(prompts)
    if len(seeds) != b:
        raise ValueError(f"need one seed per prompt: got {len(seeds)} seeds for {b} prompts")
    device, shape = adapter.device, adapter.latent_shape(spec.resolution)
    sampler = Sampler(adapter, spec.num_steps, spec.eta)
    model = _Model(adapter, prompts, spec, shape[-2:])
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    batch_gen = torch.Generator().manual_seed(int(batch_seed))
    start = grad_start(spec, batch_gen)
    x = draw_noise(gens, shape, device)
    stop = start if spec.method == "refl" else spec.num_steps - (spec.method == "draft_lv")
    for i in range(stop):
        grad = spec.method in ("draft", "alignprop") and i >= start
        noise = draw_noise(gens, shape, device)  # drawn at every step, so the chain does not depend on the method
        out = model(x, sampler.t(i, x.shape[0]), grad, kl)
        x = sampler.step(x if grad else x.detach(), out, i, noise)
    n = 1
    if spec.method == "refl":
        out = model(x, sampler.t(start, b), True, kl)
        latents = sampler.pred_x0(x, out, start)
    elif spec.method == "draft_lv":
        out = model(x, sampler.t(stop, b), False, False)
        x0 = sampler.step(x, out, stop, draw_noise(gens, shape, device)).detach()
        n, last = spec.lv_samples, spec.num_steps - 1
        x0 = x0.repeat_interleave(n, 0)
        eps = torch.randn(x0.shape, generator=batch_gen).to(device)
        x_last = adapter.process.add_noise(x0, eps, sampler.t(last, b * n))
        model.repeat(n)
        out = model(x_last, sampler.t(last, b * n), True, kl)
        step_noise = torch.randn(x0.shape, generator=batch_gen).to(device)
        latents = sampler.step(x_last, out, last, step_noise)
    else:
        latents = x
    images = decode(adapter, latents, use_checkpoint=spec.checkpointing)
    kl_value = model.kl_sum / max(model.kl_terms, 1)
    return Rollout(
        images=images,
        prompts=[p for p in prompts for _ in range(n)],
        n=n,
        kl=kl_value,
        grad_start=start,
        grad_steps=_grad_steps(spec, start),
    )


def _grad_steps(spec: GradSpec, start: int) -> int:
    return spec.num_steps - start if spec.method in ("draft", "alignprop") else 1


# ---- the loss -----------------------------------------------------------------------------------------
def reward_loss(rewards: Tensor, form: str = "relu", margin: float = 2.0, scale: float = 1e-3) -> Tensor:
    """(B,) per-prompt loss of rewards (B,): ``scale * relu(margin - r)`` (ReFL.py lines 755-756: margin 2,
    scale 1e-3) or ``scale * (margin - r)`` (``linear``: DRaFT's -r, AlignProp's ``loss_coeff * (1 - r)``)."""
    if form not in LOSS_FORMS:
        raise ValueError(f"unknown reward loss form {form!r}; choices: {', '.join(LOSS_FORMS)}")
    gap = margin - rewards.float()
    return scale * (torch.relu(gap) if form == "relu" else gap)


def group_mean(values: Tensor, n: int) -> Tensor:
    """(B * n,) -> (B,) mean over each prompt's n copies."""
    return values.float().view(-1, n).mean(1) if n > 1 else values.float()
