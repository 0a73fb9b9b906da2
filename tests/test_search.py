"""The DPA factor search: coordinate ascent semantics, trial log, resolved recipe that reruns."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from conftest import write_recipe

from mergeengine import api, search
from mergeengine.cli import main
from mergeengine.errors import RecipeError
from mergeengine.search.trial import CandidateEvaluator

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def char_models(tmp_path_factory):
    from mergeengine.eval.charlevel import build_char_tokenizer
    from mergeengine.tiny import LlamaShape, fine_tune, make_weights, write_checkpoint

    root = tmp_path_factory.mktemp("charmodels")
    tok = build_char_tokenizer()
    shape = LlamaShape(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_attention_heads=2,
                       num_key_value_heads=1)
    base = make_weights(shape, 0)
    for name, w in [("base", base), ("ft", fine_tune(base, 1, scale=0.01))]:
        write_checkpoint(root / name, w, shape)
        tok.save_pretrained(root / name)
    (root / "val.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n"
                                            for i in range(6)))
    (root / "tasks.yaml").write_text(yaml.safe_dump({"tasks": [
        {"name": "add", "path": "val.jsonl", "max_new_tokens": 2, "reference": 0.5}]}))
    return root


def recipe_text(root, factors: str, extra: str = "") -> str:
    return f"""
        steps:
          - {{id: base, op: load, model: {root / 'base'}}}
          - {{id: ft, op: load, model: {root / 'ft'}}}
          - {{id: d, op: diff, model: ft, base: base}}
          - {{id: a, op: dpa_amplify, input: d, partitions: [{{density: 0.1, scale: 1.0}}, {{density: 0.3, scale: 0.0}}]}}
          - {{id: out, op: save, input: a, path: out}}
        search:
          tasks: {root / 'tasks.yaml'}
          factors: {factors}
          {extra}
        """


def test_coordinate_ascent_semantics(tmp_path, char_models, monkeypatch):
    seen = []

    def fake_eval(self, candidate):
        scales = [p.scale for p in candidate.recipe.steps[3].partitions]
        seen.append(scales)
        s0, s1 = scales
        return {"add": 0.5 * math.exp(-((s0 - 1.3) ** 2) - (s1 - 1.2) ** 2)}

    monkeypatch.setattr(CandidateEvaluator, "__call__", fake_eval)
    r = write_recipe(tmp_path, recipe_text(char_models, "[{step: a, partition: 0}, {step: a, partition: 1}]"))
    result = search.run_search(r)
    # factor 0 climbs 1.0 -> 1.3 (1.4 is worse); factor 1 starts below 0.1, so at 1.0, climbs to 1.2
    assert result.best_factors == {"a": [1.3, 1.2]}
    assert [t.factors["a"] for t in result.trials] == [
        [1.0, 0.0], [1.1, 0.0], [1.2, 0.0], [1.3, 0.0], [1.4, 0.0],
        [1.3, 1.0], [1.3, 1.1], [1.3, 1.2], [1.3, 1.3]]
    assert len(seen) == len(result.trials)  # each candidate evaluated once
    assert result.best_score == pytest.approx(1.0)
    steps = {s["id"]: s for s in result.resolved["steps"]}
    assert [p["scale"] for p in steps["a"]["partitions"]] == [1.3, 1.2] and "search" not in result.resolved


def test_real_search_writes_a_resolved_recipe_that_reruns(tmp_path, char_models):
    r = write_recipe(tmp_path, recipe_text(char_models, "[{step: a, partition: 0}]", "max_steps: 2"))
    assert main(["search", str(r), "--quiet"]) == 0
    resolved = tmp_path / "recipe.resolved.yaml"
    log = [json.loads(line) for line in (tmp_path / "recipe.search.jsonl").read_text().splitlines()]
    assert log and {"trial", "params", "task_scores", "score", "wall_s", "worker"} <= set(log[0])
    data = yaml.safe_load(resolved.read_text())
    assert "search" not in data
    api.run_recipe(resolved)
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_search_on_disk_gives_the_same_trials(tmp_path, char_models):
    mem = search.run_search(write_recipe(tmp_path, recipe_text(char_models, "[{step: a, partition: 0}]",
                                                              "max_steps: 1"), "m.yaml"))
    disk = search.run_search(write_recipe(tmp_path, recipe_text(char_models, "[{step: a, partition: 0}]",
                                                               "max_steps: 1\n          in_memory: never"), "d.yaml"))
    assert [(t.params, t.task_scores, t.score) for t in mem.trials] == [
        (t.params, t.task_scores, t.score) for t in disk.trials]


def test_search_block_is_validated(tmp_path, char_models):
    r = write_recipe(tmp_path, recipe_text(char_models, "[{step: d, partition: 0}, {step: a, partition: 5}]"))
    with pytest.raises(RecipeError) as info:
        api.validate(r)
    text = str(info.value)
    assert "factor step 'd' is not a dpa_amplify step" in text and "no partition 5" in text
