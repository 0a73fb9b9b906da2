"""The second miniature (SmolLM2-135M-Instruct from its GGUF) end to end in --small mode.

A few training steps and prompts: the GGUF is dequantised and saved by a recipe, three experts are
fine-tuned, the base and experts are scored teacher-forced, Table 2 and Table 1 (sort only) run
through the engine's recipes and search, and the report section is written.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import smollm2_or_skip

pytest.importorskip("transformers")
pytest.importorskip("gguf")

MINIPAPER = Path(__file__).resolve().parents[1] / "benchmarks" / "minipaper"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory):
    smollm2_or_skip()
    torch.set_num_threads(1)
    sys.path.insert(0, str(MINIPAPER))
    try:
        mods = {name: importlib.import_module(name) for name in ("smol", "smol_experiment")}
    finally:
        sys.path.remove(str(MINIPAPER))
    root = tmp_path_factory.mktemp("smol")
    report = root / "doc" / "minipaper.md"
    report.parent.mkdir()
    report.write_text("# The first miniature\n\nkept as it is\n")
    argv = ["--small", "-q", "--cache-dir", str(root / "cache"), "--report", str(report)]
    assert mods["smol_experiment"].main(argv) == 0
    results = json.loads(next((root / "cache").glob("smol-run-*/experiment/results.json")).read_text())
    return mods, results, report, argv


def test_base_experts_and_task_files(smoke) -> None:
    mods, results, _, _ = smoke
    summary = results["train"]
    base = Path(summary["paths"]["base"])
    assert (base / "mergeengine.json").is_file() and json.loads((base / "config.json").read_text())["tie_word_embeddings"]
    acc = summary["accuracy"]["test"]
    assert set(acc) == {"base", "addition", "reverse", "sort"}
    for task in mods["smol"].TASKS:  # one step cannot teach a skill, but it makes its answers likelier
        assert acc[task][f"{task}:loglik"] > acc["base"][f"{task}:loglik"]
        assert all(0.0 <= acc[m][task] <= 1.0 for m in acc)
    from mergeengine.eval import load_tasks

    specs = load_tasks(summary["paths"]["tasks_test"]).tasks
    assert [t.scoring for t in specs] == ["teacher_forced"] * 3 and all(t.reference for t in specs)
    assert set(results["diagnostics"]["pairs"]) == {"addition/reverse", "addition/sort", "reverse/sort"}


def test_tables_follow_the_protocol(smoke) -> None:
    mods, results, _, _ = smoke
    settings = mods["smol_experiment"].small_settings()
    assert results["complete"] == {"table2": True, "table1": ["sort"]}
    assert list(results["table2"]) == list(settings.rows)
    for entry in results["table2"].values():
        assert all(lam in settings.lambdas for lam in entry["lambdas"]) and 0.0 <= entry["average"] <= 1.0
    cells = results["table1"]["sort"]
    assert list(cells) == list(settings.methods)
    searched = cells["dpa_unit"]["0.2"]
    assert "tasks.val.sort" in searched["search_tasks"] and searched["trials"][0]["factors"] == [1.0, 1.0]


def test_report_section_replaces_itself(smoke) -> None:
    mods, results, report, argv = smoke
    text = report.read_text()
    se = mods["smol_experiment"]
    assert text.startswith("# The first miniature\n\nkept as it is\n") and text.count(se.BEGIN) == 1
    for heading in ("## Second miniature", "### Table 2 (second miniature)", "### Table 1 (second miniature)"):
        assert heading in text
    assert "smol_experiment.py --small" in text and "Incomplete run" in text  # Table 1 covers sort only
    for name in ("minipaper_smol_merge.png", "minipaper_smol_pruning.png"):
        assert (report.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results_file = next(Path(argv[3]).glob("smol-run-*/experiment/results.json"))
    assert se.main([*argv, "--from-results", str(results_file)]) == 0
    assert report.read_text() == text
    lo, hi = se.wilson(0.5, 100)
    assert lo == pytest.approx(0.404, abs=1e-3) and hi == pytest.approx(0.596, abs=1e-3)


def test_parts_from_parallel_processes_are_merged(tmp_path: Path) -> None:
    sys.path.insert(0, str(MINIPAPER))
    try:
        se = importlib.import_module("smol_experiment")
    finally:
        sys.path.remove(str(MINIPAPER))
    results = {"settings": {}, "train": {"paths": {"experts": {"addition": "a", "reverse": "r", "sort": "s"}}},
               "table1": {}, "table2": {}, "complete": {"table2": False, "table1": []}, "seconds": {}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    for row in ("dppa_unit", "task_arithmetic"):
        (tmp_path / f"table2-{row}.json").write_text(json.dumps(
            {"table2": {row: {"average": 0.5}}, "seconds": 60.0, "settings": {"lambdas": [1.0]}}))
    (tmp_path / "table1-sort.json").write_text(json.dumps({"table1": {"sort": {"dp": {}}}, "seconds": 30.0}))
    merged = se.load_results(tmp_path / "results.json")
    assert list(merged["table2"]) == ["task_arithmetic", "dppa_unit"]  # Table 2's row order
    assert merged["complete"] == {"table2": False, "table2_rows": ["task_arithmetic", "dppa_unit"], "table1": ["sort"]}
    assert merged["settings_table2"] == {"lambdas": [1.0]} and merged["seconds"]["table1_parallel"] == 30.0
