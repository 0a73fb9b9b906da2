"""A search over merge weights scored by a local lm-eval task: sequential, pool and Ray agree; resume after a kill.

The models are built the Hugging Face way (a random tiny ``LlamaForCausalLM``, saved with
``save_pretrained``) with a character tokenizer built offline; the task is a local lm-eval YAML
over local JSONL data.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mergeengine.cli import main
from mergeengine.search import run_search

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from search_throughput import build_miniature, write_search_recipe  # noqa: E402

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")
pytest.importorskip("cma")

@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    return build_miniature(tmp_path_factory.mktemp("hfmodels"))


def comparable(trials) -> list[tuple]:
    return [(t.index, t.params, t.task_scores, t.score) for t in trials]


def log_lines(path: Path) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted(({k: v for k, v in r.items() if k not in ("wall_s", "worker")} for r in lines),
                  key=lambda r: r["trial"])


@pytest.fixture(scope="module")
def sequential(hf_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("seq")
    recipe = write_search_recipe(folder, hf_models)
    log = folder / "recipe.search.jsonl"
    return run_search(recipe, log=log), log


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_sequential_search_scores_lm_eval_trials(sequential, hf_models):
    import transformers

    from mergeengine.eval.lmeval import LmEvalScorer
    from mergeengine.recipe.schema import LmEvalTasks

    result, log = sequential
    # normalised by the dense expert's score, evaluated by lm-eval on the expert's own folder here
    expert = transformers.AutoModelForCausalLM.from_pretrained(hf_models / "expert_a")
    tok = transformers.AutoTokenizer.from_pretrained(hf_models / "expert_a")
    scorer = LmEvalScorer(LmEvalTasks(lm_eval=["tiny_next"], include_path=str(hf_models / "lm_tasks")),
                          hf_models, batch_size=32, limit=None)
    assert result.references == scorer(expert, tok)
    for t in result.trials:
        assert t.score == pytest.approx(t.task_scores["tiny_next"] / result.references["tiny_next"])
    assert [t.index for t in result.trials] == list(range(8))
    scores = [t.score for t in result.trials]
    assert len(set(scores)) > 1, scores  # the weights change the lm-eval score
    assert result.best_score == max(scores)
    assert all(set(t.task_scores) == {"tiny_next"} for t in result.trials)
    assert result.resolved["steps"][3]["lambda"] == result.best_params["merged.lambda"]
    assert result.resolved["steps"][3]["weights"][1] == result.best_params["merged.weights[1]"]
    assert len(log_lines(log)) == 8


def test_pool_gives_the_same_trials_and_best(sequential, hf_models, tmp_path):
    result, log = sequential
    pool = run_search(write_search_recipe(tmp_path, hf_models), workers=2, log=tmp_path / "p.jsonl")
    assert comparable(pool.trials) == comparable(result.trials)
    assert pool.best_params == result.best_params
    assert log_lines(tmp_path / "p.jsonl") == log_lines(log)
    workers = {r["worker"] for r in map(json.loads, (tmp_path / "p.jsonl").read_text().splitlines())}
    assert 1 <= len(workers) <= 2 and not any(w.endswith(f":{os.getpid()}") for w in workers)


def test_ray_gives_the_same_trials_and_best(sequential, hf_models, tmp_path, local_ray):
    result, log = sequential
    ray_result = run_search(write_search_recipe(tmp_path, hf_models), ray="local", log=tmp_path / "r.jsonl")
    assert local_ray.is_initialized()  # a Ray the caller started is left running
    assert comparable(ray_result.trials) == comparable(result.trials)
    assert ray_result.best_params == result.best_params
    assert log_lines(tmp_path / "r.jsonl") == log_lines(log)


def test_killed_search_resumes_to_the_same_log(sequential, hf_models, tmp_path):
    """A real ``mergeengine search`` killed with SIGKILL after some trials, then ``--resume``."""
    _, full_log = sequential
    recipe = write_search_recipe(tmp_path, hf_models)
    log = tmp_path / "recipe.search.jsonl"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
    proc = subprocess.Popen([sys.executable, "-m", "mergeengine", "search", str(recipe), "--quiet"], env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(log.read_text().splitlines())
    assert 3 <= done < 8, done
    assert not (tmp_path / "recipe.resolved.yaml").exists()
    assert main(["search", str(recipe), "--resume", "--quiet"]) == 0
    assert log_lines(log) == log_lines(full_log)
    resolved = yaml.safe_load((tmp_path / "recipe.resolved.yaml").read_text())
    assert "search" not in resolved and resolved["steps"][3]["op"] == "merge"


def test_report_draws_the_landscape(sequential, tmp_path):
    pytest.importorskip("matplotlib")
    _, log = sequential
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(Path(log).with_name("recipe.yaml").read_text())
    (tmp_path / "recipe.search.jsonl").write_text(log.read_text())
    assert main(["search", str(recipe), "--report", "--quiet"]) == 0
    png = tmp_path / "recipe.search.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_a_failing_trial_in_a_worker_is_one_line(hf_models, tmp_path):
    from mergeengine.errors import MergeEngineError

    recipe = write_search_recipe(tmp_path, hf_models, trials=2)
    data = yaml.safe_load(recipe.read_text())
    data["search"]["tasks"]["include_path"] = str(tmp_path / "no_tasks")
    data["search"]["references"] = {"tiny_next": 0.5}
    recipe.write_text(yaml.safe_dump(data))
    with pytest.raises(MergeEngineError, match=r"^.*no_tasks: lm-eval include_path is not a folder$") as info:
        run_search(recipe, workers=2)
    assert info.value.file == str(tmp_path / "no_tasks")  # the fields cross the process boundary too


def overflowing_search(folder: Path, hf_models: Path) -> Path:
    """A search whose one trial overflows float32 in the merge (a NonFiniteError naming step and tensor)."""
    recipe = write_search_recipe(folder, hf_models)
    data = yaml.safe_load(recipe.read_text())
    data["steps"][3]["weights"] = [1.0e38, 1.0e38]
    data["search"] = {"tasks": data["search"]["tasks"], "references": {"tiny_next": 0.5}, "strategy": "grid",
                      "space": [{"param": "merged.lambda", "choices": [3.0e38]}]}
    recipe.write_text(yaml.safe_dump(data))
    return recipe


def test_a_trial_failing_in_a_worker_keeps_its_error_class_and_fields(hf_models, tmp_path, capsys):
    """``mergeengine search --workers 2`` whose trial overflows float32: the worker's NonFiniteError, one line."""
    recipe = overflowing_search(tmp_path, hf_models)
    assert main(["search", str(recipe), "--workers", "2", "--quiet"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: step 'merged': tensor '") and "NaN/Inf" in line, line



def test_a_trial_failing_on_ray_keeps_its_error_class_and_fields(hf_models, tmp_path, local_ray):
    from mergeengine.errors import NonFiniteError

    with pytest.raises(NonFiniteError) as info:
        run_search(overflowing_search(tmp_path, hf_models), ray="local")
    assert info.value.step == "merged" and info.value.tensor
