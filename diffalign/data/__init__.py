"""Preference data: Pick-a-Pic pairs, ranked lists, joint transforms, collation and a resumable sampler.

Typical map-style pipeline::

    records = PickapicDataset(PickapicSource(path="assets/pickapic_tiny"))
    groups = TransformedDataset(records, JointTransform(resolution=64, crop="random"), seed=0)
    sampler = GroupSampler(len(groups), per_device_batch_size=4, num_processes=N, rank=r, with_epoch=True)
    loader = DataLoader(groups, batch_size=4, sampler=sampler, collate_fn=collate_groups)
"""

from diffalign.data._source import DataSourceError
from diffalign.data.collate import GroupBatch, collate_groups
from diffalign.data.pickapic import (
    TIE_POLICIES,
    PickapicDataset,
    PickapicIterable,
    PickapicSource,
    decide_row,
    load_pickapic,
)
from diffalign.data.ranked import RankedDataset, RankedSource
from diffalign.data.records import (
    BAD_ROW_POLICIES,
    BadRowError,
    Group,
    LoadStats,
    PreferenceRecord,
    SkippedRow,
    TooManyBadRowsError,
    decode_image,
)
from diffalign.data.sampler import GroupSampler
from diffalign.data.transforms import (
    CROP_MODES,
    JointParams,
    JointTransform,
    TransformedDataset,
    TransformedIterable,
    item_generator,
)


__all__ = [
    "BAD_ROW_POLICIES",
    "CROP_MODES",
    "TIE_POLICIES",
    "BadRowError",
    "DataSourceError",
    "Group",
    "GroupBatch",
    "GroupSampler",
    "JointParams",
    "JointTransform",
    "LoadStats",
    "PickapicDataset",
    "PickapicIterable",
    "PickapicSource",
    "PreferenceRecord",
    "RankedDataset",
    "RankedSource",
    "SkippedRow",
    "TooManyBadRowsError",
    "TransformedDataset",
    "TransformedIterable",
    "collate_groups",
    "decide_row",
    "decode_image",
    "item_generator",
    "load_pickapic",
]
