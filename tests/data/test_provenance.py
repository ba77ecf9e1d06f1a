"""diffalign.data.provenance: finding a labelled source's provenance.json and checking data.labelled_by."""

from __future__ import annotations

import json

import pytest

from diffalign.data import provenance


def test_find_looks_in_the_folder_of_a_path_file_or_glob_and_the_one_above(tmp_path, monkeypatch):
    pairs = tmp_path / "labels" / "pairs"
    (pairs / "data").mkdir(parents=True)
    (pairs / "data" / "train-00000.parquet").write_bytes(b"")
    (pairs / provenance.FILE).write_text(
        json.dumps({"scorers": ["toyreward"], "prompts": {"source": "p", "count": 2}})
    )
    want = pairs / provenance.FILE
    for path in (pairs, pairs / "data", pairs / "data" / "train-00000.parquet", pairs / "data" / "*.parquet"):
        assert provenance.find(str(path)) == want, path
    monkeypatch.chdir(pairs)  # a Hub id or a missing path never picks up a provenance.json of the working folder
    assert provenance.find("owner/dataset") is None and provenance.find("missing/folder") is None
    provenance.check_labelled_by(str(pairs), "toyreward")
    provenance.check_labelled_by("owner/dataset", None)
    with pytest.raises(provenance.ProvenanceError) as err:
        provenance.check_labelled_by(str(pairs), "duofaithfulness")
    text = str(err.value)
    assert "\n" not in text and f"data.path={pairs} holds labels ranked by toyreward (prompts p, 2 of them" in text
    assert "but this config is for labels ranked by duofaithfulness (data.labelled_by)" in text
    with pytest.raises(provenance.ProvenanceError, match=r"data\.path=owner/dataset carries no label provenance"):
        provenance.check_labelled_by("owner/dataset", "duofaithfulness")
