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


def read_edit_prompts(data: Any) -> tuple[list[str], list[torch.Tensor]]:
    """Editing families: the prompts of a ``.jsonl`` prompts file and each one's source image, the path under
    ``data.source_image_column`` (relative to the file), as (3, R, R) pixels in [-1, 1] at ``data.resolution``
    (shortest side resized, centre crop, no flip: ``data.transforms.JointTransform``). A bad line is a ``ConfigError``
    naming the file, the line and the fix."""
    import json
    from pathlib import Path

    from diffalign import resources
    from diffalign.data.records import decode_image
    from diffalign.data.transforms import JointTransform

    path = Path(resources.resolve(data.prompts))
    column, key = data.source_image_column, data.key or "prompt"
    if path.suffix != ".jsonl" or not path.is_file():
        raise ConfigError(
            f"data.prompts={data.prompts!r}: editing prompts are a .jsonl file with {key!r} and {column!r}"
        )
    transform = JointTransform(resolution=data.resolution, hflip_prob=0.0)
    prompts, sources = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get(key), str) or not isinstance(row.get(column), str):
            raise ConfigError(f"{path}:{n}: need a string {key!r} and a source image path {column!r} on every line")
        try:
            image = decode_image(row[column], base_dir=str(path.parent))
        except ValueError as e:
            raise ConfigError(f"{path}:{n}: {column}={row[column]!r}: {e}") from e
        prompts.append(row[key])
        sources.append(transform([image])[0][0])
        if data.max_prompts is not None and len(prompts) >= data.max_prompts:
            break
    if not prompts:
        raise ConfigError(f"data.prompts={data.prompts!r} holds no prompts")
    return prompts, sources
