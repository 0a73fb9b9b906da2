"""DELLA (Deep et al. 2024, arXiv 2406.11617): MAGPRUNE each delta, then TIES's sign election and
disjoint mean (``della``) or a weighted sum (``della_linear``).

MAGPRUNE, per row of each delta (the last dimension; a 1-D tensor is one row): rank the ``n``
entries by magnitude, ``r = 0`` the smallest (ties by position); entry ``r`` is kept with
probability ``k_r = density − epsilon + 2 epsilon r / (n − 1)`` (so the drop probability runs
over ``[p − ε, p + ε]``, ``p = 1 − density``, the largest magnitudes dropped least), and a kept
entry is divided by ``k_r`` (``rescale: per_element``, the paper: unbiased). mergekit instead
rescales the whole tensor so its L1 norm is unchanged (``rescale: l1``); ``none`` keeps
survivors as they are. ``density: 1`` keeps everything.

Then ``della`` is ``base + lambda · ties(pruned, weights)`` (sign election ``vote: unweighted``,
the paper, or ``weighted``, mergekit; divide by the agreeing weights unless ``normalize:
false``), and ``della_linear`` is ``base + lambda · Σ w_i pruned_i`` (``/ Σ w_i`` with
``normalize: true``). Each input draws from its own generator, seeded by one draw of the
engine's per-(step, tensor) generator (in recipe order); pruning and merging run a block of rows
at a time, so no whole pruned delta is ever held.

```yaml
- {id: m, op: merge, method: della, base: base, inputs: [d_math, d_code], density: 0.4, epsilon: 0.1}
```
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import torch

from mergeengine.errors import ExecutionError
from mergeengine.kernels.chunking import SUM_BLOCK, block_sums
from mergeengine.kernels.chunking import exact_total as l1_norm
from mergeengine.methods import Density, Fraction, PerInput, merge_method
from mergeengine.methods._checks import labelled, require_finite
from mergeengine.methods._ties import elect_and_merge
from mergeengine.runtime import all_cores

Rescale = Literal["per_element", "l1", "none"]


def _sort_rows(bits: np.ndarray, keys: np.ndarray, width: int) -> None:
    """Into ``keys``: per row, the columns by ascending ``|x|`` (``bits``: the float32 bit patterns)."""
    keys[...] = bits
    keys &= 0x7FFFFFFF  # the bit pattern of |x|, which orders like |x|
    keys <<= width
    keys |= np.arange(bits.shape[1], dtype=np.int64)
    keys.sort(axis=1)
    keys &= (1 << width) - 1


def magnitude_order(rows: torch.Tensor) -> torch.Tensor:
    """Per row of the 2-D float32 ``rows``, the column indices by ascending magnitude, ties by column.

    One value sort of int64 keys ``(bits of |x|) << w | column`` (numpy's SIMD sort): the bit
    pattern of a non-negative float orders like the float, the column breaks ties, and the low
    ``w`` bits give the order back; about twice as fast as a stable argsort. The rows are split
    among the cores (numpy releases the GIL while it sorts), each thread writing its own rows.
    """
    width = max(1, (rows.shape[1] - 1).bit_length())
    bits = rows.detach().cpu().contiguous().numpy().view(np.int32)
    keys = np.empty(bits.shape, dtype=np.int64)
    parts = min(all_cores(), max(1, rows.shape[0] // 64))
    bounds = np.linspace(0, rows.shape[0], parts + 1).astype(int)
    slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if parts == 1:
        _sort_rows(bits, keys, width)
    else:
        with ThreadPoolExecutor(parts) as pool:
            list(pool.map(lambda sl: _sort_rows(bits[sl], keys[sl], width), slices))
    return torch.from_numpy(keys).to(rows.device)


def keep_probabilities(rows: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """MAGPRUNE's keep probability of every entry of the 2-D ``rows``, ranked within its row."""
    n = rows.shape[1]
    if n == 1:
        return torch.full_like(rows, density)
    rank = torch.arange(n, dtype=torch.float32, device=rows.device).expand_as(rows)
    keep = torch.empty_like(rows).scatter_(1, magnitude_order(rows), rank)
    return keep.mul_(2.0 * epsilon / (n - 1)).add_(density - epsilon)


#: entries per block of rows pruned at once (keys, probabilities and draws exist for one block)
BLOCK_ENTRIES = 1 << 20


def block_rows(columns: int) -> int:
    """Rows per block: about :data:`BLOCK_ENTRIES` entries, a whole number of ``SUM_BLOCK``s so the
    L1 norms' block sums are the whole tensor's."""
    align = SUM_BLOCK // math.gcd(columns, SUM_BLOCK)
    return max(align, BLOCK_ENTRIES // max(columns, 1) // align * align)


class Pruner:
    """MAGPRUNE of one delta (see the module docstring), a block of rows at a time, drawing in row
    order from its own generator: any blocking gives the bytes of one whole-tensor draw.

    With ``rescale: l1`` the survivors of every block are drawn (and kept, 1 byte per entry) up
    front, since the L1 factor needs the whole tensor.
    """

    def __init__(self, delta: torch.Tensor, density: float, epsilon: float, rescale: Rescale,
                 generator: torch.Generator) -> None:
        if density < 1.0 and not (0.0 < density - epsilon and density + epsilon <= 1.0):
            raise ExecutionError(f"della: density ± epsilon must lie in (0, 1]; got density {density}, "
                                 f"epsilon {epsilon}")
        self.rows = delta.reshape(-1, delta.shape[-1]) if delta.dim() > 1 else delta.reshape(1, -1)
        self.density, self.epsilon, self.rescale, self.generator = density, epsilon, rescale, generator
        self.step = block_rows(self.rows.shape[1])
        self.masks: dict[int, torch.Tensor] = {}
        self.factor = 1.0
        if rescale == "l1" and density < 1.0:
            self._l1_pass()

    def _draw(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep probabilities, 1.0 where the entry survives) of one block of rows."""
        keep = keep_probabilities(block, self.density, self.epsilon)
        survive = torch.rand(block.shape, generator=self.generator, device=self.generator.device).to(block.device)
        return keep, survive.lt_(keep)

    def _l1_pass(self) -> None:
        before, after = [], []
        for start in range(0, self.rows.shape[0], self.step):
            block = self.rows[start:start + self.step]
            scratch, survive = self._draw(block)
            self.masks[start] = survive.bool()
            before.append(block_sums(torch.abs(block, out=scratch)))
            after.append(block_sums(torch.mul(block, survive, out=scratch).abs_()))
        kept = l1_norm(after)
        self.factor = l1_norm(before) / kept if kept > 0 else 1.0

    def block(self, start: int, out: torch.Tensor) -> torch.Tensor:
        """The pruned rows ``[start, start + len(out))`` into ``out`` (2-D, float32); returns it."""
        block = self.rows[start:start + out.shape[0]]
        if self.density >= 1.0:
            return out.copy_(block)
        if self.rescale == "l1":
            return torch.where(self.masks[start], block, block.new_zeros(()), out=out).mul_(self.factor)
        keep, survive = self._draw(block)
        if self.rescale == "per_element":
            return torch.div(block, keep, out=out).mul_(survive)
        return torch.mul(block, survive, out=out)


def magprune(delta: torch.Tensor, density: float, epsilon: float, rescale: Rescale,
             generator: torch.Generator) -> torch.Tensor:
    """One whole delta, MAGPRUNEd; a new float32 tensor of its shape."""
    pruner = Pruner(delta, density, epsilon, rescale, generator)
    out = torch.empty_like(pruner.rows)
    for start in range(0, out.shape[0], pruner.step):
        pruner.block(start, out[start:start + pruner.step])
    return out.view(delta.shape)


def merge_pruned(base: torch.Tensor, deltas: list[torch.Tensor], params: Mapping[str, Any],
                 generator: torch.Generator, combine: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]
                 ) -> torch.Tensor:
    """``combine(base rows, pruned rows)`` block of rows by block: no whole pruned delta is kept.

    Each input draws from its own generator, seeded from the engine's per-(step, tensor) one
    (one 62-bit seed per input, in recipe order).
    """
    require_finite("della", labelled(deltas, kind="delta"))
    seeds = torch.randint(0, 1 << 62, (len(deltas),), generator=generator, device=generator.device).tolist()
    pruners = [Pruner(d, p, e, params["rescale"], torch.Generator(device=generator.device).manual_seed(seed))
               for d, p, e, seed in zip(deltas, params["density"], params["epsilon"], seeds, strict=True)]
    base_rows = base.reshape(pruners[0].rows.shape)
    out = torch.empty_like(base_rows)
    step = pruners[0].step
    scratch = [torch.empty((min(step, out.shape[0]), out.shape[1]), device=out.device) for _ in pruners]
    for start in range(0, out.shape[0], step):
        end = min(start + step, out.shape[0])
        blocks = [p.block(start, b[: end - start]) for p, b in zip(pruners, scratch, strict=True)]
        out[start:end] = combine(base_rows[start:end], blocks)
    return out.view(base.shape)


def check_parameters(params: Mapping[str, Any]) -> None:
    """At validation: keep probabilities in (0, 1] and weights >= 0 (for ``della``'s sign election)."""
    for p, e in zip(params["density"], params["epsilon"], strict=True):
        if p < 1 and not (0 < p - e and p + e <= 1):
            raise ValueError(f"density ± epsilon must lie in (0, 1]; got density {p}, epsilon {e}")
    if "vote" in params and any(w < 0 for w in params["weights"]):
        raise ValueError("weights must be >= 0 for sign election (use della_linear to subtract a delta)")


@merge_method(name="della", inputs="deltas", validate=check_parameters)
def della(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    *,
    density: PerInput[Density],
    epsilon: PerInput[Fraction] = 0.15,
    weights: PerInput[float] = 1.0,
    lambda_: float = 1.0,
    rescale: Rescale = "per_element",
    normalize: bool = True,
    vote: Literal["unweighted", "weighted"] = "unweighted",
    int8_mask: bool = False,
    generator: torch.Generator,
) -> torch.Tensor:
    """DELLA: MAGPRUNE, elect signs, disjoint mean.

    Args:
        base: the base's tensor.
        deltas: the deltas.
        density: mean keep probability per input.
        epsilon: half-width of the keep probabilities per input.
        weights: one weight per input.
        lambda_: scale of the merged delta (recipe field ``lambda``).
        rescale: ``per_element`` (the paper), ``l1`` (mergekit) or ``none``.
        normalize: divide by the summed weights of the agreeing inputs.
        vote: sign election on the plain (``unweighted``) or weighted sum.
        int8_mask: accepted for mergekit configs; no effect.
        generator: the engine's per-(step, tensor) generator.

    Returns:
        The merged tensor.
    """
    def combine(b: torch.Tensor, pruned: list[torch.Tensor]) -> torch.Tensor:
        return elect_and_merge(b, pruned, weights, vote=vote, normalize=normalize, lambda_=lambda_)

    return merge_pruned(base, deltas, {"density": density, "epsilon": epsilon, "rescale": rescale}, generator, combine)


@merge_method(name="della_linear", inputs="deltas", validate=check_parameters)
def della_linear(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    *,
    density: PerInput[Density],
    epsilon: PerInput[Fraction] = 0.15,
    weights: PerInput[float] = 1.0,
    lambda_: float = 1.0,
    rescale: Rescale = "per_element",
    normalize: bool = False,
    int8_mask: bool = False,
    generator: torch.Generator,
) -> torch.Tensor:
    """DELLA's pruning, then a weighted sum of the pruned deltas.

    Args:
        base: the base's tensor.
        deltas: the deltas.
        density: mean keep probability per input.
        epsilon: half-width of the keep probabilities per input.
        weights: one weight per input.
        lambda_: scale of the merged delta (recipe field ``lambda``).
        rescale: ``per_element`` (the paper), ``l1`` (mergekit) or ``none``.
        normalize: divide by the sum of the weights (when it is not about 0).
        int8_mask: accepted for mergekit configs; no effect.
        generator: the engine's per-(step, tensor) generator.

    Returns:
        The merged tensor.
    """
    total = sum(weights)
    scale = lambda_ / total if normalize and abs(total) > 1e-8 else lambda_

    def combine(b: torch.Tensor, pruned: list[torch.Tensor]) -> torch.Tensor:
        merged = torch.zeros_like(b)
        for w, d in zip(weights, pruned, strict=True):
            merged.add_(d, alpha=w)
        return merged.mul_(scale).add_(b)

    return merge_pruned(base, deltas, {"density": density, "epsilon": epsilon, "rescale": rescale}, generator, combine)
