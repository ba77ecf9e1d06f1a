"""Pretrain a toy base model (``assets/toy_duo``, ``assets/toy_base``) from scratch on a CPU, on rendered scenes.

The model is an SD1.5-style pipeline (``diffalign.toy.model``: ``UNet2DConditionModel``, ``AutoencoderKL``,
``CLIPTextModel`` + the real CLIP tokenizer, ``DDIMScheduler``); the data is a toy world (``--world duo``: two
shapes side by side, ``diffalign.toy.duo``; ``--world shapes``: one shape on a coloured background,
``diffalign.toy.world``), drawn fresh every step from a seeded generator, so there is no dataset to ship.

1. **VAE.** ``--vae-steps`` steps of L1 + L2 reconstruction + ``--kl-weight`` KL on 32x32 renders. Its
   ``scaling_factor`` is then set to ``1 / std`` of the latent means of 1024 fresh renders (SD's convention: unit
   variance latents for the diffusion model).
2. **Text-to-image model.** ``--steps`` steps of the v-prediction loss ``|v - v_theta(x_t, t, c)|^2``,
   ``v = sqrt(a_t) eps - sqrt(1 - a_t) x0`` (the scheduler's prediction type and cosine schedule), uniform timesteps, latents = the VAE posterior mean (as ``diffalign`` adapters encode),
   training the UNet and the CLIP text encoder together. Captions come from the world's ``noisy_caption``: a
   ``--caption-noise`` fraction is wrong (web alt-text is noisy; shapes: about the object's colour; duo: half
   binding errors, the mirrored scene's caption, half a wrong shape word), and a
   ``--cond-dropout`` fraction is replaced by the empty prompt so classifier-free guidance works. AdamW with linear
   warm-up and cosine decay; the saved weights are an EMA (``--ema-decay``, with the usual ``(1 + n) / (10 + n)``
   ramp).

The result is written with ``save_pretrained`` (safetensors) as a diffusers folder that
``StableDiffusionPipeline.from_pretrained`` and ``diffalign.models.load("sd15", ...)`` load, plus
``pretrain.json`` (arguments, losses, wall times, library versions).

Reproduce the shipped models (the exact commands are in each folder's ``pretrain.json`` and README)::

    python recipes/pretrain_toy.py --world duo --out assets/toy_duo --vae-steps 1000 --steps 6000 --threads 2
    python recipes/pretrain_toy.py --out assets/toy_base --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from diffalign import errors
from diffalign.toy import duo, model, world


logger = logging.getLogger("diffalign.pretrain_toy")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output diffusers folder (e.g. assets/toy_base)")
    p.add_argument("--world", choices=sorted(WORLDS), default="shapes",
                   help="shapes: one shape on a coloured background (assets/toy_base); duo: two shapes side by side "
                   "(assets/toy_duo)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--vae-batch-size", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=3e-3)
    p.add_argument("--kl-weight", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--caption-noise", type=float, default=None,
                   help="fraction of wrong captions (default: the world's, shapes 0.2, duo 0.4)")  # fmt: skip
    p.add_argument(
        "--right-share",
        type=float,
        default=0.5,
        help="duo: fraction of captions phrased 'B to the right of A' (the rest 'A to the left of B')",
    )
    p.add_argument("--unet-channels", type=int, nargs="+", default=[32, 64, 64], help="UNet block widths")
    p.add_argument("--cond-dropout", type=float, default=0.1)
    p.add_argument("--log-every", type=int, default=100)
    args = p.parse_args(argv)
    for name in ("vae_steps", "steps", "batch_size", "vae_batch_size", "threads", "log_every"):
        if getattr(args, name) < (0 if name.endswith("steps") else 1):
            raise SystemExit(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.caption_noise is None:
        args.caption_noise = WORLDS[args.world][1]
    if not 0 <= args.caption_noise <= 1 or not 0 <= args.cond_dropout < 1:
        raise SystemExit("--caption-noise must be in [0, 1] and --cond-dropout in [0, 1)")
    return args


WORLDS: dict[str, tuple[Any, float]] = {"shapes": (world, 0.2), "duo": (duo, 0.4)}  # module, default caption noise


def render_batch(n: int, gen: torch.Generator, scenes_from: Any = world) -> tuple[torch.Tensor, list[Any]]:
    """``n`` fresh scenes of the world module ``scenes_from`` and their images in [-1, 1] (the VAE's input range)."""
    scenes = scenes_from.sample_scenes(n, gen)
    return scenes_from.render(scenes) * 2 - 1, scenes


# ---- stage 1: the VAE ---------------------------------------------------------------------------------------
def train_vae(vae: Any, args: argparse.Namespace, gen: torch.Generator) -> dict[str, float]:
    """Reconstruction + KL training; returns the final losses. Sets ``vae.config.scaling_factor``."""
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, args.vae_steps, warmup=20))
    vae.train()
    recent: list[float] = []
    for step in range(1, args.vae_steps + 1):
        x, _ = render_batch(args.vae_batch_size, gen, WORLDS[args.world][0])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mean).sample  # deterministic: adapters encode with the mean too
        loss_rec = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        loss = loss_rec + args.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        recent = [*recent[-49:], loss_rec.item()]
        if step % args.log_every == 0 or step == args.vae_steps:
            logger.info("vae step %d/%d  recon %.4f", step, args.vae_steps, sum(recent) / len(recent))
    vae.eval()
    with torch.no_grad():
        x, _ = render_batch(1024, gen, WORLDS[args.world][0])
        z = torch.cat([vae.encode(c).latent_dist.mean for c in x.split(128)])
        rec = torch.cat([vae.decode(c).sample for c in z.split(128)]).clamp(-1, 1)
        std = float(z.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    return {"vae_recon_mae": float((rec - x).abs().mean() / 2), "latent_std": std}


# ---- stage 2: UNet + text encoder ---------------------------------------------------------------------------
def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def captions_for(scenes: Sequence[Any], args: argparse.Namespace, gen: torch.Generator) -> list[str]:
    if args.world == "duo":
        texts = [duo.noisy_caption(s, args.caption_noise, gen, args.right_share) for s in scenes]
    else:
        texts = [world.noisy_caption(s, args.caption_noise, gen) for s in scenes]
    drop = torch.rand(len(texts), generator=gen) < args.cond_dropout
    return ["" if d else t for t, d in zip(texts, drop.tolist(), strict=True)]


def train_denoiser(parts: dict[str, Any], args: argparse.Namespace, gen: torch.Generator) -> dict[str, Any]:
    """Denoising (v- or epsilon-prediction) training of the UNet + text encoder; returns EMA copies of both and the losses."""
    unet, text, tok, vae = parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["vae"]
    alphas_cumprod = parts["scheduler"].alphas_cumprod.float()
    v_pred = parts["scheduler"].config.prediction_type == "v_prediction"
    params = [*unet.parameters(), *text.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, args.steps, args.warmup))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    ema_params = [*ema_unet.parameters(), *ema_text.parameters()]
    unet.train()
    text.train()
    scale = vae.config.scaling_factor
    recent: list[float] = []
    for step in range(1, args.steps + 1):
        x, scenes = render_batch(args.batch_size, gen, WORLDS[args.world][0])
        with torch.no_grad():
            z0 = vae.encode(x).latent_dist.mean * scale
        ids = tok(captions_for(scenes, args, gen), padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids  # fmt: skip
        t = torch.randint(0, alphas_cumprod.numel(), (args.batch_size,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
        target = a.sqrt() * eps - (1 - a).sqrt() * z0 if v_pred else eps
        pred = unet(z_t, t, encoder_hidden_states=text(ids)[0]).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        recent = [*recent[-99:], loss.item()]
        if step % args.log_every == 0 or step == args.steps:
            logger.info("unet step %d/%d  loss %.4f  lr %.2e", step, args.steps, sum(recent) / len(recent),
                        sched.get_last_lr()[0])  # fmt: skip
    return {"unet": ema_unet, "text_encoder": ema_text, "loss": sum(recent) / max(1, len(recent))}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    parts = {
        "unet": model.unet(channels=tuple(args.unet_channels)),
        "vae": model.vae(),
        "text_encoder": model.text_encoder(),
        "tokenizer": model.tokenizer(),
        "scheduler": model.scheduler(),
    }
    start = time.time()
    vae_stats = train_vae(parts["vae"], args, gen)
    vae_time = time.time() - start
    parts["vae"].requires_grad_(False)
    trained = train_denoiser(parts, args, gen)
    total = time.time() - start
    parts["unet"], parts["text_encoder"] = trained["unet"], trained["text_encoder"]
    out = Path(args.out)
    pipe = model.pipeline(parts)
    pipe.save_pretrained(out, safe_serialization=True)
    record = {
        "command": "python recipes/pretrain_toy.py " + " ".join(argv if argv is not None else _argv()),
        "args": vars(args),
        "vae": vae_stats,
        "final_loss": trained["loss"],
        "wall_time_s": {"vae": round(vae_time, 1), "total": round(total, 1)},
        "versions": _versions(),
    }
    (out / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    logger.info("wrote %s in %.0f s (vae %.0f s)", out, total, vae_time)
    return record


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


if __name__ == "__main__":
    errors.script_main(main)
