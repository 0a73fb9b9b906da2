"""What dare_linear and dare_ties share: each tensor's survivor masks and rescale factors.

Each entry of a delta is dropped with probability ``1 - density``; survivors are rescaled (by
``1/density`` per element as in the paper; ``l1`` matches mergekit). Input ``i``'s draws come from
a generator seeded with (recipe seed, ``<step>/<i>``, tensor name), drawn chunk after chunk,
which gives the draws of one whole-tensor draw: chunking changes no byte.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from mergeengine.kernels import survivors
from mergeengine.kernels.chunking import block_sums, exact_total
from mergeengine.kernels.rng import tensor_generator
from mergeengine.ops.chunks import PerChunk, TensorStream

Rescale = Literal["per_element", "l1", "none"]
#: What :func:`prepare` hands the method for each chunk or tensor.
PROVIDES = ("survivors", "factors", "numpy_masks", "scratch")


def prepare(stream: TensorStream, *, density: list[float], rescale: Rescale, **_: Any) -> dict[str, Any]:
    """The tensor's survivor masks (one list per chunk), per-input factors and scratch.

    The ``l1`` rescale needs whole-tensor norms: a first pass over the chunks draws the masks
    (kept, 1 byte per entry) and sums ``|delta|`` before and after the drop (the whole-tensor
    kernel's block sums: chunks are whole blocks).
    """
    ctx = stream.ctx
    gens = [tensor_generator(ctx.seed, f"{ctx.step}/{i}", ctx.tensor) for i in range(len(stream.inputs))]
    numpy = stream.device.type == "cpu" and survivors.NUMPY_MASKS
    lengths = stream.lengths()
    factors = [1.0 / p if rescale == "per_element" else 1.0 for p in density]
    masks: Any = survivors.Survivors(gens, density, lengths, stream.device, numpy=numpy)
    if rescale == "l1":
        masks, factors = _l1_pass(stream, survivors.Survivors(gens, density, lengths, stream.device, numpy=numpy,
                                                             keep_all=True), numpy)
    scratch = [stream.buffer(), stream.buffer(), stream.buffer()]
    return {"survivors": PerChunk(masks), "factors": factors, "numpy_masks": numpy, "scratch": scratch}


def _l1_pass(stream: TensorStream, draws: survivors.Survivors, numpy: bool) -> tuple[list[list[torch.Tensor]],
                                                                                     list[float]]:
    n = len(stream.inputs)
    before: list[list[torch.Tensor]] = [[] for _ in range(n)]
    after: list[list[torch.Tensor]] = [[] for _ in range(n)]
    kept_masks = []
    for (_, _, _, ds), keeps in zip(stream.chunks(), draws, strict=True):
        for i, (d, kept) in enumerate(zip(ds, keeps, strict=True)):
            before[i].append(block_sums(d.abs_()))
            after[i].append(block_sums(survivors.keep_survivors(d, kept, numpy=numpy)))
        kept_masks.append(keeps)
    norms = [(exact_total(b), exact_total(a)) for b, a in zip(before, after, strict=True)]
    return kept_masks, [b / a if a > 0 and math.isfinite(b / a) else 1.0 for b, a in norms]


def dropped(deltas: list[torch.Tensor], masks: list[torch.Tensor], factors: list[float],
            numpy: bool) -> list[torch.Tensor]:
    """Each chunk of delta with its dropped entries zeroed and its survivors rescaled, in place."""
    return [survivors.keep_survivors(d, kept, numpy=numpy).mul_(f)
            for d, kept, f in zip(deltas, masks, factors, strict=True)]
