"""DARE (Yu et al. 2023): the ``dare`` op and the ``dare_linear`` / ``dare_ties`` merge methods.

Each entry of a delta is dropped with probability ``1 - density``; survivors are rescaled (by
``1/density`` per element as in the paper; ``l1`` matches mergekit). The random draws come from a
generator seeded with (recipe seed, step id, tensor name): reproducible, and independent of the
order tensors are processed in.

```yaml
- {id: r_math, op: dare, input: d_math, density: 0.1, rescale: per_element}
- {id: merged, op: merge, method: dare_ties, base: base, inputs: [d_math, d_code], density: 0.2}
```
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from mergeengine.kernels.rng import tensor_generator
from mergeengine.kernels.sparsify import block_sums, dare, l1_norm
from mergeengine.kernels.ties import ZeroVote, ties_merge, ties_merge_into
from mergeengine.ops import register, register_method
from mergeengine.ops.base import TaskContext
from mergeengine.ops.delta_op import DeltaOp, DeltaStep, Scope
from mergeengine.ops.merge import ChunkedResult, Density, MergeOp, MergeStep, per_input
from mergeengine.ops.ties import NonNegativeWeights
from mergeengine.runtime import run_ahead

Rescale = Literal["per_element", "l1", "none"]
RESCALE_HELP = "per_element: divide survivors by density (paper); l1: match the L1 norm (mergekit); none."


class DareStep(DeltaStep):
    """Random drop-and-rescale of one delta."""

    op: Literal["dare"]
    density: float = Field(gt=0, le=1, description="Keep probability (1 - drop rate).")
    rescale: Rescale = Field("per_element", description=RESCALE_HELP)
    scope: Scope = Field("all", description="all tensors, or decoder_linear (the tensors DP prunes).")


@register
class Dare(DeltaOp):
    """Per tensor: Bernoulli(density) mask from the tensor's own generator."""

    compute_bound = True
    name = "dare"
    Step = DareStep
    step: DareStep

    def compute(self, inputs: list[torch.Tensor], ctx: TaskContext) -> torch.Tensor:
        if not self.in_scope(ctx.tensor, self.step.scope):
            return inputs[0]
        g = tensor_generator(ctx.seed, ctx.step, ctx.tensor)
        return dare(inputs[0], self.step.density, self.step.rescale, generator=g)


class DareMergeStep(MergeStep):
    """Shared fields of dare_linear and dare_ties."""

    density: Density | list[Density] = Field(description="Keep probability, one for all inputs or one per input.")
    rescale: Rescale = Field("per_element", description=RESCALE_HELP)


#: Draw and apply DARE's survivors with numpy on the CPU (the torch path is the one other
#: devices use; a test checks both give the same merged bytes).
NUMPY_MASKS = True


class Survivors:
    """DARE's survivor masks (``rand < density``) of every input, chunk by chunk, in draw order.

    Iterating gives, per chunk of ``lengths``, one bool mask per input: input ``i``'s generator
    draws its next ``lengths[c]`` floats, so the masks are those of one whole-tensor draw. On the
    CPU (``numpy``) a helper thread draws and compares one chunk ahead of the caller: torch's
    Mersenne Twister is serial (~2.5 ns per entry here, the largest single cost of a DARE merge)
    and releases the GIL, as numpy's compare does, so the draws overlap the merge arithmetic. Two
    mask slots alternate; a chunk's masks are valid until the next chunk is requested
    (``keep_all``: fresh masks per chunk, valid for good). Elsewhere the masks are drawn inline.
    """

    def __init__(self, gens: list[torch.Generator], densities: list[float], lengths: list[int],
                 device: torch.device, *, numpy: bool, keep_all: bool = False) -> None:
        self.gens, self.densities, self.lengths = gens, densities, lengths
        self.device, self.numpy, self.keep_all = device, numpy, keep_all
        longest = max(lengths, default=0)
        self.rand = torch.empty(longest, dtype=torch.float32, device=gens[0].device if gens else "cpu")
        self.slots = [[torch.empty(longest, dtype=torch.bool, device=device) for _ in gens]
                      for _ in range(0 if keep_all else 2)]

    def _masks(self, c: int, slot: int) -> list[torch.Tensor]:
        m = self.lengths[c]
        out = []
        for i, (gen, density) in enumerate(zip(self.gens, self.densities, strict=True)):
            mask = torch.empty(m, dtype=torch.bool, device=self.device) if self.keep_all else self.slots[slot][i][:m]
            drawn = torch.rand(m, generator=gen, out=self.rand[:m]).to(self.device)  # dare_mask's draw
            if self.numpy:  # numpy's compare writes the bool mask (~0.05 ns per entry, torch's ~0.6)
                np.less(drawn.numpy(), np.float32(density), out=mask.numpy())
            else:
                torch.lt(drawn, density, out=mask)
            out.append(mask)
        return out

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        if not self.numpy:
            return (self._masks(c, c % 2) for c in range(len(self.lengths)))
        return run_ahead(self._masks, len(self.lengths), "dare-draws")


class DareMerge(MergeOp):
    """DARE on each input delta (generator per input, step and tensor), then a combination.

    Runs chunk by chunk: each input's generator is drawn from sequentially, which gives the same
    draws as one whole-tensor draw (a test guards this), so chunking changes no byte. The ``l1``
    rescale needs whole-tensor norms: a first chunked pass computes them, a second applies them.
    """

    compute_bound = False  # serial draws (Survivors) and numpy masks between its torch ops: a second torch thread only spins
    step: DareMergeStep

    def compute(self, inputs: list[torch.Tensor], ctx: TaskContext) -> torch.Tensor:
        if self.target_rows.get(ctx.tensor) is not None:
            return super().compute(inputs, ctx)
        flat = [t.reshape(-1) for t in inputs]
        n = len(self.step.inputs)
        densities = per_input(self.step.density, n)
        is_model = [self.input_kinds.get(s) == "model" for s in self.step.inputs]
        gens = [tensor_generator(ctx.seed, f"{ctx.step}/{i}", ctx.tensor) for i in range(n)]
        device = flat[0].device
        result = ChunkedResult(flat[0].numel(), self.emit_dtype, device, scratch=1 + n)

        def deltas(start: int, end: int, b: torch.Tensor, ds: list[torch.Tensor]) -> None:
            b.copy_(flat[0][start:end])
            for i, (x, d) in enumerate(zip(flat[1:], ds, strict=True)):
                d.copy_(x[start:end])
                if is_model[i]:
                    d.sub_(b)

        factors = [1.0 / p if self.step.rescale == "per_element" else 1.0 for p in densities]
        cpu = device.type == "cpu" and NUMPY_MASKS
        lengths = [end - start for start, end, _ in result.chunks()]

        def apply(d: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
            """``d`` times the mask, in place. A dropped entry becomes 0 with ``d``'s sign (the merge
            sums give the same floats as a masked fill's +0.0; NaN/Inf stay visible to the checks)."""
            if cpu:
                np.multiply(d.numpy(), kept.numpy(), out=d.numpy())
                return d
            return d.masked_fill_(kept.logical_not(), 0.0)

        kept_masks: list[list[torch.Tensor]] = []
        if self.step.rescale == "l1":  # pass 1: masks (kept, 1 byte per entry) and the L1 norms before/after
            # the whole-tensor kernel's block sums (chunks are whole blocks): no host sync per chunk
            before: list[list[torch.Tensor]] = [[] for _ in range(n)]
            after: list[list[torch.Tensor]] = [[] for _ in range(n)]
            survivors = Survivors(gens, densities, lengths, device, numpy=cpu, keep_all=True)
            for (start, end, (b, *ds)), keeps in zip(result.chunks(), survivors, strict=True):
                deltas(start, end, b, ds)
                for i, (d, kept) in enumerate(zip(ds, keeps, strict=True)):
                    before[i].append(block_sums(d.abs_()))
                    after[i].append(block_sums(apply(d, kept)))
                kept_masks.append(keeps)
            norms = [(l1_norm(bs), l1_norm(a)) for bs, a in zip(before, after, strict=True)]
            factors = [b / a if a > 0 and math.isfinite(b / a) else 1.0 for b, a in norms]
        masks = kept_masks or Survivors(gens, densities, lengths, device, numpy=cpu)
        acc, sign, denominator = result.buffer(), result.buffer(), result.buffer()
        for (start, end, (b, *ds)), keeps in zip(result.chunks(), masks, strict=True):
            m = end - start
            deltas(start, end, b, ds)
            for i, d in enumerate(ds):
                apply(d, keeps[i]).mul_(factors[i])
            merged = self.combine_into(ds, acc[:m], [sign[:m], denominator[:m]])
            result.put(start, end, torch.add(b, merged, alpha=self.step.lambda_, out=merged))
        return result.finish(inputs[0].shape, ctx)

    def combine(self, deltas: list[torch.Tensor], ctx: TaskContext) -> torch.Tensor:
        """Whole-tensor path (vocabulary-padded tensors)."""
        densities = per_input(self.step.density, len(deltas))
        dropped = [
            dare(d, p, self.step.rescale, generator=tensor_generator(ctx.seed, f"{ctx.step}/{i}", ctx.tensor))
            for i, (d, p) in enumerate(zip(deltas, densities, strict=True))
        ]
        return self.combine_dropped(dropped)

    def combine_dropped(self, dropped: list[torch.Tensor]) -> torch.Tensor:
        """Combine the dropped-and-rescaled deltas of one tensor (whole-tensor path)."""
        raise NotImplementedError

    def combine_into(self, dropped: list[torch.Tensor], out: torch.Tensor, scratch: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`combine_dropped` of one chunk into ``out`` (``dropped`` may be overwritten)."""
        raise NotImplementedError


class DareLinearStep(DareMergeStep):
    """DARE, then task arithmetic."""

    method: Literal["dare_linear"]


@register_method
class DareLinear(DareMerge):
    """``base + lambda * sum_i w_i dare(delta_i)``."""

    method = "dare_linear"
    Step = DareLinearStep

    def combine_dropped(self, dropped: list[torch.Tensor]) -> torch.Tensor:
        return self.combine_into(dropped, torch.empty_like(dropped[0]), [])

    def combine_into(self, dropped: list[torch.Tensor], out: torch.Tensor, scratch: list[torch.Tensor]) -> torch.Tensor:
        out.zero_()
        for w, d in zip(self.weights, dropped, strict=True):
            out.add_(d, alpha=w)
        return out


class DareTiesStep(DareMergeStep, NonNegativeWeights):
    """DARE, then TIES sign election and disjoint mean (no magnitude trim)."""

    method: Literal["dare_ties"]
    vote: Literal["unweighted", "weighted"] = Field("unweighted", description="Weights in the sign vote (mergekit: weighted).")
    normalize: bool = Field(True, description="Divide by the agreeing weights (disjoint mean); false: their sum (mergekit's default).")
    zero_vote: ZeroVote = Field("zero", description="What a vote of exactly 0 elects: zero, or positive (mergekit).")


@register_method
class DareTies(DareMerge):
    """``base + lambda * ties_merge(dare(delta_i))``."""

    method = "dare_ties"
    Step = DareTiesStep
    step: DareTiesStep

    def combine_dropped(self, dropped: list[torch.Tensor]) -> torch.Tensor:
        return ties_merge(dropped, self.weights, vote=self.step.vote, normalize=self.step.normalize,
                          zero_vote=self.step.zero_vote)

    def combine_into(self, dropped: list[torch.Tensor], out: torch.Tensor, scratch: list[torch.Tensor]) -> torch.Tensor:
        return ties_merge_into(dropped, self.weights, out, scratch, vote=self.step.vote,
                               normalize=self.step.normalize, zero_vote=self.step.zero_vote)
