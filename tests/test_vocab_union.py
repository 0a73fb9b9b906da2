"""vocab_align: a union vocabulary over tiny tokenizers (built with `tokenizers`), rows per mergekit's rule."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mergeengine.api import run_recipe
from tests.conftest import load_tensors, read_folder, write_recipe

SPECIAL = ["<unk>", "<s>", "</s>"]
WORDS = [f"w{i}" for i in range(117)]  # 3 + 117 = 120 tokens of 128 rows


def write_tokenizer(folder: Path, extra: list[str], added: list[str] = ()) -> None:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS + extra)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False) for t in added])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


@pytest.fixture
def vocab_models(models: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    spec = {"base": ([], []), "math": (["m0", "m1", "shared"], ["<tool>"]), "code": (["c0", "shared"], [])}
    out = {}
    for name, (extra, added) in spec.items():
        dest = tmp_path / name
        shutil.copytree(models[name + "32"], dest)
        write_tokenizer(dest, extra, added)
        out[name] = dest
    return out


def test_union_vocabulary_merge(vocab_models: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = vocab_models
    align = "models: [base, math, code], source: union, pad_to_multiple_of: 8, tokens: {c0: {source: zero}}"
    recipe = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {m['base']}}}
          - {{id: math, op: load, model: {m['math']}}}
          - {{id: code, op: load, model: {m['code']}}}
          - {{id: base_u, op: vocab_align, model: base, {align}}}
          - {{id: math_u, op: vocab_align, model: math, {align}}}
          - {{id: code_u, op: vocab_align, model: code, {align}}}
          - {{id: m, op: merge, method: task_arithmetic, base: base_u, inputs: [math_u, code_u], weights: [0.5, 0.5]}}
          - {{id: out, op: save, input: m, path: {tmp_path / 'out'}, dtype: float32, chat_template: chatml}}
        """)
    run_recipe(recipe)
    out = tmp_path / "out"
    tok = AutoTokenizer.from_pretrained(out)
    vocab = tok.get_vocab()
    assert len(vocab) == 125 and all(t in vocab for t in ("m0", "m1", "shared", "c0", "<tool>"))
    for t in ("m0", "m1", "shared", "c0", "<tool>"):  # every added token round-trips
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert ids == [vocab[t]] and tok.decode(ids) == t
    config = json.loads((out / "config.json").read_text())
    got = read_folder(out)
    assert config["vocab_size"] == got["model.embed_tokens.weight"].shape[0] == 128  # 125 rounded up to 8
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    b, mt, c = (load_tensors(m[k], as_float=True) for k in ("base", "math", "code"))
    mv = {t: i for i, t in enumerate(SPECIAL + WORDS + ["m0", "m1", "shared"])}
    cv = {t: i for i, t in enumerate(SPECIAL + WORDS + ["c0", "shared"])}
    mv["<tool>"] = 123
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        def row(t: str, name: str = name) -> torch.Tensor:
            # mergekit's rule: a model lacking the token takes the base's row if the base has it,
            # the only holder's row, or the mean of the holders (the base has every w*)
            rb = b[name][vocab[t]] if t in SPECIAL + WORDS else None
            rm = mt[name][mv[t]] if t in mv else None
            rc = c[name][cv[t]] if t in cv else None
            if t == "c0":  # tokens: {c0: {source: zero}} applies to the models lacking it
                rb, rm = torch.zeros_like(rc), torch.zeros_like(rc)
            held = [r for r in (rm, rc) if r is not None]
            fill = rb if rb is not None else (held[0] if len(held) == 1 else torch.stack(held).mean(0))
            rb, rm, rc = (fill if r is None else r for r in (rb, rm, rc))
            return rb + 0.5 * (rm - rb) + 0.5 * (rc - rb)

        for t in ("w5", "m0", "shared", "c0", "<tool>", "</s>"):
            torch.testing.assert_close(got[name][vocab[t]], row(t), rtol=1e-5, atol=1e-6, msg=f"{name} {t}")
        real = got[name][:125]
        torch.testing.assert_close(got[name][125:], real.mean(0).expand(3, -1), rtol=1e-5, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert model(torch.tensor([[vocab["<tool>"], vocab["m0"]]])).logits.shape == (1, 2, 128)


@pytest.mark.parametrize(("field", "message"), [
    ("source: elsewhere", "'elsewhere' is not union, base or one of models"),
    ("tokens: {m0: {source: {model: math, token: nope}}}", "token 'nope' is not in the tokenizer of 'math'"),
    ("tokens: {m0: {source: {model: math, token_id: 999}}}", "token id 999 is out of range for 'math' (128 rows)"),
    ("tokens: {m0: {source: {model: math, token: m1, token_id: 1}}}", "give exactly one of 'token' and 'token_id'"),
    ("fill_from: [base, other]", "'other' must be one of models"),
])
def test_vocab_align_errors_name_the_field(vocab_models: dict[str, Path], tmp_path: Path, field: str,
                                           message: str) -> None:
    """Bad sources are one line naming the step (and the field, at validation); nothing is written."""
    from mergeengine.errors import MergeEngineError

    m = vocab_models
    recipe = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {m['base']}}}
          - {{id: math, op: load, model: {m['math']}}}
          - {{id: math_u, op: vocab_align, model: math, models: [base, math], {field}}}
          - {{id: out, op: save, input: math_u, path: {tmp_path / 'out'}}}
        """)
    with pytest.raises(MergeEngineError) as exc:
        run_recipe(recipe)
    assert message in str(exc.value) and "math_u" in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_model_source_fill_from_and_model_token(vocab_models: dict[str, Path], tmp_path: Path) -> None:
    """source: math takes math's tokenizer; fill_from [math] without base_first: a row math alone lacks is
    zero (no other holder merged), a model_token row is that row of the model's own vocabulary."""
    from transformers import AutoTokenizer

    m = vocab_models
    recipe = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {m['base']}}}
          - {{id: math, op: load, model: {m['math']}}}
          - {{id: code, op: load, model: {m['code']}}}
          - {{id: code_u, op: vocab_align, model: code, models: [base, math, code], source: math, fill_from: [code],
              base_first: false, tokens: {{"<tool>": {{source: {{model: math, token: "</s>"}}}}, fresh: {{source: zero}}}}}}
          - {{id: out, op: save, input: code_u, path: {tmp_path / 'out'}, dtype: float32}}
        """)
    run_recipe(recipe)
    vocab = AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab()
    assert set(vocab) == set(SPECIAL + WORDS + ["m0", "m1", "shared", "<tool>", "fresh"])
    got, c, mt = read_folder(tmp_path / "out"), load_tensors(m["code"], as_float=True), load_tensors(m["math"], as_float=True)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(got[name][vocab["shared"]], c[name][121])  # code's own row of a token it has
        assert not got[name][vocab["m0"]].any() and not got[name][vocab["fresh"]].any()
        assert torch.equal(got[name][vocab["<tool>"]], mt[name][2])  # math's "</s>"
