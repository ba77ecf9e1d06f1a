"""Offline-first loading: local folders and files never reach the hub (any network or hub-download attempt fails the
test), companions (processor, tokenizer, CLIP backbone) are found next to the weights, a missing local path is a
one-line error naming the path and the files expected, and an offline hub id fails at once with one line."""

from __future__ import annotations

import shutil
import socket
import time

import pytest
import torch

from diffalign import scorers
from diffalign.scorers import _files, aesthetic, imagereward

from .test_aesthetic import head_dir  # noqa: F401 (fixture)
from .test_hpsv2 import ARCH, arch, hps_dir  # noqa: F401 (fixtures)
from .test_imagereward import VIT, published, tokenizer  # noqa: F401 (fixtures)
from .test_pickscore import PROMPTS


class NetworkAttempt(AssertionError):
    """Raised by every patched network or hub entry point; an AssertionError, so no loader can swallow it."""


@pytest.fixture
def no_network(monkeypatch):
    """Sockets and the hub download functions raise; HF_HUB_OFFLINE is unset, so only diffalign's own rules keep a
    local path off the hub."""
    import huggingface_hub
    import huggingface_hub.file_download
    import transformers.utils.hub

    def refuse(*args, **kwargs):
        raise NetworkAttempt(f"network/hub access: {args[:2]} {kwargs.get('repo_id', '')}")

    for target, name in (
        (socket.socket, "connect"),
        (socket.socket, "connect_ex"),
        (socket, "create_connection"),
        (socket, "getaddrinfo"),
        (huggingface_hub, "hf_hub_download"),
        (huggingface_hub, "snapshot_download"),
        (huggingface_hub.file_download, "hf_hub_download"),
        (transformers.utils.hub, "hf_hub_download"),
        (transformers.utils.hub, "snapshot_download"),
    ):
        monkeypatch.setattr(target, name, refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_every_scorer_loads_from_local_folders_alone(
    no_network,
    tmp_path,
    clip_backbone_dir,
    bert_tokenizer_dir,
    head_dir,  # noqa: F811
    hps_dir,  # noqa: F811
    published,  # noqa: F811
    photos,
):
    """No processor/tokenizer/backbone path is given: each comes from next to the weights."""
    pick = scorers.load("pickscore", path=clip_backbone_dir)  # processor files in the model folder
    assert pick(photos, PROMPTS).shape == (2,)
    assert scorers.load("clipscore", path=clip_backbone_dir)(photos, PROMPTS).shape == (2,)
    assert scorers.load("hpsv2", path=hps_dir, model_name=ARCH)(photos, PROMPTS).shape == (2,)
    # DiffSynth's layout: aesthetic-predictor/ beside clip-vit-large-patch14/
    shutil.copytree(head_dir, tmp_path / "aesthetic-predictor")
    shutil.copytree(clip_backbone_dir, tmp_path / "clip-vit-large-patch14")
    aes = scorers.load("aesthetic", path=tmp_path / "aesthetic-predictor")
    assert aes.variant.endswith(str(tmp_path / "clip-vit-large-patch14")) and aes(photos, None).shape == (2,)
    # ImageReward: vocab.txt in the checkpoint's own folder
    folder = tmp_path / "ImageReward"
    shutil.copytree(published[0], folder)
    shutil.copy(bert_tokenizer_dir / "vocab.txt", folder / "vocab.txt")
    ir = scorers.load("imagereward", path=folder / "ImageReward.pt", vision_config=VIT)
    assert ir(photos, PROMPTS).shape == (2,)


def test_pickscore_processor_found_beside_weights_equals_explicit(
    no_network, clip_backbone_dir, clip_model_dir, photos
):
    """The processor files next to the weights are the ones used: same scores as naming them explicitly."""
    implicit = scorers.load("pickscore", path=clip_backbone_dir)
    explicit = scorers.load("pickscore", path=clip_model_dir, processor_path=clip_backbone_dir)
    assert torch.allclose(implicit(photos, PROMPTS), explicit(photos, PROMPTS), atol=1e-6)


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("pickscore", {}, "config.json"),
        ("clipscore", {}, "config.json"),
        ("hpsv2", {"model_name": ARCH}, "HPS_v2.1_compressed.pt"),
        ("aesthetic", {}, "sac+logos+ava1-l14-linearMSE.pth"),
        ("imagereward", {"vision_config": VIT}, "ImageReward.pt"),
    ],
)
@pytest.mark.parametrize("form", ["./models/{name}_v1", "{tmp}/missing/{name}", "~/no-such-dir-{name}/x"])
def test_missing_local_path_is_one_line(no_network, tmp_path, name, kwargs, expected, form, arch):  # noqa: F811
    path = form.format(name=name, tmp=tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        scorers.load(name, path=path, **kwargs)
    message = str(err.value)
    assert "\n" not in message and path in message and expected in message, message
    assert "Repo id" not in message


def test_local_folder_lacking_files_names_them(no_network, tmp_path, clip_model_dir):
    """A folder that exists but lacks the processor files: the error names the folder and the missing files."""
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"lacks model\.safetensors or pytorch_model\.bin"):
        scorers.load("pickscore", path=tmp_path, processor_path=clip_model_dir)
    with pytest.raises(FileNotFoundError, match=r"CLIP tokenizer: .* lacks vocab\.json or tokenizer\.json"):
        scorers.load("clipscore", path=clip_model_dir, processor_path=clip_model_dir)


def test_offline_hub_id_fails_fast_without_network(no_network, monkeypatch, tmp_path, clip_model_dir, head_dir):  # noqa: F811
    """HF_HUB_OFFLINE set, ids not in the cache: one line each, no request, no retry/backoff loop (was ~28 s)."""
    import huggingface_hub
    import transformers.utils.hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for module in (huggingface_hub, transformers.utils.hub):
        monkeypatch.setattr(module, "hf_hub_download", _cache_miss)
        monkeypatch.setattr(module, "snapshot_download", _cache_miss)
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set") as err:
        aesthetic.load(clip_path=clip_model_dir)  # the default head path, a hub id
    assert "\n" not in str(err.value) and aesthetic.DEFAULT_PATH in str(err.value)
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set") as err:
        scorers.load("pickscore", path=clip_model_dir)  # no processor beside it: the laion processor id, offline
    assert "CLIP tokenizer" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set"):
        imagereward.load_tokenizer("bert-base-uncased")
    assert time.monotonic() - start < 10


def _cache_miss(*args, local_files_only=False, **kwargs):
    """hf_hub_download / snapshot_download as they behave offline with an empty cache; asserts they were asked for
    cached files only."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    if not local_files_only:
        raise NetworkAttempt(f"offline, yet the hub was asked for {args[:2]} without local_files_only")
    raise LocalEntryNotFoundError(f"{args[:2]} is not in the cache")


def test_hub_id_shapes():
    """What counts as local (checked, never sent to the hub) and what as a hub id."""
    for text in ("./x", "../x/y", "/abs/x", "~/x", "a/b/c", "a--b/c", "C:\\models\\x", "a/b..c"):
        with pytest.raises(FileNotFoundError):
            _files.local(text, what="t", expected=("f",))
    for text in ("openai/clip-vit-large-patch14", "bert-base-uncased", "xswu/HPSv2", "models/PickScore_v1"):
        assert _files.local(text, what="t", expected=("f",)) is None
