"""Typed, strict recipe configs: YAML file -> dotted ``a.b=c`` overrides -> frozen dataclasses.

A recipe's schema is a tree of frozen kw-only dataclasses. ``load`` merges a YAML file with command-line
overrides, then builds the tree field by field, checking every value against its annotation. Nothing is
silently dropped or guessed: an unknown key at any depth is an error naming the full dotted key, where it
came from (file or override) and the closest valid key. The ``loss`` section is a name plus free
parameters that are bound to the chosen objective's own ``Config`` with the same rules, so ``loss.bta=1``
fails with "did you mean 'beta'?".

YAML is read with YAML 1.2 scalar rules: only ``true``/``false`` are booleans (``mixed_precision: no``
stays the string ``"no"``), ``1e-5`` is a float, dates and ``1:30`` stay strings, and duplicate keys are
errors. ``null`` for a field that cannot be None means "unset" and keeps the field's default
(``validation.prompts=null`` -> ``[]``). Only the standard library and PyYAML are used.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml

from diffalign import registry, resources


class ConfigError(ValueError):
    """A config could not be loaded: unknown or missing keys, wrong types, failed cross-field checks."""


# --------------------------------------------------------------------------------------------- schema


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which base model to align and how its frozen weights are loaded.

    Memory options for the frozen base (the LoRA is always fp32; the reference pass is this same base with the
    adapter off, so every option keeps reference == base exactly): ``dtype: bf16``, ``quantize: nf4`` (bitsandbytes)
    or ``float8`` (torchao, CUDA >= 8.9), ``gradient_checkpointing``, ``load_text_encoders: false`` (prompt
    embeddings from ``data.latent_cache``), and ``optim.name: adamw8bit``.
    """

    family: Literal["sd15", "sdxl", "sd3", "flux"]  # sd3 covers SD3.5 (Medium, Large)
    path: str  # hub id or local diffusers folder
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16" weight files on the hub
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"  # dtype of the frozen weights
    vae_path: str | None = None  # e.g. madebyollin/sdxl-vae-fp16-fix
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the denoiser forward (static shapes: one graph per resolution and pass)
    quantize: Literal["none", "nf4", "float8"] = "none"  # frozen denoiser weights only
    load_text_encoders: bool = True  # false: train from the latent cache's prompt embeddings
    # flow models (sd3, flux): training-timestep density (SD3 paper Sec. 3.1) and the fixed timestep shift:
    # "scheduler" = the table diffusers' scripts index (SD3: 3.0; FLUX's dynamic scheduler: unshifted, 1.0),
    # "resolution" = the shift FluxPipeline samples with at data.resolution (exp(mu); 3.16 at 1024 px), or a number
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    flow_shift: float | Literal["scheduler", "resolution"] = "scheduler"
    guidance: float | None = None  # flux, guidance-distilled (FLUX.1-dev): the guidance-embedding input; None -> 3.5


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """The trained LoRA adapter (the frozen base with the adapter disabled is the reference model)."""

    rank: int = 8
    alpha: float | None = None  # None -> alpha = rank (scale 1)
    dropout: float = 0.0
    targets: list[str] | None = None  # None -> the family's defaults (models.<family>.Adapter.default_lora_targets)
    init: Literal["gaussian", "default"] = (
        "gaussian"  # peft init_lora_weights: "gaussian" or True; lora_B = 0 either way
    )
    text_encoder: bool = False
    text_encoder_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Preference data: Pick-a-Pic style pairs or ranked lists, and the joint image transforms."""

    format: Literal["pickapic", "ranked"] = "pickapic"
    path: str
    split: str = "train"
    streaming: bool = False
    resolution: int = 512
    crop: Literal["center", "random"] = "center"
    hflip_prob: float = 0.5
    ties: Literal["drop", "keep"] = "drop"
    on_bad_row: Literal["skip", "raise"] = "skip"
    max_rows: int | None = None
    proportion_empty_prompts: float = 0.0
    num_workers: int = 0
    latent_cache: str | None = None


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Optimizer and learning-rate schedule; ``batch_size`` counts groups (pairs or lists) per device."""

    name: Literal["adamw", "adamw8bit", "adafactor"] = "adamw"  # adamw8bit: bitsandbytes 8-bit states
    lr: float = 1e-5
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    warmup_steps: int = 0
    batch_size: int = 1
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Where outputs go, how long to train (``max_steps`` optimizer steps), logging and checkpoints."""

    output_dir: str
    max_steps: int
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 3
    resume_from: str | None = None  # "latest" or a checkpoint folder
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    allow_tf32: bool = True


@dataclass(frozen=True, kw_only=True)
class ValidationConfig:
    """Periodic sample generation during training; ``every=0`` turns it off."""

    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    every: int = 0
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0
    resolution: int | None = None  # None -> data.resolution
    # sd3 only: skip-layer guidance at sampling (StableDiffusion3Pipeline skip_guidance_layers; [7, 8, 9] is the
    # pipeline's recommendation for SD3.5-Medium). A sampling option: no training forward ever skips a layer.
    skip_guidance_layers: list[int] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class PluginSection:
    """A section naming a plug-in module plus free parameters bound to that module's ``Config``.

    ``params`` always holds every init field of the module's ``Config`` (defaults filled in, values
    type-checked), so a dumped config is fully resolved and loads back to an equal object.
    Subclasses set ``package`` (where short names resolve) and ``kind`` (used in messages).
    """

    package: ClassVar[str]
    kind: ClassVar[str]

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def resolve(cls, name: str) -> types.ModuleType:
        """The module for ``name``: a short name in ``package``, or a dotted import path for user code."""
        if "." in name:
            try:
                return importlib.import_module(name)
            except ImportError as e:
                raise ConfigError(f"cannot import {cls.kind} module {name!r}: {e}") from e
        names = registry.available(cls.package)
        if name not in names:
            raise ConfigError(f"unknown {cls.kind} {name!r}; {registry.suggest(name, names)}")
        return importlib.import_module(f"{cls.package}.{name}")


@dataclass(frozen=True, kw_only=True)
class LossSection(PluginSection):
    """``loss: {name: dpo, beta: 5000}``: the objective module and its ``Config`` parameters."""

    package: ClassVar[str] = "diffalign.losses"
    kind: ClassVar[str] = "loss"


@dataclass(frozen=True, kw_only=True)
class OfflinePrefConfig:
    """Schema of ``recipes/offline_pref.py``: offline preference optimisation on pairs or ranked lists."""

    model: ModelConfig
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig
    loss: LossSection
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig
    validation: ValidationConfig = field(default_factory=ValidationConfig)


# Recipe script stem -> schema. Recipes not listed (e.g. a user's copy of offline_pref.py) use the default.
RECIPE_SCHEMAS: dict[str, type] = {"offline_pref": OfflinePrefConfig}
DEFAULT_SCHEMA: type = OfflinePrefConfig
DEFAULT_RECIPE = "offline_pref"


def schema_for_recipe(recipe: str | Path) -> type:
    """The config schema of a recipe, by the script's file stem (``offline_pref`` -> ``OfflinePrefConfig``)."""
    return RECIPE_SCHEMAS.get(Path(recipe).stem, DEFAULT_SCHEMA)


# ------------------------------------------------------------------------------------------ locations


def recipes_dir() -> Path:
    """The folder holding recipe scripts and ``configs/``: ``$DIFFALIGN_RECIPES`` or the installed package's
    ``diffalign/recipes`` (shipped as package data; ``recipes/`` at a clone's root points at it)."""
    env = os.environ.get("DIFFALIGN_RECIPES")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise ConfigError(f"DIFFALIGN_RECIPES={env!r} is not a directory")
        return path
    path = resources.RECIPES
    if not path.is_dir():
        raise ConfigError(
            f"recipes directory not found at {path} (an incomplete install?); reinstall diffalign or set "
            "DIFFALIGN_RECIPES to the folder that holds the recipe scripts and configs/"
        )
    return path


def configs_dir() -> Path:
    """The shipped configs folder, ``recipes_dir() / "configs"``."""
    path = recipes_dir() / "configs"
    if not path.is_dir():
        raise ConfigError(f"configs directory not found at {path}")
    return path


def config_names() -> list[str]:
    """Shipped config names, e.g. ``["sdxl/dpo_lora", "toy/dpo"]`` for ``configs/**/*.yaml``."""
    root = configs_dir()
    paths = [*root.rglob("*.yaml"), *root.rglob("*.yml")]
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in paths if p.is_file())


def recipe_names() -> list[str]:
    """Shipped recipe names: ``recipes/*.py`` stems not starting with ``_``."""
    return sorted(p.stem for p in recipes_dir().glob("*.py") if not p.name.startswith("_"))


def resolve_config_path(source: str | Path) -> Path:
    """A YAML path as given if it is a file, else a shipped config name ``toy/dpo`` -> ``configs/toy/dpo.yaml``."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    name = str(source).removesuffix(".yaml").removesuffix(".yml")
    try:
        root = configs_dir()
    except ConfigError as e:
        raise ConfigError(f"config {str(source)!r} is not a file, and shipped configs are unavailable: {e}") from e
    for suffix in (".yaml", ".yml"):
        candidate = root / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    names = config_names()
    hint = registry.suggest(name, names) if names else "there are no shipped configs"
    raise ConfigError(f"config {str(source)!r} not found: not a file and not a shipped config under {root}; {hint}")


# ----------------------------------------------------------------------------------------------- YAML

_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT_RE = re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$|^0x[0-9a-fA-F_]+$")
_FLOAT_RE = re.compile(
    r"^[-+]?(?=\.?[0-9])(?=.*[.eE])(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?$"
    r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
)


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars (no yes/no booleans, no dates, ``1e-5`` is a float) and no duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"duplicate key {key!r} at line {line} of {key_node.start_mark.name}")
            seen[key] = True
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag.rsplit(":", 1)[-1] in ("merge", "null", "value")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL_RE, list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", _INT_RE, list("-+0123456789"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


class _Dumper(yaml.SafeDumper):
    """SafeDumper that also quotes strings our loader would read as floats (``"1e-5"``), for exact round trips."""


_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_Loader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------------ overrides


@dataclass(frozen=True)
class _Override:
    """A scalar from the command line: its YAML value, and the raw text for fields that want a string."""

    raw: str
    value: Any


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b=c`` into the dotted key and the value parsed as YAML (``[x,y]`` -> list, ``null`` -> None)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. optim.lr=1e-5)")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, str]:
    """Set each override into ``data`` in place; returns dotted key -> the override text that set it."""
    origins: dict[str, str] = {}
    for text in overrides:
        key, value = parse_override(text)
        *parents, leaf = key.split(".")
        node = data
        for i, part in enumerate(parents):
            prefix = ".".join(parents[: i + 1])
            if node.get(part) is None:
                node[part] = {}
                origins.setdefault(prefix, text)  # a section that only an override created
            if not isinstance(node[part], dict):
                raise ConfigError(f"override {text!r}: {prefix!r} is a value, not a section")
            node = node[part]
        node[leaf] = value if isinstance(value, (dict, list)) else _Override(text.partition("=")[2], value)
        origins[key] = text
    return origins


# --------------------------------------------------------------------------------------- type binding


class _FieldError(Exception):
    """One problem with one value; ``key`` is set when the problem is deeper than the field (a list item)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def _item(value: Any, tp: Any, key: str, ctx: _Context) -> Any:
    """Coerce one element of a list/tuple/dict, so an error names ``key[i]`` rather than the whole field."""
    try:
        return _coerce(value, tp, key, ctx)
    except _FieldError as e:
        raise _FieldError(str(e), e.key or key) from None


@dataclass
class _Context:
    """Where values came from, for error messages, and the problems found so far."""

    file: str
    origins: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def where(self, key: str) -> str:
        parts = key.split(".")
        for i in range(len(parts), 0, -1):
            text = self.origins.get(".".join(parts[:i]))
            if text is not None:
                return f"(from override {text!r})"
        return f"in {self.file}"


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    return f"{type(value).__name__} {value!r}"


def _admits_str(tp: Any) -> bool:
    if tp is str or tp is Any:
        return True
    if typing.get_origin(tp) in (Union, types.UnionType):
        return any(_admits_str(arg) for arg in typing.get_args(tp))
    return False


def _admits_none(tp: Any) -> bool:
    return tp is Any or tp is type(None) or type(None) in typing.get_args(tp)


def _coerce(value: Any, tp: Any, key: str, ctx: _Context) -> Any:
    """Check ``value`` against annotation ``tp`` and convert it (int -> float, list -> tuple, dict -> dataclass)."""
    if isinstance(value, _Override):
        try:
            return _coerce(value.value, tp, key, ctx)
        except _FieldError:
            if _admits_str(tp) and (value.value is not None or not value.raw.strip()):
                return _shipped(value.raw)  # data.split=2024 or run.output_dir=1e-5 mean the text, not a number
            raise
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _FieldError(f"expected null, got {_describe(value)}")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # ``X | None``: X's own error (it may name an item, e.g. lora.targets[1])
            return _coerce(value, options[0], key, ctx)
        problems = []
        for arg in options:
            try:
                return _coerce(value, arg, key, ctx)
            except _FieldError as e:
                problems.append(str(e))
        raise _FieldError(" or ".join(problems))
    if origin is Literal:
        if any(value == choice and type(value) is type(choice) for choice in args):
            return value
        choices = [str(c) for c in args]
        raise _FieldError(f"got {_describe(value)}; {registry.suggest(str(value), choices)}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _build(tp, value, key, ctx)
    if origin in (list, Sequence) or tp is list:
        if not isinstance(value, (list, tuple)):
            hint = f" (write [{value}])" if isinstance(value, str) else ""
            raise _FieldError(f"expected a list, got {_describe(value)}{hint}")
        item = args[0] if args else Any
        return [_item(v, item, f"{key}[{i}]", ctx) for i, v in enumerate(value)]
    if origin is tuple or tp is tuple:
        return _coerce_tuple(value, args, key, ctx)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, dict):
            raise _FieldError(f"expected a mapping, got {_describe(value)}")
        kt, vt = args if args else (Any, Any)
        return {_item(k, kt, key, ctx): _item(v, vt, f"{key}.{k}", ctx) for k, v in value.items()}
    return _coerce_scalar(value, tp)


def _coerce_tuple(value: Any, args: tuple[Any, ...], key: str, ctx: _Context) -> tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise _FieldError(f"expected a list, got {_describe(value)}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_item(v, args[0], f"{key}[{i}]", ctx) for i, v in enumerate(value))
    if args and len(value) != len(args):
        raise _FieldError(f"expected a list of {len(args)} values, got {len(value)}: {list(value)!r}")
    item_types = args or (Any,) * len(value)
    return tuple(_item(v, t, f"{key}[{i}]", ctx) for i, (v, t) in enumerate(zip(value, item_types, strict=True)))


def _coerce_scalar(value: Any, tp: Any) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _FieldError(f"expected true or false, got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _FieldError(f"expected an integer, got {_describe(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # PyYAML elsewhere reads 1e-5 as a string
            except ValueError:
                pass
        raise _FieldError(f"expected a number, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return _shipped(value)
        hint = f" (quote it: '{value}')" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
        raise _FieldError(f"expected a string, got {_describe(value)}{hint}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(_shipped(str(value)))
        raise _FieldError(f"expected a path, got {_describe(value)}")
    raise _FieldError(f"unsupported annotation {tp!r} in the schema")


def _shipped(value: str) -> str:
    """``diffalign://assets/...`` -> the installed package's copy (``diffalign.resources``); other text as is."""
    try:
        return resources.resolve(value)
    except FileNotFoundError as e:
        raise _FieldError(str(e)) from None


def _init_fields(cls: type) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _has_default(f: dataclasses.Field[Any]) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _build(cls: type, value: Any, key: str, ctx: _Context, label: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, recording every unknown, missing or ill-typed key in ``ctx``.

    Returns None (after recording errors) when the section cannot be built.
    """
    if isinstance(value, _Override):
        value = value.value
    if issubclass(cls, PluginSection):
        return _build_plugin(cls, value, key, ctx)
    if not isinstance(value, dict):
        raise _FieldError(f"expected a section (mapping), got {_describe(value)}")
    dotted = (lambda name: f"{key}.{name}") if key else (lambda name: name)
    fields = {f.name: f for f in _init_fields(cls)}
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError) as e:
        raise _FieldError(f"cannot read the annotations of {cls.__module__}.{cls.__qualname__}: {e}") from e
    ok = True
    for name in value:
        if name not in fields:
            ok = False
            owner = f" for {label}" if label else ""
            hint = registry.suggest(str(name), list(fields))
            ctx.errors.append(f"unknown key {dotted(name)!r}{owner} {ctx.where(dotted(name))}; {hint}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name in value and _unwrap(value[name]) is None and _has_default(f) and not _admits_none(hints[name]):
            continue  # null means "unset": a field that cannot be None keeps its default (validation.prompts=null)
        if name not in value:
            if _has_default(f):
                continue
            if _is_section(hints[name]):
                sub = _build(hints[name], {}, dotted(name), ctx)
                ok = ok and sub is not None
                kwargs[name] = sub
                continue
            ok = False
            ctx.errors.append(f"missing required key {dotted(name)!r} {ctx.where(dotted(name))}")
            continue
        try:
            kwargs[name] = _coerce(value[name], hints[name], dotted(name), ctx)
        except _FieldError as e:
            ok = False
            ctx.errors.append(f"{e.key or dotted(name)} {ctx.where(dotted(name))}: {e}")
            continue
        ok = ok and not (_is_section(hints[name]) and kwargs[name] is None)
    if not ok:
        return None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        bad = re.search(r"\bConfig\.(\w+)", str(e))  # objective configs name the bad field "Config.<field>"
        key = f"{key}.{bad.group(1)}" if key and bad and bad.group(1) in fields else key
        ctx.errors.append(f"{key or label or cls.__name__} {ctx.where(key)}: {e}")
        return None


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap(value: Any) -> Any:
    return value.value if isinstance(value, _Override) else value


def _build_plugin(cls: type[PluginSection], value: Any, key: str, ctx: _Context) -> PluginSection | None:
    """``{name: x, **params}`` -> ``cls(name=x, params=<every field of x.Config, type-checked>)``."""
    if not isinstance(value, dict):
        raise _FieldError(f"expected a section with a 'name' key, got {_describe(value)}")
    if "name" not in value:
        ctx.errors.append(f"missing required key '{key}.name' {ctx.where(key + '.name')}")
        return None
    name = _unwrap(value["name"])
    if not isinstance(name, str):
        ctx.errors.append(f"{key}.name {ctx.where(key + '.name')}: expected a string, got {_describe(name)}")
        return None
    try:
        module = cls.resolve(name)
    except ConfigError as e:
        ctx.errors.append(f"{key}.name {ctx.where(key + '.name')}: {e}")
        return None
    instance = _bind_module_config(module, {k: v for k, v in value.items() if k != "name"}, key, ctx)
    if instance is None:
        return None
    return cls(name=name, params=to_dict(instance))


def _bind_module_config(module: types.ModuleType, params: dict[str, Any], key: str, ctx: _Context) -> Any:
    config_cls = getattr(module, "Config", None)
    if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
        ctx.errors.append(f"{key}: module {module.__name__} has no dataclass 'Config' to bind parameters to")
        return None
    if "name" in {f.name for f in dataclasses.fields(config_cls)}:
        ctx.errors.append(f"{key}: {module.__name__}.Config has a field 'name', which clashes with {key}.name")
        return None
    return _build(config_cls, params, key, ctx, label=f"{module.__name__}.Config")


def _raise_collected(ctx: _Context) -> None:
    if ctx.errors:
        if len(ctx.errors) == 1:
            raise ConfigError(ctx.errors[0])
        raise ConfigError(f"{len(ctx.errors)} problems:\n  " + "\n  ".join(ctx.errors))


def build(schema: type, data: Mapping[str, Any], file: str = "<dict>", origins: Mapping[str, str] = ()) -> Any:
    """Build ``schema`` from plain data with the strict rules of ``load`` (no cross-field checks)."""
    ctx = _Context(file=file, origins=dict(origins))
    try:
        cfg = _build(schema, dict(data), "", ctx)
    except _FieldError as e:
        ctx.errors.append(f"{file}: {e}")
        cfg = None
    _raise_collected(ctx)
    return cfg


def loss_config(section: LossSection) -> tuple[types.ModuleType, Any]:
    """The objective module named by ``section`` and its ``Config`` instance built from ``section.params``."""
    module = section.resolve(section.name)
    ctx = _Context(file=f"loss section {section.name!r}")
    instance = _bind_module_config(module, dict(section.params), "loss", ctx)
    _raise_collected(ctx)
    return module, instance


# --------------------------------------------------------------------------------------- load / dump


def recipe_of(data: dict[str, Any], path: Path) -> str:
    """The recipe a config file declares with its top-level ``recipe:`` key (default ``offline_pref``)."""
    name = data.pop("recipe", DEFAULT_RECIPE)
    if name not in RECIPE_SCHEMAS:
        raise ConfigError(
            f"{path}: recipe: unknown recipe {name!r}; {registry.suggest(str(name), sorted(RECIPE_SCHEMAS))}"
        )
    return name


def recipe_name(schema: type) -> str:
    """The recipe whose schema is ``schema`` (written as the ``recipe:`` key of dumped configs)."""
    names = [name for name, s in RECIPE_SCHEMAS.items() if s is schema]
    return names[0] if names else DEFAULT_RECIPE


def load(source: str | Path, overrides: Sequence[str] = (), schema: type | None = None) -> Any:
    """Load a recipe config: YAML (a path or a shipped name like ``"toy/dpo"``), then overrides, then checks.

    Args:
        source: a YAML file, or a config name resolved under ``configs_dir()``.
        overrides: ``section.key=value`` strings applied in order; values are parsed as YAML.
        schema: the recipe's root dataclass. ``None`` takes it from the file's ``recipe:`` key (default
            ``offline_pref``); when given, a file declaring another recipe is an error.

    Returns:
        A frozen ``schema`` instance that passed ``validate``.

    Raises:
        ConfigError: naming every unknown/missing/ill-typed key (with its file or override) and failed check.
    """
    path = resolve_config_path(source)
    data = _read_yaml(path)
    declared = recipe_of(data, path)
    if any(o.split("=", 1)[0].strip() == "recipe" for o in overrides):
        raise ConfigError("recipe= cannot be overridden: it is part of the config file (pick another config)")
    if schema is None:
        schema = RECIPE_SCHEMAS[declared]
    elif RECIPE_SCHEMAS[declared] is not schema:
        raise ConfigError(f"{path} is a config for recipe {declared!r}, not {recipe_name(schema)!r}")
    origins = apply_overrides(data, overrides)
    cfg = build(schema, data, file=str(path), origins=origins)
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    return cfg


def to_dict(cfg: Any) -> Any:
    """Plain YAML-ready data: dataclasses -> dicts (a plugin section -> ``{name, **params}``), tuples -> lists."""
    if isinstance(cfg, PluginSection):
        return {"name": cfg.name, **to_dict(cfg.params)}
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in _init_fields(type(cfg))}
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def dumps(cfg: Any) -> str:
    """The resolved config as YAML text: ``recipe:`` first, then the sections in schema order."""
    data = {"recipe": recipe_name(type(cfg)), **to_dict(cfg)}
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


def dump(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config to ``path`` as YAML (``load(path)`` gives back an equal object)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(cfg), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------- cross-field checks


def terms_kind(module: types.ModuleType) -> str:
    """``"pair"``, ``"list"`` or ``"step"`` from a loss module's ``TERMS`` (a string or a terms class)."""
    terms = getattr(module, "TERMS", None)
    if isinstance(terms, str):
        return terms
    if isinstance(terms, type):
        return terms.__name__.removesuffix("Terms").lower()
    raise ConfigError(f"loss module {module.__name__} has no TERMS")


_VALIDATORS: dict[type, Callable[[Any], list[str]]] = {}


def register_validator(schema: type) -> Callable[[Callable[[Any], list[str]]], Callable[[Any], list[str]]]:
    """Register a function returning cross-field problems (one message per problem) for ``schema``."""

    def deco(fn: Callable[[Any], list[str]]) -> Callable[[Any], list[str]]:
        _VALIDATORS[schema] = fn
        return fn

    return deco


def validate(cfg: Any) -> None:
    """Run the cross-field checks registered for ``type(cfg)``; raises ``ConfigError`` listing every problem."""
    check = _VALIDATORS.get(type(cfg))
    problems = check(cfg) if check else []
    if problems:
        raise ConfigError(
            problems[0] if len(problems) == 1 else "\n  ".join([f"{len(problems)} problems:", *problems])
        )


def _positive(problems: list[str], **values: float | int | None) -> None:
    for key, value in values.items():
        if value is not None and value <= 0:
            problems.append(f"{key.replace('__', '.')}={value} must be > 0")


def _unit_interval(problems: list[str], closed: bool = True, **values: float) -> None:
    for key, value in values.items():
        if not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
            problems.append(f"{key.replace('__', '.')}={value} must be in [0, 1{']' if closed else ')'}")


def _nonfinite(value: Any, key: str = "") -> list[str]:
    """Dotted keys of NaN / infinite numbers anywhere in ``to_dict`` data (``nan <= 0`` is False: range checks miss it)."""
    if isinstance(value, dict):
        return [k for name, v in value.items() for k in _nonfinite(v, f"{key}.{name}" if key else str(name))]
    if isinstance(value, list):
        return [k for i, v in enumerate(value) for k in _nonfinite(v, f"{key}[{i}]")]
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{key}={value} must be a finite number"]
    return []


_MAX_SEED = 2**32 - 1  # numpy's seed range; accelerate's set_seed seeds numpy too


def _check_training(cfg: Any, problems: list[str]) -> None:
    """Checks every LoRA training recipe shares: run, optim, lora, model dtype, resolutions and validation."""
    m, lora, data, optim, run, val = cfg.model, cfg.lora, cfg.data, cfg.optim, cfg.run, cfg.validation
    problems.extend(_nonfinite(to_dict(cfg)))
    if not run.output_dir.strip():
        problems.append("run.output_dir is empty; name the folder the run writes to (e.g. run.output_dir=runs/dpo)")
    for key, seed in (("run.seed", run.seed), ("validation.seed", val.seed)):
        if not 0 <= seed <= _MAX_SEED:
            problems.append(f"{key}={seed} must be in [0, 2**32 - 1]")
    _positive(
        problems,
        run__max_steps=run.max_steps,
        run__save_every=run.save_every,
        run__log_every=run.log_every,
        run__keep_last=run.keep_last,
        optim__batch_size=optim.batch_size,
        optim__grad_accum=optim.grad_accum,
        optim__lr=optim.lr,
        optim__eps=optim.eps,
        optim__max_grad_norm=optim.max_grad_norm,
        lora__rank=lora.rank,
        lora__alpha=lora.alpha,
        data__resolution=data.resolution,
        validation__num_inference_steps=val.num_inference_steps,
    )
    _unit_interval(
        problems,
        closed=False,
        lora__dropout=lora.dropout,
        **{f"optim__betas[{i}]": b for i, b in enumerate(optim.betas)},
    )
    if optim.warmup_steps < 0 or optim.warmup_steps > run.max_steps:
        problems.append(f"optim.warmup_steps={optim.warmup_steps} must be in [0, run.max_steps={run.max_steps}]")
    if optim.warmup_steps > 0 and optim.scheduler == "constant":
        problems.append(
            "optim.warmup_steps > 0 has no effect with optim.scheduler='constant'; use 'constant_with_warmup'"
        )
    for key, res in (("data.resolution", data.resolution), ("validation.resolution", val.resolution)):
        if res is not None and res % 8:
            problems.append(f"{key}={res} must be a multiple of 8 (the VAE downsamples by 8)")
    if m.dtype != "fp32" and run.mixed_precision not in ("no", m.dtype):
        problems.append(f"model.dtype={m.dtype!r} and run.mixed_precision={run.mixed_precision!r} disagree")
    _check_model(cfg, problems)
    if val.every < 0 or optim.weight_decay < 0:
        problems.append("validation.every and optim.weight_decay must be >= 0")
    if val.prompts and val.prompts_file:
        problems.append("set one of validation.prompts and validation.prompts_file, not both")
    if val.every > 0 and not (val.prompts or val.prompts_file):
        problems.append(f"validation.every={val.every} needs validation.prompts or validation.prompts_file")


FLOW_FAMILIES = ("sd3", "flux")


def _check_model(cfg: Any, problems: list[str]) -> None:
    """Model options that only some families take, and the memory options' requirements."""
    m, data, val = cfg.model, cfg.data, cfg.validation
    if m.family not in FLOW_FAMILIES:
        if m.timestep_sampling != "uniform":
            problems.append(
                f"model.timestep_sampling={m.timestep_sampling!r} applies to flow models (model.family in "
                f"{FLOW_FAMILIES}), not {m.family!r}; use 'uniform'"
            )
        if m.flow_shift != "scheduler":
            problems.append(f"model.flow_shift={m.flow_shift!r} applies to flow models, not {m.family!r}")
    if isinstance(m.flow_shift, float) and m.flow_shift <= 0:
        problems.append(f"model.flow_shift={m.flow_shift} must be > 0")
    if val.skip_guidance_layers and m.family != "sd3":
        problems.append(f"validation.skip_guidance_layers is an SD3/SD3.5 sampling option, not {m.family!r}")
    if m.guidance is not None and m.family != "flux":
        problems.append(f"model.guidance applies to guidance-distilled FLUX.1 (model.family='flux'), not {m.family!r}")
    if m.quantize != "none" and m.dtype == "fp32":
        problems.append(f"model.quantize={m.quantize!r} computes in model.dtype: set model.dtype to bf16 (or fp16)")
    if not m.load_text_encoders:
        if not getattr(data, "latent_cache", None):
            problems.append(
                "model.load_text_encoders=false needs data.latent_cache (prompt embeddings from the cache)"
            )
        if cfg.lora.text_encoder:
            problems.append("model.load_text_encoders=false cannot train a text-encoder LoRA (lora.text_encoder=true)")
        if val.every:
            problems.append("model.load_text_encoders=false: validation sampling needs the text encoders; set every=0")


@register_validator(OfflinePrefConfig)
def _check_offline(cfg: OfflinePrefConfig) -> list[str]:
    problems: list[str] = []
    m, lora, data = cfg.model, cfg.lora, cfg.data
    _check_training(cfg, problems)
    _check_loss_matches_data(cfg, problems)
    _positive(problems, data__max_rows=data.max_rows, model__logit_std=m.logit_std)
    _unit_interval(
        problems, data__hflip_prob=data.hflip_prob, data__proportion_empty_prompts=data.proportion_empty_prompts
    )
    if lora.text_encoder and data.latent_cache:
        problems.append("lora.text_encoder=true needs prompt embeddings recomputed each step; unset data.latent_cache")
    if data.num_workers < 0:
        problems.append("data.num_workers must be >= 0")
    return problems


def _check_loss_matches_data(cfg: OfflinePrefConfig, problems: list[str]) -> None:
    try:
        module = cfg.loss.resolve(cfg.loss.name)
        kind = terms_kind(module)
    except ConfigError as e:
        problems.append(f"loss.name: {e}")
        return
    wanted = {"pickapic": "pair", "ranked": "list"}[cfg.data.format]
    if kind != wanted:
        problems.append(
            f"loss.name={cfg.loss.name!r} is a {kind} loss (TERMS={kind!r}) but data.format={cfg.data.format!r} "
            f"needs a {wanted} loss"
        )


# ------------------------------------------------------------------------------------------- summary


def summary(cfg: OfflinePrefConfig, num_processes: int = 1) -> str:
    """Derived quantities for ``--dry-run``: effective batch, optimizer steps, images per step, schedule."""
    optim, run = cfg.optim, cfg.run
    per_step = optim.batch_size * num_processes * optim.grad_accum
    module = cfg.loss.resolve(cfg.loss.name)
    kind = terms_kind(module)
    group = "2" if kind == "pair" else "K"
    unit = "pairs" if kind == "pair" else "lists"
    images = f"{2 * per_step}" if kind == "pair" else f"{per_step} x K (K = list length in the data)"
    params = ", ".join(f"{k}={v}" for k, v in cfg.loss.params.items())
    lines = [
        f"loss: {cfg.loss.name} ({kind} terms; {params})",
        f"model: {cfg.model.family} {cfg.model.path} (weights {cfg.model.dtype}, mixed precision {run.mixed_precision})",
        f"effective batch: {per_step} {unit} = {optim.batch_size} per device x {num_processes} processes "
        f"x {optim.grad_accum} accumulation",
        f"images per optimizer step: {images} ({group} per group)",
        f"optimizer steps: {run.max_steps} (warmup {optim.warmup_steps}, {optim.scheduler}, lr {optim.lr:g})",
        f"{unit} seen: {run.max_steps * per_step}",
    ]
    if cfg.data.max_rows:
        lines.append(
            f"epochs over data.max_rows={cfg.data.max_rows}: {run.max_steps * per_step / cfg.data.max_rows:.2f}"
        )
    lines.append(
        f"checkpoints: every {run.save_every} steps ({run.max_steps // run.save_every} total, keep last {run.keep_last})"
    )
    m = cfg.model
    if m.family in FLOW_FAMILIES:
        guidance = f", guidance {m.guidance if m.guidance is not None else 'default (3.5 on FLUX.1-dev)'}"
        lines.append(
            f"flow process: {m.timestep_sampling} timesteps, shift {m.flow_shift}{guidance if m.family == 'flux' else ''}"
        )
    base = m.dtype if m.quantize == "none" else f"{m.quantize} (compute {m.dtype})"
    lines.append(
        f"memory: base {base}, gradient checkpointing {'on' if m.gradient_checkpointing else 'off'}, text encoders "
        f"{'loaded' if m.load_text_encoders else 'not loaded (cached embeddings)'}, optimizer {optim.name}"
    )
    val = cfg.validation
    lines.append(f"validation: every {val.every} steps" if val.every else "validation: off")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- Self-NPO recipe


@dataclass(frozen=True, kw_only=True)
class SelfNPOSection:
    """Self-NPO (truncated diffusion fine-tuning, arXiv 2505.11777) teacher and loss settings.

    ``guidance_scale`` is w in ``cond + w * (cond - uncond)``: -1 (SD1.5) is the unconditional prediction,
    -5 (SDXL, with ``uncond: zeros``) is strong negative guidance. See ``diffalign.terms.selfnpo``.
    """

    guidance_scale: float = -1.0
    uncond: Literal["empty_prompt", "zeros"] = "empty_prompt"
    num_ddim_steps: int = 25  # the teacher's DDIM grid (step T / 25 = 40 for T = 1000)
    max_teacher_steps: int = 5  # DDIM steps the teacher runs from the noised real image
    ema_decay: float = 0.999  # teacher = EMA of the trained LoRA tensors, updated after every optimizer step
    huber_c: float = 1e-3
    loss_type: Literal["huber", "l2"] = "huber"


@dataclass(frozen=True, kw_only=True)
class SelfNPOConfig:
    """Schema of ``recipes/selfnpo.py``: a negative LoRA from images + captions (no preference labels)."""

    model: ModelConfig
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig
    selfnpo: SelfNPOSection = field(default_factory=SelfNPOSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig
    validation: ValidationConfig = field(default_factory=ValidationConfig)


RECIPE_SCHEMAS["selfnpo"] = SelfNPOConfig


@register_validator(SelfNPOConfig)
def _check_selfnpo(cfg: SelfNPOConfig) -> list[str]:
    problems: list[str] = []
    m, lora, data, s = cfg.model, cfg.lora, cfg.data, cfg.selfnpo
    _check_training(cfg, problems)
    _positive(
        problems,
        data__max_rows=data.max_rows,
        selfnpo__num_ddim_steps=s.num_ddim_steps,
        selfnpo__huber_c=s.huber_c,
    )
    _unit_interval(
        problems,
        data__hflip_prob=data.hflip_prob,
        data__proportion_empty_prompts=data.proportion_empty_prompts,
        selfnpo__ema_decay=s.ema_decay,
    )
    if m.family in FLOW_FAMILIES:
        problems.append(
            f"model.family={m.family!r} is not supported by selfnpo: its DDIM teacher rollout and re-noising use the "
            "variance-preserving process of sd15/sdxl"
        )
    if m.timestep_sampling != "uniform":
        problems.append(f"model.timestep_sampling={m.timestep_sampling!r} does not apply to selfnpo; use 'uniform'")
    if lora.text_encoder:
        problems.append(
            "lora.text_encoder=true is not supported by selfnpo: the negative LoRA is used on the unconditional "
            "CFG branch (diffalign.sampling.npo refuses text-encoder LoRAs)"
        )
    if s.max_teacher_steps < 0:
        problems.append(f"selfnpo.max_teacher_steps={s.max_teacher_steps} must be >= 0")
    if data.num_workers < 0:
        problems.append("data.num_workers must be >= 0")
    return problems


# --------------------------------------------------------------------------------- stepwise_pref recipe


@dataclass(frozen=True, kw_only=True)
class PromptDataConfig:
    """Prompts the policy samples from (step-level methods need no images): any ``diffalign.eval.prompts`` source.

    ``prompts``: a ``.txt`` / ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` file or a shipped list name;
    ``key`` names the prompt column if it is not ``prompt``/``caption``/``text``. ``resolution`` is the sampling size.
    """

    prompts: str
    key: str | None = None
    max_prompts: int | None = None
    resolution: int = 512


@dataclass(frozen=True, kw_only=True)
class StepScorerConfig:
    """The step-aware scorer: ``spm`` (SPO), ``lrm`` (LPO), ``decoded`` (x0 -> VAE -> ``pixel_scorer``),
    ``toy_latent`` / ``toy_decoded`` (deterministic toys), or a dotted module with ``load(path, adapter=...)``."""

    name: str = "toy_latent"
    path: str | None = None
    pixel_scorer: str | None = None  # decoded: a diffalign.scorers name (pickscore, hpsv2, ...)
    guidance_scale: float | None = None  # decoded x0-prediction CFG; None -> stepwise.guidance_scale
    seed: int = 0  # toy scorers
    scale: float = 1.0  # toy scorers


@dataclass(frozen=True, kw_only=True)
class StepwiseSection:
    """Step-level pair mining (``diffalign.terms.stepwise.MiningSpec``) and the pair buffer.

    Each mining round samples ``sample_batch_size`` prompts per process; the kept pairs of all processes are
    gathered, shuffled and queued, and every optimizer step consumes ``optim.batch_size`` pairs per process and
    micro-batch (leftovers carry over to the next step).
    """

    num_steps: int = 20
    guidance_scale: float = 5.0
    eta: float = 1.0
    num_children: int = 4
    branch_start: int = 0  # first branching step index (SPO 4 of 20 -> t <= 751; LPO 0)
    threshold: float = 0.3
    threshold_schedule: Literal["constant", "sigma"] = "constant"
    threshold_min: float = 0.35
    threshold_max: float = 0.5
    score_timestep: Literal["child", "parent"] = "child"
    uncond: Literal["empty_prompt", "zeros"] = "empty_prompt"  # sdxl pipelines use zeros
    sample_batch_size: int = 10
    save_pairs: bool = False  # write every round's pairs to <output_dir>/pairs/round-*.safetensors
    max_empty_rounds: int = 50  # stop with an error after this many rounds in a row without a pair
    scorer: StepScorerConfig = field(default_factory=StepScorerConfig)


@dataclass(frozen=True, kw_only=True)
class StepwisePrefConfig:
    """Schema of ``recipes/stepwise_pref.py``: online step-level preference optimisation (SPO, LPO)."""

    model: ModelConfig
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: PromptDataConfig
    stepwise: StepwiseSection = field(default_factory=StepwiseSection)
    loss: LossSection
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig
    validation: ValidationConfig = field(default_factory=ValidationConfig)


RECIPE_SCHEMAS["stepwise_pref"] = StepwisePrefConfig
_BUILTIN_STEP_SCORERS = ("spm", "lrm", "decoded", "toy_latent", "toy_decoded")


@register_validator(StepwisePrefConfig)
def _check_stepwise(cfg: StepwisePrefConfig) -> list[str]:
    problems: list[str] = []
    m, data, s = cfg.model, cfg.data, cfg.stepwise
    _check_training(cfg, problems)
    try:
        kind = terms_kind(cfg.loss.resolve(cfg.loss.name))
        if kind != "step":
            problems.append(
                f"loss.name={cfg.loss.name!r} is a {kind} loss; stepwise_pref needs a step loss (spo, lpo)"
            )
    except ConfigError as e:
        problems.append(f"loss.name: {e}")
    _positive(
        problems,
        data__max_prompts=data.max_prompts,
        stepwise__num_steps=s.num_steps,
        stepwise__eta=s.eta,
        stepwise__sample_batch_size=s.sample_batch_size,
        stepwise__max_empty_rounds=s.max_empty_rounds,
    )
    _unit_interval(
        problems,
        closed=False,
        stepwise__threshold=s.threshold,
        stepwise__threshold_min=s.threshold_min,
        stepwise__threshold_max=s.threshold_max,
    )
    if s.num_children < 2:
        problems.append(f"stepwise.num_children={s.num_children} must be >= 2 (a pair needs two children)")
    if not 0 <= s.branch_start < s.num_steps:
        problems.append(f"stepwise.branch_start={s.branch_start} must be in [0, stepwise.num_steps={s.num_steps})")
    if s.threshold_schedule == "sigma" and s.threshold_min > s.threshold_max:
        problems.append(f"stepwise.threshold_min={s.threshold_min} must be <= threshold_max={s.threshold_max}")
    sc = s.scorer
    if sc.name not in _BUILTIN_STEP_SCORERS and "." not in sc.name:
        problems.append(f"stepwise.scorer.name={sc.name!r}: {registry.suggest(sc.name, _BUILTIN_STEP_SCORERS)}")
    if sc.name == "decoded" and not sc.pixel_scorer:
        problems.append("stepwise.scorer.name='decoded' needs stepwise.scorer.pixel_scorer (e.g. pickscore)")
    if m.family in FLOW_FAMILIES:
        problems.append(
            f"model.family={m.family!r} is not supported by stepwise_pref: SPO / LPO mine pairs with a stochastic "
            "DDIM sampler on a VP (DDPM-family) model; flow matching needs an SDE sampler"
        )
    if m.timestep_sampling != "uniform":
        problems.append(f"model.timestep_sampling={m.timestep_sampling!r} does not apply to stepwise_pref")
    return problems
