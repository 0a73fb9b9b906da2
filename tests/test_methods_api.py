"""The merge-method API end to end: a third-party package registers ``max_abs`` under the
``mergeengine.methods`` entry-point group, a recipe uses it, and its fields are validated."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import load_tensors, read_folder

PLUGIN = '''
import torch
from mergeengine.methods import merge_method

@merge_method(name="max_abs", inputs="deltas")
def max_abs(base: torch.Tensor, deltas: list[torch.Tensor], *, scale: float = 1.0) -> torch.Tensor:
    """Per entry the delta of largest magnitude, times scale, added to the base."""
    stacked = torch.stack(deltas)
    return base + scale * stacked.gather(0, stacked.abs().argmax(0, keepdim=True))[0]
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "mergeengine-max-abs-example"
version = "0.1.0"

[project.entry-points."mergeengine.methods"]
max_abs = "mergeengine_max_abs"

[tool.setuptools]
py-modules = ["mergeengine_max_abs"]
'''


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                          capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def max_abs_plugin(tmp_path_factory):
    """The example package, pip-installed into this interpreter's environment for the module's tests."""
    src = tmp_path_factory.mktemp("plugin")
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "mergeengine_max_abs.py").write_text(PLUGIN)
    done = _pip("install", "--no-deps", "--no-build-isolation", "--no-index", str(src))
    assert done.returncode == 0, done.stderr
    yield src
    _pip("uninstall", "-y", "mergeengine-max-abs-example")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The CLI in a fresh interpreter (the registry reads the entry points at start-up)."""
    return subprocess.run([sys.executable, "-m", "mergeengine", *args], cwd=cwd, capture_output=True, text=True,
                          check=False)


def _recipe(tmp_path: Path, models: dict[str, Path], extra: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(f"""\
        steps:
          - {{id: base, op: load, model: {models['base']}}}
          - {{id: math, op: load, model: {models['math']}}}
          - {{id: code, op: load, model: {models['code']}}}
          - {{id: d1, op: diff, model: math, base: base}}
          - {{id: d2, op: diff, model: code, base: base}}
          - {{id: m, op: merge, method: max_abs, base: base, inputs: [d1, d2], {extra}}}
          - {{id: out, op: save, input: m, path: {tmp_path / 'out'}}}
        """))
    return path


def test_third_party_method_runs_in_a_recipe(max_abs_plugin, models, tmp_path):
    recipe = _recipe(tmp_path, models, "scale: 0.5")
    done = _cli("run", str(recipe), "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    base = load_tensors(models["base"], as_float=True)
    math, code = load_tensors(models["math"], as_float=True), load_tensors(models["code"], as_float=True)
    out = read_folder(tmp_path / "out")
    assert out.keys() == base.keys()
    for name, b in base.items():
        d1, d2 = math[name] - b, code[name] - b
        largest = torch.where(d1.abs() >= d2.abs(), d1, d2)  # argmax keeps the first on ties
        expected = (b + 0.5 * largest).to(torch.bfloat16)
        assert torch.equal(out[name], expected), name


def test_third_party_method_fields_are_validated(max_abs_plugin, models, tmp_path):
    recipe = _recipe(tmp_path, models, "scal: 0.5")
    done = _cli("validate", str(recipe), cwd=tmp_path)
    assert done.returncode == 1
    assert f"{recipe}:7:71:" in done.stderr and "step 'm': unknown field 'scal' (did you mean 'scale'?)" in done.stderr
    bad = _recipe(tmp_path, models, "scale: .nan")
    done = _cli("validate", str(bad), cwd=tmp_path)
    assert done.returncode == 1 and "step 'm': field 'scale'" in done.stderr and "finite" in done.stderr
    ok = _recipe(tmp_path, models, "scale: 2")
    assert _cli("validate", str(ok), cwd=tmp_path).returncode == 0
