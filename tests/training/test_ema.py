"""``training.ema``: diffusers ``EMAModel``'s decay schedule and update, worked by hand and against diffusers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffalign.training.ema import EMA, EmaSpec, decay_at


def test_decay_schedule_by_hand():
    spec = EmaSpec()  # decay 0.9999, no warmup: (1 + k) / (10 + k) with k = step - 1
    assert [decay_at(spec, n) for n in (1, 2, 3)] == [0.0, pytest.approx(2 / 11), pytest.approx(3 / 12)]
    assert decay_at(spec, 10**7) == 0.9999  # capped at ema.decay
    late = EmaSpec(update_after_step=2)  # k = step - 3: nothing kept from before step 3
    assert [decay_at(late, n) for n in (1, 2, 3, 4)] == [0.0, 0.0, 0.0, pytest.approx(2 / 11)]
    warm = EmaSpec(use_warmup=True, power=0.75)  # 1 - (1 + k)^-power
    assert decay_at(warm, 2) == pytest.approx(1 - 2**-0.75)
    assert decay_at(EmaSpec(decay=0.5, min_decay=0.3), 2) == pytest.approx(0.3)  # 2/11 raised to min_decay


@pytest.mark.parametrize("offload", [False, True])
def test_shadow_by_hand_and_swap(offload):
    """Weights 1, 2, 4 after steps 1-3: shadow 1 (decay 0 copies), 1 + (9/11)(2 - 1) = 20/11, then
    20/11 + (3/4)(4 - 20/11) = 38/11."""
    p = nn.Parameter(torch.tensor([0.0]))
    ema = EMA({"w": p}, EmaSpec(), offload=offload)
    assert ema.shadow["w"].device.type == "cpu" and ema.shadow["w"] is not p
    for value in (1.0, 2.0, 4.0):
        p.data.fill_(value)
        ema.update()
    assert ema.shadow["w"].item() == pytest.approx(38 / 11, rel=1e-6)
    with ema.swapped_in():
        assert p.item() == pytest.approx(38 / 11, rel=1e-6)
    assert p.item() == 4.0  # the trained weight is back


def test_matches_diffusers_emamodel_and_round_trips():
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    params = dict(model.named_parameters())
    spec = EmaSpec(decay=0.99, update_after_step=1)
    ours, theirs = EMA(params, spec), EMAModel(model.parameters(), decay=0.99, update_after_step=1)
    for _ in range(6):
        with torch.no_grad():
            for q in model.parameters():
                q.add_(torch.randn_like(q))
        ours.update()
        theirs.step(model.parameters())
    for mine, ref in zip(ours.shadow.values(), theirs.shadow_params, strict=True):
        torch.testing.assert_close(mine, ref, rtol=1e-6, atol=1e-6)
    saved = ours.state_tensors("e.")
    again = EMA(params, spec)
    again.load_state_tensors(saved, "e.")
    assert again.step == 6 and all(torch.equal(again.shadow[k], ours.shadow[k]) for k in params)
    with pytest.raises(KeyError, match="does not match"):
        again.load_state_tensors({"e.#step": torch.tensor(1)}, "e.")
