"""Summaries of py-spy collapsed-stack profiles (``py-spy record --format raw --idle --threads``).

Each line of the file is ``thread (TID): NAME;frame;...;leaf COUNT`` with frames ``function
(file:line)``. The file opens in https://www.speedscope.app (or flamegraph.pl) as it is. Shares
are of the main thread's samples (with ``--idle`` every sample of a thread is one tick of wall
time, so they are shares of the run's wall time); other threads (read-ahead, input hashing) are
listed with the share of wall time they were busy. The summary keeps:

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
    # the chunked kernels (third optimisation pass)
    ("deltas per chunk (bf16 -> float32, minus base)", "delta", "ops/ties.py"),
    ("deltas per chunk (bf16 -> float32, minus base)", "chunks", "ops/ties.py"),
    ("deltas per chunk (bf16 -> float32, minus base)", "deltas", "ops/dare.py"),
    ("deltas per chunk (bf16 -> float32, minus base)", "value_chunks", "kernels/chunking.py"),
    ("deltas per chunk (bf16 -> float32, minus base)", "abs_chunks", "kernels/chunking.py"),
    ("deltas per chunk (bf16 -> float32, minus base)", "diff", "ops/dpa_amplify.py"),
    # sampled windows (fourth pass): the gather is usually the first touch of an input's pages
    ("sample gather (first touch of the inputs)", "sample_float32", "kernels/select_sampled.py"),
    ("magnitude selection (top-k, k-th value)", "_select_sampled", "kernels/select_sampled.py"),
    ("magnitude selection (top-k, k-th value)", "finish", "kernels/select_sampled.py"),
    ("magnitude selection (top-k, k-th value)", "select_abs_ranks_streamed_many", "kernels/select_exact.py"),
    ("magnitude selection (top-k, k-th value)", "high_keys", "kernels/select_exact.py"),
    ("magnitude selection (top-k, k-th value)", "add", "kernels/select_exact.py"),
    ("magnitude selection (top-k, k-th value)", "add", "kernels/select_sampled.py"),
    ("magnitude selection (top-k, k-th value)", "histogram", "kernels/select_exact.py"),
    ("ties trim", "trim_", "kernels/select_exact.py"),
    ("ties sign + mean", "ties_merge_into", "kernels/ties.py"),
    ("dare: draw and drop", "draw", "ops/dare.py"),
    ("dare: draw and drop", "keep", "ops/dare.py"),
    ("dare: draw and drop", "apply", "ops/dare.py"),
    ("dare: l1 norms, rescale (in the merge loop)", "compute", "ops/dare.py"),
    ("dpa: amplify chunks (hardshrink bands)", "scale", "kernels/dpa_scale.py"),
    ("dpa: amplify chunks (hardshrink bands)", "_scale_bands", "kernels/dpa_scale.py"),
    # (the next two rules and the "diff" one match the closures of the engine the recorded
    # tinyllama profiles come from; DpaAmplify.chunk_amplifier now returns PartitionScaler.scale)
    ("dpa: amplify chunks (hardshrink bands)", "amplified", "ops/dpa_amplify.py"),
    ("dpa: amplify chunks (hardshrink bands)", "dense", "ops/dpa_amplify.py"),
    ("DP statistics: magnitude sums", "magnitude_sum", "kernels/dp_density.py"),
    ("DP statistics: outlier counts", "count_above", "kernels/dp_density.py"),
    ("result chunk: round to bf16, sum", "put", "ops/merge.py"),
    ("fsync (writer)", "_close", "io/writer.py"),
    ("write to shard", "write", "io/writer.py"),
    ("finite check", "_check_finite", "executor.py"),
    ("read tensor (safetensors)", "read", "io/safetensors_reader.py"),
    ("save: cast to bf16", "compute", "ops/save.py"),
    ("diff", "compute", "ops/diff.py"),
    ("dpa_amplify", "compute", "ops/dpa_amplify.py"),
    ("load (read tensor)", "compute", "ops/load.py"),
    ("wait for read-ahead thread", "result", "concurrent/futures/_base.py"),
    ("wait for input hashes", "get", "api.py"),
    ("statistics pass: DP magnitude sums", "map_module", "ops/dp_stats.py"),
    ("statistics pass: DP outlier counts", "map_layer", "ops/dp_stats.py"),
    ("statistics pass: reduce", "finish_module", "ops/dp_stats.py"),
    ("statistics pass: reduce", "finish_layer", "ops/dp_stats.py"),
    ("ties: deltas (bf16 -> float32, minus base)", "_deltas", "ops/ties.py"),
    ("ties trim", "ties_trim", "kernels/ties.py"),
    ("magnitude selection (top-k, k-th value)", "ChunkedTopk", "kernels/select_exact.py"),
    ("magnitude selection (top-k, k-th value)", "mask", "kernels/select_exact.py"),
    ("magnitude selection (top-k, k-th value)", "select_abs_rank", "kernels/select_exact.py"),
    ("magnitude selection (top-k, k-th value)", "topk_abs_mask", "kernels/select_exact.py"),
    ("ties sign + mean", "ties_merge", "kernels/ties.py"),
    ("dare", "dare", "kernels/sparsify.py"),
    ("merge", "compute", "ops/merge.py"),
    ("ties: apply masks, add to base", "compute", "ops/ties.py"),
    ("plan (headers, schedule)", "build_plan", "graph/plan.py"),
    ("validate recipe", "validate", "api.py"),
    ("imports", "_find_and_load", "<frozen importlib._bootstrap>"),
    # the same kernels in the recorded profiles, from before kernels/selection.py and kernels/dppa.py
    # were split by concern
    ("deltas per chunk (bf16 -> float32, minus base)", "_value_chunks", "kernels/dppa.py"),
    ("deltas per chunk (bf16 -> float32, minus base)", "_abs_chunks", "kernels/dppa.py"),
    ("sample gather (first touch of the inputs)", "sample_float32", "kernels/selection.py"),
    ("magnitude selection (top-k, k-th value)", "_select_sampled", "kernels/selection.py"),
    ("magnitude selection (top-k, k-th value)", "finish", "kernels/selection.py"),
    ("magnitude selection (top-k, k-th value)", "select_abs_ranks_streamed_many", "kernels/selection.py"),
    ("magnitude selection (top-k, k-th value)", "high_keys", "kernels/selection.py"),
    ("magnitude selection (top-k, k-th value)", "add", "kernels/selection.py"),
    ("magnitude selection (top-k, k-th value)", "histogram", "kernels/selection.py"),
    ("ties trim", "trim_", "kernels/selection.py"),
    ("dpa: amplify chunks (hardshrink bands)", "scale", "kernels/dppa.py"),
    ("dpa: amplify chunks (hardshrink bands)", "_scale_bands", "kernels/dppa.py"),
    ("DP statistics: magnitude sums", "magnitude_sum", "kernels/dppa.py"),
    ("DP statistics: outlier counts", "count_above", "kernels/dppa.py"),
    ("magnitude selection (top-k, k-th value)", "ChunkedTopk", "kernels/selection.py"),
    ("magnitude selection (top-k, k-th value)", "mask", "kernels/selection.py"),
    ("magnitude selection (top-k, k-th value)", "select_abs_rank", "kernels/selection.py"),
    ("magnitude selection (top-k, k-th value)", "topk_abs_mask", "kernels/selection.py"),
]


def _parse(frame: str) -> tuple[str, str, str]:
    m = _FRAME.match(frame)
    if not m:
        return frame, "", ""
    file = m.group("file")
    if "mergeengine/" in file:
        file = "mergeengine/" + file.split("mergeengine/", 1)[1]
    return m.group("func"), file, m.group("line") or ""


_THREAD = re.compile(r"^thread \((?P<tid>\d+)\)(?::\s*(?P<name>.*))?$")
# Leaf functions of a thread that waits (a pool worker between tasks, a join, a lock).
IDLE_LEAVES = {"wait", "_wait_for_tstate_lock", "get", "_worker", "acquire", "select", "sleep"}


def read_collapsed(path: Path) -> list[tuple[str, list[tuple[str, str, str]], int]]:
    """(thread id, frames root -> leaf, count) for each line of a collapsed-stack file."""
    stacks = []
    names: dict[str, str] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        tid = ""
        m = _THREAD.match(frames[0])
        if m:
            tid = m.group("tid")
            if m.group("name"):
                names[tid] = m.group("name")
            frames = frames[1:]
        stacks.append((tid, [_parse(f) for f in frames], int(count)))
    read_collapsed.names = names  # type: ignore[attr-defined]
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
    names: dict[str, str] = read_collapsed.names  # type: ignore[attr-defined]
    per_thread: Counter[str] = Counter()
    for tid, _, c in stacks:
        per_thread[tid] += c
    main = next((t for t, n in names.items() if n == "MainThread"), None) or (
        min(per_thread, key=lambda t: int(t) if t.isdigit() else 0) if per_thread else "")
    total = per_thread[main] or 1
    self_lines: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    busy: dict[str, Counter[str]] = {}
    for tid, frames, count in stacks:
        if not frames:
            continue
        func, file, line = frames[-1]
        if tid != main:
            if func.rsplit(".", 1)[-1] not in IDLE_LEAVES:
                busy.setdefault(tid, Counter())[f"{func} ({file}:{line})"] += count
            continue
        self_lines[f"{func} ({file}:{line})"] += count
        seen = {f"{fn} ({fl})" for fn, fl, _ in frames if fl.startswith("mergeengine/") or fn in ("get_tensor",)}
        for key in seen:
            inclusive[key] += count
        buckets[bucket_of(frames)] += count

    def share(c: Counter[str], n: int | None) -> list[list[object]]:
        return [[k, round(100 * v / total, 1)] for k, v in c.most_common(n)]

    threads = []
    for tid, c in sorted(busy.items(), key=lambda kv: -sum(kv[1].values())):
        threads.append({"thread": names.get(tid, tid), "busy": round(100 * sum(c.values()) / total, 1),
                        "top": share(c, 3)})
    return {
        "samples": total,
        "threads": threads,
        "self_lines": share(self_lines, top),
        "inclusive": share(inclusive, 2 * top),
        "buckets": share(buckets, None),
    }
