"""Parameter search over any numeric recipe field, with trials in parallel (process pool or Ray).

A recipe's ``search`` block names the fields (``space``, or the DPA ``factors``), the strategy
(coordinate ascent, grid, random, CMA-ES, TPE) and the validation tasks (JSONL task files or
lm-eval tasks). :func:`run_search` runs it; ``mergeengine search RECIPE`` is the command.

```yaml
search:
  tasks: tasks.val.yaml
  strategy: cma
  trials: 32
  space:
    - {param: merged.lambda, range: [0.5, 1.5]}
    - {param: merged.weights[1], range: [0.0, 1.0], step: 0.05}
```

The package's modules: :mod:`~mergeengine.search.space` (addresses, ranges, validation: no
torch), :mod:`~mergeengine.search.strategies`, :mod:`~mergeengine.search.trial` (one trial in a
worker), :mod:`~mergeengine.search.executors` (in process, pool, Ray),
:mod:`~mergeengine.search.runner` (the driver, the log, resume), :mod:`~mergeengine.search.report`.
Names are imported on first use, so ``mergeengine validate`` does not load torch through here.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SearchResult": "runner",
    "Trial": "runner",
    "geometric_score": "runner",
    "run_search": "runner",
    "write_search_outputs": "runner",
    "default_paths": "runner",
    "draw_report": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"mergeengine.search.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'mergeengine.search' has no attribute '{name}'")
