"""Curriculum-DPO's sampler: groups ordered by reward gap into cumulative chunks, the next one unlocked every N steps.

Croitoru et al., CVPR 2025, Curriculum Direct Preference Optimization for Diffusion and Consistency Models
(https://arxiv.org/abs/2405.13637). Read in CroitoruAlin/Curriculum-DPO@3454543:

* ``data/dataset_factory.py`` L129-132: keep pairs whose score gap exceeds a threshold (0.1 by default, 0.02 for
  human / LLaVA-BERTScore rewards, 0.2 for the aesthetic score, L8-16) -> ``min_gap``;
* L141-148: sort by gap, largest first, and keep the first 150k -> ``max_groups``;
* L149-156: chunk ``c`` is the first ``linspace(0, N, chunks + 1)[c + 1]`` pairs (cumulative, easiest = largest
  gap first), ``--no_chunks 6`` (``config/args_sd.py``);
* L165-167 and ``train_stablediffusion.py`` L531-533 / L545: ``update_cl()`` (the next chunk) every
  ``--update_frequency 500`` optimizer steps; the last chunk stays until the end.

Here a "stage" of the sampler is ``batches_per_stage`` global batches (``steps_per_chunk x grad_accum``): stage s
draws from chunk ``min(s, chunks - 1)``, in fresh permutations of that chunk (seeded by seed, stage and pass) until
the stage is full. A stage is one ``GroupSampler`` epoch, so rank slicing, global batches, noise seeds per
(epoch, index) and the exact resume position are the ordinary ones. The authors' dataloader picks up a new chunk
at its next pass over the data; here it changes exactly at the step boundary. The gap of a group is its best score
minus its worst (a pair: winner minus loser), from the data's scores (``data.format: scored_pairs`` or ``ranked``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from diffalign.data.sampler import GroupSampler


def curriculum_order(gaps: Sequence[float], min_gap: float = 0.0, max_groups: int | None = None) -> list[int]:
    """Item indices with ``gap > min_gap``, largest gap first (stable for ties), at most ``max_groups``."""
    kept = [i for i, g in enumerate(gaps) if g > min_gap]
    kept.sort(key=lambda i: -gaps[i])
    return kept if max_groups is None else kept[:max_groups]


def chunk_sizes(num_items: int, chunks: int) -> list[int]:
    """Cumulative chunk sizes ``linspace(0, N, chunks + 1)[1:]`` truncated to int, as the authors' code does."""
    return np.linspace(0, num_items, chunks + 1).astype(np.int32)[1:].tolist()


class CurriculumSampler(GroupSampler):
    """Yields item indices of the current chunk; epoch ``e`` of the sampler is stage ``e`` of the curriculum."""

    def __init__(
        self,
        gaps: Sequence[float],
        per_device_batch_size: int,
        *,
        chunks: int = 6,
        batches_per_stage: int = 500,
        min_gap: float = 0.0,
        max_groups: int | None = None,
        **kwargs,
    ) -> None:
        self.order = curriculum_order(gaps, min_gap, max_groups)
        super().__init__(len(self.order), per_device_batch_size, **kwargs)
        if chunks <= 0 or batches_per_stage <= 0:
            raise ValueError(
                f"curriculum: chunks and batches_per_stage must be > 0; got {chunks}, {batches_per_stage}"
            )
        self.sizes = chunk_sizes(len(self.order), chunks)
        if self.sizes[0] < self.global_batch_size:
            raise ValueError(
                f"curriculum: the first chunk has {self.sizes[0]} groups ({len(self.order)} with gap > {min_gap} "
                f"in {chunks} chunks), fewer than one global batch ({self.global_batch_size})"
            )
        self.batches_per_stage = batches_per_stage

    @property
    def batches_per_epoch(self) -> int:
        return self.batches_per_stage

    def chunk(self, stage: int) -> int:
        """How many groups (the first of ``order``) stage ``stage`` draws from."""
        return self.sizes[min(stage, len(self.sizes) - 1)]

    def permutation(self, epoch: int) -> torch.Tensor:
        """The stage's ``batches_per_stage`` global batches of item indices, identical on every rank."""
        size, gbs = self.chunk(epoch), self.global_batch_size
        per_pass = size // gbs
        picks, passes = [], -(-self.batches_per_stage // per_pass)
        pool = torch.as_tensor(self.order[:size])
        for p in range(passes):
            gen = torch.Generator().manual_seed(self.seed + 1_000_003 * epoch + p)
            perm = torch.randperm(size, generator=gen) if self.shuffle else torch.arange(size)
            picks.append(pool[perm[: per_pass * gbs]])
        return torch.cat(picks)[: self.batches_per_stage * gbs]
