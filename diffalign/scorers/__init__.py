"""Reward scorers: one module per scorer, each with ``load(path=<published hub id>, *, device, dtype, ...)``.

``load("pickscore")`` returns a ``Scorer`` (see ``base.py``): ``scorer(images, prompts) -> (B,)`` fp32 scores.
Modules: pickscore, clipscore, hpsv2, imagereward, aesthetic. Nothing heavy is imported until ``load``.

Step-aware scorers score noisy latents at a timestep instead of images (``diffalign.scorers._stepaware``):
``spm`` (SPO's step-aware preference model) and ``lrm`` (LPO's latent reward model). They have a different call
signature, so ``available``/``load`` leave them out; use ``available_step_aware``/``load_step_aware``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from diffalign import registry


if TYPE_CHECKING:
    from diffalign.scorers.base import Scorer

# Public modules here that are helpers, not scorers.
_NOT_SCORERS = frozenset({"base"})
STEP_AWARE = ("lrm", "spm")


def available() -> list[str]:
    """Names of the image scorers (module names in this package, minus helpers and step-aware scorers)."""
    return [name for name in registry.available(__name__) if name not in _NOT_SCORERS and name not in STEP_AWARE]


def load(name: str, **kwargs: Any) -> Scorer:
    """``<name>.load(**kwargs)``; unknown names raise ``KeyError`` with a "did you mean"."""
    names = available()
    if name not in names:
        raise KeyError(f"unknown scorer {name!r}; {registry.suggest(name, names)}")
    check_options(name, kwargs)
    return registry.get(__name__, name).load(**kwargs)


def options(name: str) -> list[str] | None:
    """The keyword options ``<name>.load`` accepts (``None`` when it takes arbitrary ``**kwargs``)."""
    import inspect

    params = inspect.signature(registry.get(__name__, name).load).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_options(name: str, given: Any) -> None:
    """Raise ``KeyError`` for the first option in ``given`` that ``<name>.load`` does not take, with a "did you
    mean" and the accepted options (``hpsv2,variant=v2.1`` names ``version``)."""
    accepted = options(name)
    if accepted is None:
        return
    for key in given:
        if key not in accepted:
            raise KeyError(f"scorer {name!r} has no option {key!r}; {registry.suggest(key, accepted)}")


def available_step_aware() -> list[str]:
    """Names of the step-aware (noisy-latent) scorers: ``["lrm", "spm"]``."""
    return list(STEP_AWARE)


def load_step_aware(name: str, path: Any, **kwargs: Any) -> Any:
    """``<name>.load(path, **kwargs)`` for ``spm`` / ``lrm``; unknown names raise ``KeyError`` with a "did you mean"."""
    if name not in STEP_AWARE:
        raise KeyError(f"unknown step-aware scorer {name!r}; {registry.suggest(name, list(STEP_AWARE))}")
    return registry.get(__name__, name).load(path, **kwargs)
