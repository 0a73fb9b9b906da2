"""Every recipe under recipes/examples/ runs end to end on the tiny example models."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import read_folder

from mergeengine import api
from mergeengine.tiny import write_example_models

EXAMPLES = sorted((Path(__file__).parent.parent / "recipes" / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    write_example_models(root / "models")
    return root


@pytest.mark.parametrize("recipe", EXAMPLES, ids=lambda p: p.name)
def test_example_recipe_runs(recipe, example_dir):
    local = example_dir / recipe.name
    shutil.copy(recipe, local)
    result = api.run_recipe(local, overwrite=True)
    (folder,) = result.outputs.values()
    tensors = read_folder(folder)
    assert len(tensors) == 21 and (folder / "config.json").exists()
    assert result.stats.peak_live_bytes <= result.plan.estimate.peak_live_bytes


def test_there_is_an_example_per_method():
    text = "\n".join(p.read_text() for p in EXAMPLES)
    for method in ["task_arithmetic", "linear", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                   "magnitude_prune", "op: dare,", "dp_prune", "dpa_amplify", "trim_scope: model",
                   "method: slerp", "method: nuslerp", "method: multislerp", "method: karcher", "method: model_stock",
                   "method: della\n", "method: della_linear", "method: breadcrumbs_ties", "method: sce",
                   "method: nearswap", "method: passthrough", "method: arcee_fusion"]:
        assert method in text, method
