"""The README's first command: preference alignment that visibly works, on a laptop CPU, in a few minutes.

Everything runs on a toy world (``diffalign.toy.worlds``). The default, ``duo``: 32x32 images of two coloured shapes
side by side with captions such as ``"a red circle to the left of a blue square"``, a pretrained SD1.5-style base
model shipped in ``assets/toy_duo`` that often puts the objects on the wrong sides or draws the wrong shape, and
GenEval-style detectors (``diffalign.toy.duo_reward``) that check colours, shapes and the left/right relation;
``duofaithfulness`` (their mean) is the reward. ``world="shapes"`` is the first toy world (``assets/toy_base``, one
shape on a coloured background, ``toyreward`` = faithfulness x a preference for large objects).

``objective="draft"`` (the default):

1. **Train** a LoRA with DRaFT-1 (``recipes/reward_grad.py``, ``recipes/configs/duo/draft.yaml``): the policy samples
   the labelling prompts and backpropagates the differentiable reward of its own samples (no labels needed).
2. **Evaluate** (``diffalign.eval``): base and base + LoRA on the held-out prompts (never trained on) with the same
   protocol and the same 3 seeds per prompt; mean scores with 95% CIs, the per-prompt win rate of the LoRA over the
   base, side-by-side grids and ``eval/compare/report.html``.

``objective="dpo"``: first **label** AI-feedback pairs (``diffalign.label``: K images per labelling prompt from the
base, scored by the world's reward, best vs worst as a Pick-a-Pic-schema pair), then train Diffusion-DPO
(``recipes/offline_pref.py``, ``recipes/configs/duo/dpo.yaml``), then evaluate the same way.

``objective="grpo"``: online RL (``recipes/online_rl.py``, ``recipes/configs/duo/grpo.yaml``): each round the policy
samples groups of images per prompt with a stochastic sampler, scores them, and makes a group-relative, PPO-clipped
update (Flow-GRPO); no labels, no reward gradient. Slower than DRaFT (see bench/README.md for its curve).

``--out`` is the quickstart's own folder: a re-run replaces its ``labels``, ``<objective>`` and ``eval`` subfolders.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffalign.config import recipes_dir


OBJECTIVES = {
    "draft": "reward_grad",
    "dpo": "offline_pref",
    "grpo": "online_rl",
}  # objective -> recipe (dpo: labelled pairs)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What the quickstart does; the defaults are the README's run. ``label_prompts`` (dpo only) / ``eval_prompts``
    None: every prompt of the split (duo: 192 / 48). ``overrides``: extra ``a.b=c`` overrides for the training config."""

    world: str = "duo"
    objective: str = (
        "draft"  # "draft" (reward gradient), "dpo" (label pairs, then Diffusion-DPO) or "grpo" (online RL)
    )
    base: str = ""  # empty: the world's shipped base
    config: str = ""  # empty: the world's config for the objective
    label_prompts: int | None = None
    images_per_prompt: int = 4
    eval_prompts: int | None = None
    eval_seeds: int = 3
    steps: int = 20
    guidance_scale: float = 3.0
    train_steps: int | None = None  # None: the config's run.max_steps
    seed: int = 0
    overrides: tuple[str, ...] = field(default_factory=tuple)

    def toy_world(self) -> Any:
        from diffalign.toy import worlds

        return worlds.get(self.world)

    def base_path(self) -> str:
        return self.base or str(self.toy_world().base)

    def config_name(self) -> str:
        return self.config or self.toy_world().config(self.objective)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown quickstart objective {self.objective!r}; choices: {', '.join(OBJECTIVES)}")


def load_recipe(name: str = "offline_pref") -> Any:
    """The recipe script ``recipes/<name>.py`` as a module (recipes are scripts, not package modules)."""
    path = recipes_dir() / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"diffalign_recipe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def scorers(s: Settings | None = None) -> dict[str, Any]:
    """The world's evaluation scorers by column name, the reward first (duo: ``duofaithfulness``, ``duocorrect``,
    ``duocolor``, ``duoshape``, ``duoposition``)."""
    from diffalign import scorers as registry

    return {name: registry.load(name) for name in (s or Settings()).toy_world().scorers}


def label(out: Path, s: Settings) -> dict[str, Any]:
    """Step 1: K images per labelling prompt from the base, scored by the world's reward -> pairs + ranked lists."""
    from diffalign import scorers as registry
    from diffalign.label import Generator, LabelConfig, SamplingProtocol
    from diffalign.label import label as run_label

    prompts = s.toy_world().prompts("label")[: s.label_prompts]
    cfg = LabelConfig(
        prompts=prompts,
        generators=[Generator(name=f"toy_{s.world}", family="sd15", path=s.base_path())],
        images_per_prompt=s.images_per_prompt,
        protocol=SamplingProtocol(steps=s.steps, guidance_scale=s.guidance_scale),
        seed=s.seed,
        jpeg_quality=100,
        prompt_batch=16,
        gen_batch_size=64,
    )
    reward = s.toy_world().reward
    return run_label(cfg, {reward: registry.load(reward)}, out, progress=False)


def train(out: Path, pairs_dir: str | None, s: Settings) -> dict[str, Any]:
    """The LoRA: Diffusion-DPO on the labelled pairs (``pairs_dir``) or DRaFT on the config's prompts."""
    overrides = [f"model.path={s.base_path()}", f"run.output_dir={out}"]
    if pairs_dir is not None:
        overrides.append(f"data.path={pairs_dir}")
    overrides += [f"run.seed={s.seed}", "run.report_to=[]"]
    if s.train_steps is not None:
        overrides.append(f"run.max_steps={s.train_steps}")
    return load_recipe(OBJECTIVES[s.objective]).main(["--config", s.config_name(), *overrides, *s.overrides])


def heldout_records(s: Settings) -> list[Any]:
    """The held-out prompts (never labelled) as ``diffalign.eval`` prompt records."""
    from diffalign.eval.prompts import records_from_rows

    return records_from_rows(s.toy_world().prompts("heldout")[: s.eval_prompts], f"{s.world} held-out prompts")


def eval_protocol(s: Settings, lora: str | None = None) -> Any:
    """The evaluation protocol: the labelling sampler, ``eval_seeds`` images per prompt, other seeds than labelling."""
    from diffalign.eval import GenerationProtocol

    return GenerationProtocol(
        family="sd15",
        model=s.base_path(),
        lora=lora,
        steps=s.steps,
        guidance_scale=s.guidance_scale,
        seed=s.seed + 10_000,
        images_per_prompt=s.eval_seeds,
    )


def evaluate(out: Path, lora_dir: str | None, s: Settings) -> dict[str, Any]:
    """Step 3: base and base + LoRA on the held-out prompts, same seeds; compare -> compare.json + report.html."""
    from diffalign.eval import compare_runs, generate_and_score
    from diffalign.eval.runner import write_comparison

    records, toy_scorers = heldout_records(s), scorers(s)
    for name, lora in (("base", None), (s.objective, lora_dir)):
        protocol = eval_protocol(s, lora)
        generate_and_score(protocol, records, toy_scorers, out / name, batch_size=64, overwrite=True, progress=False)
    comparison = compare_runs(out / s.objective, out / "base", labels=(s.objective, "base"))
    write_comparison(out / "compare", comparison)
    return comparison


def run(out_dir: str | Path = "runs/quickstart", settings: Settings | None = None) -> dict[str, Any]:
    """(Label,) train, evaluate into ``out_dir``; returns timings, the label summary (dpo) and the comparison."""
    s = settings or Settings()
    out = Path(out_dir)
    for sub in ("labels", *OBJECTIVES, "eval"):
        shutil.rmtree(out / sub, ignore_errors=True)
    times: dict[str, float] = {}
    t0 = time.time()
    labelled, n = None, 3 if s.objective == "dpo" else 2
    reward = s.toy_world().reward
    if s.objective == "dpo":
        print(f"[1/3] labelling: {s.images_per_prompt} images per prompt from {s.base_path()}, scored by {reward}")
        labelled = label(out / "labels", s)
        times["label"] = time.time() - t0
        print(f"      {labelled['records']} prompts -> {labelled['pair_rows']} pairs in {times['label']:.0f} s")
    t1 = time.time()
    what = {
        "dpo": "Diffusion-DPO on the pairs",
        "draft": f"DRaFT-1 on the gradient of {reward}",
        "grpo": f"GRPO on groups of its own samples scored by {reward}",
    }[s.objective]
    print(f"[{n - 1}/{n}] training a LoRA with {what} (config {s.config_name()})")
    trained = train(out / s.objective, labelled["pairs_dir"] if labelled else None, s)
    times["train"] = time.time() - t1
    t2 = time.time()
    print(f"[{n}/{n}] evaluating base and base + LoRA on held-out prompts, {s.eval_seeds} seeds each")
    comparison = evaluate(out / "eval", str(trained["lora_dir"]), s)
    times["eval"] = time.time() - t2
    times["total"] = time.time() - t0
    return {
        "settings": asdict(s),
        "label": labelled,
        "train": {"steps": trained["step"], "lora_dir": str(trained["lora_dir"]), "history": trained["history"]},
        "comparison": comparison,
        "times_s": {k: round(v, 1) for k, v in times.items()},
        "report": str(out / "eval" / "compare" / "report.html"),
    }


def headline(result: dict[str, Any]) -> dict[str, float]:
    """The numbers the README quotes: the world's reward means, their difference and the LoRA-over-base win rate."""
    from diffalign.toy import worlds

    reward = worlds.get(result["settings"]["world"]).reward
    objective = result["settings"]["objective"]
    c = result["comparison"]["scorers"][reward]
    w = c["win_rate"]
    return {
        "reward": reward,
        "objective": objective,
        "base_reward": c["base"]["mean"],
        "aligned_reward": c[objective]["mean"],
        "difference": c["difference"]["mean"],
        "difference_ci_low": c["difference"]["ci_low"],
        "difference_ci_high": c["difference"]["ci_high"],
        "win_rate": w["win_rate"],
        "win_rate_ci_low": w["ci_low"],
        "win_rate_ci_high": w["ci_high"],
        "prompts": w["n"],
    }


def report(result: dict[str, Any]) -> str:
    from diffalign.eval import report as eval_report

    h, t = headline(result), result["times_s"]
    lines = [
        "",
        eval_report.compare_table(result["comparison"]),
        "",
        f"{h['reward']} on {h['prompts']} held-out prompts x {result['settings']['eval_seeds']} seeds: "
        f"base {h['base_reward']:.4f} -> {h['objective']} LoRA {h['aligned_reward']:.4f} "
        f"({h['difference']:+.4f}, 95% CI [{h['difference_ci_low']:+.4f}, {h['difference_ci_high']:+.4f}]); "
        f"{h['objective']} wins on {h['win_rate']:.0%} of prompts "
        f"(95% CI {h['win_rate_ci_low']:.0%}-{h['win_rate_ci_high']:.0%})",
        "time: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()),
        f"LoRA (diffusers format, pipe.load_lora_weights): {result['train']['lora_dir']}",
        f"report: {result['report']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/quickstart")
    parser.add_argument(
        "--objective",
        choices=tuple(OBJECTIVES),
        default="draft",
        help="draft (default: reward gradient, no labels), dpo (label pairs, then Diffusion-DPO) or grpo (online RL)",
    )
    parser.add_argument("--train-steps", type=int, default=None, help="optimizer steps (default: the config's)")
    parser.add_argument("--world", choices=("duo", "shapes"), default="duo", help="toy world (default: duo)")
    parser.add_argument("--label-prompts", type=int, default=None, help="first N labelling prompts (default: all)")
    parser.add_argument("--eval-prompts", type=int, default=None, help="first N held-out prompts (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    settings = Settings(
        world=args.world,
        objective=args.objective,
        train_steps=args.train_steps,
        label_prompts=args.label_prompts,
        eval_prompts=args.eval_prompts,
    )
    result = run(args.out, settings)
    print(report(result))
    summary = {k: v for k, v in result.items() if k != "comparison"} | {"headline": headline(result)}
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
