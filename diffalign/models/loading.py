"""Load pipeline components from a hub id or a local diffusers folder, one component at a time.

Loading each sub-model with its own class (instead of a whole pipeline) keeps the safety checker,
feature extractor and other inference-only parts out of training memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from diffalign import resources
from diffalign.errors import UserError


TINY_HINT = "write a tiny offline model there with `python -m diffalign.models.tiny {family} {path}`"


class ModelSourceError(UserError, FileNotFoundError):
    """A model path or Hub id that cannot be loaded on this machine (``source_problem``'s one line)."""


def source_problem(key: str, value: str | None, family: str | None = None, *, pipeline: bool = True) -> str | None:
    """Why the model folder (``pipeline``: with ``model_index.json``) or Hub id ``value`` of option ``key`` cannot be
    loaded here, in one line with the fix, or None. A missing local folder is reported as missing (with the command
    that writes a tiny offline model of ``family``), not as a failed download; a Hub id that is not in the local
    cache while ``HF_HUB_OFFLINE=1`` is named too."""
    if not value:
        return None
    try:
        path = resources.resolve(value)
    except FileNotFoundError as e:
        return f"{key}: {e}"
    if resources.is_hub_id(path):
        return _hub_cache_problem(key, path)
    local = Path(path).expanduser()
    hint = TINY_HINT.format(family=family, path=value) if family and pipeline else ""
    if not local.exists():
        return (
            f"{key}={value!r}: no such folder (a local path; Hub ids are owner/name): "
            + (f"{hint}, or " if hint else "")
            + f"set {key} to a Hub id or a diffusers folder"
        )
    if pipeline and not (local / "model_index.json").is_file():
        return f"{key}={value!r} is not a diffusers pipeline folder (no model_index.json): use a folder written by save_pretrained"
    return None


def _hub_cache_problem(key: str, repo: str) -> str | None:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("1", "true", "yes", "on"):
        return None
    from huggingface_hub import try_to_load_from_cache

    for name in ("model_index.json", "config.json"):
        if isinstance(try_to_load_from_cache(repo, name), str):
            return None
    return (
        f"{key}={repo!r} is a Hub id that is not in the local cache, and HF_HUB_OFFLINE=1: download it on a "
        f"machine with access (`huggingface-cli download {repo}`) or point {key} at a local folder"
    )


def load_components(
    adapter_cls: Any,
    path: str,
    *,
    dtype: torch.dtype,
    variant: str | None = None,
    revision: str | None = None,
    vae_path: str | None = None,
    quantize: str = "none",
    load_text_encoders: bool = True,
) -> dict[str, Any]:
    """Sub-models of ``path`` by component name, read with ``from_pretrained(path, subfolder=...)``.

    ``quantize`` applies to the denoiser only (``quantization_config``, see ``quantization_config``);
    ``load_text_encoders=False`` leaves the text encoders and tokenizers out (cached prompt embeddings).
    """
    import diffusers
    import transformers

    problem = source_problem("model path", path, getattr(adapter_cls, "family", None))
    if problem:
        raise ModelSourceError(problem)
    path = resources.resolve(path)
    common: dict[str, Any] = {"revision": revision}
    weights = {**common, "variant": variant, "torch_dtype": dtype}
    index = diffusers.DiffusionPipeline.load_config(path, revision=revision)
    out: dict[str, Any] = {}
    names = [adapter_cls.denoiser_name, "vae", "scheduler"]
    if load_text_encoders:
        names += adapter_cls.text_encoder_names()
        names += [n.replace("text_encoder", "tokenizer") for n in adapter_cls.text_encoder_names()]
        names += list(adapter_cls.extra_component_names)
    for name in names:
        if name not in index or index[name][0] is None:
            raise ValueError(f"{path!r} has no {name!r} component (model_index.json lists {sorted(index)})")
        library, class_name = index[name]
        module = diffusers if library == "diffusers" else transformers
        if library == "transformers":
            class_name = adapter_cls.tokenizer_classes.get(name, class_name)
        cls = getattr(module, class_name)
        if name.startswith("tokenizer") or name == "scheduler" or name in adapter_cls.extra_component_names:
            out[name] = cls.from_pretrained(path, subfolder=name, **common)
        elif name == "vae" and vae_path:
            out[name] = diffusers.AutoencoderKL.from_pretrained(vae_path, torch_dtype=torch.float32)
        else:
            kwargs = dict(weights)
            if name == "vae":
                kwargs["torch_dtype"] = torch.float32
            if name == adapter_cls.denoiser_name and quantize != "none":
                kwargs["quantization_config"] = quantization_config(quantize, dtype)
            out[name] = cls.from_pretrained(path, subfolder=name, **kwargs)
    return out


def quantization_config(kind: str, compute_dtype: torch.dtype) -> Any:
    """diffusers' ``quantization_config`` for a frozen denoiser: ``nf4`` (bitsandbytes) or ``float8`` (torchao).

    NF4 is the QLoRA set-up of diffusers' ``research_projects/flux_lora_quantization`` (4-bit NormalFloat,
    compute in ``compute_dtype``); diffusers' bitsandbytes loader quantizes onto a CUDA GPU and refuses to run
    without one. float8 is torchao's weight-only e4m3 (``float8wo_e4m3``), which needs a CUDA GPU of compute
    capability >= 8.9. A missing library or device is an error saying what to install or use.
    """
    import diffusers

    if kind == "nf4":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "model.quantize=nf4 needs a CUDA GPU: diffusers' bitsandbytes loader quantizes the weights onto the "
                "GPU while loading. On CPU use model.quantize=none (with model.dtype=bf16 for half the memory)"
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise ImportError("model.quantize=nf4 needs bitsandbytes: pip install 'diffalign[memory]'") from e
        return diffusers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
    if kind == "float8":
        if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
            raise RuntimeError(
                "model.quantize=float8 needs a CUDA GPU with compute capability >= 8.9 (Ada/Hopper: torchao float8 "
                "kernels); on this machine use model.quantize=nf4 or none"
            )
        try:
            import torchao  # noqa: F401
        except ImportError as e:
            raise ImportError("model.quantize=float8 needs torchao: pip install torchao") from e
        return diffusers.TorchAoConfig("float8wo_e4m3")
    raise ValueError(f"unknown quantization {kind!r}; choices: none, nf4, float8")
