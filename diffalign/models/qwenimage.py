"""Qwen-Image (T2I, 20B MMDiT): Qwen2.5-VL text conditioning, ``QwenImageTransformer2DModel`` on 2x2-packed latents.

The only code in diffalign that knows Qwen-Image. What it does, as diffusers 0.42's ``QwenImagePipeline``
(``pipelines/qwenimage/pipeline_qwenimage.py``) does:

- **VAE** ``AutoencoderKLQwenImage`` is a causal 3-D VAE: images are one-frame videos (N, 3, 1, H, W), latents
  (N, z_dim, 1, H/8, W/8) normalised per channel with the config's ``latents_mean`` / ``latents_std``
  (``(z - mean) / std``; the pipeline decodes with ``z / (1/std) + mean``). diffalign keeps them 4-D,
  (N, z_dim, h, w): ``z_dim`` (16) is the latent channel count, the one truth; ``2 ** len(temperal_downsample)``
  the pixels per latent cell.
- **Packing** as FLUX.1 (``models.flux.pack``: (N, C, h, w) -> (N, h/2 * w/2, 4C)); the transformer takes
  ``img_shapes = [(1, h/2, w/2)]`` per sample and builds its own MSRoPE positions from it (centred image indices,
  text positions after them), so no position ids are passed.
- **Text**: each prompt in the chat template ``TEMPLATE`` (system "Describe the image ..." + user prompt + assistant
  header), tokenised with padding to the batch's longest (max 1024 + 34 tokens), Qwen2.5-VL's **last** hidden layer,
  the valid tokens of each row kept by the attention mask, the first ``DROP`` = 34 (template) tokens dropped, then
  truncated to ``max_sequence_length`` (pipeline default 512). ``cond`` stores them zero-padded to
  ``max_sequence_length`` with a 0/1 ``encoder_hidden_states_mask`` (fixed shapes: batches concatenate and the
  latent cache stacks them); ``predict`` trims the columns that are padding in every row, so the transformer sees
  the pipeline's batch-longest padding, and passes no mask when every token is valid (as the pipeline).
- **Timestep** ``sigma`` (the pipeline passes ``t / 1000``); ``guidance_embeds`` is false: no guidance input.
- **Guidance** is true CFG with two passes and a negative prompt (``" "`` when there is none, as the pipeline's
  docstring and Flow-GRPO's ``train_qwenimage.py`` use), and the guided velocity is **renormalised per token** to
  the conditional velocity's norm over the 4C packed channels (``combine_guidance``). Pipeline default
  ``true_cfg_scale`` 4.0 (= diffalign's ``guidance_scale``), 50 steps, 1024 px.
- **Schedule**: the hub scheduler is dynamic (``mu = calculate_shift(tokens)``, base/max shift 0.5/0.9 over 256..8192
  tokens, exponential, ``shift_terminal`` 0.02). Training uses one fixed shift (``models.base.process_for``:
  the unshifted table diffusers' LoRA scripts index, or ``model.flow_shift: resolution`` = ``exp(mu)``); the
  samplers step on diffalign's fixed-shift grids, which omit the pipeline's ``shift_terminal`` stretch of the last
  sigmas.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffalign.models.base import Adapter as _Base
from diffalign.models.base import Cond
from diffalign.models.flux import pack, unpack
from diffalign.types import SampleInfo


TEMPLATE = (  # QwenImagePipeline.prompt_template_encode
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
DROP = 34  # QwenImagePipeline.prompt_template_encode_start_idx: the template's tokens before the prompt
TOKENIZER_MAX_LENGTH = 1024  # QwenImagePipeline.tokenizer_max_length (and max_sequence_length's hard limit)
# Flow-GRPO's Qwen-Image LoRA (r=64, alpha=128): both streams' attention and MLPs
# [yifan123/flow_grpo@9745241 scripts/train_qwenimage.py:408-429]; diffusers' DreamBooth script trains
# to_k/to_q/to_v/to_out.0 only [huggingface/diffusers examples/dreambooth/train_dreambooth_lora_qwen_image.py:1282-1292]
LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)


def trim_text(hidden: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
    """Drop the trailing columns that are padding in every row (at least one column stays); the mask becomes None
    when every remaining token is valid, as ``QwenImagePipeline.encode_prompt`` returns it."""
    length = max(int(mask.sum(dim=1).max()), 1)
    hidden, mask = hidden[:, :length], mask[:, :length]
    return hidden, (None if bool(mask.all()) else mask)


def template_embeddings(hidden: Tensor, attention_mask: Tensor, drop: int, max_length: int) -> Cond:
    """The last hidden layer (B, L, D) -> ``cond``: each row's valid tokens (by ``attention_mask``) without the first
    ``drop`` template tokens, truncated and zero-padded to ``max_length``, with a 0/1 mask (``_extract_masked_hidden``
    then ``[drop:]`` of the Qwen-Image pipelines)."""
    n = hidden.shape[0]
    embeds = hidden.new_zeros(n, max_length, hidden.shape[-1])
    mask = torch.zeros(n, max_length, dtype=torch.long, device=hidden.device)
    for i in range(n):
        valid = hidden[i][attention_mask[i].bool()][drop:][:max_length]
        embeds[i, : len(valid)] = valid
        mask[i, : len(valid)] = 1
    return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}


class Adapter(_Base):
    """Qwen-Image adapter. ``max_sequence_length``: prompt tokens kept after the template (pipeline default 512)."""

    family = "qwenimage"
    pipeline_class = "QwenImagePipeline"
    denoiser_name = "transformer"
    shard_blocks = ("QwenImageTransformerBlock",)  # FSDP2 wrap units (training.sharding)
    tokenizer_classes: ClassVar[dict[str, str]] = {"tokenizer": "Qwen2Tokenizer"}
    negative_prompt: ClassVar[str] = " "

    def __init__(self, *, max_sequence_length: int = 512, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 1 <= max_sequence_length <= TOKENIZER_MAX_LENGTH:
            raise ValueError(f"max_sequence_length={max_sequence_length} must be in [1, {TOKENIZER_MAX_LENGTH}]")
        self.max_sequence_length = max_sequence_length

    @classmethod
    def text_encoder_names(cls) -> list[str]:
        return ["text_encoder"]  # Qwen2.5-VL-7B-Instruct

    @classmethod
    def lora_text_encoder_names(cls) -> list[str]:
        return []  # QwenImagePipeline saves/loads transformer LoRA only

    def default_lora_targets(self) -> tuple[str, ...]:
        return LORA_TARGETS

    # ---- geometry and VAE ---------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    @property
    def vae_scale_factor(self) -> int:
        """``2 ** len(temperal_downsample)`` as ``QwenImagePipeline`` (8 for the real VAE)."""
        return 2 ** len(self.vae.config.temperal_downsample)

    def latent_shape(self, height: int, width: int | None = None) -> tuple[int, int, int]:
        """The VAE's latents (N, z_dim, h, w); their sides must be even (2x2-packed tokens)."""
        shape = super().latent_shape(height, width)
        if shape[1] % 2 or shape[2] % 2:
            f = self.vae_scale_factor
            raise ValueError(
                f"qwenimage: image size must be a multiple of {2 * f} px (2x2-packed latents); got {shape}"
            )
        return shape

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean, device=like.device, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=like.device, dtype=torch.float32).view(1, -1, 1, 1)
        return mean, std

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        """Pixels (N, 3, H, W) in [-1, 1] -> normalised latents (N, z_dim, H/f, W/f) fp32 (posterior mean)."""
        x = pixels.to(self.vae.device, torch.float32)[:, :, None]
        z = self.vae.encode(x).latent_dist.mean[:, :, 0]
        mean, std = self._stats(z)
        return (z - mean) / std

    def decode_pixels(self, latents: Tensor) -> Tensor:
        """Normalised latents (N, z_dim, h, w) -> the decoder's output (N, 3, H, W), differentiable."""
        z = latents.to(self.vae.device, torch.float32)
        mean, std = self._stats(z)
        return self.vae.decode((z * std + mean)[:, :, None]).sample[:, :, 0]

    # ---- conditioning and forward -------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str], info: Sequence[SampleInfo] | None = None) -> Cond:
        self.require_text_encoders()
        (encoder,), (tokenizer,) = self.text_encoders, self.tokenizers
        tokens = tokenizer(
            [TEMPLATE.format(p) for p in prompts],
            max_length=TOKENIZER_MAX_LENGTH + DROP,
            padding=True,
            truncation=True,
            return_tensors="pt",
        ).to(encoder.device)
        out = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True)
        return template_embeddings(out.hidden_states[-1], tokens.attention_mask, DROP, self.max_sequence_length)

    def predict(self, x_t: Tensor, timesteps: Tensor, cond: Cond) -> Tensor:
        """Velocity for latents (N, C, h, w) at model-unit ``timesteps`` (N,) = sigma * T."""
        n, _, h, w = x_t.shape
        dtype, device = self.dtype, x_t.device
        hidden, mask = trim_text(cond["encoder_hidden_states"].to(device, dtype), cond["encoder_hidden_states_mask"])
        sigma = torch.as_tensor(timesteps, device=device).float().expand(n) / self.process.num_train_timesteps
        tokens, shapes = self.image_tokens(x_t.to(dtype), cond)
        out = self.denoiser(
            hidden_states=tokens,
            timestep=sigma.to(dtype),
            encoder_hidden_states=hidden,
            encoder_hidden_states_mask=None if mask is None else mask.to(device),
            img_shapes=[shapes] * n,
            return_dict=False,
        )[0]
        return unpack(out[:, : (h // 2) * (w // 2)], h, w)  # editing: drop the source tokens' output

    def image_tokens(self, x_t: Tensor, cond: Cond) -> tuple[Tensor, list[tuple[int, int, int]]]:
        """The transformer's image sequence (N, h/2 * w/2, 4C) and one sample's ``img_shapes`` entry
        ``[(1, h/2, w/2)]``; ``models.qwenimageedit`` appends the source image's tokens and shape."""
        h, w = x_t.shape[-2:]
        return pack(x_t), [(1, h // 2, w // 2)]

    def combine_guidance(self, uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
        """``QwenImagePipeline``'s true CFG: ``u + w (c - u)``, rescaled per packed token to ``||c||`` (norms over
        the token's 4C channels)."""
        h, w = cond.shape[-2:]
        c, u = pack(cond), pack(uncond)
        guided = u + scale * (c - u)
        guided = guided * (c.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))
        return unpack(guided, h, w)

    # ---- pipelines ----------------------------------------------------------------------------------
    def pipeline_guidance(self, scale: float, negative_prompt: list[str] | None, batch: int) -> dict[str, Any]:
        """``QwenImagePipeline`` runs true CFG only with ``true_cfg_scale > 1`` AND a negative prompt (``" "`` here
        when none is given); its ``guidance_scale`` is for guidance-distilled checkpoints and ignored."""
        if scale <= 1:
            return {"true_cfg_scale": 1.0}
        return {"true_cfg_scale": scale, "negative_prompt": negative_prompt or [self.negative_prompt] * batch}

    def unpipe_latents(self, latents: Tensor, height: int, width: int) -> Tensor:
        """``QwenImagePipeline(output_type="latent")`` returns packed tokens; unpack them for the pixel size."""
        if latents.ndim == 4:
            return latents
        return unpack(latents, height // self.vae_scale_factor, width // self.vae_scale_factor)


def load(path: str, **kwargs: object) -> Adapter:
    """``Adapter.from_pretrained`` (hub id or local folder; see ``models.base.Adapter.from_pretrained``)."""
    return Adapter.from_pretrained(path, **kwargs)  # type: ignore[return-value,arg-type]
