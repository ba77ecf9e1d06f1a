"""LoRA adapters via peft on the denoiser (and optionally the text encoders), saved in diffusers format.

Layers are injected with ``peft.inject_adapter_in_model`` for every component, as diffusers' own LoRA loader
does, never through transformers' ``PreTrainedModel.add_adapter``: that method refuses to run unless peft meets
the transformers release's own minimum (transformers 5.24 asks for peft >= 0.22), so relying on it would tie
diffalign to whichever transformers/peft pair a registry happens to serve. Switching adapters on and off for
the reference pass goes through the peft layers too (``models.base.set_lora_enabled``).

``save_lora`` writes ``pytorch_lora_weights.safetensors`` through the family pipeline's own
``save_lora_weights`` (with the LoRA config as adapter metadata, so a non-default alpha survives), so a stock
``pipe.load_lora_weights(out_dir)`` loads it. Training checkpoints use ``trainable_state`` instead: the
exact trainable tensors by parameter name, restored bitwise by ``load_trainable_state``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffalign.models.base import Adapter, has_adapters


INITS = {"gaussian": "gaussian", "default": True}


@dataclass(frozen=True, kw_only=True)
class LoraSpec:
    """LoRA hyper-parameters. ``alpha=None`` means alpha = rank (scale 1), the diffusers DPO default.

    ``targets=None`` takes the family's defaults (``Adapter.default_lora_targets``); on SD3.5-Medium either way
    the dual-attention ``attn2`` projections are added (``sd3.Adapter.resolve_lora_targets``).
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    targets: Sequence[str] | None = None
    init: str = "gaussian"
    text_encoder: bool = False
    text_encoder_targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "out_proj")

    def peft_config(self, targets: Sequence[str]) -> Any:
        from peft import LoraConfig

        if self.init not in INITS:
            raise ValueError(f"unknown lora init {self.init!r}; choices: {', '.join(INITS)}")
        if self.rank < 1:
            raise ValueError(f"lora rank must be >= 1, got {self.rank}")
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha if self.alpha is not None else self.rank,
            lora_dropout=self.dropout,
            init_lora_weights=INITS[self.init],
            target_modules=list(targets),
        )


@dataclass
class LoraHandle:
    """What ``add_lora`` did: the spec, the component names that carry an adapter, the denoiser targets used."""

    spec: LoraSpec
    modules: list[str] = field(default_factory=list)
    targets: tuple[str, ...] = ()


def add_lora(adapter: Adapter, spec: LoraSpec) -> LoraHandle:
    """Inject LoRA layers; the LoRA parameters are trainable and fp32, everything else stays frozen.

    At init ``lora_B`` is zero, so the policy equals the reference exactly.
    """
    handle = LoraHandle(spec)
    targets = {adapter.denoiser_name: adapter.resolve_lora_targets(spec.targets)}
    if spec.text_encoder:
        adapter.require_text_encoders()
        if not adapter.lora_text_encoder_names():
            raise ValueError(
                f"lora.text_encoder=true: {adapter.pipeline_class} saves and loads transformer LoRA only, so a "
                f"{adapter.family} text-encoder LoRA could not be exported; set lora.text_encoder=false"
            )
        targets.update(dict.fromkeys(adapter.lora_text_encoder_names(), spec.text_encoder_targets))
    handle.targets = tuple(targets[adapter.denoiser_name])
    modules = adapter.named_modules()
    for name, module_targets in targets.items():
        module = modules[name]
        _check_targets(module, name, module_targets)
        _inject(module, spec.peft_config(module_targets))
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.float()
        handle.modules.append(name)
    return handle


def _inject(module: nn.Module, config: Any, name: str = "default") -> None:
    """peft layers into ``module`` in place, marked the way diffusers' and transformers' ``add_adapter`` mark them.

    ``inject_adapter_in_model`` freezes the base weights, makes the LoRA weights trainable and copies the config
    to ``module.peft_config``; the ``_hf_peft_config_loaded`` flag is what both libraries read to know a model
    carries adapters (e.g. ``save_pretrained`` then writes only the adapter).
    """
    from peft import inject_adapter_in_model

    if name in (getattr(module, "peft_config", None) or {}):
        raise ValueError(f"{type(module).__name__} already has a LoRA adapter named {name!r}")
    inject_adapter_in_model(config, module, adapter_name=name)
    module._hf_peft_config_loaded = True


def _check_targets(module: nn.Module, name: str, targets: Sequence[str]) -> None:
    """Fail early when a target name matches no layer (peft's own error lists nothing useful)."""
    names = [n for n, _ in module.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"LoRA targets {missing} match no layer of {name}; examples of layer names: {names[-5:]}")


def trainable_parameters(adapter: Adapter) -> dict[str, nn.Parameter]:
    """Trainable parameters keyed ``<component>.<param name>`` (stable across runs)."""
    out = {}
    for comp, module in adapter.named_modules().items():
        for name, param in module.named_parameters():
            if param.requires_grad:
                out[f"{comp}.{name}"] = param
    return out


def trainable_state(adapter: Adapter) -> dict[str, Tensor]:
    """A detached CPU copy of every trainable tensor, for checkpoints."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in trainable_parameters(adapter).items()}


def load_trainable_state(adapter: Adapter, state: dict[str, Tensor]) -> None:
    """Restore ``trainable_state`` output; any missing or unexpected key is an error naming it."""
    params = trainable_parameters(adapter)
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise KeyError(
            f"checkpoint does not match the LoRA layout: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for key, param in params.items():
            if state[key].shape != param.shape:
                raise ValueError(f"{key}: checkpoint shape {tuple(state[key].shape)} != model {tuple(param.shape)}")
            param.copy_(state[key])


def save_lora(adapter: Adapter, out_dir: str | Path, whole: dict[str, Tensor] | None = None) -> Path:
    """Write the LoRA in the diffusers format that ``pipe.load_lora_weights(out_dir)`` reads.

    ``whole``: the trained tensors by ``trainable_parameters`` name, to write instead of the modules' own (a sharded
    run passes them gathered whole)."""
    from peft.utils import get_peft_model_state_dict

    def own(name: str) -> dict[str, Tensor] | None:
        return None if whole is None else {k[len(name) + 1 :]: v for k, v in whole.items() if k.startswith(f"{name}.")}

    layers = {
        name: (get_peft_model_state_dict(module, state_dict=own(name)), module.peft_config["default"])
        for name, module in adapter.named_modules().items()
        if has_adapters(module)
    }
    if not layers:
        raise ValueError("the model has no LoRA adapter to save")
    return save_lora_layers(adapter, out_dir, layers)


def save_lora_layers(adapter: Adapter, out_dir: str | Path, layers: dict[str, tuple[dict[str, Tensor], Any]]) -> Path:
    """Write LoRA tensors in peft key format (``<module>.lora_A.weight``) with their peft ``LoraConfig``, per
    component name (``unet``, ``transformer``, ``text_encoder``), through the family pipeline's
    ``save_lora_weights``: the file ``pipe.load_lora_weights(out_dir)`` reads. Used by ``save_lora`` and by full
    mode's SVD export (``models.full.extract_lora``)."""
    import diffusers

    out = Path(out_dir)
    pipe_cls = getattr(diffusers, adapter.pipeline_class)
    kwargs: dict[str, Any] = {"safe_serialization": True}
    for name, (tensors, config) in layers.items():
        kwargs[f"{name}_lora_layers"] = {k: v.detach().cpu() for k, v in tensors.items()}
        kwargs[f"{name}_lora_adapter_metadata"] = config.to_dict()
    pipe_cls.save_lora_weights(out, **kwargs)
    return out
