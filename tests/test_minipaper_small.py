"""The miniature paper experiment, end to end in --small mode: data, training, evaluation, cache."""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

MINIPAPER = Path(__file__).resolve().parents[1] / "benchmarks" / "minipaper"


@pytest.fixture(scope="module")
def minipaper():
    """The benchmark's modules (data, train), imported from benchmarks/minipaper."""
    sys.path.insert(0, str(MINIPAPER))
    try:
        yield {name: importlib.import_module(name) for name in ("data", "train")}
    finally:
        sys.path.remove(str(MINIPAPER))


@pytest.fixture(scope="module")
def small_run(minipaper, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("minipaper-cache")
    summary = minipaper["train"].run(minipaper["train"].small_config(), cache)
    return summary, cache


def test_data_is_deterministic_and_splits_disjoint(minipaper) -> None:
    data = minipaper["data"]
    cfg = data.DataConfig(n_train=50, n_val=20, n_test=30, pretrain_docs=5)
    for task in data.TASKS:
        a, b = data.make_splits(task, cfg), data.make_splits(task, cfg)
        assert a == b
        prompts = {split: {r["prompt"] for r in records} for split, records in a.items()}
        assert len(prompts["test"]) == 30 and len(prompts["val"]) == 20
        assert not (prompts["test"] & prompts["val"]) and not (
            prompts["train"] & (prompts["test"] | prompts["val"])
        )
    prompt, answer = data.addition_example(__import__("random").Random(0), cfg)
    a, b = prompt.rstrip("=").split("+")
    assert int(answer) == int(a) + int(b)


def test_pretraining_never_shows_an_evaluation_string(minipaper) -> None:
    """The base sees reverse/sort in prose and in task format, but never on a val/test string."""
    import re

    data = minipaper["data"]
    cfg = data.DataConfig(n_train=10, n_val=40, n_test=60, max_letters=3, pretrain_docs=3000)
    held_out = data.held_out_strings(cfg)
    assert 150 < len(held_out) <= 200  # 100 prompts per task; the two tasks may share a string
    text = "\n".join(data.pretrain_documents(cfg))
    seen = set(re.findall(r"(?:reverse: |sort: |the reverse of )([a-z]+)", text))
    seen |= set(re.findall(r"([a-z]+) in order is", text))
    assert "reverse: " in text and "the reverse of " in text and " in order is " in text
    assert len(seen) > 500 and not (seen & held_out)


def test_models_are_hf_folders(small_run) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary, _ = small_run
    folders = [Path(summary["paths"]["base"])] + [Path(p) for p in summary["paths"]["experts"].values()]
    assert len(folders) == 5  # base, three experts, addition-large
    for folder in folders:
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (folder / name).is_file(), f"{folder.name}/{name} missing"
    tokenizer = AutoTokenizer.from_pretrained(folders[1])
    assert tokenizer.decode(tokenizer("12+34=46\n")["input_ids"], skip_special_tokens=True) == "12+34=46\n"
    model = AutoModelForCausalLM.from_pretrained(folders[1])
    assert model.config.vocab_size == len(tokenizer)


def test_summary_numbers_and_expert_learned(small_run) -> None:
    summary, _ = small_run
    experts = {e["name"] or e["task"]: e["task"] for e in summary["config"]["experts"]}
    assert experts == {"addition": "addition", "reverse": "reverse", "sort": "sort", "addition-large": "addition"}
    assert summary["config"]["merge_experts"] == ["addition", "reverse", "sort"]
    test_acc = summary["accuracy"]["test"]
    assert set(test_acc) == {"base", *experts}
    for model_scores in test_acc.values():
        for task in ("addition", "reverse", "sort"):
            assert 0.0 <= model_scores[task] <= 1.0
    # a few steps do not teach a skill, but they must make the expert's answers likelier than the base's
    for label, task in experts.items():
        assert test_acc[label][f"{task}:loglik"] > test_acc["base"][f"{task}:loglik"]
    delta = {label: stats["mean_abs_delta_linear"] for label, stats in summary["delta"].items()}
    assert set(delta) == set(experts) and min(delta.values()) > 0
    assert delta["addition-large"] > delta["addition"] > delta["sort"]


def test_task_files_with_references_work_with_mergeengine_eval(small_run) -> None:
    from mergeengine.eval import load_tasks

    summary, _ = small_run
    for split in ("val", "test"):
        specs = load_tasks(summary["paths"][f"tasks_{split}"]).tasks
        assert [t.name for t in specs] == ["addition", "reverse", "sort"]
        for t in specs:
            assert t.reference == pytest.approx(
                max(summary["accuracy"][split][t.name][t.name], 1e-6), abs=1e-6
            )


def test_rerun_is_served_from_the_cache(minipaper, small_run) -> None:
    train = minipaper["train"]
    summary, cache = small_run
    stamp = {p: p.stat().st_mtime_ns for p in cache.rglob("model.safetensors")}
    again = train.run(train.small_config(), cache)
    assert json.dumps(again, sort_keys=True) == json.dumps(summary, sort_keys=True)
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("model.safetensors")} == stamp
    changed = train.small_config()
    changed = dataclasses.replace(
        changed, experts=(dataclasses.replace(changed.experts[0], steps=3), *changed.experts[1:])
    )
    paths, changed_paths = train.Paths(cache, train.small_config()), train.Paths(cache, changed)
    assert paths.base == changed_paths.base and paths.expert("sort") == changed_paths.expert("sort")
    assert paths.expert("addition") != changed_paths.expert("addition")


def test_experiment_small_end_to_end(minipaper, small_run, tmp_path: Path) -> None:
    """Tables 1 and 2, the plots and the report come out of the reduced run, numbers in range."""
    sys.path.insert(0, str(MINIPAPER))
    try:
        experiment = importlib.import_module("experiment")
    finally:
        sys.path.remove(str(MINIPAPER))
    _, cache = small_run
    report = tmp_path / "minipaper.md"
    assert experiment.main(["--small", "-q", "--cache-dir", str(cache), "--report", str(report),
                            "--img-dir", str(tmp_path / "img")]) == 0
    results = json.loads((cache.glob("run-*/experiment/results.json").__next__()).read_text())
    settings = experiment.small_settings()

    t1 = results["table1"]
    assert set(t1) == {"addition", "reverse", "sort", "addition-large"}
    for methods in t1.values():
        assert list(methods) == list(experiment.METHODS)
        for method, cells in methods.items():
            assert sorted(map(float, cells)) == list(settings.densities)
            for cell in cells.values():
                assert 0.0 <= cell["accuracy"] <= 1.0 and cell["relative"] >= 0.0
                assert len(cell["runs"]) == (settings.seeds if method == "dare" else 1)
                if method in experiment.DPA_STARTS:  # searched on validation, from its start, upwards only
                    assert "tasks.val." in cell["search_tasks"]
                    start = list(experiment.DPA_STARTS[method])
                    assert cell["trials"][0]["factors"] == start
                    assert cell["factors"][0] >= start[0] and cell["factors"][1] >= 1.0
                    assert 0.0 <= cell["val_relative"]

    t2 = results["table2"]
    assert list(t2) == list(experiment.MERGES)
    for row, entry in t2.items():
        assert set(entry["accuracy"]) == {"addition", "reverse", "sort"}
        assert all(0.0 <= a <= 1.0 for a in entry["accuracy"].values())
        assert 0.0 <= entry["average"] <= 1.0
        assert all(lam in settings.lambdas for lam in entry["lambdas"])
        assert len(entry["runs"]) == (settings.seeds if row == "dare_ties" else 1)
        if row.startswith("dppa"):
            assert entry["search_tasks"].endswith("tasks.val.yaml")
            assert entry["lambda_for_search"] in settings.lambdas
            assert entry["search_recipe"]["steps"][-2]["lambda"] == entry["lambda_for_search"]
            assert set(entry["factors"]) == {"addition", "reverse", "sort"} and entry["trials"]

    text = report.read_text()
    for heading in ("## Table 1", "## Table 2", "## The paper's claims, measured", "## Reading"):
        assert heading in text
    for label in [*experiment.METHODS.values(), *(m[0] for m in experiment.MERGES.values())]:
        assert label in text
    assert "experiment.py --small" in text
    for name in ("minipaper_pruning.png", "minipaper_merge.png"):
        png = tmp_path / "img" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert f"img/{name}" in text
