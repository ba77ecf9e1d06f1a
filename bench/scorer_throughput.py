"""Images per second of each reward scorer (``diffalign.scorers``), through the scorers' own ``__call__``.

Every scorer is built with random weights (no download) on the same classes ``scorers.load`` returns, so the timed
path is the real one: input checks, preprocessing (PIL resize + crop/pad + normalise, or the tensor path), batched
tokenisation and the forward pass, fp32 scores back on the CPU.

Sizes:

* ``tiny`` (default on CPU): the 1-2M-parameter models of the scorer tests (CLIP width 32, 32 px input), so the
  figures mostly measure the per-image preprocessing and call overhead.
* ``real`` (default with ``--device cuda``): the published architectures: PickScore = transformers CLIP ViT-H/14
  (laion/CLIP-ViT-H-14 config), HPSv2 = open_clip ``ViT-H-14``, ImageReward = BLIP ViT-L/16 + BERT-base with
  cross-attention (vocab 30524), aesthetic = CLIP ViT-L/14 (openai/clip-vit-large-patch14 config) + the MLP head,
  CLIPScore = CLIP ViT-L/14. bf16 by default on CUDA.

Input: ``--images`` RGB images of ``--image-size`` pixels (random noise, fixed seed) as PIL images, or with
``--input tensor`` one (N, 3, H, W) tensor in [0, 1] already on the device (GPU resize). Each scorer gets one
warm-up call, then ``--repeats`` timed calls on the same images; the figure is images / median call time.

Run::

    HF_HUB_OFFLINE=1 python bench/scorer_throughput.py                       # tiny, CPU, fp32
    python bench/scorer_throughput.py --device cuda                          # real-size, bf16, PIL input
    python bench/scorer_throughput.py --device cuda --input tensor --images 256 --batch-size 64
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


SCORERS = ("pickscore", "hpsv2", "imagereward", "aesthetic", "clipscore")
CLIP_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tokenizers" / "clip"
PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"

# (text_config, vision_config, projection_dim, hidden_act) of transformers CLIPConfig, from the published config.json.
CLIP_VIT_H14 = (  # laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the backbone of yuvalkirstain/PickScore_v1
    {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
    {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
     "patch_size": 14, "image_size": 224},
    1024,
    "gelu",
)  # fmt: skip
CLIP_VIT_L14 = (  # openai/clip-vit-large-patch14
    {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
    {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
     "patch_size": 14, "image_size": 224},
    768,
    "quick_gelu",
)  # fmt: skip
CLIP_TINY = (
    {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
     "patch_size": 8, "image_size": 32},
    16,
    "gelu",
)  # fmt: skip
BERT_BASE_MED = {  # THUDM/ImageReward med_config.json (BERT-base + cross-attention)
    "vocab_size": 30524, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 512, "add_cross_attention": True,
}  # fmt: skip
BERT_TINY_MED = {
    "vocab_size": 30524, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "max_position_embeddings": 40, "add_cross_attention": True,
}  # fmt: skip
BLIP_TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
             "image_size": 32, "patch_size": 8}  # fmt: skip
OPEN_CLIP_TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
WORDS = ["a", "an", "the", "of", "on", "in", "with", "photo", "astronaut", "riding", "horse", "moon", "cat", "dog"]


def clip_model(spec: tuple) -> Any:
    from transformers import CLIPConfig, CLIPModel

    text, vision, projection, act = spec
    text = {**text, "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": act,
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}  # fmt: skip
    cfg = CLIPConfig(text_config=text, vision_config={**vision, "hidden_act": act}, projection_dim=projection)
    return CLIPModel(cfg)


def clip_parts(spec: tuple) -> tuple[Any, Any, Any]:
    from transformers import CLIPTokenizer

    from diffalign.scorers.base import ImageTransform

    size = spec[1]["image_size"]
    model = clip_model(spec).eval().requires_grad_(False)
    return model, CLIPTokenizer.from_pretrained(CLIP_TOKENIZER), ImageTransform(size=size, resize=size)


def bert_tokenizer(workdir: Path) -> Any:
    """A WordPiece tokenizer with BLIP's specials (the real bert-base-uncased vocab is a download)."""
    from diffalign.scorers.imagereward import load_tokenizer

    (workdir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return load_tokenizer(workdir)


def build(name: str, size: str, device: torch.device, dtype: torch.dtype, batch_size: int, workdir: Path) -> Any:
    """A scorer of ``name`` with random weights, the real (or tiny) architecture, on ``device`` in ``dtype``."""
    from diffalign.scorers import aesthetic, clipscore, hpsv2, imagereward, pickscore
    from diffalign.scorers._mlp import RewardMLP
    from diffalign.scorers.base import ImageTransform

    real = size == "real"
    common = {"device": device, "dtype": dtype, "batch_size": batch_size}
    if name in ("pickscore", "clipscore", "aesthetic"):
        spec = (CLIP_VIT_H14 if name == "pickscore" else CLIP_VIT_L14) if real else CLIP_TINY
        model, tok, transform = clip_parts(spec)
        model.to(device=device, dtype=dtype)
        if name == "pickscore":
            return pickscore.PickScore(model, tok, transform, variant=f"random {size}", **common)
        if name == "clipscore":
            return clipscore.CLIPScore(model, tok, transform, w=2.5, clip_at_zero=True, variant=size, **common)
        head = RewardMLP(spec[2]).eval().requires_grad_(False).to(device)
        return aesthetic.Aesthetic(model, head, transform, variant=f"random {size}", **common)
    if name == "hpsv2":
        import open_clip

        model = open_clip.create_model("ViT-H-14", pretrained=None) if real else open_clip.model.CLIP(**OPEN_CLIP_TINY)
        model = model.eval().requires_grad_(False).to(device=device, dtype=dtype)
        tok = open_clip.get_tokenizer("ViT-H-14")
        return hpsv2.HPSv2(model, tok, hpsv2._transform(model), scale=100.0, variant=f"random {size}", **common)
    if name == "imagereward":
        model = imagereward.build_model(BERT_BASE_MED if real else BERT_TINY_MED, None if real else BLIP_TINY)
        model.eval().requires_grad_(False)
        model.vision.to(device=device, dtype=dtype)
        model.text.to(device=device, dtype=dtype)
        model.mlp.to(device)
        side = int(model.vision.config.image_size)
        transform = ImageTransform(size=side, resize=side, crop_offset="round")
        return imagereward.ImageReward(model, bert_tokenizer(workdir), transform, variant=f"random {size}", **common)
    raise KeyError(f"unknown scorer {name!r}; choices: {', '.join(SCORERS)}")


def make_images(n: int, side: int, kind: str, device: torch.device) -> Any:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(n, 3, side, side, generator=gen)
    if kind == "tensor":
        return pixels.to(device)
    arr = (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def count_params(scorer: Any) -> int:
    modules = [getattr(scorer, attr) for attr in ("model", "clip", "head") if hasattr(scorer, attr)]
    return sum(p.numel() for m in modules for p in m.parameters())


def time_scorer(scorer: Any, images: Any, prompts: list[str], repeats: int, device: torch.device) -> float:
    """Median seconds of one ``scorer(images, prompts)`` call (after one warm-up call)."""
    scorer(images, prompts)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        scores = scorer(images, prompts)
        times.append(time.perf_counter() - start)
        assert scores.shape == (len(prompts),) and torch.isfinite(scores).all(), scores
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=("tiny", "real"), help="default: tiny on CPU, real on CUDA")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--scorers", nargs="+", default=list(SCORERS), choices=SCORERS)
    parser.add_argument("--images", type=int, help="images per call (default 64 tiny, 128 real)")
    parser.add_argument("--image-size", type=int, default=512, help="input side in pixels (default 512, SD1.5)")
    parser.add_argument("--input", choices=("pil", "tensor"), default="pil")
    parser.add_argument("--batch-size", type=int, default=32, help="the scorers' internal batch size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch intra-op threads on CPU (default: torch's)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)

    from diffalign.models.base import resolve_dtype

    device = torch.device(args.device)
    size = args.size or ("real" if device.type == "cuda" else "tiny")
    dtype = resolve_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    n = args.images or (128 if size == "real" else 64)
    if args.threads:
        torch.set_num_threads(args.threads)
    images = make_images(n, args.image_size, args.input, device)
    prompts = [PROMPT] * n
    name_of = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"scorer throughput: {size} models, {name_of[dtype]}, {where}; {n} {args.input} images of "
          f"{args.image_size}px per call, batch {args.batch_size}, median of {args.repeats} calls")  # fmt: skip
    print(f"{'scorer':<12} {'params':>10} {'s/call':>9} {'images/s':>10}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.scorers:
            torch.manual_seed(0)
            scorer = build(name, size, device, dtype, args.batch_size, Path(tmp))
            seconds = time_scorer(scorer, images, prompts, args.repeats, device)
            row = {"scorer": name, "size": size, "dtype": name_of[dtype], "device": str(device), "input": args.input,
                   "params": count_params(scorer), "seconds_per_call": seconds, "images_per_second": n / seconds}  # fmt: skip
            rows.append(row)
            print(f"{name:<12} {row['params'] / 1e6:>9.1f}M {seconds:>9.3f} {row['images_per_second']:>10.2f}")
            del scorer
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if args.json:  # after each scorer, so a kill keeps what finished
                Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
