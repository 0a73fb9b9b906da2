"""The benchmark harness itself: a run past its timeout is stopped and reported as a bound."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "perf"))
import perf_measure  # noqa: E402
import perf_report  # noqa: E402

sys.path.pop(0)


def test_a_run_past_its_timeout_is_stopped_with_what_it_used(tmp_path: Path) -> None:
    spin = "import time\nt = time.time()\nwhile time.time() - t < 60: pass"
    m = perf_measure.run_measured([sys.executable, "-c", spin], tmp_path / "spin.log", timeout_s=1.0)
    assert m.stopped and m.rc == -9
    assert 1.0 <= m.wall_s < 30 and m.cpu_s > 0.3 and m.max_rss_bytes > 0


def test_a_finished_run_is_not_stopped(tmp_path: Path) -> None:
    m = perf_measure.run_measured([sys.executable, "-c", "pass"], tmp_path / "ok.log", timeout_s=60.0)
    assert not m.stopped and m.rc == 0


def _run(tool: str, wall: float, rss: int, **extra) -> dict:
    return {"tool": tool, "method": "della", "rc": 0, "wall_s": wall, "cpu_s": wall / 2, "max_rss_bytes": rss,
            "peak_anon_bytes": rss // 2, **extra}


def test_a_stopped_mergekit_run_makes_the_ratios_upper_bounds() -> None:
    entry = {"params": 1.1e9, "layers": 22, "model_bytes": 2.2e9, "fine_tunes": 3, "shape": {},
             "runs": [_run("mergeengine", 100.0, 2**30),
                      _run("mergekit", 1000.0, 4 * 2**30, rc=-9, stopped=True)]}
    best = perf_report.summarize({"sizes": {"tinyllama": entry}})["tinyllama"]
    assert best[("mergekit", "della")]["stopped"] is True
    table = "\n".join(perf_report.size_table("tinyllama", entry, best))
    row = next(line for line in table.splitlines() if line.startswith("| della | mergeengine"))
    assert "| < 0.10 | < 0.25 | < 0.25 |" in row
    assert "stopped unfinished at the timeout" in next(
        line for line in table.splitlines() if line.startswith("| della | mergekit"))


@pytest.mark.parametrize("rc", [1, -9])
def test_a_failed_run_without_stopped_is_left_out(rc: int) -> None:
    entry = {"runs": [_run("mergekit", 10.0, 2**30, rc=rc)]}
    assert perf_report.summarize({"sizes": {"small": entry}})["small"] == {}
