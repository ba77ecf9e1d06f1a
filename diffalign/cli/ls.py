"""``diffalign ls [recipes|configs|losses|scorers]``: what ships, with a short description of each.

Each kind is one function returning ``(name, description)`` rows, registered in ``KINDS``; listing a new
kind is one more function and one more entry. Descriptions are whole sentences, wrapped to the terminal width
under their column, never cut.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
import shutil
import textwrap
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from diffalign import config, losses, scorers


Row = tuple[str, str]


def first_line(doc: str | None) -> str:
    """The first non-empty line of a docstring, or ``""``."""
    return next((line.strip() for line in (doc or "").splitlines() if line.strip()), "")


# words whose trailing period does not end a sentence ("Wallace et al. 2023", "Sec. 4.1", "e.g. sd15")
_ABBREVIATIONS = frozenset({"al", "e.g", "i.e", "etc", "vs", "cf", "sec", "eq", "fig", "approx"})
_CLOSE = {"(": ")", "[": "]", "{": "}"}


def first_sentence(text: str) -> str:
    """The first whole sentence of ``text`` (whitespace collapsed): up to the first ``.``, ``!`` or ``?`` that is
    followed by a space or the end, outside brackets and backticks, and not an abbreviation such as ``et al.``.

    Config comments hold several sentences over several lines; their first line alone often stops mid-sentence.
    Text without such an end is returned whole.
    """
    text = " ".join(text.split())
    stack: list[str] = []
    for i, ch in enumerate(text):
        if ch == "`":
            if stack and stack[-1] == "`":
                stack.pop()
            else:
                stack.append("`")
        elif stack and stack[-1] == "`":
            continue
        elif ch in _CLOSE:
            stack.append(_CLOSE[ch])
        elif stack and ch == stack[-1]:
            stack.pop()
        elif ch in ".!?" and not stack and (i + 1 == len(text) or text[i + 1] == " "):
            word = re.split(r"[\s(]", text[:i])[-1].lower()
            if word not in _ABBREVIATIONS:
                return text[: i + 1]
    return text


def _script_doc(path: Path) -> str:
    try:
        return first_line(ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))))
    except SyntaxError as e:
        return f"(syntax error: {e})"


def _yaml_comment(path: Path) -> str:
    """The comment block a YAML file starts with (leading blank lines skipped), as one line of text."""
    block: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(stripped.lstrip("#").strip())
        elif stripped or block:
            break
    return " ".join(part for part in block if part)


def _fmt(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def config_defaults(module: ModuleType) -> str:
    """``beta=5000.0 label_smoothing=0.0`` from a plug-in module's ``Config`` defaults."""
    cfg_cls = getattr(module, "Config", None)
    if not dataclasses.is_dataclass(cfg_cls):
        return ""
    parts = []
    for f in dataclasses.fields(cfg_cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            parts.append(f"{f.name}={_fmt(f.default)}")
        elif f.default_factory is not dataclasses.MISSING:
            parts.append(f"{f.name}={_fmt(f.default_factory())}")
        else:
            parts.append(f"{f.name}=<required>")
    return " ".join(parts)


def recipes() -> list[Row]:
    """Recipe scripts ``recipes/*.py`` with their docstring's first line (read without importing)."""
    root = config.recipes_dir()
    return [(name, _script_doc(root / f"{name}.py")) for name in config.recipe_names()]


def configs() -> list[Row]:
    """Shipped configs as names (``sdxl/dpo_lora``) with the first sentence of their opening comment."""
    root = config.configs_dir()
    rows = []
    for name in config.config_names():
        path = root / f"{name}.yaml"
        rows.append((name, first_sentence(_yaml_comment(path if path.is_file() else root / f"{name}.yml"))))
    return rows


def plugin_rows(package_get: Callable[[str], ModuleType], names: list[str]) -> list[Row]:
    """Rows for plug-in modules: first docstring line, then ``Config`` defaults; import errors are shown."""
    rows = []
    for name in names:
        try:
            module = package_get(name)
        except Exception as e:  # one broken module must not hide the others
            rows.append((name, f"(import error: {type(e).__name__}: {e})"))
            continue
        rows.append((name, "  ".join(s for s in (first_line(module.__doc__), config_defaults(module)) if s)))
    return rows


def loss_rows() -> list[Row]:
    """Every objective in ``diffalign.losses``."""
    return plugin_rows(losses.get, losses.available())


def scorer_rows() -> list[Row]:
    """Every scorer of ``diffalign.scorers`` (the names configs and ``eval``/``label`` take), with its docstring's
    first line, read without importing it (no torch); the step-aware ones, which score noisy latents rather than
    images, are marked."""
    rows = []
    marks = [(n, "") for n in scorers.available()] + [(n, "[step-aware] ") for n in scorers.available_step_aware()]
    for name, mark in marks:
        doc = _script_doc(Path(scorers.__file__).with_name(f"{name}.py"))
        doc = doc.removeprefix(f"``{name}``: ")  # the toy and duo scorers' docstrings open with their own name
        rows.append((name, mark + doc))
    return rows


KINDS: dict[str, Callable[[], list[Row]]] = {
    "recipes": recipes,
    "configs": configs,
    "losses": loss_rows,
    "scorers": scorer_rows,
}


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``ls`` subcommand."""
    p = subparsers.add_parser("ls", help="list recipes, configs, losses or scorers", description="List what ships.")
    p.add_argument("kind", nargs="?", choices=list(KINDS), help="what to list (default: everything)")
    p.set_defaults(func=run)
    return p


def format_rows(rows: list[Row], indent: str = "", columns: int | None = None) -> str:
    """Two aligned columns; a description longer than the line is wrapped under its own column.

    ``columns``: the line width (default: the terminal's, ``COLUMNS`` if set, else 100).
    """
    width = max((len(name) for name, _ in rows), default=0)
    columns = columns or shutil.get_terminal_size((100, 24)).columns
    hanging = " " * (len(indent) + width + 2)
    text_width = max(columns - len(hanging), 30)  # a very narrow terminal still gets readable lines
    lines = []
    for name, desc in rows:
        wrapped = textwrap.wrap(desc, text_width, break_long_words=False, break_on_hyphens=False) or [""]
        lines.append(f"{indent}{name.ljust(width)}  {wrapped[0]}".rstrip())
        lines += [hanging + part for part in wrapped[1:]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print one kind, or every kind under a heading each."""
    kinds = [args.kind] if args.kind else list(KINDS)
    for i, kind in enumerate(kinds):
        rows = KINDS[kind]()
        if len(kinds) > 1:
            print(f"{'' if i == 0 else chr(10)}{kind}:")
        text = format_rows(rows, indent="  " if len(kinds) > 1 else "")
        print(text if rows else "  (none)")
    return 0
