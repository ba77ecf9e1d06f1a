"""Where a scorer's files come from: a local file or folder first, the hub only for a hub id, never a retry loop
offline.

Rules every scorer follows:

- a path that exists locally is used as is and never sent to the hub;
- a path that does not exist and cannot be a hub id (``Path`` objects, absolute or ``./``/``../``/``~`` paths,
  anything not shaped ``name`` or ``owner/name``) is a one-line ``FileNotFoundError`` naming the path and the
  files expected, instead of transformers' "Repo id must be in the form ...";
- a hub id is fetched with ``local_files_only`` when ``HF_HUB_OFFLINE`` is set (read at call time, so no HTTP
  request and no retry/backoff loop happens), and any hub failure becomes a one-line ``FileNotFoundError`` that
  names the id, says whether the hub was offline, and lists the files expected;
- companion files (tokenizer, image processor, backbone) are looked up next to the weights before any default hub
  repo (``companion``).

``FileNotFoundError`` is an ``OSError``, which ``diffalign eval``/``label`` report as a one-line error.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
CLIP_MODEL_FILES = ("config.json", "model.safetensors|pytorch_model.bin|model.safetensors.index.json")
CLIP_TOKENIZER_FILES = ("vocab.json|tokenizer.json", "merges.txt|tokenizer.json")
PREPROCESSOR_FILES = ("preprocessor_config.json",)
BERT_TOKENIZER_FILES = ("vocab.txt|tokenizer.json",)


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it (1/ON/YES/TRUE), but read now rather than at import."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _expected(files: Sequence[str]) -> str:
    return " + ".join(f.replace("|", " or ") for f in files)


def missing_files(folder: str, files: Sequence[str]) -> list[str]:
    """The entries of ``files`` (each ``"a|b"`` = any of them) that ``folder`` lacks."""
    return [f for f in files if not any(os.path.isfile(os.path.join(folder, alt)) for alt in f.split("|"))]


def local(path: str | os.PathLike, *, what: str, expected: Sequence[str]) -> str | None:
    """``path`` if it exists locally (``~`` expanded), ``None`` if it is a hub id; a one-line ``FileNotFoundError``
    if it looks local but is not there."""
    text = os.fspath(path)
    expanded = os.path.expanduser(text)
    if os.path.exists(expanded):
        return expanded
    looks_local = (
        isinstance(path, os.PathLike)
        or os.path.isabs(text)
        or text.startswith((".", "~"))
        or "\\" in text
        or "--" in text
        or ".." in text
        or not _HUB_ID.match(text)
    )
    if looks_local:
        raise FileNotFoundError(
            f"{what}: no such file or folder {text!r} (expected a folder with {_expected(expected)})"
        )
    return None


def local_folder(path: str | os.PathLike, *, what: str, expected: Sequence[str]) -> str | None:
    """Like ``local`` for a folder whose ``expected`` files are checked up front (one line naming what is missing)."""
    folder = local(path, what=what, expected=expected)
    if folder is None:
        return None
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what}: {folder} is a file; expected a folder with {_expected(expected)}")
    missing = missing_files(folder, expected)
    if missing:
        raise FileNotFoundError(
            f"{what}: {folder} lacks {_expected(missing)} (it holds {sorted(os.listdir(folder))[:12]})"
        )
    return folder


@contextlib.contextmanager
def hub_errors(repo_id: str, *, what: str, expected: Sequence[str]) -> Iterator[None]:
    """Turn any failure to get ``repo_id`` from the hub (cache miss offline, unknown repo, no network) into one
    ``FileNotFoundError`` line."""
    try:
        yield
    except (OSError, ValueError) as err:
        if isinstance(err, FileNotFoundError) and str(err).startswith(what):
            raise
        mode = "HF_HUB_OFFLINE is set and it is not in the local hub cache" if hub_offline() else "the hub failed"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise FileNotFoundError(
            f"{what}: {repo_id!r} is not a local path and {mode} ({type(err).__name__}: {first}); "
            f"pass a local folder with {_expected(expected)}"
        ) from err


def pretrained(path: str | os.PathLike, *, what: str, expected: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """What to pass to a transformers ``from_pretrained``: ``(local folder or hub id, kwargs)``; kwargs hold
    ``local_files_only=True`` when offline. Use the call inside ``hub_errors`` for hub ids."""
    folder = local_folder(path, what=what, expected=expected)
    if folder is not None:
        return folder, {"local_files_only": True}
    repo_id = os.fspath(path)
    if hub_offline():
        missing = uncached(repo_id, expected)
        if missing:
            raise FileNotFoundError(
                f"{what}: {repo_id!r} is not a local path and HF_HUB_OFFLINE is set and the local hub cache lacks "
                f"{_expected(missing)}; pass a local folder with {_expected(expected)}"
            )
    return repo_id, {"local_files_only": hub_offline()}


def uncached(repo_id: str, files: Sequence[str]) -> list[str]:
    """The entries of ``files`` (``"a|b"`` = any) that the local hub cache lacks for ``repo_id`` (no network)."""
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> bool:
        return isinstance(try_to_load_from_cache(repo_id, name), str)

    return [f for f in files if not any(cached(alt) for alt in f.split("|"))]


def call_pretrained(
    loader: Any,
    path: str | os.PathLike,
    *,
    what: str,
    expected: Sequence[str],
    tokens: Sequence[str] = (),
    **kw: Any,
) -> Any:
    """``loader(source, **kwargs)`` for a local folder (checked) or a hub id (errors made one line).

    ``tokens``: for a tokenizer, special tokens its vocab must hold. transformers 5 builds an *empty* tokenizer
    (every id 2) instead of failing when an offline hub id has no cached files; this turns that into an error.
    """
    source, kwargs = pretrained(path, what=what, expected=expected)
    with hub_errors(source, what=what, expected=expected):
        loaded = loader(source, **kwargs, **kw)
    if tokens:
        vocab = loaded.get_vocab()
        absent = [t for t in tokens if t not in vocab]
        if absent or len(vocab) <= 16:
            mode = " (HF_HUB_OFFLINE is set: not in the local hub cache?)" if hub_offline() else ""
            raise FileNotFoundError(
                f"{what}: {source!r} gave a tokenizer with {len(vocab)} tokens lacking {absent}{mode}; "
                f"pass a local folder with {_expected(expected)}"
            )
    return loaded


def resolve_file(
    path: str | os.PathLike, filename: str, *, also: Sequence[str] = (), what: str = "scorer weights"
) -> str:
    """A file from a local file, a local folder laid out like the hub repo, or a hub repo id.

    ``path`` a file: that file. A folder: ``filename``, else the first of ``also`` present (e.g. a ``.safetensors``
    conversion). A hub id: ``hf_hub_download(path, filename)`` (cache only when offline).
    """
    candidates = [filename, *also]
    expected = ["|".join(candidates)]
    found = local(path, what=what, expected=expected)
    if found is not None:
        if os.path.isfile(found):
            return found
        for name in candidates:
            if os.path.isfile(os.path.join(found, name)):
                return os.path.join(found, name)
        raise FileNotFoundError(f"{found} has none of {candidates}; it holds {sorted(os.listdir(found))[:12]}")
    from huggingface_hub import hf_hub_download

    repo_id = os.fspath(path)
    with hub_errors(repo_id, what=what, expected=expected):
        return hf_hub_download(repo_id=repo_id, filename=filename, local_files_only=hub_offline())


def companion(
    path: str | os.PathLike, *, expected: Sequence[str], subfolders: Sequence[str] = (), siblings: bool = True
) -> str | None:
    """A local folder next to the weights at ``path`` that holds ``expected``: the weights' folder itself (or the
    folder of a weights file), then each of ``subfolders`` inside it, then (``siblings``) each of ``subfolders``
    beside it (DiffSynth's ``QualityMetric_reward_pretrained`` layout: ``aesthetic-predictor/`` next to
    ``clip-vit-large-patch14/``). ``None`` for a hub id or when nothing fits."""
    text = os.path.expanduser(os.fspath(path))
    if not os.path.exists(text):
        return None
    base = text if os.path.isdir(text) else os.path.dirname(os.path.abspath(text))
    places = [base, *(os.path.join(base, s) for s in subfolders)]
    if siblings:
        places += [os.path.join(os.path.dirname(os.path.abspath(base)), s) for s in subfolders]
    for place in places:
        if os.path.isdir(place) and not missing_files(place, expected):
            return place
    return None
