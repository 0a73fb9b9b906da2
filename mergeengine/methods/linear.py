"""Linear averaging (Wortsman et al. 2022, model soups): ``sum_i w_i M_i / sum_i w_i``.

```yaml
- {id: soup, op: merge, method: linear, inputs: [math, code, chat], weights: [2, 1, 1]}
```
``base``, when given, only names the model whose config and tokenizer the output takes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mergeengine.methods import PerInput, merge_method


def _nonzero_total(params: Mapping[str, Any]) -> None:
    if sum(params["weights"]) == 0:
        raise ValueError("weights sum to 0: a weighted average needs a non-zero total")


@merge_method(name="linear", inputs="models", base="none", elementwise=True, validate=_nonzero_total)
def linear(base: None, models: list[torch.Tensor], *, weights: PerInput[float] = 1.0) -> torch.Tensor:
    """The weighted average of the models.

    Args:
        weights: One weight per input (default 1 each).
    """
    merged = models[0].mul_(weights[0])
    for w, m in zip(weights[1:], models[1:], strict=True):
        merged.add_(m, alpha=w)
    return merged.div_(sum(weights))
