"""The second miniature (SmolLM2-135M-Instruct from its GGUF) end to end in --small mode.

A few training steps and prompts on the base's first two layers: the GGUF is dequantised, sliced and
saved by a recipe, three experts are fine-tuned, the base and experts are scored teacher-forced,
Table 2 (task arithmetic, DPPA) and Table 1 (sort only: DP, DP+DPA) run through the engine's recipes
and search with the λ grids and search trials swept in memory, every choice is checked against its
real build, and the report section is written.
"""

from __future__ import annotations

import importlib
import json
import os
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
    argv = ["--small", "-q", "--cache-dir", str(root / "cache"), "--report", str(report), "--jobs", "2"]
    assert mods["smol_experiment"].main(argv) == 0
    results_file = next((root / "cache").glob("smol-run-*/experiment/results.json"))
    return mods, mods["smol_experiment"].merged_results(results_file, True), report, argv


def test_base_experts_and_task_files(smoke) -> None:
    mods, results, _, _ = smoke
    summary = results["train"]
    base = Path(summary["paths"]["base"])
    config = json.loads((base / "config.json").read_text())
    assert (base / "mergeengine.json").is_file() and config["tie_word_embeddings"] and config["num_hidden_layers"] == 2
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
    assert results["complete"] == {"table2": True, "table2_rows": list(settings.rows), "table1": ["sort"],
                                   "table1_densities": {"sort": ["0.2"]}}
    assert list(results["table2"]) == list(settings.rows)
    for entry in results["table2"].values():
        assert all(lam in settings.lambdas for lam in entry["lambdas"]) and 0.0 <= entry["average"] <= 1.0
    dppa = results["table2"]["dppa_unit"]
    assert dppa["trials"][0]["factors"] == {f"p_{t}": [1.0, 1.0] for t in mods["smol"].TASKS}
    assert len(dppa["trials"]) > 1 and dppa["lambda_for_search"] in settings.lambdas
    cells = results["table1"]["sort"]
    assert list(cells) == list(settings.methods)
    searched = cells["dpa_unit"]["0.2"]
    assert "tasks.val.sort" in searched["search_tasks"] and searched["trials"][0]["factors"] == [1.0, 1.0]


def test_every_choice_matches_its_real_build(smoke) -> None:
    _, results, _, _ = smoke
    checks = results["checks"]  # one per Table 2 row (one seed each) and per searched Table 1 cell
    assert [c["where"].split(" λ")[0] for c in checks] == [
        "table2 task_arithmetic seed 0", "table2 dppa_unit seed 0", "table1 sort dpa_unit d 0.2"]
    for c in checks:
        assert c["max_abs_delta"] > 0 and c["max_abs_diff"] < 1e-5 and c["same_val"], c
    assert results["seconds"]["in_memory_candidates"] > len(checks)  # the sweeps ran in memory


def test_report_section_replaces_itself(smoke) -> None:
    mods, results, report, argv = smoke
    text = report.read_text()
    se = mods["smol_experiment"]
    assert text.startswith("# The first miniature\n\nkept as it is\n") and text.count(se.BEGIN) == 1
    for heading in ("## Second miniature", "### Table 2 (second miniature)", "### Table 1 (second miniature)"):
        assert heading in text
    assert "smol_experiment.py --small --jobs 2" in text and "Incomplete run" in text  # Table 1 covers sort only
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
    for row, written in (("dppa_unit", 1000.0), ("task_arithmetic", 1100.0)):
        path = tmp_path / f"table2-{row}.json"
        path.write_text(json.dumps({"table2": {row: {"average": 0.5}}, "seconds": 60.0, "settings": {"lambdas": [1.0]},
                                    "checks": [{"where": row}]}))
        os.utime(path, (written, written))
    path = tmp_path / "table1-sort.json"
    path.write_text(json.dumps({"table1": {"sort": {"dp": {"0.2": {}, "0.1": {}}}}, "seconds": 30.0,
                                "checks": [{"where": "sort"}]}))
    os.utime(path, (1200.0, 1200.0))
    path = tmp_path / "table1-sort+0.5,0.2.json"  # another process's densities of the same expert
    path.write_text(json.dumps({"table1": {"sort": {"dp": {"0.5": {"n": 1}, "0.2": {"n": 2}}}}, "seconds": 10.0}))
    os.utime(path, (1150.0, 1150.0))
    merged = se.load_results(tmp_path / "results.json")
    assert merged["table1"]["sort"]["dp"] == {"0.2": {}, "0.1": {}, "0.5": {"n": 1}}  # the first part's cells win
    assert list(merged["table2"]) == ["task_arithmetic", "dppa_unit"]  # Table 2's row order
    assert merged["complete"] == {"table2": False, "table2_rows": ["task_arithmetic", "dppa_unit"], "table1": ["sort"],
                                  "table1_densities": {"sort": ["0.1", "0.2", "0.5"]}}
    assert merged["settings_table2"] == {"lambdas": [1.0]} and len(merged["checks"]) == 3
    assert merged["seconds"]["wall_parallel"] == pytest.approx(1200.0 - 940.0)  # first start to last write


def test_the_whole_run_is_timed_stage_by_stage(smoke) -> None:
    _, results, report, _ = smoke
    timing = results["seconds"]["run_all"]
    assert timing["jobs"] == 2 and timing["from_empty_cache"] is True
    assert set(timing["stages"]) == {"prepare", "training", "dense_evaluation", "tables"}
    assert set(timing["parts"]) == {"train-addition", "train-reverse", "train-sort", "table2", "table1-sort"}
    assert timing["total"] >= timing["stages"]["training"] + timing["stages"]["tables"] > 0
    assert timing["cpu_seconds"] > 0  # the children's CPU time is counted
    text = report.read_text()
    assert f"in **{timing['total'] / 60:.1f} min wall**" in text and "from an empty cache" in text


def _jobs_module():
    sys.path.insert(0, str(MINIPAPER))
    try:
        return importlib.import_module("jobs")
    finally:
        sys.path.remove(str(MINIPAPER))


def test_parts_run_longest_first_and_at_most_jobs_at_a_time(tmp_path: Path) -> None:
    jobs = _jobs_module()
    parts = [jobs.Part(f"p{cost}", (sys.executable, "-c", "import time; time.sleep(0.3)"), cost) for cost in (1, 3, 2)]
    times = jobs.run_parts(parts, 1, tmp_path / "logs", poll=0.02)
    order = sorted(times.spans, key=lambda n: times.spans[n][0])
    assert order == ["p3", "p2", "p1"]
    for a, b in zip(order, order[1:]):
        assert times.spans[b][0] >= times.spans[a][1]  # one at a time
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["p1.log", "p2.log", "p3.log"]


def test_a_failing_part_stops_the_others_and_names_itself(tmp_path: Path) -> None:
    jobs = _jobs_module()
    pid_file = tmp_path / "sleeper.pid"
    sleeper = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    failing = "import sys, time; time.sleep(0.5); print('the part broke'); sys.exit(3)"
    parts = [jobs.Part("sleeper", (sys.executable, "-c", sleeper), 2), jobs.Part("broken", (sys.executable, "-c", failing), 1)]
    with pytest.raises(jobs.PartFailed, match=r"part 'broken' exited with status 3[\s\S]*the part broke"):
        jobs.run_parts(parts, 2, tmp_path / "logs", poll=0.02)
    with pytest.raises(ProcessLookupError):  # stopped and reaped, not left running
        os.kill(int(pid_file.read_text()), 0)
