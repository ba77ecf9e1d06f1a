"""Full fine-tuning of the denoiser: every weight trains; the reference is a frozen copy of the base, or none.

``make_full(adapter, ...)`` makes all denoiser parameters trainable in ``dtype`` (fp32 master weights by default)
and, for objectives that compare with the reference model, keeps a frozen copy of the base denoiser in
``reference_dtype`` as ``adapter.reference_denoiser``. ``Adapter.reference()`` (the one seam every reference pass
goes through: ``terms.offline``, ``terms.stepwise``, ``terms.reward_grad``, online_rl's KL) swaps that copy in for
the duration of the pass, so no term or recipe branches on the mode. Objectives that need no reference (MaPO,
ReFL/DRaFT without KL, GRPO with ``kl_coef: 0``) get no copy, and a reference pass then raises.

The errors the losses see are computed in fp32 whatever the copy's dtype (``terms.offline.per_sample_error``
casts), as the Salesforce Diffusion-DPO script computes ``ref_pred`` with a frozen ``ref_unet`` and upcasts
(``train.py`` of SalesforceAIResearch/DiffusionDPO, lines 1005-1009 and 1104-1112: the ref UNet is a
``from_pretrained`` of the base, ``requires_grad_(False)``, cast to ``weight_dtype``).

``extract_lora`` turns a full fine-tune into a LoRA by truncated SVD of ``trained - base`` of each Linear (and
optionally Conv2d) layer: ``W_t - W_b ~= B @ A`` with ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T`` (rank r; the
best rank-r approximation in Frobenius norm, Eckart-Young). Other deltas (biases, norms, embeddings) are not
representable as LoRA and are dropped; the fraction of the delta's squared norm kept is returned.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from diffalign.models.base import Adapter, resolve_dtype


@dataclass
class FullHandle:
    """What ``make_full`` did: the trained dtype, the dtype the base was loaded in, and the reference copy's dtype
    (None: no copy)."""

    dtype: torch.dtype
    base_dtype: torch.dtype
    reference_dtype: torch.dtype | None

    @property
    def has_reference(self) -> bool:
        return self.reference_dtype is not None


def make_full(
    adapter: Adapter,
    *,
    dtype: str | torch.dtype = "fp32",
    reference_dtype: str | torch.dtype | None = None,
    text_encoders: bool = False,
) -> FullHandle:
    """Make every denoiser parameter trainable in ``dtype``; with ``reference_dtype`` keep a frozen base copy.

    The copy is made before the cast, so a bf16-loaded base stays the bf16 reference exactly (and the policy starts
    as its fp32 upcast: policy == reference at step 0 whenever ``reference_dtype`` can hold the loaded weights).
    ``text_encoders``: the text encoders a text-encoder LoRA would adapt (``Adapter.lora_text_encoder_names``: the
    CLIP ones) train too, with frozen copies (``adapter.reference_text_encoders``, the whole list as the reference
    pass sees it) when there is a reference; the others stay frozen. Call before ``adapter.to(device)`` (which
    moves the copies too) and before ``torch.compile``.
    """
    if getattr(adapter.denoiser, "is_quantized", False):
        raise ValueError(
            "full fine-tuning trains the denoiser's own weights: load it unquantized (model.quantize=none)"
        )
    if adapter.full is not None:
        raise ValueError("the adapter is already set up for full fine-tuning")
    ref_dtype = None if reference_dtype is None else resolve_dtype(reference_dtype)
    if ref_dtype is not None:
        adapter.reference_denoiser = _frozen_copy(adapter.denoiser, ref_dtype)
    handle = FullHandle(resolve_dtype(dtype), adapter.dtype, ref_dtype)
    if text_encoders:
        _train_text_encoders(adapter, handle)
    if handle.dtype != handle.base_dtype:
        adapter.denoiser.to(handle.dtype)
    adapter.denoiser.requires_grad_(True)
    adapter.full = handle
    return handle


def _train_text_encoders(adapter: Adapter, handle: FullHandle) -> None:
    adapter.require_text_encoders()
    trained = [n for n in adapter.text_encoder_names() if n in adapter.lora_text_encoder_names()]
    modules = adapter.named_modules()
    if handle.reference_dtype is not None:
        adapter.reference_text_encoders = [
            _frozen_copy(modules[n], handle.reference_dtype) if n in trained else modules[n]
            for n in adapter.text_encoder_names()
        ]
    for name in trained:
        modules[name].to(handle.dtype).requires_grad_(True)


def _frozen_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    ref = copy.deepcopy(module)
    if next(ref.parameters()).dtype != dtype:
        ref.to(dtype)
    return ref.requires_grad_(False).eval()


def trained_delta_layers(trained: nn.Module, conv: bool = False) -> dict[str, nn.Module]:
    """Module name -> the Linear (and with ``conv`` the Conv2d) layers of ``trained`` a LoRA can represent."""
    kinds: tuple[type, ...] = (nn.Linear, nn.Conv2d) if conv else (nn.Linear,)
    return {name: m for name, m in trained.named_modules() if type(m) in kinds}


def _delta(trained: Tensor, base: Tensor) -> Tensor:
    """``trained - base`` in fp32 on the trained weight's device (an accelerator's SVD is much faster)."""
    weight = trained.detach().float()
    return weight - base.to(weight.device, torch.float32)


def _svd_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """``delta`` (out, in) fp32 -> (B (out, r), A (r, in), kept squared norm) of its best rank-r approximation."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r], float(s[:r].pow(2).sum())


def extract_lora(
    trained: nn.Module, base_state: dict[str, Tensor], rank: int, conv: bool = False
) -> tuple[dict[str, Tensor], dict[str, int], float]:
    """Truncated-SVD LoRA of ``trained - base`` in peft's key format (``<module>.lora_A.weight``, ``lora_B``).

    Returns (state dict in fp32, module name -> rank used (``min(rank, out, in*k*k)``), fraction of the total delta's
    squared Frobenius norm, over ALL parameters, that the LoRA keeps). Layers whose delta is exactly zero are left
    out. Conv2d (k x k) factors: ``lora_A`` a (r, in, k, k) conv, ``lora_B`` a 1x1 (out, r) conv, as peft's
    ``lora.Conv2d``.
    """
    if rank < 1:
        raise ValueError(f"export.lora_rank must be >= 1, got {rank}")
    out: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    kept = 0.0
    total = sum(float(_delta(p, base_state[n]).pow(2).sum()) for n, p in trained.named_parameters())
    for name, layer in trained_delta_layers(trained, conv).items():
        delta = _delta(layer.weight, base_state[f"{name}.weight"])
        if not bool(delta.any()):
            continue
        b, a, norm = _svd_factors(delta.flatten(1), rank)
        kept += norm
        if delta.ndim == 4:
            a = a.view(a.shape[0], *delta.shape[1:])
            b = b[:, :, None, None]
        out[f"{name}.lora_A.weight"] = a.cpu().contiguous()
        out[f"{name}.lora_B.weight"] = b.cpu().contiguous()
        ranks[name] = a.shape[0]
    return out, ranks, (kept / total if total > 0 else 1.0)


def lora_config(ranks: dict[str, int], rank: int) -> Any:
    """A peft ``LoraConfig`` for ``extract_lora``'s layers: exact module names as targets, scale 1 on every layer
    (``lora_alpha = r`` and per-layer ``rank_pattern`` / ``alpha_pattern`` where a layer is smaller than ``rank``)."""
    from peft import LoraConfig

    smaller = {name: r for name, r in ranks.items() if r != rank}
    return LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(ranks),
        rank_pattern=smaller,
        alpha_pattern=dict(smaller),
    )


def base_state_dict(adapter: Adapter, path: str, *, revision: str | None = None, variant: str | None = None) -> dict:
    """The base denoiser's weights as loaded (CPU), for ``extract_lora``: the reference copy when it holds them
    exactly (kept in fp32 or in the dtype they were loaded in), else a fresh load of the denoiser sub-folder of
    ``path`` in that dtype."""
    from diffalign import resources

    ref, handle = adapter.reference_denoiser, adapter.full
    if ref is not None and handle.reference_dtype in (torch.float32, handle.base_dtype):
        return {k: v.detach().cpu() for k, v in ref.state_dict().items()}
    cls = type(adapter.denoiser)
    base = cls.from_pretrained(
        resources.resolve(path),
        subfolder=adapter.denoiser_name,
        revision=revision,
        variant=variant,
        torch_dtype=handle.base_dtype,
    )
    return base.state_dict()
