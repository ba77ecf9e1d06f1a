"""``diffalign label``: AI-feedback preference data (RankDPO's Syn-Pic pipeline), resumable.

For each prompt, K images are sampled from one or more generators (K split evenly unless a generator says
``images=N``), every image is scored by every ``--scorer``, and the ranking score labels them. Default ranking:
the mean win fraction over scorers (RankDPO Alg. 1): ``phi_i = C_i / (n (K - 1))``, ``C_i`` the duels image i wins
over the n scorers and K - 1 rivals, a tie within a scorer counting half; pairs whose scores are equal are labelled
0.5/0.5. Writes to ``--out``:

* ``pairs/data/train-*.parquet``: Pick-a-Pic-schema pairs (``data.format: pickapic, data.path: OUT/pairs``);
* ``ranked/train.jsonl`` + ``ranked/images/*.png``: ranked lists with the raw per-scorer scores
  (``data.format: ranked, data.path: OUT/ranked``);
* ``records.jsonl`` (the append-only log) and ``label.json`` (the settings).

Re-running the same command resumes: finished prompts are skipped. Example::

    diffalign label --prompts prompts.txt --out data/synpic --images-per-prompt 4 \\
        --generator name=sdxl,family=sdxl,path=stabilityai/stable-diffusion-xl-base-1.0,dtype=bf16,cfg=5 \\
        --generator name=sdxl-dpo,family=sdxl,path=stabilityai/stable-diffusion-xl-base-1.0,dtype=bf16,lora=runs/x/lora \\
        --scorer pickscore --scorer hpsv2,version=v2.1 --scorer imagereward --device cuda

A generator spec is comma-separated ``key=value``: ``name family path`` (required), ``lora lora_scale vae dtype
images``, and per-generator protocol overrides ``steps cfg resolution height width scheduler negative_prompt``.
A scorer spec is as in ``diffalign eval`` (module name or ``package.module:factory``, then ``key=value``).
"""

from __future__ import annotations

import argparse

from diffalign.cli import CLIError


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``label``."""
    from diffalign.label.config import LabelConfig, SamplingProtocol

    proto = SamplingProtocol()
    p = subparsers.add_parser("label", help="generate, score and rank images into preference datasets")
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--prompts", required=True, help="prompt set: file, folder, shipped name or hub id")
    p.add_argument("--prompt-key", help="the prompt column, when not prompt/caption/prompts/text")
    p.add_argument("--split", help="split of a hub dataset")
    p.add_argument("--limit", type=int, help="use only the first N prompts")
    p.add_argument("--generator", action="append", required=True, metavar="SPEC", help="generator spec (repeatable)")
    p.add_argument("--scorer", action="append", required=True, metavar="SPEC", help="scorer spec (repeatable)")
    p.add_argument("--out", required=True, help="output folder (re-run with the same folder to resume)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="move an earlier labelling run in --out to a dated folder beside it (nothing is deleted) and start afresh",
    )
    p.add_argument("--images-per-prompt", "-k", type=int, help="K (default 4, or the sum of the generators' images)")
    p.add_argument("--steps", type=int, default=proto.steps)
    p.add_argument("--cfg", type=float, default=proto.guidance_scale, help="classifier-free guidance scale")
    p.add_argument("--scheduler", help="diffusers scheduler class or alias (ddim, euler, dpmpp_2m, ...)")
    p.add_argument("--resolution", type=int, help="square image size in pixels (default: the model's)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0, help="image k of prompt i uses seed + i * K + k")
    p.add_argument(
        "--ranking",
        default="win_fraction",
        help="win_fraction (RankDPO, default), zscore, or raw:<scorer key> (one scorer's value)",
    )
    p.add_argument("--tie-tolerance", type=float, default=0.0, help="scores this close are a tie (default 0)")
    p.add_argument("--pairs", choices=("best_worst", "all"), default="best_worst", help="pairs kept per prompt")
    p.add_argument("--shard-size", type=int, default=LabelConfig.shard_size, help="prompts per parquet shard")
    p.add_argument("--jpeg-quality", type=int, default=LabelConfig.jpeg_quality)
    p.add_argument("--prompt-batch", type=int, default=1, help="prompts generated and scored together")
    p.add_argument("--gen-batch-size", type=int, default=LabelConfig.gen_batch_size, help="images per pipeline call")
    p.add_argument("--device", default="cpu", help="device for the generators and the scorers (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="scorer weights dtype")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def build_config(args: argparse.Namespace) -> tuple:
    """The ``LabelConfig`` (and the raw scorer specs) described by the parsed arguments."""
    from diffalign.label.config import LabelConfig, RankingConfig, SamplingProtocol, parse_generator_spec

    if args.resolution is not None and (args.height is not None or args.width is not None):
        raise CLIError("pass --resolution or --height/--width, not both")
    protocol = SamplingProtocol(
        steps=args.steps,
        guidance_scale=args.cfg,
        height=args.height or args.resolution,
        width=args.width or args.resolution,
        scheduler=args.scheduler,
        negative_prompt=args.negative_prompt,
    )
    generators = [parse_generator_spec(spec, protocol) for spec in args.generator]
    explicit = any(g.images is not None for g in generators)
    k = args.images_per_prompt if args.images_per_prompt is not None else (None if explicit else 4)
    cfg = LabelConfig(
        prompts=args.prompts,
        prompt_key=args.prompt_key,
        split=args.split,
        limit=args.limit,
        generators=generators,
        images_per_prompt=k,
        protocol=protocol,
        seed=args.seed,
        ranking=RankingConfig.parse(args.ranking, args.tie_tolerance),
        pairs=args.pairs,
        shard_size=args.shard_size,
        jpeg_quality=args.jpeg_quality,
        prompt_batch=args.prompt_batch,
        gen_batch_size=args.gen_batch_size,
        device=args.device,
    )
    return cfg, list(args.scorer)


def run(args: argparse.Namespace) -> int:
    """Label, then print the summary; labelling and prompt errors become one-line CLI errors."""
    import json

    from diffalign.eval import EvalError
    from diffalign.label import LabelError, label

    try:
        cfg, scorers = build_config(args)
        summary = label(
            cfg, scorers, args.out, scorer_dtype=args.dtype, progress=not args.no_progress, overwrite=args.overwrite
        )
    except (LabelError, EvalError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    print(json.dumps(summary, indent=2))
    print(f"train on the pairs:  data.format=pickapic data.path={summary['pairs_dir']}")
    print(f"train on the lists:  data.format=ranked data.path={summary['ranked_file']}")
    return 0
