"""Train LPO's latent reward model (LRM) on Pick-a-Pic pairs; the result scores LPO's step-wise candidate latents.

Each step (Kwai-Kolors/LPO ``lrm/lrm_15/trainer/tasks/step_sd_task.py``): pairs, winner first -> optional data
filter (LPO's multi-preference consistent filtering keeps pairs whose winner is not worse on other scorers, plus
near-equal pairs as ties) -> VAE latents -> one t per pair from the 20-step DDIM grid {1, 51, ..., 951}, the same t
for both images and INDEPENDENT noise per image (``--shared-noise`` for SPO-style shared noise) -> LRM scores of
the noisy latents -> PickScore's pairwise cross-entropy with ties (``_stepaware.pairwise_loss``). The VAE is frozen;
trunk, text encoders (``--freeze-text-encoders`` to keep them), projections and logit scale are trained (LPO: AdamW,
lr 1e-5, weight decay 0.3, SD1.5 batch 128 x 4000 steps with 500 warm-up, SDXL batch 32 x 8000 with 1000).

Filters (``--filter`` is repeatable; a pair must pass all):
    --filter '{"scorer": "pickscore", "min_gap": 0.0, "tie_gap": 0.03}'   # any image scorer + its load() kwargs
    --filter-fn mypackage.filters:mpcf                                    # a callable, see PairFilter
A scorer rule computes gap = s(image 0) - s(image 1) on the clean pair. A decided pair is kept iff gap > min_gap for
every rule; with tie_gap set on every rule, a pair with |gap| < tie_gap everywhere is kept as a 0.5/0.5 tie; labelled
ties are kept only through that tie rule when one is given (else kept as they are).

Launch:
    python recipes/train_lrm.py --family sd15 --model-path runwayml/stable-diffusion-v1-5 \\
        --data-path pickapic-anonymous/pickapic_v1 --resolution 512 --batch-size 16 --lr 1e-5 --warmup-steps 500 \\
        --max-steps 4000 --text-projection-init openai/clip-vit-large-patch14 --output-dir runs/lrm-sd15

Outputs in ``--output-dir``: ``lrm/`` (``diffalign.scorers.lrm.load(dir)``; every ``--save-every`` steps and at the
end, atomically), ``metrics.jsonl``, ``args.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffalign import errors, models, scorers
from diffalign.config import DataConfig, OptimConfig
from diffalign.data.loader import PlannedLoader, build_loader
from diffalign.fileio import append_jsonl, replace_dir
from diffalign.scorers import _stepaware, lrm
from diffalign.training import optim


logger = logging.getLogger("diffalign.train_lrm")

# (prompts, clean images (B, 2, 3, H, W) in [0, 1], labels (B, 2)) -> (keep (B,) bool, labels (B, 2))
PairFilter = Callable[[list[str], Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class GapRule:
    """One scorer of a consistency filter: keep decided pairs with gap > min_gap; |gap| < tie_gap -> tie."""

    scorer: Any
    min_gap: float = 0.0
    tie_gap: float | None = None


class ConsistencyFilter:
    """LPO-style multi-preference consistent filtering over one or more image scorers (module docstring)."""

    def __init__(self, rules: Sequence[GapRule]) -> None:
        if not rules:
            raise ValueError("ConsistencyFilter needs at least one GapRule")
        self.rules = list(rules)

    @torch.no_grad()
    def __call__(self, prompts: list[str], images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        b = len(prompts)
        decided = labels[:, 0] != labels[:, 1]
        agree = torch.ones(b, dtype=torch.bool)
        near = torch.ones(b, dtype=torch.bool) if all(r.tie_gap is not None for r in self.rules) else None
        for rule in self.rules:
            scores = rule.scorer(images.flatten(0, 1).cpu(), [p for p in prompts for _ in range(2)]).view(b, 2)
            gap = scores[:, 0] - scores[:, 1]
            agree &= gap > rule.min_gap
            if near is not None:
                near &= gap.abs() < rule.tie_gap
        decided, labels = decided.cpu(), labels.cpu().clone()
        keep = (decided & agree) if near is not None else (~decided | agree)
        if near is not None:
            keep |= near
            labels[near] = 0.5
        return keep, labels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", required=True, choices=models.FAMILIES)
    p.add_argument("--model-path", required=True, help="hub id or diffusers folder the LRM is initialised from")
    p.add_argument("--model-dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="frozen VAE/base weights")
    p.add_argument("--vae-path", default=None, help="replacement VAE, e.g. madebyollin/sdxl-vae-fp16-fix (LPO, SDXL)")
    p.add_argument("--init", default=None, help="continue from a saved LRM folder")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="VFE: CFG on the mid feature (1 = off)")
    p.add_argument("--no-multi-scale", action="store_true", help="mid feature only")
    p.add_argument("--multi-scale-cfg", action="store_true", help="guide the down-stage features too")
    p.add_argument("--text-projection-init", default="identity", help="identity | normal | CLIP checkpoint")
    p.add_argument("--sd3-num-blocks", type=int, default=None, help="SD3: joint blocks kept (paper: 18)")
    p.add_argument("--freeze-text-encoders", action="store_true")
    p.add_argument("--timesteps", default=",".join(str(t) for t in lrm.TIMESTEP_GRID), help="training t values")
    p.add_argument("--shared-noise", action="store_true", help="same noise for both images (LPO: independent)")
    p.add_argument("--filter", action="append", default=[], help="JSON scorer rule, repeatable (see docstring)")
    p.add_argument("--filter-fn", default=None, help="module:attr of a PairFilter callable")
    p.add_argument("--data-path", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--ties", default="keep", choices=["keep", "drop"])
    p.add_argument("--max-rows", type=int, default=None)
    p.add_argument("--hflip-prob", type=float, default=0.0)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=0.3)
    p.add_argument(
        "--scheduler", default="constant_with_warmup", choices=["constant", "constant_with_warmup", "linear", "cosine"]
    )
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="pairs per step (before filtering)")
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--eval-split", default=None, help="e.g. validation_unique; accuracy at --eval-timesteps")
    p.add_argument("--eval-timesteps", default="1", help="LPO validates at t = 1")
    p.add_argument("--eval-every", type=int, default=0, help="0: evaluate only at the end (if --eval-split)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = p.parse_args(argv)
    for name in ("batch_size", "max_steps", "log_every", "save_every", "resolution"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    try:
        args.timestep_values = [int(t) for t in args.timesteps.split(",") if t.strip()]
    except ValueError:
        p.error(f"--timesteps must be comma-separated integers, got {args.timesteps!r}")
    if not args.timestep_values:
        p.error("--timesteps is empty")
    return args


def build_filter(args: argparse.Namespace, device: torch.device) -> PairFilter | None:
    """The ``--filter`` rules as one ``ConsistencyFilter`` and/or the ``--filter-fn`` callable (all must pass)."""
    filters: list[PairFilter] = []
    if args.filter:
        rules = []
        for i, text in enumerate(args.filter):
            spec = json.loads(text)
            if not isinstance(spec, dict) or "scorer" not in spec:
                raise ValueError(f"--filter #{i} must be a JSON object with a 'scorer' key, got {text!r}")
            name = spec.pop("scorer")
            min_gap, tie_gap = float(spec.pop("min_gap", 0.0)), spec.pop("tie_gap", None)
            scorer = scorers.load(name, device=device, **spec)
            rules.append(GapRule(scorer, min_gap, None if tie_gap is None else float(tie_gap)))
        filters.append(ConsistencyFilter(rules))
    if args.filter_fn:
        module, _, attr = args.filter_fn.partition(":")
        if not attr:
            raise ValueError(f"--filter-fn must look like package.module:function, got {args.filter_fn!r}")
        filters.append(getattr(importlib.import_module(module), attr))
    if not filters:
        return None
    if len(filters) == 1:
        return filters[0]

    def all_of(prompts: list[str], images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        keep = torch.ones(len(prompts), dtype=torch.bool)
        for fn in filters:
            ok, labels = fn(prompts, images, labels)
            keep &= ok.cpu()
        return keep, labels

    return all_of


@dataclass
class State:
    args: argparse.Namespace
    device: torch.device
    adapter: Any
    scorer: lrm.LatentRewardScorer
    pair_filter: PairFilter | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: PlannedLoader
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    kept: int = 0
    seen: int = 0


def data_config(args: argparse.Namespace, split: str, hflip: float) -> DataConfig:
    return DataConfig(
        format="pickapic",
        path=args.data_path,
        split=split,
        resolution=args.resolution,
        crop="center",
        hflip_prob=hflip,
        ties=args.ties,
        max_rows=args.max_rows,
        num_workers=args.num_workers,
    )


def build(args: argparse.Namespace) -> State:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    adapter = models.load(args.family, args.model_path, dtype=args.model_dtype, vae_path=args.vae_path).to(device)
    if args.init:
        scorer = lrm.load(args.init, adapter=adapter, device=device)
    else:
        scorer = lrm.from_adapter(
            adapter,
            guidance_scale=args.guidance_scale,
            multi_scale=not args.no_multi_scale,
            multi_scale_cfg=args.multi_scale_cfg,
            text_projection_init=args.text_projection_init,
            sd3_num_blocks=args.sd3_num_blocks,
            device=device,
        )
    scorer.model.requires_grad_(True).train()
    if args.freeze_text_encoders:
        scorer.model.text_encoders.requires_grad_(False)
    params = [p for p in scorer.model.parameters() if p.requires_grad]
    ocfg = OptimConfig(
        lr=args.lr, weight_decay=args.weight_decay, scheduler=args.scheduler, warmup_steps=args.warmup_steps
    )
    optimizer = optim.build_optimizer(params, ocfg)
    scheduler = optim.build_scheduler(optimizer, ocfg, args.max_steps)
    loader = build_loader(data_config(args, args.split, args.hflip_prob), batch_size=args.batch_size, seed=args.seed)
    return State(args, device, adapter, scorer, build_filter(args, device), optimizer, scheduler, loader)


# ---- one batch ---------------------------------------------------------------------------------------------------
def pair_noise(
    latent_shape: tuple[int, ...], seeds: list[int], grid: Sequence[int], shared: bool
) -> tuple[Tensor, Tensor]:
    """Per pair: t drawn from ``grid`` and noise for both images (B, 2, C, h, w), from the pair's seed."""
    ts, eps = [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        ts.append(grid[int(torch.randint(0, len(grid), (1,), generator=gen))])
        first = torch.randn(latent_shape, generator=gen)
        eps.append(torch.stack([first, first if shared else torch.randn(latent_shape, generator=gen)]))
    return torch.tensor(ts), torch.stack(eps)


def pair_loss(
    model: lrm.LatentRewardModel,
    process: Any,
    latents: Tensor,
    prompts: list[str],
    labels: Tensor,
    timesteps: Tensor,
    noise: Tensor,
    *,
    adapter: Any = None,
) -> tuple[Tensor, Tensor]:
    """Clean pair latents (B, 2, C, h, w) noised to ``timesteps`` (B,) with ``noise`` (B, 2, C, h, w) -> the LRM's
    pairwise loss (scalar, differentiable) and its scores (B, 2)."""
    b = latents.shape[0]
    t2 = timesteps.to(latents.device).repeat_interleave(2)
    x_t = process.add_noise(latents.flatten(0, 1), noise.to(latents.device).flatten(0, 1), t2)
    scores = model(x_t, t2, [p for p in prompts for _ in range(2)], adapter=adapter).view(b, 2)
    return _stepaware.pairwise_loss(scores[:, 0], scores[:, 1], labels.to(scores.device)), scores


def filtered(state: State, batch: Any, seeds: list[int]) -> tuple[Tensor, list[str], Tensor, list[int]]:
    """Pixels (b, 2, 3, H, W), prompts, labels (b, 2) and noise seeds of the pairs that pass the filter."""
    labels = _stepaware.pair_labels(batch.scores, len(batch))
    pixels, prompts = batch.pixels, list(batch.prompts)
    if state.pair_filter is None:
        return pixels, prompts, labels, list(seeds)
    keep, labels = state.pair_filter(prompts, ((pixels + 1) / 2).clamp(0, 1), labels)
    keep = keep.cpu().bool().tolist()
    index = [i for i, k in enumerate(keep) if k]
    return pixels[index], [prompts[i] for i in index], labels.cpu()[index], [seeds[i] for i in index]


def batch_loss(state: State, pixels: Tensor, prompts: list[str], labels: Tensor, seeds: list[int]):
    adapter, args = state.adapter, state.args
    b = pixels.shape[0]
    latents = adapter.encode_images(pixels.flatten(0, 1).to(state.device))
    latents = latents.view(b, 2, *latents.shape[1:])
    t, noise = pair_noise(tuple(latents.shape[2:]), seeds, args.timestep_values, args.shared_noise)
    loss, scores = pair_loss(state.scorer.model, adapter.process, latents, prompts, labels, t, noise, adapter=adapter)
    acc = _stepaware.pairwise_accuracy(scores[:, 0].detach(), scores[:, 1].detach(), labels).mean()
    return loss, {"loss": float(loss.detach()), "accuracy": float(acc), "pairs": float(b)}


def train_step(state: State, batch: Any, seeds: list[int]) -> dict[str, float] | None:
    """One optimizer step on the pairs of ``batch`` that pass the filter; None when none pass."""
    pixels, prompts, labels, kept_seeds = filtered(state, batch, seeds)
    state.seen, state.kept = state.seen + len(batch), state.kept + len(prompts)
    if not prompts:
        return None
    loss, metrics = batch_loss(state, pixels, prompts, labels, kept_seeds)
    if not math.isfinite(metrics["loss"]):
        raise FloatingPointError(f"non-finite LRM loss at step {state.step + 1}: {metrics}; lower --lr")
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if state.args.max_grad_norm:
        params = [p for p in state.scorer.model.parameters() if p.grad is not None]
        metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, state.args.max_grad_norm))
    state.optimizer.step()
    state.scheduler.step()
    state.step += 1
    metrics.update(lr=state.scheduler.get_last_lr()[0], kept_fraction=state.kept / max(state.seen, 1))
    return metrics


@torch.no_grad()
def evaluate(state: State) -> dict[str, float]:
    """Pairwise accuracy (ties 0.5 credit) on ``--eval-split`` at each ``--eval-timesteps`` (no filtering)."""
    args = state.args
    loader = build_loader(data_config(args, args.eval_split, 0.0), batch_size=args.batch_size, seed=args.seed)
    model, credit = state.scorer.model, {}
    model.eval()
    for _ in range(loader.num_items // args.batch_size):
        batch, seeds = loader.next_batch()
        if len(batch) == 0:
            continue
        labels = _stepaware.pair_labels(batch.scores, len(batch))
        latents = state.adapter.encode_images(batch.pixels.flatten(0, 1).to(state.device))
        latents = latents.view(len(batch), 2, *latents.shape[1:])
        _, noise = pair_noise(tuple(latents.shape[2:]), seeds, [0], args.shared_noise)
        for t in (int(v) for v in args.eval_timesteps.split(",") if v.strip()):
            t_b = torch.full((len(batch),), t)
            _, scores = pair_loss(
                model, state.adapter.process, latents, batch.prompts, labels, t_b, noise, adapter=state.adapter
            )
            credit.setdefault(t, []).append(_stepaware.pairwise_accuracy(scores[:, 0], scores[:, 1], labels).cpu())
    model.train()
    return {f"eval/accuracy@{t}": float(torch.cat(v).mean()) for t, v in credit.items()}


def save(state: State) -> Path:
    """Write ``output_dir/lrm`` atomically (temporary folder, then rename)."""
    out = Path(state.args.output_dir) / "lrm"
    replace_dir(out, state.scorer.save_pretrained)
    return out


def log(state: State, metrics: dict[str, float]) -> None:
    append_jsonl(Path(state.args.output_dir) / "metrics.jsonl", {"step": state.step, **metrics})
    logger.info("step %d: %s", state.step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    state = build(args)
    evals: dict[str, float] = {}
    empty = 0
    while state.step < args.max_steps:
        batch, seeds = state.loader.next_batch()
        metrics = train_step(state, batch, seeds) if len(batch) else None
        if metrics is None:
            empty += 1
            if empty > 1000:
                raise RuntimeError(
                    f"1000 batches in a row had no pair left after filtering ({state.kept} kept so far)"
                )
            continue
        empty = 0
        state.history.append(metrics)
        if args.eval_split and args.eval_every and state.step % args.eval_every == 0:
            evals = evaluate(state)
            metrics = {**metrics, **evals}
        if state.step % args.log_every == 0 or state.step == 1:
            log(state, metrics)
        if state.step % args.save_every == 0:
            save(state)
    if args.eval_split and not (args.eval_every and state.step % args.eval_every == 0):
        evals = evaluate(state)
        log(state, evals)
    lrm_dir = save(state)
    logger.info("kept %d of %d pairs after filtering; LRM written to %s", state.kept, state.seen, lrm_dir)
    return {
        "step": state.step,
        "history": state.history,
        "eval": evals,
        "lrm_dir": lrm_dir,
        "kept": state.kept,
        "seen": state.seen,
    }


if __name__ == "__main__":
    errors.script_main(main)
