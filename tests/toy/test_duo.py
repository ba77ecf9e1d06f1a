"""The duo world (two shapes side by side): rendering rules, captions, prompt split, and its GenEval-style detectors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffalign import scorers
from diffalign.toy import duo, duo_reward, world


@pytest.fixture(scope="module")
def scenes():
    return duo.sample_scenes(48, torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def images(scenes):
    return duo.render(scenes)


def test_render_follows_the_rules(scenes, images):
    assert images.shape == (48, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    grey = torch.tensor(duo.BACKGROUND) / 255.0
    for image, s in zip(images, scenes, strict=True):
        (lx, ly), (rx, ry) = s.left_xy, s.right_xy
        assert abs(lx - duo.LEFT_X) <= duo.JITTER_X and abs(rx - duo.RIGHT_X) <= duo.JITTER_X
        assert abs(ly - 16) <= duo.JITTER_Y and abs(ry - 16) <= duo.JITTER_Y
        assert duo.R_MIN <= s.left_r <= duo.R_MAX and duo.R_MIN <= s.right_r <= duo.R_MAX
        # the object centres carry the objects' colours, the top rows are background only
        assert torch.allclose(image[:, int(ly), int(lx)], world.rgb(s.left_color), atol=1e-6)
        assert torch.allclose(image[:, int(ry), int(rx)], world.rgb(s.right_color), atol=1e-6)
        assert torch.allclose(image[:, :5], grey.view(3, 1, 1).expand(3, 5, 32), atol=1e-6)


def test_the_two_objects_never_overlap():
    left = duo.Scene("red", "square", "blue", "square", left_xy=(10.0, 16.0), right_xy=(22.0, 16.0), left_r=6.0,
                     right_r=6.0)  # fmt: skip
    image = duo.render([left])[0]
    red, blue = world.rgb("red").view(3, 1, 1), world.rgb("blue").view(3, 1, 1)
    assert torch.allclose(image[:, 12:20, 4:16], red.expand(3, 8, 12))  # both at their largest, closest: they touch
    assert torch.allclose(image[:, 12:20, 16:28], blue.expand(3, 8, 12))


def test_captions_round_trip_in_both_phrasings():
    for left, right in duo.combinations():
        for phrasing in duo.PHRASINGS:
            assert duo.parse_caption(duo.caption(left, right, phrasing)) == (left, right)
    assert (
        duo.caption(("orange", "circle"), ("red", "square"), "right")
        == "a red square to the right of an orange circle"
    )
    for bad in ("a cat", "a red circle to the left of a red square", "a pink circle to the left of a blue square",
                "a red hexagon to the left of a blue square", "a red circle above a blue square"):  # fmt: skip
        with pytest.raises(ValueError, match="caption"):
            duo.parse_caption(bad)
    with pytest.raises(ValueError, match="phrasing"):
        duo.caption(("red", "circle"), ("blue", "square"), "above")
    with pytest.raises(ValueError, match="colours must differ"):
        duo.Scene("red", "circle", "red", "square")


def test_prompt_split_is_fixed_disjoint_and_uses_both_relations():
    heldout, labelled, every = duo.prompts("heldout"), duo.prompts("label"), duo.prompts("all")
    assert len(every) == 2 * len(duo.combinations()) == 1008
    assert len(heldout) == duo.HELDOUT_COUNT and len(labelled) == duo.LABEL_COUNT
    held_scenes = {duo.parse_caption(p) for p in heldout}
    assert not held_scenes & {duo.parse_caption(p) for p in labelled} and set(heldout) | set(labelled) <= set(every)
    for split in (heldout, labelled):
        lefts = sum(" to the left of " in p for p in split)
        assert lefts == len(split) // 2  # alternating phrasings
    assert heldout == duo.prompts("heldout")
    with pytest.raises(ValueError, match="split"):
        duo.prompts("test")


def test_caption_noise_is_binding_or_shape_errors():
    gen = torch.Generator().manual_seed(0)
    scene = duo.Scene("red", "circle", "blue", "square")
    truth = (("red", "circle"), ("blue", "square"))
    assert all(duo.parse_caption(duo.noisy_caption(scene, 0.0, gen)) == truth for _ in range(20))
    wrong = [duo.parse_caption(duo.noisy_caption(scene, 1.0, gen)) for _ in range(400)]
    swaps = sum(w == (truth[1], truth[0]) for w in wrong)
    one_shape = sum(
        w[0][0] == "red" and w[1][0] == "blue" and (w[0][1] != "circle") + (w[1][1] != "square") == 1 for w in wrong
    )
    assert swaps + one_shape == 400 and 150 < swaps < 250


def test_shipped_prompt_lists_are_the_split():
    root = Path(__file__).resolve().parents[2] / "assets" / "prompts"
    for split in ("label", "heldout"):
        assert (root / f"duo_{split}.txt").read_text().splitlines() == duo.prompts(split)


# ---- the detectors --------------------------------------------------------------------------------------------


def _captions(scenes, phrasing="left", swap=False):
    return [duo.caption(*(s.objects[::-1] if swap else s.objects), phrasing) for s in scenes]


def test_clean_renders_are_correct_in_both_phrasings(scenes, images):
    r = duo_reward.DuoReward()
    left, right = r.components(images, _captions(scenes)), r.components(images, _captions(scenes, "right"))
    for k in duo_reward.PARTS:
        assert torch.equal(left[k], right[k]), k
    assert left["correct"].mean() >= 0.95 and (left["faithfulness"] > 0.85).all(), left
    assert (left["position"] > 0.99).all() and (left["color"] > 0.75).all()


def test_each_mistake_lowers_its_own_attribute(scenes, images):
    r = duo_reward.DuoReward()
    right = r.components(images, _captions(scenes))
    swapped = r.components(images, _captions(scenes, swap=True))  # binding / relation error
    assert torch.allclose(swapped["color"], right["color"]) and (swapped["position"] < 0.01).all()
    assert (swapped["correct"] == 0).all() and (swapped["faithfulness"] < right["faithfulness"] - 0.3).all()
    other = [
        duo.caption((s.left_color, world.SHAPES[(world.SHAPES.index(s.left_shape) + 1) % 3]), s.objects[1])
        for s in scenes
    ]
    wrong_shape = r.components(images, other)
    assert torch.allclose(wrong_shape["position"], right["position"]) and torch.equal(
        wrong_shape["color"], right["color"]
    )
    assert (wrong_shape["shape_left"] < 0.5).all() and (wrong_shape["correct"] == 0).all()
    assert torch.equal(wrong_shape["shape_right"], right["shape_right"])


def test_missing_objects_fail_detection_and_the_relation():
    grey = torch.tensor(duo.BACKGROUND).view(1, 3, 1, 1).expand(2, 3, 32, 32) / 255.0
    caps = ["a red circle to the left of a blue square"] * 2
    blank = duo_reward.DuoReward().components(grey, caps)
    assert (blank["color"] < 0.05).all() and (blank["position"] == 0).all() and (blank["correct"] == 0).all()
    assert torch.allclose(blank["shape"], torch.full((2,), 1 / 3), atol=0.01)  # nothing detected: chance
    only_left = duo.render([duo.Scene("red", "circle", "green", "square")])  # no blue object at all
    one = duo_reward.DuoReward().components(only_left, caps[:1])
    assert one["present_left"] > 0.75 and one["present_right"] < 0.05 and one["position"] < 0.01


def test_gradients_flow_to_the_pixels(scenes, images):
    x = images[:4].clone().requires_grad_(True)
    duo_reward.DuoReward()(x, _captions(scenes[:4]), grad=True).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no gradient"):
        duo_reward.DuoReward("correct")(x, _captions(scenes[:4]), grad=True)


def test_pil_tensor_and_other_sizes_agree(scenes, images):
    r, caps = duo_reward.DuoReward(), _captions(scenes)
    from_tensor = r(images, caps)
    assert torch.allclose(r(world.to_pil(images), caps), from_tensor, atol=0.01)
    big = torch.nn.functional.interpolate(images, scale_factor=4, mode="nearest")
    assert torch.allclose(r(big, caps), from_tensor, atol=1e-5)


def test_scorer_modules_and_interface(images, scenes):
    names = {f"duo{k}" for k in duo_reward.KINDS}
    assert names <= set(scorers.available())
    for name in names:
        s = scorers.load(name, device="cpu", dtype=torch.float32, batch_size=5)
        assert s.name == name and s.variant and s.batch_size == 5
        out = s(images[:12], _captions(scenes[:12]))
        assert out.shape == (12,) and out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="not a duo-world caption"):
        scorers.load("duofaithfulness")(images[:1], ["a red circle on a blue background"])
    with pytest.raises(ValueError, match="no weights"):
        scorers.load("duoshape", path="/models/x")
    with pytest.raises(ValueError, match="kind"):
        duo_reward.DuoReward("size")


# ---- the caption writer (DCPO's caption of the rejected image) ----------------------------------------------------


def test_describe_names_what_hand_made_images_show():
    """Hand-made scenes: a right one, the mirrored binding (colours and shapes on the wrong sides), a wrong shape."""
    drawn = [
        duo.Scene("blue", "circle", "red", "square"),  # asked: a red square left of a blue circle -> mirrored
        duo.Scene(
            "green",
            "triangle",
            "yellow",
            "circle",
            left_xy=(7.5, 13.0),
            right_xy=(24.0, 19.0),
            left_r=4.6,
            right_r=5.9,
        ),
        duo.Scene("red", "square", "blue", "square"),  # asked for a blue circle on the right -> shape wrong
    ]
    prompts = [
        "a red square to the left of a blue circle",
        "a yellow circle to the right of a green triangle",
        "a red square to the left of a blue circle",
    ]
    assert duo_reward.describe(duo.render(drawn), prompts) == [
        "a blue circle to the left of a red square",
        "a yellow circle to the right of a green triangle",
        "a red square to the left of a blue square",
    ]
    # default phrasing "left of"; a PIL image reads the same as its tensor
    image = duo.render(drawn[:1])
    expected = ["a blue circle to the left of a red square"]
    assert duo_reward.describe(image) == duo_reward.describe(world.to_pil(image)) == expected


def test_describe_reads_every_clean_render(scenes, images):
    expected = [duo.caption(*s.objects, "right" if i % 2 else "left") for i, s in enumerate(scenes)]
    like = [duo.caption(("red", "circle"), ("blue", "square"), "right" if i % 2 else "left") for i in range(48)]
    assert duo_reward.describe(images, like) == expected


def test_describe_one_object_and_bad_input():
    one = duo.render([duo.Scene("red", "triangle", "blue", "square")])
    one[:, :, :, 16:] = torch.tensor(duo.BACKGROUND).view(1, 3, 1, 1) / 255.0  # erase the right object
    text = duo_reward.describe(one)[0]
    assert text.startswith("a red triangle") and duo.parse_caption(text)  # still a duo caption
    with pytest.raises(ValueError, match="like="):
        duo_reward.describe(one, ["a red circle to the left of a blue square"] * 2)
    with pytest.raises(ValueError, match="not a duo-world caption"):
        duo_reward.describe(one, ["a cat"])
