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
engine's per-(step, tensor) generator (in recipe order). The engine hands the method blocks of
whole rows (about a million entries), pruned and merged one block at a time: no input is held
whole in float32 and no pruned delta exists beyond its block (``rescale: l1`` keeps each
delta's survivors from a first pass, one bit per entry).

```yaml
- {id: m, op: merge, method: della, base: base, inputs: [d_math, d_code], density: 0.4, epsilon: 0.1}
```
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import torch

from mergeengine.errors import ExecutionError
from mergeengine.kernels.chunking import SUM_BLOCK, block_sums
from mergeengine.kernels.chunking import exact_total as l1_norm
from mergeengine.kernels.rng import tensor_generator
from mergeengine.kernels.ties import ZeroVote
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


def row_width(shape: tuple[int, ...]) -> int:
    """Entries per MAGPRUNE row: the last dimension (a 0-D or 1-D tensor is one row)."""
    return shape[-1] if len(shape) > 1 else max(math.prod(shape), 1)


def chunk_entries(shape: tuple[int, ...]) -> int:
    """The engine's chunk for DELLA: one block of whole rows (see :func:`block_rows`)."""
    columns = row_width(shape)
    return block_rows(columns) * columns


class Pruner:
    """MAGPRUNE of one delta (see the module docstring), a block of rows at a time, drawing in row
    order from its own generator: any blocking gives the bytes of one whole-tensor draw.

    Blocks come in row order, through :meth:`prune_`. With ``rescale: l1`` the L1 factor needs
    the whole tensor: a first pass (:meth:`observe` on every block, then :meth:`finish`) draws
    the survivors and keeps them packed, one bit per entry.
    """

    def __init__(self, columns: int, density: float, epsilon: float, rescale: Rescale,
                 generator: torch.Generator) -> None:
        if density < 1.0 and not (0.0 < density - epsilon and density + epsilon <= 1.0):
            raise ExecutionError(f"della: density ± epsilon must lie in (0, 1]; got density {density}, "
                                 f"epsilon {epsilon}")
        self.columns, self.density, self.epsilon, self.rescale = columns, density, epsilon, rescale
        self.generator = generator
        self.two_pass = rescale == "l1" and density < 1.0
        self.masks: list[np.ndarray] = []
        self.factor = 1.0
        self._sums: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self._next = 0

    def _draw(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep probabilities, 1.0 where the entry survives) of one block of rows."""
        keep = keep_probabilities(block, self.density, self.epsilon)
        survive = torch.rand(block.shape, generator=self.generator, device=self.generator.device).to(block.device)
        return keep, survive.lt_(keep)

    def observe(self, flat: torch.Tensor) -> None:
        """First pass of ``rescale: l1``: draw the next block's survivors, add its L1 norms."""
        block = flat.view(-1, self.columns)
        scratch, survive = self._draw(block)
        self.masks.append(np.packbits(survive.bool().cpu().numpy()))
        self._sums[0].append(block_sums(torch.abs(block, out=scratch)))
        self._sums[1].append(block_sums(torch.mul(block, survive, out=scratch).abs_()))

    def finish(self) -> None:
        """After :meth:`observe` on every block: the factor that restores the L1 norm."""
        before, after = (l1_norm(sums) for sums in self._sums)
        self.factor = before / after if after > 0 else 1.0
        self._sums = ([], [])

    def prune_(self, flat: torch.Tensor) -> torch.Tensor:
        """The next block of rows (flat float32 scratch, whole rows), pruned in place; returns it."""
        if self.density >= 1.0:
            return flat
        block = flat.view(-1, self.columns)
        if self.two_pass:
            packed = self.masks[self._next]
            self._next += 1
            survive = torch.from_numpy(np.unpackbits(packed, count=flat.numel()).view(np.bool_)).to(flat.device)
            return flat.masked_fill_(survive.logical_not_(), 0.0).mul_(self.factor)
        keep, survive = self._draw(block)
        if self.rescale == "per_element":
            return block.div_(keep).mul_(survive).view(-1)
        return block.mul_(survive).view(-1)


def _pruners(stream: Any, *, density: list[float], epsilon: list[float], rescale: Rescale,
             **_: Any) -> dict[str, Any]:
    """Per tensor, before its blocks: one :class:`Pruner` per delta, each with its own generator
    seeded by one draw of the engine's per-(step, tensor) generator (in recipe order); with
    ``rescale: l1``, their survivors and factors from a first pass over the blocks."""
    ctx = stream.ctx
    generator = tensor_generator(ctx.seed, ctx.step, ctx.tensor)
    seeds = torch.randint(0, 1 << 62, (len(stream.inputs),), generator=generator).tolist()
    columns = row_width(stream.shape)
    pruners = [Pruner(columns, p, e, rescale, torch.Generator().manual_seed(seed))
               for p, e, seed in zip(density, epsilon, seeds, strict=True)]
    if any(p.two_pass for p in pruners):
        for _, _, _, chunk in stream.chunks():
            require_finite("della", labelled(chunk, kind="delta"))
            for pruner, delta in zip(pruners, chunk, strict=True):
                if pruner.two_pass:
                    pruner.observe(delta)
        for pruner in pruners:
            if pruner.two_pass:
                pruner.finish()
    return {"pruners": pruners}


def _pruned(deltas: list[torch.Tensor], pruners: list[Pruner]) -> list[torch.Tensor]:
    """One block of every delta, checked and pruned in place."""
    require_finite("della", labelled(deltas, kind="delta"))
    return [p.prune_(d) for p, d in zip(pruners, deltas, strict=True)]


def check_parameters(params: Mapping[str, Any]) -> None:
    """At validation: keep probabilities in (0, 1] and weights >= 0 (for ``della``'s sign election)."""
    for p, e in zip(params["density"], params["epsilon"], strict=True):
        if p < 1 and not (0 < p - e and p + e <= 1):
            raise ValueError(f"density ± epsilon must lie in (0, 1]; got density {p}, epsilon {e}")
    if "vote" in params and any(w < 0 for w in params["weights"]):
        raise ValueError("weights must be >= 0 for sign election (use della_linear to subtract a delta)")


@merge_method(name="della", inputs="deltas", validate=check_parameters, elementwise=True, prepare=_pruners,
              provides=("pruners",), chunk_numel=chunk_entries)
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
    zero_vote: ZeroVote = "zero",
    pruners: list[Pruner],
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
        zero_vote: What a vote of exactly 0 elects: zero (nothing agrees), or positive (mergekit).
        pruners: each delta's pruner for this tensor (from the prepare pass).

    Returns:
        The merged tensor.
    """
    return elect_and_merge(base, _pruned(deltas, pruners), weights, vote=vote, normalize=normalize, lambda_=lambda_,
                           zero_vote=zero_vote)


@merge_method(name="della_linear", inputs="deltas", validate=check_parameters, elementwise=True,
              prepare=_pruners, provides=("pruners",), chunk_numel=chunk_entries)
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
    pruners: list[Pruner],
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
        pruners: each delta's pruner for this tensor (from the prepare pass).

    Returns:
        The merged tensor.
    """
    total = sum(weights)
    scale = lambda_ / total if normalize and abs(total) > 1e-8 else lambda_

    merged = torch.zeros_like(base)
    for w, d in zip(weights, _pruned(deltas, pruners), strict=True):
        merged.add_(d, alpha=w)
    return merged.mul_(scale).add_(base)
