"""``scorers.base.PerFrame``: an image scorer on the frames of videos, reduced over frames by mean or min."""

from __future__ import annotations

import pytest
import torch

from diffalign.scorers.base import PerFrame


class Brightness:
    """Toy image scorer: mean pixel value, and the prompts it was called with."""

    name, variant, batch_size, device, dtype = "bright", "v", 8, torch.device("cpu"), torch.float32

    def __call__(self, images, prompts, *, grad=False):
        self.prompts = prompts
        return images.float().mean(dim=(1, 2, 3))


def videos() -> torch.Tensor:
    v = torch.zeros(2, 3, 5, 4, 4)
    for f in range(5):
        v[0, :, f] = f / 4  # 0, .25, .5, .75, 1
    v[1] = 0.5
    return v


@pytest.mark.parametrize(("reduction", "expected"), [("mean", [0.5, 0.5]), ("min", [0.0, 0.5])])
def test_reduction_over_frames(reduction, expected):
    scorer = PerFrame(Brightness(), reduction)
    out = scorer(videos(), ["a", "b"])
    assert out.tolist() == pytest.approx(expected)
    assert scorer.scorer.prompts == ["a"] * 5 + ["b"] * 5  # each frame scored with its video's prompt
    assert scorer.name == "bright" and scorer.variant == "v"


def test_stride_and_images_pass_through():
    scorer = PerFrame(Brightness(), "mean", stride=4)  # frames 0 and 4 (flow_grpo's video_ocr: every 4th)
    assert scorer(videos(), None).tolist() == pytest.approx([0.5, 0.5])
    assert PerFrame(Brightness(), "min", stride=2)(videos(), None).tolist() == pytest.approx([0.0, 0.5])
    images = torch.full((3, 3, 4, 4), 0.25)
    assert scorer(images, ["x"] * 3).tolist() == pytest.approx([0.25] * 3)


def test_gradient_flows_through_frames():
    v = videos().requires_grad_(True)
    PerFrame(Brightness(), "min")(v, None, grad=True).sum().backward()
    assert v.grad[0, :, 0].abs().sum() > 0 and v.grad[0, :, 1:].abs().sum() == 0


def test_bad_options():
    with pytest.raises(ValueError, match="choices: mean, min"):
        PerFrame(Brightness(), "max")
    with pytest.raises(ValueError, match="stride must be >= 1"):
        PerFrame(Brightness(), stride=0)
