"""Model card and mergeengine.json: provenance, and a rerun that reproduces the same bytes."""

from __future__ import annotations

import hashlib
import json

import yaml
from conftest import write_recipe

from mergeengine import api
from mergeengine.cli import main


def test_card_provenance_and_rerun_from_mergeengine_json(tmp_path, models):
    r = write_recipe(tmp_path, f"""
        name: card-test
        seed: 11
        steps:
          - {{id: base, op: load, model: {models['base']}}}
          - {{id: math, op: load, model: {models['math_sharded']}}}
          - {{id: d, op: diff, model: math, base: base}}
          - {{id: merged, op: merge, method: dare_ties, base: base, inputs: [d], density: 0.5}}
          - {{id: out, op: save, input: merged, path: out}}
        """)
    api.run_recipe(r)
    out = tmp_path / "out"
    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "transformers"
    assert {"mergeengine", "merge", "dare_ties"} <= set(front["tags"])
    assert "base_model" not in front  # local inputs are not hub ids
    assert "method: dare_ties" in card  # the recipe itself
    prov = json.loads((out / "mergeengine.json").read_text())
    shard = sorted((models["math_sharded"]).glob("*.safetensors"))[0]
    digest = hashlib.sha256(shard.read_bytes()).hexdigest()
    assert prov["provenance"]["inputs"]["math"]["files"][shard.name] == digest
    assert digest in card
    assert prov["provenance"]["seed"] == 11 and prov["provenance"]["steps"]["merged"]["density"] == 0.5
    assert prov["seed"] == 11 and prov["steps"][0]["model"] == str(models["base"])

    assert main(["run", str(out / "mergeengine.json"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
