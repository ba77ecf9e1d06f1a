"""Load pipeline components from a hub id or a local diffusers folder, one component at a time.

Loading each sub-model with its own class (instead of a whole pipeline) keeps the safety checker,
feature extractor and other inference-only parts out of training memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffalign import resources


TOKENIZER_CLASSES = {"tokenizer": "CLIPTokenizer", "tokenizer_2": "CLIPTokenizer", "tokenizer_3": "AutoTokenizer"}


def _check_source(path: str) -> None:
    local = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or local.exists()
    if looks_local and not (local / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{path!r} is not a diffusers model folder (no model_index.json). Pass a hub id such as "
            "'stabilityai/stable-diffusion-xl-base-1.0' or a folder written by save_pretrained "
            "(tiny offline models: `python -m diffalign.models.tiny sd15 <dir>`)."
        )


def load_components(
    adapter_cls: Any,
    path: str,
    *,
    dtype: torch.dtype,
    variant: str | None = None,
    revision: str | None = None,
    vae_path: str | None = None,
) -> dict[str, Any]:
    """Sub-models of ``path`` by component name, read with ``from_pretrained(path, subfolder=...)``."""
    import diffusers
    import transformers

    path = resources.resolve(path)
    _check_source(path)
    common: dict[str, Any] = {"revision": revision}
    weights = {**common, "variant": variant, "torch_dtype": dtype}
    index = diffusers.DiffusionPipeline.load_config(path, revision=revision)
    out: dict[str, Any] = {}
    names = [adapter_cls.denoiser_name, "vae", "scheduler", *adapter_cls.text_encoder_names()]
    names += [n.replace("text_encoder", "tokenizer") for n in adapter_cls.text_encoder_names()]
    for name in names:
        if name not in index or index[name][0] is None:
            raise ValueError(f"{path!r} has no {name!r} component (model_index.json lists {sorted(index)})")
        library, class_name = index[name]
        module = diffusers if library == "diffusers" else transformers
        cls = getattr(module, TOKENIZER_CLASSES.get(name, class_name) if library == "transformers" else class_name)
        if name.startswith("tokenizer") or name == "scheduler":
            out[name] = cls.from_pretrained(path, subfolder=name, **common)
        elif name == "vae" and vae_path:
            out[name] = diffusers.AutoencoderKL.from_pretrained(vae_path, torch_dtype=torch.float32)
        else:
            kwargs = dict(weights)
            if name == "vae":
                kwargs["torch_dtype"] = torch.float32
            out[name] = cls.from_pretrained(path, subfolder=name, **kwargs)
    return out
