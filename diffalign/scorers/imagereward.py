"""ImageReward (Xu et al., NeurIPS 2023): BLIP ViT-L/16 + a BERT text encoder with cross-attention + an MLP head.

Checkpoint: hub repo ``THUDM/ImageReward``, files ``ImageReward.pt`` (state dict in the original BLIP layout:
``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``) and ``med_config.json`` (the BERT config).
Tokenizer: ``bert-base-uncased`` plus ``[DEC]`` (bos) and ``[ENC]`` specials (BLIP ``init_tokenizer``), vocab 30524;
looked up next to the checkpoint first (``vocab.txt`` in its folder, or a ``tokenizer/`` / ``bert-base-uncased/``
folder inside or beside it, DiffSynth's layout), else the ``bert-base-uncased`` hub repo.

Forward (``ImageReward.py`` ``score``), rebuilt on transformers modules:

    img = BlipVisionModel(x).last_hidden_state                     # (B, 1 + N, 1024), post-LayerNorm tokens
    h = BlipTextModel(ids, mask, encoder_hidden_states=img)[:, 0]  # bidirectional self-attn + cross-attn, [CLS]
    r = (MLP(h) - 0.16717362830052426) / 1.0333394966054072       # standardised reward, SD1.5 ~0, SDXL ~0.5

Prompts are tokenised with ``padding="max_length", truncation=True, max_length=35``: only the first 35 BERT
tokens (with [CLS] and [SEP]) count; a warning says when prompts were cut. Image transform: ``Resize(224, bicubic)``,
``CenterCrop(224)`` (torchvision rounding), OpenAI mean/std. The MLP runs in fp32, as the original's ``.float()``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any

import torch
from torch import nn

from diffalign.scorers import _files
from diffalign.scorers._mlp import RewardMLP, mlp_input_size
from diffalign.scorers.base import BatchedScorer, ImageTransform, load_checkpoint, resolve_file, tensor_state_dict


DEFAULT_PATH = "THUDM/ImageReward"
CHECKPOINT_FILE = "ImageReward.pt"
CONFIG_FILE = "med_config.json"
DEFAULT_TOKENIZER = "bert-base-uncased"
TOKENIZER_SUBFOLDERS = ("tokenizer", "bert-base-uncased")
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35
# BLIP's ``create_vit("large", 224)``: ViT-L/16, qkv bias, LayerNorm eps 1e-6, exact GELU.
VIT_LARGE = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 16,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu",
}
# Keys of the original layout that scoring does not use: BLIP_Pretrain's ITC projections, and MED's persistent
# ``position_ids`` buffer (transformers keeps that buffer non-persistent).
UNUSED_KEYS = re.compile(
    r"^blip\.(vision_proj|text_proj)\.(weight|bias)$|^blip\.text_encoder\.embeddings\.position_ids$"
)
_VIT_RENAMES = (
    (re.compile(r"^cls_token$"), "embeddings.class_embedding"),
    (re.compile(r"^pos_embed$"), "embeddings.position_embedding"),
    (re.compile(r"^patch_embed\.proj\.(weight|bias)$"), r"embeddings.patch_embedding.\1"),
    (re.compile(r"^blocks\.(\d+)\.norm1\.(weight|bias)$"), r"encoder.layers.\1.layer_norm1.\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$"), r"encoder.layers.\1.self_attn.qkv.\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$"), r"encoder.layers.\1.self_attn.projection.\2"),
    (re.compile(r"^blocks\.(\d+)\.norm2\.(weight|bias)$"), r"encoder.layers.\1.layer_norm2.\2"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$"), r"encoder.layers.\1.mlp.\2.\3"),
    (re.compile(r"^norm\.(weight|bias)$"), r"post_layernorm.\1"),
)


def _vit_key(key: str) -> str | None:
    for pattern, target in _VIT_RENAMES:
        if pattern.match(key):
            return pattern.sub(target, key)
    return None


def remap_state_dict(state: dict[str, torch.Tensor], source: str = "ImageReward.pt") -> dict[str, torch.Tensor]:
    """Original BLIP/ImageReward keys -> ``ImageRewardModel`` keys (``vision.*``, ``text.*``, ``mlp.*``).

    ``blip.visual_encoder.X`` -> ``vision.<HF BlipVisionModel name of X>`` (table in the research note §1.4);
    ``blip.text_encoder.X`` -> ``text.X`` (MED and ``BlipTextModel`` share parameter names); ``mlp.layers.*`` kept;
    ``UNUSED_KEYS`` dropped; any other key is an error, so a checkpoint of another layout cannot half-load.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if UNUSED_KEYS.match(key):
            continue
        if key.startswith("blip.visual_encoder."):
            new = _vit_key(key[len("blip.visual_encoder.") :])
            new = None if new is None else "vision." + new
        elif key.startswith("blip.text_encoder."):
            new = "text." + key[len("blip.text_encoder.") :]
        elif key.startswith("mlp.layers."):
            new = key
        else:
            new = None
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise KeyError(f"{source}: keys outside the ImageReward layout: {unknown[:8]} ({len(unknown)} in all)")
    return out


class ImageRewardModel(nn.Module):
    """``vision`` (BlipVisionModel), ``text`` (BlipTextModel with cross-attention, no pooler), ``mlp`` (RewardMLP)."""

    def __init__(self, vision: nn.Module, text: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.vision = vision
        self.text = text
        self.mlp = mlp

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised pixels + ``(B, 35)`` tokens -> ``(B,)`` standardised rewards (fp32)."""
        img = self.vision(pixel_values=pixels).last_hidden_state
        img_mask = torch.ones(img.shape[:2], dtype=torch.long, device=img.device)
        out = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=img,
            encoder_attention_mask=img_mask,
            is_decoder=False,
        )
        raw = self.mlp(out.last_hidden_state[:, 0].float()).squeeze(-1)
        return (raw - REWARD_MEAN) / REWARD_STD


def build_model(
    med_config: dict[str, Any], vision_config: dict[str, Any] | None = None, mlp_in: int | None = None
) -> ImageRewardModel:
    """An untrained ``ImageRewardModel`` from a ``med_config.json`` dict and BLIP ViT settings (default ViT-L/16)."""
    from transformers import BlipTextConfig, BlipVisionConfig, BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    if not med_config.get("add_cross_attention", False):
        raise ValueError("med_config must have add_cross_attention=true (ImageReward's text encoder cross-attends)")
    vision_cfg = BlipVisionConfig(**{**VIT_LARGE, **(vision_config or {})})
    text_cfg = BlipTextConfig(
        vocab_size=med_config["vocab_size"],
        hidden_size=med_config["hidden_size"],
        intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"],
        hidden_act=med_config.get("hidden_act", "gelu"),
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        pad_token_id=med_config.get("pad_token_id", 0),
        encoder_hidden_size=vision_cfg.hidden_size,  # BLIP_Pretrain sets encoder_width = vision_width
        is_decoder=True,  # makes transformers build the cross-attention; forward runs with is_decoder=False
    )
    return ImageRewardModel(
        BlipVisionModel(vision_cfg),
        BlipTextModel(text_cfg, add_pooling_layer=False),
        RewardMLP(mlp_in or text_cfg.hidden_size),
    )


def load_tokenizer(path: str | os.PathLike) -> Any:
    """BERT WordPiece tokenizer + BLIP's ``[DEC]`` bos and ``[ENC]`` specials (``init_tokenizer``)."""
    from transformers import BertTokenizer

    tokenizer = _files.call_pretrained(
        BertTokenizer.from_pretrained,
        path,
        what="ImageReward tokenizer",
        expected=_files.BERT_TOKENIZER_FILES,
        tokens=("[CLS]", "[SEP]", "[PAD]"),
    )
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageReward(BatchedScorer):
    """Standardised ImageReward; prompts beyond 35 BERT tokens are truncated (with a warning)."""

    name = "imagereward"

    def __init__(self, model: ImageRewardModel, tokenizer: Any, transform: ImageTransform, **kwargs: Any) -> None:
        super().__init__(transform=transform, **kwargs)
        self.model = model
        self.tokenizer = tokenizer

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """``(B, 35)`` ``input_ids`` and ``attention_mask``, exactly as the original tokenises."""
        return dict(
            self.tokenizer(
                prompts, padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS, return_tensors="pt"
            )
        )

    def truncated(self, prompts: list[str]) -> list[int]:
        """Indices of the prompts longer than 35 tokens (with [CLS] and [SEP])."""
        lengths = [len(ids) for ids in self.tokenizer(prompts, truncation=False)["input_ids"]]
        return [i for i, n in enumerate(lengths) if n > MAX_PROMPT_TOKENS]

    def _score(self, pixels: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        cut = self.truncated(prompts or [])
        if cut:  # stacklevel 3: the caller of __call__
            warnings.warn(
                f"ImageReward reads {MAX_PROMPT_TOKENS} tokens; prompts {cut[:10]} were truncated", stacklevel=3
            )
        enc = self.tokenize(prompts or [])
        return self.model(pixels, enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))

    def vision_blocks(self) -> Any:
        return self.model.vision.encoder.layers


def load(
    path: str | os.PathLike = DEFAULT_PATH,
    *,
    tokenizer_path: str | os.PathLike | None = None,
    vision_config: dict[str, Any] | None = None,
    allow_pickle: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
) -> ImageReward:
    """ImageReward from the hub repo, a local folder holding ``ImageReward.pt`` (or ``.safetensors``) and
    ``med_config.json``, or the checkpoint file itself (``med_config.json`` beside it).

    ``vision_config`` overrides the BLIP ViT-L/16 settings (tests use a tiny ViT); the checkpoint must fit exactly.
    ``tokenizer_path``: default next to the checkpoint, else ``DEFAULT_TOKENIZER`` (module docstring).
    """
    if tokenizer_path is None:
        found = _files.companion(path, expected=_files.BERT_TOKENIZER_FILES, subfolders=TOKENIZER_SUBFOLDERS)
        tokenizer_path = found or DEFAULT_TOKENIZER
    file = resolve_file(path, CHECKPOINT_FILE, also=("ImageReward.safetensors",), what="ImageReward checkpoint")
    config_path = resolve_file(
        os.path.dirname(file) if os.path.isfile(path) else path, CONFIG_FILE, what="ImageReward med_config"
    )
    with open(config_path) as f:
        med_config = json.load(f)
    state = remap_state_dict(tensor_state_dict(load_checkpoint(file, allow_pickle=allow_pickle), file), file)
    model = build_model(med_config, vision_config, mlp_input_size(state, "mlp.", file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(
            f"{file} does not fit the ImageReward model: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    tokenizer = load_tokenizer(tokenizer_path)
    if len(tokenizer) > med_config["vocab_size"]:
        raise ValueError(
            f"tokenizer at {tokenizer_path} has {len(tokenizer)} tokens > vocab_size {med_config['vocab_size']}"
        )
    device = torch.device(device)
    model.eval().requires_grad_(False)
    model.vision.to(device=device, dtype=dtype)
    model.text.to(device=device, dtype=dtype)
    model.mlp.to(device=device)
    size = int(model.vision.config.image_size)
    transform = ImageTransform(size=size, resize=size, mode="crop", crop_offset="round")
    return ImageReward(model, tokenizer, transform, variant=file, device=device, dtype=dtype, batch_size=batch_size)
