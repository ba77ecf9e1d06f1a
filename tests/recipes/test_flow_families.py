"""The recipe's validation sampling on FLUX.1 (FluxPipeline, guidance embedding), Qwen-Image (true CFG), Z-Image,
FLUX.2, and SD3.5 with skip-layer guidance, which is a sampling option only: the training forwards never skip a
layer."""

from __future__ import annotations

import pytest

from diffalign import config as dconfig
from tests.recipes.conftest import toy_overrides


SLG = {"validation.skip_guidance_layers": "[1]", "validation.num_inference_steps": 10}  # SLG runs at 1% - 20% of steps


TRANSFORMERS = {
    "flux": "FluxTransformer2DModel",
    "sd35": "SD3Transformer2DModel",
    "qwenimage": "QwenImageTransformer2DModel",  # validation: true CFG (true_cfg_scale + negative prompt " ")
    "zimage": "ZImageTransformer2DModel",
    "flux2": "Flux2Transformer2DModel",
}


@pytest.mark.parametrize(
    ("family", "extra"), [("flux", {}), ("sd35", SLG), ("qwenimage", {}), ("zimage", {}), ("flux2", {})]
)
def test_validation_images_on_flow_families(recipe, tiny_dirs, tmp_path, monkeypatch, family, extra):
    from diffalign.models import tiny

    calls = []
    import diffusers

    cls = getattr(diffusers, TRANSFORMERS[family])
    inner = cls.forward

    def spy(self, *args, **kwargs):
        calls.append((self.training, kwargs.get("skip_layers")))
        return inner(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", spy)
    over = {
        "model.family": tiny.adapter_family(family),
        "run.max_steps": 1,
        "validation.every": 1,
        "validation.prompts": "[a red circle]",
        "validation.prompts_file": "null",
        "validation.num_inference_steps": 2,
        "validation.guidance_scale": 3.5,
        **extra,
    }
    result = recipe.main(["--config", "toy/dpo", *toy_overrides(tiny_dirs[family], tmp_path / "r", **over)])
    assert (tmp_path / "r" / "validation" / "step-00000001" / "000.png").is_file()
    training = [skip for is_training, skip in calls if is_training]
    sampling = [skip for is_training, skip in calls if not is_training]
    assert len(training) == 2 * result["step"] and all(skip is None for skip in training)  # policy + reference
    if family == "sd35":
        assert [1] in sampling
    if family == "qwenimage":  # two passes per step: QwenImagePipeline ran true CFG
        assert len(sampling) == 2 * 2


def test_skip_layer_guidance_is_an_sd3_option(tiny_dirs, tmp_path):
    over = {"model.family": "flux", "validation.skip_guidance_layers": "[7, 8, 9]"}
    with pytest.raises(dconfig.ConfigError, match=r"SD3/SD3\.5 sampling option"):
        dconfig.load("toy/dpo", toy_overrides(tiny_dirs["flux"], tmp_path, **over))
