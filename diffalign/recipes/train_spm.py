"""Train SPO's step-aware preference model (SPM) on Pick-a-Pic pairs; the result scores SPO's step-wise candidates.

Each step (SPO ``step_aware_preference_model/trainer/tasks/spm_task.py``): pairs, winner first -> VAE latents ->
the SAME noise and the SAME t ~ U{0, ..., T-1} for both images of a pair -> x0_hat from the frozen diffusion model
with CFG 5.0 -> VAE decode -> SPM scores at t -> PickScore's pairwise cross-entropy (ties as 0.5/0.5 targets,
``diffalign.scorers._stepaware.pairwise_loss``). ``--pseudo-labels`` replaces the human labels by PickScore's on
the clean pair with a probability margin (SPO's SDXL SPM: 0.1). The SPM starts as an exact copy of PickScore and
is fully fine-tuned (SPO: AdamW, lr 3e-6 SD1.5 / 1e-6 SDXL, weight decay 0.3, batch 64, 8000 / 7000 steps, linear
warmup-decay, grad clip 1.0). Pairs are weighted uniformly (PickScore's 1/num_examples_per_prompt weights need a
column the loader does not read).

Launch (SD1.5 SPM as in SPO; the data path is a local Pick-a-Pic v1 copy or hub id):
    python recipes/train_spm.py --family sd15 --model-path runwayml/stable-diffusion-v1-5 \\
        --data-path pickapic-anonymous/pickapic_v1 --resolution 512 --batch-size 16 --lr 3e-6 \\
        --max-steps 8000 --scheduler linear --eval-split validation_unique --eval-every 500 --output-dir runs/spm-sd15

Outputs in ``--output-dir``: ``spm/`` (``diffalign.scorers.spm.load(dir)``; written every ``--save-every`` steps
and at the end, atomically), ``metrics.jsonl``, ``args.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffalign import errors, models
from diffalign.config import DataConfig, OptimConfig
from diffalign.data.loader import PlannedLoader, build_loader
from diffalign.fileio import append_jsonl, replace_dir
from diffalign.scorers import _stepaware, pickscore, spm
from diffalign.training import optim


logger = logging.getLogger("diffalign.train_spm")


@dataclass
class State:
    args: argparse.Namespace
    device: torch.device
    adapter: Any
    scorer: spm.StepAwarePreferenceModel
    labeller: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: PlannedLoader
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", required=True, choices=models.FAMILIES)
    p.add_argument("--model-path", required=True, help="hub id or diffusers folder of the frozen base model")
    p.add_argument("--model-dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--vae-path", default=None, help="replacement VAE, e.g. madebyollin/sdxl-vae-fp16-fix (SPO, SDXL)")
    p.add_argument("--pickscore", default=spm.DEFAULT_PICKSCORE, help="PickScore CLIPModel the SPM starts from")
    p.add_argument("--processor", default=spm.DEFAULT_PROCESSOR, help="tokenizer + preprocessor_config.json")
    p.add_argument("--init", default=None, help="continue from a saved SPM folder instead of PickScore")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="CFG of the x0 prediction (SPO: 5.0)")
    p.add_argument("--pseudo-labels", action="store_true", help="label pairs with PickScore (SPO's SDXL SPM)")
    p.add_argument("--pseudo-margin", type=float, default=0.1, help="softmax probability gap below which it is a tie")
    p.add_argument("--data-path", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--ties", default="keep", choices=["keep", "drop"], help="SPO keeps Pick-a-Pic ties")
    p.add_argument("--max-rows", type=int, default=None)
    p.add_argument("--hflip-prob", type=float, default=0.0)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-6)
    p.add_argument("--weight-decay", type=float, default=0.3)
    p.add_argument(
        "--scheduler", default="constant_with_warmup", choices=["constant", "constant_with_warmup", "linear", "cosine"]
    )
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="pairs per step")
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--eval-split", default=None, help="e.g. validation_unique; accuracy at --eval-timesteps")
    p.add_argument("--eval-timesteps", default="0,251,501,701,951")
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
    if args.resolution % 8:
        p.error(f"--resolution {args.resolution} must be a multiple of 8")
    return args


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
    """Frozen base model (x0 prediction + VAE), the SPM, the optional PickScore labeller, optimizer, data."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    adapter = models.load(args.family, args.model_path, dtype=args.model_dtype, vae_path=args.vae_path).to(device)
    if args.init:
        scorer = spm.load(args.init, device=device, processor_path=args.processor)
    else:
        config = spm.SPMConfig(guidance_scale=args.guidance_scale)
        scorer = spm.from_pickscore(args.pickscore, processor_path=args.processor, config=config, device=device)
    scorer.model.requires_grad_(True).train()
    labeller = None
    if args.pseudo_labels:
        labeller = pickscore.load(args.pickscore, processor_path=args.processor, device=device)
    ocfg = OptimConfig(
        lr=args.lr, weight_decay=args.weight_decay, scheduler=args.scheduler, warmup_steps=args.warmup_steps
    )
    optimizer = optim.build_optimizer(scorer.model.parameters(), ocfg)
    scheduler = optim.build_scheduler(optimizer, ocfg, args.max_steps)
    loader = build_loader(data_config(args, args.split, args.hflip_prob), batch_size=args.batch_size, seed=args.seed)
    return State(args, device, adapter, scorer, labeller, optimizer, scheduler, loader)


# ---- one batch ---------------------------------------------------------------------------------------------------
def pair_noise(adapter: Any, latent_shape: tuple[int, ...], seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One t and one noise draw per pair (shared by both images, as SPO): t (B,), eps (B, C, h, w)."""
    process, ts, eps = adapter.process, [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        if hasattr(process, "alphas_cumprod"):
            ts.append(torch.randint(0, process.num_train_timesteps, (1,), generator=gen)[0])
        else:
            ts.append(process.sample_timesteps(1, generator=gen)[0])
        eps.append(torch.randn(latent_shape, generator=gen))
    return torch.stack(ts), torch.stack(eps)


@torch.no_grad()
def x0_images(
    state: State, pixels: torch.Tensor, prompts: list[str], t: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """Pairs (B, 2, 3, H, W) in [-1, 1] -> decoded x0_hat of both noised images, (2B, 3, H, W) in [0, 1], pair-major."""
    adapter, b = state.adapter, pixels.shape[0]
    latents = adapter.encode_images(pixels.flatten(0, 1))
    t2 = t.to(latents.device).repeat_interleave(2)
    eps2 = eps.to(latents.device).repeat_interleave(2, dim=0)
    x_t = adapter.process.add_noise(latents, eps2, t2)
    prompts2 = [p for p in prompts for _ in range(2)]
    x0 = _stepaware.predict_x0(adapter, x_t, t2, prompts2, guidance_scale=state.scorer.config.guidance_scale)
    return ((adapter.decode_latents(x0).float() + 1.0) / 2.0).view(2 * b, *pixels.shape[2:])


def batch_labels(state: State, batch: Any) -> torch.Tensor:
    """(B, 2) targets: the batch's human labels, or PickScore pseudo-labels on the clean pair."""
    b = len(batch)
    if state.labeller is None:
        return _stepaware.pair_labels(batch.scores, b, state.device)
    clean = (batch.pixels.flatten(0, 1).float() + 1.0) / 2.0
    scores = state.labeller(clean.clamp(0, 1), [p for p in batch.prompts for _ in range(2)]).view(b, 2)
    return _stepaware.pseudo_labels(scores[:, 0], scores[:, 1], state.args.pseudo_margin).to(state.device)


def batch_loss(state: State, batch: Any, seeds: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
    """SPM pairwise loss of one batch (differentiable) and its metrics."""
    pixels = batch.pixels.to(state.device)
    shape = state.adapter.latent_shape(pixels.shape[-2], pixels.shape[-1])
    t, eps = pair_noise(state.adapter, shape, seeds)
    images = x0_images(state, pixels, batch.prompts, t, eps)
    labels = batch_labels(state, batch)
    scorer = state.scorer
    prompts2 = [p for p in batch.prompts for _ in range(2)]
    scores = scorer.score_pixels(scorer.preprocess(images), t.repeat_interleave(2), prompts2).view(-1, 2)
    loss = _stepaware.pairwise_loss(scores[:, 0], scores[:, 1], labels)
    acc = _stepaware.pairwise_accuracy(scores[:, 0].detach(), scores[:, 1].detach(), labels).mean()
    ties = (labels[:, 0] == labels[:, 1]).float().mean()
    return loss, {"loss": float(loss.detach()), "accuracy": float(acc), "tie_fraction": float(ties)}


def train_step(state: State, batch: Any, seeds: list[int]) -> dict[str, float]:
    """One optimizer step on ``batch``; a non-finite loss stops the run before the step is applied."""
    loss, metrics = batch_loss(state, batch, seeds)
    if not math.isfinite(metrics["loss"]):
        raise FloatingPointError(f"non-finite SPM loss at step {state.step + 1}: {metrics}; lower --lr")
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if state.args.max_grad_norm:
        params = [p for p in state.scorer.model.parameters() if p.grad is not None]
        metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, state.args.max_grad_norm))
    state.optimizer.step()
    state.scheduler.step()
    state.step += 1
    metrics["lr"] = state.scheduler.get_last_lr()[0]
    return metrics


@torch.no_grad()
def evaluate(state: State) -> dict[str, float]:
    """Pairwise accuracy (ties give 0.5 credit) on ``--eval-split`` at each ``--eval-timesteps`` (t = 0: clean)."""
    args = state.args
    loader = build_loader(data_config(args, args.eval_split, 0.0), batch_size=args.batch_size, seed=args.seed)
    timesteps = [int(t) for t in args.eval_timesteps.split(",") if t.strip()]
    scorer, credit = state.scorer, {t: [] for t in timesteps}
    scorer.model.eval()
    for _ in range(loader.num_items // args.batch_size):
        batch, seeds = loader.next_batch()
        if len(batch) == 0:
            continue
        pixels, labels = batch.pixels.to(state.device), batch_labels(state, batch)
        prompts2 = [p for p in batch.prompts for _ in range(2)]
        shape = state.adapter.latent_shape(pixels.shape[-2], pixels.shape[-1])
        _, eps = pair_noise(state.adapter, shape, seeds)
        for t in timesteps:
            t_b = torch.full((len(batch),), t)
            images = (pixels.flatten(0, 1) + 1) / 2 if t == 0 else x0_images(state, pixels, batch.prompts, t_b, eps)
            scores = scorer.score_pixels(scorer.preprocess(images), t_b.repeat_interleave(2), prompts2).view(-1, 2)
            credit[t].append(_stepaware.pairwise_accuracy(scores[:, 0], scores[:, 1], labels).cpu())
    scorer.model.train()
    return {f"eval/accuracy@{t}": float(torch.cat(v).mean()) for t, v in credit.items() if v}


def save(state: State) -> Path:
    """Write ``output_dir/spm`` atomically (temporary folder, then rename)."""
    out = Path(state.args.output_dir) / "spm"
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
    while state.step < args.max_steps:
        batch, seeds = state.loader.next_batch()
        if len(batch) == 0:  # every row of this batch was a skipped bad row
            continue
        metrics = train_step(state, batch, seeds)
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
    spm_dir = save(state)
    logger.info("data: %s; SPM written to %s", state.loader.stats_summary(), spm_dir)
    return {"step": state.step, "history": state.history, "eval": evals, "spm_dir": spm_dir}


if __name__ == "__main__":
    errors.script_main(main)
