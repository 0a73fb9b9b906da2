"""Robustness: errors that cross process boundaries, closed pipes, padded deltas, interrupted replaces."""

from __future__ import annotations

import importlib
import os
import pickle
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_recipe

import mergeengine
from mergeengine.errors import MergeEngineError, RecipeError


def _error_classes() -> list[type[MergeEngineError]]:
    """Every MergeEngineError subclass in the package (modules needing an absent extra are skipped)."""
    for info in pkgutil.walk_packages(mergeengine.__path__, "mergeengine."):
        if info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
        except ImportError:
            continue
    found, todo = [], [MergeEngineError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(set(found), key=lambda c: c.__qualname__)


def _sample(cls: type[MergeEngineError]) -> MergeEngineError:
    if issubclass(cls, RecipeError):
        return cls(["recipe.yaml:3:5: step 'm': field 'lambda': must be finite", "recipe.yaml:9:1: step 'x': unknown"])
    return cls("something broke; do this instead", step="m", tensor="lm_head.weight", file="/models/a")


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda c: c.__name__)
def test_every_error_round_trips_through_pickle(cls):
    exc = _sample(cls)
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls
    assert str(back) == str(exc) and back.args == exc.args
    assert vars(back) == vars(exc)


def test_error_classes_are_all_found():
    names = {c.__name__ for c in _error_classes()}
    assert {"RecipeError", "ModelError", "ShapeError", "NonFiniteError", "OutputError", "ExecutionError",
            "TaskFileError"} <= names


def test_convert_error_round_trips_through_pickle():
    from mergeengine.recipe.mergekit_methods import ConvertError

    back = pickle.loads(pickle.dumps(ConvertError(("models", 1, "parameters"), "unknown parameter 'x'")))
    assert (back.where, back.message) == (("models", 1, "parameters"), "unknown parameter 'x'")


def _with_stdout_closed(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``mergeengine ARGS`` as in ``mergeengine ARGS | head -0``: the reader of its stdout is gone."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "mergeengine", *args], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, cwd=cwd, timeout=120,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    finally:
        os.close(write_end)


@pytest.mark.parametrize("args", [["validate", "recipe.yaml"], ["plan", "recipe.yaml"],
                                  ["plan", "recipe.yaml", "--format", "json"], ["run", "recipe.yaml", "--quiet"],
                                  ["convert", "mergekit.yml", "-o", "converted.yaml"], ["--help"], ["--version"]],
                         ids=" ".join)
def test_a_closed_stdout_ends_quietly(tmp_path, models, args):
    """``mergeengine plan recipe.yaml | head -1``: no traceback, no error line; the work itself is done."""
    write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {models['base']}}}
          - {{id: ft, op: load, model: {models['math']}}}
          - {{id: m, op: merge, method: task_arithmetic, base: base, inputs: [ft], weights: [0.5]}}
          - {{id: out, op: save, input: m, path: out}}
        """)
    write_recipe(tmp_path, f"""
        merge_method: linear
        models:
          - {{model: {models['base']}, parameters: {{weight: 1.0}}}}
          - {{model: {models['math']}, parameters: {{weight: 1.0}}}}
        """, name="mergekit.yml")
    done = _with_stdout_closed(*args, cwd=tmp_path)
    assert done.stderr == "" and done.returncode in (0, 141), (done.returncode, done.stderr)
    if args[0] == "run":
        assert (tmp_path / "out" / "mergeengine.json").is_file()
    if args[0] == "convert":
        assert (tmp_path / "converted.yaml").is_file()


def test_a_vocabulary_padded_delta_saves_as_the_fine_tune(tmp_path, models):
    """diff with ``vocab: pad_base`` keeps the fine-tune's extra rows; its save writes zero-padded base + delta."""
    import json

    import torch
    from conftest import load_tensors, read_folder

    from mergeengine.cli import main
    from mergeengine.tiny import LlamaShape, make_weights, write_checkpoint

    big = LlamaShape(vocab_size=136)
    write_checkpoint(tmp_path / "ft", make_weights(big, 0), big, dtype=torch.float32)
    r = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {models['base32']}}}
          - {{id: ft, op: load, model: ./ft}}
          - {{id: d, op: diff, model: ft, base: base, vocab: pad_base}}
          - {{id: p, op: dp_prune, input: d, density: 0.5}}
          - {{id: out, op: save, input: d, path: out, dtype: float32}}
          - {{id: out_p, op: save, input: p, path: out_p}}
        """)
    assert main(["run", str(r), "--quiet"]) == 0
    ft, base = load_tensors(tmp_path / "ft"), load_tensors(models["base32"])
    out, pruned = read_folder(tmp_path / "out"), read_folder(tmp_path / "out_p")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[name].shape == pruned[name].shape == (136, 64)
        torch.testing.assert_close(out[name], ft[name])  # base + (ft - base); 0 + ft on the new rows
        kept = pruned[name][128:].float() != 0  # the new rows: 0 + pruned delta, so kept entries are ft's
        assert kept.any() and torch.equal(pruned[name][128:][kept], ft[name][128:][kept].to(pruned[name].dtype))
    torch.testing.assert_close(out["model.norm.weight"], ft["model.norm.weight"])
    assert base["lm_head.weight"].shape == (128, 64)
    for folder in ("out", "out_p"):
        assert json.loads((tmp_path / folder / "config.json").read_text())["vocab_size"] == 136


class _Crash(BaseException):
    """The process dying at a chosen point (not an error any handler catches)."""


def _two_runs_recipe(tmp_path, models, weight):
    return write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {models['base']}}}
          - {{id: ft, op: load, model: {models['math']}}}
          - {{id: m, op: merge, method: task_arithmetic, base: base, inputs: [ft], weights: [{weight}]}}
          - {{id: out, op: save, input: m, path: out}}
        """)


def _crash_in_replace(monkeypatch, where: str) -> None:
    """Die between the two renames of an overwrite (``where="second rename"``) or just after them."""
    import shutil

    from mergeengine.io import output_guard

    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if where == "second rename" and Path(src).name == ".out.partial":
            raise _Crash
        return real_replace(src, dst, *args, **kwargs)

    def rmtree(path, *args, **kwargs):
        if Path(path).name.startswith(".out.old-"):
            raise _Crash
        return shutil.rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    if where == "removing the old output":
        monkeypatch.setattr(output_guard.shutil, "rmtree", rmtree)


def _messages(capsys) -> list[str]:
    """The warning and error lines a CLI run printed (progress bars left out)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith(("WARNING:", "error:"))]


def _leftovers(tmp_path):
    return sorted(p.name for p in tmp_path.glob(".out.old-*"))


def test_a_crash_between_the_renames_is_recovered_on_the_next_run(tmp_path, models, monkeypatch, capsys):
    from conftest import read_folder

    from mergeengine import api
    from mergeengine.cli import main

    api.run_recipe(_two_runs_recipe(tmp_path, models, 0.5))
    first = read_folder(tmp_path / "out")
    with monkeypatch.context() as m:
        _crash_in_replace(m, "second rename")
        with pytest.raises(_Crash):
            api.run_recipe(_two_runs_recipe(tmp_path, models, 0.25), overwrite=True)
    (old,) = _leftovers(tmp_path)
    assert not (tmp_path / "out").exists()
    # the next run puts the previous output back first: without --overwrite it then stops there
    assert main(["run", str(tmp_path / "recipe.yaml")]) == 1
    warning, error = _messages(capsys)
    assert "restored" in warning and old in warning and str(tmp_path / "out") in warning
    assert "output path exists" in error
    assert _leftovers(tmp_path) == [] and read_folder(tmp_path / "out").keys() == first.keys()
    assert all(torch.equal(t, first[n]) for n, t in read_folder(tmp_path / "out").items())
    assert main(["run", str(tmp_path / "recipe.yaml"), "--overwrite"]) == 0
    assert _messages(capsys) == []


def test_a_crash_after_the_renames_leaves_nothing_on_the_next_run(tmp_path, models, monkeypatch, capsys):
    from mergeengine import api
    from mergeengine.cli import main

    api.run_recipe(_two_runs_recipe(tmp_path, models, 0.5))
    with monkeypatch.context() as m:
        _crash_in_replace(m, "removing the old output")
        with pytest.raises(_Crash):
            api.run_recipe(_two_runs_recipe(tmp_path, models, 0.25), overwrite=True)
    (old,) = _leftovers(tmp_path)
    assert (tmp_path / "out" / "mergeengine.json").is_file()
    assert main(["run", str(tmp_path / "recipe.yaml"), "--overwrite"]) == 0
    (warning,) = _messages(capsys)
    assert "removed" in warning and old in warning
    assert _leftovers(tmp_path) == []


def test_a_look_alike_folder_mergeengine_did_not_write_is_never_touched(tmp_path, models, capsys):
    from mergeengine.cli import main

    mine = tmp_path / ".out.old-1234abcd"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (mine / "mergeengine.json").write_text("{}")  # not a provenance record
    assert main(["run", str(_two_runs_recipe(tmp_path, models, 0.5))]) == 0
    assert _messages(capsys) == []
    assert (mine / "notes.txt").read_text() == "my notes" and (tmp_path / "out" / "mergeengine.json").is_file()


@pytest.mark.parametrize(("field", "line"), [
    ("save path", '  - {id: out, op: save, input: base, path: "out\\nerror: all good"}'),
    ("load model", '  - {id: other, op: load, model: "./x\\r"}'),
    ("copy_files", '  - {id: out, op: save, input: base, path: out, copy_files: ["a\\u001b[2Jb"]}'),
])
def test_control_characters_in_paths_are_refused(tmp_path, models, capsys, field, line):
    """A newline in a path would split the one-line messages that name it (and could forge one)."""
    from mergeengine.cli import main

    lines = ["steps:", f"  - {{id: base, op: load, model: {models['base']}}}", line]
    if "op: save" not in line:
        lines.append("  - {id: out, op: save, input: base, path: out}")
    (tmp_path / "recipe.yaml").write_text("\n".join(lines) + "\n")
    assert main(["run", str(tmp_path / "recipe.yaml")]) == 1
    (message,) = capsys.readouterr().err.strip().splitlines()
    assert message.startswith(f"{tmp_path / 'recipe.yaml'}:3:") and "control character" in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_ctrl_c_between_the_renames_waits_until_the_new_output_is_in(tmp_path, models, monkeypatch):
    """SIGINT while the old output is aside: it takes effect once the new one is in place, never in between."""
    import signal

    from conftest import read_folder

    from mergeengine import api

    api.run_recipe(_two_runs_recipe(tmp_path, models, 0.5))
    first = read_folder(tmp_path / "out")
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if Path(dst).name.startswith(".out.old-"):
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        api.run_recipe(_two_runs_recipe(tmp_path, models, 0.25), overwrite=True)
    second = read_folder(tmp_path / "out")
    assert second.keys() == first.keys() and not all(torch.equal(t, first[n]) for n, t in second.items())
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_model_of_another_size_is_one_short_line(tmp_path, models, capsys):
    """Every tensor differs: the line shows a few and counts the rest, instead of listing the whole model."""
    from mergeengine.cli import main
    from mergeengine.tiny import LlamaShape, make_weights, write_checkpoint

    small = LlamaShape(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
    write_checkpoint(tmp_path / "small", make_weights(small, 0), small)
    r = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {models['base']}}}
          - {{id: ft, op: load, model: ./small}}
          - {{id: m, op: merge, method: ties, base: base, inputs: [ft], density: 0.3}}
          - {{id: out, op: save, input: m, path: out}}
        """)
    assert main(["run", str(r)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: step 'm': tensor 'lm_head.weight': shape [128, 32] in 'ft' vs [128, 64] in 'base'")
    assert line.endswith("and 13 more tensors that differ") and len(line) < 1000, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml", "small"]


def test_nan_in_an_input_names_the_file_it_came_from(tmp_path, models, capsys):
    from mergeengine.cli import main
    from mergeengine.tiny import LlamaShape, fine_tune, make_weights, write_checkpoint

    weights = fine_tune(make_weights(LlamaShape(), 0), 1)
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    write_checkpoint(tmp_path / "ft", weights, LlamaShape(), dtype=torch.float32)
    r = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {models['base']}}}
          - {{id: ft, op: load, model: ./ft}}
          - {{id: m, op: merge, method: ties, base: base, inputs: [ft], density: 0.5}}
          - {{id: out, op: save, input: m, path: out}}
        """)
    assert main(["run", str(r), "-q"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: step 'm': tensor 'model.layers.1.mlp.up_proj.weight': result has 1 NaN/Inf")
    assert line.endswith(f"; load step 'ft' reads NaN/Inf from {tmp_path / 'ft' / 'model.safetensors'}: "
                         "fix that input or pass --allow-nonfinite"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft", "recipe.yaml"]


def _disk_fills_mid_file(monkeypatch) -> None:
    """The disk fills after half of the next text file is written."""
    import errno

    from mergeengine.io import output_guard

    def write_half(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output_guard, "_write_bytes", write_half)


def test_a_full_disk_leaves_a_converted_recipe_as_it_was(tmp_path, models, monkeypatch, capsys):
    from mergeengine.cli import main

    write_recipe(tmp_path, f"""
        merge_method: linear
        models:
          - {{model: {models['base']}, parameters: {{weight: 1.0}}}}
          - {{model: {models['math']}, parameters: {{weight: 1.0}}}}
        """, name="mergekit.yml")
    (tmp_path / "recipe.yaml").write_text("the previous recipe\n")
    _disk_fills_mid_file(monkeypatch)
    assert main(["convert", str(tmp_path / "mergekit.yml"), "-o", str(tmp_path / "recipe.yaml")]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"error: {tmp_path / 'recipe.yaml'}: disk full while writing; free space and rerun"
    assert (tmp_path / "recipe.yaml").read_text() == "the previous recipe\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mergekit.yml", "recipe.yaml"]


def test_a_merge_of_a_larger_vocabulary_says_which_vocab_setting_fixes_it(tmp_path, models, capsys):
    from mergeengine.cli import main
    from mergeengine.tiny import LlamaShape, make_weights, write_checkpoint

    big = LlamaShape(vocab_size=136)
    write_checkpoint(tmp_path / "ft", make_weights(big, 0), big)
    r = write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {models['base']}}}
          - {{id: ft, op: load, model: ./ft}}
          - {{id: d, op: diff, model: ft, base: base, vocab: pad_base}}
          - {{id: m, op: merge, method: task_arithmetic, base: base, inputs: [d]}}
          - {{id: out, op: save, input: m, path: out}}
        """)
    assert main(["run", str(r)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: step 'm': tensor 'lm_head.weight': shape [136, 64] in 'd' vs [128, 64] in 'base'")
    assert line.endswith("the vocabularies differ: set 'vocab: truncate' or 'vocab: pad_base' on this step"), line


def _two_saves_recipe(tmp_path: Path, models: dict[str, Path]) -> Path:
    return write_recipe(tmp_path, f"""
        steps:
          - {{id: base, op: load, model: {models['base']}}}
          - {{id: ft, op: load, model: {models['math']}}}
          - {{id: m, op: merge, method: task_arithmetic, base: base, inputs: [ft], weights: [0.5]}}
          - {{id: first, op: save, input: m, path: one}}
          - {{id: second, op: save, input: ft, path: two}}
        """)


def _before_second_commit(monkeypatch: pytest.MonkeyPatch, act) -> None:
    """Run ``act(folder)`` just before the save step 'second' moves its finished folder into place."""
    from mergeengine.io.writer import OutputFolder

    real_commit = OutputFolder.commit

    def commit(self: OutputFolder) -> Path:
        if self.step == "second":
            act(self)
        return real_commit(self)

    monkeypatch.setattr(OutputFolder, "commit", commit)


def test_an_interrupt_after_one_of_two_saves_says_which_was_written(tmp_path, models, monkeypatch, capsys):
    from mergeengine.cli import main

    r = _two_saves_recipe(tmp_path, models)

    def interrupt(folder: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        _before_second_commit(m, interrupt)
        assert main(["run", str(r), "-q"]) == 130
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"interrupted: {tmp_path / 'one'} (step 'first') was written completely; nothing was written "
                    f"at {tmp_path / 'two'} (rerun with --resume --overwrite to continue)")
    assert (tmp_path / "one" / "model.safetensors").is_file() and not (tmp_path / "two").exists()
    assert main(["run", str(r), "-q", "--resume", "--overwrite"]) == 0  # what the message says works
    assert (tmp_path / "two" / "model.safetensors").is_file()


def test_an_interrupt_before_any_save_keeps_the_short_message(tmp_path, models, monkeypatch, capsys):
    from mergeengine.cli import main
    from mergeengine.io.writer import OutputFolder

    def interrupt(self: OutputFolder) -> Path:
        raise KeyboardInterrupt

    monkeypatch.setattr(OutputFolder, "commit", interrupt)
    assert main(["run", str(_two_saves_recipe(tmp_path, models)), "-q"]) == 130
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == "interrupted: nothing was written at the destination (rerun with --resume to continue)"
    assert not (tmp_path / "one").exists() and not (tmp_path / "two").exists()


def test_a_failure_after_one_of_two_saves_says_which_was_written(tmp_path, models, monkeypatch, capsys):
    """Another process creates the second destination while the run finishes: the first save is complete."""
    from mergeengine.cli import main

    _before_second_commit(monkeypatch, lambda folder: folder.dest.mkdir())
    assert main(["run", str(_two_saves_recipe(tmp_path, models)), "-q"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {tmp_path / 'two'}: step 'second': output path exists; pass --overwrite")
    assert line.endswith(f" ({tmp_path / 'one'} (step 'first') was written completely; "
                         f"nothing was written at {tmp_path / 'two'})")
    assert (tmp_path / "one" / "model.safetensors").is_file() and not any((tmp_path / "two").iterdir())
