"""mergeengine.eval: task files, extraction rules, batched greedy evaluation, JSON output."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("transformers")

from mergeengine.cli import main_eval  # noqa: E402
from mergeengine.errors import MergeEngineError  # noqa: E402
from mergeengine.eval import (  # noqa: E402
    TaskFileError,
    evaluate,
    extract_answer,
    format_table,
    load_records,
    load_tasks,
    to_json,
)
from mergeengine.eval.charlevel import build_char_tokenizer  # noqa: E402
from mergeengine.eval.tasks import AfterExtract, FullExtract, RegexExtract, cut_at_stop, target_of  # noqa: E402

PROMPTS = ["12+34=", "reverse: abc ->", "sort: dcba ->", "7+8=", "hello", "x"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer LlamaForCausalLM with a character tokenizer, saved as an HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_task_file(folder: Path, records: list[dict], **task: object) -> Path:
    """One task 'demo' over ``records``; extra keyword arguments go into the task entry."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    (folder / "data" / "demo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    entry = {"name": "demo", "path": "data/demo.jsonl", "max_new_tokens": 5, **task}
    path = folder / "tasks.yaml"
    path.write_text(yaml.safe_dump({"tasks": [entry]}))
    return path


# --- extraction rules ---------------------------------------------------------------------


def test_extract_after_marker() -> None:
    rule = AfterExtract(type="after", marker="####")
    assert extract_answer(rule, "3 apples and 4 #### 7 ") == "7"
    assert extract_answer(rule, "no marker here") is None


def test_extract_regex_group_defaults() -> None:
    assert extract_answer(RegexExtract(type="regex", pattern=r"is (\d+)"), "answer is 42.") == "42"
    assert extract_answer(RegexExtract(type="regex", pattern=r"\d+"), "a 17 b 3") == "17"
    assert extract_answer(RegexExtract(type="regex", pattern=r"(a)(b)", group=2), "xaby") == "b"
    assert extract_answer(RegexExtract(type="regex", pattern=r"\d+"), "none") is None


def test_extract_full_and_stop() -> None:
    assert extract_answer(FullExtract(type="full"), "  46 ") == "46"
    assert cut_at_stop("46\n12+3", ["\n"]) == "46"
    assert cut_at_stop("ab;cd.ef", [".", ";"]) == "ab"
    assert cut_at_stop("abc", ["\n"]) == "abc"


def test_target_uses_rule_on_answer(tmp_path: Path) -> None:
    path = write_task_file(
        tmp_path,
        [{"prompt": "q", "answer": "think\n#### 72"}, {"prompt": "q", "answer": " 5", "target": "five"}],
        extract={"type": "after", "marker": "####"},
    )
    task = load_tasks(path).tasks[0]
    first, second = load_records(task)
    assert target_of(first, task) == "72"
    assert target_of(second, task) == "five"


# --- task file validation --------------------------------------------------------------------


def test_task_file_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    path = write_task_file(tmp_path / "sub", [{"prompt": "a", "answer": "b"}], limit=3, reference=0.5)
    task = load_tasks(path).tasks[0]
    assert task.path == (tmp_path / "sub" / "data" / "demo.jsonl").resolve()
    assert task.limit == 3 and task.reference == 0.5 and task.stop == ["\n"]
    assert isinstance(task.extract, FullExtract)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "red"}, "colour"),
        ({"extract": {"type": "first_word"}}, "extract"),
        ({"extract": {"type": "regex", "pattern": "("}}, "invalid regular expression"),
        ({"extract": {"type": "after"}}, "marker"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"path": "data/missing.jsonl"}, "not found"),
    ],
)
def test_task_file_errors(tmp_path: Path, change: dict, message: str) -> None:
    path = write_task_file(tmp_path, [{"prompt": "a", "answer": "b"}], **change)
    with pytest.raises(TaskFileError, match=message) as info:
        load_tasks(path)
    assert "\n" not in str(info.value)


def test_duplicate_task_names(tmp_path: Path) -> None:
    path = write_task_file(tmp_path, [{"prompt": "a", "answer": "b"}])
    doc = yaml.safe_load(path.read_text())
    doc["tasks"].append(dict(doc["tasks"][0]))
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(TaskFileError, match="duplicate task name 'demo'"):
        load_tasks(path)


def test_bad_jsonl_line_names_the_line(tmp_path: Path) -> None:
    path = write_task_file(tmp_path, [{"prompt": "a", "answer": "b"}, {"prompt": "a"}])
    with pytest.raises(TaskFileError, match="line 2: answer"):
        load_records(load_tasks(path).tasks[0])


# --- evaluation --------------------------------------------------------------------------------


def test_batched_left_padding_matches_one_by_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    records = [{"prompt": p, "answer": "46"} for p in PROMPTS]
    tasks = write_task_file(tmp_path, records)
    one = evaluate(tiny_model_dir, None, tasks, batch_size=1, device="cpu")
    many = evaluate(tiny_model_dir, None, tasks, batch_size=4, device="cpu")
    for a, b in zip(one.tasks[0].samples, many.tasks[0].samples, strict=True):
        assert a.generation == b.generation
        assert a.loglik == pytest.approx(b.loglik, abs=1e-4)


def test_pad_token_past_the_embedding_is_not_fed_to_the_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A truncated-vocabulary merge keeps the fine-tune's tokenizer, whose added pad id has no row."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    reference = evaluate(model, tokenizer, write_task_file(tmp_path, [{"prompt": p, "answer": "46"} for p in PROMPTS]),
                         batch_size=4)
    tokenizer.add_special_tokens({"pad_token": "[EXTRA_PAD]"})
    assert tokenizer.pad_token_id >= model.get_input_embeddings().num_embeddings
    result = evaluate(model, tokenizer, tmp_path / "tasks.yaml", batch_size=4)
    for a, b in zip(reference.tasks[0].samples, result.tasks[0].samples, strict=True):
        assert a.generation == b.generation
        assert a.loglik == pytest.approx(b.loglik, abs=1e-4)


def test_loglik_matches_a_plain_forward(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tasks = write_task_file(
        tmp_path, [{"prompt": "12+34=", "answer": "46"}, {"prompt": "hello", "answer": " wor"}]
    )
    result = evaluate(model, tokenizer, tasks, batch_size=2)
    for sample, (prompt, answer) in zip(
        result.tasks[0].samples, [("12+34=", "46"), ("hello", " wor")], strict=True
    ):
        ids = tokenizer(prompt + answer, return_tensors="pt")["input_ids"]
        n = len(answer)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
        expected = logprobs[-n:].gather(-1, ids[0, -n:, None]).mean().item()
        assert sample.answer_tokens == n
        assert sample.loglik == pytest.approx(expected, abs=1e-4)
    total = sum(s.loglik * s.answer_tokens for s in result.tasks[0].samples) / 6
    assert result.tasks[0].mean_loglik == pytest.approx(total)


def test_model_right_by_construction_scores_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A task whose answers are the model's own greedy generations is answered 100% right."""
    probe = write_task_file(
        tmp_path / "probe", [{"prompt": p, "answer": "?"} for p in PROMPTS], stop=["\n", " "]
    )
    first = evaluate(tiny_model_dir, None, probe, batch_size=3, device="cpu").tasks[0]
    assert first.accuracy == 0.0
    records = [{"prompt": s.prompt, "answer": s.generation} for s in first.samples if s.generation.strip()]
    assert records, "the random model generated only whitespace"
    tasks = write_task_file(tmp_path / "exact", records, stop=["\n", " "], reference=0.5)
    result = evaluate(tiny_model_dir, None, tasks, batch_size=4, device="cpu")
    assert result.tasks[0].accuracy == 1.0
    assert result.tasks[0].relative == pytest.approx(2.0)
    assert result.relative_score == pytest.approx(2.0)
    assert math.isfinite(result.tasks[0].mean_loglik) and result.tasks[0].mean_loglik < 0


def test_limit_and_generation_stop(tiny_model_dir: Path, tmp_path: Path) -> None:
    tasks = write_task_file(
        tmp_path, [{"prompt": p, "answer": "1"} for p in PROMPTS], max_new_tokens=7, limit=4
    )
    result = evaluate(tiny_model_dir, None, tasks, batch_size=8, device="cpu", limit=2)
    assert result.tasks[0].num_samples == 2
    assert all(len(s.generation) <= 7 and "\n" not in s.generation for s in result.tasks[0].samples)


def test_cli_prints_table_and_writes_json(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    tasks = write_task_file(tmp_path, [{"prompt": p, "answer": "46"} for p in PROMPTS], reference=1.0)
    out = tmp_path / "res" / "results.json"
    code = main_eval(
        [str(tiny_model_dir), "--tasks", str(tasks), "--out", str(out), "--device", "cpu", "--quiet"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "demo" in printed and "accuracy" in printed
    data = json.loads(out.read_text())
    assert data["model"] == str(tiny_model_dir)
    (task,) = data["tasks"]
    assert task["name"] == "demo" and task["num_samples"] == len(PROMPTS) and task["reference"] == 1.0
    assert set(task["samples"][0]) == {
        "prompt",
        "target",
        "generation",
        "prediction",
        "correct",
        "loglik",
        "answer_tokens",
    }
    assert data["relative_score"] == pytest.approx(task["accuracy"])


def test_cli_error_is_one_line(tmp_path: Path, capsys) -> None:
    code = main_eval([str(tmp_path), "--tasks", str(tmp_path / "nope.yaml"), "--quiet"])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "task file not found" in err and "\n" not in err


def test_json_without_samples_and_table(tiny_model_dir: Path, tmp_path: Path) -> None:
    tasks = write_task_file(tmp_path, [{"prompt": "1+1=", "answer": "2"}])
    result = evaluate(tiny_model_dir, None, tasks, device="cpu")
    data = json.loads(to_json(result, samples=False))
    assert "samples" not in data["tasks"][0] and data["relative_score"] is None
    assert format_table(result).splitlines()[1].startswith("demo")


def test_accuracy_only_gives_null_loglik(tiny_model_dir: Path, tmp_path: Path) -> None:
    tasks = write_task_file(tmp_path, [{"prompt": "1+1=", "answer": "2"}])
    result = evaluate(tiny_model_dir, None, tasks, device="cpu", loglik=False)
    assert math.isnan(result.tasks[0].mean_loglik)
    data = json.loads(to_json(result))
    assert data["tasks"][0]["mean_loglik"] is None and data["tasks"][0]["samples"][0]["loglik"] is None
    assert format_table(result).splitlines()[1].split()[3] == "-"


def test_in_memory_model_needs_a_tokenizer(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    tasks = write_task_file(tmp_path, [{"prompt": "1+1=", "answer": "2"}])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(MergeEngineError, match="tokenizer"):
        evaluate(model, None, tasks)


def test_missing_transformers_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    tasks = write_task_file(tmp_path, [{"prompt": "1+1=", "answer": "2"}])
    with pytest.raises(MergeEngineError, match=r"pip install 'mergeengine\[eval\]'") as info:
        evaluate(tmp_path, None, tasks)
    assert "\n" not in str(info.value)
