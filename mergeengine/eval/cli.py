"""``mergeengine eval MODEL --tasks TASKS.yaml``: evaluate a model folder and print a table.

Two ways in: :func:`main_eval` parses its own ``argv`` (standalone), while
:func:`mergeengine.cli.add_eval_arguments` + :func:`run_eval_command` plug into the main CLI's subparsers, which
then maps :class:`mergeengine.errors.MergeEngineError` to a one-line message and exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mergeengine.cli import add_eval_arguments
from mergeengine.errors import MergeEngineError


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


def main_eval(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: parse ``argv``, run, print errors as one line.

    Returns:
        0 on success, 1 on a :class:`MergeEngineError` (message on stderr), 2 on bad arguments.
    """
    parser = argparse.ArgumentParser(prog="mergeengine eval", description=__doc__.splitlines()[0])
    add_eval_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_eval_command(args)
    except MergeEngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
