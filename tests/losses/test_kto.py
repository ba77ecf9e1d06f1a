"""Diffusion-KTO: hand-derived values and gradients, the reference point, and its 2-process all-reduce."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from diffalign.losses import kto
from diffalign.types import UnpairedTerms


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def terms(policy, ref, labels, reduce_sum=None) -> UnpairedTerms:
    policy = torch.tensor(policy, dtype=torch.float64).requires_grad_(True)
    return UnpairedTerms(
        policy=policy,
        ref=torch.tensor(ref, dtype=torch.float64),
        labels=torch.tensor(labels),
        reduce_sum=reduce_sum,
    )


def test_policy_equals_reference_value_and_gradient():
    """g = 0, KL = 0 -> h = 1/2: loss = mean(lambda_y) / 2; dL/dp_i = lambda_i * (2y_i - 1) * beta / (4B)."""
    p = [0.3, 0.5, 0.2, 0.9]
    labels = [True, True, False, False]
    t = terms(p, p, labels)
    cfg = kto.Config(beta=1000.0, lambda_d=2.0, lambda_u=1.0)
    out = kto.loss(t, cfg)
    assert out.loss.item() == pytest.approx((2 + 2 + 1 + 1) / 4 * 0.5, rel=1e-7)
    out.loss.backward()
    expected = [2 * 1000 / 16, 2 * 1000 / 16, -1000 / 16, -1000 / 16]
    assert t.policy.grad.tolist() == pytest.approx(expected, rel=1e-6)
    assert out.metrics["reference_point"].item() == 0.0


def test_hand_computed_loss_gradient_and_detached_reference_point():
    policy, ref = [0.1, 0.2, 0.3, 0.4], [0.1003, 0.1998, 0.3002, 0.4002]
    labels = [True, False, True, False]
    g = [r - p for r, p in zip(ref, policy, strict=True)]  # 3e-4, -2e-4, 2e-4, 2e-4
    kl = max(sum(g) / 4, 0.0)  # 1.25e-4
    sign = [1, -1, 1, -1]
    s = [si * 1000 * (gi - kl) for si, gi in zip(sign, g, strict=True)]  # 0.175, 0.325, 0.075, -0.075
    t = terms(policy, ref, labels)
    out = kto.loss(t, kto.Config())
    # the loss runs in fp32: g (differences of ~0.1-sized errors) carries ~1e-8 absolute rounding
    assert out.metrics["reference_point"].item() == pytest.approx(kl, rel=1e-3)
    assert out.loss.item() == pytest.approx(sum(1 - sig(x) for x in s) / 4, rel=1e-5)
    out.loss.backward()
    # KL is a constant: d(1 - sig(s_i))/dp_i = sig'(s_i) * sign_i * beta, / B for the mean
    grad = [sig(x) * (1 - sig(x)) * si * 1000 / 4 for x, si in zip(s, sign, strict=True)]
    assert t.policy.grad.tolist() == pytest.approx(grad, rel=1e-4)
    assert out.metrics["implicit_acc"].item() == pytest.approx(0.75)


def test_reference_point_is_clamped_at_zero():
    t = terms([0.5, 0.5], [0.4, 0.45], [True, False])  # mean g = -0.075 -> KL = 0
    out = kto.loss(t, kto.Config(beta=10.0))
    assert out.metrics["reference_point"].item() == 0.0
    expected = ((1 - sig(10 * -0.1)) + (1 - sig(-10 * -0.05))) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-7)


def test_class_mean_reference_point_is_not_clamped():
    t = terms([0.5, 0.5, 0.5], [0.4, 0.3, 0.45], [True, True, False])
    out = kto.loss(t, kto.Config(reference_point="class_mean"))
    # desirable mean g = -0.15, undesirable mean g = -0.05
    assert out.metrics["reference_point"].item() == pytest.approx(0.5 * (-0.15 - 0.05), rel=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="reference_point"):
        kto.Config(reference_point="rolled")
    with pytest.raises(ValueError, match="lambda"):
        kto.Config(lambda_u=-1.0)
    with pytest.raises(ValueError, match="ref"):
        kto.loss(UnpairedTerms(policy=torch.zeros(2), labels=torch.ones(2, dtype=torch.bool)), kto.Config())


def test_reduce_sum_makes_the_reference_point_global():
    """A fake reducer adding another process's statistics gives the mean over both halves."""
    policy, ref = [0.1, 0.2, 0.3, 0.4], [0.1003, 0.1998, 0.3001, 0.4002]
    labels = [True, False, True, False]
    whole = kto.loss(terms(policy, ref, labels), kto.Config()).metrics["reference_point"]
    g_other = torch.tensor([r - p for r, p in zip(ref[2:], policy[2:], strict=True)], dtype=torch.float64)
    extra = torch.stack([g_other.sum(), torch.tensor(2.0, dtype=torch.float64), g_other[0], torch.tensor(1.0)])
    half = terms(policy[:2], ref[:2], labels[:2], reduce_sum=lambda s: s + extra.to(s.dtype))
    assert kto.loss(half, kto.Config()).metrics["reference_point"].item() == pytest.approx(whole.item(), rel=1e-4)


def _worker(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)

    def reduce_sum(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    policy, ref, labels = _global_batch()
    sl = slice(3 * rank, 3 * rank + 3)
    t = terms(policy[sl], ref[sl], labels[sl], reduce_sum=reduce_sum)
    for kind in ("mean", "class_mean"):
        out = kto.loss(t, kto.Config(reference_point=kind))
        queue.put((rank, kind, out.metrics["reference_point"].item()))
    dist.destroy_process_group()


def _global_batch():
    policy = [0.11, 0.25, 0.31, 0.42, 0.18, 0.5]
    ref = [0.1106, 0.2495, 0.3108, 0.4199, 0.1812, 0.5001]
    labels = [True, True, False, True, False, False]  # the two processes hold different class counts
    return policy, ref, labels


def test_two_processes_reference_point_equals_single_process():
    """Two gloo processes, 3 images each, give the single-process reference point of the 6-image global batch."""
    policy, ref, labels = _global_batch()
    single = {
        kind: kto.loss(terms(policy, ref, labels), kto.Config(reference_point=kind)).metrics["reference_point"]
        for kind in ("mean", "class_mean")
    }
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(port, queue), nprocs=2, start_method="spawn", join=True)
    results = [queue.get() for _ in range(4)]
    assert len(results) == 4
    for _rank, kind, value in results:
        assert value == pytest.approx(single[kind].item(), rel=1e-5)


def test_mismatched_reference_point_by_hand():
    """Authors' bce_offset=original (L1466-1468): KL = mean(ref_roll - policy_roll), not clamped, no gradient.

    Matched g = [0.1, -0.1]; mismatched errors policy_roll = [0.6, 0.7], ref_roll = [0.5, 0.5]: KL = mean(-0.1, -0.2)
    = -0.15 (negative, kept). z = g - KL = [0.25, 0.05]; labels [1, 0]: loss = mean(1 - sig(10 * 0.25), 1 - sig(-10 *
    0.05)); policy_roll gets no gradient.
    """
    policy = torch.tensor([0.4, 0.6], dtype=torch.float64, requires_grad=True)
    roll = torch.tensor([0.6, 0.7], dtype=torch.float64, requires_grad=True)
    t = UnpairedTerms(
        policy=policy,
        ref=torch.tensor([0.5, 0.5], dtype=torch.float64),
        labels=torch.tensor([True, False]),
        policy_mismatched=roll,
        ref_mismatched=torch.tensor([0.5, 0.5], dtype=torch.float64),
    )
    cfg = kto.Config(beta=10.0, reference_point="mismatched")
    assert kto.requires(cfg) == {"ref", "mismatched"} and kto.requires(kto.Config()) == {"ref"}
    out = kto.loss(t, cfg)
    assert out.metrics["reference_point"].item() == pytest.approx(-0.15, rel=1e-6)  # fp32 inside the loss
    assert out.loss.item() == pytest.approx(((1 - sig(2.5)) + (1 - sig(-0.5))) / 2, rel=1e-7)
    out.loss.backward()
    d = lambda x: sig(x) * (1 - sig(x))  # noqa: E731
    # h_i = sig(s_i * 10 * (r_i - p_i - KL)): d(1 - h_i)/dp_i = s_i * 10 * sig'(.), s = +1 / -1; averaged over 2
    assert policy.grad.tolist() == pytest.approx([10 * d(2.5) / 2, -10 * d(-0.5) / 2], rel=1e-7)
    assert roll.grad is None  # the estimate is detached
    with pytest.raises(ValueError, match="mismatched"):
        kto.loss(terms([0.4, 0.6], [0.5, 0.5], [True, False]), cfg)
