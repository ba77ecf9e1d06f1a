"""Every ```python block of README.md runs as written, so the README stays true.

Each block runs on its own (a fresh namespace, a temporary current folder, offline). A block that cannot run here
because it is about real hub weights says so on the line directly before its fence:
``<!-- readme-test: skip (reason) -->``. Nothing else skips a block: an unmarked block that fails fails this test.
The skips are counted (``SKIPPED``), so a new one is a visible change to this file, not a quiet marker.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest


README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = re.compile(r"^\s*<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->\s*$")
SKIPPED = 2  # the diffusers pipeline on SDXL with a trained LoRA; NPO guidance with trained SDXL LoRAs


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    code: str
    skip: str | None  # the marker's reason


def python_blocks(text: str) -> list[Block]:
    """The ```python blocks of ``text``; a skip marker anywhere but right before one is an error."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if MARKER.match(lines[i]) and not (i + 1 < len(lines) and lines[i + 1].strip() == "```python"):
            raise AssertionError(f"README.md:{i + 1}: a readme-test marker must stand right before a ```python fence")
        if lines[i].strip() == "```python":
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
            assert end is not None, f"README.md:{i + 1}: unclosed ```python block"
            marker = MARKER.match(lines[i - 1]) if i else None
            code = textwrap.dedent("\n".join(lines[i + 1 : end]))
            blocks.append(Block(i + 1, code, marker["reason"].strip() if marker else None))
            i = end
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_parser_honours_markers_and_refuses_stray_ones():
    text = "x\n<!-- readme-test: skip (hub) -->\n```python\na = 1\n```\n\n```python\n  b = 2\n```\n"
    assert python_blocks(text) == [Block(3, "a = 1", "hub"), Block(7, "b = 2", None)]
    with pytest.raises(AssertionError, match=r"README\.md:2: a readme-test marker"):
        python_blocks("x\n<!-- readme-test: skip (hub) -->\n\n```python\na = 1\n```\n")


def test_skips_are_marked_with_a_reason_and_counted():
    skipped = [(b.line, b.skip) for b in BLOCKS if b.skip]
    assert len(skipped) == SKIPPED, f"skipped README blocks changed: {skipped}"
    assert len(BLOCKS) > SKIPPED  # at least one block runs


@pytest.mark.parametrize("block", [b for b in BLOCKS if not b.skip], ids=lambda b: f"README.md:{b.line}")
def test_readme_python_block_runs(block, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(block.code, f"README.md:{block.line}", "exec"), {"__name__": "__readme__"})
