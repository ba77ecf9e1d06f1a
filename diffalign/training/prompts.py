"""The prompt source of the recipes that sample from prompts (stepwise_pref, online_rl, reward_grad).

``read_prompts`` reads the ``data`` section (``config.common.PromptDataConfig``) through ``diffalign.eval.prompts``;
``PromptOrder`` maps a global prompt position to a prompt through one seeded permutation per epoch
(``diffalign.sampling.seeds``), which is what makes N processes see the prompts one process would, and a resumed run
the prompts of an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch

from diffalign.config.engine import ConfigError
from diffalign.eval.prompts import load_prompts
from diffalign.sampling import seeds


def read_prompts(data: Any) -> list[str]:
    """The prompts of a ``PromptDataConfig`` (``prompts``, ``key``, ``max_prompts``); none is a ``ConfigError``."""
    records = load_prompts(data.prompts, key=data.key, limit=data.max_prompts)
    if not records:
        raise ConfigError(f"data.prompts={data.prompts!r} holds no prompts")
    return [r.prompt for r in records]


class PromptOrder:
    """Global prompt position -> prompt: a fresh permutation of ``prompts`` per epoch, drawn from
    ``(seed, epoch, salt)``, so a position names the same prompt on any number of processes and after a resume."""

    def __init__(self, prompts: list[str], seed: int, salt: int) -> None:
        if not prompts:
            raise ValueError("PromptOrder needs at least one prompt")
        self.prompts, self.seed, self.salt = list(prompts), int(seed), int(salt)
        self._orders: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.prompts)

    def index(self, position: int) -> int:
        """The prompt list index of global ``position``."""
        n = len(self.prompts)
        epoch = position // n
        if epoch not in self._orders:
            self._orders[epoch] = torch.randperm(n, generator=seeds.generator(self.seed, epoch, self.salt))
        return int(self._orders[epoch][position % n])

    def __getitem__(self, position: int) -> str:
        return self.prompts[self.index(position)]
