"""Model adapters by family (``sd15``, ``sdxl``, ``sd3`` (SD3 and SD3.5), ``flux`` (FLUX.1), ``qwenimage`` (Qwen-Image),
``zimage`` (Z-Image), ``flux2`` (FLUX.2), ``wan`` (Wan 2.1 T2V), the editing ``fluxkontext`` (FLUX.1-Kontext) and
``qwenimageedit`` (Qwen-Image-Edit)).

The adapters are the only code that knows denoiser signatures."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from diffalign import registry


FAMILIES = ("sd15", "sdxl", "sd3", "flux", "qwenimage", "zimage", "flux2")
FLOW_FAMILIES = ("sd3", "flux", "qwenimage", "zimage", "flux2")
# video families (5-D latents (N, C, F', h, w); ``Adapter.is_video``): Wan 2.1 T2V
VIDEO_FAMILIES = ("wan",)
FAMILIES += VIDEO_FAMILIES
FLOW_FAMILIES += VIDEO_FAMILIES
# instruction-editing families (a source image per prompt; ``Adapter.is_editing``, ``models.editing``)
EDITING_FAMILIES = ("fluxkontext", "qwenimageedit")
FAMILIES += EDITING_FAMILIES
FLOW_FAMILIES += EDITING_FAMILIES


def get(family: str) -> ModuleType:
    """The adapter module for ``family``; unknown names raise with a suggestion."""
    if family not in FAMILIES:
        raise KeyError(f"unknown model family {family!r}; {registry.suggest(family, FAMILIES)}")
    return registry.get(__name__, family)


def load(family: str, path: str, **kwargs: Any) -> Any:
    """Load a hub id or local diffusers folder as the adapter of ``family``."""
    return get(family).load(path, **kwargs)


def from_components(family: str, components: dict[str, Any], **kwargs: Any) -> Any:
    """Wrap an in-memory component dict (e.g. ``models.tiny.sdxl()``) in the adapter of ``family``."""
    return get(family).Adapter.from_components(components, **kwargs)
