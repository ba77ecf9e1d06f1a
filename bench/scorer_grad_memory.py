"""Activation memory of the differentiable scorer path (``scorer(x, prompts, grad=True)``), with and without
gradient checkpointing of the vision tower.

Each scorer is built with random weights at its real size (``bench/scorer_throughput.py``'s builders: the same
classes ``scorers.load`` returns) or at the test size. One ``grad=True`` call on a ``(B, 3, H, W)`` tensor is made
under a ``torch.autograd.graph.saved_tensors_hooks`` context that adds up the bytes of every tensor autograd keeps
for the backward pass (each storage counted once): that is the activation memory the graph holds between forward and
backward (the scorer's weights, also referenced by the graph, left out), independent of allocator slack or the
machine's other jobs. With checkpointing, each vision block keeps
only its input (``torch.utils.checkpoint`` keeps the rest out of the graph and recomputes it in the backward). The
backward is timed too, and the input gradients of the two runs are compared.

Run::

    HF_HUB_OFFLINE=1 python bench/scorer_grad_memory.py --scorers clipscore aesthetic --size real   # ~1 min on 2 cores
    python bench/scorer_grad_memory.py --device cuda --dtype bf16 --size real --batch 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from scorer_throughput import PROMPT, SCORERS, build


def saved_bytes_and_grad(scorer, x: torch.Tensor) -> tuple[int, float, float, torch.Tensor]:
    """(bytes saved for backward, forward s, backward s, d sum(scores) / d x) of one ``grad=True`` call. The
    scorer's own weights and buffers, which autograd also references (e.g. to get d/dx of a Linear), are left out:
    they are in memory anyway."""
    modules = [m for m in vars(scorer).values() if isinstance(m, torch.nn.Module)]
    weights = {t.untyped_storage().data_ptr() for m in modules for t in [*m.parameters(), *m.buffers()]}
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[(storage.data_ptr(), t.device.index or 0)] = storage.nbytes()
        return t

    x = x.detach().requires_grad_(True)
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        scores = scorer(x, [PROMPT] * x.shape[0], grad=True)
    forward = time.perf_counter() - start
    start = time.perf_counter()
    (grad,) = torch.autograd.grad(scores.sum(), x)
    backward = time.perf_counter() - start
    return sum(seen.values()), forward, backward, grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scorers", nargs="+", default=["clipscore", "aesthetic"], choices=SCORERS)
    parser.add_argument("--size", default="real", choices=("tiny", "real"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    x = torch.rand(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    print("| scorer | size | batch | saved MB, plain | saved MB, checkpointed | ratio | backward s, plain | "
          "backward s, ckpt | max rel. grad diff |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.scorers:
            scorer = build(name, args.size, device, dtype, args.batch, Path(tmp))
            plain, _, back_plain, g_plain = saved_bytes_and_grad(scorer, x)
            scorer.gradient_checkpointing(True)
            ckpt, _, back_ckpt, g_ckpt = saved_bytes_and_grad(scorer, x)
            diff = float((g_ckpt - g_plain).abs().max() / g_plain.abs().max().clamp_min(1e-30))
            print(
                f"| {name} | {args.size} | {args.batch} | {plain / 2**20:.1f} | {ckpt / 2**20:.1f} | "
                f"{plain / max(ckpt, 1):.1f} | {back_plain:.2f} | {back_ckpt:.2f} | {diff:.1e} |"
            )
            del scorer


if __name__ == "__main__":
    main()
