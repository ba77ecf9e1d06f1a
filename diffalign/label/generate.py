"""Sampling the candidate images: every generator loaded once, generators with the same base sharing its weights.

A base model is loaded with ``diffalign.models.load`` and sampled through the stock diffusers pipeline that shares
its modules (``adapter.pipeline()``), with the latents decoded by the adapter's fp32 VAE, the same path as
``diffalign.eval.runner.generate``. LoRA folders are loaded with ``pipe.load_lora_weights(dir, adapter_name=...)``
into their base's pipeline; before each call the generator's LoRA is activated (``set_adapters``) or all LoRAs are
switched off (``disable_lora``) for the plain base, so a LoRA generator and its base cost one copy of the weights.
Each image gets its own CPU ``torch.Generator`` seeded from the run's seed rule, so an image does not depend on the
batch it was sampled in or on the device's RNG.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from diffalign.eval.runner import to_pil
from diffalign.label.config import Generator, LabelError, SamplingProtocol


@dataclass
class _Base:
    adapter: Any
    pipe: Any
    loras: dict[str, str] = field(default_factory=dict)  # generator name -> peft adapter name


class GeneratorPool:
    """The run's generators, loaded on ``device``; ``sample(g, prompts, seeds)`` returns PIL images."""

    def __init__(
        self,
        generators: Sequence[Generator],
        protocols: Sequence[SamplingProtocol],
        *,
        device: str = "cpu",
        batch_size: int = 8,
    ) -> None:
        from diffalign.eval.runner import make_scheduler

        self.generators = list(generators)
        self.protocols = list(protocols)
        self.device = device
        self.batch_size = batch_size
        self._bases: dict[tuple, _Base] = {}
        self.schedulers = []
        for g in self.generators:  # before any weights are loaded
            if g.lora is not None and not os.path.isdir(os.path.expanduser(g.lora)):
                raise LabelError(f"generator {g.name!r}: LoRA folder {g.lora} does not exist")
        for index, g in enumerate(self.generators):
            base = self._base(g)
            if g.lora is not None:
                lora_dir = os.path.expanduser(g.lora)
                adapter_name = f"label_g{index}"
                with warnings.catch_warnings():  # several adapters on one model is the point here
                    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                    base.pipe.load_lora_weights(lora_dir, adapter_name=adapter_name)
                base.loras[g.name] = adapter_name
            try:
                self.schedulers.append(make_scheduler(self.protocols[index].scheduler, base.adapter.scheduler))
            except ValueError as e:
                raise LabelError(f"generator {g.name!r}: {e}") from e

    def _base(self, g: Generator) -> _Base:
        from diffalign import models

        key = g.base_key()
        if key not in self._bases:
            adapter = models.load(g.family, g.path, dtype=g.dtype, vae_path=g.vae).to(self.device)
            self._bases[key] = _Base(adapter, adapter.pipeline())
        return self._bases[key]

    def size(self, index: int) -> tuple[int, int]:
        """(height, width) of generator ``index``'s images."""
        base, protocol = self._bases[self.generators[index].base_key()], self.protocols[index]
        default = base.adapter.default_image_size(base.pipe)
        return protocol.height or default, protocol.width or default

    def _activate(self, index: int) -> _Base:
        g = self.generators[index]
        base = self._bases[g.base_key()]
        if base.loras:
            if g.lora is None:
                base.pipe.disable_lora()
            else:
                base.pipe.enable_lora()
                base.pipe.set_adapters([base.loras[g.name]], adapter_weights=[g.lora_scale])
        base.pipe.scheduler = self.schedulers[index]
        return base

    @torch.no_grad()
    def sample(self, index: int, prompts: Sequence[str], seeds: Sequence[int]) -> list[Any]:
        """One image per (prompt, seed) from generator ``index``, as RGB PIL images, in order."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        base, protocol = self._activate(index), self.protocols[index]
        height, width = self.size(index)
        images: list[Any] = []
        for lo in range(0, len(prompts), self.batch_size):
            chunk_prompts = list(prompts[lo : lo + self.batch_size])
            chunk_seeds = seeds[lo : lo + self.batch_size]
            latents = base.pipe(
                prompt=chunk_prompts,
                num_inference_steps=protocol.steps,
                **base.adapter.pipeline_guidance(
                    protocol.guidance_scale,
                    [protocol.negative_prompt] * len(chunk_prompts) if protocol.negative_prompt else None,
                    len(chunk_prompts),
                ),
                height=height,
                width=width,
                generator=[torch.Generator().manual_seed(int(s)) for s in chunk_seeds],
                output_type="latent",
            ).images
            images.extend(to_pil(base.adapter.decode_latents(base.adapter.unpipe_latents(latents, height, width))))
        return images

    def describe(self, index: int) -> dict[str, Any]:
        """The resolved sampling settings of generator ``index`` (scheduler class, size), for the run record."""
        height, width = self.size(index)
        return {"scheduler": type(self.schedulers[index]).__name__, "height": height, "width": width}
