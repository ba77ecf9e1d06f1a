"""The generator pool: generators on one base share its weights and still sample exactly what separate pipelines do."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffalign.label import Generator, LabelError, SamplingProtocol
from diffalign.label.generate import GeneratorPool
from tests.label.helpers import make_lora


PROTOCOL = SamplingProtocol(steps=2, guidance_scale=5.0)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def stock_sample(tiny_dir, lora, prompt: str, seed: int) -> np.ndarray:
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    gen = torch.Generator().manual_seed(seed)
    image = pipe(prompt, num_inference_steps=2, guidance_scale=5.0, generator=gen, output_type="np").images[0]
    return (image * 255).round().astype(np.int16)


def test_two_loras_and_the_base_share_one_model(tiny_dirs, lora_dir, tmp_path):
    tiny = tiny_dirs["sd15"]
    other = make_lora(tiny, tmp_path / "lora2", seed=2)
    gens = [
        Generator(name="a", family="sd15", path=str(tiny), lora=str(lora_dir)),
        Generator(name="base", family="sd15", path=str(tiny)),
        Generator(name="b", family="sd15", path=str(tiny), lora=str(other)),
    ]
    pool = GeneratorPool(gens, [PROTOCOL] * 3)
    assert len(pool._bases) == 1  # one copy of the weights
    # interleave the generators so every switch (LoRA -> base -> other LoRA -> first LoRA) is exercised
    order = [(2, 11), (0, 10), (1, 12), (0, 13)]
    got = {(g, s): pixels(pool.sample(g, ["a red cat"], [s])[0]) for g, s in order}
    loras = {0: lora_dir, 1: None, 2: other}
    for g, s in order:
        assert np.abs(got[g, s] - stock_sample(tiny, loras[g], "a red cat", s)).max() <= 1, (g, s)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_other_families_sample_deterministically(tiny_dirs, family):
    gens = [Generator(name=family, family=family, path=str(tiny_dirs[family]))]
    pool = GeneratorPool(gens, [SamplingProtocol(steps=2, guidance_scale=4.0, height=48, width=32)], batch_size=2)
    images = pool.sample(0, ["a cat", "a cat", "a dog"], [1, 2, 1])
    assert [im.size for im in images] == [(32, 48)] * 3
    again = pool.sample(0, ["a cat"], [1])[0]  # alone in its batch: equal up to float rounding
    assert np.abs(pixels(images[0]) - pixels(again)).max() <= 1
    assert np.abs(pixels(images[0]) - pixels(images[1])).max() > 10  # another seed, another image
    assert pool.describe(0)["height"] == 48


def test_missing_lora_folder_and_unknown_scheduler(tiny_dirs, tmp_path):
    tiny = str(tiny_dirs["sd15"])
    with pytest.raises(LabelError, match=r"LoRA folder .* does not exist"):
        GeneratorPool([Generator(name="x", family="sd15", path=tiny, lora=str(tmp_path / "nope"))], [PROTOCOL])
    bad = SamplingProtocol(steps=2, scheduler="eulr")
    with pytest.raises(LabelError, match="generator 'x': unknown scheduler 'eulr'"):
        GeneratorPool([Generator(name="x", family="sd15", path=tiny)], [bad])
