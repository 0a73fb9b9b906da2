"""Summaries of py-spy collapsed-stack profiles (``py-spy record --format raw --idle``).

Each line of the file is ``frame;frame;...;leaf COUNT`` with frames ``function (file:line)``. The
file opens in https://www.speedscope.app (or flamegraph.pl) as it is. The summary keeps:

* ``self_lines``: where samples end (the Python line running a torch op or blocked in a read, a
  write or an fsync), as a share of all samples;
* ``inclusive``: each function's share of samples with it anywhere on the stack (mergeengine's
  functions and a few library entry points);
* ``buckets``: samples sorted into the stages of a run (first matching rule, leaf to root).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# (bucket, function, file suffix): the first rule matching a frame, searched from the leaf
# towards the root, names the bucket of a sample.
BUCKET_RULES: list[tuple[str, str, str]] = [
    ("fsync (writer)", "_close", "io/writer.py"),
    ("write to shard", "write", "io/writer.py"),
    ("finite check", "_check_finite", "executor.py"),
    ("read tensor (safetensors)", "read", "io/safetensors_reader.py"),
    ("save: cast to bf16", "compute", "ops/save.py"),
    ("diff", "compute", "ops/diff.py"),
    ("dpa_amplify", "compute", "ops/dpa_amplify.py"),
    ("load (read tensor)", "compute", "ops/load.py"),
    ("statistics pass: DP module stats", "map_module", "ops/dp_stats.py"),
    ("statistics pass: DP layer outliers", "map_layer", "ops/dp_stats.py"),
    ("statistics pass: reduce", "finish_module", "ops/dp_stats.py"),
    ("statistics pass: reduce", "finish_layer", "ops/dp_stats.py"),
    ("ties trim", "ties_trim", "kernels/ties.py"),
    ("ties sign + mean", "ties_merge", "kernels/ties.py"),
    ("dare", "dare", "kernels/sparsify.py"),
    ("merge", "compute", "ops/merge.py"),
    ("plan (headers, schedule)", "build_plan", "graph/plan.py"),
    ("validate recipe", "validate", "api.py"),
    ("imports", "_find_and_load", "<frozen importlib._bootstrap>"),
]


def _parse(frame: str) -> tuple[str, str, str]:
    m = _FRAME.match(frame)
    if not m:
        return frame, "", ""
    file = m.group("file")
    if "mergeengine/" in file:
        file = "mergeengine/" + file.split("mergeengine/", 1)[1]
    return m.group("func"), file, m.group("line") or ""


def read_collapsed(path: Path) -> list[tuple[list[tuple[str, str, str]], int]]:
    """(frames root -> leaf, count) for each line of a collapsed-stack file."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks.append(([_parse(f) for f in stack.split(";")], int(count)))
    return stacks


def bucket_of(frames: list[tuple[str, str, str]]) -> str:
    """The stage a sample belongs to (see :data:`BUCKET_RULES`)."""
    for func, file, _ in reversed(frames):
        name = func.rsplit(".", 1)[-1]
        for bucket, f, suffix in BUCKET_RULES:
            if name == f and file.endswith(suffix):
                return bucket
    return "other"


def summarize(path: Path, top: int = 15) -> dict:
    """Shares of samples by leaf line, by function (inclusive) and by stage."""
    stacks = read_collapsed(path)
    total = sum(c for _, c in stacks) or 1
    self_lines: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    for frames, count in stacks:
        func, file, line = frames[-1]
        self_lines[f"{func} ({file}:{line})"] += count
        seen = {f"{fn} ({fl})" for fn, fl, _ in frames if fl.startswith("mergeengine/") or fn in ("get_tensor",)}
        for key in seen:
            inclusive[key] += count
        buckets[bucket_of(frames)] += count

    def share(c: Counter[str], n: int | None) -> list[list[object]]:
        return [[k, round(100 * v / total, 1)] for k, v in c.most_common(n)]

    return {
        "samples": total,
        "self_lines": share(self_lines, top),
        "inclusive": share(inclusive, 2 * top),
        "buckets": share(buckets, None),
    }
