"""Merge performance of mergeengine vs mergekit on Llama-shaped bf16 checkpoints.

Builds (once, cached under ``benchmarks/perf/_work/<size>/models``) a seeded base model and
fine-tunes, then runs, each as a separate measured process on a warm page cache:

* the I/O floor: read every input byte of a merge once and write one output of the output's size
  (no fsync; the time to flush it afterwards is recorded as ``sync_after_s``);
* mergeengine: linear, task_arithmetic, ties (density 0.2), dare_ties (density 0.2) and the DPPA
  pipeline (diff -> dpa_amplify -> task_arithmetic on two fine-tunes);
* mergekit (``mergekit-yaml --lazy-unpickle``, CPU) on the same inputs, when its virtualenv
  exists (``benchmarks/perf/_work/mergekit-venv``; see ``--install-mergekit``).

Each run records wall time, CPU time, max RSS, peak anonymous memory and how busy the rest of the
machine was. Results go to ``benchmarks/perf/results.json`` (merged with earlier sizes), the
section "Merge performance vs mergekit" of ``docs/benchmarks.md`` and ``docs/img/perf.png``.

Examples::

    .venv/bin/python benchmarks/perf/run.py --sizes small
    .venv/bin/python benchmarks/perf/run.py --sizes tinyllama --repeats 2 --tools floor,mergeengine
    .venv/bin/python benchmarks/perf/run.py --sizes small --profile task_arithmetic,ties,dppa
    .venv/bin/python benchmarks/perf/run.py --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from perf_measure import read_files, run_measured
from perf_recipes import MERGEKIT_METHODS, METHODS, engine_recipe, inputs_of, mergekit_config

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORK = HERE / "_work"
RESULTS = HERE / "results.json"
DOC = REPO / "docs" / "benchmarks.md"
PLOT = REPO / "docs" / "img" / "perf.png"
MERGEKIT_VENV = WORK / "mergekit-venv"
MERGEKIT_PINS = ("torch==2.13.0", "mergekit==0.1.5")
# mergeengine run with an empty sha256 cache (MERGEENGINE_CACHE): the first run on new input files,
# which hashes every input for the output's provenance; later runs find the hashes cached.
COLD_HASH = "mergeengine:first-run"

# name -> (LlamaShape kwargs, fine-tunes, default repeats)
SIZES: dict[str, tuple[dict[str, int], int, int]] = {
    "small": (dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                   num_key_value_heads=4, vocab_size=32000), 3, 3),
    "tinyllama": (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000), 3, 2),
    "7b": (dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000), 2, 1),
}


def log(msg: str) -> None:
    """A timestamped progress line on stdout."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# I/O floor worker (a child process: stdlib only, no torch import)


def floor_worker(out: Path, out_bytes: int, files: list[Path]) -> int:
    """Read ``files`` fully, then write ``out_bytes`` to ``out`` (no fsync); print timings as JSON."""
    t0 = time.perf_counter()
    read = read_files(files)
    t1 = time.perf_counter()
    chunk = bytearray(16 << 20)
    left = out_bytes
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb", buffering=0) as f:
        while left > 0:
            n = min(left, len(chunk))
            f.write(memoryview(chunk)[:n])
            left -= n
    t2 = time.perf_counter()
    print(json.dumps({"read_bytes": read, "read_s": t1 - t0, "write_bytes": out_bytes, "write_s": t2 - t1}))
    return 0


# --------------------------------------------------------------------------------------------
# environment


def engine_cmd() -> list[str]:
    """The ``mergeengine`` console script next to this interpreter, or ``python -m mergeengine``."""
    script = Path(sys.executable).parent / "mergeengine"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mergeengine"]


def engine_digest() -> str:
    """A short digest of mergeengine's sources, recorded with each run (the engine changes between runs)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted((REPO / "mergeengine").rglob("*.py")):
        h.update(str(f.relative_to(REPO)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def mergekit_bin(venv: Path) -> Path | None:
    """``mergekit-yaml`` of the benchmark's mergekit virtualenv, if installed."""
    exe = venv / "bin" / "mergekit-yaml"
    return exe if exe.exists() else None


def install_mergekit(venv: Path) -> None:
    """Create ``venv`` and install the pinned mergekit (torch pinned so pip keeps the CPU build)."""
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", *MERGEKIT_PINS], check=True)


def versions(mk_venv: Path) -> dict[str, str]:
    """mergeengine, torch and (when installed) mergekit versions."""
    out: dict[str, str] = {}
    r = subprocess.run([*engine_cmd(), "--version"], capture_output=True, text=True)
    out["mergeengine"] = r.stdout.strip().split()[-1] if r.returncode == 0 else "?"
    r = subprocess.run([sys.executable, "-c", "import torch, safetensors; print(torch.__version__, safetensors.__version__)"],
                       capture_output=True, text=True)
    out["torch"], out["safetensors"] = (r.stdout.split() + ["?", "?"])[:2]
    if mergekit_bin(mk_venv):
        code = ("import importlib.metadata as m; "
                "print(*(m.version(p) for p in ('mergekit', 'torch', 'transformers', 'safetensors')))")
        r = subprocess.run([str(mk_venv / "bin" / "python"), "-c", code], capture_output=True, text=True)
        parts = (r.stdout.split() + ["?"] * 4)[:4]
        out.update({"mergekit": parts[0], "mergekit_torch": parts[1], "mergekit_transformers": parts[2],
                    "mergekit_safetensors": parts[3]})
    return out


def machine() -> dict[str, object]:
    """CPU model, cores, memory and OS of this machine."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) * 1024
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_bytes": mem, "kernel": platform.release(),
            "python": platform.python_version()}


def others_busy(sample_s: float = 2.0) -> float:
    """Cores the rest of the machine keeps busy right now (sampled over ``sample_s``; we are idle)."""
    from perf_measure import busy_seconds

    b0 = busy_seconds()
    time.sleep(sample_s)
    return (busy_seconds() - b0) / sample_s


def wait_quiet(max_busy: float, max_wait_s: float) -> float:
    """Wait until other processes use at most ``max_busy`` cores (or ``max_wait_s`` passed)."""
    deadline = time.monotonic() + max_wait_s
    busy = others_busy()
    while busy > max_busy and time.monotonic() < deadline:
        time.sleep(3)
        busy = others_busy()
    return busy


# --------------------------------------------------------------------------------------------
# results file


_results_path = RESULTS


def load_results(path: Path) -> dict:
    """The results file (which later saves go to), or an empty one."""
    global _results_path
    _results_path = path
    if path.exists():
        return json.loads(path.read_text())
    return {"schema": 1, "sizes": {}}


def save_results(results: dict) -> None:
    """Write the results file atomically."""
    _results_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _results_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, _results_path)


# --------------------------------------------------------------------------------------------
# runs


def build_worker(size: str) -> int:
    """Child process: build (or reuse) the checkpoints of ``size``; print their facts as JSON.

    Building runs in a child so that this process never imports torch: a child's max RSS counts
    the pages it shares with its parent between fork and exec.
    """
    from perf_models import BuildSpec, build_models, weight_files

    from mergeengine.tiny import LlamaShape

    shape_kw, n_ft, _ = SIZES[size]
    spec = BuildSpec(LlamaShape(**shape_kw))
    models = build_models(WORK / size / "models", spec, n_ft)
    print(json.dumps({
        "params": spec.param_count,
        "model_bytes": spec.model_bytes,
        "layers": spec.shape.num_hidden_layers,
        "shape": shape_kw,
        "delta_scale": spec.delta_scale,
        "seed": spec.seed,
        "models": {r: str(f) for r, f in models.items()},
        "files": {r: [str(x) for x in weight_files(f)] for r, f in models.items()},
    }))
    return 0


def prepare_size(size: str, mk_venv: Path) -> dict:
    """Build (or reuse) the checkpoints of ``size`` and write its recipes; return the size's facts."""
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_build", size], stdout=subprocess.PIPE,
                       text=True, check=True)
    info = json.loads(r.stdout.strip().splitlines()[-1])
    root = WORK / size
    models = {role: Path(f) for role, f in info["models"].items()}
    files = {role: [Path(x) for x in fs] for role, fs in info["files"].items()}
    fine_tunes = [role for role in models if role != "base"]
    rdir = root / "recipes"
    rdir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict] = {}
    for m in METHODS:
        out = root / "out" / f"mergeengine-{m}"
        path = rdir / f"mergeengine-{m}.yaml"
        path.write_text(engine_recipe(m, models, fine_tunes, out))
        roles = inputs_of(m, fine_tunes)
        runs[m] = {"recipe": path, "out": out, "roles": roles}
        if m in MERGEKIT_METHODS:
            cfg = rdir / f"mergekit-{m}.yaml"
            cfg.write_text(mergekit_config(m, models, fine_tunes))
            runs[m]["mergekit_config"] = cfg
            runs[m]["mergekit_out"] = root / "out" / f"mergekit-{m}"
    return {"info": info, "models": models, "files": files, "fine_tunes": fine_tunes, "runs": runs, "root": root}


def _rm(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
    for hidden in path.parent.glob(f".{path.name}.*"):
        shutil.rmtree(hidden, ignore_errors=True) if hidden.is_dir() else hidden.unlink()


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def measured_run(
    name: str, cmd: list[str], out: Path, inputs: list[Path], logdir: Path, args: argparse.Namespace,
    env: dict[str, str] | None = None,
) -> dict:
    """One timed run on a warm cache, with the machine's state recorded; output removed afterwards."""
    busy_before = wait_quiet(args.max_busy, args.max_wait)
    _rm(out)
    os.sync()
    read_files(inputs)  # warm the page cache (untimed)
    m = run_measured(cmd, logdir / f"{name}.log", env=env, timeout_s=args.timeout)
    t = time.perf_counter()
    os.sync()
    sync_after = time.perf_counter() - t
    rec = m.to_dict()
    rec.update({"others_busy_before": busy_before, "engine_digest": engine_digest(), "sync_after_s": sync_after, "out_bytes": _dir_bytes(out),
                "when": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    rec["busy"] = rec["others_cpu_cores"] > args.max_busy
    if rec.get("stopped"):
        log(f"  {name}: STOPPED unfinished after {rec['wall_s']:.0f} s (--timeout)")
    elif rec["rc"] != 0:
        tail = Path(m.log).read_text(errors="replace")[-2000:]
        log(f"  {name}: FAILED rc={rec['rc']}\n{tail}")
    if not args.keep_outputs:
        _rm(out)
    return rec


def run_size(size: str, args: argparse.Namespace, results: dict, command: str) -> None:
    """All runs of one size; results saved after each run."""
    facts = prepare_size(size, args.mergekit_venv)
    info = facts["info"]
    root: Path = facts["root"]
    logdir = root / "logs"
    repeats = args.repeats or SIZES[size][2]
    mk = mergekit_bin(args.mergekit_venv) if "mergekit" in args.tools else None
    if "mergekit" in args.tools and mk is None:
        log(f"mergekit not installed in {args.mergekit_venv} (use --install-mergekit): skipping it")
    entry = results["sizes"].setdefault(size, {"runs": []})
    entry.update({k: info[k] for k in ("params", "model_bytes", "layers", "shape", "delta_scale", "seed")})
    entry["fine_tunes"] = len(facts["fine_tunes"])
    cmds = entry.setdefault("commands", [])
    if command not in cmds:
        cmds.append(command)
    methods = [m for m in args.methods if m in METHODS]
    plan: list[tuple[str, str]] = []
    if "floor" in args.tools:
        for roles in dict.fromkeys(tuple(facts["runs"][m]["roles"]) for m in methods):
            plan.append(("floor", "+".join(roles)))
    for m in methods:  # each method's tools back to back: this VM's speed drifts within minutes
        if "mergeengine" in args.tools:
            plan.append(("mergeengine", m))
        if mk is not None and m in MERGEKIT_METHODS:
            plan.append(("mergekit", m))
    if "mergeengine" in args.tools and "task_arithmetic" in methods and not args.no_cold_hash:
        plan.append((COLD_HASH, "task_arithmetic"))
    replaced = {(t, m) for t, m in plan}
    entry["runs"] = [r for r in entry["runs"] if (r["tool"], r["method"]) not in replaced]
    log(f"{size}: {info['params'] / 1e9:.2f}B params, {len(plan)} runs x {repeats} repeats")
    read_files([f for fs in facts["files"].values() for f in fs])  # warm-up read of every input
    for rep in range(repeats):
        for tool, method in plan:
            for attempt in range(1 + args.busy_retries):
                rec = _one(size, tool, method, facts, mk, logdir, args, rep)
                rec.update({"tool": tool, "method": method, "repeat": rep, "attempt": attempt, "command": command})
                entry["runs"].append(rec)
                save_results(results)
                log(f"  {size} {tool:11s} {method:28s} wall {rec['wall_s']:7.2f} s  cpu {rec['cpu_s']:7.1f} s  "
                    f"maxrss {rec['max_rss_bytes'] / 2**30:5.2f} GiB  anon {rec['peak_anon_bytes'] / 2**30:5.2f} GiB  "
                    f"others {rec['others_cpu_cores']:.2f} cores{'  BUSY' if rec['busy'] else ''}")
                if not rec["busy"] or rec["rc"] != 0:
                    break


def _one(size: str, tool: str, method: str, facts: dict, mk: Path | None, logdir: Path,
         args: argparse.Namespace, rep: int) -> dict:
    files: dict[str, list[Path]] = facts["files"]
    name = f"{tool}-{method}-r{rep}"
    if tool == "floor":
        roles = method.split("+")
        inputs = [f for r in roles for f in files[r]]
        out = facts["root"] / "out" / "floor.bin"
        cmd = [sys.executable, str(Path(__file__).resolve()), "_floor", str(out), str(facts["info"]["model_bytes"]),
               *map(str, inputs)]
        rec = measured_run(name, cmd, out, inputs, logdir, args)
        try:
            rec["floor"] = json.loads(Path(rec["log"]).read_text().strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            pass
        return rec
    run = facts["runs"][method]
    inputs = [f for r in run["roles"] for f in files[r]]
    if tool in ("mergeengine", COLD_HASH):
        cmd = [*engine_cmd(), "run", str(run["recipe"]), "-q", "--overwrite", "--device", args.device]
        env = None
        if tool == COLD_HASH:  # an empty sha256 cache: the first run on new input files
            cache = facts["root"] / "empty-hash-cache"
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir(parents=True)
            env = {**os.environ, "MERGEENGINE_CACHE": str(cache)}
        return measured_run(name.replace(":", "-"), cmd, run["out"], inputs, logdir, args, env=env)
    assert mk is not None
    cmd = [str(mk), str(run["mergekit_config"]), str(run["mergekit_out"]), "--lazy-unpickle", "--quiet",
           "--no-copy-tokenizer", "--random-seed", "0"]
    if args.device == "cuda":
        cmd.append("--cuda")
    return measured_run(name, cmd, run["mergekit_out"], inputs, logdir, args)


# --------------------------------------------------------------------------------------------
# start-up


def measure_startup(args: argparse.Namespace, results: dict) -> None:
    """Best-of-N wall time of CLI start-up: ``--version``, ``validate``, ``plan``, a whole ``run`` of
    the tiny example; mergekit's ``--help``."""
    size = args.sizes[0]
    facts = prepare_size(size, args.mergekit_venv)
    recipe = str(facts["runs"]["task_arithmetic"]["recipe"])
    cases = {
        "mergeengine --version": [*engine_cmd(), "--version"],
        "mergeengine validate": [*engine_cmd(), "validate", recipe],
        f"mergeengine plan ({size})": [*engine_cmd(), "plan", recipe],
    }
    # A whole `run` on the tiny example models (a few KB of weights): start-up plus a negligible
    # merge, i.e. what a user waits for before the first tensor of a real merge is read.
    example = REPO / "recipes" / "examples"
    if not (example / "models" / "base").exists():
        subprocess.run([sys.executable, "-m", "mergeengine.tiny", str(example / "models")], check=True,
                       capture_output=True)
    cases["mergeengine run (tiny example, whole merge)"] = [
        *engine_cmd(), "run", str(example / "task_arithmetic.yaml"), "--out", str(WORK / "startup" / "out"),
        "--overwrite", "-q"]
    mk = mergekit_bin(args.mergekit_venv)
    if mk is not None:
        cases["mergekit-yaml --help"] = [str(mk), "--help"]
    out: dict[str, dict] = {}
    logdir = WORK / "startup"
    for label, cmd in cases.items():
        subprocess.run(cmd, capture_output=True)  # warm the page cache of the imports
        runs = [run_measured(cmd, logdir / "startup.log") for _ in range(args.startup_repeats)]
        best = min(runs, key=lambda m: m.wall_s)
        out[label] = {"wall_s": best.wall_s, "cpu_s": best.cpu_s, "max_rss_bytes": best.max_rss_bytes,
                      "all_wall_s": [m.wall_s for m in runs], "rc": best.rc,
                      "cmd": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(best.cmd))}
        log(f"  start-up {label:28s} {best.wall_s:6.3f} s (best of {len(runs)})")
    results["startup"] = out
    save_results(results)


# --------------------------------------------------------------------------------------------
# profile


def run_profiles(args: argparse.Namespace, results: dict) -> None:
    """py-spy (collapsed stacks, idle time included) of mergeengine on ``args.profile`` methods."""
    from perf_profiles import summarize

    pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if pyspy is None:
        raise SystemExit("py-spy not found: .venv/bin/pip install py-spy")
    for size in args.sizes:
        facts = prepare_size(size, args.mergekit_venv)
        pdir = facts["root"] / "profiles"
        pdir.mkdir(parents=True, exist_ok=True)
        entry = results["sizes"].setdefault(size, {"runs": []})
        for method in args.profile:
            run = facts["runs"][method]
            inputs = [f for r in run["roles"] for f in facts["files"][r]]
            raw = pdir / f"{method}.collapsed.txt"
            cmd = [pyspy, "record", "--idle", "--threads", "--rate", str(args.profile_rate), "--format", "raw", "-o", str(raw),
                   "--", *engine_cmd(), "run", str(run["recipe"]), "-q", "--overwrite", "--device", args.device]
            rec = measured_run(f"profile-{method}", cmd, run["out"], inputs, facts["root"] / "logs", args)
            summary = summarize(raw)
            summary.update({"wall_s": rec["wall_s"], "engine_digest": rec["engine_digest"], "others_cpu_cores": rec["others_cpu_cores"],
                            "file": str(raw.relative_to(REPO)), "rate_hz": args.profile_rate})
            entry.setdefault("profiles", {})[method] = summary
            save_results(results)
            log(f"  profile {size} {method}: {summary['samples']} samples, wall {rec['wall_s']:.1f} s -> {raw}")


def refresh_profiles(results: dict) -> None:
    """Re-summarize the stored profiles from their collapsed-stack files (after a change of rules)."""
    from perf_profiles import summarize

    for entry in results.get("sizes", {}).values():
        for prof in entry.get("profiles", {}).values():
            raw = REPO / prof["file"]
            if raw.exists():
                prof.update(summarize(raw))


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_floor":
        return floor_worker(Path(argv[1]), int(argv[2]), [Path(p) for p in argv[3:]])
    if argv and argv[0] == "_build":
        return build_worker(argv[1])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="small", help="comma-separated: small, tinyllama, 7b")
    p.add_argument("--tools", default="floor,mergeengine,mergekit", help="comma-separated: floor, mergeengine, mergekit")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    p.add_argument("--repeats", type=int, default=0, help="runs per case, best wall kept (default: 3 small, 2 tinyllama, 1 7b)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--max-busy", type=float, default=0.5,
                   help="other processes' CPU (cores) above which a run counts as disturbed and is retried")
    p.add_argument("--max-wait", type=float, default=120.0, help="seconds to wait for a quiet machine before each run")
    p.add_argument("--busy-retries", type=int, default=1, help="extra attempts for a run disturbed by other load")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before a run is killed")
    p.add_argument("--mergekit-venv", type=Path, default=MERGEKIT_VENV)
    p.add_argument("--install-mergekit", action="store_true", help=f"create --mergekit-venv with {' '.join(MERGEKIT_PINS)}")
    p.add_argument("--startup", action="store_true", help="measure CLI start-up times (first size's recipes)")
    p.add_argument("--startup-repeats", type=int, default=7)
    p.add_argument("--profile", default="", help="comma-separated methods to profile with py-spy (no timed runs)")
    p.add_argument("--profile-rate", type=int, default=50, help="py-spy samples per second")
    p.add_argument("--no-cold-hash", action="store_true",
                   help=f"skip the extra task_arithmetic run with an empty sha256 cache ({COLD_HASH})")
    p.add_argument("--keep-outputs", action="store_true", help="keep the merged folders under _work/<size>/out")
    p.add_argument("--results", type=Path, default=RESULTS, help="results file (read, merged, written)")
    p.add_argument("--report-only", action="store_true", help="regenerate docs and plot from results.json")
    p.add_argument("--no-report", action="store_true", help="do not touch docs/benchmarks.md and the plot")
    args = p.parse_args(argv)
    args.sizes = [s for s in args.sizes.split(",") if s]
    args.tools = [t for t in args.tools.split(",") if t]
    args.methods = [m for m in args.methods.split(",") if m]
    args.profile = [m for m in args.profile.split(",") if m]
    for s in args.sizes:
        if s not in SIZES:
            p.error(f"unknown size {s}; choose from {', '.join(SIZES)}")
    for m in args.methods + args.profile:
        if m not in METHODS:
            p.error(f"unknown method {m}; choose from {', '.join(METHODS)}")
    command = "python benchmarks/perf/run.py " + " ".join(argv)
    results = load_results(args.results)
    if not args.report_only:
        if args.install_mergekit and mergekit_bin(args.mergekit_venv) is None:
            install_mergekit(args.mergekit_venv)
        results["machine"] = machine()
        results["versions"] = versions(args.mergekit_venv)
        if args.profile:
            run_profiles(args, results)
        elif args.startup:
            measure_startup(args, results)
        else:
            for size in args.sizes:
                run_size(size, args, results, command.strip())
        save_results(results)
    else:
        refresh_profiles(results)
        save_results(results)
    if not args.no_report:
        from perf_report import update_doc, write_plot

        update_doc(results, DOC)
        write_plot(results, PLOT)
        log(f"wrote {DOC.relative_to(REPO)} and {PLOT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
