"""Chat templates written into the output's tokenizer_config.json; tiny tokenizers built offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mergeengine.api import run_recipe
from mergeengine.errors import RecipeError
from mergeengine.io.chat_template import CHATML, LLAMA3
from mergeengine.recipe.loader import load_recipe
from tests.conftest import write_recipe

SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def write_tokenizer(folder: Path, words: list[str], *, template: str | None = None, jinja: bool = False) -> None:
    """A WordLevel tokenizer.json built with `tokenizers`, and its tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if template is not None and not jinja:
        cfg["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    if template is not None and jinja:
        (folder / "chat_template.jinja").write_text(template)


@pytest.fixture
def chat_models(models: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, template, jinja in (("base", None, False), ("math", LLAMA3, True), ("code", LLAMA3, False),
                                  ("chat", CHATML, False)):
        dest = tmp_path / name
        shutil.copytree(models["base32" if name in ("base", "chat") else name + "32"], dest)
        write_tokenizer(dest, ["hello", "world", "hi"], template=template, jinja=jinja)
        out[name] = dest
    return out


def _recipe(tmp_path: Path, m: dict[str, Path], template: str) -> Path:
    return write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {m['base']}}}
          - {{id: math, op: load, model: {m['math']}}}
          - {{id: code, op: load, model: {m['code']}}}
          - {{id: chat, op: load, model: {m['chat']}}}
          - {{id: m, op: merge, method: task_arithmetic, base: base, inputs: [math, code, chat], weights: [0.3, 0.3, 0.3]}}
          - {{id: out, op: save, input: m, path: {tmp_path / 'out'}, chat_template: {json.dumps(template)}}}
        """)


@pytest.mark.parametrize(("template", "prompt"), [
    ("chatml", "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"),
    ("auto", "<s><|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}", "[user] hello"),
])
def test_chat_template_written_and_used_by_transformers(chat_models: dict[str, Path], tmp_path: Path,
                                                        template: str, prompt: str) -> None:
    from transformers import AutoTokenizer

    run_recipe(_recipe(tmp_path, chat_models, template))
    out = tmp_path / "out"
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    assert not (out / "chat_template.jinja").exists()
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    assert text == prompt


def test_auto_without_templates_keeps_the_origins_files(models: dict[str, Path], tmp_path: Path) -> None:
    base = tmp_path / "plain"
    shutil.copytree(models["base32"], base)
    write_tokenizer(base, ["hello"])
    recipe = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {base}}}
          - {{id: out, op: save, input: base, path: {tmp_path / 'out'}, chat_template: auto}}
        """)
    run_recipe(recipe)
    assert "chat_template" not in json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())


def test_unknown_chat_template_name_is_a_validation_error(models: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {models['base32']}}}
          - {{id: out, op: save, input: base, path: {tmp_path / 'out'}, chat_template: vicuna}}
        """)
    with pytest.raises(RecipeError, match=r"recipe.yaml:3:\d+: step 'out': field 'chat_template': 'vicuna' is not a chat"):
        load_recipe(recipe)
