"""How many of a tensor's smallest magnitudes a pruning at density ``d`` drops: the two rules.

Every magnitude pruning here keeps the entries whose magnitude is strictly above the k-th smallest
magnitude, so a rule is only its count ``k``:

* ``exact`` (the default; DPPA.md step 6): ``k = floor(numel * (1 - d))``, with a 1e-6 tolerance
  below integers so that ``d = 0.9`` on 10 entries drops 1, not 0.
* ``release``: the DPPA release's threshold, inherited from OWL's ``prune_magnitude``: with
  sparsity ``s = 1 - d`` (a Python float) it takes ``thresh = sort(|W|)[int(numel * s)]`` and prunes
  ``|W| <= thresh``, that is ``k = int(numel * s) + 1`` (one more than ``exact`` wherever
  ``numel * s`` is not an integer just below rounding), capped at ``numel`` where the release's
  index would run past the end (``d = 0``). Entries equal to the threshold are all pruned, ties
  included, as ``<=`` does; at ``d = 1`` the smallest magnitude (and its ties) is still dropped.

Example:
    >>> pruned_count(10, 0.8), pruned_count(10, 0.8, "release")
    (2, 3)
"""

from __future__ import annotations

import math
from typing import Literal

PruneRule = Literal["exact", "release"]
PRUNE_RULES: tuple[str, ...] = ("exact", "release")

# Absorbs the float rounding of numel * (1 - d) when it is mathematically an integer.
_RANK_TOLERANCE = 1e-6


def pruned_count(numel: int, density: float, rule: PruneRule = "exact") -> int:
    """``k``, the number of smallest magnitudes a pruning at ``density`` drops under ``rule``.

    Args:
        numel: number of elements.
        density: keep fraction in [0, 1].
        rule: ``exact`` or ``release`` (see the module docstring).

    Returns:
        ``k`` in ``[0, numel]`` (``release``: in ``[min(1, numel), numel]``).

    Raises:
        ValueError: ``density`` is outside [0, 1] or ``rule`` is unknown.
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    if rule == "exact":
        return min(numel, max(0, math.floor(numel * (1.0 - density) + _RANK_TOLERANCE)))
    if rule == "release":
        return min(numel, int(numel * (1.0 - density)) + 1)
    raise ValueError(f"unknown prune rule '{rule}'. Available: {', '.join(PRUNE_RULES)}")
