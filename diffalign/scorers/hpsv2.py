"""HPSv2 / HPSv2.1 (Wu et al., "Human Preference Score v2", 2023): open_clip ViT-H-14 fine-tuned on HPDv2.

Checkpoints: hub model repo ``xswu/HPSv2``, files ``HPS_v2_compressed.pt`` (v2.0) and ``HPS_v2.1_compressed.pt``
(v2.1), as ``hpsv2/utils.py`` maps them. Each is a dict whose ``"state_dict"`` loads strictly into upstream
``open_clip.create_model("ViT-H-14", pretrained=None)`` (research note §0.5). A ``.safetensors`` conversion (the
flat state dict, e.g. DiffSynth's ``HPS_v2_compressed.safetensors``) is accepted too.

Score (``hpsv2/img_score.py``): the raw cosine of the normalised features, ``diag(img_f @ txt_f.T)``, ~0.20-0.33.
Benchmarks and papers report it x100 (``evaluation.py``), so ``scale=100`` is the default here (SD1.5 ~26, SDXL
~27-30); ``variant`` records version and scale. v2.0 and v2.1 numbers are not comparable.

Preprocessing, ``preprocess="hpsv2"`` (default): HPSv2's own eval transform (``light_augmentation=True`` ->
``image_transform(resize_longest_max=True)``, ``hpsv2/src/open_clip/transform.py`` L141-157 and ``ResizeMaxSize``
L26-49): RGB, ``ToTensor``, then on the float tensor a bicubic resize of the longest side to 224 (torchvision
``F.resize``: one antialiased pass, no clamp), zero-pad to 224 x 224 (left/top ``margin // 2``), OpenAI mean/std.
``preprocess="open_clip"``: upstream open_clip's ``image_transform(resize_mode="longest")``, which resizes the PIL
image before ``ToTensor`` (what re-implementations on open_clip 3.x give); measured against the hpsv2 package's
transform it differs by up to 22.9/255 per pixel at sharp edges (mean 0.07-1.09/255 per image), square images
included (no padding then, but the resize arithmetic still differs). Two corner cases of HPSv2's code are not
copied: it skips resize *and* pad when the longest side is already 224 (a non-square such image then cannot enter
the ViT), and it keeps RGBA images as 4 channels.

Version: ``version=None`` reads it from the checkpoint's file name when ``path`` is a file (``HPS_v2_compressed.*``
is v2.0, ``HPS_v2.1_compressed.*`` v2.1; another name needs ``version``) and means v2.1 for a folder or hub id; a
``version`` that contradicts the file name is an error, so a v2.0 file is never labelled v2.1.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from diffalign.registry import suggest
from diffalign.scorers.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    BatchedScorer,
    ImageTransform,
    load_checkpoint,
    resolve_file,
    tensor_state_dict,
)


DEFAULT_PATH = "xswu/HPSv2"
DEFAULT_VERSION = "v2.1"
FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
PREPROCESS = {"hpsv2": "tensor", "open_clip": "pil"}  # preprocess option -> ImageTransform.resample


class HPSv2(BatchedScorer):
    """``scale * cos(img_f, txt_f)`` with open_clip features."""

    name = "hpsv2"

    def __init__(self, model: Any, tokenizer: Any, transform: ImageTransform, *, scale: float, **kwargs: Any) -> None:
        super().__init__(transform=transform, **kwargs)
        self.model = model
        self.tokenizer = tokenizer
        self.scale = scale

    def _score(self, pixels: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        img = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        with torch.no_grad():
            ids = self.tokenizer(prompts or []).to(pixels.device)
            txt = F.normalize(self.model.encode_text(ids).float(), dim=-1)
        return self.scale * (img * txt).sum(dim=-1)

    def vision_blocks(self) -> Any:
        return self.model.visual.transformer.resblocks


def version_of(file: str) -> str | None:
    """``"v2.0"`` / ``"v2.1"`` from a checkpoint's published file name (any extension), else ``None``."""
    stem = os.path.splitext(os.path.basename(file))[0]
    for version, name in FILES.items():
        if stem == os.path.splitext(name)[0]:
            return version
    return None


def check_version(version: str | None, file: str, from_file: bool) -> str:
    """The version to label ``file`` with (see the module docstring); errors for unknown or contradicting ones."""
    if version is not None and version not in FILES:
        raise ValueError(f"unknown HPS version {version!r}; {suggest(version, list(FILES))}")
    named = version_of(file)
    if version is not None and named is not None and named != version:
        raise ValueError(f"{file} is the HPS{named} checkpoint by its name, but version={version!r} was given")
    if version is None and from_file and named is None:
        raise ValueError(f"cannot tell the HPS version of {file} from its name; pass version='v2.0' or 'v2.1'")
    return version or named or DEFAULT_VERSION


def _transform(model: Any, resample: str = "tensor") -> ImageTransform:
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    return ImageTransform(
        size=int(size),
        mode="pad",
        resample=resample,
        mean=tuple(cfg.get("mean", OPENAI_CLIP_MEAN)),
        std=tuple(cfg.get("std", OPENAI_CLIP_STD)),
    )


def load(
    path: str | os.PathLike = DEFAULT_PATH,
    *,
    version: str | None = None,
    model_name: str = "ViT-H-14",
    scale: float = 100.0,
    preprocess: str = "hpsv2",
    allow_pickle: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
) -> HPSv2:
    """HPSv2 from the hub repo, a local folder laid out like it, or one checkpoint file (.pt or .safetensors).

    ``model_name`` is the open_clip architecture (tests register a tiny config with ``open_clip.add_model_config``).
    ``version``, ``preprocess``: see the module docstring.
    """
    import open_clip

    if preprocess not in PREPROCESS:
        raise ValueError(f"unknown HPSv2 preprocess {preprocess!r}; {suggest(preprocess, list(PREPROCESS))}")
    from_file = os.path.isfile(os.fspath(path))
    wanted = check_version(version, "", False) if version is not None else DEFAULT_VERSION
    file = resolve_file(
        path, FILES[wanted], also=(FILES[wanted].replace(".pt", ".safetensors"),), what="HPSv2 checkpoint"
    )
    version = check_version(version, file, from_file)
    state = tensor_state_dict(load_checkpoint(file, allow_pickle=allow_pickle), file, key="state_dict")
    model = open_clip.create_model(model_name, pretrained=None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(
            f"{file} does not fit open_clip {model_name!r}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    device = torch.device(device)
    model = model.eval().requires_grad_(False).to(device=device, dtype=dtype)
    return HPSv2(
        model,
        open_clip.get_tokenizer(model_name),
        _transform(model, PREPROCESS[preprocess]),
        scale=scale,
        variant=f"HPS{version} {os.path.basename(file)} x{scale:g}"
        + ("" if preprocess == "hpsv2" else f" preprocess={preprocess}"),
        device=device,
        dtype=dtype,
        batch_size=batch_size,
    )
