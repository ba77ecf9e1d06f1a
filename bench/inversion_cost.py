"""Cost of one offline DPO step with inversion noise (InPO, SmPO) relative to the same step with random noise.

What is timed: ``terms.offline.group_errors`` (+ the inversion ``noise_fn`` when on) -> ``losses.dpo`` -> backward,
on the shipped toy base (``assets/toy_base``, an SD1.5-family UNet on 4x4 latents of 32x32 images) or the tiny
offline UNet, with B pairs of precomputed latents and prompt embeddings. Variants:

* **random**: one shared random draw per pair (the default engine);
* **inpo**: the policy's 10-step DDIM inversion with eta 0.1 (``noise: {kind: inversion, num_steps: 10, eta: 0.1}``);
* **smpo**: 5-step ReNoise inversion, two predictions per step (``num_steps: 5, eta: 0, renoise: true``).

Every variant sees the same batches and the same per-pair seeds (so the same timesteps: inversion costs one
no-grad forward per grid step below t per image, so its cost depends on the t drawn). Steps are interleaved
(random, inpo, smpo, random, ...) after warm-up; each figure is the median over ``--repeats`` steps, with the
ratio of medians of process CPU time beside the wall-clock one (one torch thread). Run (2 CPU cores, ~2 min)::

    HF_HUB_OFFLINE=1 python bench/inversion_cost.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


VARIANTS = {
    "random": None,
    "inpo": {"num_steps": 10, "eta": 0.1, "renoise": False},
    "smpo": {"num_steps": 5, "eta": 0.0, "renoise": True},
}


def setup(model: str, batch: int):
    from diffalign import models, resources
    from diffalign.models import lora, tiny
    from diffalign.types import SampleInfo

    if model == "toy_base":
        adapter = models.load("sd15", resources.resolve("diffalign://assets/toy_base"))
    else:
        path = tiny.save("sd15", Path("/tmp/diffalign-bench-tiny-sd15"), seed=0)
        adapter = models.load("sd15", str(path))
    lora.add_lora(adapter, lora.LoraSpec(rank=8))
    params = list(lora.trainable_parameters(adapter).values())
    opt = torch.optim.AdamW(params, lr=1e-4)
    info = [SampleInfo((32, 32), (0, 0), (32, 32))] * batch
    with torch.no_grad():
        latents = adapter.encode_images(torch.rand(2 * batch, 3, 32, 32) * 2 - 1)
        cond = adapter.encode_prompts([f"a red circle on a blue background {i}" for i in range(batch)], info)
    return adapter, opt, latents.view(batch, 2, *latents.shape[1:]), cond


def step(adapter, opt, latents, cond, seeds, spec) -> None:
    from diffalign.losses import dpo
    from diffalign.terms import inversion
    from diffalign.terms.offline import group_errors, pair_terms

    noise_fn = None
    if spec is not None:
        s = inversion.InversionSpec(**spec)

        def noise_fn(x0, t, c, image_seeds):
            return inversion.inversion_noise(adapter.predict, adapter.process, x0, t, c, image_seeds, s)

    errors = group_errors(adapter, latents, seeds, cond=cond, noise_fn=noise_fn)
    out = dpo.loss(pair_terms(errors, 1000), dpo.Config(beta=500))
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["toy_base", "tiny"], default="toy_base")
    parser.add_argument("--batch", type=int, default=16, help="pairs per step")
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    adapter, opt, latents, cond = setup(args.model, args.batch)
    wall = {k: [] for k in VARIANTS}
    cpu = {k: [] for k in VARIANTS}
    for r in range(args.repeats + 2):
        seeds = [1000 * r + i for i in range(args.batch)]
        for name, spec in VARIANTS.items():
            w0, c0 = time.perf_counter(), time.process_time()
            step(adapter, opt, latents, cond, seeds, spec)
            if r >= 2:  # warm-up
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
    base_w, base_c = statistics.median(wall["random"]), statistics.median(cpu["random"])
    print(
        f"model {args.model}, {args.batch} pairs per step, {args.repeats} steps per variant, {args.threads} thread(s)"
    )
    print("| noise | step (median) | x random | x random (CPU time) |")
    print("| --- | ---: | ---: | ---: |")
    for name in VARIANTS:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"| {name} | {1000 * w:.1f} ms | {w / base_w:.2f} | {c / base_c:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
