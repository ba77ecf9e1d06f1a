"""A training run on a source whose rows are mostly unusable stops with one line, alike on 1 and 2 processes."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffalign.data import TooManyBadRowsError
from tests.recipes.conftest import ROOT, run_subprocess, toy_overrides, two_process_command


def _table(root) -> None:
    """The standard layout, ``<root>/data/train-*.parquet``, with 2 of 16 image files present next to it."""
    folder = root / "data"
    (folder / "imgs").mkdir(parents=True)
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (30, 160, 30)).save(buf, format="PNG")
    for i in (0, 9):
        (folder / "imgs" / f"{i}.png").write_bytes(buf.getvalue())
    images = [f"imgs/{i}.png" for i in range(16)]
    pq.write_table(
        pa.table({"image": images, "caption": ["a green square"] * 16, "label": [i % 2 for i in range(16)]}),
        folder / "train-00000-of-00001.parquet",
    )


def test_mostly_missing_images_stop_the_run_before_any_lora_alike_on_two_processes(recipe, tiny_dirs, tmp_path):
    _table(tmp_path / "set")
    extra = {"data.format": "unpaired", "data.path": tmp_path / "set", "run.max_steps": 3, "run.save_every": 1}
    out = tmp_path / "one"
    with pytest.raises(TooManyBadRowsError) as err:
        recipe.main(["--config", "toy/kto", *toy_overrides(tiny_dirs["sd15"], out, **extra)])
    text = str(err.value)
    assert "\n" not in text and f"data.path={tmp_path / 'set'}: " in text
    assert "of 4 rows drawn so far are unusable" in text and "above data.max_bad_fraction=0.1" in text
    assert "most common reason" in text and "column 'image': image file not found: " in text
    assert text.endswith("fix the data, or raise data.max_bad_fraction (1 never stops)")
    assert not (out / "lora").exists() and not (out / "checkpoints").exists()

    half = {**extra, "optim.batch_size": 2}  # the same global batches of 4
    cmd = two_process_command("toy/kto", toy_overrides(tiny_dirs["sd15"], tmp_path / "two", **half))
    done = run_subprocess(cmd, ROOT, env={"ACCELERATE_USE_CPU": "true"})
    assert done.returncode != 0 and "2 processes" in done.stderr
    assert f"error: {text}" in done.stderr  # the same counts, reason and example row, as one line
    assert not (tmp_path / "two" / "lora").exists()

    recipe.main(
        [
            "--config",
            "toy/kto",
            *toy_overrides(tiny_dirs["sd15"], tmp_path / "lax", **extra, **{"data.max_bad_fraction": 1}),
        ]
    )
    assert (tmp_path / "lax" / "lora" / "pytorch_lora_weights.safetensors").is_file()
