"""Qwen-Image-Edit (instruction editing, 20B): Qwen-Image conditioned on a source image, in the sequence and the text.

Everything but the source image is Qwen-Image (``models.qwenimage``: 3-D VAE with per-channel latent statistics,
2x2 packing, true CFG renormalised per token, no guidance embedding). What the edit model adds, as diffusers 0.42.1's
``QwenImageEditPipeline`` (``diffusers/pipelines/qwenimage/pipeline_qwenimage_edit.py``) does it:

- **Source size**: the source is resized to ``calculate_dimensions(1024 * 1024, aspect)`` (about 1024^2 px, sides
  rounded to 32; :155-162, :624, :661-664) whatever the target size; ``source_resolution`` sets that area's side
  (None: the pipeline's 1024; Flow-GRPO's edit script also keeps 1024^2 for 512^2 targets). diffalign resizes the
  pixel tensor bilinearly with antialiasing (the pipeline resizes the PIL image with its processor's filter).
- **VAE**: the source is encoded to the same normalised latents as the target (``_encode_vae_image``, :406-427,
  ``(z - latents_mean) / latents_std``) and packed 2x2 (:466-469).
- **Sequence**: the model input is ``cat([latents, image_latents], dim=1)`` (:765-767) with
  ``img_shapes = [(1, h/2, w/2), (1, h_src/2, w_src/2)]`` per sample (:712-717, both images, target first); the
  output on the source tokens is dropped (``noise_pred[:, : latents.size(1)]``, :782). ``predict`` does the same,
  so the ELBO terms (noisy target, error on target tokens only) are Qwen-Image's.
- **Text**: the Qwen2.5-VL encoder **sees the source image**: the prompt goes into ``TEMPLATE``
  (``prompt_template_encode``, :212), whose user turn starts with the vision tokens, through the ``processor``
  (``Qwen2VLProcessor``, text + image, padding to the batch's longest, :241-246), and the encoder takes
  ``pixel_values`` / ``image_grid_thw`` (:248-254); its last hidden layer, the valid tokens of each row without the
  first ``DROP`` = 64 (:213, :256-258), as ``models.qwenimage.template_embeddings``. The negative prompt of true CFG
  is encoded with the same image (:689-697). The tiny test model is a real ``Qwen2_5_VLForConditionalGeneration``
  with a one-block vision tower and a real ``Qwen2VLProcessor``, so this path runs in the tests as on the hub model.
- **Schedule** ``mu`` counts the target's tokens only (:719-727).

LoRA targets: Qwen-Image's (Flow-GRPO's Qwen-Image-Edit script uses the same list, yifan123/flow_grpo
``scripts/train_qwenimage_edit.py``:416-434; r 64 / alpha 128).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.models import qwenimage
from diffalign.models.base import Cond
from diffalign.models.editing import SOURCE, EditingMixin
from diffalign.models.flux import pack
from diffalign.types import SampleInfo


TEMPLATE = (  # QwenImageEditPipeline.prompt_template_encode (:212)
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where appropriate."
    "<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n"
)
DROP = 64  # QwenImageEditPipeline.prompt_template_encode_start_idx (:213)
SOURCE_RESOLUTION = 1024  # calculate_dimensions(1024 * 1024, ratio) (:624)


def source_size(height: int, width: int, resolution: int = SOURCE_RESOLUTION) -> tuple[int, int]:
    """(height, width) of the source as the pipeline conditions on it: ``resolution``^2 area at the source's aspect,
    sides rounded to 32 (``calculate_dimensions``)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    w, h, _ = calculate_dimensions(resolution * resolution, width / height)
    return int(h), int(w)


class Adapter(EditingMixin, qwenimage.Adapter):
    """Qwen-Image-Edit adapter. ``processor``: the pipeline's ``Qwen2VLProcessor``; ``source_resolution``: the side of
    the area the source is conditioned at (None: the pipeline's 1024)."""

    family = "qwenimageedit"
    pipeline_class = "QwenImageEditPipeline"
    extra_component_names: ClassVar[tuple[str, ...]] = ("processor",)

    def __init__(self, *, processor: Any = None, source_resolution: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.processor = processor
        self.source_resolution = source_resolution or SOURCE_RESOLUTION

    @classmethod
    def from_components(cls, components: dict[str, Any], **kwargs: Any) -> Any:
        kwargs.setdefault("processor", components.get("processor"))
        return super().from_components(components, **kwargs)

    def encode_prompts(
        self, prompts: Sequence[str], info: Sequence[SampleInfo] | None = None, sources: Tensor | None = None
    ) -> Cond:
        from torchvision.transforms.functional import to_pil_image

        self.require_text_encoders()
        if self.processor is None:
            raise RuntimeError("qwenimageedit needs the pipeline's 'processor' component (Qwen2VLProcessor)")
        sources = self.require_sources(sources, len(prompts))
        size = source_size(*sources.shape[-2:], self.source_resolution)
        resized = F.interpolate(sources.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
        resized = resized.clamp(-1, 1)
        (encoder,) = self.text_encoders
        images = [to_pil_image(((x.cpu() + 1) / 2).clamp(0, 1)) for x in resized]
        inputs = self.processor(
            text=[TEMPLATE.format(p) for p in prompts], images=images, padding=True, return_tensors="pt"
        ).to(encoder.device)
        out = encoder(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"].to(encoder.dtype),
            image_grid_thw=inputs["image_grid_thw"],
            output_hidden_states=True,
        )
        cond = qwenimage.template_embeddings(
            out.hidden_states[-1], inputs["attention_mask"], DROP, self.max_sequence_length
        )
        cond[SOURCE] = self.source_latents(resized, len(prompts))
        return cond

    def image_tokens(self, x_t: Tensor, cond: Cond) -> tuple[Tensor, list[tuple[int, int, int]]]:
        """Target tokens then source tokens; ``img_shapes`` lists both, target first."""
        tokens, shapes = qwenimage.Adapter.image_tokens(self, x_t, cond)  # explicit: bench/memory.py binds it
        source = cond[SOURCE].to(x_t.device, x_t.dtype)
        hs, ws = source.shape[-2:]
        return torch.cat([tokens, pack(source)], dim=1), [*shapes, (1, hs // 2, ws // 2)]

    def extra_pipeline_components(self) -> dict[str, Any]:
        return {"processor": self.processor}


def load(path: str, **kwargs: object) -> Adapter:
    """``Adapter.from_pretrained`` (hub id or local folder; see ``models.base.Adapter.from_pretrained``)."""
    return Adapter.from_pretrained(path, **kwargs)  # type: ignore[return-value,arg-type]
