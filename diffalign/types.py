"""The shared vocabulary: per-sample ELBO terms, loss outputs, samples and batches.

Everything here is a plain container. Losses consume ``PairTerms`` / ``ListTerms`` and return
``LossOutput``; the data pipeline produces ``Batch``; model adapters read ``SampleInfo``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor


@dataclass(frozen=True)
class PairTerms:
    """Per-sample denoising errors for (preferred, rejected) pairs sharing noise and timestep.

    Shapes: every error tensor is (B,) in fp32, the mean over C,H,W of (prediction - target)^2.
    ``ref_*`` is None when the objective does not need the reference pass.
    ``timesteps`` (B,) are in model units (0..num_train_timesteps). ``pred_*`` / ``target_*`` are the
    raw (B, C, H, W) policy predictions and targets; they are filled only when an objective asks for
    them (``REQUIRES`` contains ``"pred"``), e.g. SDPO's output-space safeguard. ``gap_w`` (B,) is the mean over
    C,H,W of (policy prediction - reference prediction)^2 on the preferred image, WITH gradient through the
    policy; filled only for ``REQUIRES`` containing ``"gap"`` (DSPO). ``ref_pred_w`` (B, C, H, W): the reference's raw
    prediction on the preferred image (no grad); filled only for ``"ref_pred"`` (DSPO's SD1.5 form in the authors'
    arithmetic order).
    """

    policy_w: Tensor
    policy_l: Tensor
    ref_w: Tensor | None = None
    ref_l: Tensor | None = None
    timesteps: Tensor | None = None
    num_train_timesteps: int = 1000
    pred_w: Tensor | None = None
    pred_l: Tensor | None = None
    target_w: Tensor | None = None
    target_l: Tensor | None = None
    gap_w: Tensor | None = None
    ref_pred_w: Tensor | None = None


@dataclass(frozen=True)
class UnpairedTerms:
    """Per-image denoising errors for unpaired binary feedback (Diffusion-KTO): each image is its own sample.

    Shapes: ``policy``, ``ref``, ``labels``, ``timesteps`` are (B,); errors fp32 (mean over C,H,W of the
    squared error), ``labels`` bool (True = desirable). Every image has its OWN noise draw and timestep.
    ``reduce_sum`` sums a tensor over all data-parallel processes (None: a single process); objectives use it
    for batch statistics that must cover the global batch (KTO's reference point). ``policy_mismatched`` /
    ``ref_mismatched`` (B,), no grad: the same images, noise and timesteps conditioned on the previous row's prompt
    (prompts rolled by one); filled only for ``REQUIRES`` containing ``"mismatched"`` (KTO's mismatched KL estimate).
    """

    policy: Tensor
    labels: Tensor
    ref: Tensor | None = None
    timesteps: Tensor | None = None
    num_train_timesteps: int = 1000
    reduce_sum: Callable[[Tensor], Tensor] | None = None
    policy_mismatched: Tensor | None = None
    ref_mismatched: Tensor | None = None


@dataclass(frozen=True)
class ListTerms:
    """Per-sample denoising errors for K candidates per prompt (ranked lists).

    Shapes: ``policy``, ``ref``, ``scores`` are (B, K); higher score = more preferred.
    All K candidates of a row share one noise draw and one timestep.
    """

    policy: Tensor
    scores: Tensor
    ref: Tensor | None = None
    timesteps: Tensor | None = None
    num_train_timesteps: int = 1000


@dataclass(frozen=True)
class LossOutput:
    """A scalar loss (the only thing back-propagated) and detached scalar metrics for logging.

    ``samples``: detached per-sample values (one per pair, image or ranked pair) behind some metrics, e.g. the
    implicit reward margin, KTO's z, DSPO's c, SmPO's scale; the offline recipe draws them as histograms.
    """

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    samples: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class SampleInfo:
    """Per-group geometry recorded by the transforms; SDXL turns it into ``add_time_ids``.

    All sizes are (height, width) in pixels. One ``SampleInfo`` per group: the K images of a group
    are resized, cropped and flipped jointly, so they share it.
    """

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]


@dataclass
class Batch:
    """A collated batch of groups (K=2 for pairs, winner first).

    Shapes: ``pixels`` (B, K, 3, H, W) in [-1, 1], or ``latents`` (B, K, C, h, w) when read from the
    latent cache; ``scores`` (B, K) or None (pairs are ordered winner-first and need no scores).
    ``prompt_embeds`` holds cached prompt embeddings keyed by the adapter's names, or None.
    ``image_prompts``: one caption per image, (B lists of K), when each image has its own (DCPO); else None.
    ``source_pixels``: the source image each group's K images edit (editing families), else None.
    """

    prompts: list[str]
    info: list[SampleInfo]
    pixels: Tensor | None = None
    latents: Tensor | None = None
    scores: Tensor | None = None
    prompt_embeds: dict[str, Tensor] | None = None
    image_prompts: list[list[str]] | None = None
    source_pixels: Tensor | None = None  # editing: one source image per group (B, 3, H, W) in [-1, 1]

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True)
class StepTerms:
    """Per-pair log-densities of two sampler transitions (step-level preference: SPO, LPO).

    A pair is one parent ``x_t`` and two children ``x_{t-1}`` (preferred ``w``, rejected ``l``) drawn from the
    same DDIM (eta=1) step. ``policy_*`` / ``ref_*`` are (B,) fp32: the Gaussian log-density of the child under
    the policy's (resp. reference's) transition ``N(mu(x_t, t, c), std_t^2)``, averaged over C,h,w (as in the
    SPO / LPO code). ``ref_*`` is None when the objective does not need the reference pass.
    ``timesteps`` (B,) are the parents' model-unit timesteps.
    """

    policy_w: Tensor
    policy_l: Tensor
    ref_w: Tensor | None = None
    ref_l: Tensor | None = None
    timesteps: Tensor | None = None
    num_train_timesteps: int = 1000


@dataclass(frozen=True)
class PolicyTerms:
    """Per-sample transition log-probabilities at one trained sampler step (online RL: GRPO, DDPO).

    ``policy`` (B,) fp32 with grad: the log-density of the stored transition ``x_j -> x_{j+1}`` under the policy as
    it is now; ``old`` (B,): the same under the rollout policy (stored at sampling time, no grad); both averaged
    over C,h,w. ``advantages`` (B,). ``mask`` (B,) bool: rows that count (None: all). For the optional KL to the
    reference: ``policy_mean`` / ``ref_mean`` (B, C, h, w), the transition means with the LoRA on / off, and
    ``kl_scale`` (B,) or (B, 1, 1, 1), the std the KL divides by (``diffalign.sampling.sde.StepOut.kl_scale``).
    """

    policy: Tensor
    old: Tensor
    advantages: Tensor
    mask: Tensor | None = None
    policy_mean: Tensor | None = None
    ref_mean: Tensor | None = None
    kl_scale: Tensor | None = None
    # GRPO-Guard (diffalign.losses.grpo ratio_norm / grad_reweight): the rollout's transition mean (B, C, h, w), the
    # transition std (B, 1, 1, 1) and the step's |dt| (B,)
    old_mean: Tensor | None = None
    step_std: Tensor | None = None
    step_dt: Tensor | None = None
