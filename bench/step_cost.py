"""Cost of one Diffusion-DPO step against its true floor: one plain fine-tuning step plus one no-grad forward.

What is timed, per model size (``tiny``: the offline SD1.5 UNet of ``diffalign.models.tiny``; ``mid``: a UNet with
block_out_channels (64, 128, 256), 2 layers per block, cross_attention_dim 256, on 32x32 latents; opt-in real sizes,
random init from the published configs: ``sd15`` (859.5M, 32x32 latents on CPU, 64x64 on CUDA), ``sdxl`` (2567.5M,
128x128 on CUDA = 1024 px) and ``sd35m`` (SD3.5-Medium, 2243.2M, 128x128 on CUDA), for CUDA with ``--dtype bf16``):

* **plain**: policy forward + backward on the 2B images of B pairs, plain MSE to the target, optimizer step.
* **dpo**: ``terms.offline.group_errors`` (one no-grad reference forward with the LoRA switched off, then one policy
  forward on the same 2B concatenated images) -> ``losses.dpo`` -> backward -> optimizer step.
* **dpo-ref-last**: the same DPO step with the reference pass run after the policy forward (the order before
  issue 15), so the policy's saved activations are held while it runs.
* **fwd**: one no-grad forward of the same 2B images with the LoRA off: exactly what DPO adds to a plain step.
* **fwdbwd**: the policy forward + backward of the denoiser alone; ``(dpo - fwdbwd - fwd) / dpo`` is the share of
  the DPO step spent outside the denoiser (noise, loss, optimizer, adapter toggle).
* **dpo-copy** (small sizes): the DPO step with the reference forward on a deep-copied frozen UNet.

The floor of ``(dpo - plain) / fwd`` is 1.0. dpo / plain has no fixed floor, 1 + fwd / plain: the "backward = two
forwards" rule that gave 4/3 holds for full fine-tuning, but a LoRA on a frozen base computes no weight gradients
for the base in its backward (input gradients only), which then costs ~1-1.5 forwards, so the floor of dpo / plain
is ~1.4 on SD1.5, not 4/3. Latents
and prompt embeddings are precomputed (as with the latent cache), so only the denoiser, the loss and the optimizer
are timed. Steps are interleaved (plain, dpo, ..., plain, ...) after warm-up so background load hits every variant
alike; each figure is the median of ``--repeats`` steps. ``--compile`` times the same with ``model.compile``.

Memory: every (size, strategy) runs in a fresh subprocess. After the model, LoRA, optimizer and batch exist, the
baseline is taken; then the strategy's reference is built (nothing for the toggle; ``copy.deepcopy`` of the base
UNet for the copy) and warm-up + timed DPO steps run. On CUDA the figure is ``torch.cuda.max_memory_allocated``
minus the baseline allocation. On CPU a thread samples the process RSS (psutil) every millisecond and the figure is
peak RSS minus the baseline RSS. CPU caveats: RSS counts pages the allocator keeps after tensors are freed, includes
the sampling thread and Python objects, and a 1 ms sampler can miss a short-lived peak, so small differences
(under a few MB) are noise; the reference copy's exact weight bytes are printed beside it.

CPU threads default to 1: on a 2-core machine shared with other jobs, two spinning OpenMP threads made the same
step 8x slower and the timings meaningless (``--threads 2`` to try anyway). On CPU the ratio of the medians of the
process's CPU time (``time.process_time``) is printed beside the wall-clock one: with one thread it is what the step
computes, and other jobs on the machine disturb it far less than wall time (they still share caches and memory
bandwidth). Where the two ratios disagree, the machine was busy.

Run (2 CPU cores, ~4 min; the real-size SD1.5 row ~15 s per step, ~5 min)::

    HF_HUB_OFFLINE=1 python bench/step_cost.py
    HF_HUB_OFFLINE=1 python bench/step_cost.py --sizes sd15 --warmup 1 --repeats 3 --skip-memory
    python bench/step_cost.py --device cuda --dtype bf16 --repeats 50 --sizes mid sd15 sdxl sd35m   # + --compile
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


SIZES = ("tiny", "mid")
REAL_SIZES = ("sd15", "sdxl", "sd35m")  # published denoiser configs, random init (opt-in: --sizes sd15 ...)
STRATEGIES = ("toggle", "copy")


@dataclass
class Setup:
    """A LoRA'd SD1.5-style adapter, its optimizer, and one fixed batch of B pairs (latents + prompt embeddings)."""

    adapter: Any
    optimizer: torch.optim.Optimizer
    latents: torch.Tensor  # (B, 2, C, h, w)
    cond: dict[str, torch.Tensor]  # per pair, (B, 77, D)
    seeds: list[int]
    autocast: Callable[[], Any]
    ref_unet: torch.nn.Module | None = None
    inputs: tuple[Any, ...] = ()


def _mid_components(seed: int) -> dict[str, Any]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffalign.models import tiny

    comps = tiny.sd15(seed)
    torch.manual_seed(seed)
    comps["unet"] = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(64, 128, 256),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=256,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    text = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    comps["text_encoder"] = CLIPTextModel(text)
    return comps


def _real_denoiser(size: str) -> torch.nn.Module:
    """The published denoiser of ``size`` (diffusers config values), random init: SD1.5's UNet (859.5M parameters),
    SDXL's UNet (2567.5M), SD3.5-Medium's MMDiT-X transformer (2243.2M)."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    if size == "sd15":
        return UNet2DConditionModel(cross_attention_dim=768)  # the other class defaults are SD1.5's config
    if size == "sdxl":
        return UNet2DConditionModel(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
    return SD3Transformer2DModel(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
        qk_norm="rms_norm",
    )


# family, latent channels, latent side on CPU / on CUDA, prompt-embedding shapes (per pair) of the real sizes
REAL = {
    "sd15": ("sd15", 4, 32, 64, {"encoder_hidden_states": (77, 768)}),
    "sdxl": ("sdxl", 4, 32, 128, {"encoder_hidden_states": (77, 2048), "text_embeds": (1280,), "time_ids": (6,)}),
    "sd35m": ("sd3", 16, 32, 128, {"encoder_hidden_states": (333, 4096), "pooled_projections": (2048,)}),
}


def build(
    size: str, *, batch: int, device: str, dtype: str, compile: bool = False, compile_backend: str = "inductor"
) -> Setup:
    """The adapter of ``size`` with a rank-8 LoRA on ``device``; ``strategy="copy"`` also keeps a reference copy.

    Real sizes (``REAL``): the tiny pipeline of the family with its denoiser replaced by the published-size one,
    random prompt embeddings of the real shapes (the text encoders are never run)."""
    from diffalign import models
    from diffalign.models import lora, tiny
    from diffalign.models.base import resolve_dtype

    torch_dtype = resolve_dtype(dtype)
    gen = torch.Generator().manual_seed(1)
    if size in REAL:
        family, channels, side_cpu, side_cuda, shapes = REAL[size]
        comps = getattr(tiny, family)(0)
        torch.manual_seed(0)
        key = "unet" if "unet" in comps else "transformer"
        comps[key] = _real_denoiser(size).to(torch_dtype)
        adapter = models.from_components(family, comps).to(device)
        latent_hw = side_cuda if torch.device(device).type == "cuda" else side_cpu
        latents = torch.randn(batch, 2, channels, latent_hw, latent_hw, generator=gen)
        cond = {k: torch.randn(batch, *shape, generator=gen).to(device) for k, shape in shapes.items()}
        if "time_ids" in cond:
            cond["time_ids"] = torch.tensor([8 * latent_hw, 8 * latent_hw, 0, 0, 8 * latent_hw, 8 * latent_hw])
            cond["time_ids"] = cond["time_ids"].float().expand(batch, 6).to(device)
    else:
        comps = tiny.sd15(0) if size == "tiny" else _mid_components(0)
        adapter = models.from_components("sd15", comps).to(device)
        if torch_dtype != torch.float32:
            adapter.denoiser.to(torch_dtype)
        latent_hw = 16 if size == "tiny" else 32
        latents = torch.randn(batch, 2, 4, latent_hw, latent_hw, generator=gen)
        prompts = [f"a photo of object number {i}" for i in range(batch)]
        with torch.no_grad():
            cond = {k: v.to(device) for k, v in adapter.encode_prompts(prompts).items()}
    lora.add_lora(adapter, lora.LoraSpec(rank=8))
    if compile:
        from diffalign.models.base import compile_denoiser

        compile_denoiser(adapter.denoiser)
        if compile_backend != "inductor":  # a quick trace-only check (smoke runs): same graphs, no code generation
            adapter.denoiser.compile(dynamic=False, backend=compile_backend)
    params = [p for p in adapter.denoiser.parameters() if p.requires_grad]
    from diffalign.training.optim import fusable

    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=fusable(params))
    device_type = torch.device(device).type

    def autocast() -> Any:
        return torch.autocast(device_type, dtype=torch_dtype, enabled=torch_dtype != torch.float32)

    setup = Setup(adapter, optimizer, latents, cond, list(range(batch)), autocast)
    setup.inputs = denoiser_inputs(setup)
    return setup


def denoiser_inputs(s: Setup) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(x_t, t, cond) of the 2B images as ``group_errors`` builds them, for the denoiser-only variants."""
    from diffalign.models.base import repeat_cond
    from diffalign.terms import offline

    adapter = s.adapter
    noise, t = offline.draw_noise(adapter.process, s.latents.shape[2:], s.seeds)
    x0 = s.latents.flatten(0, 1).to(adapter.device)
    eps, t = noise.repeat_interleave(2, dim=0).to(x0.device), t.repeat_interleave(2).to(x0.device)
    return adapter.process.add_noise(x0, eps, t), t, repeat_cond(s.cond, 2)


def add_reference_copy(setup: Setup) -> None:
    """A frozen deep copy of the base UNet (LoRA layers unwrapped), the memory-hungry alternative to the toggle."""
    with setup.adapter.reference():
        unet = copy.deepcopy(setup.adapter.denoiser)
    setup.ref_unet = unet.requires_grad_(False).eval()


def plain_step(s: Setup) -> None:
    """Plain diffusion fine-tuning: MSE of the policy on the same 2B images, backward, optimizer step."""
    from diffalign.terms import offline

    with s.autocast():
        errors = offline.group_errors(s.adapter, s.latents, s.seeds, cond=s.cond, need_ref=False)
    errors.policy.mean().backward()
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)


def dpo_step(s: Setup) -> None:
    """Diffusion-DPO with the reference as the same weights with the LoRA switched off (the library path)."""
    from diffalign.losses import dpo
    from diffalign.terms import offline

    with s.autocast():
        errors = offline.group_errors(s.adapter, s.latents, s.seeds, cond=s.cond, need_ref=True)
    dpo.loss(offline.pair_terms(errors, 1000), dpo.Config()).loss.backward()
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)


def dpo_copy_step(s: Setup) -> None:
    """Diffusion-DPO with the reference forward on a deep-copied UNet (same noise, timesteps and targets)."""

    def reference(x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = cond["encoder_hidden_states"].to(s.adapter.dtype)
        return s.ref_unet(x_t.to(s.adapter.dtype), t, encoder_hidden_states=hidden).sample

    _dpo_ref_after_policy(s, reference)


def dpo_ref_last_step(s: Setup) -> None:
    """Diffusion-DPO with the toggled reference pass run AFTER the policy forward (the order before issue 15)."""

    def reference(x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        with s.adapter.reference():
            return s.adapter.predict(x_t, t, cond)

    _dpo_ref_after_policy(s, reference)


def _dpo_ref_after_policy(s: Setup, reference: Callable[..., torch.Tensor]) -> None:
    from diffalign.losses import dpo
    from diffalign.models.base import repeat_cond
    from diffalign.terms import offline

    adapter, b = s.adapter, s.latents.shape[0]
    with s.autocast():
        errors = offline.group_errors(adapter, s.latents, s.seeds, cond=s.cond, need_ref=False)
        with torch.no_grad():
            noise, t = offline.draw_noise(adapter.process, s.latents.shape[2:], s.seeds)
            x0 = s.latents.flatten(0, 1).to(adapter.device)
            eps, t = noise.repeat_interleave(2, dim=0).to(x0.device), t.repeat_interleave(2).to(x0.device)
            x_t, target = adapter.process.add_noise(x0, eps, t), adapter.process.target(x0, eps, t)
            ref = offline.per_sample_error(reference(x_t, t, repeat_cond(s.cond, 2)), target).view(b, 2)
    terms = offline.pair_terms(offline.GroupErrors(policy=errors.policy, timesteps=errors.timesteps, ref=ref), 1000)
    dpo.loss(terms, dpo.Config()).loss.backward()
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)


def ref_forward(s: Setup) -> None:
    """The floor of what DPO adds: one no-grad forward of the same 2B images with the LoRA off."""
    with s.autocast(), torch.no_grad(), s.adapter.reference():
        s.adapter.predict(*s.inputs)


def toggle_only(s: Setup) -> None:
    """The adapter switched off and on again (twice per DPO step)."""
    with s.adapter.reference():
        pass


def denoiser_fwd_bwd(s: Setup) -> None:
    """The policy forward + backward of the same 2B images alone (no noise draw, loss, or optimizer)."""
    with s.autocast():
        pred = s.adapter.predict(*s.inputs)
    pred.float().square().mean().backward()
    s.optimizer.zero_grad(set_to_none=True)


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[Setup], None], s: Setup, device: str) -> tuple[float, float]:
    """Wall seconds and CPU seconds of this process for one step."""
    _sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    fn(s)
    _sync(device)
    return time.perf_counter() - w0, time.process_time() - c0


def time_steps(size: str, args: argparse.Namespace) -> dict[str, float]:
    """Median wall and CPU seconds per step of each variant, interleaved after ``args.warmup`` warm-up rounds."""
    s = build(size, batch=args.batch, device=args.device, dtype=args.dtype, compile=args.compile,
              compile_backend=args.compile_backend)  # fmt: skip
    variants = {"plain": plain_step, "dpo": dpo_step, "dpo-ref-last": dpo_ref_last_step, "fwd": ref_forward}
    variants["fwdbwd"] = denoiser_fwd_bwd
    if size not in REAL:
        add_reference_copy(s)
        variants["dpo-copy"] = dpo_copy_step
    params_m = sum(p.numel() for p in s.adapter.denoiser.parameters() if not p.requires_grad) / 1e6
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    faults: dict[str, list[int]] = {name: [] for name in variants}  # minor page faults: pages the step first touches
    first: dict[str, float] = {}  # wall seconds of each variant's first step (with --compile: compilation included)
    for i in range(args.warmup + args.repeats):
        for name, fn in variants.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            w, c = timed(fn, s, args.device)
            first.setdefault(name, w)
            if i >= args.warmup:
                wall[name].append(w)
                cpu[name].append(c)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        if i >= args.warmup:
            done = ", ".join(f"{k} {wall[k][-1]:.3f}s ({cpu[k][-1]:.3f}s CPU)" for k in wall)
            print(f"  round {i}: {done}", file=sys.stderr)
    toggle = min(timed(toggle_only, s, args.device)[0] for _ in range(3))
    out = {"params_m": params_m, "toggle_ms": toggle * 1e3}
    out |= {name: statistics.median(values) for name, values in wall.items()}
    out |= {f"{name}_cpu": statistics.median(values) for name, values in cpu.items()}
    out |= {f"{name}_faults": statistics.median(values) for name, values in faults.items()}
    out |= {f"first/{name}": seconds for name, seconds in first.items()}
    # (DPO - plain) / fwd per round, then the median: each round's three steps ran under the same background load
    for clock, times in (("", wall), ("_cpu", cpu)):
        for dpo in ("dpo", "dpo-ref-last"):
            rounds = zip(times[dpo], times["plain"], times["fwd"], strict=True)
            out[f"extra/{dpo}{clock}"] = statistics.median((d - p) / f for d, p, f in rounds)
    return out


# ---- memory (one fresh subprocess per size and strategy) ----------------------------------------------------


class RssSampler:
    """Peak resident set size of this process, sampled by a thread every ``interval`` seconds."""

    def __init__(self, interval: float = 0.001) -> None:
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def module_bytes(module: torch.nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def memory_worker(size: str, strategy: str, args: argparse.Namespace) -> dict[str, float]:
    """Peak memory above the baseline (model + LoRA + optimizer + batch) of DPO steps with one reference strategy."""
    import gc

    import psutil

    s = build(size, batch=args.batch, device=args.device, dtype=args.dtype, compile=args.compile)
    step = dpo_step if strategy == "toggle" else dpo_copy_step
    cuda = torch.device(args.device).type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = psutil.Process().memory_info().rss
    if strategy == "copy":
        add_reference_copy(s)
    with RssSampler() as sampler:
        for _ in range(args.warmup + args.mem_steps):
            step(s)
    peak = torch.cuda.max_memory_allocated() if cuda else sampler.peak
    return {"peak_mb": (peak - base) / 2**20, "ref_weights_mb": module_bytes(s.ref_unet) / 2**20}


def run_memory_worker(size: str, strategy: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", f"{size}:{strategy}"]
    cmd += ["--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch)]
    cmd += ["--warmup", str(args.warmup), "--mem-steps", str(args.mem_steps)]
    cmd += ["--threads", str(torch.get_num_threads())] + (["--compile"] if args.compile else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- report -------------------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]], device_label: str, cuda: bool) -> str:
    """Markdown: median step times, the two ratios (on CPU also from CPU times), the share of the DPO step outside
    the denoiser, then peak memory."""
    head = (
        "| model | denoiser params | mode | plain step | DPO step | no-grad fwd | DPO / plain | (DPO - plain) / fwd "
        "| same, CPU time | ref pass after policy: (DPO - plain) / fwd | same, CPU time | page faults, DPO / ref after "
        "policy | outside denoiser | toggle "
        "| DPO (copied ref) / plain | peak mem, toggle | peak mem, copied ref | ref copy weights |"
    )
    lines = [f"Device: {device_label}", "", head, "|" + " --- |" * 18]
    for r in rows:
        cpu = {k: "-" if cuda else f"{r[f'extra/{k}_cpu']:.2f}" for k in ("dpo", "dpo-ref-last")}
        copied = f"{r['dpo-copy'] / r['plain']:.2f}" if "dpo-copy" in r else "-"
        clock = "" if cuda else "_cpu"  # on CPU from CPU times: wall times of other jobs' preemptions would swamp it
        outside = (r[f"dpo{clock}"] - r[f"fwdbwd{clock}"] - r[f"fwd{clock}"]) / r[f"dpo{clock}"]
        lines.append(
            f"| {r['size']} | {r['params_m']:.1f} M | {r['mode']} | {r['plain'] * 1e3:.1f} ms | {r['dpo'] * 1e3:.1f} ms "
            f"| {r['fwd'] * 1e3:.1f} ms | {r['dpo'] / r['plain']:.2f} | {r['extra/dpo']:.2f} | {cpu['dpo']} "
            f"| {r['extra/dpo-ref-last']:.2f} | {cpu['dpo-ref-last']} "
            f"| {r['dpo_faults'] / 1e3:.0f}k / {r['dpo-ref-last_faults'] / 1e3:.0f}k "
            f"| {100 * outside:.1f}% | {r['toggle_ms']:.1f} ms "
            f"| {copied} | {r['mem_toggle']:.1f} MB | {r['mem_copy']:.1f} MB | {r['ref_weights_mb']:.1f} MB |"
        )
    return "\n".join(lines)


def device_label(args: argparse.Namespace) -> str:
    if torch.device(args.device).type == "cuda":
        return f"{torch.cuda.get_device_name()} ({args.dtype}, torch {torch.__version__})"
    return f"CPU, {torch.get_num_threads()} threads ({args.dtype}, torch {torch.__version__})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda needs a GPU; nothing else does)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="frozen weights + autocast")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=SIZES + REAL_SIZES, help="real sizes are opt-in")
    p.add_argument("--batch", type=int, help="pairs per step (2B images go through the UNet); default 2, real 1")
    p.add_argument("--compile", action="store_true", help="torch.compile the denoiser (model.compile)")
    p.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend with --compile (eager: trace-only check)"
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10, help="timed steps per variant (median reported)")
    p.add_argument("--mem-steps", type=int, default=3, help="DPO steps run while sampling memory")
    p.add_argument(
        "--threads", type=int, help="torch intra-op threads (default 1 on CPU: see the docstring; torch's on CUDA)"
    )
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--json", help="also write the rows to this file, rewritten after each size (a kill keeps them)")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was given but no CUDA device is available")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.batch is None:
        args.batch = 1 if set(args.sizes) & set(REAL_SIZES) else 2
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    if args._worker:
        size, strategy = args._worker.split(":")
        print(json.dumps(memory_worker(size, strategy, args)))
        return
    rows = []
    for size in args.sizes:
        print(f"[{size}] timing {args.warmup} warm-up + {args.repeats} steps per variant ...", file=sys.stderr)
        row: dict[str, Any] = {"size": size, "mode": "compiled" if args.compile else "eager"}
        row.update(time_steps(size, args))
        row.update(mem_toggle=float("nan"), mem_copy=float("nan"), ref_weights_mb=float("nan"))
        if not args.skip_memory:
            print(f"[{size}] memory: one subprocess per reference strategy ...", file=sys.stderr)
            toggle = run_memory_worker(size, "toggle", args)
            row.update(mem_toggle=toggle["peak_mb"])
            if size not in REAL:
                copied = run_memory_worker(size, "copy", args)
                row.update(mem_copy=copied["peak_mb"], ref_weights_mb=copied["ref_weights_mb"])
        rows.append(row)
        if args.json:
            meta = {"device": device_label(args), "batch": args.batch, "repeats": args.repeats}
            Path(args.json).write_text(json.dumps([{**meta, **r} for r in rows], indent=2) + "\n")
    print(table(rows, device_label(args), torch.device(args.device).type == "cuda"))
    print(f"\nbatch {args.batch} pairs ({2 * args.batch} images), LoRA rank 8, median of {args.repeats} steps")


if __name__ == "__main__":
    main()
