"""The training-side data pipeline: source -> transforms -> batches, resumable and split-invariant.

``build_loader(cfg.data, ...)`` returns a ``PlannedLoader`` whose ``next_batch()`` gives this process's next
micro-batch together with one noise seed per group. Everything random about a group (crop, flip, empty-prompt
dropout, diffusion noise and timestep) is derived from ``(run seed, epoch, row index)``, so

* N processes with per-device batch b reproduce one process with batch N*b (same global batches, same
  per-group randomness), and
* ``state_dict()`` / ``load_state_dict()`` (epoch, consumed batches) resume at exactly the next batch.

Sources: ``format: pickapic`` (pairs) or ``ranked`` (K images + scores); map-style by default, streaming with
``data.streaming: true`` (resume then re-reads and drops the consumed batches); or a latent cache written by
``diffalign.data.latent_cache`` when ``data.latent_cache`` is set.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from diffalign.data import provenance
from diffalign.data.collate import GroupBatch, collate_groups
from diffalign.data.curriculum import curriculum_records
from diffalign.data.pickapic import PickapicIterable, PickapicSource, load_pickapic
from diffalign.data.ranked import RankedDataset, RankedSource
from diffalign.data.records import BadRowTally, Group, LoadStats, SkippedRow, check_bad_fraction
from diffalign.data.sampler import GroupSampler
from diffalign.data.transforms import JointTransform, TransformedDataset, TransformedIterable
from diffalign.sampling.seeds import mixed_seed


logger = logging.getLogger("diffalign.data")
NOISE_SALT, PROMPT_SALT = 1, 2  # a group's seeds: mixed_seed(run seed, epoch, row index, salt)


def record_source(cfg: Any) -> Any:
    """The record dataset (map-style or streaming) described by the ``data`` config section."""
    if cfg.format == "pickapic":
        return PickapicSource(
            path=cfg.path,
            split=cfg.split,
            streaming=cfg.streaming,
            ties=cfg.ties,
            on_bad_row=cfg.on_bad_row,
            max_rows=cfg.max_rows,
            image_caption_columns=tuple(cfg.caption_columns) if getattr(cfg, "caption_columns", None) else None,
        )
    if cfg.streaming:
        raise ValueError("data.streaming is only supported for format: pickapic")
    if cfg.format == "video":  # K videos per prompt (wan): diffalign.data.video
        from diffalign.data.video import video_source

        return video_source(cfg)
    return RankedSource(
        path=cfg.path,
        split=cfg.split,
        on_bad_row=cfg.on_bad_row,
        max_rows=cfg.max_rows,
        source_image_column=getattr(cfg, "source_image_column", None),
    )


def transform_for(cfg: Any) -> JointTransform:
    """The group transform of the ``data`` section: ``JointTransform``, or ``VideoTransform`` for ``format: video``."""
    kwargs = {"resolution": cfg.resolution, "crop": cfg.crop, "hflip_prob": cfg.hflip_prob}
    if cfg.format == "video":
        from diffalign.data.video import VideoTransform

        return VideoTransform(**kwargs)
    return JointTransform(**kwargs)


class _Collate:
    """collate_groups + row indices + empty-prompt dropout (picklable for DataLoader workers)."""

    def __init__(self, seed: int, p_empty: float) -> None:
        self.seed, self.p_empty = seed, p_empty

    def __call__(self, items: Sequence[tuple[Group | SkippedRow, int]]) -> tuple[GroupBatch, list[int], int]:
        epoch = items[0][1] if items else 0
        groups = [g for g, _ in items]
        batch = collate_groups(groups)
        indices = [g.index for g in groups if isinstance(g, Group)]
        if self.p_empty > 0:
            for i, index in enumerate(indices):
                gen = torch.Generator().manual_seed(mixed_seed(self.seed, epoch, index, PROMPT_SALT))
                if torch.rand((), generator=gen).item() < self.p_empty:
                    batch.prompts[i] = ""
                    if batch.image_prompts is not None:
                        batch.image_prompts[i] = [""] * len(batch.image_prompts[i])
        return batch, indices, epoch


class _WithEpoch(torch.utils.data.Dataset):
    """Map-style wrapper: key (index, epoch) -> (Group or SkippedRow, epoch)."""

    def __init__(self, groups: TransformedDataset) -> None:
        self.groups = groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Group | SkippedRow, int]:
        return self.groups[key], int(key[1])


class PlannedLoader:
    """Micro-batches for one process, with per-group seeds and an exact resume position."""

    def __init__(
        self,
        cfg: Any,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        unpaired: bool = False,
        grad_accum: int = 1,
    ) -> None:
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed
        self.unpaired, self.grad_accum = unpaired, grad_accum
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._iter: Iterator[Any] | None = None
        self._cache = None
        provenance.check_labelled_by(cfg.path, cfg.labelled_by)
        if cfg.latent_cache:
            from diffalign.data.latent_cache import LatentCache

            self._cache = LatentCache(cfg.latent_cache)
            self.records = None
            num_items = len(self._cache)
        elif unpaired:  # single labelled images (Diffusion-KTO): diffalign.data.unpaired
            from diffalign.data.unpaired import unpaired_records

            self.records = unpaired_records(cfg)
            num_items = len(self.records)
        else:
            source = record_source(cfg)
            if isinstance(source, PickapicSource):
                self.records = load_pickapic(source, rank=rank, world_size=world_size)
            elif isinstance(source, RankedDataset):  # format: video
                self.records = source
            else:
                self.records = RankedDataset(source)
            self.records = curriculum_records(self.records, cfg)  # the prompts variant serves pairs of each list
            num_items = None if isinstance(self.records, PickapicIterable) else len(self.records)
        self.transform = transform_for(cfg)
        self.collate = _Collate(seed, cfg.proportion_empty_prompts)
        self.streaming = num_items is None
        self._seen, self._bad, self._tally = 0, 0, BadRowTally()  # rows drawn (streaming: of finished passes)
        if self.stats is not None and not self.streaming:  # the label columns: every process reads all of them
            tally = BadRowTally()
            for index, reason in self.stats.bad_rows:
                tally.add(index, reason)
            bad, seen = self.stats.bad_rows_skipped, self.stats.rows_read
            check_bad_fraction(bad, seen, cfg.max_bad_fraction, tally, "rows whose labels were read", cfg.path)
        if not self.streaming and num_items < batch_size * world_size:
            raise ValueError(
                f"data at {cfg.path!r} has {num_items} usable groups, fewer than one global batch "
                f"({batch_size} x {world_size} processes)"
            )
        self.num_items = num_items

    @property
    def stats(self) -> LoadStats | None:
        return getattr(self.records, "stats", None)

    def stats_summary(self) -> str:
        return self.stats.summary() if self.stats is not None else f"latent cache {self.cfg.latent_cache}"

    def row_counts(self) -> dict[str, int]:
        """``{"seen", "bad"}``: rows this process drew (streaming: read) since the run (re)started, and how many
        of them were unusable. The training loop sums them over processes and, when ``records.too_many_bad``
        says so, calls ``check_bad_rows`` with the sums: the same decision with 1 or N processes."""
        if self.streaming:
            stats = self.records.stats  # this pass's; finished passes are folded into _seen / _bad
            return {"seen": self._seen + stats.rows_read, "bad": self._bad + stats.bad_rows_skipped}
        return {"seen": self._seen, "bad": self._bad}

    def bad_row_tally(self) -> BadRowTally:
        """This process's unusable drawn rows by kind (``records.BadRowTally``), to merge across processes."""
        tally = BadRowTally()
        tally.merge(self._tally)
        if self.streaming:
            for index, reason in self.records.stats.bad_rows:
                tally.add(index, reason)
        return tally

    def check_bad_rows(self, seen: int, bad: int, tallies: Sequence[BadRowTally]) -> None:
        """Stop (``TooManyBadRowsError``) when ``bad`` of ``seen`` rows (summed over processes) exceed
        ``data.max_bad_fraction`` beyond chance (``records.too_many_bad``); ``tallies``: every process's."""
        tally = BadRowTally()
        for t in tallies:
            tally.merge(t)
        what = "rows read so far" if self.streaming else "rows drawn so far"
        check_bad_fraction(bad, seen, self.cfg.max_bad_fraction, tally, what, self.cfg.path)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, this run uses seed {self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._iter = None

    def _epoch_iterator(self) -> Iterator[Any]:
        if self._cache is not None:
            return self._cache.iterate(self._sampler(), self.batch_size)
        if self.streaming:
            groups = TransformedIterable(self.records, self.transform, seed=self.seed)
            groups.set_epoch(self.epoch)
            items = ((g, self.epoch) for g in groups)
            it = _chunks(items, self.batch_size, self.collate)
            for _ in range(self.position):  # streaming resume: re-read and drop consumed batches
                next(it, None)
            return it
        groups = _WithEpoch(TransformedDataset(self.records, self.transform, seed=self.seed))
        loader = DataLoader(
            groups,
            batch_size=self.batch_size,
            sampler=self._sampler(),
            collate_fn=self.collate,
            num_workers=self.cfg.num_workers,
        )
        return iter(loader)

    def _sampler(self) -> GroupSampler:
        kwargs = {"num_processes": self.world_size, "rank": self.rank, "seed": self.seed, "with_epoch": True}
        curriculum = getattr(self.cfg, "curriculum", None)
        if curriculum is not None and curriculum.chunks > 0:  # Curriculum-DPO: diffalign.data.curriculum
            from diffalign.data.curriculum import CurriculumSampler, curriculum_gaps

            gaps = curriculum_gaps(self.records, self.cfg)
            sampler = CurriculumSampler(
                gaps,
                self.batch_size,
                chunks=curriculum.chunks,
                batches_per_stage=curriculum.steps_per_chunk * self.grad_accum,
                min_gap=curriculum.min_gap,
                max_groups=curriculum.max_groups,
                stages=getattr(curriculum, "stages", "chunks"),
                **kwargs,
            )
        elif self.unpaired and getattr(self.cfg, "positive_ratio", None) is not None:
            from diffalign.data.balanced import BalancedSampler

            sampler = BalancedSampler(self.records.labels, self.cfg.positive_ratio, self.batch_size, **kwargs)
        else:
            sampler = GroupSampler(self.num_items, self.batch_size, **kwargs)
        sampler.load_state_dict({"epoch": self.epoch, "position": self.position})
        return sampler

    def next_batch(self) -> tuple[GroupBatch, list[int]]:
        """This process's next micro-batch and one noise seed per group in it."""
        for _ in range(2):
            if self._iter is None:
                self._iter = self._epoch_iterator()
            item = next(self._iter, None)
            if item is not None:
                batch, indices, epoch = item
                self.position += 1
                if self.stats is not None:
                    self.stats.add_skipped(batch.skipped)
                    self.stats.add_flagged(batch.flagged)
                if not self.streaming:
                    self._seen += len(batch) + len(batch.skipped)
                    self._bad += len(batch.skipped)
                    for index, reason in batch.skipped:
                        self._tally.add(index, reason)
                seeds = [mixed_seed(self.seed, epoch, i, NOISE_SALT) for i in indices]
                return batch, seeds
            if self.streaming:  # the next pass starts new stats
                counts, tally = self.row_counts(), self.bad_row_tally()
                self._seen, self._bad, self._tally = counts["seen"], counts["bad"], tally
            self.epoch, self.position, self._iter = self.epoch + 1, 0, None
        raise RuntimeError(f"data at {self.cfg.path!r} yielded no batch for a whole epoch")


def _chunks(items: Iterator[tuple[Group, int]], size: int, collate: _Collate) -> Iterator[Any]:
    """Streaming batches of ``size`` groups (the last partial batch of the stream is dropped)."""
    chunk: list[tuple[Group, int]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield collate(chunk)
            chunk = []


def build_loader(
    cfg: Any,
    *,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    unpaired: bool = False,
    grad_accum: int = 1,
) -> PlannedLoader:
    """A ``PlannedLoader`` for the ``data`` config section (see the module docstring).

    ``unpaired``: single labelled images (one-image groups, scores [1.0] / [0.0]) for unpaired objectives
    (Diffusion-KTO), label-balanced when ``cfg.positive_ratio`` is set. ``grad_accum`` (micro-batches per optimizer
    step) sizes the Curriculum-DPO stages when ``cfg.curriculum.chunks`` > 0 (``diffalign.data.curriculum``).
    """
    return PlannedLoader(
        cfg,
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        unpaired=unpaired,
        grad_accum=grad_accum,
    )
