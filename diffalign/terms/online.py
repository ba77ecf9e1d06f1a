"""Online RL terms: the update's log-probability of stored rollout transitions, and which steps a round trains.

The rollouts themselves (Flow-GRPO, DanceGRPO, MixGRPO and DDPO SDE sampling with per-step log-probabilities) are
``diffalign.sampling.sde``; ``transition_log_prob`` re-evaluates a stored transition ``x_j -> x_{j+1}`` under the
policy as it is now through the same ``sde_step`` and the same guided forward, so the first ratio of an update is
exactly 1. The last (sigma -> 0) step is never trained (``train_steps``).

Shapes: latents (B, C, h, w) fp32; log-probs (B,) fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffalign.models.base import Adapter, Cond
from diffalign.sampling.guidance import guided_output
from diffalign.sampling.sde import Grid, SDESpec, StepOut, sde_step


STEP_MODES = ("fraction", "window")


def transition_log_prob(
    adapter: Adapter,
    grid: Grid,
    spec: SDESpec,
    x: Tensor,
    x_next: Tensor,
    step: int,
    cond: Cond,
    uncond: Cond | None,
    *,
    guidance_scale: float = 1.0,
    detach_uncond: bool = False,
) -> StepOut:
    """The update's log-density of stored transitions ``x -> x_next`` at grid step ``step`` under ``adapter`` as it
    is now (with grad when enabled; under ``adapter.reference()`` for the KL term)."""
    t = grid.timesteps[step].to(x.device).expand(x.shape[0])
    out = guided_output(adapter, x, t, cond, uncond, guidance_scale, detach_uncond=detach_uncond)
    return sde_step(grid, spec, out, x, step, prev_sample=x_next)


def train_steps(
    num_steps: int,
    *,
    mode: str = "fraction",
    fraction: float = 0.99,
    shuffle: bool = False,
    window: tuple[int, int] = (0, 4),
    generator: torch.Generator | None = None,
) -> Tensor:
    """(k,) long: the grid steps an iteration trains. The last step (to sigma -> 0) is never among them.

    ``fraction``: ``k = min(int(N fraction), N - 1)`` steps, the first k in order (Flow-GRPO ``train_sd3.py:345,864``:
    int(10 * 0.99) = 9), or with ``shuffle`` a random k of the N - 1 candidates in random order (DanceGRPO
    ``train_grpo_flux.py:551-572``: int(16 * 0.6) = 9 of 15). ``window=(start, size)``: steps
    ``[start, min(start + size, N - 1))`` (MixGRPO's SDE window; ``window_start`` moves it).
    """
    if mode not in STEP_MODES:
        raise ValueError(f"unknown step mode {mode!r}; choices: {', '.join(STEP_MODES)}")
    if num_steps < 2:
        raise ValueError(f"num_steps={num_steps}: training needs >= 2 steps (the last one is never trained)")
    last = num_steps - 1
    if mode == "window":
        start, size = window
        if not 0 <= start < last or size < 1:
            raise ValueError(f"window {window} must start in [0, {last}) and have size >= 1")
        return torch.arange(start, min(start + size, last))
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction} must be in (0, 1]")
    k = max(1, min(int(num_steps * fraction), last))
    if not shuffle:
        return torch.arange(k)
    return torch.randperm(last, generator=generator)[:k]


def window_start(
    iteration: int, *, num_steps: int, stride: int, interval: int, init: int = 0, size: int = 1, partial: bool = False
) -> int:
    """MixGRPO's progressive window (``fastvideo/utils/grpo_states.py:85-148``) as a function of the iteration.

    The start moves by ``stride`` every ``interval`` iterations and rolls back to ``init`` once it passes its last
    position. ``partial=False``: the last position is the last start of a FULL window of ``size`` steps inside the
    trainable steps (0 .. N - 2), so every window is full. ``partial=True``: MixGRPO's own walk, which goes on into
    the shortened windows at the end of the grid (``get_current_timesteps``, ``grpo_states.py:138-148``:
    ``range(cur, min(cur + size, max))``, and the roll-back only once ``cur > max``, ``:92-97``) while at least one
    step is left: the last start is N - 2. (Their walk also visits ``cur = max``, a window with no step, whose
    optimizer step has no gradient; that one is skipped here.) Stateless, so a resumed run finds the same window.
    """
    last = num_steps - 2 if partial else num_steps - 1 - size  # the largest start
    if stride < 1 or interval < 1 or size < 1 or not 0 <= init <= last:
        raise ValueError(f"need stride, interval, size >= 1 and 0 <= init <= {last}")
    positions = (last - init) // stride + 1
    return init + ((iteration // interval) % positions) * stride
