"""Run an experiment's parts as side-by-side processes, at most ``jobs`` at a time, and time them.

A part is one command line (a process of its own, with its own log file). Parts start longest
first (by their estimated cost), each as soon as a slot is free; when one fails, the others are
stopped and the error names the part and the end of its log. Every part's start and end are
recorded (seconds since the pool started), so a report can say where the wall time went.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Part:
    """One process of the experiment: ``name`` (its log is ``<name>.log``), its arguments, and an
    estimate of its cost (any unit: only the order matters)."""

    name: str
    argv: tuple[str, ...]
    cost: float = 1.0


@dataclass
class PoolTimes:
    """When each part ran: ``spans[name] = (start, end)`` in seconds from the pool's start."""

    wall: float = 0.0
    spans: dict[str, tuple[float, float]] = field(default_factory=dict)


class PartFailed(RuntimeError):
    """A part exited with a non-zero status (the message names it and quotes its log's end)."""


def _tail(log: Path, lines: int = 15) -> str:
    text = log.read_text(errors="replace") if log.is_file() else ""
    return "\n".join(text.splitlines()[-lines:])


def _stop(running: dict[str, tuple[subprocess.Popen, float]]) -> None:
    for proc, _ in running.values():
        proc.terminate()
    for proc, _ in running.values():
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_parts(parts: list[Part], jobs: int, log_dir: Path, *, poll: float = 0.5,
              env: dict[str, str] | None = None) -> PoolTimes:
    """Run every part, at most ``jobs`` at once, longest first; returns when all have finished.

    Raises:
        PartFailed: a part exited non-zero (the parts still running are stopped first).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    queue = sorted(parts, key=lambda p: -p.cost)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    times, t0 = PoolTimes(), time.monotonic()
    try:
        while queue or running:
            while queue and len(running) < max(1, jobs):
                part = queue.pop(0)
                with open(log_dir / f"{part.name}.log", "w") as log:
                    proc = subprocess.Popen(part.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env={**os.environ, **(env or {})})
                running[part.name] = (proc, time.monotonic() - t0)
            for name, (proc, start) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                times.spans[name] = (start, time.monotonic() - t0)
                if proc.returncode != 0:
                    log = log_dir / f"{name}.log"
                    raise PartFailed(f"part '{name}' exited with status {proc.returncode} (log {log}):\n{_tail(log)}")
            time.sleep(poll)
    finally:
        _stop(running)
    times.wall = time.monotonic() - t0
    return times
