"""The console entry point as a user runs it: a separate process that ends with a fast exit."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import load_tensors, write_recipe


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mergeengine", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_run_in_a_process_flushes_and_commits(tmp_path, models):
    r = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {models['base']}}}
          - {{id: ft, op: load, model: {models['math']}}}
          - {{id: m, op: merge, method: task_arithmetic, base: base, inputs: [ft], weights: [0.5]}}
          - {{id: out, op: save, input: m, path: out}}
        """)
    p = _run("run", str(r))
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("wrote 21 tensors") and p.stdout.endswith("\n")  # flushed before the exit
    merged = load_tensors(tmp_path / "out")
    assert merged and all(t.isfinite().all() for t in merged.values())
    assert not list((tmp_path).glob("*.partial*")) and not list((tmp_path / "out").glob("*.tmp*"))


def test_errors_keep_their_exit_code_and_line(tmp_path):
    r = write_recipe(tmp_path, """
        steps:
          - {id: base, op: load, model: /nonexistent/model}
          - {id: out, op: save, input: base, path: out}
        """)
    p = _run("run", str(r))
    assert p.returncode == 1
    (line,) = p.stderr.strip().splitlines()
    assert "/nonexistent/model" in line
    assert not (tmp_path / "out").exists()
    assert _run("--version").returncode == 0
