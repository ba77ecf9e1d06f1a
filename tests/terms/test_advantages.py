"""Group-relative advantages: hand-derived values (group / global std, eps, ddof, clipping, masking, several rewards)
and a 2-process gloo run that gathers before normalising and gives each process the rows a single process gives."""

from __future__ import annotations

import json
import math
import sys
import textwrap

import pytest
import torch

from diffalign.terms.advantages import AdvantageSpec, group_advantages


IDS = torch.tensor([0, 0, 0, 1, 1, 1])
REWARDS = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])


def test_group_std_population_and_zero_std_masking() -> None:
    out = group_advantages(REWARDS, IDS, AdvantageSpec(std="group"))
    s = math.sqrt(2 / 3) + 1e-4  # np.std of [1, 2, 3] plus Flow-GRPO's eps
    torch.testing.assert_close(out.values, torch.tensor([-1 / s, 0.0, 1 / s, 0.0, 0.0, 0.0]))
    assert out.mask.tolist() == [True, True, True, False, False, False]
    assert out.metrics["zero_std_frac"] == 0.5
    assert out.metrics["reward/reward/mean"] == pytest.approx(3.5)


def test_global_std_keeps_the_per_prompt_mean() -> None:
    out = group_advantages(REWARDS, IDS, AdvantageSpec())  # Flow-GRPO default: global std
    s = math.sqrt(15.5 / 6) + 1e-4  # population std of all six rewards (mean 3.5)
    torch.testing.assert_close(out.values, torch.tensor([-1 / s, 0.0, 1 / s, 0.0, 0.0, 0.0]))


def test_unbiased_std_and_eps_as_dance_grpo() -> None:
    out = group_advantages(REWARDS, IDS, AdvantageSpec(std="group", unbiased=True, eps=1e-8))
    torch.testing.assert_close(out.values[:3], torch.tensor([-1.0, 0.0, 1.0]) / (1 + 1e-8))


def test_clipping_and_interleaved_groups() -> None:
    ids = torch.tensor([7, 3, 7, 3, 7, 3])  # rows of a group need not be contiguous
    rewards = torch.tensor([1.0, 0.0, 2.0, 0.0, 3.0, 1.0])
    out = group_advantages(rewards, ids, AdvantageSpec(std="group", clip=0.5))
    assert out.values.tolist()[0::2] == [-0.5, 0.0, 0.5]
    assert out.values.tolist()[1::2] == [-0.5, -0.5, 0.5]  # group 3: [0, 0, 1] -> (-0.71, -0.71, 1.41)
    assert out.metrics["adv_clip_frac"] == pytest.approx(5 / 6)


def test_several_rewards_weighted_sum_or_per_reward_normalisation() -> None:
    rewards = {"a": REWARDS, "b": torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 3.0])}
    weights = {"a": 1.0, "b": 2.0}
    s = math.sqrt(2 / 3) + 1e-4
    summed = group_advantages(rewards, IDS, AdvantageSpec(std="group"), weights)  # [1, 2, 3, 7, 9, 11]
    s2 = math.sqrt(8 / 3) + 1e-4
    torch.testing.assert_close(summed.values, torch.tensor([-1 / s, 0, 1 / s, -2 / s2, 0, 2 / s2]))
    per = group_advantages(rewards, IDS, AdvantageSpec(std="group", per_reward=True), weights)
    torch.testing.assert_close(per.values, torch.tensor([-1 / s, 0, 1 / s, -2 / s, 0, 2 / s]))
    assert per.mask.all() and per.metrics["reward/b/mean"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="weights"):
        group_advantages(rewards, IDS, AdvantageSpec(), {"a": 1.0})
    with pytest.raises(ValueError, match="non-finite"):
        group_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]), AdvantageSpec())


SCRIPT = """
import json, sys, torch
from accelerate import Accelerator
from diffalign.terms.advantages import AdvantageSpec, gathered_advantages
acc = Accelerator(cpu=True)
ids = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1])
rewards = {"a": torch.tensor([1.0, 4.0, 2.0, 4.0, 7.0, 7.0, 6.0, 1.0]), "b": torch.arange(8.0) ** 2}
n = 8 // acc.num_processes
rows = slice(acc.process_index * n, (acc.process_index + 1) * n)
out = gathered_advantages({k: v[rows] for k, v in rewards.items()}, ids[rows], AdvantageSpec(std="group"),
                          acc, {"a": 1.0, "b": 0.1})
with open(sys.argv[1] + f".{acc.process_index}", "w") as f:
    json.dump({"values": out.values.tolist(), "mask": out.mask.tolist(), "metrics": out.metrics}, f)
acc.wait_for_everyone()
acc.end_training()
"""


def test_two_processes_gather_before_normalising(tmp_path) -> None:
    from tests.conftest import unused_port
    from tests.recipes.conftest import run_subprocess

    script = tmp_path / "adv.py"
    script.write_text(textwrap.dedent(SCRIPT))
    single = run_subprocess([sys.executable, str(script), str(tmp_path / "one")], cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--main_process_port", str(unused_port()), str(script), str(tmp_path / "two")]
    double = run_subprocess(launch, cwd=tmp_path)
    assert double.returncode == 0, double.stderr[-3000:]
    one = json.loads((tmp_path / "one.0").read_text())
    two = [json.loads((tmp_path / f"two.{r}").read_text()) for r in (0, 1)]
    assert two[0]["values"] + two[1]["values"] == one["values"]
    assert two[0]["mask"] + two[1]["mask"] == one["mask"]
    assert two[0]["metrics"] == two[1]["metrics"] == one["metrics"]
    assert one["mask"] == [True] * 4 + [True, True] + [True, True]


def test_bestofn_keeps_the_best_and_worst_half_of_each_group() -> None:
    """DanceGRPO's best-of-n (train_grpo_hunyuan.py:394-410), per group: 2 of 4 rows = the best and the worst."""
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.4, 3.0, 1.0, 2.0, 0.0])
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    full = group_advantages(rewards, ids, AdvantageSpec(std="group"))
    out = group_advantages(rewards, ids, AdvantageSpec(std="group", bestofn=2))
    assert out.mask.tolist() == [True, True, False, False, True, False, False, True]
    torch.testing.assert_close(out.values[out.mask], full.values[out.mask])
    assert (out.values[~out.mask] == 0).all() and out.metrics["bestofn_kept_frac"] == 0.5
    with pytest.raises(ValueError, match="bestofn"):
        AdvantageSpec(bestofn=3)


def _ddpo_reference(history: list[tuple[list[str], list[float]]], buffer_size: int, min_count: int, eps: float):
    """DDPO's PerPromptStatTracker.update (ddpo_pytorch/stat_tracking.py:11-30) re-stated with numpy, per round."""
    import collections

    import numpy as np

    stats, out = {}, []
    for prompts, rewards in history:
        prompts, rewards = np.array(prompts), np.array(rewards)
        adv = np.empty_like(rewards)
        for prompt in np.unique(prompts):
            pr = rewards[prompts == prompt]
            stats.setdefault(prompt, collections.deque(maxlen=buffer_size)).extend(pr)
            if len(stats[prompt]) < min_count:
                mean, std = np.mean(rewards), np.std(rewards) + eps
            else:
                mean, std = np.mean(stats[prompt]), np.std(stats[prompt]) + eps
            adv[prompts == prompt] = (pr - mean) / std
        out.append(adv)
    return out


def test_per_prompt_stats_match_ddpo_over_rounds_and_survive_a_state_round_trip() -> None:
    from diffalign.terms.advantages import PerPromptStats

    g = torch.Generator().manual_seed(0)
    history = []
    for k in range(5):
        prompts = ["a", "b", "a", "b", "c", "c"] if k % 2 else ["a", "a", "d", "d", "b", "b"]
        history.append((prompts, torch.rand(6, generator=g, dtype=torch.float64).tolist()))
    want = _ddpo_reference(history, buffer_size=4, min_count=3, eps=1e-6)
    tracker = PerPromptStats(buffer_size=4, min_count=3)
    for k, (prompts, rewards) in enumerate(history):
        if k == 3:  # a checkpoint between rounds: JSON round trip of the buffers
            state = json.loads(json.dumps(tracker.state_dict()))
            tracker = PerPromptStats(buffer_size=4, min_count=3)
            tracker.load_state_dict(state)
        adv, live = tracker.update(prompts, torch.tensor(rewards, dtype=torch.float64), eps=1e-6)
        torch.testing.assert_close(adv, torch.from_numpy(want[k]), rtol=1e-12, atol=1e-12)
        assert live.all()
    assert len(tracker.stats["a"]) == 4  # the buffer keeps the last buffer_size rewards
    with pytest.raises(ValueError, match="min_count"):
        PerPromptStats(buffer_size=4, min_count=5)
    with pytest.raises(ValueError, match="tracked_advantages"):
        group_advantages(torch.ones(2), torch.tensor([0, 0]), AdvantageSpec(std="tracker"))
