"""GenEval-style detectors for the duo world: is each named object there, of the named shape, on the named side?

For an image ``x`` (resized to 32x32 by area averaging if it is another size) and a duo caption naming a left object
``(c_L, s_L)`` and a right object ``(c_R, s_R)`` (``duo.parse_caption``; both phrasings), the **coverage map** of a
palette colour ``c`` over the grey background ``g`` unmixes each anti-aliased pixel ``p`` (RGB in [0, 1]):
``a = clip((p - g).(c - g) / |c - g|^2, 0, 1)`` (how much of ``c`` is blended in) and
``f_c(p) = a * exp(-|p - g - a (c - g)|^2 / (2 sigma^2))`` (``sigma = 0.15``: zero for pixels off the grey-to-``c``
line, such as another palette colour). A clean object of colour ``c`` gives its exact coverage, edges included.

* **detection** of object ``i``: ``f_i = f_{c_i}`` (the colours differ, so ``f_i`` sees only that object); its
  soft IoU with a clean rendered mask ``T``, ``IoU = sum(f T) / (sum f + sum T - sum(f T))``, maximised over
  ``T`` = every shape at every centre on a 0.5-px grid anywhere between the two sides (``x`` in [6, 26], ``y`` in
  [12, 20]) and ``r`` on a 0.5-px grid in [4, 6.5]: ``present_i`` = that best IoU (a clean object ~1, none ~0);
* **shape** of object ``i``: ``softmax_s(IoU_s / tau)[s_i]`` with ``IoU_s`` the best IoU over masks of shape ``s``
  (``tau = 0.025``): the detector's shape classification, 1/3 when nothing is detected;
* **position**: ``sigmoid((x_R - x_L) / kappa) * g_L * g_R`` with ``x_i`` the centre of mass of ``f_i`` along x
  (``kappa = 1.5`` px) and ``g_i = clip(present_i / 0.5, 0, 1)``: GenEval counts a relation only between detected
  objects (confidence 0.5 here), so a missing object fails it;
* ``color = (present_L + present_R) / 2``, ``shape = (shape_L + shape_R) / 2``;
* ``faithfulness = (color + shape + position) / 3`` in [0, 1] (the reward the duo quickstart aligns to);
* ``correct`` (GenEval's binary score): 1 when both objects are detected (``present_i >= 0.5``), both are classified
  as their named shape (argmax) and ``x_L < x_R``; else 0;
* ``describe`` (no caption needed): the same detectors read the other way, the duo caption of what an image shows
  (DCPO's caption of a rejected image, ``diffalign.label.captions``).

Chance levels for a model that draws the two named colours as clean shapes but ignores shape words and sides:
shape 1/3, position 1/2, correct 1/18 (both shapes and the side right). Everything is a deterministic function of
the pixels, differentiable almost everywhere (``scorer(x, captions, grad=True)``) except ``correct``; results are
``(B,)`` fp32 on the CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from diffalign.toy import duo, reward, world


SIGMA = reward.SIGMA
TAU = 0.025
KAPPA = 1.5
DETECT = 0.5
KINDS = ("faithfulness", "correct", "color", "shape", "position")
PARTS = (*KINDS, "present_left", "present_right", "shape_left", "shape_right")


@functools.lru_cache(maxsize=1)
def templates() -> tuple[torch.Tensor, torch.Tensor]:
    """Clean object masks ``(K, SIZE * SIZE)`` and the shape index of each ``(K,)`` (built once per process)."""
    xs = torch.arange(6.0, 26.0 + 1e-6, 0.5)
    ys = torch.arange(12.0, 20.0 + 1e-6, 0.5)
    radii = torch.arange(4.0, 6.5 + 1e-6, 0.5)
    cy, cx, r = (g.reshape(-1) for g in torch.meshgrid(ys, xs, radii, indexing="ij"))
    masks, kinds = [], []
    for k, shape in enumerate(world.SHAPES):
        for lo in range(0, cx.numel(), 1024):
            sl = slice(lo, lo + 1024)
            masks.append(world.shape_masks([shape] * cx[sl].numel(), cx[sl], cy[sl], r[sl], ss=2).flatten(1))
        kinds.append(torch.full((cx.numel(),), k))
    return torch.cat(masks), torch.cat(kinds)


def coverage(x: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
    """``f_c`` of the module docstring: images (B, 3, H, W), one palette colour per image (B, 3) -> (B, H, W)."""
    g = torch.tensor(duo.BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1) / 255.0
    d = colors.view(-1, 3, 1, 1) - g
    a = (((x - g) * d).sum(1, keepdim=True) / d.square().sum(1, keepdim=True)).clamp(0, 1)
    off = (x - g - a * d).square().sum(1)
    return a.squeeze(1) * torch.exp(-off / (2 * SIGMA**2))


def _per_shape(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For colour maps ``f`` (B, P): the best IoU of each shape (B, len(SHAPES)) and the centre x of ``f`` (B,)."""
    masks, kinds = templates()
    inter = f @ masks.T
    iou = inter / (f.sum(1, keepdim=True) + masks.sum(1) - inter).clamp_min(1e-6)
    per_shape = torch.stack([iou[:, kinds == k].amax(1) for k in range(len(world.SHAPES))], dim=1)
    xs = (torch.arange(duo.SIZE, dtype=torch.float32) + 0.5).repeat(duo.SIZE)  # x of each flattened pixel
    return per_shape, (f * xs).sum(1) / f.sum(1).clamp_min(1e-6)


def _detect(f: torch.Tensor, named: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For colour maps ``f`` (B, P) and named shape indices (B,): presence, shape score, argmax-shape hit, centre x."""
    per_shape, centre = _per_shape(f)
    present = per_shape.amax(1)
    shape = torch.softmax(per_shape / TAU, dim=1).gather(1, named.view(-1, 1)).squeeze(1)
    hit = per_shape.argmax(1) == named
    return present, shape, hit, centre


def components(x: torch.Tensor, captions: Sequence[str]) -> dict[str, torch.Tensor]:
    """Every term of the module docstring for images ``x`` (B, 3, SIZE, SIZE) in [0, 1]; each (B,)."""
    parsed = [duo.parse_caption(c) for c in captions]
    out: dict[str, Any] = {}
    for side, j in (("left", 0), ("right", 1)):
        colors = torch.stack([world.rgb(p[j][0]) for p in parsed])
        named = torch.tensor([world.SHAPES.index(p[j][1]) for p in parsed])
        f = coverage(x, colors).flatten(1)
        out[side] = _detect(f, named)
    (p_l, s_l, h_l, x_l), (p_r, s_r, h_r, x_r) = out["left"], out["right"]
    gate = (p_l / DETECT).clamp(0, 1) * (p_r / DETECT).clamp(0, 1)
    position = torch.sigmoid((x_r - x_l) / KAPPA) * gate
    color = (p_l + p_r) / 2
    shape = (s_l + s_r) / 2
    correct = (p_l >= DETECT) & (p_r >= DETECT) & h_l & h_r & (x_l < x_r)
    return {
        "faithfulness": (color + shape + position) / 3,
        "correct": correct.float(),
        "color": color,
        "shape": shape,
        "position": position,
        "present_left": p_l,
        "present_right": p_r,
        "shape_left": s_l,
        "shape_right": s_r,
    }


def describe(images: Any, like: Sequence[str] | None = None) -> list[str]:
    """What each image actually shows, as a duo caption (the DCPO caption of a rejected image).

    The same detectors as the reward, read without a caption: every palette colour's coverage map gets its best IoU
    per shape (``present`` = the best over shapes); the two colours with the highest ``present`` are the two
    objects, each named by its argmax shape, ordered left to right by the centre x of its coverage. A clean render
    of ``Scene("red", "circle", "blue", "square")`` -> ``"a red circle to the left of a blue square"``; in the
    phrasing of a ``like`` caption that says "to the right of": ``"a blue square to the right of a red circle"``.
    An image with fewer than two objects is still described by its two strongest colours (the detectors' best
    reading; ``components`` would fail its presence).

    ``images``: PIL images or (B, 3, H, W) in [0, 1]; ``like``: one duo caption per image whose relation word to
    use (default "left of"), e.g. the prompt the image was generated for. Deterministic; fp32 on the CPU.
    """
    x = reward.pixels(images)
    n = x.shape[0]
    if like is not None and len(like) != n:
        raise ValueError(f"describe: {len(like)} captions in like= for {n} images")
    phrasings = [_phrasing(text) for text in like] if like is not None else ["left"] * n
    colors = len(world.COLORS)
    palette = torch.stack([world.rgb(c) for c in world.COLORS])  # (C, 3)
    f = coverage(x.repeat_interleave(colors, 0), palette.repeat(n, 1)).flatten(1)
    per_shape, centre = _per_shape(f)
    per_shape, centre = per_shape.view(n, colors, -1), centre.view(n, colors)
    present = per_shape.amax(2)
    out = []
    for i in range(n):
        objs = [
            (world.COLORS[c], world.SHAPES[int(per_shape[i, c].argmax())], float(centre[i, c]))
            for c in present[i].topk(2).indices.tolist()
        ]
        left, right = sorted(objs, key=lambda o: o[2])
        out.append(duo.caption(left[:2], right[:2], phrasings[i]))
    return out


def _phrasing(text: str) -> str:
    duo.parse_caption(text)  # raises on a caption that is not the duo world's
    return "right" if " to the right of " in text.strip().lower() else "left"


class DuoReward(reward.AnalyticScorer):
    """A ``diffalign.scorers`` scorer over the duo world: ``scorer(images, captions) -> (B,)`` (see module doc).

    ``kind``: ``"faithfulness"`` (the reward), ``"correct"`` (GenEval's binary), ``"color"``, ``"shape"`` or
    ``"position"``.
    """

    kinds = KINDS
    parts = PARTS
    label = "duo reward"
    variant = f"duo-world-v1,sigma={SIGMA},tau={TAU},kappa={KAPPA}"
    terms = staticmethod(components)

    def __init__(self, kind: str = "faithfulness", *, batch_size: int = 256) -> None:
        super().__init__(kind, batch_size=batch_size)

    def scorer_name(self, kind: str) -> str:
        return f"duo{kind}"

    def __call__(self, images: Any, prompts: Sequence[str] | None, *, grad: bool = False) -> torch.Tensor:
        if grad and self.kind == "correct":
            raise ValueError("duocorrect is a 0/1 score with no gradient; use duofaithfulness for grad=True")
        return super().__call__(images, prompts, grad=grad)


def load(
    path: str | None = None,
    *,
    kind: str = "faithfulness",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    batch_size: int = 256,
) -> DuoReward:
    """The scorer-module entry point. ``path`` must be None (the detectors have no weights); ``device`` and
    ``dtype`` are accepted like every scorer's and ignored: computed in fp32 on the CPU."""
    if path is not None:
        raise ValueError(f"the duo detectors have no weights; got path={path!r}")
    return DuoReward(kind, batch_size=batch_size)
