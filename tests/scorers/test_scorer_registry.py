"""``diffalign.scorers``: listing, loading by name with "did you mean", lazy heavy imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from diffalign import scorers


def test_available_lists_the_scorers_only():
    published = ["aesthetic", "clipscore", "hpsv2", "imagereward", "pickscore"]
    published += ["source_similarity"]  # edits vs their sources (CLIP image-image), for the editing families
    toy = ["toyfaithfulness", "toyprominence", "toyreward"]  # diffalign.toy's analytic rewards
    toy += ["duocolor", "duocorrect", "duofaithfulness", "duoposition", "duoshape"]  # and the duo world's detectors
    assert scorers.available() == sorted(published + toy)


def test_unknown_name_suggests():
    with pytest.raises(KeyError, match="did you mean 'pickscore'"):
        scorers.load("pickscor")
    with pytest.raises(KeyError, match="unknown scorer 'base'"):
        scorers.load("base")


def test_listing_and_importing_scorer_modules_is_lazy():
    """transformers and open_clip are imported by ``load``, not by importing or listing the scorers."""
    code = (
        "import sys, diffalign.scorers as s\n"
        "from diffalign.scorers import aesthetic, clipscore, hpsv2, imagereward, pickscore, source_similarity\n"
        "from diffalign.scorers import toyreward\n"
        "s.available()\n"
        "print(sorted(m for m in ('transformers', 'open_clip', 'huggingface_hub') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
