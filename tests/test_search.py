"""The DPA factor search: coordinate ascent semantics, trial log, resolved recipe that reruns."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from conftest import write_recipe

from mergeengine import api, search
from mergeengine.cli import main
from mergeengine.errors import MergeEngineError, RecipeError
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


def test_search_on_disk_gives_the_same_trials(tmp_path, char_models, monkeypatch):
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # each trial's folder goes here, then is removed
    during = []
    load = CandidateEvaluator._load

    def mine():  # torch may put its own caches there too
        return sorted(p.name for p in scratch.iterdir() if p.name.startswith("mergeengine-"))

    def spy(self, tensors):
        during.append(mine())
        return load(self, tensors)

    monkeypatch.setattr(CandidateEvaluator, "_load", spy)
    mem = search.run_search(write_recipe(tmp_path, recipe_text(char_models, "[{step: a, partition: 0}]",
                                                              "max_steps: 1"), "m.yaml"))
    disk = search.run_search(write_recipe(tmp_path, recipe_text(char_models, "[{step: a, partition: 0}]",
                                                               "max_steps: 1\n          in_memory: never"), "d.yaml"))
    assert [(t.params, t.task_scores, t.score) for t in mem.trials] == [
        (t.params, t.task_scores, t.score) for t in disk.trials]
    assert len(disk.trials) == 2 and mine() == []
    assert during[:2] == [[], []] and all(len(d) == 1 and d[0].startswith("mergeengine-trial-") for d in during[2:])


def test_search_block_is_validated(tmp_path, char_models):
    r = write_recipe(tmp_path, recipe_text(char_models, "[{step: d, partition: 0}, {step: a, partition: 5}]"))
    with pytest.raises(RecipeError) as info:
        api.validate(r)
    text = str(info.value)
    assert "factor step 'd' is not a dpa_amplify step" in text and "no partition 5" in text


def space_recipe(root, strategy: str, space: str, extra: str = "") -> str:
    return f"""
        steps:
          - {{id: base, op: load, model: {root / 'base'}}}
          - {{id: ft, op: load, model: {root / 'ft'}}}
          - {{id: d, op: diff, model: ft, base: base}}
          - {{id: a, op: dpa_amplify, input: d, partitions: [{{density: 0.1, scale: 1.0}}, {{density: 0.3, scale: 0.0}}]}}
          - {{id: out, op: save, input: a, path: out}}
        search:
          tasks: {root / 'tasks.yaml'}
          strategy: {strategy}
          space: {space}
          {extra}
        """


def peaked_eval(self, candidate):
    """A smooth score with its peak at scales (1.3, 0.4): no model is built."""
    s0, s1 = [p.scale for p in candidate.recipe.steps[3].partitions]
    return {"add": 0.5 * math.exp(-((s0 - 1.3) ** 2) - (s1 - 0.4) ** 2)}


TWO_RANGES = "[{param: 'a.partitions[0].scale', range: [0.5, 2.0]}, {param: 'a.partitions[1].scale', range: [0, 1]}]"


def test_grid_tries_every_point_in_order(tmp_path, char_models, monkeypatch):
    monkeypatch.setattr(CandidateEvaluator, "__call__", peaked_eval)
    space = ("[{param: 'a.partitions[0].scale', choices: [1.0, 1.3]}, "
             "{param: 'a.partitions[1].scale', range: [0, 0.4], step: 0.2}]")
    result = search.run_search(write_recipe(tmp_path, space_recipe(char_models, "grid", space)))
    assert [list(t.params.values()) for t in result.trials] == [
        [1.0, 0.0], [1.0, 0.2], [1.0, 0.4], [1.3, 0.0], [1.3, 0.2], [1.3, 0.4]]
    assert result.best_params == {"a.partitions[0].scale": 1.3, "a.partitions[1].scale": 0.4}
    assert result.best_factors == {"a": [1.3, 0.4]}
    assert result.best_score == pytest.approx(1.0)


@pytest.mark.parametrize("strategy", ["random", "cma", "tpe"])
def test_seeded_strategies_repeat_and_stay_in_range(tmp_path, char_models, monkeypatch, strategy):
    pytest.importorskip({"random": "numpy", "cma": "cma", "tpe": "optuna"}[strategy])
    monkeypatch.setattr(CandidateEvaluator, "__call__", peaked_eval)

    def points(seed: int, name: str) -> list[list[float]]:
        extra = f"trials: 12\n          population: 4\n          seed: {seed}"
        r = write_recipe(tmp_path, space_recipe(char_models, strategy, TWO_RANGES, extra), name)
        result = search.run_search(r)
        assert len(result.trials) <= 12 and result.best_score == max(t.score for t in result.trials)
        return [list(t.params.values()) for t in result.trials]

    first, again, other = points(1, "a.yaml"), points(1, "b.yaml"), points(2, "c.yaml")
    assert first == again and first != other
    assert all(0.5 <= s0 <= 2.0 and 0 <= s1 <= 1 for s0, s1 in first)


def test_cma_improves_on_its_first_generation(tmp_path, char_models, monkeypatch):
    pytest.importorskip("cma")
    monkeypatch.setattr(CandidateEvaluator, "__call__", peaked_eval)
    extra = "trials: 40\n          population: 8\n          seed: 5"
    result = search.run_search(write_recipe(tmp_path, space_recipe(char_models, "cma", TWO_RANGES, extra)))
    assert result.best_score > max(t.score for t in result.trials[:8])
    assert result.best_score > 0.97


def test_space_is_validated_with_positions(tmp_path, char_models):
    space = ("[{param: 'aa.partitions[0].scale', range: [0, 1]}, {param: out.path, range: [0, 1]}, "
             "{param: 'a.partitions[5].scale', range: [0, 1]}, {param: 'a.partitions[0].density', range: [0.5, 1.5]}, "
             "{param: a.nothing, range: [0, 1]}]")
    r = write_recipe(tmp_path, space_recipe(char_models, "random", space, "trials: 4"))
    with pytest.raises(RecipeError) as info:
        api.validate(r)
    lines = info.value.problems
    assert len(lines) == 5, lines
    assert all(line.startswith(f"{r}:") and line.split(":")[1].isdigit() for line in lines)
    text = "\n".join(lines)
    assert "no step 'aa' (did you mean 'a'?)" in text
    assert "param 'out.path' is not a number in step 'out'" in text
    assert "'partitions[5]': the list has 2 element(s)" in text
    assert "param 'a.partitions[0].density' = 0.5 is not valid in step 'a': partition densities must be" in text
    assert "'nothing': no such field" in text


def test_grid_needs_a_step_and_budgets_are_required(tmp_path, char_models):
    r = write_recipe(tmp_path, space_recipe(char_models, "grid", TWO_RANGES), "g.yaml")
    with pytest.raises(RecipeError, match="a grid over a range needs 'step'"):
        api.validate(r)
    r = write_recipe(tmp_path, space_recipe(char_models, "cma", TWO_RANGES), "c.yaml")
    with pytest.raises(RecipeError, match=r"c\.yaml:\d+:\d+: .*strategy 'cma' needs a trial budget"):
        api.validate(r)


def test_a_field_left_at_its_default_is_written_in(tmp_path, char_models):
    from mergeengine.search.space import apply_point, current_values, dimensions

    text = f"""
        steps:
          - {{id: base, op: load, model: {char_models / 'base'}}}
          - {{id: ft, op: load, model: {char_models / 'ft'}}}
          - {{id: m, op: merge, method: task_arithmetic, base: base, inputs: [ft]}}
          - {{id: out, op: save, input: m, path: out}}
        search:
          tasks: {char_models / 'tasks.yaml'}
          strategy: random
          trials: 2
          space: [{{param: m.lambda, range: [0.5, 1.5]}}]
        """
    loaded = api.load_recipe(write_recipe(tmp_path, text))
    api.validate(loaded)
    dims = dimensions(loaded)
    assert current_values(loaded, dims) == {"m.lambda": 1.0}
    raw = apply_point(loaded, dims, {"m.lambda": 0.75})
    assert raw["steps"][2]["lambda"] == 0.75 and "search" not in raw and "lambda" not in loaded.raw["steps"][2]


def test_cli_shows_progress_and_the_best_so_far(tmp_path, char_models, monkeypatch, capsys):
    monkeypatch.setattr(CandidateEvaluator, "__call__", peaked_eval)
    space = "[{param: 'a.partitions[0].scale', choices: [1.0, 1.3, 1.6]}]"
    r = write_recipe(tmp_path, space_recipe(char_models, "grid", space))
    assert main(["search", str(r)]) == 0
    captured = capsys.readouterr()
    assert "3/3" in captured.err and f"best={math.exp(-0.16):.4f}" in captured.err  # trials done / planned
    assert "best {'a.partitions[0].scale': 1.3}" in captured.out
    resolved = yaml.safe_load((tmp_path / "recipe.resolved.yaml").read_text())
    assert resolved["steps"][3]["partitions"][0]["scale"] == 1.3


def test_a_log_from_another_search_is_refused_on_resume(tmp_path, char_models, monkeypatch):
    monkeypatch.setattr(CandidateEvaluator, "__call__", peaked_eval)
    r = write_recipe(tmp_path, space_recipe(char_models, "grid", "[{param: 'a.partitions[0].scale', choices: [1.0, 1.3]}]"))
    assert main(["search", str(r), "--quiet"]) == 0
    r = write_recipe(tmp_path, space_recipe(char_models, "grid", "[{param: 'a.partitions[0].scale', choices: [0.5, 1.3]}]"))
    with pytest.raises(MergeEngineError, match="trial 0 in .* has other parameters"):
        search.run_search(r, log=tmp_path / "recipe.search.jsonl", resume=True)


def test_a_second_search_of_the_same_recipe_is_refused_while_one_runs(tmp_path, char_models, capsys):
    """Two searches of one recipe would truncate and interleave one trial log: the second stops at once."""
    import os

    from mergeengine.io.output_guard import RunLock

    r = write_recipe(tmp_path, recipe_text(char_models, "[{step: a, partition: 0}]", "max_steps: 2"))
    log = tmp_path / "recipe.search.jsonl"
    log.write_text('{"trial": 0}\n')  # what the running search has logged so far
    with RunLock(log):
        assert main(["search", str(r), "--quiet"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"error: another run (pid {os.getpid()}) is writing {log}"
    assert log.read_text() == '{"trial": 0}\n' and not (tmp_path / "recipe.resolved.yaml").exists()


def test_a_full_disk_leaves_no_half_resolved_recipe(tmp_path, char_models, capsys, monkeypatch):
    import errno
    import os

    from mergeengine.io import output_guard

    def write_half(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    r = write_recipe(tmp_path, recipe_text(char_models, "[{step: a, partition: 0}]", "max_steps: 1"))
    (tmp_path / "recipe.resolved.yaml").write_text("# the previous resolved recipe\n")
    monkeypatch.setattr(output_guard, "_write_bytes", write_half)
    assert main(["search", str(r), "--quiet"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"error: {tmp_path / 'recipe.resolved.yaml'}: disk full while writing; free space and rerun"
    assert (tmp_path / "recipe.resolved.yaml").read_text() == "# the previous resolved recipe\n"
    assert not list(tmp_path.glob(".recipe.resolved.yaml.tmp-*"))
