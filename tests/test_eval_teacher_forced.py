"""``scoring: teacher_forced``: one forward pass gives greedy generation's exact-match verdict."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("transformers")

from test_eval import PROMPTS, tiny_model_dir, write_task_file  # noqa: E402, F401

from mergeengine.eval import TaskFileError, evaluate, load_tasks  # noqa: E402


def _greedy(folder: Path, tmp_path: Path, prompt: str, n: int) -> str:
    """The model's first ``n`` greedy characters after ``prompt`` (a stop string it cannot produce)."""
    probe = write_task_file(tmp_path / "probe", [{"prompt": prompt, "answer": "?"}], stop=["\x01"], max_new_tokens=n)
    return evaluate(folder, None, probe, device="cpu").tasks[0].samples[0].generation


def test_teacher_forced_verdicts_equal_greedy_generation(tiny_model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    checked = 0
    for i, prompt in enumerate([*PROMPTS, "abc", "9-4=", "sort: zyx ->", "hi there", "42", "q?"]):
        g = _greedy(tiny_model_dir, tmp_path, prompt, 4)
        if len(g) < 4 or g[3] in g[:3] or g[:3] != g[:3].strip() or not g[3].strip():
            continue  # the stop must end the answer exactly, and stripping must not change it
        other = next(c for c in "xyz" if c != g[2])
        for answer, right in ((g[:3], True), (g[:2] + other, False)):
            records = [{"prompt": prompt, "answer": answer}]
            scores = {}
            for scoring in ("generate", "teacher_forced"):
                tasks = write_task_file(tmp_path / f"{i}-{right}-{scoring}", records, stop=[g[3]], scoring=scoring)
                scores[scoring] = evaluate(tiny_model_dir, None, tasks, device="cpu").tasks[0].accuracy
            assert scores == {"generate": float(right), "teacher_forced": float(right)}, (prompt, g, answer)
        checked += 1
    assert checked >= 2, "too few prompts whose greedy continuation can serve as a stop"


def test_teacher_forced_needs_the_full_answer(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    doc = {"tasks": [{"name": "t", "path": "d.jsonl", "max_new_tokens": 2, "scoring": "teacher_forced",
                      "extract": {"type": "after", "marker": "#"}}]}
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(TaskFileError, match="teacher_forced needs extract"):
        load_tasks(tmp_path / "tasks.yaml")
