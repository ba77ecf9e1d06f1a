"""Files that ship inside the installed package: recipe scripts and configs, the toy base model, tokenizers,
prompt sets and tiny data fixtures.

They live under the package (``diffalign/recipes``, ``diffalign/assets``), so a non-editable wheel install has
them as well as a clone (where ``recipes/`` and ``assets/`` at the repository root point at the same folders).
Configs and commands name them with the ``diffalign://`` scheme, e.g. ``diffalign://assets/toy_base``, which
resolves to the installed package's copy whatever the current folder is.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


PACKAGE_ROOT = Path(__file__).resolve().parent
ASSETS = PACKAGE_ROOT / "assets"
RECIPES = PACKAGE_ROOT / "recipes"
SCHEME = "diffalign://"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(value: str) -> str:
    """``diffalign://<relative path>`` -> the absolute path of that shipped file; any other string unchanged.

    Raises:
        FileNotFoundError: the scheme names nothing that ships, with what does ship in that folder.
    """
    if not isinstance(value, str) or not value.startswith(SCHEME):
        return value
    rel = value[len(SCHEME) :].strip("/")
    path = PACKAGE_ROOT / rel
    if not rel or not path.exists():
        parent = path.parent if rel else PACKAGE_ROOT
        shipped = sorted(p.name for p in parent.iterdir()) if parent.is_dir() else []
        hint = f"; {parent.relative_to(PACKAGE_ROOT.parent)} holds: {', '.join(shipped)}" if shipped else ""
        raise FileNotFoundError(f"{value!r}: no such file ships with diffalign{hint}")
    return str(path)


def is_hub_id(path: str) -> bool:
    """True when ``path`` names a Hub repository (``owner/name``) rather than a local file or folder.

    A string that exists locally, starts with ``/``, ``.`` or ``~``, uses the ``diffalign://`` scheme or has more
    than one ``/`` (``runs/tiny/sd15``) is local: a missing one is then reported as a missing path, not as a failed
    download.
    """
    if not isinstance(path, str) or path.startswith(("/", ".", "~", SCHEME)) or os.path.exists(path):
        return False
    return bool(_HUB_ID.match(path))
