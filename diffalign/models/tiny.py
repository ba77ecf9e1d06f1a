"""Tiny random-init SD1.5, SDXL, SD3, SD3.5-Medium-shaped, FLUX.1-dev-shaped and Wan2.1-T2V-shaped component sets
(and Qwen-Image, Z-Image, FLUX.2, FLUX.1-Kontext and Qwen-Image-Edit shapes), built in-process.

They use the same diffusers/transformers classes as the real checkpoints (``UNet2DConditionModel``,
``SD3Transformer2DModel``, ``FluxTransformer2DModel``, ``AutoencoderKL``, CLIP and T5 encoders), so adapters,
LoRA, pipelines and recipes run on them unchanged. ``sd35`` is loaded as family ``sd3`` (``ADAPTER_FAMILY``). The tokenizers are real: ``assets/tokenizers/clip`` is the CLIP BPE
tokenizer (converted from open_clip's bundled vocabulary) and ``assets/tokenizers/t5`` a small T5 one.

Save a full diffusers folder (then load it like any checkpoint)::

    python -m diffalign.models.tiny sdxl /tmp/tiny-sdxl
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from diffalign import resources


ASSETS = resources.ASSETS
CLIP_TOKENIZER = ASSETS / "tokenizers" / "clip"
T5_TOKENIZER = ASSETS / "tokenizers" / "t5"
FAMILIES = ("sd15", "sdxl", "sd3", "sd35", "flux", "qwenimage", "zimage", "flux2")
ADAPTER_FAMILY = {"sd35": "sd3"}  # tiny builder name -> model family (adapter) that loads it


def adapter_family(name: str) -> str:
    """The ``models`` family that loads tiny builder ``name`` (``sd35`` -> ``sd3``)."""
    return ADAPTER_FAMILY.get(name, name)


def _clip_text(hidden: int, projection: int | None = None, layers: int = 2) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=projection or hidden,
    )
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _clip_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(CLIP_TOKENIZER)


def _vae(latent_channels: int = 4, **extra: Any) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        **extra,
    )


def _unet(cross_attention_dim: int, **extra: Any) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
        **extra,
    )


def _ddpm_scheduler(prediction_type: str = "epsilon") -> Any:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type=prediction_type,
        timestep_spacing="leading",
        steps_offset=1,
    )


def sd15(seed: int = 0, prediction_type: str = "epsilon") -> dict[str, Any]:
    """Components of a ``StableDiffusionPipeline`` (one CLIP text encoder, 4-channel VAE)."""
    torch.manual_seed(seed)
    return {
        "unet": _unet(cross_attention_dim=32),
        "vae": _vae(scaling_factor=0.18215),
        "text_encoder": _clip_text(32),
        "tokenizer": _clip_tokenizer(),
        "scheduler": _ddpm_scheduler(prediction_type),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def sdxl(seed: int = 0, prediction_type: str = "epsilon") -> dict[str, Any]:
    """Components of a ``StableDiffusionXLPipeline`` (two CLIP encoders, pooled embeds, time ids)."""
    torch.manual_seed(seed)
    enc1, enc2 = _clip_text(16), _clip_text(16, projection=16)
    unet = _unet(
        cross_attention_dim=32,  # hidden of encoder 1 + encoder 2, concatenated on features
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=16 + 6 * 4,  # pooled embeds + 6 time ids x 4
        transformer_layers_per_block=1,
    )
    return {
        "unet": unet,
        "vae": _vae(scaling_factor=0.13025, force_upcast=False),
        "text_encoder": enc1,
        "text_encoder_2": enc2,
        "tokenizer": _clip_tokenizer(),
        "tokenizer_2": _clip_tokenizer(),
        "scheduler": _ddpm_scheduler(prediction_type),
        "image_encoder": None,
        "feature_extractor": None,
    }


def _t5() -> Any:
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=AutoTokenizer.from_pretrained(T5_TOKENIZER).vocab_size,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
        )
    )


def sd3(seed: int = 0, **transformer_extra: Any) -> dict[str, Any]:
    """Components of a ``StableDiffusion3Pipeline`` (CLIP-L/G + T5, MMDiT, flow-matching scheduler)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    t5 = _t5()
    shape = {
        "sample_size": 16,
        "patch_size": 2,
        "in_channels": 4,
        "out_channels": 4,
        "num_layers": 2,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,  # T5 width; CLIP hidden states are zero-padded to it
        "caption_projection_dim": 16,
        "pooled_projection_dim": 32,  # pooled CLIP-L (16) + CLIP-G (16)
        "pos_embed_max_size": 32,
    }
    transformer = SD3Transformer2DModel(**{**shape, **transformer_extra})
    return {
        "transformer": transformer,
        "vae": _vae(scaling_factor=1.5035, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
        "text_encoder": _clip_text(16, projection=16),
        "text_encoder_2": _clip_text(16, projection=16),
        "text_encoder_3": t5,
        "tokenizer": _clip_tokenizer(),
        "tokenizer_2": _clip_tokenizer(),
        "tokenizer_3": AutoTokenizer.from_pretrained(T5_TOKENIZER),
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        "image_encoder": None,
        "feature_extractor": None,
    }


def sd35(seed: int = 0) -> dict[str, Any]:
    """SD3.5-Medium-shaped ``StableDiffusion3Pipeline`` components: RMS q/k norm and a dual-attention block.

    SD3.5-Medium has ``qk_norm="rms_norm"`` and ``dual_attention_layers`` 0-12 of 24 (an extra image-only ``attn2``
    per block); here block 0 of 3 is dual, the last is context-pre-only as in every SD3 model.
    """
    return sd3(seed, num_layers=3, qk_norm="rms_norm", dual_attention_layers=(0,))


def flux(seed: int = 0, guidance_embeds: bool = True) -> dict[str, Any]:
    """FLUX.1-dev-shaped ``FluxPipeline`` components (``guidance_embeds=False``: schnell-shaped).

    One double-stream and one single-stream block on 2x2-packed 4-channel latents (in_channels 16), CLIP-L pooled
    (16) + T5 (32) conditioning, the FLUX VAE's shift/scale and FLUX.1-dev's dynamic-shifting scheduler config.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    t5 = _t5()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x 2 x 2 packed
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,  # = sum(axes_dims_rope)
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 width
        pooled_projection_dim=16,  # CLIP-L pooled width
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler_config.json
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return {
        "transformer": transformer,
        "vae": _vae(scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
        "text_encoder": _clip_text(16, projection=None),
        "text_encoder_2": t5,
        "tokenizer": _clip_tokenizer(),
        "tokenizer_2": AutoTokenizer.from_pretrained(T5_TOKENIZER),
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
    }


# ---- Qwen-Image, Z-Image, FLUX.2 (issue 24): LLM text encoders with a byte-level BPE tokenizer ----------------
def byte_tokenizer(chat_template: str | None = None) -> Any:
    """A real ``Qwen2Tokenizer`` over the 256 byte symbols of byte-level BPE (no merges) plus the chat specials
    ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>``: 259 ids, built in-process. ``chat_template``: a
    Jinja template for the pipelines that call ``apply_chat_template``."""
    from transformers import Qwen2Tokenizer

    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    cs, extra = bs[:], 0
    for b in range(256):  # GPT-2's bytes_to_unicode: every byte a printable symbol
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    tok = Qwen2Tokenizer(vocab={chr(c): i for i, c in enumerate(cs)}, merges=[])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


BYTE_VOCAB = 259


def qwenimage(seed: int = 0) -> dict[str, Any]:
    """Qwen-Image-shaped ``QwenImagePipeline`` components: one dual-stream block on 2x2-packed 4-channel latents, a
    Qwen2.5-VL text encoder (16 wide, 2 layers, a one-block vision tower it never uses), the 3-D causal VAE with one
    spatial downsampling and the hub scheduler's dynamic exponential shift (base/max 0.5/0.9, 256..8192 tokens,
    ``shift_terminal`` 0.02)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    text = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": BYTE_VOCAB,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
            "bos_token_id": 256,
            "eos_token_id": 258,
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 16},
    )
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,  # 4 latent channels x 2 x 2 packed
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,  # = sum(axes_dims_rope)
        num_attention_heads=2,
        joint_attention_dim=16,  # the text encoder's width
        axes_dims_rope=(2, 2, 4),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.1, -0.2, 0.05, 0.0],
        latents_std=[1.5, 2.0, 1.2, 0.9],
    )
    scheduler = FlowMatchEulerDiscreteScheduler(  # Qwen/Qwen-Image scheduler_config.json
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": Qwen2_5_VLForConditionalGeneration(text),
        "tokenizer": byte_tokenizer(),
        "scheduler": scheduler,
    }


# Qwen3's chat template reduced to what ZImagePipeline asks of it: user/system turns, the assistant header, and the
# empty think block that enable_thinking=False adds (ZImagePipeline passes True: no think block)
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- if enable_thinking is "
    "defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


def zimage(seed: int = 0) -> dict[str, Any]:
    """Z-Image-shaped ``ZImagePipeline`` components: one main, one noise-refiner and one context-refiner block (16
    wide) on 4-channel latents patchified 2x2 by the transformer, a Qwen3 text encoder (16 wide, 3 layers: the
    pipeline takes the second-to-last) with a Qwen3-style chat template, FLUX.1's VAE scaling, and a static shift
    3.0 scheduler (Z-Image-Turbo's, as reported in Tencent-Hunyuan/UniRL#41; the hub file was not read)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    text = Qwen3Config(
        vocab_size=BYTE_VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        bos_token_id=256,
        eos_token_id=258,
    )
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=16,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=16,  # the text encoder's width
        axes_dims=[2, 2, 4],  # = head dim 8
        axes_lens=[1024, 64, 64],
    )
    return {
        "transformer": transformer,
        "vae": _vae(scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
        "text_encoder": Qwen3Model(text),
        "tokenizer": byte_tokenizer(QWEN3_CHAT_TEMPLATE),
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    }


# Mistral's [SYSTEM_PROMPT]/[INST] turns over content given as text parts (what Flux2Pipeline's format_input builds)
MISTRAL_CHAT_TEMPLATE = (
    "{%- for message in messages %}{%- set text = message['content'] if message['content'] is string else "
    "message['content'] | map(attribute='text') | join('') %}{%- if message['role'] == 'system' %}"
    "{{ '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}{%- else %}{{ '[INST]' + text + '[/INST]' }}{%- endif %}"
    "{%- endfor %}"
)


def flux2(seed: int = 0) -> dict[str, Any]:
    """FLUX.2-dev-shaped ``Flux2Pipeline`` components: one double- and one single-stream block on 2x2-patchified
    4-channel latents (in_channels 16), a Mistral-3 text encoder of 30 layers 8 wide (the pipeline stacks layers 10,
    20 and 30: joint_attention_dim 24) with a Mistral-style chat template, ``AutoencoderKLFlux2`` (BatchNorm
    statistics over the patchified channels) and FLUX.2's dynamic-shifting scheduler."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    text = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": BYTE_VOCAB,
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_hidden_layers": 30,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 4,
            "bos_token_id": 256,
            "eos_token_id": 258,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "head_dim": 4,
            "patch_size": 4,
            "image_size": 16,
        },
        text_config_hidden_size=8,
        spatial_merge_size=1,
    )
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x 2 x 2 patchified
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,  # = sum(axes_dims_rope)
        num_attention_heads=2,
        joint_attention_dim=24,  # 3 stacked text layers x 8
        timestep_guidance_channels=16,
        axes_dims_rope=(2, 2, 2, 2),
    )
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    with torch.no_grad():  # trained statistics, not the init's 0 / 1
        vae.bn.running_mean.uniform_(-0.2, 0.2)
        vae.bn.running_var.uniform_(0.5, 2.0)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": Mistral3ForConditionalGeneration(text),
        "tokenizer": byte_tokenizer(MISTRAL_CHAT_TEMPLATE),
        "scheduler": scheduler,
    }


# ---- video: Wan 2.1 T2V ----------------------------------------------------------------------------------
def wan(seed: int = 0) -> dict[str, Any]:
    """Wan2.1-T2V-shaped ``WanPipeline`` components: a 2-block ``WanTransformer3DModel`` ((1, 2, 2) patches, RMS q/k
    norm across heads, cross-attention norm), a causal 3-D ``AutoencoderKLWan`` (8x spatial, 4x temporal; 4 latent
    channels with their own per-channel mean/std instead of 16), a tiny UMT5 encoder on the shipped T5 tokenizer,
    and the hub checkpoints' ``UniPCMultistepScheduler`` (flow prediction, flow sigmas, ``flow_shift`` 3.0: 480P).

    A 5-frame 16 x 16 video is 2 latent frames of 2 x 2 cells: one token per latent frame.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(T5_TOKENIZER)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=tokenizer.vocab_size,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
        )
    )
    vae = AutoencoderKLWan(
        base_dim=4,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.05, 0.0],
        latents_std=[2.0, 1.5, 2.5, 1.0],
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=32,  # UMT5 width
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


BUILDERS = {"sd15": sd15, "sdxl": sdxl, "sd3": sd3, "sd35": sd35, "flux": flux}
BUILDERS.update(qwenimage=qwenimage, zimage=zimage, flux2=flux2)
PIPELINES = {
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "sd35": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}
PIPELINES.update(qwenimage="QwenImagePipeline", zimage="ZImagePipeline", flux2="Flux2Pipeline")
FAMILIES += ("wan",)
BUILDERS["wan"] = wan
PIPELINES["wan"] = "WanPipeline"


# ---- instruction editing (issue 24): FLUX.1-Kontext, Qwen-Image-Edit --------------------------------------------
def fluxkontext(seed: int = 0) -> dict[str, Any]:
    """FLUX.1-Kontext-dev-shaped ``FluxKontextPipeline`` components: the same classes and shapes as ``flux`` (Kontext is
    a FLUX.1-dev transformer that reads the source image's tokens beside the target's)."""
    return flux(seed, guidance_embeds=True)


VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")


def qwenimageedit(seed: int = 0) -> dict[str, Any]:
    """Qwen-Image-Edit-shaped ``QwenImageEditPipeline`` components: ``qwenimage``'s transformer and text encoder, whose
    one-block vision tower now reads the source image through a real ``Qwen2VLProcessor`` (the byte tokenizer plus
    Qwen's vision specials; images resized to at most 56^2 px, so 4 patches of 14 px -> 1 merged token), and a 3-D VAE
    with three spatial downsamplings (the pipeline conditions on a ~1024^2 source: 64^2 packed tokens here)."""
    from diffusers import AutoencoderKLQwenImage
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    components = qwenimage(seed)
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *VISION_TOKENS]})
    start, pad, end, video = tok.convert_tokens_to_ids(list(VISION_TOKENS))
    torch.manual_seed(seed + 1)
    text_cfg = components["text_encoder"].config.text_config.to_dict()
    text = Qwen2_5_VLConfig(
        text_config={**text_cfg, "vocab_size": len(tok)},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 16},
        image_token_id=pad,
        vision_start_token_id=start,
        vision_end_token_id=end,
        video_token_id=video,
    )
    images = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56)
    processor = Qwen2VLProcessor(image_processor=images, tokenizer=tok, video_processor=Qwen2VLVideoProcessor())
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, False, False],
        latents_mean=[0.1, -0.2, 0.05, 0.0],
        latents_std=[1.5, 2.0, 1.2, 0.9],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(text)
    return {**components, "vae": vae, "text_encoder": text_encoder, "tokenizer": tok, "processor": processor}


FAMILIES += ("fluxkontext", "qwenimageedit")
BUILDERS.update(fluxkontext=fluxkontext, qwenimageedit=qwenimageedit)
PIPELINES.update(fluxkontext="FluxKontextPipeline", qwenimageedit="QwenImageEditPipeline")


def pipeline(family: str, seed: int = 0, **kwargs: Any) -> Any:
    """A stock diffusers pipeline of ``family`` made of tiny random-init components."""
    import diffusers

    if family not in BUILDERS:
        raise KeyError(f"unknown model family {family!r}; choices: {', '.join(FAMILIES)}")
    components = BUILDERS[family](seed, **kwargs)
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # as from_pretrained returns them (T5 has dropout)
    return getattr(diffusers, PIPELINES[family])(**components)


def save(family: str, out_dir: str | Path, seed: int = 0, **kwargs: Any) -> Path:
    """Write a tiny pipeline as a diffusers folder (safetensors), loadable with ``from_pretrained``."""
    out = Path(out_dir)
    pipeline(family, seed, **kwargs).save_pretrained(out, safe_serialization=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random-init diffusers pipeline folder.")
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(save(args.family, args.out_dir, args.seed))


if __name__ == "__main__":
    main()
