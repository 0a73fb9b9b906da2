"""DARE's survivor masks, drawn chunk by chunk in the order of one whole-tensor draw."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from mergeengine.runtime import run_ahead

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


def keep_survivors(d: torch.Tensor, kept: torch.Tensor, *, numpy: bool) -> torch.Tensor:
    """``d`` times the mask, in place. A dropped entry becomes 0 with ``d``'s sign (the merge sums
    give the same floats as a masked fill's +0.0; NaN/Inf stay visible to the checks)."""
    if numpy:
        np.multiply(d.numpy(), kept.numpy(), out=d.numpy())
        return d
    return d.masked_fill_(kept.logical_not(), 0.0)
