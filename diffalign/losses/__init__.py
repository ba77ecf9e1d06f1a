"""Preference objectives: one module per objective, each a pure function of per-sample ELBO terms.

Every module has a docstring naming its paper, a frozen ``Config`` with the paper's defaults,
``TERMS`` ("pair", "list", "step", "unpaired" or "policy"), ``REQUIRES`` (subset of {"ref", "pred", "gap"}) and ``loss(terms, cfg) -> LossOutput``.
A module whose needs depend on its config (an option that needs raw predictions) also defines ``requires(cfg)``;
recipes ask ``required(module, cfg)``.
"""

from types import ModuleType

from diffalign import registry


def available() -> list[str]:
    """Names of all objectives (module names in this package)."""
    return registry.available(__name__)


def get(name: str) -> ModuleType:
    """The objective module ``name``; unknown names raise ``KeyError`` with a suggestion."""
    return registry.get(__name__, name)


def required(module: ModuleType, cfg: object) -> frozenset[str]:
    """What ``module`` needs filled in its terms under ``cfg``: ``module.requires(cfg)`` if defined, else ``REQUIRES``."""
    fn = getattr(module, "requires", None)
    return frozenset(fn(cfg)) if fn is not None else frozenset(module.REQUIRES)
