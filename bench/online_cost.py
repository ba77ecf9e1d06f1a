"""Seconds per GRPO iteration (one rollout round + its update) split into rollout, scoring and update.

Runs ``recipes/online_rl.py`` in this process for ``--rounds`` rounds per setting and reads the times the recipe logs
per optimizer step (``updates_per_round`` 1, so one step = one round):

* ``time/rollout``: sampling the round's images with the SDE sampler (every transition and its log-prob kept) and
  decoding them (no grad);
* ``time/scoring``: the reward scorers on the decoded images;
* ``time/update``: ``loop.optimizer_step``: for every micro-batch and every trained step, the policy's log-prob of
  the stored transition (forward with grad, CFG batch), the GRPO loss and its backward, then the optimizer step.

Settings (the shipped configs, only ``run.max_steps`` / ``run.save_every`` changed):

* ``toy_world_grpo``: ``toy/grpo_world`` on ``assets/toy_base`` (SD1.5-family UNet, 32x32 images), 8 prompts x 8
  images, 20-step DDIM eta 1 + CFG 3, 10 trained steps, the toy reward;
* ``toy_world_ddpo``: ``toy/ddpo_world`` (the same with 19 trained steps and CFG trained through both branches);
* ``tiny_sd3_grpo``: ``toy/grpo`` on a tiny random-init SD3 (``diffalign.models.tiny``), 2 prompts x 4 images,
  4-step Flow-GRPO SDE + CFG 4.5, 3 trained steps, KL to the reference on (one more forward per trained step),
  the ``toy_pixel`` reward.

* ``sd35m_grpo`` (opt-in; for a GPU): ``toy/grpo`` made SD3.5-Medium-sized as ``sd3/grpo_pickscore`` runs it, on a
  saved pipeline whose transformer is SD3.5-Medium's published config (``bench/configs/sd35_medium_transformer.json``,
  2243.2M parameters, random init) with SD3's VAE shape (8x, 16 channels) and tiny text encoders whose outputs have
  the real widths (T5 4096, pooled 2048; text encoding is a few prompts per round): 512 px, 2 prompts x 4 images,
  10-step Flow-GRPO SDE + CFG 4.5, 9 trained steps, KL on, LoRA r32, ``--dtype`` bf16 (default) base and autocast,
  the ``toy_pixel`` reward. ``--shape smoke`` swaps in a tiny transformer and VAE of the same kind (CPU check).

The first round (warm-up: allocator, lazy inits) is dropped; each figure is the median over the others. The device
is accelerate's default (a GPU when one is visible). Run (2 CPU cores, ~3 min)::

    HF_HUB_OFFLINE=1 python bench/online_cost.py --threads 1
    python bench/online_cost.py --settings sd35m_grpo --rounds 3          # on a GPU, ~2 min
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch


PARTS = ("time/rollout", "time/scoring", "time/update")


SD3_VAE = {  # stabilityai/stable-diffusion-3.5-medium vae/config.json (83.7M parameters)
    "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 16, "norm_num_groups": 32,
    "scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False,
}  # fmt: skip
SMOKE_VAE = {"block_out_channels": (8, 16), "layers_per_block": 1, "latent_channels": 16, "norm_num_groups": 4,
             "scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False}  # fmt: skip
# T5 width 64 > the two CLIPs' 16 + 16, so the CLIP states are zero-padded to it as at real size (2048 -> 4096)
SMOKE_TRANSFORMER = {"num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 64,
                     "caption_projection_dim": 16, "pooled_projection_dim": 32, "pos_embed_max_size": 32,
                     "dual_attention_layers": [0], "sample_size": 16}  # fmt: skip


def sd35m_pipeline(out: Path, shape: str = "real") -> Path:
    """Write the ``sd35m_grpo`` pipeline folder (bf16 transformer): SD3.5-Medium's transformer config (``smoke``:
    tiny widths) with SD3's VAE and tiny text encoders whose outputs have the transformer's widths."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    from diffalign.models import tiny

    config = json.loads((Path(__file__).resolve().parent / "configs" / "sd35_medium_transformer.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if shape == "smoke":
        config |= SMOKE_TRANSFORMER
    comps = tiny.sd3(0)
    t5_width, pooled = config["joint_attention_dim"], config["pooled_projection_dim"]
    try:  # random init of 2.2B parameters: seconds on a GPU, ~a minute on a few CPU cores
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            transformer = SD3Transformer2DModel(**config)
    except RuntimeError as err:
        print(
            f"sd35m_grpo: building the transformer on the GPU failed ({err}); building it on the CPU", file=sys.stderr
        )
        transformer = SD3Transformer2DModel(**config)
    comps["transformer"] = transformer.to("cpu", torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(tiny.T5_TOKENIZER)
    t5 = T5Config(vocab_size=tok.vocab_size, d_model=t5_width, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                  relative_attention_num_buckets=8, decoder_start_token_id=0)  # fmt: skip
    comps["text_encoder_3"] = T5EncoderModel(t5).eval()
    comps["text_encoder"] = tiny._clip_text(16, projection=pooled // 2).eval()  # pooled CLIP-L + CLIP-G = 2048
    comps["text_encoder_2"] = tiny._clip_text(16, projection=pooled - pooled // 2).eval()
    vae = SD3_VAE if shape == "real" else SMOKE_VAE
    n = len(vae["block_out_channels"])
    comps["vae"] = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                                 up_block_types=("UpDecoderBlock2D",) * n, **vae).eval()  # fmt: skip
    import diffusers

    diffusers.StableDiffusion3Pipeline(**comps).save_pretrained(out, safe_serialization=True)
    return out


def run_setting(
    name: str,
    out: Path,
    rounds: int,
    *,
    dtype: str = "bf16",
    shape: str = "real",
    resolution: int = 512,
    steps: int = 10,
) -> dict[str, Any]:
    from diffalign import config as dconfig
    from diffalign import quickstart
    from diffalign.models import tiny

    overrides = [f"run.output_dir={out / name}", "run.report_to=[]", f"run.max_steps={rounds}"]
    overrides += [f"run.save_every={rounds}", "run.log_every=1"]
    if name == "sd35m_grpo":  # sd3/grpo_pickscore's sampler and LoRA at a small batch (2 micro-batches x 9 steps)
        config = "toy/grpo"
        overrides += [f"model.path={sd35m_pipeline(out / 'sd35m_model', shape)}", f"model.dtype={dtype}"]
        overrides += [f"run.mixed_precision={'no' if dtype == 'fp32' else dtype}", f"data.resolution={resolution}"]
        trained = max(1, min(int(steps * 0.99), steps - 1))  # toy/grpo's timestep_fraction 0.99; 2 micro-batches
        overrides += [f"online.num_steps={steps}", "lora.rank=32", "lora.alpha=64", f"optim.grad_accum={2 * trained}"]
    elif name == "tiny_sd3_grpo":
        config = "toy/grpo"
        overrides.append(f"model.path={tiny.save('sd3', out / 'tiny_sd3')}")
    else:
        config = {"toy_world_grpo": "toy/grpo_world", "toy_world_ddpo": "toy/ddpo_world"}[name]
    cfg = dconfig.load(config, overrides)
    result = quickstart.load_recipe("online_rl").main(["--config", config, *overrides])
    history = result["history"][1:]  # round 1 is warm-up
    row = {part: statistics.median(h[part] for h in history) for part in PARTS}
    row["total"] = statistics.median(sum(h[p] for p in PARTS) for h in history)
    o = cfg.online
    row |= {
        "setting": name,
        "samples": o.prompts_per_round * o.group_size,
        "num_steps": o.num_steps,
        "trained_steps": o.trained_steps_per_round(),
        "rounds_timed": len(history),
    }
    return row


def markdown(rows: list[dict[str, Any]], device: str) -> str:
    lines = [
        "| setting | device | samples / round | grid steps | trained steps | rollout s | scoring s | update s "
        "| s / iteration |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {device} | {r['samples']} | {r['num_steps']} | {r['trained_steps']} "
            f"| {r['time/rollout']:.2f} | {r['time/scoring']:.3f} | {r['time/update']:.2f} | {r['total']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/online_cost")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per setting (the first is dropped)")
    parser.add_argument("--settings", nargs="+", default=["toy_world_grpo", "toy_world_ddpo", "tiny_sd3_grpo"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="sd35m_grpo's base dtype")
    parser.add_argument("--shape", choices=("real", "smoke"), default="real", help="sd35m_grpo: smoke = tiny widths")
    parser.add_argument("--resolution", type=int, default=512, help="sd35m_grpo's image side in pixels")
    parser.add_argument("--steps", type=int, default=10, help="sd35m_grpo's sampling steps (all but the last trained)")
    parser.add_argument("--json", help="also write the rows to this file, rewritten after each setting")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import logging

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} thr)"
    out = Path(args.out)
    rows = []
    for name in args.settings:
        rows.append(
            run_setting(
                name,
                out,
                args.rounds,
                dtype=args.dtype,
                shape=args.shape,
                resolution=args.resolution,
                steps=args.steps,
            )
        )
        print(f"{name}: {rows[-1]['total']:.2f} s / iteration", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps([{"device": device, **r} for r in rows], indent=2) + "\n")
    table = markdown(rows, device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"device": device, "rows": rows, "table": table}, indent=2) + "\n")
    print(f"\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
