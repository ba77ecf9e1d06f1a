"""Scoring folders (sidecar, mapping, prompt set by index), shared decoding, output files, run comparison."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffalign.eval import EvalError, compare_runs, folder_items, resolve_scorers, score_folder
from diffalign.eval.runner import write_run
from tests.eval.conftest import FOLDER, MeanScorer, brightness, save_solid


def test_score_folder_with_sidecars(sidecar_folder, tmp_path):
    out = tmp_path / "run"
    summary = score_folder(sidecar_folder, [MeanScorer(), MeanScorer("red", channel=0)], out, progress=False)
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rows] == sorted(name for name, _, _ in FOLDER)
    by_path = {name: (prompt, rgb) for name, prompt, rgb in FOLDER}
    for r in rows:
        prompt, rgb = by_path[r["path"]]
        assert r["prompt"] == prompt and r["seed"] is None
        assert r["brightness"] == pytest.approx(brightness(rgb), abs=1e-6)
        assert r["red"] == pytest.approx(rgb[0] / 255, abs=1e-6)
    assert {r["prompt"]: r["prompt_id"] for r in rows} == {"a cat": "00000", "a dog": "00001", "the sky": "00002"}
    expected = sum(brightness(rgb) for _, _, rgb in FOLDER) / len(FOLDER)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    st = summary["stats"]["brightness"]
    assert st["mean"] == pytest.approx(expected, abs=1e-6) and st["n_images"] == 6 and st["n_prompts"] == 3
    assert st["ci_low"] <= st["mean"] <= st["ci_high"]
    assert summary["scorers"]["red"] == {"name": "red", "variant": "mean-channel-0"}
    assert summary["kind"] == "score_folder" and summary["protocol"] is None
    assert (out / "report.html").stat().st_size > 0


def test_scorers_share_one_decoded_batch(sidecar_folder, tmp_path):
    a, b = MeanScorer("a"), MeanScorer("b", channel=2)
    score_folder(sidecar_folder, {"a": a, "b": b}, tmp_path / "run", batch_size=4, report=False, progress=False)
    assert [len(p) for _, p in a.calls] == [4, 2]
    assert [i for i, _ in a.calls] == [i for i, _ in b.calls]  # the very same list of decoded images


def test_mapping_file_with_seeds(tmp_path):
    root = tmp_path / "imgs"
    rows = []
    for i, (prompt, rgb) in enumerate([("red", (255, 0, 0)), ("green", (0, 255, 0)), ("red", (128, 0, 0))]):
        save_solid(root / f"sub/{i}.png", rgb)
        rows.append({"file_name": f"./sub/{i}.png", "prompt": prompt, "seed": 40 + i})
    mapping = tmp_path / "metadata.jsonl"
    mapping.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = folder_items(root, mapping)
    assert [(it.path, it.prompt, it.prompt_id, it.seed) for it in items] == [
        ("sub/0.png", "red", "00000", 40),
        ("sub/1.png", "green", "00001", 41),
        ("sub/2.png", "red", "00000", 42),
    ]
    save_solid(root / "extra.png", (0, 0, 0))
    with pytest.raises(EvalError, match=r"1 images have no row in .*metadata.jsonl.*: extra.png"):
        folder_items(root, mapping)
    (root / "extra.png").unlink()
    (root / "sub/2.png").unlink()
    with pytest.raises(EvalError, match=r"rows name images that do not exist.*sub/2.png"):
        folder_items(root, mapping)


def test_csv_mapping_with_custom_prompt_column(tmp_path):
    root = tmp_path / "imgs"
    save_solid(root / "x.png", (1, 2, 3))
    mapping = tmp_path / "map.csv"
    mapping.write_text("image,description\nx.png,a tiny square\n")
    with pytest.raises(EvalError, match="row 0: no 'prompt' or 'caption'"):
        folder_items(root, mapping)
    assert folder_items(root, mapping, key="description")[0].prompt == "a tiny square"


def test_prompt_set_matched_by_number_in_path(tmp_path):
    prompts = tmp_path / "evaluation_metadata.jsonl"
    prompts.write_text('{"tag": "a", "prompt": "p zero"}\n{"tag": "b", "prompt": "p one"}\n')
    root = tmp_path / "geneval"
    for idx, k in [(0, 0), (1, 0), (1, 1)]:
        save_solid(root / f"{idx:05d}/samples/{k:04d}.png", (idx, k, 0))
    items = folder_items(root, prompts)
    assert [(it.path, it.prompt, it.prompt_id) for it in items] == [
        ("00000/samples/0000.png", "p zero", "00000"),
        ("00001/samples/0000.png", "p one", "00001"),
        ("00001/samples/0001.png", "p one", "00001"),
    ]
    save_solid(root / "00007/samples/0000.png", (0, 0, 0))
    with pytest.raises(EvalError, match=r"'00007/samples/0000.png' names prompt 7, but .* has 2 prompts"):
        folder_items(root, prompts)


def test_missing_sidecar_and_empty_folder_are_errors(sidecar_folder, tmp_path):
    (sidecar_folder / "dog_1.txt").unlink()
    with pytest.raises(EvalError, match=r"1 images have no sidecar .txt prompt .*: dog_1.png"):
        folder_items(sidecar_folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="no images"):
        folder_items(tmp_path / "empty")


def test_existing_results_are_not_overwritten(sidecar_folder, tmp_path):
    out = tmp_path / "run"
    score_folder(sidecar_folder, [MeanScorer()], out, report=False, progress=False)
    with pytest.raises(EvalError, match="exists; pass overwrite=True"):
        score_folder(sidecar_folder, [MeanScorer()], out, report=False, progress=False)
    score_folder(sidecar_folder, [MeanScorer()], out, report=False, progress=False, overwrite=True)


def test_unreadable_image_error_names_its_path(sidecar_folder, tmp_path):
    png = sidecar_folder / "dog_1.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(png)
    png.write_bytes(png.read_bytes()[:1500])  # cut inside the pixel data: "image file is truncated"
    with pytest.raises(EvalError, match=r"cannot read image .*dog_1\.png"):
        score_folder(sidecar_folder, [MeanScorer()], tmp_path / "run", report=False, progress=False)


def test_sidecar_prompt_with_a_byte_order_mark(sidecar_folder):
    (sidecar_folder / "dog_0.txt").write_bytes(b"\xef\xbb\xbfa dog\n")
    items = {it.path: it for it in folder_items(sidecar_folder)}
    assert items["dog_0.png"].prompt == "a dog" and items["dog_0.png"].prompt_id == items["dog_1.png"].prompt_id


@pytest.fixture
def unwritable(tmp_path):
    """A folder this process cannot create files in (root ignores permission bits: then a /sys folder)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys/kernel")):
        try:
            (candidate / "probe").touch()
            (candidate / "probe").unlink()
        except OSError:
            yield candidate
            break
    else:
        pytest.skip("no unwritable folder available")
    folder.chmod(0o755)


def test_unwritable_output_folder_fails_before_any_scoring(sidecar_folder, unwritable):
    scorer = MeanScorer()
    with pytest.raises(EvalError, match=f"output folder {unwritable} is not writable"):
        score_folder(sidecar_folder, [scorer], unwritable, report=False, progress=False)
    assert scorer.calls == []


def test_scorer_keys_names_variants_and_bad_scorers():
    keys = resolve_scorers([MeanScorer("m"), MeanScorer("m", channel=1), MeanScorer("other")])
    assert list(keys) == ["m:mean-rgb", "m:mean-channel-1", "other"]
    with pytest.raises(EvalError, match="column 'm:mean-rgb'"):
        resolve_scorers([MeanScorer("m"), MeanScorer("m")])
    with pytest.raises(EvalError, match=r"'prompt'.*reserved"):
        resolve_scorers([MeanScorer("prompt")])
    with pytest.raises(EvalError, match="is not a scorer"):
        resolve_scorers([object()])
    with pytest.raises(EvalError, match="unknown scorer 'pickscor'; did you mean 'pickscore'"):
        resolve_scorers(["pickscor"])


def test_scorer_returning_wrong_shape_or_nan_is_named(sidecar_folder, tmp_path):
    class Bad(MeanScorer):
        def __call__(self, images, prompts):
            out = super().__call__(images, prompts)
            out[0] = float("nan")
            return out

    with pytest.raises(EvalError, match=r"non-finite bad scores for images.*a/cat_0.png"):
        score_folder(sidecar_folder, [Bad("bad")], tmp_path / "r", report=False, progress=False)


def _run(tmp_path, name, scores, protocol=None):
    """A run folder written by hand: ``scores`` maps prompt -> list of brightness values."""
    rows = [
        {"path": f"{name}/{p}_{k}.png", "prompt": p, "prompt_id": p, "seed": k, "brightness": v}
        for p, values in scores.items()
        for k, v in enumerate(values)
    ]
    out = tmp_path / name
    out.mkdir()
    summary = {"scorers": {"brightness": {"name": "brightness", "variant": "mean-rgb"}}, "protocol": protocol}
    write_run(out, rows, summary)
    return out


def test_compare_win_rate_by_hand(tmp_path):
    a = _run(
        tmp_path,
        "a",
        {"p1": [0.9, 0.7], "p2": [0.1, 0.3], "p3": [0.5], "p4": [0.6, 0.6], "only_a": [1.0]},
        {"steps": 20},
    )
    b = _run(
        tmp_path,
        "b",
        {"p1": [0.2, 0.4], "p2": [0.5, 0.5], "p3": [0.5], "p4": [0.1, 0.3], "only_b": [0.0]},
        {"steps": 50},
    )
    cmp = compare_runs(a, b, labels=("lora", "base"))
    c = cmp["scorers"]["brightness"]
    # prompt means A: p1 .8 p2 .2 p3 .5 p4 .6; B: p1 .3 p2 .5 p3 .5 p4 .2 -> wins p1 p4, tie p3, loss p2
    w = c["win_rate"]
    assert (w["wins"], w["ties"], w["losses"], w["n"]) == (2, 1, 1, 4)
    assert w["win_rate"] == pytest.approx(0.625)
    assert c["difference"]["mean"] == pytest.approx((0.5 - 0.3 + 0.0 + 0.4) / 4)
    assert c["lora"]["mean"] == pytest.approx((0.9 + 0.7 + 0.1 + 0.3 + 0.5 + 0.6 + 0.6 + 1.0) / 8)
    assert c["base"]["n_images"] == 8 and cmp["n_shared_prompts"] == 4
    assert any("prompts only in lora: 1, only in base: 1" in n for n in cmp["notes"])
    assert any("steps (20 vs 50)" in n for n in cmp["notes"])


def test_compare_flags_variant_mismatch_and_needs_a_shared_scorer(tmp_path):
    a = _run(tmp_path, "a", {"p": [0.5]})
    b = _run(tmp_path, "b", {"p": [0.4]})
    summary_b = json.loads((b / "summary.json").read_text())
    summary_b["scorers"]["brightness"]["variant"] = "other"
    (b / "summary.json").write_text(json.dumps(summary_b))
    assert any("different scorer variants" in n for n in compare_runs(a, b)["notes"])
    summary_b["scorers"] = {"sharpness": {"name": "sharpness", "variant": "x"}}
    (b / "summary.json").write_text(json.dumps(summary_b))
    with pytest.raises(EvalError, match="share no scorer"):
        compare_runs(a, b)
    with pytest.raises(EvalError, match=r"no scores\.jsonl"):
        compare_runs(a, tmp_path / "nowhere")
