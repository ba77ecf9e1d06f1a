"""Score a folder of images, or generate images under a fixed protocol and score them; compare two runs.

A run directory holds ``scores.jsonl`` (one row per image: ``path`` relative to the run's image root, ``prompt``,
``prompt_id``, ``seed`` and one value per scorer), ``summary.json`` (protocol, scorer variants, means and 95% CIs)
and ``report.html``. Images are decoded once per batch and the same decoded batch goes to every scorer; each scorer
batches internally (its own ``batch_size``).

Where the prompt of a folder image comes from (``folder_items``):

* ``prompts=None``: a sidecar text file beside each image (``cat.png`` + ``cat.txt``);
* a mapping file (JSONL / CSV / TSV / JSON / parquet) whose rows have an image column (``file_name``, ``file``,
  ``image``, ``path``, ``image_path`` or ``filename``, relative to the folder) and a prompt column; a ``seed`` and a
  ``prompt_id`` column are used when present (a run's own ``scores.jsonl`` is such a mapping);
* any prompt set without an image column (see ``prompts.load_prompts``): the first number in the image's path
  relative to the folder is its prompt's position in the set (``00012_3.png``, or GenEval's
  ``00012/samples/0003.png`` -> prompt 12).

Torch and diffusers are imported inside the functions that use them, so ``diffalign --help`` stays fast.

Generation (``generate``) loads the base model through ``diffalign.models.load`` (family + hub id or folder), takes
the stock diffusers pipeline that shares its modules, loads an optional LoRA folder with ``load_lora_weights``, and
samples ``images_per_prompt`` images per prompt. Image ``k`` of prompt ``i`` uses a CPU generator seeded with
``seed + i * images_per_prompt + k``, so an image does not depend on the batch size or the device's RNG. Latents are
decoded by the adapter's fp32 VAE. Everything that defines the protocol is written to ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from diffalign import registry, resources
from diffalign.eval import prompts as prompt_sets
from diffalign.eval import stats
from diffalign.eval.prompts import EvalError, PromptRecord


if TYPE_CHECKING:
    import torch


SCORES_FILE = "scores.jsonl"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
COMPARE_FILE = "compare.json"
RESERVED = ("path", "prompt", "prompt_id", "seed")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FILE_KEYS = ("file_name", "file", "image", "path", "image_path", "filename")
SCHEDULER_ALIASES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
}
CI_METHOD = f"95% percentile cluster bootstrap over prompts ({stats.N_BOOT} resamples, seed 0)"
WIN_METHOD = "per-prompt mean of A > B; ties count half; 95% Wilson score interval"


@dataclass(frozen=True)
class ImageItem:
    """One image to score: ``path`` relative to the image root (POSIX), its prompt, and its seed if known."""

    path: str
    prompt: str
    prompt_id: str
    seed: int | None = None


@dataclass(frozen=True, kw_only=True)
class GenerationProtocol:
    """Everything that decides the generated images. ``scheduler=None`` keeps the checkpoint's own scheduler;
    ``height``/``width`` None use the model's default size. ``dtype`` is the denoiser/text-encoder dtype."""

    family: str
    model: str
    lora: str | None = None
    vae: str | None = None
    scheduler: str | None = None
    steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0
    images_per_prompt: int = 4
    height: int | None = None
    width: int | None = None
    negative_prompt: str = ""
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        from diffalign.models import FAMILIES, VIDEO_FAMILIES

        if self.family not in FAMILIES:
            raise EvalError(f"unknown model family {self.family!r}; {registry.suggest(self.family, FAMILIES)}")
        if self.family in VIDEO_FAMILIES:
            raise EvalError(
                f"--family {self.family}: eval generates and scores images; video families are not supported"
            )
        for name in ("steps", "images_per_prompt"):
            if getattr(self, name) < 1:
                raise EvalError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise EvalError(f"{name} must be a positive multiple of 8, got {value}")

    def image_seed(self, prompt_index: int, k: int) -> int:
        return self.seed + prompt_index * self.images_per_prompt + k


# ---- scorers ----------------------------------------------------------------------------------------------


def parse_scorer_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"pickscore,path=/models/ps,batch_size=8"`` -> ``("pickscore", {"path": "/models/ps", "batch_size": 8})``.

    Values are read as YAML scalars (``8`` int, ``true`` bool, ``1e-3`` float). The name is a scorer module in
    ``diffalign.scorers`` or ``package.module:factory`` for a scorer of your own.
    """
    from diffalign.config import ConfigError, parse_override

    name, *parts = [p.strip() for p in spec.split(",")]
    if not name:
        raise EvalError(f"scorer spec {spec!r} has no name")
    kwargs = {}
    for part in parts:
        try:
            key, value = parse_override(part)
        except ConfigError as e:
            raise EvalError(f"scorer spec {spec!r}: argument {part!r} must look like key=value") from e
        kwargs[key] = value
    return name, kwargs


def load_scorer(
    spec: str, *, device: str = "cpu", dtype: str | torch.dtype = "fp32", batch_size: int | None = None
) -> Any:
    """A scorer from a spec (see ``parse_scorer_spec``); ``device``/``dtype``/``batch_size`` unless the spec sets them."""
    from diffalign import scorers
    from diffalign.models.base import resolve_dtype

    name, kwargs = parse_scorer_spec(spec)
    kwargs.setdefault("device", device)
    kwargs["dtype"] = resolve_dtype(kwargs.get("dtype", dtype))
    if batch_size is not None:
        kwargs.setdefault("batch_size", batch_size)
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory: Callable[..., Any] = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise EvalError(f"scorer {name!r}: cannot import {attr!r} from {module_name!r} ({e})") from e
        return factory(**kwargs)
    if name not in scorers.available():
        raise EvalError(f"unknown scorer {name!r}; {registry.suggest(name, scorers.available())}")
    try:
        scorers.check_options(name, kwargs)
    except KeyError as e:
        raise EvalError(f"scorer spec {spec!r}: {e.args[0]}") from None
    try:
        return scorers.load(name, **kwargs)
    except OSError as e:  # missing files, hub unreachable or offline
        raise EvalError(
            f"could not load scorer {name!r} ({', '.join(f'{k}={v}' for k, v in kwargs.items())}): {e}"
        ) from e


def resolve_scorers(specs: Sequence[Any], **load_kwargs: Any) -> dict[str, Any]:
    """Scorer objects keyed by column name: ``scorer.name``, or ``name:variant`` where two share a name.

    ``specs`` mixes spec strings (loaded with ``load_scorer(spec, **load_kwargs)``) and ready scorer objects
    (anything callable as ``scorer(images, prompts) -> (B,)`` with ``name`` and ``variant`` attributes).
    """
    if not specs:
        raise EvalError("at least one scorer is needed")
    objects = [load_scorer(s, **load_kwargs) if isinstance(s, str) else s for s in specs]
    for obj in objects:
        if not callable(obj) or not isinstance(getattr(obj, "name", None), str) or not hasattr(obj, "variant"):
            raise EvalError(f"{obj!r} is not a scorer: it needs a name, a variant and __call__(images, prompts)")
    names = [o.name for o in objects]
    keys = [n if names.count(n) == 1 else f"{n}:{o.variant}" for n, o in zip(names, objects, strict=True)]
    for key in keys:
        if keys.count(key) > 1:
            raise EvalError(f"two scorers would both write column {key!r}; give them different variants")
        if key in RESERVED:
            raise EvalError(f"a scorer may not be called {key!r}: that scores.jsonl column is reserved")
    return dict(zip(keys, objects, strict=True))


# ---- folders ----------------------------------------------------------------------------------------------


def find_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursive), as sorted POSIX paths relative to it."""
    if not folder.is_dir():
        raise EvalError(f"image folder {folder} does not exist")
    found = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        raise EvalError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return sorted(found)


def _ids_by_first_seen(prompts: Sequence[str]) -> dict[str, str]:
    ids: dict[str, str] = {}
    for p in prompts:
        ids.setdefault(p, f"{len(ids):05d}")
    return ids


def _norm(path: str) -> str:
    return PurePosixPath(str(path).replace("\\", "/")).as_posix().removeprefix("./")


def _too_many(kind: str, paths: Sequence[str], where: str) -> EvalError:
    shown = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
    return EvalError(" ".join(part for part in (str(len(paths)), kind, where) if part) + f": {shown}")


def folder_items(folder: str | Path, prompts: str | Path | None = None, *, key: str | None = None) -> list[ImageItem]:
    """The images under ``folder`` with their prompts (sidecar .txt, mapping file, or prompt set by index)."""
    folder = Path(folder)
    images = find_images(folder)
    if prompts is None:
        missing = [p for p in images if not (folder / p).with_suffix(".txt").is_file()]
        if missing:
            raise _too_many("images have no sidecar .txt prompt (or pass a prompts file)", missing, f"in {folder}")
        texts = [(folder / p).with_suffix(".txt").read_text(encoding="utf-8-sig").strip() for p in images]
        ids = _ids_by_first_seen(texts)
        return [ImageItem(p, t, ids[t]) for p, t in zip(images, texts, strict=True)]
    source = prompt_sets.resolve_source(prompts)
    rows = prompt_sets.read_rows(source) if source is not None and source.is_file() else []
    file_col = next((k for k in FILE_KEYS if rows and isinstance(rows[0], dict) and k in rows[0]), None)
    if file_col is not None:
        return _mapped_items(images, rows, file_col, str(source), key)
    return _indexed_items(images, prompt_sets.load_prompts(prompts, key=key), str(prompts))


def _mapped_items(images: list[str], rows: list[Any], file_col: str, where: str, key: str | None) -> list[ImageItem]:
    records = prompt_sets.records_from_rows(rows, where, key=key)
    by_path: dict[str, tuple[dict[str, Any], PromptRecord]] = {}
    for i, (row, rec) in enumerate(zip(rows, records, strict=True)):
        if not isinstance(row, dict) or file_col not in row:
            raise EvalError(f"{where} row {i}: no {file_col!r} key")
        by_path[_norm(row[file_col])] = (row, rec)
    unmapped = [p for p in images if p not in by_path]
    if unmapped:
        raise _too_many("images have no row in", unmapped, where)
    absent = sorted(set(by_path) - set(images))
    if absent:
        raise _too_many("rows name images that do not exist, in", absent, where)
    ids = _ids_by_first_seen([rec.prompt for _, rec in by_path.values()])
    items = []
    for p in images:
        row, rec = by_path[p]
        seed = row.get("seed")
        pid = row.get("prompt_id", row.get("id", ids[rec.prompt]))
        items.append(ImageItem(p, rec.prompt, str(pid), None if seed is None else int(seed)))
    return items


def _indexed_items(images: list[str], records: list[PromptRecord], where: str) -> list[ImageItem]:
    items = []
    for p in images:
        match = re.search(r"\d+", p)
        if match is None:
            raise EvalError(f"image {p!r} has no number in its path to pick its prompt from {where}")
        idx = int(match.group())
        if idx >= len(records):
            raise EvalError(f"image {p!r} names prompt {idx}, but {where} has {len(records)} prompts")
        items.append(ImageItem(p, records[idx].prompt, records[idx].prompt_id))
    return items


# ---- scoring ----------------------------------------------------------------------------------------------


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for lo in range(0, len(items), size):
        yield items[lo : lo + size]


def _open_rgb(path: Path) -> Any:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # PIL's errors for broken files
        raise EvalError(f"cannot read image {path}: {e}") from e


def score_items(
    items: Sequence[ImageItem],
    scorers: Mapping[str, Any],
    root: str | Path,
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One ``scores.jsonl`` row per item: each batch is decoded once and handed to every scorer."""
    from tqdm.auto import tqdm

    root = Path(root)
    rows = []
    with tqdm(total=len(items), desc="scoring", unit="img", disable=not progress) as bar:
        for chunk in _batches(items, batch_size):
            images = [_open_rgb(root / it.path) for it in chunk]
            texts = [it.prompt for it in chunk]
            values = {key: _checked(scorer(images, texts), key, chunk) for key, scorer in scorers.items()}
            for i, it in enumerate(chunk):
                row = {"path": it.path, "prompt": it.prompt, "prompt_id": it.prompt_id, "seed": it.seed}
                rows.append(row | {key: v[i] for key, v in values.items()})
            bar.update(len(chunk))
    return rows


def _checked(scores: Any, key: str, chunk: Sequence[ImageItem]) -> list[float]:
    import torch

    values = torch.as_tensor(scores).detach().float().cpu().reshape(-1)
    if values.numel() != len(chunk):
        raise EvalError(f"scorer {key!r} returned {values.numel()} scores for {len(chunk)} images")
    bad = [it.path for it, v in zip(chunk, values.tolist(), strict=True) if not math.isfinite(v)]
    if bad:
        raise _too_many(f"non-finite {key} scores for images", bad, "")
    return values.tolist()


def summarize(rows: Sequence[Mapping[str, Any]], scorers: Mapping[str, Any]) -> dict[str, Any]:
    """Per scorer: mean, 95% CI over prompts, std, counts; plus the scorer names and variants."""
    keys = list(scorers)
    prompts = [r["prompt"] for r in rows]
    return {
        "n_images": len(rows),
        "n_prompts": len(set(prompts)),
        "scorers": {k: {"name": s.name, "variant": str(s.variant)} for k, s in scorers.items()},
        "ci_method": CI_METHOD,
        "stats": {k: stats.mean_ci(stats.group_by_prompt(prompts, [r[k] for r in rows])).to_dict() for k in keys},
    }


def _prepare_out(out_dir: Path, overwrite: bool) -> None:
    """Refuse to clobber results, and make sure the folder can be written BEFORE any image is generated or scored."""
    if (out_dir / SCORES_FILE).exists() and not overwrite:
        raise EvalError(f"{out_dir / SCORES_FILE} exists; pass overwrite=True (--overwrite) or another output folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise EvalError(f"output folder {out_dir} is not writable: {e.strerror or e}") from e


def write_run(out_dir: Path, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> None:
    with open(out_dir / SCORES_FILE, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _finish(
    out_dir: Path, rows: list[dict[str, Any]], summary: dict[str, Any], report: bool, thumbs: int
) -> dict[str, Any]:
    from diffalign.eval import report as html_report

    write_run(out_dir, rows, summary)
    if report:
        html_report.write_run_report(out_dir / REPORT_FILE, rows, summary, thumbs=thumbs)
    return summary


def _header(kind: str, image_root: Path) -> dict[str, Any]:
    import diffalign

    return {
        "kind": kind,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "diffalign_version": getattr(diffalign, "__version__", "unknown"),
        "image_root": str(image_root.resolve()),
    }


def score_folder(
    folder: str | Path,
    scorers: Sequence[Any] | Mapping[str, Any],
    out_dir: str | Path,
    *,
    prompts: str | Path | None = None,
    prompt_key: str | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    dtype: str = "fp32",
    overwrite: bool = False,
    report: bool = True,
    thumbs: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every image under ``folder``; write scores.jsonl, summary.json and report.html to ``out_dir``.

    ``scorers``: scorer objects, spec strings (loaded on ``device`` in ``dtype``), or a ready ``{column: scorer}``.
    """
    folder, out_dir = Path(folder), Path(out_dir)
    items = folder_items(folder, prompts, key=prompt_key)
    _prepare_out(out_dir, overwrite)
    scorers = scorers if isinstance(scorers, Mapping) else resolve_scorers(scorers, device=device, dtype=dtype)
    rows = score_items(items, scorers, folder, batch_size=batch_size, progress=progress)
    summary = _header("score_folder", folder) | {"prompts": {"source": str(prompts) if prompts else "sidecar .txt"}}
    summary |= {"protocol": None, **summarize(rows, scorers)}
    return _finish(out_dir, rows, summary, report, thumbs)


# ---- generation -------------------------------------------------------------------------------------------


def scheduler_class(name: str) -> Any:
    """A diffusers scheduler class by class name or alias (``ddim``, ``euler``, ``dpmpp_2m``, ...)."""
    import diffusers

    cls_name = SCHEDULER_ALIASES.get(name, name)
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not cls_name.endswith("Scheduler"):
        choices = sorted(SCHEDULER_ALIASES) + sorted(n for n in dir(diffusers) if n.endswith("Scheduler"))
        raise EvalError(f"unknown scheduler {name!r}; {registry.suggest(name, choices)}")
    return cls


def make_scheduler(name: str | None, base: Any) -> Any:
    """The checkpoint's scheduler (``name=None``) or the named scheduler built from the checkpoint's config."""
    return base if name is None else scheduler_class(name).from_config(base.config)


def to_pil(pixels: torch.Tensor) -> list[Any]:
    """(N, 3, H, W) in [-1, 1] -> PIL images, rounded like diffusers' ``VaeImageProcessor``."""
    import torch
    from PIL import Image

    arr = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def generate(
    protocol: GenerationProtocol,
    records: Sequence[PromptRecord],
    image_dir: str | Path,
    *,
    device: str = "cpu",
    batch_size: int = 4,
    progress: bool = True,
) -> tuple[list[ImageItem], dict[str, Any]]:
    """Sample the images of ``protocol`` for ``records`` into ``image_dir`` (``<prompt index>_<k>.png``).

    Returns the items (paths relative to ``image_dir``'s parent) and the resolved protocol as a dict.
    """
    import diffusers
    import torch
    from tqdm.auto import tqdm

    from diffalign import models

    image_dir = Path(image_dir)
    lora = protocol.lora
    check_sources(protocol)
    if protocol.scheduler is not None:
        scheduler_class(protocol.scheduler)  # fail before loading the model
    adapter = models.load(protocol.family, protocol.model, dtype=protocol.dtype, vae_path=protocol.vae).to(device)
    pipe = adapter.pipeline(scheduler=make_scheduler(protocol.scheduler, adapter.scheduler))
    if lora is not None:
        _load_lora(pipe, lora, protocol.family)
    default = adapter.default_image_size(pipe)
    height, width = protocol.height or default, protocol.width or default
    jobs = [(i, k, rec) for i, rec in enumerate(records) for k in range(protocol.images_per_prompt)]
    image_dir.mkdir(parents=True, exist_ok=True)
    items = []
    with tqdm(total=len(jobs), desc="generating", unit="img", disable=not progress) as bar, torch.no_grad():
        for chunk in _batches(jobs, batch_size):
            seeds = [protocol.image_seed(i, k) for i, k, _ in chunk]
            latents = pipe(
                prompt=[rec.prompt for _, _, rec in chunk],
                num_inference_steps=protocol.steps,
                **adapter.pipeline_guidance(
                    protocol.guidance_scale,
                    [protocol.negative_prompt] * len(chunk) if protocol.negative_prompt else None,
                    len(chunk),
                ),
                height=height,
                width=width,
                generator=[torch.Generator().manual_seed(s) for s in seeds],
                output_type="latent",
            ).images
            pixels = adapter.decode_latents(adapter.unpipe_latents(latents, height, width))
            for (i, k, rec), seed, image in zip(chunk, seeds, to_pil(pixels), strict=True):
                name = f"{i:05d}_{k:02d}.png"
                image.save(image_dir / name)
                items.append(ImageItem(f"{image_dir.name}/{name}", rec.prompt, rec.prompt_id, seed))
            bar.update(len(chunk))
    resolved = dataclasses.asdict(protocol) | {"height": height, "width": width}
    resolved |= {
        "scheduler": type(pipe.scheduler).__name__,
        "scheduler_config": _jsonable(dict(pipe.scheduler.config)),
        "seed_rule": "seed + prompt_index * images_per_prompt + k (CPU torch.Generator per image)",
        "pipeline": type(pipe).__name__,
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
        "device": str(device),
    }
    return items, resolved


def check_sources(protocol: GenerationProtocol) -> None:
    """The base model and the LoRA of ``protocol`` exist here (one-line ``EvalError`` otherwise); nothing loads."""
    from diffalign.models.loading import source_problem

    problem = source_problem("--model", protocol.model, protocol.family)
    if problem:
        raise EvalError(problem)
    if protocol.lora is not None:
        check_lora_path(protocol.lora)


def check_lora_path(lora: str) -> None:
    """A local LoRA (folder or ``.safetensors`` file) must exist and hold weights; a Hub id is left to diffusers."""
    if resources.is_hub_id(lora):
        return
    path = Path(lora).expanduser()
    if not path.exists():
        raise EvalError(f"LoRA folder {lora} does not exist (a training run writes it to <run.output_dir>/lora)")
    if path.is_dir() and not any(path.glob("*.safetensors")):
        raise EvalError(f"LoRA folder {lora} holds no .safetensors file (expected pytorch_lora_weights.safetensors)")


def _load_lora(pipe: Any, lora: str, family: str) -> None:
    """``pipe.load_lora_weights`` with one-line errors: for a file of foreign tensor names diffusers raises one of
    many exception types, or (when no name has a ``unet.`` / ``text_encoder.`` prefix) loads nothing at all."""
    try:
        pipe.load_lora_weights(os.path.expanduser(lora))
    except Exception as e:  # ValueError, IndexError, KeyError, peft's NoMatchingPeftModuleError, OSError, ...
        reason = (str(e).strip().splitlines() or [""])[0]
        raise EvalError(f"cannot load LoRA {lora} into the {family} pipeline: {type(e).__name__}: {reason}") from e
    if not any(pipe.get_list_adapters().values()):
        raise EvalError(
            f"LoRA {lora}: none of its tensor names match the {family} pipeline, so nothing was loaded (expected "
            "diffusers names such as 'unet.<module>.lora_A.weight', as `diffalign run` writes them)"
        )


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def generate_and_score(
    protocol: GenerationProtocol,
    prompt_source: str | Path | Sequence[PromptRecord],
    scorers: Sequence[Any] | Mapping[str, Any],
    out_dir: str | Path,
    *,
    prompt_key: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    device: str = "cpu",
    batch_size: int = 4,
    score_batch_size: int = 32,
    overwrite: bool = False,
    report: bool = True,
    thumbs: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate ``out_dir/images/*.png`` under ``protocol`` and score them.

    The model and LoRA paths, prompts, the output folder (writable?), then scorers (spec strings are loaded on ``device`` in ``protocol.dtype``)
    are checked before the model is loaded, so a bad prompt file, output folder or scorer fails before any generation.
    """
    out_dir = Path(out_dir)
    check_sources(protocol)
    if isinstance(prompt_source, (str, Path)):
        records = prompt_sets.load_prompts(prompt_source, key=prompt_key, split=split, limit=limit)
        source = str(prompt_source)
    else:
        records, source = list(prompt_source)[:limit], "<records>"
    _prepare_out(out_dir, overwrite)
    if not isinstance(scorers, Mapping):
        scorers = resolve_scorers(scorers, device=device, dtype=protocol.dtype)
    items, resolved = generate(
        protocol, records, out_dir / "images", device=device, batch_size=batch_size, progress=progress
    )
    rows = score_items(items, scorers, out_dir, batch_size=score_batch_size, progress=progress)
    prompt_info = {"source": source, "count": len(records), "limit": limit, "sha256": prompt_sets.digest(records)}
    summary = _header("generate", out_dir) | {"prompts": prompt_info, "protocol": resolved, **summarize(rows, scorers)}
    return _finish(out_dir, rows, summary, report, thumbs)


# ---- comparing runs ---------------------------------------------------------------------------------------


def load_run(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of ``scores.jsonl`` and the ``summary.json`` beside it (a run folder or the scores file itself)."""
    path = Path(path)
    scores = path / SCORES_FILE if path.is_dir() else path
    if not scores.is_file():
        raise EvalError(f"{path}: no {SCORES_FILE} (pass a run folder written by `diffalign eval` or its scores file)")
    rows = prompt_sets.read_jsonl(scores)
    summary_file = scores.parent / SUMMARY_FILE
    summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "prompt" not in row:
            raise EvalError(f"{scores} row {i}: no 'prompt' key")
    return rows, summary


def scorer_keys(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> list[str]:
    """Score columns: from the summary, else every numeric column that is not a reserved one."""
    if summary.get("scorers"):
        return list(summary["scorers"])
    first = rows[0] if rows else {}
    return [k for k, v in first.items() if k not in RESERVED and isinstance(v, (int, float))]


def compare_runs(run_a: str | Path, run_b: str | Path, *, labels: tuple[str, str] = ("A", "B")) -> dict[str, Any]:
    """Per shared scorer: each run's mean and 95% CI, the paired per-prompt difference, and A's win rate over B.

    Means use all images of each run; the difference and the win rate use the prompts present in both runs
    (matched by prompt text). Differences in scorer variants or protocols are listed under ``notes``.
    """
    (rows_a, sum_a), (rows_b, sum_b) = load_run(run_a), load_run(run_b)
    keys_a, keys_b = scorer_keys(rows_a, sum_a), scorer_keys(rows_b, sum_b)
    keys = [k for k in keys_a if k in keys_b]
    if not keys:
        raise EvalError(f"the runs share no scorer ({labels[0]}: {keys_a}; {labels[1]}: {keys_b})")
    notes = _compare_notes(sum_a, sum_b, keys, keys_a, keys_b, rows_a, rows_b, labels)
    out: dict[str, Any] = {
        "runs": {labels[0]: str(run_a), labels[1]: str(run_b)},
        "labels": list(labels),
        "ci_method": CI_METHOD,
        "win_method": WIN_METHOD,
        "notes": notes,
        "scorers": {},
    }
    for key in keys:
        ga = stats.group_by_prompt([r["prompt"] for r in rows_a], [r[key] for r in rows_a])
        gb = stats.group_by_prompt([r["prompt"] for r in rows_b], [r[key] for r in rows_b])
        ma, mb = stats.prompt_means(ga), stats.prompt_means(gb)
        out["scorers"][key] = {
            labels[0]: stats.mean_ci(ga).to_dict(),
            labels[1]: stats.mean_ci(gb).to_dict(),
            "difference": stats.mean_difference(ma, mb),
            "win_rate": stats.win_rate(ma, mb).to_dict(),
        }
    out["n_shared_prompts"] = len({r["prompt"] for r in rows_a} & {r["prompt"] for r in rows_b})
    return out


def _compare_notes(
    sum_a: Mapping[str, Any],
    sum_b: Mapping[str, Any],
    keys: list[str],
    keys_a: list[str],
    keys_b: list[str],
    rows_a: Sequence[Mapping[str, Any]],
    rows_b: Sequence[Mapping[str, Any]],
    labels: tuple[str, str],
) -> list[str]:
    notes = []
    for key in keys:
        va = sum_a.get("scorers", {}).get(key, {}).get("variant")
        vb = sum_b.get("scorers", {}).get(key, {}).get("variant")
        if va != vb:
            notes.append(f"{key}: different scorer variants ({labels[0]}: {va}; {labels[1]}: {vb}); not comparable")
    for label, own, other in ((labels[0], keys_a, keys_b), (labels[1], keys_b, keys_a)):
        only = [k for k in own if k not in other]
        if only:
            notes.append(f"scorers only in {label}: {', '.join(only)}")
    pa, pb = {r["prompt"] for r in rows_a}, {r["prompt"] for r in rows_b}
    if pa != pb:
        notes.append(f"prompts only in {labels[0]}: {len(pa - pb)}, only in {labels[1]}: {len(pb - pa)}")
    proto_a, proto_b = sum_a.get("protocol") or {}, sum_b.get("protocol") or {}
    skip = {"model", "lora", "device", "scheduler_config"}
    differ = sorted(k for k in set(proto_a) | set(proto_b) if k not in skip and proto_a.get(k) != proto_b.get(k))
    if differ:
        notes.append(
            "protocols differ in: " + ", ".join(f"{k} ({proto_a.get(k)} vs {proto_b.get(k)})" for k in differ)
        )
    return notes


def write_comparison(out_dir: str | Path, comparison: Mapping[str, Any]) -> Path:
    """``compare.json``, the comparison ``report.html`` and the side-by-side PNG grids in ``out_dir``."""
    from diffalign.eval import report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / COMPARE_FILE).write_text(json.dumps(comparison, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (rows_a, sum_a), (rows_b, sum_b) = (load_run(comparison["runs"][label]) for label in comparison["labels"])
    roots = (Path(sum_a.get("image_root", ".")), Path(sum_b.get("image_root", ".")))
    report.write_compare_report(out_dir / REPORT_FILE, comparison, rows_a, rows_b, roots=roots)
    return out_dir
