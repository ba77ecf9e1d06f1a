"""``diffalign validate <config> [k=v ...]``: strict load and cross-field checks, then print the resolved config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffalign import config


_LOCAL_PREFIXES = ("/", "./", "../", "~")


def local_path_warnings(cfg: object) -> list[str]:
    """Warnings for string fields that name a local path (absolute or ``./``-relative) that does not exist.

    Hub ids (``org/name``) cannot be told apart from relative folders, so only explicit local paths are
    checked; these are warnings, since a config is often validated on a machine other than the one it runs on.
    """
    warnings = []

    def visit(value: object, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                visit(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, str) and value.startswith(_LOCAL_PREFIXES) and not Path(value).expanduser().exists():
            warnings.append(f"warning: {key}={value!r} does not exist on this machine")

    visit(config.to_dict(cfg), "")
    return [w for w in warnings if not w.startswith(("warning: run.output_dir=", "warning: data.latent_cache="))]


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``validate`` subcommand."""
    p = subparsers.add_parser(
        "validate",
        help="check a config (and overrides) strictly and print it resolved",
        description="Load a config with overrides, check every key and type and the cross-field rules, "
        "and print the fully resolved YAML. Exit status 1 with the problems on failure.",
    )
    p.add_argument("config", help="a YAML path or a shipped config name such as toy/dpo")
    p.add_argument(
        "--recipe", default=None, help="check against this recipe's schema (default: the config's own recipe: key)"
    )
    p.set_defaults(func=run, takes_overrides=True)
    from diffalign.cli import document_overrides

    document_overrides(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Validate and print; ``ConfigError`` propagates to ``main``, which prints it and returns 1."""
    overrides = getattr(args, "overrides", [])
    schema = config.schema_for_recipe(args.recipe) if args.recipe else None
    cfg = config.load(args.config, overrides, schema=schema)
    print(config.dumps(cfg), end="")
    for warning in local_path_warnings(cfg):
        print(warning, file=sys.stderr)
    print(
        f"OK: {config.resolve_config_path(args.config)} is a valid {config.recipe_name(type(cfg))} config",
        file=sys.stderr,
    )
    return 0
