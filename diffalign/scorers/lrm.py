"""LPO's latent reward model (LRM): the diffusion model's own text encoder(s) and denoiser trunk as a reward model.

Zhang et al., "Diffusion Model as a Noise-Aware Latent Reward Model for Step-Level Preference Optimization" (LPO,
arXiv 2502.01051, NeurIPS 2025); architecture read from Kwai-Kolors/LPO ``lrm/lrm_15/.../
sd15_preference_model.py`` and ``lrm/lrm_xl/.../sdxl_base_preference_model.py`` (written anew here)::

    x_t, t  ->  UNet down blocks + mid block only (up blocks dropped), conditioned on the prompt, run twice:
                with the prompt (c) and with the empty prompt (u)
    d_i   = avg-pool of down stage i's last resnet output (before its downsampler), prompt branch
    m     = m_u + g (m_c - m_u)                                # "visual feature enhancement": CFG on the pooled mid
    V     = W_v [d_1, ..., d_L, m]                              # W_v: no bias, N(0, 0.02); SD1.5 4800-d, SDXL 3520-d
    T     = SD1.5: W_t pooled-EOS(CLIP-L)      SDXL: pooled projected output of text_encoder_2 (bigG), no W_t
    R(x_t, c, t) = exp(tau) cos(V, T),  tau initialised to 2.6592 (CLIP)

The timestep enters only through the denoiser's own time embedding (no extra time head); SDXL's added
``text_embeds``/``time_ids`` conditioning is kept (uncropped geometry of the latents' pixel size, LPO uses 1024).
``multi_scale=False`` keeps only the mid feature; ``multi_scale_cfg=True`` guides the down-stage features too
(LPO's SD1.5 code; its SDXL code guides all but the first stage, not reproduced). ``guidance_scale=1`` turns VFE off.
Everything except the VAE is trained (LPO): the LRM holds its own copies of the text encoders and of the trunk.

SD3 (LPO App. B; that code is not released, so this is a reading of the text, not a port): an MMDiT has no
down/mid blocks. The trunk is the first ``sd3_num_blocks`` joint transformer blocks (the paper takes features at
layer 18) with the transformer's own timestep + pooled-text embedding; the visual feature is the mean of the image
tokens after the last kept block (one scale; VFE guides it); the text feature is ``W_t`` applied to the pooled
CLIP-L + CLIP-G projections. The text encoders are frozen, as in the paper, and are not copied: an SD3 LRM encodes
prompts with the ``adapter`` passed to each call (with any text-encoder LoRA it carries), so it needs one.

Input: noisy latents exactly as the sampler holds them (``adapter.encode_images`` scaling), no decoding.
``save_pretrained(dir)`` writes ``model.safetensors`` (trunk, text encoders, projections, logit scale),
``lrm_config.json`` (LRM settings and the denoiser's config) and ``text_encoder*/config.json`` + ``tokenizer*/``;
``load(dir)`` rebuilds it. LPO's own trainer output (``unet/``, ``text_encoder/``, ``state_dict.pt``) and checkpoints
from elsewhere are not read: no public LRM checkpoint or hub layout is documented (LPO's README says to download
"the latent reward models" without naming a location).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffalign.scorers import _stepaware


FAMILIES = ("sd15", "sdxl", "sd3")
FORMAT = "diffalign-lrm/1"
META_FILE, WEIGHTS_FILE = "lrm_config.json", "model.safetensors"
TIMESTEP_GRID = tuple(range(1, 1000, 50))  # LPO's training timesteps {1, 51, ..., 951} (20-step DDIM grid)


@dataclass(frozen=True, kw_only=True)
class LRMConfig:
    """LRM settings (LPO defaults). ``text_projection``: SD1.5 and SD3 project the text feature, SDXL does not."""

    family: Literal["sd15", "sdxl", "sd3"]
    projection_dim: int
    text_dim: int
    text_projection: bool
    guidance_scale: float = 7.5  # VFE: CFG on the pooled mid feature (LPO Tab. 8: 7.5 best); 1.0 = off
    multi_scale: bool = True
    multi_scale_cfg: bool = False
    logit_scale_init: float = 2.6592
    vae_scale_factor: int = 8
    sd3_num_blocks: int = 18

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"LRM family must be one of {FAMILIES}, got {self.family!r}")
        if not self.text_projection and self.text_dim != self.projection_dim:
            raise ValueError(
                f"without a text projection the text feature ({self.text_dim}-d) must match projection_dim "
                f"({self.projection_dim})"
            )


# ---- trunks ------------------------------------------------------------------------------------------------------


class UNetTrunk(nn.Module):
    """``UNet2DConditionModel`` cut after its mid block: per down stage and mid, the pooled features (B, c_i)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        if unet.mid_block is None:
            raise ValueError("the UNet has no mid block; the LRM needs one (LPO's VFE guides the mid feature)")
        if unet.config.center_input_sample or unet.config.addition_embed_type == "image_hint":
            raise NotImplementedError("center_input_sample / image_hint UNets are not supported by the LRM")
        if getattr(unet, "class_embedding", None) is not None:
            raise NotImplementedError("class-conditioned UNets are not supported by the LRM")
        unet.up_blocks = nn.ModuleList()
        unet.conv_norm_out = unet.conv_act = unet.conv_out = None
        self.unet = unet

    @property
    def feature_dims(self) -> list[int]:
        dims = [int(block.resnets[-1].out_channels) for block in self.unet.down_blocks]
        return [*dims, int(self.unet.mid_block.resnets[-1].out_channels)]

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> list[Tensor]:
        """Noisy latents (B, C, h, w), timesteps (B,), conditioning -> [pooled stage 1, ..., pooled mid]."""
        unet = self.unet
        hidden = cond["encoder_hidden_states"].to(x.dtype)
        added = {k: cond[k].to(x.dtype) for k in ("text_embeds", "time_ids") if k in cond}
        emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t), None)
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=hidden, added_cond_kwargs=added)
        emb = emb + aug if aug is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        hidden = unet.process_encoder_hidden_states(encoder_hidden_states=hidden, added_cond_kwargs=added)
        h = unet.conv_in(x)
        feats = []
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=hidden)
            else:
                h, res = block(hidden_states=h, temb=emb)
            feats.append(res[len(block.resnets) - 1].mean(dim=(-2, -1)))
        if getattr(unet.mid_block, "has_cross_attention", False):
            h = unet.mid_block(h, emb, encoder_hidden_states=hidden)
        else:
            h = unet.mid_block(h, emb)
        return [*feats, h.mean(dim=(-2, -1))]


class MMDiTTrunk(nn.Module):
    """``SD3Transformer2DModel`` cut after ``num_blocks`` joint blocks: the mean image token (B, inner_dim)."""

    def __init__(self, transformer: nn.Module, num_blocks: int) -> None:
        super().__init__()
        total = len(transformer.transformer_blocks)
        if not 1 <= num_blocks <= total:
            raise ValueError(f"sd3_num_blocks={num_blocks} must be in [1, {total}] (the transformer's blocks)")
        transformer.transformer_blocks = transformer.transformer_blocks[:num_blocks]
        transformer.norm_out = transformer.proj_out = None
        self.transformer = transformer

    @property
    def feature_dims(self) -> list[int]:
        return [int(self.transformer.inner_dim)]

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> list[Tensor]:
        tr = self.transformer
        h = tr.pos_embed(x).contiguous()
        temb = tr.time_text_embed(t, cond["pooled_projections"].to(x.dtype))
        context = tr.context_embedder(cond["encoder_hidden_states"].to(x.dtype))
        for block in tr.transformer_blocks:
            context, h = block(hidden_states=h, encoder_hidden_states=context, temb=temb, joint_attention_kwargs=None)
        return [h.mean(dim=1)]


# ---- the model ---------------------------------------------------------------------------------------------------


class LatentRewardModel(nn.Module):
    """Trunk + text encoders + projections + logit scale; ``forward`` gives differentiable scores (B,) fp32."""

    def __init__(
        self, config: LRMConfig, trunk: nn.Module, text_encoders: Sequence[nn.Module], tokenizers: Sequence[Any]
    ) -> None:
        super().__init__()
        self.config = config
        self.trunk = trunk
        self.text_encoders = nn.ModuleList(text_encoders)
        self.tokenizers = list(tokenizers)
        dims = trunk.feature_dims
        self.visual_projection = nn.Linear(
            sum(dims) if config.multi_scale else dims[-1], config.projection_dim, bias=False
        )
        nn.init.normal_(self.visual_projection.weight, std=0.02)
        self.text_projection = (
            nn.Linear(config.text_dim, config.projection_dim, bias=False) if config.text_projection else None
        )
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.visual_projection.weight.dtype

    # ---- text ----------------------------------------------------------------------------------------------------
    def _encode_unique(self, prompts: list[str], adapter: Any) -> tuple[dict[str, Tensor], Tensor]:
        from diffalign.models.base import tokenize

        family = self.config.family
        if family == "sd3":
            if adapter is None:
                raise ValueError("an SD3 LRM encodes prompts with the adapter's frozen text encoders: pass adapter=")
            with torch.no_grad():
                cond = adapter.encode_prompts(prompts)
            return {k: v.to(self.device) for k, v in cond.items()}, cond["pooled_projections"].to(self.device)
        if family == "sd15":
            (encoder,), (tokenizer,) = self.text_encoders, self.tokenizers
            out = encoder(tokenize(tokenizer, prompts).to(self.device))
            return {"encoder_hidden_states": out[0]}, out[1]  # last hidden state, pooled EOS
        hidden, pooled = [], None
        for encoder, tokenizer in zip(self.text_encoders, self.tokenizers, strict=True):
            out = encoder(tokenize(tokenizer, prompts).to(self.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # text_embeds of text_encoder_2 (CLIPTextModelWithProjection)
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}, pooled

    def encode_text(
        self, prompts: Sequence[str], adapter: Any = None, info: Any = None, *, like: Tensor | None = None
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Trunk conditioning (batch first) and text feature (B, text_dim); each distinct prompt encoded once.

        SDXL adds ``time_ids`` from ``info``, or from the size of ``like`` (the latents) when ``info`` is None.
        """
        position = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        cond, feature = self._encode_unique(list(position), adapter)
        index = torch.tensor([position[p] for p in prompts], device=feature.device)
        cond = {k: v.index_select(0, index.to(v.device)) for k, v in cond.items()}
        if self.config.family == "sdxl":
            from diffalign.models.sdxl import time_ids

            if info is None:
                if like is None:
                    raise ValueError("SDXL LRM text conditioning needs info or the latents (like=)")
                info = _stepaware.default_info(like, self.config.vae_scale_factor)
            cond["time_ids"] = time_ids(info).to(self.device)
        return cond, feature.index_select(0, index)

    # ---- scores --------------------------------------------------------------------------------------------------
    def image_features(self, latents: Tensor, timesteps: Tensor, cond: dict[str, Tensor], uncond: Any) -> Tensor:
        """Pooled multi-scale features with VFE, projected: (B, projection_dim). ``uncond`` None skips VFE."""
        x = latents.to(self.device, self.dtype)
        t = timesteps.to(self.device)
        if uncond is None:
            return self.visual_projection(self._select(self.trunk(x, t, cond)))
        feats = self.trunk(torch.cat([x, x]), torch.cat([t, t]), _stepaware.cat_cond(cond, uncond))
        g = self.config.guidance_scale
        stages = [f.chunk(2)[0] for f in feats[:-1]]
        if self.config.multi_scale_cfg:
            stages = [_stepaware.guided(*f.chunk(2), g) for f in feats[:-1]]
        mid = _stepaware.guided(*feats[-1].chunk(2), g)
        return self.visual_projection(self._select([*stages, mid]))

    def _select(self, feats: list[Tensor]) -> Tensor:
        return torch.cat(feats, dim=-1) if self.config.multi_scale else feats[-1]

    def forward(
        self, latents: Tensor, timesteps: Tensor, prompts: Sequence[str], *, adapter: Any = None, info: Any = None
    ) -> Tensor:
        """``exp(tau) cos(V(x_t, t, c), T(c))`` (B,) fp32, differentiable."""
        cond, text = self.encode_text(prompts, adapter, info, like=latents)
        uncond = None
        if self.config.guidance_scale != 1.0:
            uncond, _ = self.encode_text([""] * len(prompts), adapter, info, like=latents)
        image = F.normalize(self.image_features(latents, timesteps, cond, uncond).float(), dim=-1)
        if self.text_projection is not None:
            text = self.text_projection(text.to(self.dtype))
        text = F.normalize(text.float(), dim=-1)
        return self.logit_scale.float().exp() * (image * text).sum(dim=-1)


class LatentRewardScorer:
    """The step-aware scorer: ``scorer(latents, timesteps, prompts, adapter=...) -> (B,)`` fp32 on the CPU.

    ``model`` is the ``LatentRewardModel`` (train it directly). The adapter is needed only by SD3 LRMs; one given
    at construction or ``load`` is used when a call passes none.
    """

    name = "lrm"

    def __init__(
        self,
        model: LatentRewardModel,
        *,
        variant: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        adapter: Any = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.variant, self.batch_size, self.adapter = model, variant, batch_size, adapter
        self.device, self.dtype = torch.device(device), dtype
        model.to(device=self.device, dtype=dtype)
        model.logit_scale.data = model.logit_scale.data.float()

    @property
    def config(self) -> LRMConfig:
        return self.model.config

    @torch.no_grad()
    def __call__(
        self, latents: Tensor, timesteps: Tensor, prompts: Sequence[str], *, adapter: Any = None, info: Any = None
    ) -> Tensor:
        """Scores (B,) fp32 on the CPU of noisy latents at ``timesteps`` (model units); ``info``: SDXL geometry."""
        adapter = adapter if adapter is not None else self.adapter
        t = _stepaware.check_step_inputs(latents, timesteps, prompts)
        out = []
        for lo in range(0, len(prompts), self.batch_size):
            hi = lo + self.batch_size
            chunk_info = None if info is None else list(info[lo:hi])
            scores = self.model(latents[lo:hi], t[lo:hi], list(prompts[lo:hi]), adapter=adapter, info=chunk_info)
            out.append(scores.float().cpu())
        return torch.cat(out) if out else torch.empty(0)

    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Write the folder ``load`` reads (module docstring); returns it."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model = self.model
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out / WEIGHTS_FILE))
        trunk = model.trunk.unet if isinstance(model.trunk, UNetTrunk) else model.trunk.transformer
        encoders = []
        for i, (encoder, tokenizer) in enumerate(zip(model.text_encoders, model.tokenizers, strict=True)):
            suffix = "" if i == 0 else f"_{i + 1}"
            encoder.config.save_pretrained(str(out / f"text_encoder{suffix}"))
            tokenizer.save_pretrained(str(out / f"tokenizer{suffix}"))
            encoders.append({"class": type(encoder).__name__, "suffix": suffix})
        meta = {
            "format": FORMAT,
            "lrm": dataclasses.asdict(model.config),
            "trunk": {"class": type(trunk).__name__, "config": dict(trunk.config)},
            "text_encoders": encoders,
            "variant": self.variant,
        }
        _stepaware.write_json(out / META_FILE, meta)
        return out

    def __repr__(self) -> str:
        return f"LatentRewardScorer(family={self.config.family!r}, variant={self.variant!r}, device={self.device})"


# ---- construction ------------------------------------------------------------------------------------------------


def _trunk(family: str, denoiser: nn.Module, sd3_num_blocks: int) -> nn.Module:
    return MMDiTTrunk(denoiser, sd3_num_blocks) if family == "sd3" else UNetTrunk(denoiser)


def _text_projection_weight(source: str | os.PathLike, shape: tuple[int, int]) -> Tensor:
    """``text_projection.weight`` of a CLIP checkpoint (hub id, folder or file), as LPO's SD1.5 LRM initialises."""
    from diffalign.scorers.base import load_checkpoint, resolve_file, tensor_state_dict

    file = resolve_file(source, "model.safetensors", also=("pytorch_model.bin",))
    state = tensor_state_dict(load_checkpoint(file), file)
    if "text_projection.weight" not in state:
        raise KeyError(f"{file} has no 'text_projection.weight' (is it a CLIPModel checkpoint?)")
    weight = state["text_projection.weight"]
    if tuple(weight.shape) != shape:
        raise ValueError(f"{file}: text_projection.weight is {tuple(weight.shape)}, the LRM needs {shape}")
    return weight


def from_adapter(
    adapter: Any,
    *,
    guidance_scale: float = 7.5,
    multi_scale: bool = True,
    multi_scale_cfg: bool = False,
    projection_dim: int | None = None,
    text_projection_init: str | os.PathLike = "identity",
    sd3_num_blocks: int | None = None,
    logit_scale_init: float = 2.6592,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
) -> LatentRewardScorer:
    """A fresh, trainable LRM from a diffusion model adapter (copies of its text encoders and denoiser trunk).

    ``text_projection_init`` (SD1.5, SD3): ``"identity"`` (square only), ``"normal"`` (N(0, 0.02)) or a CLIP
    checkpoint whose ``text_projection.weight`` is copied; LPO's SD1.5 LRM uses ``openai/clip-vit-large-patch14``.
    ``sd3_num_blocks`` defaults to min(18, blocks - 1). Build it from the base model, before any LoRA is added.
    """
    from diffalign.models.base import has_adapters

    family = adapter.family
    if family not in FAMILIES:
        raise ValueError(f"no LRM for model family {family!r}; supported: {FAMILIES}")
    for name, module in adapter.named_modules().items():
        if has_adapters(module):
            raise ValueError(f"adapter.{name} carries LoRA layers; build the LRM from the base model before add_lora")
    blocks = len(getattr(adapter.denoiser, "transformer_blocks", ()))
    num_blocks = sd3_num_blocks if sd3_num_blocks is not None else max(1, min(18, blocks - 1))
    trunk = _trunk(family, copy.deepcopy(adapter.denoiser), num_blocks)
    encoders = [] if family == "sd3" else [copy.deepcopy(enc) for enc in adapter.text_encoders]
    tokenizers = [] if family == "sd3" else list(adapter.tokenizers)
    text_dim = _text_dim(family, adapter, encoders)
    uses_projection = family != "sdxl"
    config = LRMConfig(
        family=family,
        projection_dim=projection_dim or text_dim,
        text_dim=text_dim,
        text_projection=uses_projection,
        guidance_scale=guidance_scale,
        multi_scale=multi_scale,
        multi_scale_cfg=multi_scale_cfg,
        logit_scale_init=logit_scale_init,
        vae_scale_factor=adapter.vae_scale_factor,
        sd3_num_blocks=num_blocks,
    )
    model = LatentRewardModel(config, trunk, encoders, tokenizers)
    if model.text_projection is not None:
        _init_text_projection(model.text_projection, text_projection_init)
    model.requires_grad_(True)
    return LatentRewardScorer(
        model,
        variant=f"lrm-init:{family}",
        device=device if device is not None else adapter.device,
        dtype=dtype,
        batch_size=batch_size,
        adapter=adapter if family == "sd3" else None,
    )


def _text_dim(family: str, adapter: Any, encoders: list[nn.Module]) -> int:
    if family == "sd15":
        return int(encoders[0].config.hidden_size)
    if family == "sdxl":
        return int(encoders[1].config.projection_dim)
    return int(adapter.denoiser.config.pooled_projection_dim)


@torch.no_grad()
def _init_text_projection(linear: nn.Linear, init: str | os.PathLike) -> None:
    shape = (linear.out_features, linear.in_features)
    if init == "identity":
        if shape[0] != shape[1]:
            raise ValueError(f"text_projection_init='identity' needs a square projection, got {shape}")
        linear.weight.copy_(torch.eye(shape[0]))
    elif init == "normal":
        nn.init.normal_(linear.weight, std=0.02)
    else:
        linear.weight.copy_(_text_projection_weight(init, shape))


def load(
    path: str | os.PathLike,
    *,
    adapter: Any = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
) -> LatentRewardScorer:
    """An LRM from a ``save_pretrained`` folder (module docstring). ``adapter``: the default for SD3 calls."""
    import diffusers
    import transformers
    from safetensors.torch import load_file

    root = Path(os.fspath(path))
    meta = _stepaware.read_json(root / META_FILE, "LRM")
    _stepaware.check_format(meta, FORMAT, root / META_FILE)
    config = LRMConfig(**meta["lrm"])
    trunk_cls = getattr(diffusers, meta["trunk"]["class"])
    trunk = _trunk(config.family, trunk_cls.from_config(meta["trunk"]["config"]), config.sd3_num_blocks)
    encoders, tokenizers = [], []
    for entry in meta["text_encoders"]:
        cls = getattr(transformers, entry["class"])
        encoders.append(cls(cls.config_class.from_pretrained(str(root / f"text_encoder{entry['suffix']}"))))
        tokenizers.append(transformers.CLIPTokenizer.from_pretrained(str(root / f"tokenizer{entry['suffix']}")))
    model = LatentRewardModel(config, trunk, encoders, tokenizers)
    _stepaware.strict_load(model, load_file(str(root / WEIGHTS_FILE)), str(root / WEIGHTS_FILE))
    return LatentRewardScorer(
        model.eval(),
        variant=str(meta.get("variant") or root),
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        adapter=adapter,
    )
