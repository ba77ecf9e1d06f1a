"""DCPO: Saeidi et al. 2025, Dual Caption Preference Optimization for Diffusion Models, https://arxiv.org/abs/2502.06023.

Diffusion-DPO where each image of a pair is conditioned on its OWN caption (Pick-Double Caption: the loser's
caption is a perturbed or regenerated one), so the winner's and loser's errors are ``eps(x_w | c_w)`` and
``eps(x_l | c_l)``; noise and timestep are still shared by the pair. The loss is ``dpo.py``'s, unchanged::

    loss = mean_b( -log sigmoid( -0.5 * beta * ((policy_w - policy_l) - (ref_w - ref_l)) ) )

The per-image conditioning is data, not loss: ``data.caption_columns: [caption_0, caption_1]`` names the caption
column of ``jpg_0`` and of ``jpg_1``; the pair loader swaps captions with images when ``label_0 == 0`` and the pair
engine encodes one caption per image (``terms.offline.group_errors(image_prompts=...)``). This module insists on it
(``PER_IMAGE_CAPTIONS``), so a config that forgets the columns fails validation instead of silently being DPO.

Followed: sahsaeedi/DCPO-T2I@62335bb ``src/dcpo_trainer.py``: L660-676 ``caption_0`` / ``caption_1`` tokenised per
image; L710-717 images and token tuples reversed together when ``label_0 == 0``; L989-994 both halves encoded by
the text encoder, one caption per image; L947-949 noise and timestep shared by the pair; L1034-1037 the
``-0.5 * beta_dpo`` inside and ``-logsigmoid``. Defaults: ``src/run.sh`` beta 500 (SD2.1, batch 1 x 128, 2000
steps, warmup 500, lr 1e-8 x scale_lr). The authors' SDXL path encodes the shared caption only; here every family
encodes per image.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffalign.losses import dpo
from diffalign.losses._common import check_finite_config, check_positive_beta
from diffalign.types import LossOutput, PairTerms


TERMS = "pair"
REQUIRES: frozenset[str] = frozenset({"ref"})
PER_IMAGE_CAPTIONS = True  # needs data.caption_columns (config validation)


@dataclass(frozen=True, kw_only=True)
class Config:
    """``beta``: DPO strength in the -0.5 * beta convention (authors' SD2.1 run: 500)."""

    beta: float = 500.0

    def __post_init__(self) -> None:
        check_finite_config("dcpo", beta=self.beta)
        check_positive_beta("dcpo", self.beta)


def loss(terms: PairTerms, cfg: Config) -> LossOutput:
    """DPO on pairs whose errors were computed with per-image captions; needs ``ref_w`` / ``ref_l``."""
    return dpo.loss(terms, dpo.Config(beta=cfg.beta))
