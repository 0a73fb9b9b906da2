"""Trial throughput of the miniature search: in process, a 2-worker pool, Ray with 2 CPUs.

The miniature: a random tiny Llama (2 layers, hidden 32, built and saved by transformers) and two
experts (base + random deltas), merged by task_arithmetic; CMA-ES over ``merged.lambda`` and
``merged.weights[1]``, scored by a local lm-eval multiple-choice task over local JSONL data.
The tests build the same miniature (tests/test_search_parallel.py).

    .venv/bin/python benchmarks/search_throughput.py --trials 48

Each mode first runs a 4-trial warm-up search on the same executor (workers start, import torch,
transformers and lm-eval, and set up their model skeleton and tasks: "warm-up s"), then the timed
search of ``--trials`` trials on the warm workers. Prints per mode: the timed search's wall time,
trials per minute, the median time of one trial inside its worker, and Ray's per-trial overhead
over the pool at 2 workers (the difference of the timed searches' wall times, per trial).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TASK_YAML = """
task: tiny_next
dataset_path: json
dataset_kwargs:
  data_files:
    validation: data/next.jsonl
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{prompt}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
"""


def build_miniature(root: Path) -> Path:
    """base and two experts (base + small random deltas), saved by transformers; a local lm-eval task."""
    import torch
    import transformers

    from mergeengine.eval.charlevel import build_char_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    tok = build_char_tokenizer()
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2,
                                   pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    for name, seed in [("base", None), ("expert_a", 1), ("expert_b", 2)]:
        model = transformers.LlamaForCausalLM(cfg)
        model.load_state_dict(base.state_dict())
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.2 * p.std().clamp(min=1e-3))
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    lm_tasks = root / "lm_tasks"
    (lm_tasks / "data").mkdir(parents=True)
    (lm_tasks / "next.yaml").write_text(TASK_YAML)
    records = [{"prompt": f"{w} ", "choices": [w[::-1], w], "label": i % 2}
               for i, w in enumerate(["abc", "dog", "cat", "sun", "tree", "moon", "ab", "xyz", "red", "blue"] * 2)]
    (lm_tasks / "data" / "next.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def write_search_recipe(folder: Path, models: Path, name: str = "recipe.yaml", trials: int = 8) -> Path:
    recipe = {
        "steps": [
            {"id": "base", "op": "load", "model": str(models / "base")},
            {"id": "a", "op": "load", "model": str(models / "expert_a")},
            {"id": "b", "op": "load", "model": str(models / "expert_b")},
            {"id": "merged", "op": "merge", "method": "task_arithmetic", "base": "base", "inputs": ["a", "b"],
             "weights": [1.0, 1.0], "lambda": 1.0},
            {"id": "out", "op": "save", "input": "merged", "path": "out", "dtype": "float32"},
        ],
        "search": {
            "tasks": {"lm_eval": ["tiny_next"], "include_path": str(models / "lm_tasks")},
            "references": {"tiny_next": "a"},  # expert_a, the dense expert, evaluated once
            "strategy": "cma",
            "trials": trials,
            "population": 4,
            "seed": 3,
            "space": [
                {"param": "merged.lambda", "range": [0.0, 2.0]},
                {"param": "merged.weights[1]", "range": [0.0, 1.0], "step": 0.05},
            ],
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path



def measure(recipe: Path, warm: Path, folder: Path, executor: object) -> dict[str, float]:
    """A warm-up search (workers start, import, set up their evaluator), then the timed search."""
    from mergeengine.search import run_search

    t0 = time.perf_counter()
    run_search(warm, log=folder / "warm.jsonl", executor=executor)
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = run_search(recipe, log=folder / "timed.jsonl", executor=executor)
    wall = time.perf_counter() - t0
    inside = [json.loads(line)["wall_s"] for line in (folder / "timed.jsonl").read_text().splitlines()]
    return {"warmup_s": startup, "wall_s": wall, "trials": len(result.trials),
            "trials_per_min": 60 * len(result.trials) / wall, "trial_s_median": statistics.median(inside),
            "best": result.best_score}


def main(argv: list[str] | None = None) -> int:
    """Build the miniature, run the three modes, print a table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=48)
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--order", default="seq,pool,ray", help="the modes, in the order they run")
    args = p.parse_args(argv)
    import ray

    from mergeengine.runtime import set_threads
    from mergeengine.search.executors import InProcess, Pool, RayTasks

    set_threads()  # as `mergeengine search` does: all cores but one for the trials run in this process

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = build_miniature(root / "models")
        recipe = write_search_recipe(root / "search", models, trials=args.trials)
        warm = write_search_recipe(root / "search", models, name="warm.yaml", trials=4)
        modes = {"seq": ("1 worker (in process)", InProcess), "pool": ("2 pool workers", lambda: Pool(2, "cpu")),
                 "ray": ("Ray, 2 CPUs", lambda: RayTasks(None, 2))}
        for name, make in (modes[m] for m in args.order.split(",")):
            executor = make()
            try:
                rows[name] = measure(recipe, warm, root / name.split()[0], executor)
            finally:
                executor.close()
        assert ray.is_initialized() is False
    print(f"{'mode':<22} {'warm-up s':>9} {'trials':>6} {'wall s':>7} {'trials/min':>10} {'median trial s':>14}")
    for name, r in rows.items():
        print(f"{name:<22} {r['warmup_s']:>9.1f} {r['trials']:>6} {r['wall_s']:>7.1f} {r['trials_per_min']:>10.1f} "
              f"{r['trial_s_median']:>14.3f}")
    pool, on_ray = rows["2 pool workers"], rows["Ray, 2 CPUs"]
    print(f"Ray's per-trial overhead over the pool at 2 workers: "
          f"{100 * (on_ray['wall_s'] - pool['wall_s']) / pool['wall_s']:+.1f}% "
          f"({1000 * (on_ray['wall_s'] - pool['wall_s']) / pool['trials']:+.0f} ms per trial)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
