"""The toy reward: prompt faithfulness checked analytically from the rendering rules, times a size preference.

For an image ``x`` (resized to 32x32 by area averaging if it is another size) and a caption naming
``(fg, shape, bg)`` (``world.parse_caption``), with the colour similarity of a pixel ``p`` to a palette colour
``c``: ``sim_c(p) = exp(-|p - c|^2 / (2 sigma^2))`` (RGB in [0, 1], ``sigma = 0.15``):

* ``background`` = mean of ``sim_bg`` over the ``FRAME``-pixel border ring (never covered by an object);
* ``object`` = the best soft IoU between the foreground map ``f = sim_fg`` and a clean rendered object mask
  ``T`` (any shape, centre on a 0.5-px grid within the jitter range, ``r`` on a 0.5-px grid in
  ``[R_MIN, R_MAX]``): ``IoU = sum(f T) / (sum f + sum T - sum(f T))``. A clean object of the named colour
  gives ~1, a wrongly coloured one ~0;
* ``shape`` = ``softmax_s(IoU_s / tau)[named shape]`` with ``IoU_s`` the best IoU over masks of shape ``s``
  (``tau = 0.05``); 1/3 when there is no object of the named colour;
* ``faithfulness = (background + object + shape) / 3`` in [0, 1];
* ``prominence`` = ``(r_est - R_MIN) / (R_MAX - R_MIN)`` clipped to [0, 1], with ``r_est = sqrt(sum f / k)``
  and ``k`` the area of the named shape at ``r = 1`` (circle pi, square 4, triangle 2): how large the object is;
* ``reward = faithfulness * (0.5 + 0.5 * prominence)``: a user who wants what the caption says, and who prefers
  the object large. Captions never mention size, so the data (and a base model trained on it) draws sizes
  uniformly: the base gets faithfulness mostly right and the size preference half right.

All values are deterministic functions of the pixels; the result is ``(B,)`` fp32 on the CPU, higher = better.
Every term is differentiable in the pixels almost everywhere (the maxima pass the gradient of the best template),
so ``scorer(x, captions, grad=True)`` gives reward gradients for a ``(B, 3, H, W)`` tensor ``x``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from diffalign.toy import world


SIGMA = 0.15
TAU = 0.05
GRID_STEP = 0.5
KINDS = ("reward", "faithfulness", "prominence")
SHAPE_AREA = {"circle": math.pi, "square": 4.0, "triangle": 2.0}


@functools.lru_cache(maxsize=1)
def templates() -> tuple[torch.Tensor, torch.Tensor]:
    """Clean object masks ``(K, SIZE * SIZE)`` and the shape index of each ``(K,)`` (built once per process)."""
    centres = torch.arange(-world.JITTER, world.JITTER + 1e-6, GRID_STEP) + world.SIZE / 2
    radii = torch.arange(world.R_MIN, world.R_MAX + 1e-6, GRID_STEP)
    cy, cx, r = (g.reshape(-1) for g in torch.meshgrid(centres, centres, radii, indexing="ij"))
    masks, kinds = [], []
    for k, shape in enumerate(world.SHAPES):
        for lo in range(0, cx.numel(), 512):
            sl = slice(lo, lo + 512)
            m = world.shape_masks([shape] * cx[sl].numel(), cx[sl], cy[sl], r[sl], ss=2)
            masks.append(m.flatten(1))
        kinds.append(torch.full((cx.numel(),), k))
    return torch.cat(masks), torch.cat(kinds)


def pixels(images: Any, *, grad: bool = False) -> torch.Tensor:
    """A checked batch (PIL list or (B, 3, H, W) in [0, 1]) -> (B, 3, SIZE, SIZE) fp32 on the CPU (``grad``: the
    graph back to a tensor input is kept)."""
    import numpy as np

    if isinstance(images, torch.Tensor):
        x = (images if grad else images.detach()).float().cpu().clamp(0, 1)
    else:
        arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    if x.shape[-2:] != (world.SIZE, world.SIZE):
        x = F.interpolate(x, size=(world.SIZE, world.SIZE), mode="area")
    return x


def _similarity(x: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
    """``sim_c(p)`` for each image's own colour: x (B, 3, H, W), colors (B, 3) -> (B, H, W)."""
    d2 = (x - colors.view(-1, 3, 1, 1)).square().sum(1)
    return torch.exp(-d2 / (2 * SIGMA**2))


def components(x: torch.Tensor, captions: Sequence[str]) -> dict[str, torch.Tensor]:
    """Every term of the module docstring for images ``x`` (B, 3, SIZE, SIZE) in [0, 1]; each (B,)."""
    parsed = [world.parse_caption(c) for c in captions]
    fg = torch.stack([world.rgb(p[0]) for p in parsed])
    bg = torch.stack([world.rgb(p[2]) for p in parsed])
    named = torch.tensor([world.SHAPES.index(p[1]) for p in parsed])
    ring = torch.ones(world.SIZE, world.SIZE, dtype=torch.bool)
    ring[world.FRAME : -world.FRAME, world.FRAME : -world.FRAME] = False
    background = _similarity(x, bg)[:, ring].mean(1)
    f = _similarity(x, fg).flatten(1)  # (B, P)
    masks, kinds = templates()
    inter = f @ masks.T  # (B, K)
    iou = inter / (f.sum(1, keepdim=True) + masks.sum(1) - inter).clamp_min(1e-6)
    per_shape = torch.stack([iou[:, kinds == k].amax(1) for k in range(len(world.SHAPES))], dim=1)
    shape = torch.softmax(per_shape / TAU, dim=1).gather(1, named.view(-1, 1)).squeeze(1)
    obj = per_shape.amax(1)
    faithfulness = (background + obj + shape) / 3
    area = torch.tensor([SHAPE_AREA[p[1]] for p in parsed])
    r_est = (f.sum(1) / area).sqrt()
    prominence = ((r_est - world.R_MIN) / (world.R_MAX - world.R_MIN)).clamp(0, 1)
    return {
        "reward": faithfulness * (0.5 + 0.5 * prominence),
        "faithfulness": faithfulness,
        "prominence": prominence,
        "background": background,
        "object": obj,
        "shape": shape,
    }


class AnalyticScorer:
    """The ``diffalign.scorers`` plumbing the toy worlds' analytic rewards share: input checks, batching, the
    ``grad=True`` path and the result device. A subclass sets ``kinds`` (what ``kind`` may name), ``parts`` (every
    key ``terms`` returns, for an empty batch), ``label`` (for messages), ``variant`` and ``terms(x, captions)``."""

    needs_prompts = True
    kinds: tuple[str, ...] = ()
    parts: tuple[str, ...] = ()
    label = ""
    variant = ""

    def __init__(self, kind: str, *, batch_size: int = 256) -> None:
        if kind not in self.kinds:
            raise ValueError(f"unknown {self.label} kind {kind!r}; choices: {', '.join(self.kinds)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.kind = kind
        self.name = self.scorer_name(kind)
        self.batch_size = batch_size
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    @staticmethod
    def terms(x: torch.Tensor, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def scorer_name(self, kind: str) -> str:
        raise NotImplementedError

    def __call__(self, images: Any, prompts: Sequence[str] | None, *, grad: bool = False) -> torch.Tensor:
        return self.components(images, prompts, grad=grad)[self.kind]

    def components(self, images: Any, prompts: Sequence[str] | None, *, grad: bool = False) -> dict[str, torch.Tensor]:
        """All terms, each ``(B,)`` fp32 on the CPU; ``grad=True`` (tensor images only) keeps the autograd graph and
        returns them on ``images.device`` (computed on the CPU)."""
        from diffalign.scorers.base import check_images, check_prompts

        n = check_images(images)
        if grad and not isinstance(images, torch.Tensor):
            raise TypeError("grad=True needs images as one (B, 3, H, W) float tensor in [0, 1], not PIL images")
        texts = check_prompts(prompts, n, required=True)
        parts: list[dict[str, torch.Tensor]] = []
        with torch.enable_grad() if grad else torch.no_grad():
            for lo in range(0, n, self.batch_size):
                hi = min(n, lo + self.batch_size)
                parts.append(self.terms(pixels(images[lo:hi], grad=grad), texts[lo:hi]))
            if not parts:
                return {k: torch.empty(0) for k in self.parts}
            device = images.device if grad else torch.device("cpu")
            return {k: torch.cat([p[k] for p in parts]).to(device) for k in parts[0]}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, variant={self.variant!r})"


class ToyReward(AnalyticScorer):
    """A ``diffalign.scorers`` scorer over the toy world: ``scorer(images, captions) -> (B,)`` (see module doc).

    ``kind``: ``"reward"`` (the preference the quickstart aligns to), ``"faithfulness"`` or ``"prominence"``.
    """

    kinds = KINDS
    parts = (*KINDS, "background", "object", "shape")
    label = "toy reward"
    variant = f"toy-world-v1,sigma={SIGMA},tau={TAU}"
    terms = staticmethod(components)

    def __init__(self, kind: str = "reward", *, batch_size: int = 256) -> None:
        super().__init__(kind, batch_size=batch_size)

    def scorer_name(self, kind: str) -> str:
        return "toyreward" if kind == "reward" else f"toy{kind}"


def load(
    path: str | None = None,
    *,
    kind: str = "reward",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    batch_size: int = 256,
) -> ToyReward:
    """The scorer-module entry point. ``path`` must be None (the reward has no weights); ``device`` and ``dtype`` are
    accepted like every scorer's and ignored: the reward is cheap and computed in fp32 on the CPU."""
    if path is not None:
        raise ValueError(f"the toy reward has no weights; got path={path!r}")
    return ToyReward(kind, batch_size=batch_size)
