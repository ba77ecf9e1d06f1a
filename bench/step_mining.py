"""Cost of one mined step pair: SPO-style scoring (x0-prediction -> VAE decode -> image scorer) vs LPO-style
(a latent reward model on the noisy latents), on CPU with the tiny offline models.

What is timed, per model family (tiny SD1.5 / SDXL of ``diffalign.models.tiny``, 32x32 images, 16x16 latents):

* **scoring / step**: one scorer call on the ``K`` children of ``B`` parents at t = 501, i.e. the scoring work of
  one branching step. SPO-style scorers run the guided denoiser (CFG: 2 forwards) on every child to get its
  x0-prediction, decode it with the VAE and score the image; LPO's LRM runs the denoiser's down + mid blocks twice
  (prompt and empty prompt, "visual feature enhancement") on the latents and never decodes.
* **mining / pair**: ``diffalign.terms.stepwise.mine`` over a full ``--steps`` DDIM trajectory with branching at
  every step, threshold 0 (every step with distinct scores keeps one pair per prompt), wall time / pairs kept.
  This includes the sampler's own guided forward per step, which both styles pay.

Scorers: ``spm`` = SPO's step-aware preference model (``diffalign.scorers.spm.from_pickscore`` on a tiny CLIP),
``decoded+pickscore`` = ``stepwise.DecodedScorer`` over ``diffalign.scorers.pickscore`` (same tiny CLIP, no time
conditioning), ``lrm`` = LPO's latent reward model (``diffalign.scorers.lrm.from_adapter``), and ``sampler only``
(a free linear latent scorer) as the floor. If ``spm`` / ``lrm`` cannot be imported, they are left out.
Figures are medians over ``--repeats`` interleaved runs after a warm-up; one torch thread by default.

Caveat: with tiny models the VAE decoder and the CLIP tower are as small as the UNet, so the decode path costs
far less, relative to a UNet forward, than at 512-1024 px with real weights (where LPO reports 0.243 s vs 0.039 s
per step for K = 4 on SD1.5, about 6x). The ratio printed here measures the code path, not that hardware figure.

Run (2 CPU cores, ~1-2 min)::

    HF_HUB_OFFLINE=1 python bench/step_mining.py
    HF_HUB_OFFLINE=1 python bench/step_mining.py --families sd15 --steps 20 --children 4 --prompts 2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


PROMPTS = ["a red circle on a blue background", "a photo of a cat sitting on a wooden table", "a lighthouse", "a dog"]


def tiny_clip_folder(root: Path) -> Path:
    """A tiny CLIPModel (32x32 images) + CLIP tokenizer + image processor, laid out like a PickScore folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from diffalign.models import tiny

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 49406,
                     "eos_token_id": 49407, "pad_token_id": 49407},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(root)
    CLIPTokenizer.from_pretrained(tiny.CLIP_TOKENIZER).save_pretrained(root)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, resample=3).save_pretrained(
        root
    )
    return root


def build_scorers(family: str, clip_dir: Path) -> tuple[Any, dict[str, Any], str]:
    """The LoRA'd tiny adapter and the scorers to compare (LRM built from the base model before the LoRA)."""
    from diffalign import models
    from diffalign.models import lora, tiny
    from diffalign.scorers import pickscore
    from diffalign.terms import stepwise

    adapter = models.from_components(family, getattr(tiny, family)(seed=0))
    uncond = "zeros" if family == "sdxl" else "empty_prompt"
    scorers: dict[str, Any] = {}
    try:
        from diffalign.scorers import lrm

        scorers["lrm"] = lrm.from_adapter(adapter, device="cpu")
    except ImportError as e:
        print(f"# lrm not available ({e}); left out")
    lora.add_lora(adapter, lora.LoraSpec(rank=4))
    try:
        from diffalign.scorers import spm

        scorers["spm"] = spm.from_pickscore(clip_dir, processor_path=clip_dir, adapter=adapter)
    except ImportError as e:
        print(f"# spm not available ({e}); left out")
    pick = pickscore.load(clip_dir, processor_path=clip_dir)
    scorers["decoded+pickscore"] = stepwise.DecodedScorer(pick, guidance_scale=5.0, uncond=uncond)
    scorers["sampler only"] = stepwise.LinearLatentScorer()
    return adapter, scorers, uncond


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_family(family: str, clip_dir: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    from diffalign.terms import stepwise

    adapter, scorers, uncond = build_scorers(family, clip_dir)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    spec = stepwise.MiningSpec(
        num_steps=args.steps, num_children=args.children, branch_start=0, threshold=0.0, resolution=32, uncond=uncond
    )
    n = args.prompts * args.children
    latents = torch.randn(n, *adapter.latent_shape(32), generator=torch.Generator().manual_seed(0))
    t = torch.full((n,), 501, dtype=torch.long)
    flat = [p for p in prompts for _ in range(args.children)]
    seeds = list(range(args.prompts))
    score_times: dict[str, list[float]] = {k: [] for k in scorers}
    mine_times: dict[str, list[float]] = {k: [] for k in scorers}
    pairs: dict[str, int] = {}
    with torch.no_grad():
        for scorer in scorers.values():  # warm-up
            scorer(latents, t, flat, adapter=adapter)
        for _ in range(args.repeats):  # interleaved, so background load hits every scorer alike
            for name, scorer in scorers.items():
                score_times[name].append(median_time(lambda s=scorer: s(latents, t, flat, adapter=adapter), 1))
                start = time.perf_counter()
                result = stepwise.mine(adapter, prompts, seeds, spec, scorer)
                mine_times[name].append(time.perf_counter() - start)
                pairs[name] = len(result.pairs)
    out = {}
    for name in scorers:
        out[name] = {
            "score_s_per_step": statistics.median(score_times[name]),
            "mine_s_per_pair": statistics.median(mine_times[name]) / max(pairs[name], 1),
            "pairs": pairs[name],
        }
    return out


def report(family: str, rows: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    base = rows.get("lrm")
    print(f"\n## {family}: K={args.children} children x B={args.prompts} prompts, {args.steps} DDIM steps")
    print(f"{'scorer':<20} {'scoring s/step':>15} {'x lrm':>7} {'mining s/pair':>14} {'x lrm':>7} {'pairs':>6}")
    for name, r in rows.items():
        ratio_s = f"{r['score_s_per_step'] / base['score_s_per_step']:.2f}" if base else "-"
        ratio_m = f"{r['mine_s_per_pair'] / base['mine_s_per_pair']:.2f}" if base else "-"
        print(
            f"{name:<20} {r['score_s_per_step']:>15.4f} {ratio_s:>7} {r['mine_s_per_pair']:>14.4f} {ratio_m:>7} "
            f"{r['pairs']:>6}"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--children", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        clip_dir = tiny_clip_folder(Path(tmp) / "clip")
        for family in args.families:
            results[family] = bench_family(family, clip_dir, args)
            report(family, results[family], args)
    print("\n" + json.dumps({"args": vars(args), "results": results}))
    return results


if __name__ == "__main__":
    main()
