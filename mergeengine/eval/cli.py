"""``mergeengine eval MODEL --tasks TASKS.yaml``: evaluate a model folder and print a table.

The main CLI (:mod:`mergeengine.cli`) declares the arguments and maps
:class:`mergeengine.errors.MergeEngineError` to a one-line message and exit code; this module only
runs the command (the dependency goes one way).
"""

from __future__ import annotations

import argparse


def run_eval_command(args: argparse.Namespace) -> int:
    """Run ``eval`` from parsed arguments: print the table, write ``--out``; returns 0.

    Raises:
        MergeEngineError: anything the user can fix (missing transformers, bad task file, model).
    """
    # Imported here: torch and transformers must not slow down every other command's start-up.
    from mergeengine.eval.evaluate import evaluate, format_table, to_json

    result = evaluate(
        args.model,
        None,
        args.tasks,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        limit=args.limit,
        loglik=not args.no_loglik,
        progress=not args.quiet,
    )
    print(format_table(result))
    if args.out:
        to_json(result, args.out, samples=not args.no_samples)
        print(f"wrote {args.out}")
    return 0
