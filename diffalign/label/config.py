"""What a labelling run is made of: generators, the sampling protocol, the ranking rule and the output layout.

Everything that decides the images and the raw scores (generators, protocol, K, seed, scorers, shard size) is the
run's *generation* fingerprint: a resumed run must match it exactly. The ranking rule, the pair selection and the
JPEG quality only decide how the stored raw scores are turned into datasets; changing them on a re-run rewrites
the published datasets from the record log without generating anything (see ``pipeline.label``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from diffalign import registry
from diffalign.errors import UserError


RANKINGS = ("win_fraction", "zscore", "raw")
PAIR_MODES = ("best_worst", "all")
GENERATOR_KEYS = ("name", "family", "path", "lora", "lora_scale", "vae", "dtype", "images")
PROTOCOL_KEYS = {  # generator-spec key -> SamplingProtocol field ("resolution" sets height and width)
    "steps": "steps",
    "cfg": "guidance_scale",
    "guidance_scale": "guidance_scale",
    "height": "height",
    "width": "width",
    "resolution": "resolution",
    "scheduler": "scheduler",
    "negative_prompt": "negative_prompt",
}


class LabelError(UserError, ValueError):
    """A user-facing labelling problem (bad generator spec, a resumed run that does not match, a bad score)."""


@dataclass(frozen=True, kw_only=True)
class SamplingProtocol:
    """How every image is sampled: sampler, steps, CFG scale, size. ``scheduler=None`` keeps the checkpoint's;
    ``height``/``width`` None use the model's default size (``sample_size * vae_scale_factor``)."""

    steps: int = 25
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    scheduler: str | None = None
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise LabelError(f"protocol steps must be >= 1, got {self.steps}")
        if not math.isfinite(self.guidance_scale):
            raise LabelError(f"protocol guidance_scale must be finite, got {self.guidance_scale}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise LabelError(f"protocol {name} must be a positive multiple of 8, got {value}")


@dataclass(frozen=True, kw_only=True)
class Generator:
    """One image source: a base model (``family`` + hub id or diffusers folder) with an optional LoRA folder.

    ``images``: this generator's share of the K images per prompt (None: K is split evenly, the first generators
    taking the remainder). ``protocol``: overrides the run's protocol for this generator (e.g. its own CFG scale).
    Generators with the same base (family, path, dtype, vae) share one copy of the weights; their LoRAs are
    switched per call.
    """

    name: str
    family: str
    path: str
    lora: str | None = None
    lora_scale: float = 1.0
    vae: str | None = None
    dtype: str = "fp32"
    images: int | None = None
    protocol: SamplingProtocol | None = None

    def __post_init__(self) -> None:
        from diffalign.models import FAMILIES, VIDEO_FAMILIES
        from diffalign.models.base import DTYPES

        if not self.name or any(c in self.name for c in "\n\r"):
            raise LabelError(f"generator name must be a non-empty single line, got {self.name!r}")
        if self.family not in FAMILIES:
            raise LabelError(
                f"generator {self.name!r}: unknown family {self.family!r}; {registry.suggest(self.family, FAMILIES)}"
            )
        if self.family in VIDEO_FAMILIES:
            raise LabelError(f"generator {self.name!r}: family {self.family!r} makes videos; label scores images only")
        if self.dtype not in DTYPES:
            raise LabelError(f"generator {self.name!r}: unknown dtype {self.dtype!r}; choices: {', '.join(DTYPES)}")
        if self.images is not None and self.images < 1:
            raise LabelError(f"generator {self.name!r}: images must be >= 1, got {self.images}")

    def base_key(self) -> tuple[str, str, str, str | None]:
        return (self.family, self.path, self.dtype, self.vae)


@dataclass(frozen=True, kw_only=True)
class RankingConfig:
    """How the K images of a prompt get one ranking score each (higher = better); see ``ranking.py``.

    ``method``: ``win_fraction`` (RankDPO Syn-Pic, the default), ``zscore`` (mean per-scorer z-score) or ``raw``
    (the raw value of ``scorer``). Two images whose scores differ by at most ``tie_tolerance`` are a tie.
    """

    method: Literal["win_fraction", "zscore", "raw"] = "win_fraction"
    scorer: str | None = None
    tie_tolerance: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in RANKINGS:
            raise LabelError(f"unknown ranking {self.method!r}; {registry.suggest(self.method, RANKINGS)}")
        if (self.method == "raw") != (self.scorer is not None):
            raise LabelError("ranking 'raw' needs scorer=<scorer key>, and only 'raw' takes a scorer")
        if not (self.tie_tolerance >= 0 and math.isfinite(self.tie_tolerance)):
            raise LabelError(f"tie_tolerance must be finite and >= 0, got {self.tie_tolerance}")

    @classmethod
    def parse(cls, text: str, tie_tolerance: float = 0.0) -> RankingConfig:
        """``"win_fraction"``, ``"zscore"`` or ``"raw:<scorer key>"``."""
        method, _, scorer = text.partition(":")
        return cls(method=method, scorer=scorer or None, tie_tolerance=tie_tolerance)  # type: ignore[arg-type]

    def label(self) -> str:
        return f"raw:{self.scorer}" if self.method == "raw" else self.method


@dataclass(frozen=True, kw_only=True)
class LabelConfig:
    """A labelling run.

    ``prompts``: a prompt source for ``diffalign.eval.load_prompts`` (file, shipped name, hub id; with
    ``prompt_key``/``split``/``limit``) or a list of prompt strings. ``images_per_prompt`` (K, >= 2): None sums the
    generators' ``images``. Image ``k`` (slots ordered by generator, then image) of prompt ``i`` is sampled with a
    CPU ``torch.Generator`` seeded ``seed + i * K + k``. ``pairs``: ``best_worst`` (one pair per prompt) or
    ``all`` (K(K-1)/2 pairs). ``shard_size``: prompts per parquet shard. ``prompt_batch``: prompts generated and
    scored together (a crash loses at most these). ``gen_batch_size``: images per pipeline call.
    """

    prompts: str | Sequence[str]
    generators: Sequence[Generator]
    images_per_prompt: int | None = 4
    protocol: SamplingProtocol = field(default_factory=SamplingProtocol)
    seed: int = 0
    ranking: RankingConfig = field(default_factory=RankingConfig)
    pairs: Literal["best_worst", "all"] = "best_worst"
    shard_size: int = 500
    jpeg_quality: int = 95
    prompt_batch: int = 1
    gen_batch_size: int = 8
    device: str = "cpu"
    prompt_key: str | None = None
    split: str | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if not self.generators:
            raise LabelError("at least one generator is needed")
        names = [g.name for g in self.generators]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise LabelError(f"generator names must be unique; repeated: {', '.join(dupes)}")
        if self.pairs not in PAIR_MODES:
            raise LabelError(f"unknown pairs mode {self.pairs!r}; {registry.suggest(self.pairs, PAIR_MODES)}")
        for name in ("shard_size", "prompt_batch", "gen_batch_size"):
            if getattr(self, name) < 1:
                raise LabelError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.jpeg_quality <= 100:
            raise LabelError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        self.image_counts()  # validates the K split

    def image_counts(self) -> list[int]:
        """Images per generator, in generator order; they sum to K."""
        explicit = [g.images for g in self.generators]
        if all(n is None for n in explicit):
            k = self.images_per_prompt
            if k is None:
                raise LabelError("images_per_prompt is None, so every generator needs images=<count>")
            if k < len(self.generators):
                raise LabelError(f"images_per_prompt={k} is fewer than the {len(self.generators)} generators")
            base, extra = divmod(k, len(self.generators))
            counts = [base + (i < extra) for i in range(len(self.generators))]
        elif any(n is None for n in explicit):
            missing = [g.name for g in self.generators if g.images is None]
            raise LabelError(f"give images= for every generator or for none; missing for {', '.join(missing)}")
        else:
            counts = [int(n) for n in explicit if n is not None]
            if self.images_per_prompt is not None and sum(counts) != self.images_per_prompt:
                raise LabelError(
                    f"generator images sum to {sum(counts)}, not images_per_prompt={self.images_per_prompt}"
                )
        if sum(counts) < 2:
            raise LabelError(f"a ranking needs at least 2 images per prompt, got K={sum(counts)}")
        return counts

    @property
    def k(self) -> int:
        return sum(self.image_counts())

    def slots(self) -> list[int]:
        """Generator index of each of the K image slots."""
        return [g for g, n in enumerate(self.image_counts()) for _ in range(n)]

    def image_seed(self, prompt_index: int, slot: int) -> int:
        return self.seed + prompt_index * self.k + slot

    def protocol_of(self, generator: Generator) -> SamplingProtocol:
        return generator.protocol or self.protocol

    def generation_fingerprint(self, scorers: dict[str, dict[str, str]]) -> dict[str, Any]:
        """Every setting that decides the stored images and raw scores (must match on resume)."""
        return {
            "generators": [_generator_dict(g, self.protocol_of(g)) for g in self.generators],
            "image_counts": self.image_counts(),
            "seed": self.seed,
            "seed_rule": "seed + prompt_index * K + slot (CPU torch.Generator per image)",
            "scorers": scorers,
            "shard_size": self.shard_size,
        }

    def derived_settings(self) -> dict[str, Any]:
        """Settings that only decide how the stored raw scores become datasets (may change on re-run)."""
        return {
            "ranking": dataclasses.asdict(self.ranking),
            "pairs": self.pairs,
            "jpeg_quality": self.jpeg_quality,
        }


def _generator_dict(g: Generator, protocol: SamplingProtocol) -> dict[str, Any]:
    d = {k: getattr(g, k) for k in GENERATOR_KEYS}
    d["protocol"] = dataclasses.asdict(protocol)
    return d


def parse_generator_spec(spec: str, protocol: SamplingProtocol | None = None) -> Generator:
    """``"name=base,family=sd15,path=/m/sd15,lora=/runs/x/lora,images=2,cfg=5"`` -> ``Generator``.

    Keys: ``name family path lora lora_scale vae dtype images``, plus protocol overrides ``steps cfg height width
    resolution scheduler negative_prompt`` applied on top of ``protocol``. Values are YAML scalars. Paths
    cannot contain commas.
    """
    from diffalign.config import ConfigError, parse_override

    fields: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        try:
            key, value = parse_override(part)
        except ConfigError as e:
            raise LabelError(f"generator spec {spec!r}: {part!r} must look like key=value") from e
        if key in PROTOCOL_KEYS:
            overrides[PROTOCOL_KEYS[key]] = value
        elif key in GENERATOR_KEYS:
            fields[key] = value
        else:
            choices = (*GENERATOR_KEYS, *PROTOCOL_KEYS)
            raise LabelError(f"generator spec {spec!r}: unknown key {key!r}; {registry.suggest(key, choices)}")
    for key in ("name", "family", "path"):
        if key not in fields:
            raise LabelError(f"generator spec {spec!r} needs {key}=...")
        fields[key] = str(fields[key])
    for key in ("lora", "vae", "dtype"):
        if key in fields and fields[key] is not None:
            fields[key] = str(fields[key])
    if overrides:
        if "resolution" in overrides:
            size = overrides.pop("resolution")
            overrides.setdefault("height", size)
            overrides.setdefault("width", size)
        fields["protocol"] = dataclasses.replace(protocol or SamplingProtocol(), **overrides)
    try:
        return Generator(**fields)
    except TypeError as e:
        raise LabelError(f"generator spec {spec!r}: {e}") from e
