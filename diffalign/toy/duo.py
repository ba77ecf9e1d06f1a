"""The duo world: two coloured shapes side by side, 32x32, with a caption that binds colours, shapes and sides.

The compositional toy world (GenEval's "two objects", "colour attribution" and "position" tasks in miniature). A
scene is a ``left`` and a ``right`` object, each ``(colour, shape)``, with ``left.colour != right.colour``, on a flat
grey background. Captions name both objects and their relation, in either order::

    "a red circle to the left of a blue square"      (phrasing "left")
    "a blue square to the right of a red circle"     (phrasing "right", the same scene)

Rendering rules, which ``diffalign.toy.duo_reward`` checks analytically:

* colours are ``world.PALETTE``'s 8 flat RGB values, the background is ``BACKGROUND`` (mid grey, no palette colour);
* the left object's centre is ``(LEFT_X +- JITTER_X, 16 +- JITTER_Y)``, the right one's ``(RIGHT_X +- JITTER_X,
  16 +- JITTER_Y)`` (uniform), each with its own ``r`` uniform in ``[R_MIN, R_MAX]``; the two never overlap;
* shapes are ``world.SHAPES`` drawn by ``world.shape_masks`` (circle radius ``r``, square half-side ``r``, triangle
  apex up), anti-aliased by supersampling.

Pretraining captions are noisy like web alt-text (``noisy_caption``): a ``noise`` fraction of them has one error,
half of them a *binding* error (the caption describes the mirrored scene: colours and shapes on the wrong sides),
the other half a wrong shape word for one object. A base model trained on such data gets sides and shapes wrong
some of the time, which is what preference data can teach it to fix.

Prompts: the 8 x 3 x 7 x 3 = 504 scenes, split once (seeded): ``HELDOUT_COUNT`` held-out scenes for evaluation and
``LABEL_COUNT`` others for labelling preference data, each with one phrasing (alternating, so both relation words
appear); ``prompts("all")`` is every scene in both phrasings (1008 captions).
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffalign.toy import world


SIZE = world.SIZE
COLORS = world.COLORS
SHAPES = world.SHAPES
BACKGROUND = (128, 128, 128)
LEFT_X, RIGHT_X = 8.5, 23.5
JITTER_X, JITTER_Y = 1.5, 4.0
R_MIN, R_MAX = 4.5, 6.0
HELDOUT_COUNT = 48
LABEL_COUNT = 192
SPLIT_SEED = 4321
PHRASINGS = ("left", "right")
_OBJ = r"an? (\w+) (\w+)"
_CAPTION = re.compile(rf"^{_OBJ} to the (left|right) of {_OBJ}$")


@dataclass(frozen=True)
class Scene:
    """Two objects; geometry in pixels (see the module docstring)."""

    left_color: str
    left_shape: str
    right_color: str
    right_shape: str
    left_xy: tuple[float, float] = (LEFT_X, SIZE / 2)
    right_xy: tuple[float, float] = (RIGHT_X, SIZE / 2)
    left_r: float = (R_MIN + R_MAX) / 2
    right_r: float = (R_MIN + R_MAX) / 2

    def __post_init__(self) -> None:
        for name in ("left_color", "right_color"):
            if getattr(self, name) not in COLORS:
                raise ValueError(f"scene {name}={getattr(self, name)!r} is not one of {', '.join(COLORS)}")
        for name in ("left_shape", "right_shape"):
            if getattr(self, name) not in SHAPES:
                raise ValueError(f"scene {name}={getattr(self, name)!r} is not one of {', '.join(SHAPES)}")
        if self.left_color == self.right_color:
            raise ValueError(f"scene objects are both {self.left_color!r}: the two colours must differ")

    @property
    def objects(self) -> tuple[tuple[str, str], tuple[str, str]]:
        return (self.left_color, self.left_shape), (self.right_color, self.right_shape)


def _obj(color: str, shape: str) -> str:
    return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}"


def caption(left: tuple[str, str], right: tuple[str, str], phrasing: str = "left") -> str:
    """``caption(("red", "circle"), ("blue", "square"))`` -> ``"a red circle to the left of a blue square"``;
    ``phrasing="right"`` -> ``"a blue square to the right of a red circle"``."""
    if phrasing == "left":
        return f"{_obj(*left)} to the left of {_obj(*right)}"
    if phrasing == "right":
        return f"{_obj(*right)} to the right of {_obj(*left)}"
    raise ValueError(f"unknown phrasing {phrasing!r}; choices: {', '.join(PHRASINGS)}")


def parse_caption(text: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """A duo caption -> ``((left colour, left shape), (right colour, right shape))``; anything else raises."""
    match = _CAPTION.match(text.strip().lower())
    if match is None:
        raise ValueError(
            f"caption {text!r} is not a duo-world caption like 'a red circle to the left of a blue square'"
        )
    c1, s1, side, c2, s2 = match.groups()
    for c in (c1, c2):
        if c not in COLORS:
            raise ValueError(f"caption {text!r}: colour {c!r} is not one of {', '.join(COLORS)}")
    for s in (s1, s2):
        if s not in SHAPES:
            raise ValueError(f"caption {text!r}: shape {s!r} is not one of {', '.join(SHAPES)}")
    if c1 == c2:
        raise ValueError(f"caption {text!r}: the two objects must have different colours")
    first, second = (c1, s1), (c2, s2)
    return (first, second) if side == "left" else (second, first)


def combinations() -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """All (left, right) object pairs with different colours, in a fixed order (504)."""
    objs = list(itertools.product(COLORS, SHAPES))
    return [(a, b) for a, b in itertools.product(objs, objs) if a[0] != b[0]]


def _split() -> tuple[list[int], list[int]]:
    order = list(range(len(combinations())))
    random.Random(SPLIT_SEED).shuffle(order)
    return sorted(order[:HELDOUT_COUNT]), sorted(order[HELDOUT_COUNT : HELDOUT_COUNT + LABEL_COUNT])


def prompts(split: str = "all") -> list[str]:
    """Captions of ``split``: ``"heldout"`` (48, for evaluation), ``"label"`` (192, for preference data; no scene
    of the held-out split) or ``"all"`` (1008: every scene in both phrasings)."""
    combos = combinations()
    if split == "all":
        return [caption(a, b, p) for a, b in combos for p in PHRASINGS]
    heldout, label = _split()
    if split == "heldout":
        chosen = heldout
    elif split == "label":
        chosen = label
    else:
        raise ValueError(f"unknown prompt split {split!r}; choices: all, heldout, label")
    return [caption(*combos[i], PHRASINGS[k % 2]) for k, i in enumerate(chosen)]


# ---- sampling scenes and captions ---------------------------------------------------------------------------


def sample_scenes(n: int, generator: torch.Generator) -> list[Scene]:
    """``n`` scenes with uniform objects, positions and sizes (``generator`` on the CPU)."""
    combos = combinations()
    idx = torch.randint(len(combos), (n,), generator=generator).tolist()
    geo = torch.rand(n, 6, generator=generator, dtype=torch.float64).tolist()
    scenes = []
    for i, (ux1, uy1, ur1, ux2, uy2, ur2) in zip(idx, geo, strict=True):
        (lc, ls), (rc, rs) = combos[i]
        scenes.append(
            Scene(
                lc, ls, rc, rs,
                left_xy=(LEFT_X + JITTER_X * (2 * ux1 - 1), SIZE / 2 + JITTER_Y * (2 * uy1 - 1)),
                right_xy=(RIGHT_X + JITTER_X * (2 * ux2 - 1), SIZE / 2 + JITTER_Y * (2 * uy2 - 1)),
                left_r=R_MIN + (R_MAX - R_MIN) * ur1,
                right_r=R_MIN + (R_MAX - R_MIN) * ur2,
            )
        )  # fmt: skip
    return scenes


def noisy_caption(scene: Scene, noise: float, generator: torch.Generator, right_share: float = 0.5) -> str:
    """The scene's caption (phrasing "right" with probability ``right_share``, else "left"), or with probability
    ``noise`` one with one error: half binding errors (the mirrored scene's caption), half a wrong shape word for one
    of the two objects."""
    u = torch.rand(4, generator=generator).tolist()
    left, right = scene.objects
    phrasing = PHRASINGS[int(u[0] < right_share)]
    if u[1] >= noise:
        return caption(left, right, phrasing)
    if u[2] < 0.5:
        return caption(right, left, phrasing)
    which = int(u[3] < 0.5)
    color, shape = (left, right)[which]
    others = [s for s in SHAPES if s != shape]
    wrong = (color, others[int(torch.randint(len(others), (1,), generator=generator))])
    return caption(wrong, right, phrasing) if which == 0 else caption(left, wrong, phrasing)


# ---- rendering ----------------------------------------------------------------------------------------------


def render(scenes: Sequence[Scene]) -> torch.Tensor:
    """Images ``(N, 3, SIZE, SIZE)`` in [0, 1] following the rendering rules of the module docstring."""
    if not scenes:
        return torch.empty(0, 3, SIZE, SIZE)
    n = len(scenes)
    shapes = [s.left_shape for s in scenes] + [s.right_shape for s in scenes]
    cx = torch.tensor([s.left_xy[0] for s in scenes] + [s.right_xy[0] for s in scenes])
    cy = torch.tensor([s.left_xy[1] for s in scenes] + [s.right_xy[1] for s in scenes])
    r = torch.tensor([s.left_r for s in scenes] + [s.right_r for s in scenes])
    cover = world.shape_masks(shapes, cx, cy, r).unsqueeze(1)  # (2N, 1, H, W)
    colors = torch.stack([world.rgb(s.left_color) for s in scenes] + [world.rgb(s.right_color) for s in scenes])
    bg = torch.tensor(BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1) / 255.0
    left, right = cover[:n], cover[n:]
    img = bg * (1 - left - right) + left * colors[:n].view(-1, 3, 1, 1) + right * colors[n:].view(-1, 3, 1, 1)
    return img.clamp(0, 1)
