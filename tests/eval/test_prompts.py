"""Prompt-set loaders: every supported layout, the shipped lists, and errors that name the file, row and key."""

from __future__ import annotations

import json
import time

import pytest

from diffalign.eval.prompts import EvalError, digest, load_prompts


def test_txt_skips_blank_lines_and_numbers_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red cube\n\n  a blue ball  \n")
    recs = load_prompts(f)
    assert [(r.prompt_id, r.prompt, r.meta) for r in recs] == [
        ("00000", "a red cube", {}),
        ("00001", "a blue ball", {}),
    ]


def test_jsonl_prompt_or_caption_key(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "one", "id": 7}\n\n{"caption": "two"}\n')
    recs = load_prompts(f)
    assert [r.prompt for r in recs] == ["one", "two"]
    assert recs[0].meta == {"id": 7}


def test_geneval_metadata_keeps_tag_and_objects(tmp_path):
    f = tmp_path / "evaluation_metadata.jsonl"
    rows = [
        {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
        {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [], "prompt": "a photo of two cats"},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = load_prompts(f)
    assert [r.prompt for r in recs] == ["a photo of a bench", "a photo of two cats"]
    assert recs[1].meta["tag"] == "counting" and recs[1].meta["include"] == [{"class": "cat", "count": 2}]


def test_jsonl_missing_key_names_file_row_and_expected_keys(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "ok"}\n{"text_prompt": "no"}\n')
    with pytest.raises(EvalError) as e:
        load_prompts(f)
    msg = str(e.value)
    assert str(f) in msg and "row 1" in msg and "'prompt' or 'caption'" in msg and "text_prompt" in msg
    with pytest.raises(EvalError, match="no 'text_prompt' key"):
        load_prompts(f, key="text_prompt")


def test_jsonl_invalid_line_is_named(tmp_path):
    f = tmp_path / "broken.jsonl"
    f.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(EvalError, match=r"broken.jsonl line 2: invalid JSON"):
        load_prompts(f)


def test_drawbench_csv_and_partiprompts_tsv(tmp_path):
    draw = tmp_path / "drawbench.csv"
    draw.write_text('Prompts,Category\n"A red colored car.",Colors\n"Three cats, one dog.",Counting\n')
    recs = load_prompts(draw)
    assert [r.prompt for r in recs] == ["A red colored car.", "Three cats, one dog."]
    assert recs[1].meta == {"category": "Counting"}
    parti = tmp_path / "PartiPrompts.tsv"
    parti.write_text(
        "Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t\na tiger in a lab coat\tAnimals\tImagination\t\n"
    )
    recs = load_prompts(parti)
    assert [r.prompt for r in recs] == ["bond", "a tiger in a lab coat"]
    assert recs[1].meta == {"category": "Animals", "challenge": "Imagination", "note": ""}


def test_csv_without_prompt_column_names_file_and_columns(tmp_path):
    f = tmp_path / "dpg.csv"
    f.write_text("item_id,description\n1,a cat\n")
    with pytest.raises(EvalError) as e:
        load_prompts(f)
    assert str(f) in str(e.value) and "item_id, description" in str(e.value)
    assert [r.prompt for r in load_prompts(f, key="description")] == ["a cat"]


def test_empty_prompt_is_an_error(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text('prompt\nfine\n"  "\n')
    with pytest.raises(EvalError, match="row 1: empty"):
        load_prompts(f)


def test_hpsv2_json_list_dict_and_style_folder(tmp_path):
    bench = tmp_path / "benchmark"
    bench.mkdir()
    (bench / "anime.json").write_text(json.dumps(["a girl, anime style", "a robot"]))
    (bench / "photo.json").write_text(json.dumps(["a harbour at dawn"]))
    single = load_prompts(bench / "anime.json")
    assert [r.prompt for r in single] == ["a girl, anime style", "a robot"]
    recs = load_prompts(bench)
    assert [(r.prompt_id, r.meta["style"]) for r in recs] == [
        ("anime/00000", "anime"),
        ("anime/00001", "anime"),
        ("photo/00000", "photo"),
    ]
    styles = tmp_path / "styles.json"
    styles.write_text(json.dumps({"paintings": ["an oil painting"], "concept-art": ["a castle"]}))
    assert [(r.prompt, r.meta["style"]) for r in load_prompts(styles)] == [
        ("an oil painting", "paintings"),
        ("a castle", "concept-art"),
    ]
    objects = tmp_path / "papv2.json"
    objects.write_text(json.dumps([{"prompt": "x"}, {"caption": "y"}]))
    assert [r.prompt for r in load_prompts(objects)] == ["x", "y"]


def test_parquet_with_caption_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "validation_unique.parquet"
    pq.write_table(pa.table({"caption": ["a", "b", "c"], "ranking_id": [1, 2, 3]}), f)
    recs = load_prompts(f, limit=2)
    assert [(r.prompt, r.meta) for r in recs] == [("a", {"ranking_id": 1}), ("b", {"ranking_id": 2})]


def test_shipped_lists():
    default = load_prompts("default")
    assert len(default) == 16 and len({r.prompt for r in default}) == 16
    assert len(load_prompts("validation")) == 4


def test_unknown_local_source_and_suffix(tmp_path):
    with pytest.raises(EvalError, match="not found"):
        load_prompts(tmp_path / "nope.txt")
    with pytest.raises(EvalError, match=r"not found.*default"):
        load_prompts("defualt")
    bad = tmp_path / "p.yaml"
    bad.write_text("- a\n")
    with pytest.raises(EvalError, match=r"unsupported prompt file type '\.yaml'"):
        load_prompts(bad)


def test_hub_id_fails_fast_and_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(EvalError) as e:
        load_prompts("diffalign-tests/no-such-prompt-set")
    assert time.perf_counter() - t0 < 10
    assert "'diffalign-tests/no-such-prompt-set'" in str(e.value) and "offline mode is on" in str(e.value)


def test_digest_depends_on_text_and_order(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a\nb\n")
    g = tmp_path / "q.txt"
    g.write_text("b\na\n")
    assert digest(load_prompts(f)) == digest(load_prompts(f)) != digest(load_prompts(g))
    assert len(digest(load_prompts(f))) == 64


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("p.txt", "a red cube\na blue ball\n"),
        ("p.jsonl", '{"prompt": "a red cube"}\n{"prompt": "a blue ball"}\n'),
        ("p.json", '["a red cube", "a blue ball"]'),
        ("p.csv", "prompt,category\na red cube,x\na blue ball,y\n"),
    ],
)
def test_a_utf8_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path, name, text):
    """Windows editors save UTF-8 with a BOM; it must not end up in prompt 0 (or break the JSON / CSV header)."""
    f = tmp_path / name
    f.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert [r.prompt for r in load_prompts(f)] == ["a red cube", "a blue ball"]
