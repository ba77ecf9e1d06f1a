"""The toy base model's architecture: an SD1.5-style pipeline small enough to pretrain on a laptop CPU.

Same classes as Stable Diffusion 1.5, so adapters, LoRA, recipes and stock pipelines run on it unchanged:
``UNet2DConditionModel`` (v-prediction, as SD2.x), ``AutoencoderKL`` (32x32 RGB <-> 8x8x4 latents, factor 4),
``CLIPTextModel`` with the real CLIP tokenizer (``assets/tokenizers/clip``, its ``model_max_length`` cut to
``MAX_TOKENS``: toy captions are 9 tokens) and ``DDIMScheduler`` (DDPM's linear noise schedule, see ``scheduler``). ``recipes/pretrain_toy.py`` trains it; ``assets/toy_base`` is the result.
"""

from __future__ import annotations

from typing import Any

from diffalign import resources
from diffalign.toy import world


ASSETS = resources.ASSETS
TOY_BASE = ASSETS / "toy_base"
CLIP_TOKENIZER = ASSETS / "tokenizers" / "clip"
MAX_TOKENS = 16
TEXT_DIM = 32
LATENT_SIZE = 8
LATENT_CHANNELS = 8


def tokenizer() -> Any:
    """The real CLIP BPE tokenizer with ``model_max_length = MAX_TOKENS``."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER)
    tok.model_max_length = MAX_TOKENS
    return tok


def text_encoder(hidden: int = TEXT_DIM, layers: int = 2) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            projection_dim=hidden,
        )
    )


def vae(channels: tuple[int, ...] = (16, 32, 32), latent_channels: int = LATENT_CHANNELS) -> Any:
    """Factor ``2 ** (len(channels) - 1)`` KL autoencoder (the default: 32x32 images <-> 8x8x4 latents)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=world.SIZE,
        mid_block_add_attention=False,
        scaling_factor=1.0,  # set from the trained latents' std by the pretraining script
    )


def unet(
    channels: tuple[int, ...] = (32, 64, 64),
    cross_attention_dim: int = TEXT_DIM,
    latent_channels: int = LATENT_CHANNELS,
) -> Any:
    """Cross-attention at every level; ``channels`` sets the width and depth (one down/up block each)."""
    from diffusers import UNet2DConditionModel

    n = len(channels)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=latent_channels,
        out_channels=latent_channels,
        layers_per_block=1,
        block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def scheduler() -> Any:
    """The cosine noise schedule with v-prediction and a DDIM sampler starting at t = 999 (SD2.x-style).

    Not SD1.5's scaled-linear schedule with epsilon prediction: on 8x8 latents that schedule leaves the image's
    global colour visible in the noise at the first sampling step (signal-to-noise ratio ~0.005 per value, ~0.3
    summed over 64 positions), so a model learns to read colours from the noise instead of the caption. The
    cosine schedule (improved DDPM, arXiv 2102.09672) reaches SNR ~1e-9 at t = 999, and v-prediction keeps the
    x0-prediction well conditioned there. DDIM at eta = 0 is deterministic, so fixed seeds give fixed images.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,  # what StableDiffusionPipeline insists on; unused by "trailing" spacing
        prediction_type="v_prediction",
        timestep_spacing="trailing",
    )


def pipeline(components: dict[str, Any]) -> Any:
    """A stock ``StableDiffusionPipeline`` from ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
