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


def test_models_are_hf_folders(small_run) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary, _ = small_run
    folders = [Path(summary["paths"]["base"])] + [Path(p) for p in summary["paths"]["experts"].values()]
    assert len(folders) == 4
    for folder in folders:
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (folder / name).is_file(), f"{folder.name}/{name} missing"
    tokenizer = AutoTokenizer.from_pretrained(folders[1])
    assert tokenizer.decode(tokenizer("12+34=46\n")["input_ids"], skip_special_tokens=True) == "12+34=46\n"
    model = AutoModelForCausalLM.from_pretrained(folders[1])
    assert model.config.vocab_size == len(tokenizer)


def test_summary_numbers_and_expert_learned(small_run) -> None:
    summary, _ = small_run
    tasks = [e["task"] for e in summary["config"]["experts"]]
    assert tasks == ["addition", "reverse", "sort"]
    test_acc = summary["accuracy"]["test"]
    assert set(test_acc) == {"base", *tasks}
    for model_scores in test_acc.values():
        for task in tasks:
            assert 0.0 <= model_scores[task] <= 1.0
    # a few steps do not teach a skill, but they must make the expert's answers likelier than the base's
    for task in tasks:
        assert test_acc[task][f"{task}:loglik"] > test_acc["base"][f"{task}:loglik"]
    for stats in summary["delta"].values():
        assert stats["mean_abs_delta_linear"] > 0
    assert (
        summary["delta"]["addition"]["mean_abs_delta_linear"]
        > summary["delta"]["sort"]["mean_abs_delta_linear"]
    )


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
