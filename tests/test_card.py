"""Model card (README.md front matter, recipe, hashes) and mergeengine.json round-trip."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from mergeengine.io.card import front_matter, write_model_card

RECIPE_YAML = textwrap.dedent(
    """\
    name: math-code
    seed: 7
    steps:
      - {id: base, op: load, model: org/base, revision: main}
      - {id: math, op: load, model: ./models/math}
      - {id: code, op: load, model: org/code}
      - {id: merged, op: merge, method: ties, base: base, inputs: [math, code], density: 0.5}
      - {id: out, op: save, input: merged, path: ./out}
    """
)
SHA_BASE = "1" * 64
SHA_MATH = "2" * 64
SHA_CODE_1, SHA_CODE_2 = "3" * 64, "4" * 64


def make_provenance() -> dict[str, Any]:
    recipe = yaml.safe_load(RECIPE_YAML)
    return {
        "mergeengine_version": "0.1.0",
        "seed": 7,
        "device": "cpu",
        "created": "2025-01-01T00:00:00+00:00",
        "inputs": {
            "base": {
                "model": "org/base",
                "resolved_path": "/hub/snap",
                "revision": "main",
                "resolved_revision": "a" * 40,
                "files": {"model.safetensors": SHA_BASE},
            },
            "math": {
                "model": "./models/math",
                "resolved_path": "/r/models/math",
                "revision": None,
                "resolved_revision": None,
                "files": {"model.safetensors": SHA_MATH},
            },
            "code": {
                "model": "org/code",
                "resolved_path": "/hub/snap2",
                "revision": None,
                "resolved_revision": "b" * 40,
                "files": {
                    "model-00001-of-00002.safetensors": SHA_CODE_1,
                    "model-00002-of-00002.safetensors": SHA_CODE_2,
                },
            },
        },
        "steps": {"merged": {"method": "ties", "density": 0.5, "lambda": 1.0, "dtype": Path("x")}},
        "recipe": recipe,
    }


@pytest.fixture
def written(tmp_path: Path) -> Path:
    write_model_card(
        tmp_path,
        recipe_name="math-code",
        recipe_yaml=RECIPE_YAML,
        base_models=["org/base", "./models/math", "org/code"],
        methods=["ties"],
        provenance=make_provenance(),
    )
    return tmp_path


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    assert text.startswith("---\n")
    head, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(head), body


def test_front_matter_lists_hub_ids_only(written: Path) -> None:
    meta, _ = split_front_matter((written / "README.md").read_text())
    assert meta == {
        "base_model": ["org/base", "org/code"],
        "library_name": "transformers",
        "tags": ["mergeengine", "merge", "ties"],
    }


def test_front_matter_omits_base_model_without_hub_ids() -> None:
    meta = front_matter(["./models/a", "/abs/b", "a/b/c"], ["task_arithmetic", "ties", "ties"])
    assert "base_model" not in meta
    assert meta["tags"] == ["mergeengine", "merge", "task_arithmetic", "ties"]
    # a local folder spelled like org/name is not a hub id when provenance says it resolved locally
    inputs = {"x": {"model": "models/base", "resolved_revision": None}}
    assert "base_model" not in front_matter(["models/base"], [], inputs)


def test_readme_has_recipe_and_provenance(written: Path) -> None:
    _, body = split_front_matter((written / "README.md").read_text())
    assert "# math-code" in body
    assert "```yaml\n" + RECIPE_YAML.rstrip("\n") + "\n```" in body
    for sha in (SHA_BASE, SHA_MATH, SHA_CODE_1, SHA_CODE_2, "a" * 40, "b" * 40):
        assert sha in body
    assert "0.1.0" in body and "`cpu`" in body and "`7`" in body
    assert "density: 0.5" in body  # resolved step parameters


def test_mergeengine_json_round_trips(written: Path) -> None:
    text = (written / "mergeengine.json").read_text()
    doc = json.loads(text)
    assert yaml.safe_load(text) == doc  # the recipe loader reads it as YAML
    prov = make_provenance()
    recipe = prov.pop("recipe")
    assert {k: v for k, v in doc.items() if k != "provenance"} == recipe
    assert doc["provenance"]["inputs"] == prov["inputs"]
    assert doc["provenance"]["seed"] == 7
    assert doc["provenance"]["steps"]["merged"]["dtype"] == "x"  # non-JSON values become strings
    assert "recipe" not in doc["provenance"]


def test_rerun_provenance_does_not_nest(tmp_path: Path) -> None:
    prov = make_provenance()
    prov["recipe"] = {**prov["recipe"], "provenance": {"seed": 1}}
    write_model_card(
        tmp_path, recipe_name="r", recipe_yaml="steps: []\n", base_models=[], methods=[], provenance=prov
    )
    doc = json.loads((tmp_path / "mergeengine.json").read_text())
    assert doc["provenance"]["seed"] == 7 and "provenance" not in doc["provenance"]


def test_recipe_with_backticks_keeps_its_fence(tmp_path: Path) -> None:
    recipe = "description: |\n  ```code```\nsteps: []\n"
    write_model_card(
        tmp_path, recipe_name="r", recipe_yaml=recipe, base_models=[], methods=[], provenance={"recipe": {}}
    )
    assert "````yaml\n" + recipe + "````" in (tmp_path / "README.md").read_text()
