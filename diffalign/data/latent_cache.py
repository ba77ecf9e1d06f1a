"""Optional precompute of VAE latents and prompt embeddings into safetensors shards.

Encoding images and prompts dominates the cost of small-LoRA DPO runs on SDXL; caching them once makes
every later epoch (and every hyper-parameter sweep over the same data) skip the VAE and text encoders.

    python -m diffalign.data.latent_cache --config sdxl/dpo_lora data.latent_cache=/data/cache/pap-sdxl
    diffalign run offline_pref --config sdxl/dpo_lora data.latent_cache=/data/cache/pap-sdxl

The cache holds one entry per dataset item, in dataset order, with the same row indices, so a run from the
cache draws the same batches and the same noise as a run from pixels and gives the same loss (latents are the
VAE posterior mean, see ``models.base.Adapter.encode_images``). Augmentation is frozen at its epoch-0 draw
(crop and flip per item), as in the diffusers SDXL scripts' precompute. Rows that were bad are kept as
entries marked skipped, so the sampler's permutation is identical. ``meta.json`` (written last, after an
atomic rename of the whole folder) records what the cache was built from; a mismatch with the run's config
is an error naming the field.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from diffalign.data.collate import GroupBatch
from diffalign.data.records import Group
from diffalign.data.sampler import GroupSampler
from diffalign.fileio import replace_dir
from diffalign.types import SampleInfo


SHARD_SIZE = 256
MATCH_FIELDS = ("family", "model_path", "format", "data_path", "split", "resolution", "crop", "hflip_prob", "seed")


def cache_meta(cfg: Any) -> dict[str, Any]:
    """What a cache built for recipe config ``cfg`` must match."""
    d, m = cfg.data, cfg.model
    return {
        "family": m.family,
        "model_path": m.path,
        "format": d.format,
        "data_path": d.path,
        "split": d.split,
        "resolution": d.resolution,
        "crop": d.crop,
        "hflip_prob": d.hflip_prob,
        "seed": cfg.run.seed,
    }


class LatentCache:
    """Read side: ``len`` = dataset items (skipped rows included), ``iterate`` = batches for a sampler."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(
                f"{self.path} is not a complete latent cache (no meta.json); build it with "
                "`python -m diffalign.data.latent_cache --config <config> data.latent_cache=<dir>`"
            )
        self.meta = json.loads(meta_file.read_text())
        self.entries: list[dict[str, Any]] = json.loads((self.path / "index.json").read_text())
        self._shards: dict[int, dict[str, torch.Tensor]] = {}

    def check(self, cfg: Any) -> None:
        """Raise if this cache was built for a different model, data or augmentation than ``cfg``."""
        expected = cache_meta(cfg)
        bad = [
            f"{k}: cache {self.meta.get(k)!r} != config {expected[k]!r}"
            for k in MATCH_FIELDS
            if self.meta.get(k) != expected[k]
        ]
        if bad:
            raise ValueError(f"latent cache {self.path} does not match the run config: " + "; ".join(bad))

    def __len__(self) -> int:
        return len(self.entries)

    def _shard(self, i: int) -> dict[str, torch.Tensor]:
        if i not in self._shards:
            self._shards = {i: load_file(str(self.path / f"shard-{i:05d}.safetensors"))}
        return self._shards[i]

    def item(self, position: int) -> dict[str, Any] | None:
        entry = self.entries[position]
        if entry.get("skipped"):
            return None
        shard = self._shard(entry["shard"])
        o = entry["offset"]
        tensors = {k: v[o] for k, v in shard.items()}
        return {"entry": entry, "tensors": tensors}

    def iterate(self, sampler: GroupSampler, batch_size: int) -> Iterator[tuple[GroupBatch, list[int], int]]:
        keys = list(sampler)
        for start in range(0, len(keys), batch_size):
            chunk = keys[start : start + batch_size]
            items = [self.item(pos) for pos, _ in chunk]
            epoch = chunk[0][1]
            yield (
                self._collate([it for it in items if it is not None]),
                [it["entry"]["row"] for it in items if it],
                epoch,
            )

    @staticmethod
    def _collate(items: list[dict[str, Any]]) -> GroupBatch:
        if not items:
            return GroupBatch(prompts=[], info=[])
        entries = [it["entry"] for it in items]
        stack = {k: torch.stack([it["tensors"][k] for it in items]) for k in items[0]["tensors"]}
        scores = stack.pop("scores", None)
        return GroupBatch(
            prompts=[e["prompt"] for e in entries],
            info=[SampleInfo(tuple(e["info"][0]), tuple(e["info"][1]), tuple(e["info"][2])) for e in entries],
            latents=stack.pop("latents"),
            scores=scores,
            prompt_embeds={k.removeprefix("cond."): v for k, v in stack.items()},
        )


@torch.no_grad()
def build(cfg: Any, adapter: Any, out_dir: str | Path) -> Path:
    """Encode every item of ``cfg.data`` (epoch-0 augmentation) with ``adapter`` into ``out_dir``."""
    from diffalign.data.loader import record_source
    from diffalign.data.pickapic import PickapicIterable, PickapicSource, load_pickapic
    from diffalign.data.ranked import RankedDataset
    from diffalign.data.transforms import JointTransform, TransformedDataset

    source = record_source(cfg.data)
    records = load_pickapic(source) if isinstance(source, PickapicSource) else RankedDataset(source)
    if isinstance(records, PickapicIterable):
        raise ValueError("a latent cache needs a map-style source: set data.streaming=false")
    transform = JointTransform(resolution=cfg.data.resolution, crop=cfg.data.crop, hflip_prob=cfg.data.hflip_prob)
    groups = TransformedDataset(records, transform, seed=cfg.run.seed)
    entries: list[dict[str, Any]] = []
    pending: list[dict[str, torch.Tensor]] = []
    for position in range(len(groups)):
        group = groups[(position, 0)]
        if not isinstance(group, Group):
            entries.append({"skipped": True, "row": group.index, "reason": group.reason})
            continue
        tensors = {"latents": adapter.encode_images(group.pixels).cpu()}
        cond = adapter.encode_prompts([group.prompt], [group.info])
        tensors.update({f"cond.{k}": v[0].float().cpu() for k, v in cond.items()})
        if group.scores is not None:
            tensors["scores"] = torch.tensor(group.scores, dtype=torch.float32)
        info = [list(group.info.original_size), list(group.info.crop_top_left), list(group.info.target_size)]
        entries.append({"row": group.index, "prompt": group.prompt, "info": info})
        pending.append(tensors)

    def write(tmp: Path) -> None:
        tmp.mkdir()
        _write_shards(tmp, entries, pending)
        (tmp / "index.json").write_text(json.dumps(entries))
        (tmp / "meta.json").write_text(json.dumps({**cache_meta(cfg), "items": len(entries)}, indent=1))

    return replace_dir(out_dir, write)


def _write_shards(root: Path, entries: list[dict[str, Any]], tensors: list[dict[str, torch.Tensor]]) -> None:
    valid = [e for e in entries if not e.get("skipped")]
    for start in range(0, len(valid), SHARD_SIZE):
        shard_id = start // SHARD_SIZE
        chunk = tensors[start : start + SHARD_SIZE]
        for offset, entry in enumerate(valid[start : start + SHARD_SIZE]):
            entry["shard"], entry["offset"] = shard_id, offset
        stacked = {k: torch.stack([t[k] for t in chunk]).contiguous() for k in chunk[0]}
        save_file(stacked, str(root / f"shard-{shard_id:05d}.safetensors"))


def main(argv: list[str] | None = None) -> None:
    from diffalign import config as dconfig
    from diffalign import models

    parser = argparse.ArgumentParser(description="Precompute VAE latents + prompt embeddings for a recipe config.")
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = dconfig.load(args.config, args.overrides)
    if not cfg.data.latent_cache:
        raise SystemExit("set data.latent_cache=<dir> (where the cache is written)")
    m = cfg.model
    adapter = models.load(m.family, m.path, dtype=m.dtype, variant=m.variant, revision=m.revision, vae_path=m.vae_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for module in (adapter.vae, *adapter.text_encoders):  # the denoiser is not needed here: FLUX's would not fit
        module.to(device)  # beside T5-XXL on a 24 GB GPU
    print(build(cfg, adapter, cfg.data.latent_cache))


if __name__ == "__main__":
    main()
