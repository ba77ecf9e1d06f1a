"""Where a labelled dataset came from, and the check that a config trains on the labels it was written for.

``diffalign label`` (``diffalign.label.store``) writes ``provenance.json`` into the folders it publishes,
``pairs/`` and ``ranked/``: the scorers that ranked the images, the ranking rule, the prompt source and its
digest, the generators and the label run's folder. The record travels with a copied ``pairs/`` or ``ranked/``
folder, unlike the label run's ``label.json``.

``data.labelled_by: <scorer>`` in a config says which scorer's labels it was written for (the toy worlds:
``duofaithfulness`` for ``duo/*``, ``toyreward`` for ``toy/*_world``): a source ranked by other scorers, or one
that carries no provenance, stops the run with one line naming both, instead of training one world's config on
another world's labels (both worlds' quickstarts label into ``runs/quickstart/labels``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffalign import resources
from diffalign.errors import UserError


FILE = "provenance.json"


class ProvenanceError(UserError, ValueError):
    """A labelled source whose provenance does not match what the config expects (``data.labelled_by``)."""


def find(path: str) -> Path | None:
    """The ``provenance.json`` of a data source: in ``path`` (a folder) or the folder of a file or glob, or the
    folder above either (``pairs/`` above ``pairs/data/``); None for a Hub id or unlabelled data."""
    local = Path(resources.resolve(path)).expanduser()
    while any(c in local.name for c in "*?["):
        local = local.parent
    if not local.exists():  # a Hub id, or a missing path (its own error comes when the data is opened)
        return None
    start = local if local.is_dir() else local.parent
    for folder in (start, start.parent):
        if (folder / FILE).is_file():
            return folder / FILE
    return None


def read(path: str) -> dict[str, Any] | None:
    """The provenance record of ``path`` (see ``find``), or None."""
    found = find(path)
    return json.loads(found.read_text(encoding="utf-8")) if found is not None else None


def check_labelled_by(path: str, expected: str | None) -> None:
    """Raise ``ProvenanceError`` unless the labels at ``path`` were ranked by the scorer ``expected`` (None: no
    check). One line naming the scorers found, the expected one, and the fix."""
    if expected is None:
        return
    found = find(path)
    if found is None:
        raise ProvenanceError(
            f"data.labelled_by={expected} but data.path={path} carries no label provenance ({FILE} beside the data, "
            f"written by `diffalign label`); label it with {expected} (a toy world: diffalign quickstart --world "
            "<world> --objective dpo), or set data.labelled_by=null for data from elsewhere"
        )
    record = json.loads(found.read_text(encoding="utf-8"))
    scorers = list(record.get("scorers", []))
    if expected not in scorers:
        prompts = record.get("prompts", {})
        raise ProvenanceError(
            f"data.path={path} holds labels ranked by {', '.join(scorers) or 'no scorer'} (prompts "
            f"{prompts.get('source', '?')}, {prompts.get('count', '?')} of them; label run {record.get('label_run', '?')}), "
            f"but this config is for labels ranked by {expected} (data.labelled_by): label with {expected} (a toy "
            "world: diffalign quickstart --world <world> --objective dpo) or point data.path at such labels"
        )
