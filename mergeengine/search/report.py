"""``mergeengine search RECIPE --report``: the score landscape of a search log as a PNG (matplotlib).

One panel of score per trial (with the best so far), then one panel per parameter (score against
its value, the best trial marked), for docs and model cards.
"""

from __future__ import annotations

import json
from pathlib import Path

from mergeengine.errors import MergeEngineError


def read_log(path: Path) -> list[dict]:
    """The trials of a ``search.jsonl``, in trial order (a line cut short by a kill is skipped).

    Raises:
        MergeEngineError: the log is missing or holds no trial.
    """
    if not path.is_file():
        raise MergeEngineError("no search log (run `mergeengine search` first)", file=str(path))
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if not records:
        raise MergeEngineError("the search log holds no trial", file=str(path))
    return sorted(records, key=lambda r: r["trial"])


def draw_report(log: Path, png: Path) -> Path:
    """Draw ``log``'s landscape into ``png``.

    Raises:
        MergeEngineError: matplotlib is missing, or the log is missing or empty.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MergeEngineError("--report needs matplotlib: pip install 'mergeengine[search]'") from None
    records = read_log(log)
    params = sorted({k for r in records for k in r["params"]})
    idx = [r["trial"] for r in records]
    scores = [r["score"] for r in records]
    best = max(range(len(records)), key=lambda i: (scores[i], -idx[i]))
    fig, axes = plt.subplots(1, 1 + len(params), figsize=(4 * (1 + len(params)), 3.4), squeeze=False)
    ax = axes[0][0]
    running = [max(scores[: i + 1]) for i in range(len(scores))]
    ax.plot(idx, scores, "o", ms=4, label="trial")
    ax.step(idx, running, where="post", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("score (vs dense experts)")
    ax.legend(fontsize=8)
    for ax, name in zip(axes[0][1:], params, strict=True):
        xs = [r["params"].get(name) for r in records]
        ax.scatter(xs, scores, s=14, c=idx, cmap="viridis")
        ax.scatter([xs[best]], [scores[best]], s=80, facecolors="none", edgecolors="red", label="best")
        ax.set_xlabel(name)
        ax.set_title("colour: trial number (dark = early)", fontsize=8)
        ax.legend(fontsize=8)
    fig.suptitle(f"{log.name}: {len(records)} trials, best {scores[best]:.4f} (trial {idx[best]})", fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
