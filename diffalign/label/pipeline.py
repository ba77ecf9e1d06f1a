"""``label``: generate K images per prompt, score them with an ensemble, write a pair and a ranked-list dataset.

The RankDPO Syn-Pic recipe (Karthik et al. 2024, arXiv 2410.18013, Sec. 3.2): several generators render each
prompt, several reward models score every image, and the per-image ranking score is the mean win fraction
(``ranking.py``). Outputs (``store.py`` has the layout and the crash-safety argument):

* ``<out>/pairs/``: Pick-a-Pic-schema parquet shards, ``data.format: pickapic`` in the training recipes;
* ``<out>/ranked/``: ``train.jsonl`` + PNGs, ``data.format: ranked`` (RankDPO), with the raw per-scorer scores.

Resuming: re-running with the same ``--out`` skips every prompt already in the log (its index and text must
match), regenerates nothing, and finishes the datasets. Once a prompt is logged, the generation settings must match
the first run's (``label.json``); the ranking rule, pair mode and JPEG quality may change, and the datasets are then
rewritten from the stored raw scores. One process at a time per output folder (``<out>/.lock``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from diffalign.fileio import FolderBusyError, FolderLock, move_aside
from diffalign.label import store
from diffalign.label.config import LabelConfig, LabelError
from diffalign.label.ranking import pairs_per_prompt


logger = logging.getLogger("diffalign.label")


def _prompt_texts(cfg: LabelConfig) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """(prompt_id, text) pairs in order, and how they were obtained (for ``label.json``)."""
    from diffalign.eval import prompts as prompt_sets

    if isinstance(cfg.prompts, str):
        records = prompt_sets.load_prompts(cfg.prompts, key=cfg.prompt_key, split=cfg.split, limit=cfg.limit)
        source = cfg.prompts
    else:
        texts = list(cfg.prompts)[: cfg.limit] if cfg.limit else list(cfg.prompts)
        records = prompt_sets.records_from_rows(texts, "prompts")
        source = "<list>"
    if not records:
        raise LabelError(f"no prompts in {source}")
    info = {"source": source, "count": len(records), "sha256": prompt_sets.digest(records), "limit": cfg.limit}
    return [(r.prompt_id, r.prompt) for r in records], info


def _scorer_info(scorers: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    return {
        key: {"name": str(s.name), "variant": str(s.variant), "dtype": str(getattr(s, "dtype", ""))}
        for key, s in scorers.items()
    }


def _check_settings(out: Path, settings: dict[str, Any], *, logged: int) -> dict[str, Any] | None:
    """Compare with a previous run's ``label.json`` (returned, or None for a new run). Once any prompt is logged
    (``logged > 0``) the generation settings must match; before that, a corrected re-run simply replaces them."""
    path = out / store.SETTINGS_FILE
    if not path.is_file():
        return None
    old = json.loads(path.read_text(encoding="utf-8"))
    old_gen, new_gen = old.get("generation", {}), settings["generation"]
    if old_gen != new_gen and logged:
        keys = sorted(k for k in set(old_gen) | set(new_gen) if old_gen.get(k) != new_gen.get(k))
        raise LabelError(
            f"{out} holds a labelling run with other generation settings (differing: {', '.join(keys)}); "
            "resume with the same generators, protocol, K, seed, scorers and shard size, or pass --overwrite to move "
            "it to a dated folder beside it (nothing is deleted), or use another --out"
        )
    if old.get("device") != settings["device"]:
        logger.warning("resuming on device %s; earlier images came from %s", settings["device"], old.get("device"))
    return old


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold ``<out>/.lock`` (``fileio.FolderLock``; the OS drops it when the process dies): one run per log."""
    try:
        lock = FolderLock(out, "diffalign label")
    except FolderBusyError as e:
        raise LabelError(f"{out} is being labelled by another process ({e.holder}; it holds {out / '.lock'})") from e
    with lock:
        yield


def _check_log(records: Sequence[store.Record], prompts: Sequence[tuple[str, str]], k: int, log: Path) -> None:
    seen: set[int] = set()
    for n, rec in enumerate(records, start=1):
        where = f"{log} line {n}"
        if rec.prompt_index in seen:
            raise LabelError(f"{where}: prompt {rec.prompt_index} is logged twice")
        seen.add(rec.prompt_index)
        if len(rec.images) != k:
            raise LabelError(f"{where}: {len(rec.images)} images, this run has K={k}")
        if rec.prompt_index < len(prompts) and prompts[rec.prompt_index][1] != rec.prompt:
            raise LabelError(
                f"{where}: prompt {rec.prompt_index} was {rec.prompt!r}, the prompt set now has "
                f"{prompts[rec.prompt_index][1]!r}; resume with the same prompts, or pass --overwrite "
                "(moves it aside), or use another --out"
            )


def _score(
    scorers: Mapping[str, Any], images: list[Any], texts: list[str], indices: list[int], k: int
) -> dict[str, torch.Tensor]:
    out = {}
    for key, scorer in scorers.items():
        values = torch.as_tensor(scorer(images, texts)).detach().float().cpu().reshape(-1)
        if values.numel() != len(images):
            raise LabelError(f"scorer {key!r} returned {values.numel()} scores for {len(images)} images")
        bad = [indices[i // k] for i, v in enumerate(values.tolist()) if not math.isfinite(v)]
        if bad:
            raise LabelError(f"scorer {key!r} gave non-finite scores for prompts {sorted(set(bad))[:5]}")
        out[key] = values
    return out


def _label_chunk(
    cfg: LabelConfig,
    pool: Any,
    scorers: Mapping[str, Any],
    chunk: Sequence[int],
    prompts: Sequence[tuple[str, str]],
) -> list[tuple[store.Record, list[Any]]]:
    """Generate and score the K images of each prompt in ``chunk``; nothing is written here."""
    k, slots = cfg.k, cfg.slots()
    images: list[list[Any]] = [[None] * k for _ in chunk]
    for g in range(len(cfg.generators)):
        jobs = [(c, s) for c in range(len(chunk)) for s in range(k) if slots[s] == g]
        texts = [prompts[chunk[c]][1] for c, _ in jobs]
        seeds = [cfg.image_seed(chunk[c], s) for c, s in jobs]
        for (c, s), image in zip(jobs, pool.sample(g, texts, seeds), strict=True):
            images[c][s] = image
    flat = [im for per_prompt in images for im in per_prompt]
    texts = [prompts[i][1] for i in chunk for _ in range(k)]
    values = _score(scorers, flat, texts, list(chunk), k)
    results = []
    for c, index in enumerate(chunk):
        raw = {key: v[c * k : (c + 1) * k].tolist() for key, v in values.items()}
        record = store.Record(
            prompt_index=index,
            prompt_id=prompts[index][0],
            prompt=prompts[index][1],
            created_at=store.now_iso(),
            images=[store.image_name(index, s) for s in range(k)],
            generators=[cfg.generators[slots[s]].name for s in range(k)],
            seeds=[cfg.image_seed(index, s) for s in range(k)],
            raw_scores=raw,
        )
        results.append((record, images[c]))
    return results


def _commit(out: Path, log: store.RecordLog, record: store.Record, images: Sequence[Any]) -> None:
    """Images first (atomic, fsync'd), then the log line: the prompt is done exactly when its line is complete."""
    ranked = out / store.RANKED_DIR
    for name, image in zip(record.images, images, strict=True):
        store.save_png_atomic(image, ranked / name)
    store.fsync_dir(ranked / store.IMAGES_DIR)
    log.append(record)


def _publish(out: Path, cfg: LabelConfig, records: Sequence[store.Record], *, final: bool) -> list[int]:
    written = store.sync_shards(out, records, cfg.shard_size, cfg.k, cfg.derived_settings(), final=final)
    if written or final:
        store.write_ranked(out, records, cfg.ranking)
    return written


def label(
    cfg: LabelConfig,
    scorers: Sequence[Any] | Mapping[str, Any],
    out_dir: str | Path,
    *,
    scorer_device: str | None = None,
    scorer_dtype: str = "fp32",
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Label ``cfg.prompts`` into ``out_dir`` (resumable); returns a summary of the run.

    ``scorers``: spec strings (``"pickscore,path=/m/ps"``, see ``diffalign.eval.runner.parse_scorer_spec``) and/or
    scorer objects (``scorer(images, prompts) -> (B,)`` with ``name`` and ``variant``), or a ready mapping
    key -> scorer. Spec strings load on ``scorer_device`` (default ``cfg.device``) in ``scorer_dtype``.
    ``overwrite``: move an earlier labelling run in ``out_dir`` to a dated sibling folder first (nothing is deleted)
    instead of resuming it.
    """
    from diffalign.eval.runner import resolve_scorers

    out = Path(out_dir)
    prompts, prompt_info = _prompt_texts(cfg)
    if not isinstance(scorers, Mapping):
        scorers = resolve_scorers(scorers, device=scorer_device or cfg.device, dtype=scorer_dtype)
    if cfg.ranking.method == "raw" and cfg.ranking.scorer not in scorers:
        raise LabelError(f"ranking raw:{cfg.ranking.scorer} names no scorer; scorers: {', '.join(scorers)}")
    settings = {
        "generation": cfg.generation_fingerprint(_scorer_info(scorers)),
        "derived": cfg.derived_settings(),
        "device": cfg.device,
    }
    (out / store.RANKED_DIR / store.IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        if overwrite and any(p.name != ".lock" for p in out.iterdir()):
            logger.warning("--overwrite: moved the previous labelling run in %s to %s", out, move_aside(out))
            (out / store.RANKED_DIR / store.IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        return _run(cfg, scorers, out, settings, prompts, prompt_info, progress)


def _run(
    cfg: LabelConfig,
    scorers: Mapping[str, Any],
    out: Path,
    settings: dict[str, Any],
    prompts: list[tuple[str, str]],
    prompt_info: dict[str, Any],
    progress: bool,
) -> dict[str, Any]:
    from diffalign.label.generate import GeneratorPool

    for folder in (out, out / store.RANKED_DIR, out / store.RANKED_DIR / store.IMAGES_DIR, out / store.PAIRS_DATA):
        store.remove_stale_temps(folder)
    log = store.RecordLog(out / store.LOG_FILE)
    records = log.read(repair=True)
    old = _check_settings(out, settings, logged=len(records))
    if old is not None and old.get("generation") == settings["generation"] and "generation_resolved" in old:
        settings["generation_resolved"] = old["generation_resolved"]
    _check_log(records, prompts, cfg.k, log.path)
    store.write_json_atomic(out / store.SETTINGS_FILE, settings | {"prompts": prompt_info})
    store.write_provenance(out, settings | {"prompts": prompt_info})
    if old is not None and old.get("derived") != settings["derived"]:
        logger.info("ranking/pair settings changed: rewriting the datasets from the %d logged prompts", len(records))
    _publish(out, cfg, records, final=False)  # a shard whose prompts were logged just before a kill
    done = {r.prompt_index for r in records}
    pending = [i for i in range(len(prompts)) if i not in done]
    done_before = len(records)
    if pending:
        pool = GeneratorPool(
            cfg.generators,
            [cfg.protocol_of(g) for g in cfg.generators],
            device=cfg.device,
            batch_size=cfg.gen_batch_size,
        )
        settings["generation_resolved"] = [pool.describe(g) for g in range(len(cfg.generators))]
        store.write_json_atomic(out / store.SETTINGS_FILE, settings | {"prompts": prompt_info})
        _label_pending(cfg, pool, scorers, out, log, records, pending, prompts, progress)
    _publish(out, cfg, records, final=True)
    return _summary(out, cfg, records, done_before, prompt_info)


def _label_pending(
    cfg: LabelConfig,
    pool: Any,
    scorers: Mapping[str, Any],
    out: Path,
    log: store.RecordLog,
    records: list[store.Record],
    pending: list[int],
    prompts: Sequence[tuple[str, str]],
    progress: bool,
) -> None:
    """Label ``pending`` prompts ``cfg.prompt_batch`` at a time, committing each and publishing full shards."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(prompts), initial=len(prompts) - len(pending), unit="prompt", disable=not progress)
    bar.set_description("labelling")
    with bar:
        for lo in range(0, len(pending), cfg.prompt_batch):
            for record, images in _label_chunk(cfg, pool, scorers, pending[lo : lo + cfg.prompt_batch], prompts):
                _commit(out, log, record, images)
                records.append(record)
                if len(records) % cfg.shard_size == 0:
                    _publish(out, cfg, records, final=False)
                bar.update(1)


def _summary(
    out: Path, cfg: LabelConfig, records: Sequence[store.Record], done_before: int, prompt_info: dict[str, Any]
) -> dict[str, Any]:
    from diffalign.label.ranking import ranking_scores, select_pairs

    shards = store.existing_shards(out)
    expected = list(range(math.ceil(len(records) / cfg.shard_size)))
    if shards != expected:
        raise LabelError(
            f"{out / store.PAIRS_DATA} holds shards {shards}, expected {expected}; remove the extra files"
        )
    ties = 0
    for rec in records:
        scores = ranking_scores(rec.raw_scores, cfg.ranking)
        ties += sum(la == 0.5 for _, _, la, _ in select_pairs(scores, cfg.pairs, cfg.ranking.tie_tolerance))
    return {
        "out": str(out),
        "prompts": prompt_info["count"],
        "records": len(records),
        "labelled_now": len(records) - done_before,
        "images_per_prompt": cfg.k,
        "pair_rows": len(records) * pairs_per_prompt(cfg.k, cfg.pairs),
        "tied_pairs": ties,
        "shards": len(shards),
        "ranking": cfg.ranking.label(),
        "pairs_mode": cfg.pairs,
        "pairs_dir": str(out / "pairs"),
        "ranked_file": str(out / store.RANKED_DIR / store.RANKED_FILE),
    }
