"""A label-balanced version of ``GroupSampler`` for unpaired binary feedback (Diffusion-KTO).

Diffusion-KTO draws its training images with ``torch.utils.data.WeightedRandomSampler(weights, len(data))``
(with replacement) where an image of class c weighs ``N / count_c * ratio_c``, ``ratio_1 = positive_ratio`` and
``ratio_0 = 1 - positive_ratio`` (jacklishufan/diffusion-kto ``train_kto_sd_v1.5.py`` L726-741, L1186-1189;
``--positive_ratio 0.8`` in ``exps/example.sh``), so a drawn image is desirable with probability
``positive_ratio`` whatever the class sizes.

``BalancedSampler`` makes the same draw (``num_items`` indices with replacement from those weights) from a
generator seeded by ``seed + epoch``, identical on every rank; the draw then plays the role of
``GroupSampler``'s permutation, so rank slicing, global batches and the exact resume position are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffalign.data.sampler import GroupSampler


def class_weights(labels: Sequence[bool], positive_ratio: float) -> torch.Tensor:
    """Per-item weights (float64) with total mass ``positive_ratio`` on the desirable items."""
    if not 0.0 <= positive_ratio <= 1.0:
        raise ValueError(f"positive_ratio must be in [0, 1], got {positive_ratio}")
    mask = torch.as_tensor(list(labels), dtype=torch.bool)
    n_pos, n_neg = int(mask.sum()), int((~mask).sum())
    if (n_pos == 0 and positive_ratio > 0) or (n_neg == 0 and positive_ratio < 1):
        raise ValueError(
            f"positive_ratio={positive_ratio} needs both classes, but the data has {n_pos} desirable and "
            f"{n_neg} undesirable images"
        )
    pos = positive_ratio / max(n_pos, 1)
    neg = (1.0 - positive_ratio) / max(n_neg, 1)
    return torch.where(mask, torch.tensor(pos, dtype=torch.float64), torch.tensor(neg, dtype=torch.float64))


class BalancedSampler(GroupSampler):
    """``GroupSampler`` whose epoch order is a weighted draw with replacement (see the module docstring)."""

    def __init__(self, labels: Sequence[bool], positive_ratio: float, per_device_batch_size: int, **kwargs) -> None:
        super().__init__(len(labels), per_device_batch_size, **kwargs)
        self.positive_ratio = positive_ratio
        self.weights = class_weights(labels, positive_ratio)

    def permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.multinomial(self.weights, self.num_items, replacement=True, generator=gen)
