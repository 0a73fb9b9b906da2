"""``mergeengine search RECIPE``: run the recipe's search block, or draw its log (``--report``).

Writes ``RECIPE.resolved.yaml`` (the best candidate, runnable) and appends each finished trial to
``RECIPE.search.jsonl``. Light to import (the main CLI builds its parser from here).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``search`` arguments to ``parser`` (a subcommand parser)."""
    parser.add_argument("recipe")
    parser.add_argument("--out", help="where to write the resolved recipe (default: RECIPE.resolved.yaml)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--workers", type=int, default=1,
                        help="trials at once in a local process pool (default 1: in this process)")
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                        help="run trials as Ray tasks: on a local Ray, or on the cluster at ADDRESS "
                             "(needs mergeengine[ray])")
    parser.add_argument("--resume", action="store_true", help="skip the trials already in RECIPE.search.jsonl")
    parser.add_argument("--report", nargs="?", const="", default=None, metavar="PNG",
                        help="draw the log's score landscape (default RECIPE.search.png) instead of searching")


def run_search_command(args: argparse.Namespace) -> int:
    """Run ``search`` from parsed arguments; returns 0.

    Raises:
        MergeEngineError: anything the user can fix (bad recipe, missing extras, failed trial).
    """
    from mergeengine import api
    from mergeengine.errors import MergeEngineError
    from mergeengine.search.runner import default_paths, run_search, write_search_outputs

    if args.workers < 1:
        raise MergeEngineError(f"--workers must be at least 1, got {args.workers}")
    loaded = api.load_recipe(args.recipe)
    resolved, log = default_paths(loaded, Path(args.out) if args.out else None)
    if args.report is not None:
        from mergeengine.search.report import draw_report

        png = Path(args.report) if args.report else log.with_suffix(".png")
        draw_report(log, png)
        if not args.quiet:
            print(f"wrote {png}")
        return 0
    result = run_search(loaded, device=str(api.resolve_device(args.device)), progress=not args.quiet,
                        workers=args.workers, ray=args.ray, log=log, resume=args.resume)
    write_search_outputs(loaded, result, resolved, log_written=True)
    if not args.quiet:
        print(f"best {result.best_params} (score {result.best_score:.4f}, {len(result.trials)} trials); "
              f"wrote {resolved} and {log}")
    return 0
