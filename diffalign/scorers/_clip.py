"""transformers CLIP helpers shared by PickScore, CLIPScore and the aesthetic predictor.

The one version-sensitive call is ``CLIPModel.get_image_features`` / ``get_text_features``: transformers < 5 returns
the projected embedding as a tensor, transformers >= 5 returns a ``BaseModelOutputWithPooling`` whose
``pooler_output`` is that projected embedding. ``projected`` accepts both.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from diffalign.scorers import _files
from diffalign.scorers.base import ImageTransform


def projected(out: Any) -> torch.Tensor:
    """The projected embedding ``(B, D)`` from a ``get_*_features`` return value of any transformers version."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    raise TypeError(f"get_*_features returned {type(out).__name__} with no tensor pooler_output")


def image_embeds(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    """L2-normalised fp32 image embeddings ``(B, D)`` of a transformers ``CLIPModel``."""
    return F.normalize(projected(model.get_image_features(pixel_values=pixels)).float(), dim=-1)


def text_embeds(model: Any, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    """L2-normalised fp32 text embeddings ``(B, D)``; ``tokens`` holds ``input_ids`` and ``attention_mask``."""
    out = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return F.normalize(projected(out).float(), dim=-1)


def load_model(path: str | os.PathLike, device: torch.device, dtype: torch.dtype) -> Any:
    """``CLIPModel.from_pretrained(path)`` (hub id or ``save_pretrained`` folder), in eval mode on device/dtype.
    Local folders are checked for config + weights first and never sent to the hub (``_files``)."""
    from transformers import CLIPModel

    model = _files.call_pretrained(
        CLIPModel.from_pretrained, path, what="CLIP model", expected=_files.CLIP_MODEL_FILES
    )
    return model.eval().requires_grad_(False).to(device=device, dtype=dtype)


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The CLIP BPE tokenizer of a hub id or folder.

    The slow ``CLIPTokenizer`` class on purpose: a fast tokenizer built from the same vocab.json + merges.txt gave
    ids different from CLIP's in transformers 5.23 (``tests/scorers`` check the ids against open_clip's).
    """
    from transformers import CLIPTokenizer

    return _files.call_pretrained(
        CLIPTokenizer.from_pretrained,
        path,
        what="CLIP tokenizer",
        expected=_files.CLIP_TOKENIZER_FILES,
        tokens=("<|startoftext|>", "<|endoftext|>"),
    )


def load_transform(path: str | os.PathLike, **kwargs: Any) -> ImageTransform:
    """The eval transform described by ``preprocessor_config.json`` of a hub id or folder."""
    from transformers import CLIPImageProcessor

    processor = _files.call_pretrained(
        CLIPImageProcessor.from_pretrained, path, what="CLIP image processor", expected=_files.PREPROCESSOR_FILES
    )
    return ImageTransform.from_hf_processor(processor, **kwargs)


def processor_next_to(path: str | os.PathLike) -> str | None:
    """A local folder holding both the tokenizer files and ``preprocessor_config.json`` at (or beside) the weights
    at ``path``, else ``None``."""
    return _files.companion(path, expected=(*_files.CLIP_TOKENIZER_FILES, *_files.PREPROCESSOR_FILES))


def tokenize(
    tokenizer: Any, prompts: list[str], model: Any, device: torch.device, *, truncation: str = "eos"
) -> dict[str, torch.Tensor]:
    """``padding=True`` token ids and mask, at most the text tower's length (77 for CLIP).

    ``truncation="eos"``: ``truncation=True, max_length=77``, i.e. BOS + 75 tokens + EOS, as PickScore's README and
    OpenAI ``clip.tokenize(truncate=True)`` cut. ``truncation="slice"``: tokenise in full, then keep the first 77
    columns (the EOS of a long prompt is dropped), as torchmetrics' ``_get_features`` does
    (``src/torchmetrics/functional/multimodal/clip_score.py`` L137-148).
    """
    max_length = int(model.config.text_config.max_position_embeddings)
    if truncation == "eos":
        enc = tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    elif truncation == "slice":
        enc = tokenizer(prompts, padding=True, return_tensors="pt")
        enc = {k: enc[k][..., :max_length] for k in ("input_ids", "attention_mask")}
    else:
        raise ValueError(f"truncation must be 'eos' or 'slice', got {truncation!r}")
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def cosine(
    model: Any, tokenizer: Any, pixels: torch.Tensor, prompts: list[str], *, truncation: str = "eos"
) -> torch.Tensor:
    """``cos(image_embed, text_embed)`` per pair, ``(B,)`` fp32. The text side never carries a graph (it does not
    depend on the pixels), so a differentiable call stores activations of the image tower only."""
    img = image_embeds(model, pixels)
    with torch.no_grad():
        txt = text_embeds(model, tokenize(tokenizer, prompts, model, pixels.device, truncation=truncation))
    return (img * txt).sum(dim=-1)


def vision_blocks(model: Any) -> Any:
    """The transformer blocks of a transformers ``CLIPModel``'s vision tower."""
    return model.vision_model.encoder.layers
