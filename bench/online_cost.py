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

The first round (warm-up: allocator, lazy inits) is dropped; each figure is the median over the others. The device
is accelerate's default (a GPU when one is visible). Run (2 CPU cores, ~3 min)::

    HF_HUB_OFFLINE=1 python bench/online_cost.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any


PARTS = ("time/rollout", "time/scoring", "time/update")


def run_setting(name: str, out: Path, rounds: int) -> dict[str, Any]:
    from diffalign import config as dconfig
    from diffalign import quickstart
    from diffalign.models import tiny

    overrides = [f"run.output_dir={out / name}", "run.report_to=[]", f"run.max_steps={rounds}"]
    overrides += [f"run.save_every={rounds}", "run.log_every=1"]
    if name == "tiny_sd3_grpo":
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
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import logging

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} thr)"
    out = Path(args.out)
    rows = []
    for name in args.settings:
        rows.append(run_setting(name, out, args.rounds))
        print(f"{name}: {rows[-1]['total']:.2f} s / iteration", flush=True)
    table = markdown(rows, device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"device": device, "rows": rows, "table": table}, indent=2) + "\n")
    print(f"\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
