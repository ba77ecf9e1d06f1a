"""Write the tokenizer files the tiny offline models use (run from the repo root).

    python assets/make_tokenizers.py

* ``assets/tokenizers/clip/``: the real CLIP BPE tokenizer (49408 ids, same ids as OpenAI CLIP), converted
  from the BPE vocabulary that ships inside the open_clip package, so no download is needed.
* ``assets/tokenizers/t5/``: a small T5 (unigram) tokenizer built from a word list, for tiny SD3 models.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from open_clip.tokenizer import bytes_to_unicode, default_bpe


OUT = Path(__file__).resolve().parent / "tokenizers"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
T5_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "with",
    "and",
    "at",
    "to",
    "is",
    "by",
    "for",
    "from",
    "red",
    "green",
    "blue",
    "yellow",
    "white",
    "black",
    "orange",
    "purple",
    "pink",
    "brown",
    "gray",
    "circle",
    "square",
    "triangle",
    "star",
    "cat",
    "dog",
    "car",
    "house",
    "tree",
    "photo",
    "painting",
    "portrait",
    "landscape",
    "city",
    "street",
    "night",
    "day",
    "sky",
    "sea",
    "mountain",
    "flower",
    "bird",
    "horse",
    "man",
    "woman",
    "child",
    "old",
    "young",
    "small",
    "big",
    "large",
    "bright",
    "dark",
    "background",
    "colorful",
    "detailed",
    "high",
    "quality",
    "style",
    "art",
    "digital",
    "oil",
    "watercolor",
    "sketch",
    "render",
]


def write_clip(out: Path) -> None:
    """CLIP vocab.json + merges.txt in the layout of ``openai/clip-vit-large-patch14/tokenizer``."""
    with gzip.open(default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + [BOS, EOS]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def write_t5(out: Path) -> None:
    """A unigram T5 tokenizer over a small word list (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2 as in T5)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -float(i + 1)) for i, w in enumerate(T5_WORDS)]
    pieces += [(chr(c), -100.0) for c in range(ord("a"), ord("z") + 1)]
    pieces += [("\u2581", -50.0)]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=77)
    tok.save_pretrained(out)


if __name__ == "__main__":
    write_clip(OUT / "clip")
    write_t5(OUT / "t5")
    print(f"wrote {OUT}")
