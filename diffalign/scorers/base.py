"""The scorer interface and the helpers every scorer shares: image checks, preprocessing, batching, weight loading.

A scorer maps ``(images, prompts)`` to one float per image, higher = better:

- ``images``: a list of PIL images (any size and mode; converted to RGB), or a float tensor ``(B, 3, H, W)`` with
  values in **[0, 1]** (what ``VaeImageProcessor.postprocess(..., output_type="pt")`` gives). Tensors in [-1, 1]
  are rejected rather than guessed at: pass ``(x + 1) / 2``. Values may stray outside [0, 1] by at most
  ``RANGE_TOLERANCE`` (rounding in fp16/bf16 decoders) and are then clamped.
- ``prompts``: one string per image (prompt-free scorers accept ``None``).
- result: ``(B,)`` fp32 tensor on the CPU; with ``grad=True`` (tensor images only) it keeps the autograd graph back
  to ``images``, preprocessing included, and lies on ``images.device``.

Preprocessing is each scorer's published one: resize (shortest side + center crop, or longest side + zero pad for
HPSv2), then per-channel normalisation. Two resize conventions exist, set by ``ImageTransform.resample``:

- ``"pil"``: the published pipeline resizes the PIL image (torchvision ``Resize`` before ``ToTensor``,
  transformers' PIL image processors: PickScore, CLIPScore, ImageReward, the aesthetic predictor). PIL images are
  resized exactly so, with PIL bicubic on uint8. Tensors go through ``resize_like_pil``: PIL's separable
  antialiased bicubic (same a = -0.5 kernel) in two clamped passes, which differs from the PIL path by PIL's uint8
  rounding of the resized image: about 0.25/255 per pixel on average and ~1/255 at most, before normalisation
  (tests/scorers/test_preprocess.py measures it on real photos). The two paths are close, not equal.
- ``"tensor"``: the published pipeline resizes the float tensor after ``ToTensor`` (HPSv2's ``ResizeMaxSize``,
  tgxs002/HPSv2 ``hpsv2/src/open_clip/transform.py`` L26-49 and L141-157): one antialiased bicubic
  ``F.interpolate`` pass with no clamp, i.e. torchvision's ``F.resize`` on a float tensor. PIL images are turned
  into tensors first (``ToTensor``), so PIL and tensor inputs take the same arithmetic. It is not the PIL resize:
  the two differ most at sharp edges (``hpsv2.py`` gives the difference measured against the hpsv2 package).
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F


if TYPE_CHECKING:
    from PIL import Image


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RANGE_TOLERANCE = 1e-3


@runtime_checkable
class Scorer(Protocol):
    """What every scorer provides. ``variant`` names the checkpoint / backbone / scale that produced the numbers."""

    name: str
    variant: str
    batch_size: int
    device: torch.device
    dtype: torch.dtype

    def __call__(
        self, images: Sequence[Image.Image] | torch.Tensor, prompts: Sequence[str] | None, *, grad: bool = False
    ) -> torch.Tensor:
        """Scores ``(B,)`` fp32, one per image: on the CPU, or with ``grad=True`` differentiable on the images'
        device."""
        ...


@dataclass(frozen=True, kw_only=True)
class ImageTransform:
    """Resize + crop/pad + normalise, the CLIP/BLIP family of eval transforms.

    ``mode="crop"``: resize the shortest side to ``resize`` (long side ``int(resize * long / short)``, as torchvision
    and transformers compute it), then center-crop ``size``. ``crop_offset`` is how the crop start is rounded for an
    odd margin: ``"floor"`` is transformers' image processors (PickScore, CLIPScore), ``"round"`` (Python round) is
    torchvision's ``CenterCrop`` (ImageReward, the aesthetic predictor's OpenAI CLIP transform).
    ``mode="pad"``: resize the longest side to ``size`` (other side ``round(side / ratio)``, as open_clip's
    ``ResizeKeepRatio(longest=1)`` and HPSv2's ``ResizeMaxSize``), then zero-pad (black) to ``size`` x ``size``,
    left/top getting ``margin // 2``.
    ``resample``: ``"pil"`` (resize the PIL image, as torchvision/transformers pipelines do before ``ToTensor``)
    or ``"tensor"`` (resize the float tensor after ``ToTensor`` in one unclamped pass, as HPSv2's code does); see
    the module docstring.
    """

    size: int = 224
    resize: int | None = None
    mode: Literal["crop", "pad"] = "crop"
    crop_offset: Literal["floor", "round"] = "floor"
    resample: Literal["pil", "tensor"] = "pil"
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __post_init__(self) -> None:
        if self.mode not in ("crop", "pad"):
            raise ValueError(f"ImageTransform.mode must be 'crop' or 'pad', got {self.mode!r}")
        if self.crop_offset not in ("floor", "round"):
            raise ValueError(f"ImageTransform.crop_offset must be 'floor' or 'round', got {self.crop_offset!r}")
        if self.resample not in ("pil", "tensor"):
            raise ValueError(f"ImageTransform.resample must be 'pil' or 'tensor', got {self.resample!r}")
        if self.mode == "crop" and self.resize is not None and self.resize < self.size:
            raise ValueError(f"resize ({self.resize}) must be >= crop size ({self.size})")

    def resized_hw(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of this size is resized to before the crop or pad."""
        if self.mode == "pad":
            ratio = max(height / self.size, width / self.size)
            return round(height / ratio), round(width / ratio)
        target = self.resize or self.size
        if height <= width:
            return target, int(target * width / height)
        return int(target * height / width), target

    def crop_or_pad(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., h, w)`` resized pixels in [0, 1] -> ``(..., size, size)``."""
        h, w = x.shape[-2:]
        s = self.size
        if self.mode == "pad":
            left, top = (s - w) // 2, (s - h) // 2
            return F.pad(x, (left, s - w - left, top, s - h - top), value=0.0)
        top, left = self._offset(h - s), self._offset(w - s)
        return x[..., top : top + s, left : left + s]

    def _offset(self, margin: int) -> int:
        return margin // 2 if self.crop_offset == "floor" else round(margin / 2.0)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> ``(x - mean) / std`` per channel."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return (x - mean) / std

    @classmethod
    def from_hf_processor(cls, processor: Any, *, crop_offset: Literal["floor", "round"] = "floor") -> ImageTransform:
        """Read size, crop, mean and std from a transformers CLIP image processor (``preprocessor_config.json``)."""
        resample = getattr(processor, "resample", 3)
        if int(resample) != 3:
            raise ValueError(f"image processor uses resample={resample!r}; only bicubic (3) is implemented")
        shortest = _size_field(processor.size, "shortest_edge")
        crop_h, crop_w = _size_field(processor.crop_size, "height"), _size_field(processor.crop_size, "width")
        if shortest is None or crop_h is None or crop_h != crop_w:
            raise ValueError(f"expected a shortest-edge resize and a square crop, got size={processor.size!r}")
        return cls(
            size=int(crop_h),
            resize=int(shortest),
            mode="crop",
            crop_offset=crop_offset,
            mean=tuple(float(v) for v in processor.image_mean),
            std=tuple(float(v) for v in processor.image_std),
        )


def _size_field(size: Any, key: str) -> int | None:
    value = size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)
    return None if value is None else int(value)


def preprocess_pil(image: Image.Image, transform: ImageTransform) -> torch.Tensor:
    """One PIL image -> ``(3, size, size)`` fp32, normalised: PIL bicubic resize on uint8 (``resample="pil"``), or
    ``ToTensor`` then the tensor resize (``resample="tensor"``)."""
    import numpy as np
    from PIL import Image

    image = image.convert("RGB")
    if transform.resample == "tensor":
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
        return preprocess_tensor(x[None], transform)[0]
    h, w = image.height, image.width
    new_h, new_w = transform.resized_hw(h, w)
    if (new_h, new_w) != (h, w):
        image = image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    return transform.normalize(transform.crop_or_pad(x)[None])[0]


def resize_like_pil(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic resize of ``(B, C, H, W)`` in [0, 1] the way PIL does it, minus PIL's uint8 rounding.

    PIL resamples separably, horizontal pass then vertical, with the antialiased a = -0.5 bicubic kernel, and stores
    the intermediate image as uint8, i.e. clamped to [0, 1]. ``F.interpolate(antialias=True)`` uses the same kernel;
    doing the two passes separately with the clamp in between removes the overshoot differences at sharp edges
    (max error 5/255 -> 1/255 on skimage's astronaut). Differentiable almost everywhere.
    """
    if x.shape[-1] != width:
        x = F.interpolate(x, size=(x.shape[-2], width), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0)
    if x.shape[-2] != height:
        x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0)
    return x


def resize_tensor(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision ``F.resize(x, (height, width), BICUBIC)`` on a float tensor (antialias on, the default since
    torchvision 0.17): one ``F.interpolate`` pass, values not clamped. What HPSv2's ``ResizeMaxSize`` does after
    ``ToTensor``. Differentiable."""
    if x.shape[-2:] == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)


def preprocess_tensor(images: torch.Tensor, transform: ImageTransform) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1] -> ``(B, 3, size, size)`` fp32, normalised (``resize_like_pil`` or, for
    ``resample="tensor"``, ``resize_tensor``). Differentiable with respect to ``images``."""
    x = images.float().clamp(0.0, 1.0)
    resize = resize_tensor if transform.resample == "tensor" else resize_like_pil
    x = resize(x, *transform.resized_hw(*x.shape[-2:]))
    return transform.normalize(transform.crop_or_pad(x))


def check_images(images: Any) -> int:
    """Validate ``images`` (see the module docstring) and return how many there are."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"image tensor must be (B, 3, H, W), got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"image tensor must be float in [0, 1], got {images.dtype}; use x.float() / 255")
        if images.numel():
            lo, hi = float(images.detach().min()), float(images.detach().max())
            if lo < -RANGE_TOLERANCE or hi > 1.0 + RANGE_TOLERANCE:
                raise ValueError(
                    f"image tensor values lie in [{lo:.4f}, {hi:.4f}]; scorers take [0, 1] (for [-1, 1] pass (x + 1) / 2)"
                )
        return images.shape[0]
    if isinstance(images, (list, tuple)):
        from PIL import Image

        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise TypeError(f"images[{i}] is {type(image).__name__}; pass PIL images or one (B, 3, H, W) tensor")
        return len(images)
    raise TypeError(f"images must be a list of PIL images or a (B, 3, H, W) tensor, got {type(images).__name__}")


def check_prompts(prompts: Any, n: int, *, required: bool) -> list[str] | None:
    """One prompt string per image; ``None`` only where the scorer is prompt-free."""
    if prompts is None:
        if required:
            raise ValueError(f"this scorer needs one prompt per image ({n} images, prompts=None)")
        return None
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of strings (one per image), got {type(prompts).__name__}")
    if len(prompts) != n:
        raise ValueError(f"got {n} images but {len(prompts)} prompts")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] is {type(p).__name__}, not str")
    return list(prompts)


def preprocess_images(images: Any, transform: ImageTransform, device: torch.device) -> torch.Tensor:
    """A checked batch (PIL list or tensor) -> ``(B, 3, size, size)`` fp32 on ``device``, normalised."""
    if isinstance(images, torch.Tensor):
        return preprocess_tensor(images.to(device), transform)
    return torch.stack([preprocess_pil(im, transform) for im in images]).to(device)


class BatchedScorer:
    """Base class: validation, batching, device/dtype handling, the no-grad and the differentiable paths. Subclasses
    set ``name``, ``needs_prompts``, implement ``_score(pixels, prompts) -> (b,)`` on normalised ``(b, 3, S, S)``
    pixels already on ``device`` in ``dtype``, and ``vision_blocks()`` (the image tower's transformer blocks, for
    gradient checkpointing)."""

    name: str = ""
    needs_prompts: bool = True

    def __init__(
        self,
        *,
        variant: str,
        transform: ImageTransform,
        device: str | torch.device,
        dtype: torch.dtype,
        batch_size: int,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.variant = variant
        self.transform = transform
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size

    def __call__(
        self, images: Sequence[Image.Image] | torch.Tensor, prompts: Sequence[str] | None, *, grad: bool = False
    ) -> torch.Tensor:
        """``(B,)`` fp32 scores. ``grad=False``: under ``torch.no_grad``, on the CPU. ``grad=True``: ``images`` must
        be a ``(B, 3, H, W)`` tensor; the graph is kept from the scores back to ``images`` (resize, crop/pad and
        normalisation included; the towers run in the scorer's ``dtype``, weights frozen) and the scores lie on
        ``images.device``. Text features, which do not depend on the images, are computed without a graph where the
        architecture allows (CLIP-style scorers). See ``gradient_checkpointing`` to save activation memory."""
        n = check_images(images)
        if grad and not isinstance(images, torch.Tensor):
            raise TypeError("grad=True needs images as one (B, 3, H, W) float tensor in [0, 1], not PIL images")
        checked = check_prompts(prompts, n, required=self.needs_prompts)
        out = []
        with torch.enable_grad() if grad else torch.no_grad():
            for lo in range(0, n, self.batch_size):
                hi = min(n, lo + self.batch_size)
                pixels = preprocess_images(images[lo:hi], self.transform, self.device).to(self.dtype)
                batch_prompts = None if checked is None else checked[lo:hi]
                scores = self._score(pixels, batch_prompts).float().reshape(-1)
                out.append(scores.to(images.device) if grad else scores.cpu())
            return torch.cat(out) if out else torch.empty(0)

    def _score(self, pixels: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        raise NotImplementedError

    def vision_blocks(self) -> Sequence[torch.nn.Module]:
        """The image tower's transformer blocks (what ``gradient_checkpointing`` wraps)."""
        raise NotImplementedError

    def gradient_checkpointing(self, enable: bool = True) -> None:
        """Recompute each vision-tower block in the backward pass instead of storing its activations
        (``torch.utils.checkpoint``, non-reentrant): activation memory of the image tower drops from all blocks to
        about one, for one extra forward of the tower. Only acts while a graph is being built (``grad=True``);
        scores and gradients are unchanged."""
        checkpoint_blocks(self.vision_blocks(), enable)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, variant={self.variant!r}, device={self.device}, dtype={self.dtype})"


def checkpoint_blocks(blocks: Sequence[torch.nn.Module], enable: bool) -> None:
    """Make each block's ``forward`` run under ``torch.utils.checkpoint.checkpoint`` when grad is enabled (an
    instance attribute over the class method, so parameter names and state dicts are untouched); ``enable=False``
    restores the class method. Works for any module type, including transformers layers in eval mode, whose own
    ``gradient_checkpointing_enable`` only acts in training mode."""
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        block.__dict__.pop("forward", None)
        if not enable:
            continue
        plain = block.forward

        def forward(*args: Any, _plain: Any = plain, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
            return _plain(*args, **kwargs)

        block.forward = forward


def resolve_file(
    path: str | os.PathLike, filename: str, *, also: Sequence[str] = (), what: str = "scorer weights"
) -> str:
    """A file from a local file, a local folder laid out like the hub repo, or a hub repo id (``_files.resolve_file``:
    local paths never reach the hub, a missing local path is a one-line error, offline means cache only)."""
    from diffalign.scorers import _files

    return _files.resolve_file(path, filename, also=also, what=what)


def load_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False) -> Any:
    """Load a checkpoint without executing pickled code unless the caller explicitly allows it.

    ``.safetensors`` -> ``safetensors.torch.load_file``. Anything else -> ``torch.load(weights_only=True)``; if the
    file holds Python objects that loader refuses, raise unless ``allow_pickle=True`` (then load it fully, which
    can run arbitrary code: only for files you trust).
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not allow_pickle:
            raise ValueError(
                f"{path} holds pickled Python objects that torch.load(weights_only=True) refuses "
                f"({_unpickler_reason(err)}). "
                "Pass allow_pickle=True only if you trust this file, or convert it to .safetensors."
            ) from err
    warnings.warn(f"loading {path} with full pickle (allow_pickle=True)", stacklevel=2)
    return torch.load(path, map_location="cpu", weights_only=False)


def _unpickler_reason(err: Exception) -> str:
    """The one informative line of torch's weights-only error (e.g. ``Unsupported global: argparse.Namespace``)."""
    lines = [ln.strip() for ln in str(err).splitlines() if "WeightsUnpickler error:" in ln]
    return lines[0].split("WeightsUnpickler error:", 1)[1].strip().split(". ")[0] if lines else type(err).__name__


def tensor_state_dict(obj: Any, source: str, *, key: str | None = None) -> dict[str, torch.Tensor]:
    """``obj[key]`` (or ``obj`` itself when ``key`` is absent from it) checked to be ``{str: Tensor}``."""
    if key is not None and isinstance(obj, Mapping) and key in obj:
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a state dict, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{source}: entries that are not tensors: {bad[:5]}")
    return dict(obj)


# ---- videos: an image scorer per frame ---------------------------------------------------------------------------
FRAME_REDUCTIONS = ("mean", "min")


class PerFrame:
    """An image scorer applied to the frames of videos, reduced over frames by a declared ``reduction``, until a video
    reward model is added.

    ``scorer(videos (B, 3, F, H, W) in [0, 1], prompts) -> (B,)``: frames ``0, stride, 2 stride, ...`` of each video are
    scored as images with the video's prompt, then ``"mean"`` (the video's average frame) or ``"min"`` (its worst
    frame: one bad frame spoils a clip). Images (B, 3, H, W) pass through to the image scorer unchanged. flow_grpo's
    Wan reward ``video_ocr`` scores every 4th frame and averages the frames that score > 0
    (``flow_grpo/ocr.py``); that filtered mean is not one of these reductions.
    """

    def __init__(self, scorer: Any, reduction: str = "mean", stride: int = 1) -> None:
        if reduction not in FRAME_REDUCTIONS:
            raise ValueError(f"frame reduction {reduction!r}; choices: {', '.join(FRAME_REDUCTIONS)}")
        if stride < 1:
            raise ValueError(f"frame stride must be >= 1, got {stride}")
        self.scorer, self.reduction, self.stride = scorer, reduction, stride
        for attr in ("name", "variant", "batch_size", "device", "dtype"):
            if hasattr(scorer, attr):
                setattr(self, attr, getattr(scorer, attr))

    def __call__(self, images: Any, prompts: Sequence[str] | None, **kwargs: Any) -> torch.Tensor:
        if not (isinstance(images, torch.Tensor) and images.ndim == 5):
            return self.scorer(images, prompts, **kwargs)
        b = images.shape[0]
        frames = images[:, :, :: self.stride].transpose(1, 2)  # (B, F_s, 3, H, W)
        n = frames.shape[1]
        repeated = None if prompts is None else [p for p in prompts for _ in range(n)]
        scores = self.scorer(frames.flatten(0, 1), repeated, **kwargs).view(b, n)
        return scores.mean(dim=1) if self.reduction == "mean" else scores.amin(dim=1)

    def __repr__(self) -> str:
        return f"PerFrame({self.scorer!r}, reduction={self.reduction!r}, stride={self.stride})"


def score(
    scorer: Any, images: Any, prompts: Sequence[str] | None, sources: torch.Tensor | None = None
) -> torch.Tensor:
    """``scorer(images, prompts)``, plus the source images (B, 3, H, W) in [-1, 1] for a scorer that compares an
    edit with its source (``needs_sources``: ``source_similarity``); a source-free scorer ignores them."""
    if not getattr(scorer, "needs_sources", False):
        return scorer(images, prompts)
    if sources is None:
        raise ValueError(f"reward {scorer.name!r} compares edits with their sources: set data.source_image_column")
    return scorer(images, prompts, sources=(sources.float() + 1.0) / 2.0)
