"""NPO guidance (Diffusion-NPO, https://arxiv.org/abs/2505.11245): a negative model on the unconditional CFG branch.

Classifier-free guidance where only the unconditional / negative-prompt branch uses the negative model::

    eps = eps_neg(x_t, uncond) + w * (eps_pos(x_t, cond) - eps_neg(x_t, uncond))

with the paper's optional weight merging of the negative model, written with LoRA adapter weights::

    theta_neg = theta_base + (1 - eta) * (theta_pos - theta_base) + delta_npo
              = base + (1 - eta) * positive_scale * LoRA_pos + negative_scale * LoRA_npo

``eta = 0`` (the authors' default) puts the NPO offset on top of the positive model; ``eta = 1`` on the base.

Works on stock diffusers pipelines (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
``StableDiffusion3Pipeline``, ``FluxPipeline``) without a second denoiser: both LoRAs are named adapters on the one UNet /
transformer, and a wrapper around its ``forward`` runs the first (unconditional) half of each CFG-doubled batch
with the negative branch's adapters and the second (conditional) half with the positive branch's, as two
half-batch forwards like the authors' double-UNet pipelines. The pipeline's own CFG arithmetic (and
``guidance_rescale``) is untouched::

    with npo_guidance(pipe, negative="runs/npo/lora", positive="runs/dpo/lora"):
        image = pipe("a cat", guidance_scale=7.5).images[0]

FLUX.1: FLUX.1-dev is guidance-distilled. Its ordinary sampling feeds ``guidance_scale`` to a guidance embedding
and makes ONE conditional prediction per step, so there is no unconditional branch for a negative model to take;
``FluxPipeline`` called that way under NPO guidance raises a ``ValueError`` saying so. With true CFG
(``true_cfg_scale > 1`` and a ``negative_prompt``, e.g. ``""``) the pipeline makes a separate negative-prompt call
per step, labelled ``cache_context("uncond")``; that call runs with the negative branch and the ``"cond"`` call
with the positive one (no batch splitting, so a branch that adds nothing is bit-identical to plain true CFG)::

    with npo_guidance(flux_pipe, negative="runs/flux-npo/lora"):
        image = flux_pipe("a cat", negative_prompt="", true_cfg_scale=4.0, guidance_scale=3.5).images[0]

Details: at ``guidance_scale <= 1`` the stock pipelines compute no unconditional branch, so the output is the
positive model's. SD3's skip-layer-guidance call (``skip_layers=...``) is a conditional prediction and runs with
the positive branch. Two half-batch forwards round differently (~1e-6) from one batched call; branches that are
equal after dropping zero-weight adapters (e.g. ``negative_scale=0``) run as one call, bit-identical to ordinary
CFG. Adapters already on the pipeline are off inside the context unless named in a ``Branch`` of
``cfg_branches``; every adapter state is restored on exit. LoRAs with text-encoder layers are refused: the
pipelines encode the positive and negative prompts with one text-encoder state.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffalign.models.base import has_adapters


DENOISERS = ("unet", "transformer")


@dataclass(frozen=True)
class Branch:
    """The denoiser's LoRA adapters (by name) and their weights in one CFG branch; none = the base model."""

    adapters: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.adapters) != len(self.weights):
            raise ValueError(f"Branch: {len(self.adapters)} adapters {self.adapters} but weights {self.weights}")

    def without_zero_weights(self) -> Branch:
        """The same branch minus adapters at weight 0 (they add exactly nothing)."""
        kept = [(a, w) for a, w in zip(self.adapters, self.weights, strict=True) if w != 0]
        return Branch(tuple(a for a, _ in kept), tuple(w for _, w in kept))


@dataclass(frozen=True)
class NpoAdapters:
    """What ``npo_guidance`` loaded (adapter names on the denoiser) and the two branches it runs."""

    negative: str
    positive: str | None
    uncond: Branch
    cond: Branch


def denoiser_of(pipe: Any) -> nn.Module:
    """The pipeline's UNet or SD3 transformer."""
    for name in DENOISERS:
        module = getattr(pipe, name, None)
        if module is not None:
            return module
    raise TypeError(f"{type(pipe).__name__} has no unet or transformer; NPO guidance needs a CFG diffusion pipeline")


class _LoraState:
    """Active adapters, on/off flag and scales of every LoRA layer, and ``requires_grad`` of every parameter."""

    def __init__(self, module: nn.Module) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.module = module
        layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
        self.layers = [
            (m, list(m.active_adapters), m.disable_adapters, dict(getattr(m, "scaling", {}))) for m in layers
        ]
        self.grads = [(p, p.requires_grad) for p in module.parameters()]

    def restore(self) -> None:
        names = set(getattr(self.module, "peft_config", None) or {})
        for layer, active, disabled, scaling in self.layers:
            layer.set_adapter([a for a in active if a in names])
            layer.enable_adapters(not disabled)
            current = getattr(layer, "scaling", {})
            current.update({k: v for k, v in scaling.items() if k in current})
        for param, flag in self.grads:
            param.requires_grad_(flag)


def _activate(denoiser: nn.Module, branch: Branch) -> None:
    if not has_adapters(denoiser):
        return
    if not branch.adapters:
        denoiser.disable_adapters()
        return
    denoiser.enable_adapters()
    denoiser.set_adapters(list(branch.adapters), list(branch.weights))


def _cfg_doubled(pipe: Any, kwargs: dict[str, Any]) -> bool:
    """True inside a pipeline call doing CFG, except SD3's conditional skip-layer call."""
    try:
        doing_cfg = bool(pipe.do_classifier_free_guidance)
    except AttributeError:  # ``_guidance_scale`` is set by ``__call__``: not inside a pipeline call
        return False
    return doing_cfg and kwargs.get("skip_layers") is None


def _separate_uncond(pipe: Any) -> bool:
    """True for true-CFG pipelines (FLUX.1) that make the negative-prompt prediction as its own denoiser call."""
    return "true_cfg_scale" in inspect.signature(type(pipe).__call__).parameters


NO_UNCOND_BRANCH = (
    "NPO guidance on {name} needs an unconditional branch, and this call has none: FLUX.1-dev is guidance-distilled "
    "(guidance_scale goes into a guidance embedding; each step makes ONE conditional prediction), so there is no "
    "branch for the negative model to run on. Call with true_cfg_scale > 1 and a negative_prompt (e.g. "
    "negative_prompt='') to sample with true CFG; the negative LoRA then runs the negative-prompt prediction."
)


@contextlib.contextmanager
def _require_true_cfg(pipe: Any) -> Iterator[None]:
    """While active, calling a true-CFG pipeline without true CFG raises ``NO_UNCOND_BRANCH``."""
    original = type(pipe)

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = inspect.signature(original.__call__).bind(self, *args, **kwargs)
        bound.apply_defaults()
        call = bound.arguments
        has_negative = call.get("negative_prompt") is not None or call.get("negative_prompt_embeds") is not None
        if not (call.get("true_cfg_scale", 1.0) > 1 and has_negative):
            raise ValueError(NO_UNCOND_BRANCH.format(name=original.__name__))
        return original.__call__(self, *args, **kwargs)

    pipe.__class__ = type(original.__name__, (original,), {"__call__": __call__})
    try:
        yield
    finally:
        pipe.__class__ = original


def _take(value: Any, n: int, part: slice) -> Any:
    """Rows ``part`` of every tensor with batch size ``n`` inside ``value`` (nested dicts, lists, tuples)."""
    if torch.is_tensor(value):
        return value[part] if value.ndim and value.shape[0] == n else value
    if isinstance(value, dict):
        return {k: _take(v, n, part) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_take(v, n, part) for v in value)
    return value


def _concat(first: Any, second: Any) -> Any:
    """Join two half-batch denoiser outputs (tensor, ``(sample,)`` tuple or diffusers ``BaseOutput``)."""
    if torch.is_tensor(first):
        return torch.cat([first, second])
    if isinstance(first, dict):
        return type(first)(**{k: _concat(first[k], second[k]) for k in first})
    if isinstance(first, tuple):
        return tuple(_concat(a, b) for a, b in zip(first, second, strict=True))
    return first


@contextlib.contextmanager
def cfg_branches(pipe: Any, *, uncond: Branch, cond: Branch) -> Iterator[None]:
    """Run the unconditional half of every CFG-doubled denoiser call with ``uncond``, the rest with ``cond``.

    The adapters must already be loaded on the denoiser (``pipe.load_lora_weights(dir, adapter_name=...)``).
    Calls without CFG run entirely with ``cond``. True-CFG pipelines (FLUX.1): the ``cache_context("uncond")`` call
    runs with ``uncond``, and a call without true CFG raises (there is no unconditional branch). Restores the
    denoiser's ``forward``, ``cache_context``, the pipeline's class and the adapter state on exit.
    """
    denoiser = denoiser_of(pipe)
    loaded = set(getattr(denoiser, "peft_config", None) or {})
    missing = sorted({*uncond.adapters, *cond.adapters} - loaded)
    if missing:
        raise ValueError(f"adapters {missing} are not loaded on the pipeline's denoiser; loaded: {sorted(loaded)}")
    uncond, cond = uncond.without_zero_weights(), cond.without_zero_weights()
    state = _LoraState(denoiser)
    own = vars(denoiser).get("forward")  # e.g. an accelerate offload hook
    inner = denoiser.forward
    separate = _separate_uncond(pipe) and uncond != cond
    context: dict[str, str | None] = {"name": None}
    inner_context = getattr(denoiser, "cache_context", None)

    @contextlib.contextmanager
    def cache_context(name: str, *args: Any, **kwargs: Any) -> Iterator[None]:
        context["name"] = name
        try:
            with inner_context(name, *args, **kwargs):
                yield
        finally:
            context["name"] = None

    def forward(*args: Any, **kwargs: Any) -> Any:
        if separate:
            _activate(denoiser, uncond if context["name"] == "uncond" else cond)
            return inner(*args, **kwargs)
        if uncond == cond or not _cfg_doubled(pipe, kwargs):
            _activate(denoiser, cond)
            return inner(*args, **kwargs)
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        n = sample.shape[0]
        if n % 2:
            raise RuntimeError(f"NPO guidance: a CFG call with an odd batch of {n}; expected [uncond, cond] halves")
        outputs = []
        for part, branch in ((slice(0, n // 2), uncond), (slice(n // 2, n), cond)):
            _activate(denoiser, branch)
            outputs.append(inner(*_take(args, n, part), **_take(kwargs, n, part)))
        return _concat(*outputs)

    denoiser.forward = forward
    guard = contextlib.nullcontext()
    if separate:
        if inner_context is None:
            raise TypeError(f"{type(denoiser).__name__} has no cache_context: cannot tell its cond and uncond calls")
        denoiser.cache_context = cache_context
        guard = _require_true_cfg(pipe)
    try:
        with guard:
            yield
    finally:
        if own is None:
            del denoiser.forward
        else:
            denoiser.forward = own
        if separate:
            del denoiser.cache_context
        state.restore()


def _free_name(denoiser: nn.Module, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ... when the denoiser already has an adapter of that name."""
    taken = set(getattr(denoiser, "peft_config", None) or {})
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def _load(pipe: Any, source: str | os.PathLike[str], name: str) -> None:
    """``pipe.load_lora_weights(source, adapter_name=name)`` for a denoiser-only LoRA."""
    state = pipe.lora_state_dict(source)
    state = state[0] if isinstance(state, tuple) else state
    extra = sorted({key.split(".")[0] for key in state if key.startswith("text_encoder")})
    if extra:
        raise ValueError(f"{source}: the LoRA has {extra} layers; NPO guidance takes denoiser-only LoRAs")
    pipe.load_lora_weights(source, adapter_name=name)


@contextlib.contextmanager
def npo_guidance(
    pipe: Any,
    negative: str | os.PathLike[str],
    positive: str | os.PathLike[str] | None = None,
    *,
    negative_scale: float = 1.0,
    positive_scale: float = 1.0,
    eta: float = 0.0,
) -> Iterator[NpoAdapters]:
    """Load the negative (and optional positive) LoRA as adapters and guide every call of ``pipe`` with them.

    Args:
        negative / positive: LoRA folders or hub ids in the diffusers format (``lora.save_lora`` output).
            Without ``positive`` the conditional branch is the base model.
        negative_scale / positive_scale: LoRA weights (1 = as trained).
        eta: weight merging, in [0, 1]; the unconditional branch runs ``positive`` at ``(1 - eta) * positive_scale``
            plus ``negative`` at ``negative_scale`` (ignored without ``positive``).
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"npo_guidance: eta must be in [0, 1]; got {eta}")
    for key, value in (("negative_scale", negative_scale), ("positive_scale", positive_scale)):
        if not math.isfinite(value):
            raise ValueError(f"npo_guidance: {key} must be finite; got {value}")
    denoiser = denoiser_of(pipe)
    had_adapters, before, loaded = has_adapters(denoiser), _LoraState(denoiser), []
    try:
        for source, base in ((negative, "npo_negative"), (positive, "npo_positive")):
            if source is not None:
                loaded.append(_free_name(denoiser, base))
                _load(pipe, source, loaded[-1])
        neg, pos = loaded[0], (loaded[1] if positive is not None else None)
        cond = Branch((pos,), (positive_scale,)) if pos else Branch()
        merged = Branch((pos,), ((1.0 - eta) * positive_scale,)) if pos else Branch()
        uncond = Branch((*merged.adapters, neg), (*merged.weights, negative_scale))
        with cfg_branches(pipe, uncond=uncond, cond=cond):
            yield NpoAdapters(negative=neg, positive=pos, uncond=uncond, cond=cond)
    finally:
        present = [name for name in loaded if name in (getattr(denoiser, "peft_config", None) or {})]
        if present and not had_adapters:
            denoiser.unload_lora()
        elif present:
            denoiser.delete_adapters(present)
        before.restore()
