"""Alignment table on a toy world: every objective against the world's base, on held-out prompts, on a CPU.

``--world duo`` (default): the quickstart's world, ``assets/toy_duo`` (two shapes side by side), reward
``duofaithfulness`` (GenEval-style detectors), per-attribute columns correct / color / shape / position, configs
``recipes/configs/duo/<name>.yaml``. ``--world shapes``: the first toy world, ``assets/toy_base``, reward
``toyreward``, configs ``recipes/configs/toy/<name>_world.yaml``. What runs (the quickstart's pieces,
``diffalign.quickstart``, with its defaults):

1. **Label once** (``diffalign.label``): 4 images per labelling prompt (duo: 192) from the base (DDIM 20 steps,
   CFG 3), scored by the world's reward; best vs worst -> Pick-a-Pic-schema pairs, and the ranked lists
   (win-fraction scores) for RankDPO.
2. **Train** each objective with its recipe and the world's config for it (timed: the ``train s`` column is the
   recipe's wall time, model loading included):

   ========  ================  ===========================  ==========================================
   name      recipe            data                         sampled as
   ========  ================  ===========================  ==========================================
   dpo       offline_pref      pairs                        base + LoRA
   mapo      offline_pref      pairs                        base + LoRA
   sdpo      offline_pref      pairs                        base + LoRA
   rankdpo   offline_pref      ranked lists (K = 4)         base + LoRA
   npo       offline_pref      pairs (labels swapped)       base with NPO guidance (negative LoRA)
   selfnpo   selfnpo           winner images + captions     base with NPO guidance (negative LoRA)
   spo       stepwise_pref     online, decoded reward       base + LoRA
   lpo       stepwise_pref     online, decoded reward       base + LoRA
   kto       offline_pref      pairs read as unpaired       base + LoRA
   dspo      offline_pref      pairs                        base + LoRA
   dcpo      offline_pref      pairs + per-image captions   base + LoRA
   dro       dro               winner images (experts)      base + LoRA (the EMA)
   dmpo      offline_pref      pairs                        base + LoRA
   inpo      offline_pref      pairs, inversion noise       base + LoRA
   smpo      offline_pref      best-vs-worst scored pairs   base + LoRA
   refl      reward_grad       online, reward gradient      base + LoRA
   draft     reward_grad       online, reward gradient      base + LoRA
   grpo      online_rl         online, reward               base + LoRA
   ddpo      online_rl         online, reward               base + LoRA
   ========  ================  ===========================  ==========================================

   ``dcpo``'s pairs are the labelled pairs plus ``caption_0`` / ``caption_1`` (``diffalign.label.captions``): the
   winner keeps its prompt, the loser gets what the world's caption writer sees in it (duo:
   ``duo_reward.describe``, e.g. "a blue circle to the left of a red square" for a mirrored scene).
   ``curriculum_dpo`` is DPO on smpo's scored pairs with the Curriculum-DPO sampler (``data.curriculum``).
   NPO guidance (``diffalign.sampling.npo.npo_guidance``) puts the negative LoRA on the unconditional branch of CFG
   and the base on the conditional one. SPO and LPO score children with the world's reward on the decoded
   x0-prediction: the toy worlds have no trained step-aware preference model or latent reward model.
3. **Evaluate** (``diffalign.eval``): the held-out prompts (duo: 48) x 3 seeds under the quickstart's protocol (same
   seeds for every row); ``compare_runs`` against the base gives the paired reward difference with a 95% bootstrap
   CI over prompts and the per-prompt win rate with a Wilson 95% CI. A row "beats the base" when the difference's
   CI lies above 0.

Prints a markdown table and writes ``<out>/results.json``; every run folder (LoRA, scores.jsonl, report.html) stays
under ``<out>``. Run::

    HF_HUB_OFFLINE=1 python bench/alignment_toy.py --threads 2                      # every objective, duo world
    HF_HUB_OFFLINE=1 python bench/alignment_toy.py --objectives dpo npo             # a subset
    HF_HUB_OFFLINE=1 python bench/alignment_toy.py --world shapes --threads 1       # the first toy world
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Objective:
    recipe: str
    data: str | None  # "pairs", "dual_pairs", "ranked", "scored_pairs" or None (online)
    sampling: str  # "lora" or "npo"


OBJECTIVES = {
    "dpo": Objective("offline_pref", "pairs", "lora"),
    "mapo": Objective("offline_pref", "pairs", "lora"),
    "sdpo": Objective("offline_pref", "pairs", "lora"),
    "rankdpo": Objective("offline_pref", "ranked", "lora"),
    "npo": Objective("offline_pref", "pairs", "npo"),
    "selfnpo": Objective("selfnpo", "pairs", "npo"),
    "spo": Objective("stepwise_pref", None, "lora"),
    "lpo": Objective("stepwise_pref", None, "lora"),
    "kto": Objective("offline_pref", "pairs", "lora"),
    "dspo": Objective("offline_pref", "pairs", "lora"),
    "dcpo": Objective("offline_pref", "dual_pairs", "lora"),
    "dro": Objective("dro", "pairs", "lora"),
    "dmpo": Objective("offline_pref", "pairs", "lora"),
    "inpo": Objective("offline_pref", "pairs", "lora"),
    "smpo": Objective("offline_pref", "scored_pairs", "lora"),
    "curriculum_dpo": Objective("offline_pref", "scored_pairs", "lora"),
    "refl": Objective("reward_grad", None, "lora"),
    "draft": Objective("reward_grad", None, "lora"),
    "grpo": Objective("online_rl", None, "lora"),
    "ddpo": Objective("online_rl", None, "lora"),
}


def scored_pairs(ranked_file: str, reward: str) -> Path:
    """``pairs.jsonl`` beside the labelled ranked lists: each list's best vs worst image by raw ``reward`` (K=2)."""
    path = Path(ranked_file)
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        raw = row["raw_scores"][reward] if isinstance(row["raw_scores"], dict) else row["raw_scores"]
        best, worst = max(range(len(raw)), key=raw.__getitem__), min(range(len(raw)), key=raw.__getitem__)
        pair = {"prompt": row["prompt"], "images": [row["images"][best], row["images"][worst]]}
        lines.append(json.dumps(pair | {"scores": [raw[best], raw[worst]]}))
    out = path.parent / "pairs.jsonl"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def dual_pairs(pairs_dir: str, world: Any) -> Path:
    """``pairs_dual/`` beside the labelled pairs: the same rows + DCPO's ``caption_0`` / ``caption_1``."""
    from diffalign.label.captions import add_image_captions

    out = Path(pairs_dir).parent / "pairs_dual"
    return add_image_captions(pairs_dir, out, world.caption_writer(), name=f"{world.name} world caption writer")


def leading_copy(base: str, out: Path) -> Path:
    """``base`` with its DDIM scheduler switched to "leading" timestep spacing (what the step-level miner takes)."""
    if not (out / "model_index.json").is_file():
        shutil.copytree(base, out, dirs_exist_ok=True)
        path = out / "scheduler" / "scheduler_config.json"
        config = json.loads(path.read_text())
        path.write_text(json.dumps(config | {"timestep_spacing": "leading"}, indent=2) + "\n")
    return out


def train(name: str, obj: Objective, labels: dict[str, Any], out: Path, s: Any, extra: list[str]) -> dict[str, Any]:
    """Run the objective's recipe on its config in the world; returns the recipe's result and its wall time."""
    from diffalign import quickstart

    base = s.base_path()
    if obj.recipe == "stepwise_pref":
        base = str(leading_copy(base, out.parent / "base_leading"))
    overrides = [f"model.path={base}", f"run.output_dir={out}", "run.report_to=[]"]
    if obj.data == "pairs":
        overrides.append(f"data.path={labels['pairs_dir']}")
    elif obj.data == "dual_pairs":
        overrides.append(f"data.path={dual_pairs(labels['pairs_dir'], s.toy_world())}")
    elif obj.data == "ranked":
        overrides.append(f"data.path={Path(labels['ranked_file']).parent}")
    elif obj.data == "scored_pairs":
        overrides.append(f"data.path={scored_pairs(labels['ranked_file'], s.toy_world().reward).parent}")
    shutil.rmtree(out, ignore_errors=True)
    start = time.time()
    result = quickstart.load_recipe(obj.recipe).main(["--config", s.toy_world().config(name), *overrides, *extra])
    return {**result, "train_s": time.time() - start}


def sample_npo(negative: str, out: Path, s: Any) -> Path:
    """The held-out protocol sampled from the base with NPO guidance; a ``diffalign.eval`` run folder in ``out``.

    Same images, seeds and file layout as ``diffalign.eval.generate`` (seed rule ``protocol.image_seed``), only the
    pipeline call is wrapped in ``npo_guidance``; scoring, summary and report are ``diffalign.eval``'s.
    """
    import torch

    from diffalign import models, quickstart
    from diffalign.eval import runner
    from diffalign.eval.report import write_run_report
    from diffalign.label.generate import to_pil
    from diffalign.sampling.npo import npo_guidance

    protocol, records = quickstart.eval_protocol(s), quickstart.heldout_records(s)
    adapter = models.load("sd15", s.base_path())
    pipe = adapter.pipeline()
    shutil.rmtree(out, ignore_errors=True)
    (out / "images").mkdir(parents=True)
    jobs = [(i, k, rec) for i, rec in enumerate(records) for k in range(protocol.images_per_prompt)]
    items = []
    with npo_guidance(pipe, negative=negative), torch.no_grad():
        for lo in range(0, len(jobs), 64):
            chunk = jobs[lo : lo + 64]
            seeds = [protocol.image_seed(i, k) for i, k, _ in chunk]
            latents = pipe(
                prompt=[rec.prompt for _, _, rec in chunk],
                num_inference_steps=protocol.steps,
                guidance_scale=protocol.guidance_scale,
                generator=[torch.Generator().manual_seed(x) for x in seeds],
                output_type="latent",
            ).images
            for (i, k, rec), seed, image in zip(chunk, seeds, to_pil(adapter.decode_latents(latents)), strict=True):
                name = f"{i:05d}_{k:02d}.png"
                image.save(out / "images" / name)
                items.append(runner.ImageItem(f"images/{name}", rec.prompt, rec.prompt_id, seed))
    scorers = quickstart.scorers(s)
    rows = runner.score_items(items, scorers, out, progress=False)
    summary = {"kind": "generate", "protocol": dataclasses.asdict(protocol) | {"npo_negative": negative}}
    summary |= runner.summarize(rows, scorers)
    runner.write_run(out, rows, summary)
    write_run_report(out / runner.REPORT_FILE, rows, summary)
    return out


def evaluate(name: str, obj: Objective, lora_dir: str, base_run: Path, out: Path, s: Any) -> dict[str, Any]:
    from diffalign import quickstart
    from diffalign.eval import compare_runs, generate_and_score

    if obj.sampling == "npo":
        sample_npo(lora_dir, out, s)
    else:
        protocol = quickstart.eval_protocol(s, lora_dir)
        generate_and_score(
            protocol, quickstart.heldout_records(s), quickstart.scorers(s), out, batch_size=64, overwrite=True,
            progress=False,
        )  # fmt: skip
    return compare_runs(out, base_run, labels=(name, "base"))


def row(name: str, obj: Objective, comparison: dict[str, Any], train_s: float, world: Any) -> dict[str, Any]:
    c = comparison["scorers"]
    r, w, d = c[world.reward], c[world.reward]["win_rate"], c[world.reward]["difference"]
    if d["ci_low"] is not None and d["ci_low"] > 0:
        verdict = "beats base"
    elif d["ci_high"] is not None and d["ci_high"] < 0:
        verdict = "worse than base"
    else:
        verdict = "no better than base"
    return {
        "objective": name,
        "recipe": obj.recipe,
        "sampling": "NPO guidance" if obj.sampling == "npo" else "base + LoRA",
        "reward": r[name]["mean"],
        "base_reward": r["base"]["mean"],
        "difference": d,
        "win_rate": w,
        "columns": {world.column(k): c[k][name]["mean"] for k in world.scorers[1:]},
        "differences": {k: c[k]["difference"] for k in world.scorers[1:]},  # per attribute / reward-hacking CIs
        "train_s": train_s,
        "verdict": verdict,
    }


def markdown(rows: list[dict[str, Any]], base: dict[str, float], world: Any) -> str:
    names = [world.column(k) for k in world.scorers]
    extra = names[1:]
    lines = [
        f"| objective | recipe | sampled as | {world.reward} | vs base [95% CI] | win rate vs base [95% CI] | "
        + " | ".join(extra)
        + " | train s | result |",
        "| --- | --- | --- | ---: | ---: | ---: | " + "---: | " * len(extra) + "---: | --- |",
        f"| base | - | base | {base[names[0]]:.4f} | - | - | "
        + " | ".join(f"{base[k]:.4f}" for k in extra)
        + " | - | - |",
    ]
    for r in rows:
        d, w = r["difference"], r["win_rate"]
        lines.append(
            f"| {r['objective']} | {r['recipe']} | {r['sampling']} | {r['reward']:.4f} "
            f"| {d['mean']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] "
            f"| {w['win_rate']:.0%} [{w['ci_low']:.0%}, {w['ci_high']:.0%}] | "
            + " | ".join(f"{r['columns'][k]:.4f}" for k in extra)
            + f" | {r['train_s']:.0f} | {r['verdict']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/alignment_toy")
    parser.add_argument("--world", choices=("duo", "shapes"), default="duo", help="toy world (default: duo)")
    parser.add_argument("--base", default="", help="base model folder (default: the world's shipped base)")
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--override", action="append", default=[], metavar="NAME:KEY=VALUE",
                        help="extra config override for one objective, e.g. npo:loss.beta=1000")  # fmt: skip
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: it reads TQDM_* at import
    import torch

    from diffalign import quickstart
    from diffalign.eval import generate_and_score

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    out, s = Path(args.out), quickstart.Settings(world=args.world, base=args.base)
    world = s.toy_world()
    start = time.time()
    labels = quickstart.label(out / "labels", s)
    print(f"labelled {labels['records']} prompts in {time.time() - start:.0f} s", flush=True)
    base_run = out / "eval" / "base"
    generate_and_score(
        quickstart.eval_protocol(s), quickstart.heldout_records(s), quickstart.scorers(s), base_run, batch_size=64,
        overwrite=True, progress=False,
    )  # fmt: skip
    base_summary = json.loads((base_run / "summary.json").read_text())["stats"]
    base = {world.column(k): v["mean"] for k, v in base_summary.items()}
    print("base: " + ", ".join(f"{k} {v:.4f}" for k, v in base.items()), flush=True)
    rows = []
    for name in args.objectives:
        obj = OBJECTIVES[name]
        extra = [o.split(":", 1)[1] for o in args.override if o.startswith(f"{name}:")]
        trained = train(name, obj, labels, out / "train" / name, s, extra)
        comparison = evaluate(name, obj, str(trained["lora_dir"]), base_run, out / "eval" / name, s)
        rows.append(row(name, obj, comparison, trained["train_s"], world) | {"overrides": extra})
        r = rows[-1]
        print(f"{name}: reward {r['reward']:.4f} (base {r['base_reward']:.4f}), win {r['win_rate']['win_rate']:.0%}, "
              f"train {r['train_s']:.0f} s -> {r['verdict']}", flush=True)  # fmt: skip
    table = markdown(rows, base, world)
    (out / "results.json").write_text(json.dumps({"base": base, "rows": rows, "table": table}, indent=2) + "\n")
    print(f"\n{table}\n\ntotal {time.time() - start:.0f} s; runs in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
