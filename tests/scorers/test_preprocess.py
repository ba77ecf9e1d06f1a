"""Scorer preprocessing on real photos against the published transforms; input checks; the pickle policy.

Tolerances (measured on skimage's astronaut 512x512, coffee 400x600, and astronaut cut to 512x350, which has an
odd crop margin):
* PIL path vs transformers' PIL image processor, torchvision's ``Resize+CenterCrop`` and open_clip's
  ``resize_mode="longest"`` transform: 0.0 exactly (same PIL resize, same crop/pad arithmetic). Checked at 1e-6.
* tensor path vs PIL path: max 1.03/255, mean 0.25-0.30/255 in [0, 1] units, i.e. PIL's uint8 rounding of the
  resized image (round-to-nearest: 0.25/255 mean for uniform residuals). Checked at max 1.5/255, mean 0.4/255.
  A one-pass float resize is 5/255 off at sharp edges; the test would catch a regression to it.
* ``resample="tensor"`` (HPSv2's own: ``ToTensor`` then torchvision ``F.resize`` on the float tensor, then pad)
  vs torchvision's ``F.resize``/``F.pad`` on the ToTensor'd image: 0.0. It is *not* the PIL resize: measured max
  11-16/255, mean 0.18-0.47/255 from open_clip's PIL ``resize_mode="longest"`` transform.
"""

from __future__ import annotations

import argparse
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.scorers.base import (
    ImageTransform,
    check_images,
    check_prompts,
    load_checkpoint,
    preprocess_pil,
    preprocess_tensor,
    resolve_file,
)

from .conftest import to_tensor


SIZES = (224, 32)
MIN_STD = min(ImageTransform().std)


@pytest.fixture(scope="module")
def images(photos):
    from skimage import data

    return [*photos, Image.fromarray(data.astronaut()[:350])]


def _unnormalised(x: torch.Tensor, tf: ImageTransform) -> torch.Tensor:
    std = torch.tensor(tf.std).view(-1, 1, 1)
    mean = torch.tensor(tf.mean).view(-1, 1, 1)
    return x * std + mean


def _pil_processor_class():
    """transformers' PIL-backend CLIP processor: ``CLIPImageProcessorPil`` in 5.x, ``CLIPImageProcessor`` before."""
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor as CLIPImageProcessorPil
    return CLIPImageProcessorPil


@pytest.mark.parametrize("size", SIZES)
def test_pil_path_equals_transformers_pil_processor(images, size):
    proc = _pil_processor_class()(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    tf = ImageTransform.from_hf_processor(proc)
    for im in images:
        ref = torch.as_tensor(np.asarray(proc(images=im, return_tensors="np")["pixel_values"][0]))
        assert torch.allclose(preprocess_pil(im, tf), ref, atol=1e-6, rtol=0), im.size


@pytest.mark.parametrize("size", SIZES)
def test_both_paths_close_to_transformers_default_processor(images, size):
    """transformers 5's default ``CLIPImageProcessor`` resizes uint8 tensors with torchvision: measured max 1/255
    and mean <= 0.007/255 from the PIL path (rare 1-LSB rounding), max 1.04/255 mean 0.29/255 from the tensor path."""
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    tf = ImageTransform.from_hf_processor(proc)
    for im in images:
        ref = _unnormalised(proc(images=im, return_tensors="pt")["pixel_values"][0], tf)
        for got, mean_tol in ((preprocess_pil(im, tf), 0.02), (preprocess_tensor(to_tensor([im]), tf)[0], 0.4)):
            diff = (_unnormalised(got, tf) - ref).abs()
            assert diff.max() < 1.5 / 255 and diff.mean() < mean_tol / 255, (im.size, diff.max() * 255)


@pytest.mark.parametrize("size", SIZES)
def test_round_crop_equals_torchvision_transform(images, size):
    """ImageReward's / OpenAI CLIP's eval transform: Resize(n, bicubic), CenterCrop(n), ToTensor, Normalize."""
    import torchvision.transforms as T

    tf = ImageTransform(size=size, crop_offset="round")
    ref = T.Compose(
        [T.Resize(size, T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(), T.Normalize(tf.mean, tf.std)]
    )
    for im in images:
        assert torch.allclose(preprocess_pil(im, tf), ref(im), atol=1e-6, rtol=0), im.size


def test_crop_offset_rounding_differs_on_odd_margin(images):
    """512x350 at 224 -> 327 wide, margin 103: transformers starts the crop at 51, torchvision at round(51.5)=52."""
    odd = images[2]
    floor = preprocess_pil(odd, ImageTransform(crop_offset="floor"))
    rnd = preprocess_pil(odd, ImageTransform(crop_offset="round"))
    assert torch.equal(floor[..., 1:], rnd[..., :-1])
    assert not torch.equal(floor, rnd)


@pytest.mark.parametrize("size", SIZES)
def test_pad_mode_equals_open_clip_longest(images, size):
    """``resample="pil"`` pad mode == upstream open_clip ``resize_mode="longest"`` (PIL resize of the longest side,
    zero-pad). HPSv2's own code resizes after ToTensor instead: ``test_tensor_resample_equals_hpsv2_resize``."""
    import open_clip

    ref = open_clip.image_transform(size, is_train=False, resize_mode="longest", fill_color=0)
    tf = ImageTransform(size=size, mode="pad")
    for im in images:
        assert torch.allclose(preprocess_pil(im, tf), ref(im), atol=1e-6, rtol=0), im.size
    coffee = preprocess_pil(images[1], tf)  # 400x600 -> 149x224 pad: black rows top and bottom
    assert torch.allclose(_unnormalised(coffee, tf)[:, 0], torch.zeros(3, size), atol=1e-6)


@pytest.mark.parametrize("size", SIZES)
def test_tensor_resample_equals_hpsv2_resize(images, size):
    """HPSv2's ``ResizeMaxSize`` after ``ToTensor``: torchvision ``F.resize`` of the float tensor (bicubic; antialias
    is torchvision's default), ``F.pad`` with 0; equal for PIL and tensor inputs, and far from the PIL resize."""
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF

    tf = ImageTransform(size=size, mode="pad", resample="tensor")
    pil_tf = ImageTransform(size=size, mode="pad")
    worst = 0.0
    for im in images:
        x = T.ToTensor()(im)
        scale = size / max(x.shape[1:])
        new = [round(d * scale) for d in x.shape[1:]]
        ref = TF.resize(x, new, T.InterpolationMode.BICUBIC)
        pad_h, pad_w = size - new[0], size - new[1]
        ref = TF.pad(ref, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
        ref = T.Normalize(tf.mean, tf.std)(ref)
        assert torch.allclose(preprocess_pil(im, tf), ref, atol=1e-6, rtol=0), im.size
        assert torch.allclose(preprocess_tensor(x[None], tf)[0], ref, atol=1e-6, rtol=0), im.size
        diff = (_unnormalised(preprocess_pil(im, pil_tf), tf) - _unnormalised(ref, tf)).abs()
        worst = max(worst, float(diff.max()) * 255)
    assert worst > 3.0  # the two conventions are genuinely different (measured 11-16/255)


@pytest.mark.parametrize(
    "tf", [ImageTransform(size=224), ImageTransform(size=32, crop_offset="round"), ImageTransform(mode="pad")]
)
def test_tensor_path_matches_pil_path(images, tf):
    for im in images:
        a = _unnormalised(preprocess_pil(im, tf), tf)
        b = _unnormalised(preprocess_tensor(to_tensor([im]), tf)[0], tf)
        diff = (a - b).abs()
        assert diff.max() < 1.5 / 255, (im.size, diff.max() * 255)
        assert diff.mean() < 0.4 / 255, (im.size, diff.mean() * 255)


def test_tensor_path_batches_and_runs_on_float64(images):
    tf = ImageTransform(size=32)
    x = to_tensor([images[0], images[0]])
    out = preprocess_tensor(x.double(), tf)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out[0], out[1])


def test_transform_config_checks():
    with pytest.raises(ValueError, match="mode"):
        ImageTransform(mode="stretch")
    with pytest.raises(ValueError, match="resize"):
        ImageTransform(size=224, resize=200)
    with pytest.raises(ValueError, match="resample"):
        ImageTransform(resample="lanczos")
    assert ImageTransform(size=224).resized_hw(400, 600) == (224, 336)
    assert ImageTransform(size=224, mode="pad").resized_hw(400, 600) == (149, 224)


def test_image_checks():
    good = torch.rand(2, 3, 8, 8)
    assert check_images(good) == 2
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        check_images(good * 2 - 1)
    with pytest.raises(TypeError, match="float"):
        check_images((good * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        check_images(good[0])
    with pytest.raises(TypeError, match=r"images\[1\]"):
        check_images([Image.new("RGB", (8, 8)), "cat.png"])
    assert check_images([Image.new("L", (8, 8))]) == 1
    assert check_images(torch.full((1, 3, 4, 4), 1.0005)) == 1  # within RANGE_TOLERANCE


def test_prompt_checks():
    assert check_prompts(["a", "b"], 2, required=True) == ["a", "b"]
    assert check_prompts(None, 2, required=False) is None
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        check_prompts(["a"], 2, required=True)
    with pytest.raises(TypeError, match="list of strings"):
        check_prompts("a cat", 1, required=True)
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        check_prompts(["a", 3], 2, required=True)
    with pytest.raises(ValueError, match="needs one prompt"):
        check_prompts(None, 2, required=True)


def test_pickle_policy(tmp_path):
    sd = {"w": torch.arange(3.0)}
    plain, pickled = tmp_path / "plain.pt", tmp_path / "pickled.pt"
    torch.save({"state_dict": sd}, plain)
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=1e-4)}, pickled)
    assert torch.equal(load_checkpoint(plain)["state_dict"]["w"], sd["w"])
    with pytest.raises(ValueError, match=r"Unsupported global: GLOBAL argparse\.Namespace .*allow_pickle=True") as err:
        load_checkpoint(pickled)
    assert isinstance(err.value.__cause__, pickle.UnpicklingError)
    with pytest.warns(UserWarning, match="full pickle"):
        loaded = load_checkpoint(pickled, allow_pickle=True)
    assert loaded["args"].lr == 1e-4 and torch.equal(loaded["state_dict"]["w"], sd["w"])


def test_resolve_file(tmp_path):
    (tmp_path / "head.safetensors").write_bytes(b"")
    assert resolve_file(tmp_path, "head.pth", also=("head.safetensors",)) == str(tmp_path / "head.safetensors")
    assert resolve_file(tmp_path / "head.safetensors", "ignored") == str(tmp_path / "head.safetensors")
    with pytest.raises(FileNotFoundError, match=r"head\.safetensors"):
        resolve_file(tmp_path, "model.pt")


def test_transform_from_legacy_preprocessor_config(tmp_path):
    """laion/CLIP-ViT-H-14-laion2B-s32B-b79K's preprocessor_config.json uses int sizes (feature-extractor era)."""
    from diffalign.scorers import _clip

    config = {
        "crop_size": 224,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": 224,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    assert _clip.load_transform(tmp_path) == ImageTransform(size=224, resize=224)
    config["resample"] = 2
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="bicubic"):
        _clip.load_transform(tmp_path)


def test_clip_tokenizer_gives_open_clip_ids():
    """``_clip.load_tokenizer`` (the slow ``CLIPTokenizer`` on the shipped vocab) tokenizes as CLIP does."""
    import open_clip

    from diffalign import resources
    from diffalign.scorers import _clip

    prompts = ["a red circle on a blue background", "Two CATS, one dog!", "an astronaut riding a horse in 4k"]
    tokenizer = _clip.load_tokenizer(resources.ASSETS / "tokenizers" / "clip")
    ours = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    theirs = open_clip.tokenize(prompts)  # zero-padded after the end token
    assert torch.equal(ours * (theirs != 0), theirs)
