"""Joint geometric transform of a group of K images, and dataset wrappers that apply it reproducibly.

The K images of a group (winner and loser, or a ranked list) get one resize, one crop and one flip, as in
the diffusers SDXL DPO script and MaPO: images 1..K-1 are first resized to image 0's original size, then
the stacked (K, 3, h, w) tensor is resized (shortest side to ``resolution``, bilinear with antialias),
flipped, cropped to ``resolution`` x ``resolution`` and scaled to [-1, 1]. Diffusion-DPO's reference code
(and the diffusers SD1.5 DPO script) transform winner and loser independently, so they can get different
flips; that is not reproduced here.

SDXL micro-conditioning (``SampleInfo``) follows diffusers ``train_text_to_image_sdxl.py`` and
``train_diffusion_dpo_sdxl.py``: resize, then flip the whole resized image, then crop, and record
``crop_top_left = (top, left)`` of the crop *in the flipped, resized image*. So when the group is flipped,
the crop's left edge in the unflipped resized image is ``resized_width - left - resolution``; no
correction is applied to the recorded value. (An older diffusers version cropped first and then set
``left = resolution - left`` on flip; current diffusers does not.) ``original_size`` is image 0's
(height, width) before any resize.

Randomness comes only from an explicit ``torch.Generator``. The dataset wrappers seed one generator per
item from (seed, epoch, index), so augmentations are reproducible, differ between epochs, and do not
depend on DataLoader workers or on where a run resumed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset
from torchvision.transforms.functional import pil_to_tensor

from diffalign.data.records import Group, PreferenceRecord, SkippedRow, check_choice, quality_flags
from diffalign.types import SampleInfo


CROP_MODES = ("center", "random")


@dataclass(frozen=True)
class JointParams:
    """The random draws for one group: flip or not, and the crop's top-left in the flipped resized image."""

    flip: bool
    top: int
    left: int


@dataclass(frozen=True, kw_only=True)
class JointTransform:
    """Resize (shortest side), flip and crop all K images of a group identically.

    ``__call__(images, generator)`` returns pixels (K, 3, resolution, resolution) float32 in [-1, 1] and
    the group's ``SampleInfo``. ``hflip_prob=0`` disables flipping; a generator is required only when
    something is random (``crop="random"`` or ``hflip_prob > 0``).
    """

    resolution: int
    crop: str = "center"
    hflip_prob: float = 0.5

    def __post_init__(self) -> None:
        check_choice("crop mode", self.crop, CROP_MODES)
        if self.resolution <= 0:
            raise ValueError(f"resolution must be positive, got {self.resolution}")
        if not 0.0 <= self.hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {self.hflip_prob}")

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after scaling the shortest side to ``resolution`` (torchvision ``Resize(int)``)."""
        res = self.resolution
        if height <= width:
            return res, int(res * width / height)
        return int(res * height / width), res

    def sample_params(self, height: int, width: int, generator: torch.Generator | None) -> JointParams:
        """Draw flip (first) and crop offsets (then top, left) for an image 0 of size (height, width)."""
        needs_rng = self.crop == "random" or self.hflip_prob > 0
        if needs_rng and generator is None:
            raise ValueError("JointTransform with random crop or hflip_prob > 0 needs an explicit torch.Generator")
        rh, rw = self.resized_size(height, width)
        res = self.resolution
        flip = bool(self.hflip_prob > 0 and torch.rand((), generator=generator).item() < self.hflip_prob)
        if self.crop == "center":
            return JointParams(flip=flip, top=round((rh - res) / 2.0), left=round((rw - res) / 2.0))
        top = int(torch.randint(0, rh - res + 1, (), generator=generator).item())
        left = int(torch.randint(0, rw - res + 1, (), generator=generator).item())
        return JointParams(flip=flip, top=top, left=left)

    def apply(self, images: Sequence[Image.Image], params: JointParams) -> tuple[Tensor, SampleInfo]:
        """Apply given draws: (K, 3, res, res) in [-1, 1] and the ``SampleInfo`` of image 0."""
        if not images:
            raise ValueError("a group needs at least one image")
        x = _stack_at_size_of_first(images)
        height, width = x.shape[-2:]
        rh, rw = self.resized_size(height, width)
        if (rh, rw) != (height, width):
            x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
        if params.flip:
            x = x.flip(-1)
        res = self.resolution
        x = x[..., params.top : params.top + res, params.left : params.left + res]
        pixels = (x * 2.0 - 1.0).clamp(-1.0, 1.0).contiguous()
        info = SampleInfo(
            original_size=(height, width), crop_top_left=(params.top, params.left), target_size=(res, res)
        )
        return pixels, info

    def __call__(
        self, images: Sequence[Image.Image], generator: torch.Generator | None = None
    ) -> tuple[Tensor, SampleInfo]:
        if not images:
            raise ValueError("a group needs at least one image")
        params = self.sample_params(images[0].height, images[0].width, generator)
        return self.apply(images, params)


def _to_float(image: Image.Image) -> Tensor:
    return pil_to_tensor(image.convert("RGB")).float().div_(255.0)


def _stack_at_size_of_first(images: Sequence[Image.Image]) -> Tensor:
    """(K, 3, h0, w0) in [0, 1]; images 1..K-1 resized (bilinear, antialias) to image 0's size."""
    first = _to_float(images[0])
    size = tuple(first.shape[-2:])
    out = [first]
    for image in images[1:]:
        x = _to_float(image)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        out.append(x)
    return torch.stack(out)


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator seeded from (seed, epoch, index) through ``numpy.random.SeedSequence`` mixing."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def to_group(record: PreferenceRecord, transform: JointTransform, generator: torch.Generator | None) -> Group:
    images = record.images if record.source is None else [*record.images, record.source]
    pixels, info = transform(images, generator)  # the source is resized, flipped and cropped with its edits
    source = None if record.source is None else pixels[-1]
    pixels = pixels if record.source is None else pixels[:-1]
    flags = quality_flags(record, transform.hflip_prob)
    return Group(
        prompt=record.prompt,
        pixels=pixels,
        info=info,
        scores=record.scores,
        index=record.index,
        flags=flags,
        image_prompts=record.image_prompts,
        source=source,
    )


class TransformedDataset(Dataset):
    """Wrap a map-style record dataset: ``ds[key]`` is a ``Group`` or the base's ``SkippedRow``.

    The augmentation generator is seeded from (seed, epoch, record.index), the row index in the source,
    exactly as ``TransformedIterable`` does, so map-style and streaming give the same group for a row.
    ``key`` is an item index (the augmentation epoch is ``set_epoch``'s value) or an ``(index, epoch)``
    pair, which is what ``GroupSampler(with_epoch=True)`` yields; the pair form is robust to persistent
    DataLoader workers, which never see ``set_epoch`` calls made in the main process.
    """

    def __init__(self, base: Dataset, transform: JointTransform, *, seed: int = 0) -> None:
        self.base, self.transform, self.seed = base, transform, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]) -> Group | SkippedRow:
        index, epoch = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), self.epoch)
        if index < 0:
            index += len(self)
        record = self.base[index]
        if isinstance(record, SkippedRow):
            return record
        return to_group(record, self.transform, item_generator(self.seed, epoch, record.index))


class TransformedIterable(IterableDataset):
    """Wrap a record iterable (e.g. ``PickapicIterable``): yields ``Group``, seeded from (seed, epoch, row index)."""

    def __init__(self, base: IterableDataset, transform: JointTransform, *, seed: int = 0) -> None:
        self.base, self.transform, self.seed = base, transform, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Group]:
        for record in self.base:
            if isinstance(record, SkippedRow):
                continue
            yield to_group(record, self.transform, item_generator(self.seed, self.epoch, record.index))
