"""The merge-method contract (mergeengine.methods) with methods registered in the test itself:
models or deltas, optional base, PerInput, Literal/bool/required fields, the engine's generator,
element-wise chunking, and the registry's errors."""

from __future__ import annotations

import textwrap
from typing import Literal

import pytest
import torch
from conftest import load_tensors, read_folder

from mergeengine import api
from mergeengine.errors import MergeEngineError, RecipeError
from mergeengine.methods import METHODS, PerInput, get_method, merge_method

SEEN: list[dict] = []


@pytest.fixture
def test_methods():
    """Two methods registered for one test, then removed."""

    @merge_method(name="probe_models", inputs="models", base="optional")
    def probe_models(base: torch.Tensor | None, models: list[torch.Tensor], *, shift: PerInput[float] = 0.0,
                     generator: torch.Generator) -> torch.Tensor:
        """The mean of the models plus sum(shift); records what it was given."""
        SEEN.append({"base": base, "n": len(models), "shift": shift, "draw": torch.rand(1, generator=generator)})
        return torch.stack(models).mean(0) + sum(shift)

    @merge_method(name="probe_chunks", inputs="deltas", elementwise=True)
    def probe_chunks(base: torch.Tensor, deltas: list[torch.Tensor], *, factor: float,
                     mode: Literal["sum", "max"] = "sum", negate: bool = False) -> torch.Tensor:
        """base + factor * (sum or max of the deltas), optionally negated."""
        SEEN.append({"numel": base.numel()})
        merged = torch.stack(deltas).sum(0) if mode == "sum" else torch.stack(deltas).amax(0)
        return base + (-factor if negate else factor) * merged

    SEEN.clear()
    yield
    METHODS.pop("probe_models")
    METHODS.pop("probe_chunks")


def _recipe(tmp_path, models, merge: str, name: str = "r.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(f"""\
        seed: 5
        steps:
          - {{id: base, op: load, model: {models['base']}}}
          - {{id: math, op: load, model: {models['math']}}}
          - {{id: code, op: load, model: {models['code']}}}
          - {{id: d_math, op: diff, model: math, base: base}}
          - {{id: m, op: merge, {merge}}}
          - {{id: out, op: save, input: m, path: {tmp_path / name.replace('.yaml', '')}, dtype: float32}}
        """))
    return path


def test_models_method_gets_models_and_a_seeded_generator(test_methods, tmp_path, models):
    r = _recipe(tmp_path, models, "method: probe_models, base: base, inputs: [d_math, code], shift: [0.25, 0.5]")
    api.run_recipe(r)
    base, math = load_tensors(models["base"], as_float=True), load_tensors(models["math"], as_float=True)
    code = load_tensors(models["code"], as_float=True)
    out = read_folder(tmp_path / "r")
    for n in base:  # the delta input came back as base + delta
        expected = torch.stack([base[n] + (math[n] - base[n]), code[n]]).mean(0) + 0.75
        torch.testing.assert_close(out[n], expected)
    assert all(s["base"] is not None and s["n"] == 2 and s["shift"] == [0.25, 0.5] for s in SEEN)
    first = [s["draw"] for s in SEEN]
    SEEN.clear()
    api.run_recipe(r, overwrite=True)  # the generator depends on seed, step and tensor only
    assert all(torch.equal(a, s["draw"]) for a, s in zip(first, SEEN, strict=True))
    assert len({float(d) for d in first}) == len(first)  # one generator per tensor

    SEEN.clear()
    nobase = _recipe(tmp_path, models, "method: probe_models, inputs: [math, code]", "nobase.yaml")
    api.run_recipe(nobase)
    assert SEEN and all(s["base"] is None for s in SEEN)
    with pytest.raises(RecipeError, match="'d_math' is a delta; method 'probe_models' merges models"):
        api.validate(_recipe(tmp_path, models, "method: probe_models, inputs: [d_math, code]", "bad.yaml"))


def test_elementwise_method_is_streamed_in_chunks(test_methods, tmp_path, models, monkeypatch):
    from mergeengine.ops import chunks

    merge = "method: probe_chunks, base: base, inputs: [d_math, code], factor: 0.5, mode: max, negate: true"
    api.run_recipe(_recipe(tmp_path, models, merge, "whole.yaml"))
    monkeypatch.setattr(chunks, "CHUNK_NUMEL", 1000)
    SEEN.clear()
    api.run_recipe(_recipe(tmp_path, models, merge, "chunked.yaml"))
    assert max(s["numel"] for s in SEEN) == 1000
    whole, chunked = read_folder(tmp_path / "whole"), read_folder(tmp_path / "chunked")
    base, math = load_tensors(models["base"], as_float=True), load_tensors(models["math"], as_float=True)
    code = load_tensors(models["code"], as_float=True)
    for n in base:
        assert torch.equal(whole[n], chunked[n]), n
        expected = base[n] - 0.5 * torch.maximum(math[n] - base[n], code[n] - base[n])
        torch.testing.assert_close(whole[n], expected)


def test_method_fields_are_validated(test_methods, tmp_path, models):
    cases = {
        "method: probe_chunks, base: base, inputs: [d_math]": "missing required field 'factor'",
        "method: probe_chunks, base: base, inputs: [d_math], factor: 1, mode: min": "field 'mode'",
        "method: probe_chunks, base: base, inputs: [d_math], factor: .inf": "field 'factor'",
        "method: probe_models, inputs: [math, code], shift: [1, 2, 3]": "shift has 3 entries but inputs has 2",
        "method: probe_models, inputs: [math, code], shfit: 1": "unknown field 'shfit' (did you mean 'shift'?)",
    }
    for merge, message in cases.items():
        with pytest.raises(RecipeError) as info:
            api.validate(_recipe(tmp_path, models, merge))
        assert f"{tmp_path / 'r.yaml'}:7:" in str(info.value) and message in str(info.value), (merge, info.value)


def test_registry_errors():
    with pytest.raises(MergeEngineError, match="Unknown merge method 'nope'. Available: .*task_arithmetic"):
        get_method("nope")
    with pytest.raises(MergeEngineError, match="merge method 'ties' is registered twice"):
        merge_method(name="ties")(lambda base, deltas: base)
    with pytest.raises(TypeError, match=r"signature must be \(base, inputs, \*, parameters...\)"):
        merge_method(name="bad_signature")(lambda base: base)
    with pytest.raises(TypeError, match="parameter 'x' needs a type hint"):
        def untyped(base, deltas, *, x=1): return base
        merge_method(name="untyped")(untyped)
    assert "bad_signature" not in METHODS and "untyped" not in METHODS
