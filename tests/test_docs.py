"""The recipe reference documents every op, method and parameter."""

from __future__ import annotations

from pathlib import Path

from mergeengine.ops import MERGE_METHODS, OPS, _load_all

DOC = (Path(__file__).parent.parent / "docs" / "recipes.md").read_text()


def test_every_op_method_and_field_is_documented():
    _load_all()
    for name, cls in [*OPS.items(), *MERGE_METHODS.items()]:
        assert f"## {name}" in DOC or f"### {name}" in DOC or f"{name}" in DOC, name
        for field, info in cls.Step.model_fields.items():
            assert f"`{info.alias or field}`" in DOC, f"{name}.{info.alias or field} undocumented"
