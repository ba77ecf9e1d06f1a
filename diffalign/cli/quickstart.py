"""``diffalign quickstart``: align the shipped toy model with AI feedback on a CPU and show that it worked."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``quickstart`` subcommand."""
    p = subparsers.add_parser(
        "quickstart",
        help="align the shipped toy model to a toy reward with a LoRA and evaluate it vs the base (CPU)",
        description="On a toy world (default duo: assets/toy_duo, a pretrained SD1.5-style model of two coloured "
        "shapes side by side, which gets shapes and sides wrong part of the time): train a LoRA with DRaFT-1 on the "
        "gradient of GenEval-style detectors (duofaithfulness; --objective dpo: label best-vs-worst pairs with them "
        "and train Diffusion-DPO instead), evaluate base vs base + LoRA on held-out prompts with fixed seeds (per "
        "attribute: colour, shape, position, GenEval's all-correct), print the table and write an HTML report with "
        "side-by-side grids.",
    )
    p.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    p.add_argument("--world", choices=("duo", "shapes"), help="toy world: duo (default) or shapes (assets/toy_base)")
    p.add_argument(
        "--objective",
        choices=("draft", "dpo", "grpo"),
        help="draft (default, reward gradient), dpo (labelled pairs) or grpo (online RL on the model's own samples)",
    )
    p.add_argument("--train-steps", type=int, help="optimizer steps (default: the config's)")
    p.add_argument("--label-prompts", type=int, help="dpo: label only the first N labelling prompts (duo: 192)")
    p.add_argument("--eval-prompts", type=int, help="evaluate only the first N held-out prompts (duo: 48)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from diffalign import quickstart

    argv = ["--out", args.out]
    for flag in ("world", "objective", "train_steps", "label_prompts", "eval_prompts", "threads"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    return quickstart.main(argv)
