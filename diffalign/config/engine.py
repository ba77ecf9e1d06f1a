"""The config engine: typed, strict recipe configs: YAML file -> dotted ``a.b=c`` overrides -> frozen dataclasses.

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

The recipes' schemas and cross-field checks live beside it (``config.common`` for the shared sections, one
module per recipe); each recipe module registers its schema (``register_recipe``) and its checks
(``register_validator``) here.
"""

from __future__ import annotations

import dataclasses
import importlib
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
from diffalign.errors import UserError


class ConfigError(UserError, ValueError):
    """A config could not be loaded: unknown or missing keys, wrong types, failed cross-field checks."""


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


# Recipe script stem -> schema (``register_recipe``). Recipes not listed (e.g. a user's copy of offline_pref.py)
# use the default recipe's schema.
RECIPE_SCHEMAS: dict[str, type] = {}
DEFAULT_RECIPE = "offline_pref"


def register_recipe(name: str, schema: type) -> type:
    """Make ``schema`` the config schema of recipe ``name`` (the ``recipe:`` key of its configs)."""
    RECIPE_SCHEMAS[name] = schema
    return schema


def schema_for_recipe(recipe: str | Path) -> type:
    """The config schema of a recipe, by the script's file stem (``offline_pref`` -> ``OfflinePrefConfig``)."""
    return RECIPE_SCHEMAS.get(Path(recipe).stem, RECIPE_SCHEMAS[DEFAULT_RECIPE])


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


def problems_message(problems: Sequence[str]) -> str:
    """Several one-line problems as one line, ``N problems: a | b``; one as itself. Every report of several
    problems (config loading, cross-field and launch checks, ``training.preflight``) uses it."""
    return problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + " | ".join(problems)


def raise_problems(problems: Sequence[str]) -> None:
    """Raise ``ConfigError`` with ``problems_message(problems)``; return when there are none."""
    if problems:
        raise ConfigError(problems_message(problems))


def _raise_collected(ctx: _Context) -> None:
    raise_problems(ctx.errors)


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


def loss_config(section: PluginSection) -> tuple[types.ModuleType, Any]:
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


_VALIDATORS: dict[type, Callable[[Any], list[str]]] = {}


def register_validator(schema: type) -> Callable[[Callable[[Any], list[str]]], Callable[[Any], list[str]]]:
    """Register a function returning cross-field problems (one message per problem) for ``schema``."""

    def deco(fn: Callable[[Any], list[str]]) -> Callable[[Any], list[str]]:
        _VALIDATORS[schema] = fn
        return fn

    return deco


_LAUNCH_CHECKS: dict[type, Callable[[Any, int], list[str]]] = {}


def register_launch_check(
    schema: type,
) -> Callable[[Callable[[Any, int], list[str]]], Callable[[Any, int], list[str]]]:
    """Register ``fn(cfg, num_processes) -> problems``: the batch arithmetic that depends on the process count."""

    def deco(fn: Callable[[Any, int], list[str]]) -> Callable[[Any, int], list[str]]:
        _LAUNCH_CHECKS[schema] = fn
        return fn

    return deco


def launch_problems(cfg: Any, num_processes: int) -> list[str]:
    """The problems of running ``cfg`` on ``num_processes`` processes (checked by ``diffalign run`` before it
    launches and by every recipe before it loads its model)."""
    check = _LAUNCH_CHECKS.get(type(cfg))
    return check(cfg, num_processes) if check else []


def validate(cfg: Any) -> None:
    """Run the cross-field checks registered for ``type(cfg)``; raises ``ConfigError`` listing every problem."""
    check = _VALIDATORS.get(type(cfg))
    raise_problems(check(cfg) if check else [])
