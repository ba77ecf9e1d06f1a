"""The two toy worlds as the quickstart and ``bench/alignment_toy.py`` use them: base, prompts, scorers, configs.

* ``duo`` (the quickstart's default): two shapes side by side (``diffalign.toy.duo``), base ``assets/toy_duo``,
  aligned to ``duofaithfulness`` (GenEval-style detectors, ``diffalign.toy.duo_reward``), evaluated per attribute
  (``duocorrect``, ``duocolor``, ``duoshape``, ``duoposition``); configs ``recipes/configs/duo/<objective>.yaml``.
* ``shapes``: one shape on a coloured background (``diffalign.toy.world``), base ``assets/toy_base``, aligned to
  ``toyreward`` (faithfulness x a preference for large objects); configs ``recipes/configs/toy/<objective>_world.yaml``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffalign import resources


@dataclass(frozen=True)
class ToyWorld:
    """What differs between the toy worlds for labelling, training and evaluation."""

    name: str
    base: Path
    prompt_splits: Callable[[str], list[str]]
    reward: str  # the scorer the labels (and online objectives) use: what is aligned to
    scorers: tuple[str, ...]  # evaluation columns, ``reward`` first
    config_pattern: str  # ``{objective}`` -> a config name under recipes/configs
    secondary: str  # the column the alignment table shows beside the reward
    describe: Callable[[Sequence[Any], Sequence[str]], list[str]] | None = None  # images, prompts -> what they show

    def caption_writer(self) -> Callable[[Sequence[Any], Sequence[str]], list[str]]:
        """The world's ``describe`` (DCPO's caption of a rejected image); a world without one raises."""
        if self.describe is None:
            raise ValueError(
                f"the {self.name} world has no caption writer (DCPO's per-image captions): use --world duo"
            )
        return self.describe

    def config(self, objective: str) -> str:
        return self.config_pattern.format(objective=objective)

    def prompts(self, split: str) -> list[str]:
        return self.prompt_splits(split)

    def column(self, scorer: str) -> str:
        """A scorer's short column name: ``duoshape`` -> ``shape``, ``toyfaithfulness`` -> ``faithfulness``."""
        return scorer.removeprefix(self.name).removeprefix("toy")


def _shapes_prompts(split: str) -> list[str]:
    from diffalign.toy import world

    return world.prompts(split)


def _duo_prompts(split: str) -> list[str]:
    from diffalign.toy import duo

    return duo.prompts(split)


def _duo_describe(images: Sequence[Any], prompts: Sequence[str]) -> list[str]:
    from diffalign.toy import duo_reward

    return duo_reward.describe(images, prompts)


WORLDS = {
    "duo": ToyWorld(
        name="duo",
        base=resources.ASSETS / "toy_duo",
        prompt_splits=_duo_prompts,
        reward="duofaithfulness",
        scorers=("duofaithfulness", "duocorrect", "duocolor", "duoshape", "duoposition"),
        config_pattern="duo/{objective}",
        secondary="duocorrect",
        describe=_duo_describe,
    ),
    "shapes": ToyWorld(
        name="shapes",
        base=resources.ASSETS / "toy_base",
        prompt_splits=_shapes_prompts,
        reward="toyreward",
        scorers=("toyreward", "toyfaithfulness", "toyprominence"),
        config_pattern="toy/{objective}_world",
        secondary="toyfaithfulness",
    ),
}


def get(name: str) -> ToyWorld:
    if name not in WORLDS:
        raise ValueError(f"unknown toy world {name!r}; choices: {', '.join(WORLDS)}")
    return WORLDS[name]
