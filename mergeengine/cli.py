"""Command line: ``mergeengine run | validate | plan | convert | search | eval``. Errors become one line and exit code 1.

A traceback is shown only with ``-vv`` or ``MERGEENGINE_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import sys
import traceback
from pathlib import Path

from mergeengine import __version__
from mergeengine.errors import MergeEngineError, RecipeError, RunInterrupted

LOG = logging.getLogger("mergeengine")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mergeengine", description="Merge fine-tuned LLMs from YAML recipes.")
    p.add_argument("--version", action="version", version=f"mergeengine {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-v", "--verbose", action="count", default=0, help="-v: info, -vv: debug and tracebacks")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars, errors only")

    r = sub.add_parser("run", help="run a recipe")
    r.add_argument("recipe")
    r.add_argument("--out", help="output folder (overrides the save step's path)")
    r.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    r.add_argument("--dry-run", action="store_true", help="show the plan and estimates; read no tensor data")
    r.add_argument("--overwrite", action="store_true",
                   help="replace an existing output folder that mergeengine wrote (or an empty one)")
    r.add_argument("--allow-nonfinite", action="store_true", help="accept NaN/Inf in results")
    r.add_argument("--resume", nargs="?", const="verify", default=None, choices=["verify", "restart"],
                   help="continue an interrupted run from its finished shards; its inputs must have the same "
                        "content (sha256), else it is refused: --resume=restart starts over instead")
    r.add_argument("--threads", type=int, default=None,
                   help="torch threads for the math (default: all cores but one, which does the I/O, "
                        "and all cores for compute-bound ops: TIES, DARE, DP/DPA)")
    common(r)

    v = sub.add_parser("validate", help="check a recipe without reading weights")
    v.add_argument("recipe")
    common(v)

    pl = sub.add_parser("plan", help="show the step DAG, tensor counts, I/O and peak-memory estimate")
    pl.add_argument("recipe")
    pl.add_argument("--out", help="output folder (as for run)")
    pl.add_argument("--format", default="text", choices=["text", "json", "dot"])
    pl.add_argument("--explain", metavar="TENSOR", help="print every step's parameters as resolved for one tensor")
    common(pl)

    cv = sub.add_parser("convert", help="translate a mergekit config into a mergeengine recipe")
    cv.add_argument("config", help="mergekit YAML (mergekit-yaml's config file)")
    cv.add_argument("-o", "--output", required=True, help="recipe file to write")
    common(cv)

    from mergeengine.search.cli import add_search_arguments

    se = sub.add_parser("search", help="tune recipe fields (the recipe's search block) on validation tasks")
    add_search_arguments(se)
    common(se)

    ev = sub.add_parser("eval", help="evaluate a model on JSONL tasks (needs mergeengine[eval])")
    add_eval_arguments(ev)
    ev.add_argument("-v", "--verbose", action="count", default=0, help="-v: info, -vv: debug and tracebacks")
    return p


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``eval`` arguments to ``parser`` (an ``argparse`` subcommand parser)."""
    parser.add_argument("model", help="model folder (config.json, safetensors, tokenizer files)")
    parser.add_argument("--tasks", required=True, help="task file (YAML)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="dtype to run in (default: float32 on CPU, the checkpoint's elsewhere)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per batch (default: 16)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many records per task")
    parser.add_argument("--no-loglik", action="store_true", help="skip the answer log-likelihood (faster)")
    parser.add_argument("--no-samples", action="store_true", help="leave per-record details out of --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _attach_optional_values(argv: list[str]) -> list[str]:
    """A bare ``--resume`` of ``run`` means ``--resume=verify``: its value is only ever attached
    with ``=``, so ``run --resume RECIPE`` does not read the recipe as the mode (``search``'s
    ``--resume`` is a plain flag)."""
    out = list(argv)
    if next((a for a in out if not a.startswith("-")), None) != "run":
        return out
    end = out.index("--") if "--" in out else len(out)
    return [("--resume=verify" if a == "--resume" else a) if i < end else a for i, a in enumerate(out)]


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    LOG.handlers[:] = [handler]
    LOG.setLevel(level)
    LOG.propagate = False


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has gone (``| head``); if so it now points at /dev/null,
    so nothing else fails on it. A broken pipe elsewhere (not stdout) is an error like any other."""
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        if not any(events & select.POLLERR for _, events in poller.poll(0)):
            return False
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real stdout (a test's capture): not ours to judge
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mergeengine`` console script. Returns the exit code."""
    args = _parser().parse_args(_attach_optional_values(sys.argv[1:] if argv is None else argv))
    # A kill (SIGTERM) unwinds like Ctrl-C, so partial output is cleaned up.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    _setup_logging(args.verbose, args.quiet)
    debug = args.verbose >= 2 or os.environ.get("MERGEENGINE_DEBUG") == "1"
    try:
        return _dispatch(args)
    except RecipeError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 1
    except MergeEngineError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except RunInterrupted as exc:  # some saves had committed: --resume alone would stop at their folders
        print(f"interrupted: {exc} (rerun with --resume --overwrite to continue)", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted: nothing was written at the destination (rerun with --resume to continue)",
              file=sys.stderr)
        return 130
    except OSError as exc:  # the filesystem said no (permissions, a vanished file): still one line
        if isinstance(exc, BrokenPipeError) and _stdout_gone():
            return 128 + signal.SIGPIPE  # quietly, as a shell reports ``yes | head -1``'s ``yes``
        if debug:
            traceback.print_exc()
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: still one line unless debugging
        if debug:
            traceback.print_exc()
        print(f"internal error: {type(exc).__name__}: {exc} (rerun with -vv for the traceback)", file=sys.stderr)
        return 1


def main_eval(argv: list[str] | None = None) -> int:
    """``mergeengine eval`` as its own entry point: :func:`main` with ``eval`` and ``argv``."""
    return main(["eval", *(sys.argv[1:] if argv is None else argv)])


def console_main() -> None:
    """The ``mergeengine`` console script and ``python -m mergeengine``: :func:`main`, then a fast exit.

    Once torch is imported, Python's own teardown (finalizing ~100k module objects) takes 0.3-0.45 s
    on a 2-core machine, a fifth of a small run. Everything a command writes is committed (and its
    temporary files removed) before :func:`main` returns, so the process flushes its streams and
    logging and ends with ``os._exit``. Library callers of :func:`main` (the tests) are unaffected.
    """
    code = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (``| head``): nothing more can be shown
            pass
    os._exit(code)


def _validate(args: argparse.Namespace) -> int:
    """``validate``: schema, references, order, cycles and kinds; reads no weights and imports no
    torch (see :mod:`mergeengine.lazy`)."""
    from mergeengine import lazy

    lazy.defer()
    from mergeengine.graph.steps import build_step_graph
    from mergeengine.recipe.loader import load_recipe

    steps = build_step_graph(load_recipe(args.recipe))
    if not args.quiet:
        print(f"{args.recipe}: ok ({len(steps.ops)} steps)")
    return 0


def _convert(args: argparse.Namespace) -> int:
    """``convert``: a mergekit config written out as the equivalent recipe."""
    from mergeengine.recipe.mergekit import convert_file

    convert_file(Path(args.config), Path(args.output))
    if not args.quiet:
        print(f"wrote {args.output}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    """``plan`` (and ``run --dry-run``): the plan as text, JSON or dot, or one tensor's parameters."""
    from mergeengine import api
    from mergeengine.graph.report import explain_text, plan_dot, plan_json, plan_text

    plan = api.plan_recipe(args.recipe, out=args.out)
    if getattr(args, "explain", None):
        print(explain_text(plan, args.explain))
        return 0
    fmt = getattr(args, "format", "text")
    print({"text": plan_text, "json": plan_json, "dot": plan_dot}[fmt](plan))
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "validate":
        return _validate(args)
    if args.command == "convert":
        return _convert(args)
    from mergeengine import api

    if args.command in ("eval", "search"):  # the math must not fight the I/O threads (see runtime.py)
        from mergeengine.runtime import set_threads

        set_threads(getattr(args, "threads", None))
    if args.command == "eval":
        from mergeengine.eval.cli import run_eval_command

        return run_eval_command(args)

    if args.command == "search":
        from mergeengine.search.cli import run_search_command

        return run_search_command(args)
    if args.command == "plan" or (args.command == "run" and args.dry_run):
        return _plan(args)
    from mergeengine.runtime import reuse_freed_memory, set_threads

    reuse_freed_memory()
    set_threads(args.threads)
    recipe = api.load_recipe(args.recipe)
    if recipe.recipe.search is not None:  # search first, then run what it resolved
        from mergeengine.search.runner import default_paths, run_search, write_search_outputs

        resolved, log = default_paths(recipe)
        result = run_search(recipe, device=str(api.resolve_device(args.device)), progress=not args.quiet, log=log)
        resolved, _ = write_search_outputs(recipe, result, log_written=True)
        LOG.warning("search chose %s (score %.4f); running %s", result.best_params, result.best_score, resolved)
        recipe = api.load_recipe(resolved)
    result = api.run_recipe(
        recipe,
        out=args.out,
        device=args.device,
        overwrite=args.overwrite,
        allow_nonfinite=args.allow_nonfinite,
        resume=args.resume or False,
        progress=not args.quiet,
    )
    if not args.quiet:
        print(api.summary_line(result))
    return 0


if __name__ == "__main__":  # pragma: no cover
    console_main()

