"""Every example recipe (and the variants in golden.py) writes exactly the recorded bytes."""

from __future__ import annotations

import json

import pytest
from golden import GOLDEN, SHAPES, output_hashes


@pytest.mark.parametrize("label", list(SHAPES))
def test_outputs_keep_their_bytes(label, tmp_path):
    expected = json.loads(GOLDEN.read_text())[label]
    got = output_hashes(tmp_path, SHAPES[label])
    assert got.keys() == expected.keys()
    changed = {recipe: sorted(f for f in files if got[recipe].get(f) != files[f])
               for recipe, files in expected.items() if got[recipe] != files}
    assert not changed
