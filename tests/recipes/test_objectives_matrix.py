"""Every offline objective runs through recipes/offline_pref.py on tiny SD1.5, SDXL, SD3, SD3.5-Medium-shaped,
FLUX.1-dev-shaped and Wan2.1-T2V-shaped models (flow target for the last four; Wan on video pairs), and the
editing FLUX.1-Kontext and Qwen-Image-Edit shapes on pairs of edits of a source image,, starts at its analytic LoRA-init value, and exports a
LoRA that a stock diffusers pipeline loads: the images change, and with the LoRA disabled they are the base's
exactly (the reference is the base)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.recipes.conftest import ROOT, toy_overrides


FAMILIES = ["sd15", "sdxl", "sd3", "sd35", "flux", "qwenimage", "zimage", "flux2"]
FLOW = {"sd3", "sd35", "flux", "qwenimage", "zimage", "flux2"}
OBJECTIVES = ["dpo", "mapo", "sdpo", "npo", "rankdpo", "kto", "dspo", "dmpo", "inpo", "smpo", "dcpo", "curriculum_dpo"]
NOT_LOSSES = {"inpo", "curriculum_dpo"}  # dpo + noise.kind=inversion; dpo + data.curriculum
VP_ONLY = {"inpo", "smpo"}  # DDIM-inversion noise: not for flow models
# ---- video (wan): K videos per prompt from assets/video_tiny (5 frames, 16 px); tiny_dirs builds the tiny Wan
FAMILIES.append("wan")
FLOW.add("wan")
VIDEO_DATA = ROOT / "assets" / "video_tiny"
NOT_ON_VIDEO = {  # objectives whose data format has no video form yet
    "dcpo": "one caption per image (pickapic caption_columns)",
    "kto": "unpaired single images (format: unpaired)",
    "curriculum_dpo": "score-gap curriculum over format: scored_pairs / ranked",
}


# ---- instruction editing (fluxkontext, qwenimageedit): pairs of edits of a source image from assets/edit_tiny
EDITING = ("fluxkontext", "qwenimageedit")
FAMILIES += EDITING
FLOW.update(EDITING)
NOT_ON_EDITS = {  # objectives whose data format has no editing form yet
    "dcpo": "one caption per image (pickapic caption_columns)",
    "kto": "unpaired single images (format: unpaired)",
}


def edit_overrides(name: str, family: str) -> list[str]:
    """Source image + winner/loser edits (ranked JSONL; rankdpo reads them as K=2 lists); the Qwen edit source at 32 px
    (the pipeline conditions at ~1024^2 area)."""
    extra = {"data.format": "ranked" if name == "rankdpo" else "scored_pairs", "data.split": "train"}
    extra |= {"data.path": ROOT / "assets" / "edit_tiny", "data.source_image_column": "source_image"}
    if family == "qwenimageedit":
        extra["model.source_resolution"] = 32
    return [f"{k}={v}" for k, v in extra.items()]


def sample_edit(pipe) -> torch.Tensor:
    """The stock editing pipeline on the fixture's first source (Kontext: no auto-resize, a 32^2 target area)."""
    from PIL import Image

    source = Image.open(ROOT / "assets" / "edit_tiny" / "images" / "s0.png")
    kontext = {"_auto_resize": False, "max_area": 32 * 32} if "Kontext" in type(pipe).__name__ else {}
    gen = torch.Generator().manual_seed(0)
    return pipe(image=source, prompt="make the circle red", num_inference_steps=2, height=32, width=32, generator=gen,
                output_type="pt", **kontext).images  # fmt: skip


def video_overrides(name: str) -> list[str]:
    """The data of the wan cases: video pairs, or K=3 video lists for the list objectives (rankdpo)."""
    split = "lists" if name == "rankdpo" else "train"
    extra = {"data.format": "video", "data.path": VIDEO_DATA, "data.split": split, "data.num_frames": 5}
    extra |= {"data.resolution": 16, "data.hflip_prob": 0.5}
    return [f"{k}={v}" for k, v in extra.items()]


def sample_video(pipe) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return pipe("a red circle", num_inference_steps=2, height=16, width=16, num_frames=5, generator=gen,
                output_type="pt").frames  # fmt: skip


def init_loss(name: str, first: dict[str, float]) -> float | None:
    """The loss at LoRA init (policy == reference), where it is known in closed form."""
    if name in {"dpo", "sdpo", "npo", "inpo", "smpo", "dcpo", "curriculum_dpo"}:
        return math.log(2)
    if name == "dmpo":  # p = 1/2 against q = 0.99 (toy alpha 0.01): KL(Bern(1/2) || Bern(q))
        return math.log(0.5) - 0.5 * math.log(0.99 * 0.01)
    if name == "dspo":  # c = 1/2, gap = 0: the SD1.5 form is the winner's plain MSE
        return first["loss/policy_err_w"]
    if name == "kto":  # g = 0 and the reference point 0: h = 1/2, times mean(lambda_y) = 1
        return 0.5
    if name == "rankdpo":  # sum over ordered pairs of weight * log 2, averaged over prompts
        return first["loss/mean_weight"] * first["loss/pairs_per_prompt"] * math.log(2)
    return None


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", OBJECTIVES)
def test_objective_runs_on_family(recipe, tiny_dirs, stock_pipes, tmp_path, family, name):
    from diffalign.models import tiny

    if family in FLOW and name in VP_ONLY:
        pytest.skip("inversion noise needs a DDIM (variance-preserving) model")
    if family == "wan" and name in NOT_ON_VIDEO:
        pytest.skip(f"no video data for {name}: {NOT_ON_VIDEO[name]}")
    if family in EDITING and name in NOT_ON_EDITS:
        pytest.skip(f"no editing data for {name}: {NOT_ON_EDITS[name]}")
    extra = {"run.max_steps": 2, "run.log_every": 1, "model.family": tiny.adapter_family(family)}
    if family in FLOW:
        extra["model.timestep_sampling"] = "logit_normal"
    overrides = toy_overrides(tiny_dirs[family], tmp_path / "run", **extra)
    if name == "rankdpo":
        overrides.append(f"data.path={ROOT / 'assets' / 'ranked_tiny'}")
    if name == "dcpo":  # one caption column per image
        overrides.append(f"data.path={ROOT / 'assets' / 'pickapic_tiny_dual'}")
    if name in {"smpo", "curriculum_dpo"}:  # scored pairs: K=2 ranked lists
        overrides += [f"data.path={ROOT / 'assets' / 'ranked_tiny'}", "data.split=pairs"]
    if family == "wan":
        overrides += video_overrides(name)
    if family in EDITING:
        overrides += edit_overrides(name, family)
    result = recipe.main(["--config", f"toy/{name}", *overrides])
    first = result["history"][0]
    expected = init_loss(name, first)
    if expected is not None:
        assert first["loss"] == pytest.approx(expected, rel=1e-6)
    assert all(math.isfinite(h["loss"]) for h in result["history"])
    if name == "sdpo":
        assert 0.0 <= first["loss/lambda"] <= 1.0

    pipe = stock_pipes[family]
    draw = sample_video if family == "wan" else sample_edit if family in EDITING else sample
    before = draw(pipe)
    pipe.load_lora_weights(str(result["lora_dir"]), adapter_name="trained")
    try:
        assert "trained" in pipe.get_list_adapters().get("unet" if family in {"sd15", "sdxl"} else "transformer", [])
        assert not torch.equal(draw(pipe), before)
        pipe.disable_lora()
        assert torch.equal(draw(pipe), before)
    finally:
        pipe.enable_lora()
        pipe.delete_adapters("trained")


def sample(pipe) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return pipe(  # prompt by keyword: Flux2Pipeline's first parameter is the reference image
        prompt="a red circle", num_inference_steps=2, height=32, width=32, generator=gen, output_type="pt"
    ).images


def test_inpo_with_inversion_switched_off_is_exactly_dpo(recipe, tiny_dirs, tmp_path):
    runs = {}
    for name, extra in (("dpo", {}), ("inpo", {"noise.kind": "random"})):
        overrides = toy_overrides(
            tiny_dirs["sd15"], tmp_path / name, **{"run.max_steps": 2, "run.log_every": 1}, **extra
        )
        runs[name] = recipe.main(["--config", f"toy/{name}", *overrides])["history"]
    assert runs["inpo"] == runs["dpo"]


def test_every_objective_is_listed_with_paper_and_defaults(capsys):
    from diffalign.cli.main import main

    assert main(["ls", "losses"]) == 0
    out = capsys.readouterr().out
    for name in OBJECTIVES:
        assert name in out or name in NOT_LOSSES
    assert "beta=5000" in out and "Wallace" in out


def test_rankdpo_k2_list_matches_gain_weighted_dpo(tiny_dirs):
    """The list path (K=2, ranked format) and the pair path give the same errors for the same group."""
    from diffalign import losses, models
    from diffalign.models import lora
    from diffalign.terms.offline import group_errors, list_terms, pair_terms
    from diffalign.types import SampleInfo

    adapter = models.load("sd15", str(tiny_dirs["sd15"]))
    lora.add_lora(adapter, lora.LoraSpec(rank=4, init="default"))
    with torch.no_grad():
        for p in lora.trainable_parameters(adapter).values():
            p.add_(0.05 * torch.randn_like(p))
    latents = torch.randn(2, 2, 4, 16, 16)
    info = [SampleInfo((32, 32), (0, 0), (32, 32))] * 2
    errors = group_errors(adapter, latents, [3, 4], prompts=["a", "b"], info=info)
    scores = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    rank, dpo = losses.get("rankdpo"), losses.get("dpo")
    ranked = rank.loss(list_terms(errors, scores, 1000), rank.Config(beta=5000))
    paired = dpo.loss(pair_terms(errors, 1000), dpo.Config(beta=5000))
    weight = (2**1 - 2**0) * (1 / math.log2(2) - 1 / math.log2(3))
    assert ranked.loss.item() == pytest.approx(weight * paired.loss.item(), rel=1e-5)
