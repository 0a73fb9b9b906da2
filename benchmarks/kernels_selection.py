"""Benchmark: exact top-k magnitude selection on one LLM-sized tensor.

Compares, on a float32 tensor of a Llama MLP shape (5632x2048 by default):

* the k-th largest magnitude: full ``argsort`` (what mergekit does), ``torch.kthvalue``,
  ``torch.topk`` and :func:`mergeengine.kernels.select_exact.kth_smallest_abs` from the other end (radix select);
* the keep mask of the top-k magnitudes: argsort + scatter (mergekit's ``magnitude``),
  kthvalue + compare (not exactly k on ties), topk + scatter, and
  :func:`mergeengine.kernels.select_exact.topk_abs_mask`;
* one stage-1 + stage-2 partial of the model-wide quantile.

Two inputs: Gaussian values (no ties) and a "bf16 delta" (values rounded to bfloat16, 30% exact
zeros), where the threshold ties with many entries. Every method's answer is checked against
argsort. Run::

    .venv/bin/python -m benchmarks.kernels_selection            # one thread, best of 3
    .venv/bin/python -m benchmarks.kernels_selection --threads 8 --density 0.1
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from mergeengine.kernels.quantile import MagnitudeQuantile
from mergeengine.kernels.select_exact import keep_count, kth_smallest_abs, topk_abs_mask


def best_ms(function: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` runs after one warm-up, in milliseconds."""
    function()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def scatter_mask(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[indices] = True
    return mask.view(x.shape)


def run(x: torch.Tensor, k: int, repeats: int) -> list[tuple[str, float]]:
    """Time every method on ``x`` keeping ``k`` entries; check they agree."""
    flat_abs = x.abs().reshape(-1)
    numel = flat_abs.numel()
    reference = flat_abs.sort().values[numel - k]
    assert kth_smallest_abs(x, x.numel() - k + 1) == reference
    assert torch.kthvalue(flat_abs, numel - k + 1).values == reference
    assert torch.topk(flat_abs, k).values[-1] == reference
    mask = topk_abs_mask(x, k)
    assert int(mask.sum()) == k and bool((x.abs()[mask] >= reference).all())
    quantile = MagnitudeQuantile(k / numel)
    state = quantile.stage1_reduce(quantile.stage1_partial(x))
    assert quantile.stage2_reduce(quantile.stage2_partial(x, state), state) == reference.item()

    rows = [
        ("k-th value: argsort (mergekit)", lambda: flat_abs[torch.argsort(flat_abs)[numel - k]]),
        ("k-th value: torch.kthvalue", lambda: torch.kthvalue(x.abs().reshape(-1), numel - k + 1)),
        ("k-th value: torch.topk", lambda: torch.topk(x.abs().reshape(-1), k).values[-1]),
        ("k-th value: kth_largest_abs (radix)", lambda: kth_smallest_abs(x, x.numel() - k + 1)),
        (
            "mask: argsort + scatter (mergekit)",
            lambda: scatter_mask(x, torch.argsort(x.abs().reshape(-1), descending=True)[:k]),
        ),
        (
            "mask: kthvalue + compare (>k on ties)",
            lambda: x.abs() >= torch.kthvalue(x.abs().reshape(-1), numel - k + 1).values,
        ),
        ("mask: topk + scatter", lambda: scatter_mask(x, torch.topk(x.abs().reshape(-1), k).indices)),
        ("mask: topk_abs_mask (radix, exactly k)", lambda: topk_abs_mask(x, k)),
        ("model quantile: stage1_partial", lambda: quantile.stage1_partial(x)),
        ("model quantile: stage2_partial", lambda: quantile.stage2_partial(x, state)),
    ]
    return [(name, best_ms(function, repeats)) for name, function in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=5632)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--density", type=float, default=0.2, help="keep fraction (k = density * numel)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (best is shown)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    gaussian = torch.randn(args.rows, args.cols, generator=generator) * 1e-3
    bf16_delta = gaussian.bfloat16().float()
    bf16_delta[torch.rand(bf16_delta.shape, generator=generator) < 0.3] = 0.0
    k = keep_count(gaussian.numel(), args.density)
    print(
        f"{args.rows}x{args.cols} float32, keep k={k} ({args.density:g}), "
        f"{args.threads} thread(s), best of {args.repeats}, torch {torch.__version__}"
    )
    for label, x in [("gaussian", gaussian), ("bf16 delta, 30% zeros", bf16_delta)]:
        results = run(x, k, args.repeats)
        baseline = results[0][1]
        print(f"\n{label}:")
        print(f"  {'method':<42} {'ms':>9} {'vs argsort':>11}")
        for name, ms in results:
            print(f"  {name:<42} {ms:>9.1f} {baseline / ms:>10.1f}x")


if __name__ == "__main__":
    main()
