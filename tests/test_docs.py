"""The recipe reference documents every op, method and parameter."""

from __future__ import annotations

from pathlib import Path

from mergeengine.methods import METHODS
from mergeengine.ops import OPS, _load_all

DOC = (Path(__file__).parent.parent / "docs" / "recipes.md").read_text()


def test_every_op_method_and_field_is_documented():
    _load_all()
    models = [(n, cls.Step) for n, cls in OPS.items()] + [(n, m.step) for n, m in METHODS.items()]
    for name, model in models:
        assert f"## {name}" in DOC or f"### {name}" in DOC or f"{name}" in DOC, name
        for field, info in model.model_fields.items():
            assert f"`{info.alias or field}`" in DOC, f"{name}.{info.alias or field} undocumented"
