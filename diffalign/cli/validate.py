"""``diffalign validate <config> [k=v ...]``: strict load, cross-field checks and the checks of everything the run
would need on this machine (paths, data columns, batch arithmetic, trackers), then print the resolved config."""

from __future__ import annotations

import argparse
import sys

from diffalign import config


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``validate`` subcommand."""
    p = subparsers.add_parser(
        "validate",
        help="check a config (and overrides) strictly and print it resolved",
        description="Load a config with overrides, check every key and type and the cross-field rules, the "
        "local paths it names (model, data and its columns, prompts, scorer weights), the batch arithmetic on "
        "--num-processes and the trackers, and print the fully resolved YAML. Exit status 1 with the problems "
        "on failure.",
    )
    p.add_argument("config", help="a YAML path or a shipped config name such as toy/dpo")
    p.add_argument(
        "--recipe", default=None, help="check against this recipe's schema (default: the config's own recipe: key)"
    )
    p.add_argument("--num-processes", type=int, default=1, help="check the batch arithmetic for N processes")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="as `diffalign run --dry-run`: check the config for a launch on --num-processes processes without the "
        "checks of local paths (--no-paths), and also print the derived numbers (global batch per optimizer step, "
        "learning rate, what trains)",
    )
    p.add_argument(
        "--no-paths",
        action="store_true",
        help="skip the checks of local paths and the output folder (a config meant for another machine)",
    )
    p.set_defaults(func=run, takes_overrides=True)
    from diffalign.cli import document_overrides

    document_overrides(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Validate, check, print; ``ConfigError`` propagates to ``main``, which prints it on one line and returns 1."""
    from diffalign.training import preflight

    overrides = getattr(args, "overrides", [])
    schema = config.schema_for_recipe(args.recipe) if args.recipe else None
    cfg = config.load(args.config, overrides, schema=schema)
    if args.no_paths or args.dry_run:
        config.raise_problems(config.launch_problems(cfg, args.num_processes))
    else:
        preflight.check(cfg, args.num_processes, probe_lock=True)
    print(config.dumps(cfg), end="")
    if args.dry_run and (described := config.describe(cfg, args.num_processes)):
        print("\n# summary\n" + "\n".join(f"# {line}" for line in described.splitlines()))
    print(
        f"OK: {config.resolve_config_path(args.config)} is a valid {config.recipe_name(type(cfg))} config",
        file=sys.stderr,
    )
    return 0
