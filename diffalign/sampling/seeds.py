"""Seed derivation for the sampling recipes: one mixing function and the named salts that keep streams apart.

Every random draw of a recipe that samples from prompts is seeded by ``mixed_seed(run seed, counter..., salt)``:
the counters (epoch, global prompt position, round, micro-batch) make a draw a function of *where* it is in the run,
not of how many processes share it or whether the run was resumed; the salt keeps two purposes that share counters
(a prompt order and a noise draw at the same position) from sharing a stream. The values are part of every run's
numbers: changing one changes every sample a recipe draws, so they are fixed here, once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


# stepwise_pref: the epoch's prompt order, each prompt's sampling noise, the shuffle of a mining round's pairs
PAIR_PROMPT_ORDER, PAIR_NOISE, PAIR_SHUFFLE = 11, 12, 13
# online_rl and reward_grad: the epoch's prompt order, each sample's noise, and one draw per round / micro-batch
# (online_rl: the trained steps of a round; reward_grad: the ReFL step, AlignProp truncation and DRaFT-LV noise)
PROMPT_ORDER, SAMPLE_NOISE, ROUND_DRAW = 21, 22, 23
# online_rl with online.same_latent: the one initial noise a prompt's group shares (counter: the global prompt position)
GROUP_NOISE = 24


def mixed_seed(*values: int) -> int:
    """A 63-bit seed mixed from integers with numpy's SeedSequence."""
    state = np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def generator(*values: int) -> torch.Generator:
    """A CPU generator seeded with ``mixed_seed(*values)``."""
    return torch.Generator().manual_seed(mixed_seed(*values))


def draw_noise(
    generators: Sequence[torch.Generator], shape: Sequence[int], device: torch.device | str
) -> torch.Tensor:
    """(B, *shape) fp32: one CPU draw per sample from its own generator (independent of batching and device)."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(device)
