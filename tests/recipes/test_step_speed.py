"""The training step at accelerator speed: no host-device synchronisation in a steady-state optimizer step.

On CPU every tensor-to-host conversion (``item``, ``tolist``, ``__bool__``, ``__float__``, ``__int__``, ``cpu``,
``numpy``) made during steady-state steps is counted: zero. On CUDA (``-m gpu``) the same steps run under
``torch.cuda.set_sync_debug_mode("error")``. A sync step (log / validate / save) still stops on a NaN of any
earlier step, naming it.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from functools import partial

import pytest
import torch
from accelerate.utils import set_seed

from diffalign import config as dconfig
from diffalign.training import checkpoint, loop, optim
from tests.recipes.conftest import toy_overrides


CONVERSIONS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


@contextmanager
def count_conversions(loader):
    """Counter of tensor-to-host conversions made while the block runs (Python-level calls on any tensor), except
    inside ``loader.next_batch``: the data pipeline works on host data (in loader workers with data.num_workers)."""
    counts: Counter[str] = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}
    in_loader = []
    next_batch = loader.next_batch

    def loading():
        in_loader.append(1)
        try:
            return next_batch()
        finally:
            in_loader.pop()

    def wrap(name):
        original = originals[name]

        def counted(self, *args, **kwargs):
            if not in_loader:
                counts[name] += 1
            return original(self, *args, **kwargs)

        return counted

    for name in CONVERSIONS:
        setattr(torch.Tensor, name, wrap(name))
    loader.next_batch = loading
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        del loader.next_batch


def _state(recipe, tiny_dirs, out, **extra):
    overrides = {"run.max_steps": 100, "run.log_every": 100, "run.save_every": 100, "optim.batch_size": 2, **extra}
    cfg = dconfig.load("toy/dpo", toy_overrides(tiny_dirs["sd15"], out, **overrides), schema=dconfig.OfflinePrefConfig)
    accelerator = loop.make_accelerator(cfg)
    set_seed(cfg.run.seed)  # the same LoRA init in every run, as loop.start does
    return recipe.setup(cfg, accelerator)


def test_steady_state_steps_make_no_host_conversion(recipe, tiny_dirs, tmp_path, monkeypatch):
    """Step 1 logs (a sync step); steps 2-4 make no tensor-to-host conversion, and the next sync step fills their
    metrics in. AdamW is fused, as on an accelerator (the CPU's foreach AdamW reads its host step counts)."""
    monkeypatch.setattr(optim, "fusable", lambda params: True)  # as on an accelerator
    state = _state(recipe, tiny_dirs, tmp_path / "run")
    assert state.run.optimizer.optimizer.defaults["fused"]
    run, step = state.run, partial(loop.optimizer_step, state.run, partial(recipe.micro_step, state))
    first = step()
    assert {"loss", "grad_norm", "groups", "lr"} <= first.keys()
    with count_conversions(run.loader) as counts:
        steady = [step() for _ in range(3)]
    assert sum(counts.values()) == 0, dict(counts)
    assert all(m.keys() == {"lr"} for m in steady)
    assert len(run.pending) == 3
    loop._resolve(run)
    assert all(m["groups"] == 2 and m["loss"] > 0 and m["grad_norm"] > 0 for m in steady)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_steady_state_steps_never_synchronise_cuda(recipe, tiny_dirs, tmp_path):
    state = _state(recipe, tiny_dirs, tmp_path / "run")
    step = partial(loop.optimizer_step, state.run, partial(recipe.micro_step, state))
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_nan_between_sync_steps_stops_at_the_next_one_naming_its_step(recipe, tiny_dirs, tmp_path):
    """A NaN loss at (steady-state) step 3 is found at the save of step 4: the run stops there before saving, names
    step 3, and (as for a NaN found at once) sets aside step 2's checkpoint, whose weights gave that loss."""
    out = tmp_path / "run"
    state = _state(recipe, tiny_dirs, out, **{"run.max_steps": 6, "run.save_every": 2, "run.log_every": 2})
    out.mkdir(parents=True)
    calls = []

    def micro_step(batch, seeds):
        out = recipe.micro_step(state, batch, seeds)
        calls.append(1)
        if len(calls) == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    with pytest.raises(FloatingPointError, match="non-finite loss at step 3") as err:
        loop.train(state.run, partial(loop.optimizer_step, state.run, micro_step))
    assert "step-00000002.nonfinite" in str(err.value) and "Last good checkpoint: none" in str(err.value)
    assert checkpoint.list_complete(out / "checkpoints") == []
    assert not (out / "checkpoints" / "step-00000004").exists()
    assert len(calls) == 4


@pytest.mark.slow  # inductor compiles the tiny UNet's two graphs in ~4-5 min on 2 busy CPU cores
def test_compiled_denoiser_matches_eager_with_checkpointing_and_no_recompiles(recipe, tiny_dirs, tmp_path):
    """model.compile=true (with gradient checkpointing) trains the toy DPO config to eager's losses; it compiles two
    graphs, the policy forward and the reference forward (LoRA off, no grad), once: no graph break, and toggling
    the adapter on later steps recompiles nothing.

    loss.beta=50: DPO multiplies the per-sample errors' fp32 rounding (inductor fuses and reduces in another order
    than eager: errors equal to ~2e-7 relative) by beta/2, so at the shipped beta=5000 the losses differ by up to
    ~2e-4 (measured: 0, 7e-5, 2e-4, 1e-6 over 4 steps).

    Compared where well-conditioned on any CPU: every step's loss (a flipped AdamW element, see
    test_offline_pref's test_two_processes_match_one_process_first_step, has a near-zero gradient, so it moves the
    loss only to second order) and reference errors (LoRA off: they do not depend on the updates); the policy
    errors only at step 1, before any update: after one, such an element moves a single error by up to lr times
    its own gradient."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    def losses(compiled: bool) -> list[dict[str, float]]:
        extra = {"model.compile": compiled, "model.gradient_checkpointing": compiled, "loss.beta": 50}
        state = _state(recipe, tiny_dirs, tmp_path / f"run-{compiled}", **{"run.log_every": 1, **extra})
        step = partial(loop.optimizer_step, state.run, partial(recipe.micro_step, state))
        out = [step()]
        graphs = counters["stats"]["unique_graphs"]
        out += [step() for _ in range(2)]
        assert counters["stats"]["unique_graphs"] == graphs  # no recompilation on later toggles
        return out

    torch._dynamo.reset()
    counters.clear()
    eager = losses(False)
    assert counters["stats"]["unique_graphs"] == 0
    compiled = losses(True)
    assert counters["stats"]["unique_graphs"] == 2 and sum(counters["graph_break"].values()) == 0
    for step, (e, c) in enumerate(zip(eager, compiled, strict=True), start=1):
        assert c["loss"] == pytest.approx(e["loss"], abs=1e-5)
        for key in ("loss/policy_err_w", "loss/ref_err_l") if step == 1 else ("loss/ref_err_l",):
            assert c[key] == pytest.approx(e[key], rel=1e-6)
