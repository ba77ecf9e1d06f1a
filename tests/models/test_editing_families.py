"""The instruction-editing families (fluxkontext, qwenimageedit): the adapters' forward is the pipelines' denoiser
call with the source tokens joined to the sequence, the source reaches the ELBO terms of both passes, and bad input
gets one line naming the key and the fix."""

from __future__ import annotations

import pytest
import torch

from diffalign import models
from diffalign.models import editing, tiny


@pytest.fixture(scope="module", params=["fluxkontext", "qwenimageedit"])
def edit(request):
    pipe = tiny.pipeline(request.param)
    kwargs = {"source_resolution": 32} if request.param == "qwenimageedit" else {}
    return request.param, models.from_components(request.param, pipe.components, **kwargs), pipe


def test_predict_is_the_pipelines_denoiser_call_on_target_plus_source_tokens(edit):
    family, adapter, pipe = edit
    torch.manual_seed(0)
    sources = torch.rand(2, 3, 32, 32) * 2 - 1
    cond = adapter.encode_prompts(["make it blue", "add a hat"], None, sources=sources)
    x = torch.randn(2, *adapter.latent_shape(32))
    t = torch.tensor([300.0, 700.0])
    h, w = x.shape[-2:]
    src = cond[editing.SOURCE]
    tokens = torch.cat([pipe._pack_latents(x, 2, x.shape[1], h, w), pipe._pack_latents(src, 2, x.shape[1], *src.shape[-2:])], 1) if family == "fluxkontext" else None  # fmt: skip
    if family == "fluxkontext":  # FluxKontextPipeline.prepare_latents / __call__: source ids with id[0] = 1
        ids = pipe._prepare_latent_image_ids(2, h // 2, w // 2, "cpu", torch.float32)
        src_ids = pipe._prepare_latent_image_ids(2, src.shape[-2] // 2, src.shape[-1] // 2, "cpu", torch.float32)
        src_ids[..., 0] = 1
        out = pipe.transformer(
            hidden_states=tokens, timestep=t / 1000, guidance=torch.full((2,), 3.5),
            pooled_projections=cond["pooled_projections"], encoder_hidden_states=cond["encoder_hidden_states"],
            txt_ids=torch.zeros(cond["encoder_hidden_states"].shape[1], 3), img_ids=torch.cat([ids, src_ids]),
            return_dict=False,
        )[0][:, : (h // 2) * (w // 2)]  # fmt: skip
    else:  # QwenImageEditPipeline.__call__: img_shapes lists target and source
        packed = [pipe._pack_latents(z[:, :, None], 2, z.shape[1], *z.shape[-2:]) for z in (x, src)]
        from diffalign.models.qwenimage import trim_text

        hidden, mask = trim_text(cond["encoder_hidden_states"], cond["encoder_hidden_states_mask"])
        shapes = [[(1, h // 2, w // 2), (1, src.shape[-2] // 2, src.shape[-1] // 2)]] * 2
        out = pipe.transformer(
            hidden_states=torch.cat(packed, 1), timestep=t / 1000, encoder_hidden_states=hidden,
            encoder_hidden_states_mask=mask, img_shapes=shapes, return_dict=False,
        )[0][:, : (h // 2) * (w // 2)]  # fmt: skip
    expected = pipe._unpack_latents(out, 32, 32, pipe.vae_scale_factor)
    expected = expected[:, :, 0] if expected.ndim == 5 else expected
    assert torch.allclose(adapter.predict(x, t, cond), expected, atol=1e-5)
    # the source matters: another source changes the prediction
    other = adapter.encode_prompts(["make it blue", "add a hat"], None, sources=-sources)
    assert not torch.allclose(adapter.predict(x, t, other), expected, atol=1e-4)


def test_qwen_edit_text_encoding_sees_the_image():
    pipe = tiny.pipeline("qwenimageedit")
    adapter = models.from_components("qwenimageedit", pipe.components, source_resolution=32)
    a, b = torch.full((1, 3, 32, 32), -0.8), torch.full((1, 3, 32, 32), 0.8)
    ea = adapter.encode_prompts(["make it red"], None, sources=a)["encoder_hidden_states"]
    eb = adapter.encode_prompts(["make it red"], None, sources=b)["encoder_hidden_states"]
    assert not torch.allclose(ea, eb)


def test_editing_needs_sources_and_t2i_takes_none(edit):
    _, adapter, _ = edit
    with pytest.raises(ValueError, match="source_image_column"):
        adapter.encode_prompts(["x"], None)
    flux = models.from_components("flux", tiny.flux(0))
    with pytest.raises(ValueError, match="not an editing family"):
        editing.encode(flux, ["x"], None, torch.zeros(1, 3, 32, 32))


def test_editing_config_errors_name_the_key():
    from diffalign import config as dconfig

    base = ["model.path=x", "data.path=y", "data.format=scored_pairs", "validation.every=0"]
    with pytest.raises(dconfig.ConfigError, match=r"data\.source_image_column"):
        dconfig.load("toy/dpo", ["model.family=fluxkontext", *base])
    with pytest.raises(dconfig.ConfigError, match=r"data\.source_image_column='s' applies to editing families"):
        dconfig.load("toy/dpo", ["model.family=flux", "data.source_image_column=s", *base])


@pytest.mark.parametrize("name", ["fluxkontext/grpo_edit", "qwenimageedit/dpo_lora"])
def test_editing_configs_are_listed_and_validate(capsys, name):
    from diffalign.cli.main import main

    assert main(["ls", "configs"]) == 0
    assert name in capsys.readouterr().out
    extra = ["--num-processes", "28"] if "grpo" in name else []
    assert main(["validate", name, "--no-paths", *extra]) == 0, name


def test_edit_rows_carry_their_source_and_bad_rows_name_the_key(tmp_path):
    from diffalign.data.ranked import RankedDataset, RankedSource
    from diffalign.data.records import BadRowError
    from diffalign.data.transforms import JointTransform, to_group
    from diffalign.resources import PACKAGE_ROOT

    fixture = PACKAGE_ROOT / "assets" / "edit_tiny" / "train.jsonl"
    ds = RankedDataset(RankedSource(path=str(fixture), source_image_column="source_image"))
    record = ds[0]
    group = to_group(record, JointTransform(resolution=32, hflip_prob=0.0), None)
    assert group.pixels.shape == (2, 3, 32, 32) and group.source.shape == (3, 32, 32)
    assert not torch.equal(group.source, group.pixels[0])  # the winner edits the source: they differ
    bad = tmp_path / "train.jsonl"
    bad.write_text(fixture.read_text().splitlines()[0].replace('"source_image"', '"src"') + "\n")
    (tmp_path / "images").symlink_to(fixture.parent / "images")
    with pytest.raises(BadRowError, match="missing key 'source_image'"):
        RankedDataset(RankedSource(path=str(bad), source_image_column="source_image", on_bad_row="raise"))


def test_online_prompts_with_sources(tmp_path):
    from types import SimpleNamespace

    from diffalign.config.engine import ConfigError
    from diffalign.resources import PACKAGE_ROOT
    from diffalign.training.prompts import read_edit_prompts

    data = SimpleNamespace(
        prompts=str(PACKAGE_ROOT / "assets" / "edit_tiny" / "prompts.jsonl"), key=None,
        source_image_column="source_image", resolution=32, max_prompts=3,
    )  # fmt: skip
    prompts, sources = read_edit_prompts(data)
    assert len(prompts) == len(sources) == 3 and sources[0].shape == (3, 32, 32)
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "make it red"}\n')
    with pytest.raises(
        ConfigError, match=r"p\.jsonl:1: need a string 'prompt' and a source image path 'source_image'"
    ):
        read_edit_prompts(SimpleNamespace(**{**vars(data), "prompts": str(bad)}))
