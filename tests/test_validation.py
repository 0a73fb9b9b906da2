"""Every class of recipe error: one line each, with file:line:col, the step and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_recipe

from mergeengine import api
from mergeengine.cli import main
from mergeengine.errors import ModelError, RecipeError, ShapeError

HEAD = """
steps:
  - {id: base, op: load, model: ./b}
  - {id: ft, op: load, model: ./f}
"""


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(RecipeError) as info:
        api.validate(write_recipe(tmp_path, text))
    return info.value.problems


def test_malformed_yaml(tmp_path):
    (line,) = problems(tmp_path, "steps:\n  - {id: a, op: load\n")
    assert line.startswith(f"{tmp_path}/recipe.yaml:3:") and "invalid YAML" in line


def test_unknown_field_with_suggestion_and_position(tmp_path):
    (line,) = problems(
        tmp_path,
        HEAD
        + """  - id: merged
    op: merge
    method: task_arithmetic
    base: base
    inputs: [ft]
    lamda: 0.7
""",
    )
    assert (
        line.endswith(
            "recipe.yaml:9:5: step 'merged': unknown field 'lamda' (did you mean 'lambda'?); "
            "allowed: method, base, inputs, weights, lambda, vocab"
        )
        or "recipe.yaml:9:5: step 'merged': unknown field 'lamda' (did you mean 'lambda'?)" in line
    )


def test_unknown_op_and_method(tmp_path):
    lines = problems(
        tmp_path,
        HEAD + "  - {id: x, op: difff, model: ft, base: base}\n"
        "  - {id: y, op: merge, method: tie, base: base, inputs: [ft]}\n",
    )
    assert "step 'x': unknown op 'difff' (did you mean 'diff'?)" in lines[0]
    assert "step 'y': unknown merge method 'tie' (did you mean 'ties'?)" in lines[1]


def test_parameter_ranges(tmp_path):
    lines = problems(
        tmp_path,
        HEAD
        + """  - {id: d, op: diff, model: ft, base: base}
  - {id: p, op: dp_prune, input: d, density: 1.5}
  - {id: q, op: dp_prune, input: d, density: 0}
  - {id: m, op: merge, method: task_arithmetic, base: base, inputs: [d, d], weights: [1]}
""",
    )
    assert any("step 'p': field 'density'" in x and ":5:" in x for x in lines)
    assert any("step 'q': field 'density'" in x for x in lines)
    assert any("step 'm'" in x and "weights has 1 entries but inputs has 2" in x for x in lines)


def test_missing_required_field(tmp_path):
    (line,) = problems(tmp_path, HEAD + "  - {id: d, op: diff, model: ft}\n")
    assert "step 'd': missing required field 'base'" in line


def test_unknown_and_later_references(tmp_path):
    lines = problems(
        tmp_path,
        HEAD
        + """  - {id: m, op: merge, method: task_arithmetic, base: base, inputs: [d_ft, dd]}
  - {id: d_ft, op: diff, model: ft, base: base}
  - {id: out, op: save, input: mergd}
""",
    )
    text = "\n".join(lines)
    assert "step 'out': field 'input' refers to unknown step 'mergd'" in text
    assert "step 'm': field 'inputs' refers to unknown step 'dd'" in text
    assert "step 'm': uses step 'd_ft', which comes later" in text
    assert "recipe.yaml:4:" in text  # the line of step m


def test_cycle_is_named(tmp_path):
    lines = problems(
        tmp_path,
        """
steps:
  - {id: base, op: load, model: ./b}
  - {id: a, op: diff, model: b, base: base}
  - {id: b, op: diff, model: a, base: base}
""",
    )
    assert any("cycle: " in x and "a -> b -> a" in x or "b -> a -> b" in x for x in lines)


def test_kind_checks(tmp_path):
    lines = problems(
        tmp_path,
        HEAD
        + """  - {id: d, op: diff, model: ft, base: base}
  - {id: dd, op: diff, model: d, base: base}
  - {id: p, op: dp_prune, input: ft, density: 0.2}
  - {id: m, op: merge, method: task_arithmetic, base: d, inputs: [d]}
  - {id: l, op: merge, method: linear, inputs: [d, ft]}
""",
    )
    text = "\n".join(lines)
    assert "step 'dd': 'd' is a delta; diff takes two models" in text
    assert "step 'p': 'ft' is a model; dp_prune takes a delta" in text
    assert "step 'm': 'd' is a delta; the base must be a model" in text
    assert "step 'l': 'd' is a delta; method 'linear' merges models" in text


def test_duplicate_ids(tmp_path):
    (line,) = problems(tmp_path, HEAD + "  - {id: ft, op: load, model: ./g}\n")
    assert "duplicate step id" in line and "recipe.yaml:4:" in line


def test_validate_reads_no_weights(tmp_path):
    # the models do not exist: validation must not look at them
    api.validate(write_recipe(tmp_path, HEAD + "  - {id: d, op: diff, model: ft, base: base}\n"))


def test_missing_model_is_one_line(tmp_path, capsys):
    r = write_recipe(
        tmp_path,
        HEAD + "  - {id: m, op: merge, method: task_arithmetic, base: base, inputs: [ft]}\n"
        "  - {id: out, op: save, input: m, path: out}\n",
    )
    with pytest.raises(ModelError, match="model not found"):
        api.plan_recipe(r)
    assert main(["run", str(r)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(tmp_path / "b") in err[0]


def test_shape_mismatch_lists_everything(tmp_path, models):
    from mergeengine.tiny import LlamaShape, make_weights, write_checkpoint

    other = LlamaShape(intermediate_size=160)
    write_checkpoint(tmp_path / "f", make_weights(other, 3), other)
    r = write_recipe(
        tmp_path,
        f"""
        steps:
          - {{id: base, op: load, model: {models["base"]}}}
          - {{id: ft, op: load, model: ./f}}
          - {{id: d, op: diff, model: ft, base: base}}
          - {{id: out, op: save, input: d, path: out}}
        """,
    )
    with pytest.raises(ShapeError) as info:
        api.plan_recipe(r)
    msg = str(info.value)
    assert msg.startswith("step 'd': ")
    assert msg.count("shape [") == 6  # gate/up/down in both layers, all reported at once


def test_cli_validate_exit_codes(tmp_path, capsys):
    good = write_recipe(tmp_path, HEAD + "  - {id: d, op: diff, model: ft, base: base}\n", "good.yaml")
    assert main(["validate", str(good)]) == 0
    bad = write_recipe(
        tmp_path, HEAD + "  - {id: d, op: diff, model: ft, base: base, vocab: drop}\n", "bad.yaml"
    )
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.yaml:4:" in err and "step 'd': field 'vocab'" in err


def test_recipe_file_missing(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 1
    assert "recipe file not found" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("recipes/**/*.yaml")), ids=str)
def test_every_shipped_recipe_validates(path):
    api.validate(path)
