"""``duocolor``: duo-world colour detection: the mean soft IoU of the two named objects with their best clean mask, in [0, 1].

No weights; computed analytically from the duo world's rendering rules (``diffalign.toy.duo_reward`` has the
formulas). Captions must be duo-world captions such as ``"a red circle to the left of a blue square"``.
"""

from __future__ import annotations

from typing import Any

from diffalign.toy import duo_reward


def load(path: str | None = None, **kwargs: Any) -> duo_reward.DuoReward:
    """``scorers.load("duocolor")``; takes ``batch_size`` (and ignores ``device`` / ``dtype``: CPU, fp32)."""
    return duo_reward.load(path, kind="color", **kwargs)
