"""HPSv2/2.1: tiny open_clip models saved as ``{"state_dict": ...}`` under the published file names of xswu/HPSv2,
loaded through ``hpsv2.load``, checked against open_clip's own forward with HPSv2's own eval transform rebuilt here
from its code (``ToTensor`` then ``ResizeMaxSize`` on the tensor) or, for ``preprocess="open_clip"``, upstream
open_clip's ``resize_mode="longest"`` transform; 100 * cosine by hand."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from diffalign import scorers
from diffalign.scorers import hpsv2

from .conftest import CLIP_SIZE, to_tensor


ARCH = "diffalign-tiny-ViT"
PROMPTS = ["an astronaut in a white space suit", "a cup of coffee on a table"]


@pytest.fixture(scope="module")
def arch(tmp_path_factory):
    """A tiny ViT open_clip config registered under ARCH (``open_clip.add_model_config``)."""
    import open_clip

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": CLIP_SIZE, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    path = tmp_path_factory.mktemp("openclip_cfg") / f"{ARCH}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return ARCH


def _model(seed: int):
    import open_clip

    torch.manual_seed(seed)
    return open_clip.create_model(ARCH, pretrained=None, output_dict=True).eval()


@pytest.fixture(scope="module")
def hps_dir(tmp_path_factory, arch):
    """Folder laid out like xswu/HPSv2: both versions, different weights (seed 0 for v2.0, 1 for v2.1)."""
    out = tmp_path_factory.mktemp("hpsv2")
    for seed, version in enumerate(("v2.0", "v2.1")):
        torch.save({"state_dict": _model(seed).state_dict()}, out / hpsv2.FILES[version])
    return out


def hpsv2_transform(n_px: int):
    """tgxs002/HPSv2 ``image_transform(is_train=False, resize_longest_max=True)``: RGB, ToTensor, ResizeMaxSize
    (torchvision F.resize of the float tensor, longest side to n_px, then F.pad with 0: left/top get margin // 2),
    Normalize with OpenAI mean/std."""
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF

    def resize_max_size(img: torch.Tensor) -> torch.Tensor:
        height, width = img.shape[1:]
        scale = n_px / float(max(height, width))
        if scale != 1.0:
            new_size = tuple(round(dim * scale) for dim in (height, width))
            img = TF.resize(img, new_size, T.InterpolationMode.BICUBIC)
            pad_h, pad_w = n_px - new_size[0], n_px - new_size[1]
            img = TF.pad(img, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
        return img

    return T.Compose(
        [
            lambda image: image.convert("RGB"),
            T.ToTensor(),
            resize_max_size,
            T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )


def by_hand(seed: int, images, prompts, preprocess: str = "hpsv2") -> torch.Tensor:
    """open_clip's forward on the transformed images; 100 * diag(img_f @ txt_f.T) (``img_score.py``)."""
    import open_clip

    model = _model(seed)
    if preprocess == "hpsv2":
        transform = hpsv2_transform(CLIP_SIZE)
    else:
        transform = open_clip.image_transform(CLIP_SIZE, is_train=False, resize_mode="longest", fill_color=0)
    with torch.no_grad():
        out = model(torch.stack([transform(im) for im in images]), open_clip.get_tokenizer(ARCH)(prompts))
    return 100 * torch.diag(out["image_features"] @ out["text_features"].T)


@pytest.mark.parametrize(("version", "seed"), [("v2.0", 0), ("v2.1", 1)])
def test_score_matches_open_clip(hps_dir, photos, version, seed):
    scorer = scorers.load("hpsv2", path=hps_dir, version=version, model_name=ARCH)
    got, want = scorer(photos, PROMPTS), by_hand(seed, photos, PROMPTS)
    assert got.dtype == torch.float32 and got.shape == (2,)
    assert torch.allclose(got, want, atol=1e-4, rtol=0)  # float32 summation order: measured 1.5e-5 on ~26
    assert (got[0] - got[1]).abs() > 1e-2
    assert scorer.variant == f"HPS{version} {hpsv2.FILES[version]} x100"


def test_open_clip_preprocess_option(hps_dir, photos):
    """``preprocess="open_clip"``: the PIL resize of upstream open_clip; a different number from HPSv2's own."""
    scorer = hpsv2.load(hps_dir, version="v2.0", model_name=ARCH, preprocess="open_clip")
    got = scorer(photos, PROMPTS)
    assert torch.allclose(got, by_hand(0, photos, PROMPTS, "open_clip"), atol=1e-5, rtol=0)
    assert not torch.allclose(got, by_hand(0, photos, PROMPTS), atol=1e-4)
    assert scorer.variant == f"HPSv2.0 {hpsv2.FILES['v2.0']} x100 preprocess=open_clip"
    with pytest.raises(ValueError, match="did you mean 'open_clip'"):
        hpsv2.load(hps_dir, model_name=ARCH, preprocess="openclip")


def test_versions_load_different_files(hps_dir, photos):
    a = hpsv2.load(hps_dir, version="v2.0", model_name=ARCH)(photos, PROMPTS)
    b = hpsv2.load(hps_dir, version="v2.1", model_name=ARCH)(photos, PROMPTS)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match=r"did you mean 'v2\.1'"):
        hpsv2.load(hps_dir, version="v2.11", model_name=ARCH)


def test_version_label_follows_the_file(tmp_path, hps_dir, photos):
    """A v2.0 file passed with the default version is labelled v2.0; a contradicting version is refused; a file
    whose name says nothing needs the version spelled out."""
    v20 = hps_dir / hpsv2.FILES["v2.0"]
    scorer = hpsv2.load(v20, model_name=ARCH)
    assert scorer.variant == f"HPSv2.0 {hpsv2.FILES['v2.0']} x100"
    assert torch.allclose(scorer(photos, PROMPTS), by_hand(0, photos, PROMPTS), atol=1e-5)
    assert hpsv2.load(hps_dir, model_name=ARCH).variant.startswith("HPSv2.1 ")  # a folder: the default, v2.1
    with pytest.raises(ValueError, match=r"HPSv2\.0 checkpoint by its name, but version='v2\.1'"):
        hpsv2.load(v20, version="v2.1", model_name=ARCH)
    renamed = tmp_path / "my_hps.pt"
    renamed.write_bytes(v20.read_bytes())
    with pytest.raises(ValueError, match=r"cannot tell the HPS version of .*my_hps\.pt"):
        hpsv2.load(renamed, model_name=ARCH)
    assert hpsv2.load(renamed, version="v2.0", model_name=ARCH).variant == "HPSv2.0 my_hps.pt x100"


def test_safetensors_conversion_and_raw_cosine(tmp_path, hps_dir, photos):
    """A flat .safetensors conversion in the same folder layout; ``scale=1`` gives img_score.py's raw cosine."""
    from safetensors.torch import save_file

    state = torch.load(hps_dir / hpsv2.FILES["v2.1"], weights_only=True)["state_dict"]
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "HPS_v2.1_compressed.safetensors")
    got = hpsv2.load(tmp_path, version="v2.1", model_name=ARCH, scale=1.0)(photos, PROMPTS)
    assert torch.allclose(got, by_hand(1, photos, PROMPTS) / 100, atol=1e-7)


def test_pickled_checkpoint_needs_allow_pickle(tmp_path, hps_dir, photos):
    state = torch.load(hps_dir / hpsv2.FILES["v2.0"], weights_only=True)["state_dict"]
    file = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": state, "args": argparse.Namespace(precision="amp")}, file)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        hpsv2.load(file, version="v2.0", model_name=ARCH)
    with pytest.warns(UserWarning, match="full pickle"):
        scorer = hpsv2.load(file, version="v2.0", model_name=ARCH, allow_pickle=True)
    assert torch.allclose(scorer(photos, PROMPTS), by_hand(0, photos, PROMPTS), atol=1e-5)


def test_wrong_architecture_is_an_error(tmp_path, hps_dir):
    state = torch.load(hps_dir / hpsv2.FILES["v2.0"], weights_only=True)["state_dict"]
    state["visual.extra"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "HPS_v2_compressed.pt")
    with pytest.raises(KeyError, match=r"visual\.extra"):
        hpsv2.load(tmp_path, version="v2.0", model_name=ARCH)


def test_tensor_input_equals_pil(hps_dir, photos):
    """HPSv2 resizes after ToTensor, so a PIL image and its ToTensor tensor take the same arithmetic: equal scores
    (coffee, 400x600, goes through the pad)."""
    scorer = hpsv2.load(hps_dir, version="v2.0", model_name=ARCH)
    for im in photos:
        diff = (scorer([im], PROMPTS[:1]) - scorer(to_tensor([im]), PROMPTS[:1])).abs().max()
        assert diff < 1e-5, (im.size, diff)
