"""A shared recipe cannot destroy, leak or corrupt anything: one test (or more) per finding of issue 14.

Each test runs a recipe someone else could have written on tiny checkpoints, through the public
API or the CLI, and checks that nothing outside the output was touched.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import read_folder, write_recipe

from mergeengine import api, cli
from mergeengine.errors import ModelError, OutputError, RecipeError
from mergeengine.ops.merge import MergeOp as TaskArithmetic


def project(tmp_path: Path, models: dict[str, Path]) -> Path:
    """A folder holding copies of the base and math models, where the recipes are written."""
    proj = tmp_path / "proj"
    proj.mkdir()
    for name in ("base", "math"):
        shutil.copytree(models[name], proj / name)
    return proj


def ta(folder: Path, path: str, name: str = "recipe.yaml", extra: str = "", base: str = "./base") -> Path:
    return write_recipe(folder, f"""
        steps:
          - {{id: base, op: load, model: {base}}}
          - {{id: math, op: load, model: ./math}}
          - {{id: m, op: merge, method: task_arithmetic, base: base, inputs: [math]}}
          - {{id: out, op: save, input: m, path: '{path}'{extra}}}
        """, name)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (symlinks as their target)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = os.readlink(p).encode()
        elif p.is_file():
            out[str(p.relative_to(folder))] = p.read_bytes()
    return out


def no_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any merge arithmetic runs (refusals must come before the work)."""
    def compute(self, inputs, ctx):
        raise AssertionError("the merge ran before the refusal")

    monkeypatch.setattr(TaskArithmetic, "compute", compute)


# --- 1. --overwrite deletes whatever folder save.path names ---------------------------------------


def test_finding_1_overwrite_refuses_ancestor(tmp_path, models, monkeypatch):
    proj = project(tmp_path, models)
    before = tree(tmp_path)
    no_compute(monkeypatch)
    r = ta(proj, "..")
    with pytest.raises(OutputError, match="holds the recipe's folder"):
        api.run_recipe(r, overwrite=True)
    assert tree(tmp_path) == {**before, "proj/recipe.yaml": r.read_bytes()}


def test_finding_1_overwrite_refuses_recipe_folder(tmp_path, models, monkeypatch):
    proj = project(tmp_path, models)
    no_compute(monkeypatch)
    r = ta(proj, ".")
    before = tree(proj)
    with pytest.raises(OutputError, match="is the recipe's folder"):
        api.run_recipe(r, overwrite=True)
    assert tree(proj) == before


def test_finding_1_overwrite_refuses_home_and_its_folders(tmp_path, models, monkeypatch):
    proj = project(tmp_path, models)
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("PRIVATE KEY")
    monkeypatch.setenv("HOME", str(home))
    no_compute(monkeypatch)
    with pytest.raises(OutputError, match="not written by mergeengine"):
        api.run_recipe(ta(proj, str(home / ".ssh")), overwrite=True)
    with pytest.raises(OutputError, match="is the home folder"):
        api.run_recipe(ta(proj, "~"), overwrite=True)
    assert (home / ".ssh" / "id_ed25519").read_text() == "PRIVATE KEY"


def test_finding_1_overwrite_refuses_current_folder(tmp_path, models, monkeypatch):
    proj = project(tmp_path, models)
    (proj / "work").mkdir()
    monkeypatch.chdir(proj / "work")
    no_compute(monkeypatch)
    with pytest.raises(OutputError, match="is the current folder"):
        api.run_recipe(ta(proj, "./work"), overwrite=True)
    assert (proj / "work").is_dir()


def test_finding_1_overwrite_refuses_input_folder(tmp_path, models, monkeypatch):
    proj = project(tmp_path, models)
    api.run_recipe(ta(proj, "merged"))  # a folder mergeengine wrote...
    before = tree(proj / "merged")
    no_compute(monkeypatch)
    r = ta(proj, "./merged", name="again.yaml", base="./merged")  # ...that is now an input
    with pytest.raises(OutputError, match="holds the input of load step 'base'"):
        api.run_recipe(r, overwrite=True)
    with pytest.raises(OutputError, match="holds the input of load step 'math'"):
        api.run_recipe(ta(proj, "./math", name="onto_math.yaml"), overwrite=True)
    assert tree(proj / "merged") == before
    assert (proj / "math" / "model.safetensors").read_bytes() == (models["math"] / "model.safetensors").read_bytes()


def test_finding_1_overwrite_never_replaces_a_file(tmp_path, models, monkeypatch):
    proj = project(tmp_path, models)
    no_compute(monkeypatch)
    r = ta(proj, "recipe.yaml")
    with pytest.raises(OutputError, match="replaces only folders"):
        api.run_recipe(r, overwrite=True)
    assert "recipe.yaml" in r.read_text()


def test_finding_1_overwrite_replaces_only_own_or_empty_folders(tmp_path, models):
    proj = project(tmp_path, models)
    (proj / "out").mkdir()
    api.run_recipe(ta(proj, "out"), overwrite=True)  # empty: replaced
    api.run_recipe(ta(proj, "out"), overwrite=True)  # written by mergeengine: replaced
    (proj / "theirs").mkdir()
    (proj / "theirs" / "notes.txt").write_text("keep")
    (proj / "theirs" / "mergeengine.json").write_text('{"steps": []}')  # not a provenance record
    with pytest.raises(OutputError, match="not written by mergeengine"):
        api.run_recipe(ta(proj, "theirs", name="theirs.yaml"), overwrite=True)
    assert (proj / "theirs" / "notes.txt").read_text() == "keep"


# --- 2. two runs of one recipe at once ------------------------------------------------------------

_BLOCKING_RUN = textwrap.dedent("""
    import pathlib, sys, time
    from mergeengine import api
    from mergeengine.ops.merge import MergeOp as TaskArithmetic

    recipe, ready, gate = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
    original, calls = TaskArithmetic.compute, [0]

    def compute(self, inputs, ctx):
        calls[0] += 1
        if calls[0] == 15:  # a few shards are finished: say so, then wait
            ready.write_text("ready")
            while not gate.exists():
                time.sleep(0.02)
        return original(self, inputs, ctx)

    TaskArithmetic.compute = compute
    print(api.summary_line(api.run_recipe(recipe)))
""")


def sharded(folder: Path, path: str, name: str = "recipe.yaml") -> Path:
    return ta(folder, path, name=name, extra=", max_shard_bytes: 30KB")


def start_blocked_run(tmp_path: Path, recipe: Path) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "blocking_run.py"
    script.write_text(_BLOCKING_RUN)
    ready, gate = tmp_path / "ready", tmp_path / "gate"
    proc = subprocess.Popen([sys.executable, str(script), str(recipe), str(ready), str(gate)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the first run did not reach its pause: {proc.communicate()}")
        time.sleep(0.05)
    return proc, gate


def outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name not in ("README.md", "mergeengine.json")}


def test_finding_2_second_run_on_same_output_fails_at_once(tmp_path, models):
    proj = project(tmp_path, models)
    api.run_recipe(sharded(proj, "reference", name="reference.yaml"))
    r = sharded(proj, "out")
    first, gate = start_blocked_run(tmp_path, r)
    try:
        with pytest.raises(OutputError, match=rf"another run \(pid {first.pid}\) is writing {proj / 'out'}"):
            api.run_recipe(r)
        with pytest.raises(OutputError, match="another run"):
            api.run_recipe(r, overwrite=True, resume=True)
    finally:
        gate.write_text("go")
        stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert "wrote" in stdout
    assert outputs(proj / "out") == outputs(proj / "reference")  # no shard of the first run was lost
    assert not (proj / ".out.lock").exists() and not (proj / ".out.partial").exists()


def test_finding_2_lock_of_a_killed_run_is_taken_over(tmp_path, models, monkeypatch):
    proj = project(tmp_path, models)
    api.run_recipe(sharded(proj, "reference", name="reference.yaml"))
    r = sharded(proj, "out")
    first, _ = start_blocked_run(tmp_path, r)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    assert (proj / ".out.lock").read_text().strip() == str(first.pid)  # stale: its process is gone
    calls = {"n": 0}
    original = TaskArithmetic.compute

    def compute(self, inputs, ctx):
        calls["n"] += 1
        return original(self, inputs, ctx)

    monkeypatch.setattr(TaskArithmetic, "compute", compute)
    api.run_recipe(r, resume=True)
    assert outputs(proj / "out") == outputs(proj / "reference")
    assert 0 < calls["n"] < 21  # the killed run's finished shards were kept
    assert not (proj / ".out.lock").exists()


# --- 3. secrets copied into the output ------------------------------------------------------------


@pytest.mark.parametrize("name", ["../secret.txt", "/etc/passwd", "~/.ssh/id_rsa", "model.safetensors", "a/x', 'b/x",
                                  "model-00001-of-00002.safetensors", "config.json", "mergeengine.json",
                                  "README.md", "model.safetensors.index.json"])
def test_finding_3_copy_files_refuses_outside_and_writer_names(tmp_path, models, name):
    proj = project(tmp_path, models)
    r = ta(proj, "out", extra=f", copy_files: ['{name}']")
    with pytest.raises(RecipeError, match="copy_files"):
        api.validate(r)


def test_finding_3_copy_files_symlink_out_of_the_model_is_refused(tmp_path, models, monkeypatch):
    proj = project(tmp_path, models)
    (tmp_path / "secret.txt").write_text("PRIVATE")
    (proj / "base" / "LICENSE").symlink_to(tmp_path / "secret.txt")
    no_compute(monkeypatch)
    with pytest.raises(ModelError, match="outside the model folder"):
        api.run_recipe(ta(proj, "out", extra=", copy_files: [LICENSE]"))
    assert sorted(p.name for p in proj.iterdir()) == ["base", "math", "recipe.yaml"]


def test_finding_3_tokenizer_symlink_out_of_the_model_is_refused(tmp_path, models, monkeypatch):
    proj = project(tmp_path, models)
    (tmp_path / "passwd").write_text("root:x:0:0")
    (proj / "math" / "tokenizer.json").symlink_to(tmp_path / "passwd")
    no_compute(monkeypatch)
    with pytest.raises(ModelError, match="tokenizer.json resolves to .*outside the model folder"):
        api.run_recipe(ta(proj, "out", extra=", tokenizer_from: math"))
    assert not (proj / "out").exists()


def test_finding_3_files_inside_the_model_are_copied(tmp_path, models):
    proj = project(tmp_path, models)
    (proj / "base" / "docs").mkdir()
    (proj / "base" / "docs" / "LICENSE").write_text("license")
    (proj / "base" / "tokenizer.json").symlink_to("docs/LICENSE")  # a link that stays inside is fine
    api.run_recipe(ta(proj, "out", extra=", copy_files: [docs/LICENSE]"))
    assert (proj / "out" / "LICENSE").read_text() == "license"
    assert (proj / "out" / "tokenizer.json").read_text() == "license"
    assert read_folder(proj / "out")  # the merged weights are the merge's


def test_finding_3_hub_snapshot_links_into_its_blobs_are_copied(tmp_path, models, monkeypatch):
    proj = project(tmp_path, models)
    cache = tmp_path / "hub"
    repo = cache / "models--org--base"
    snap = repo / "snapshots" / ("c" * 40)
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)
    for f in [*models["base"].iterdir(), proj / "tok.json"]:
        if f.name == "tok.json":
            f.write_text('{"tokenizer": "hub"}')
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / ("tokenizer.json" if f.name == "tok.json" else f.name)).symlink_to(os.path.relpath(blob, snap))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    api.run_recipe(ta(proj, "out", base="org/base"))
    assert json.loads((proj / "out" / "tokenizer.json").read_text()) == {"tokenizer": "hub"}


@pytest.mark.parametrize("shard", ["../math/model.safetensors", "/etc/passwd"])
def test_finding_3_index_shard_outside_the_folder_is_refused(tmp_path, models, shard):
    proj = project(tmp_path, models)
    shutil.copytree(models["math_sharded"], proj / "sharded")
    index = proj / "sharded" / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    first = next(iter(doc["weight_map"]))
    doc["weight_map"][first] = shard
    index.write_text(json.dumps(doc))
    r = write_recipe(proj, """
        steps:
          - {id: base, op: load, model: ./base}
          - {id: s, op: load, model: ./sharded}
          - {id: m, op: merge, method: task_arithmetic, base: base, inputs: [s]}
          - {id: out, op: save, input: m, path: out}
        """, "sharded.yaml")
    with pytest.raises(ModelError, match="outside the model folder"):
        api.plan_recipe(r)


def test_finding_3_torch_index_shard_outside_the_folder_is_refused(tmp_path, models):
    proj = project(tmp_path, models)
    (proj / "bin").mkdir()
    (proj / "bin" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "../../x.bin"}}))
    r = write_recipe(proj, """
        steps:
          - {id: x, op: load, model: ./bin, allow_pickle: true}
          - {id: out, op: save, input: x, path: out}
        """, "bin.yaml")
    with pytest.raises(ModelError, match="outside the model folder"):
        api.plan_recipe(r)


# --- 4. the overwrite commit is not atomic --------------------------------------------------------


def failing_rename(monkeypatch: pytest.MonkeyPatch, *, also_restore: bool) -> None:
    original = os.replace

    def replace(src, dst, *args, **kwargs):
        name = Path(src).name
        if name.endswith(".partial") or (also_restore and ".old-" in name):
            raise OSError(errno.EIO, "Input/output error")
        return original(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def test_finding_4_failed_commit_restores_the_previous_output(tmp_path, models, monkeypatch, capsys):
    proj = project(tmp_path, models)
    r = ta(proj, "out")
    api.run_recipe(r)
    before = tree(proj / "out")
    failing_rename(monkeypatch, also_restore=False)
    assert cli.main(["run", str(r), "--overwrite", "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "internal error" not in err and len(err.splitlines()) == 1
    assert "the previous output is back in place" in err and str(proj / ".out.partial") in err
    assert tree(proj / "out") == before
    new = proj / ".out.partial"
    assert (new / "model.safetensors").is_file() and (new / "mergeengine.json").is_file()  # complete, kept
    assert not list(proj.glob(".out.old*"))


def test_finding_4_failed_restore_says_where_both_folders_are(tmp_path, models, monkeypatch):
    proj = project(tmp_path, models)
    r = ta(proj, "out")
    api.run_recipe(r)
    before = tree(proj / "out")
    failing_rename(monkeypatch, also_restore=True)
    with pytest.raises(OutputError, match="nor restore the previous one") as err:
        api.run_recipe(r, overwrite=True)
    old = next(proj.glob(".out.old-*"))
    assert f"the previous output is in {old}" in str(err.value)
    assert tree(old) == before
    assert (proj / ".out.partial" / "model.safetensors").is_file()


def test_finding_4_a_destination_that_appears_during_the_run_is_not_replaced(tmp_path, models, monkeypatch):
    proj = project(tmp_path, models)
    original = TaskArithmetic.compute

    def compute(self, inputs, ctx):
        (proj / "out").mkdir(exist_ok=True)
        (proj / "out" / "theirs.txt").write_text("theirs")
        return original(self, inputs, ctx)

    monkeypatch.setattr(TaskArithmetic, "compute", compute)
    with pytest.raises(OutputError, match=r"not written by mergeengine.*the finished output is in .*\.out\.partial"):
        api.run_recipe(ta(proj, "out"), overwrite=True)
    assert (proj / "out" / "theirs.txt").read_text() == "theirs"
    assert (proj / ".out.partial" / "model.safetensors").is_file()


# --- 5. two save steps to the same (or a nested) path ---------------------------------------------


@pytest.mark.parametrize("second", ["out", "./out/", "out/inner", "."])
def test_finding_5_two_saves_to_same_or_nested_path_are_refused(tmp_path, models, second):
    proj = project(tmp_path, models)
    r = write_recipe(proj, f"""
        steps:
          - {{id: base, op: load, model: ./base}}
          - {{id: math, op: load, model: ./math}}
          - {{id: m, op: merge, method: task_arithmetic, base: base, inputs: [math]}}
          - {{id: a, op: save, input: m, path: out}}
          - {{id: b, op: save, input: math, path: '{second}'}}
        """)
    with pytest.raises(RecipeError, match=r"recipe.yaml:6:\d+: step 'b': field 'path': writes .*step 'a' \(line 5\)"):
        api.validate(r)


def test_finding_5_a_save_into_another_saves_work_folder_is_refused(tmp_path, models, monkeypatch):
    proj = project(tmp_path, models)
    r = write_recipe(proj, """
        steps:
          - {id: base, op: load, model: ./base}
          - {id: math, op: load, model: ./math}
          - {id: m, op: merge, method: task_arithmetic, base: base, inputs: [math]}
          - {id: a, op: save, input: m, path: out}
          - {id: b, op: save, input: math, path: .out.partial}
        """)
    no_compute(monkeypatch)
    with pytest.raises(OutputError, match="writes into the work folder of save step 'a'"):
        api.run_recipe(r, overwrite=True)
    assert sorted(p.name for p in proj.iterdir()) == ["base", "math", "recipe.yaml"]


def test_finding_5_saves_aliased_by_a_symlink_are_refused_before_writing(tmp_path, models, monkeypatch):
    proj = project(tmp_path, models)
    (proj / "real").mkdir()
    (proj / "alias").symlink_to("real")
    r = write_recipe(proj, """
        steps:
          - {id: base, op: load, model: ./base}
          - {id: math, op: load, model: ./math}
          - {id: m, op: merge, method: task_arithmetic, base: base, inputs: [math]}
          - {id: a, op: save, input: m, path: real/out}
          - {id: b, op: save, input: math, path: alias/out}
        """)
    no_compute(monkeypatch)
    with pytest.raises(OutputError, match="save steps 'a' and 'b' write the same folder"):
        api.run_recipe(r)
    assert list((proj / "real").iterdir()) == []


# --- 6. --resume trusts path, size and mtime ------------------------------------------------------


def interrupt_at(monkeypatch: pytest.MonkeyPatch, n: int) -> dict[str, int]:
    calls = {"n": 0}
    original = TaskArithmetic.compute

    def compute(self, inputs, ctx):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return original(self, inputs, ctx)

    monkeypatch.setattr(TaskArithmetic, "compute", compute)
    return calls


def replace_keeping_size_and_mtime(target: Path, source: Path) -> None:
    """What ``cp -p`` does: new bytes, the old size (same shapes) and the old mtime."""
    st = target.stat()
    assert source.stat().st_size == st.st_size
    target.write_bytes(source.read_bytes())
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_finding_6_resume_refuses_an_input_changed_with_same_size_and_mtime(tmp_path, models, monkeypatch):
    proj = project(tmp_path, models)
    r = sharded(proj, "out")
    interrupt_at(monkeypatch, 15)
    with pytest.raises(KeyboardInterrupt):
        api.run_recipe(r)
    partial = tree(proj / ".out.partial")
    replace_keeping_size_and_mtime(proj / "math" / "model.safetensors", models["code"] / "model.safetensors")
    interrupt_at(monkeypatch, 10**9)
    with pytest.raises(OutputError, match=r"cannot resume: input 'math' changed .*model.safetensors.*"
                                          r"--resume=restart") as err:
        api.run_recipe(r, resume=True)
    assert "--resume to continue" not in str(err.value)
    assert tree(proj / ".out.partial") == partial  # the shards stay for the user to decide
    assert not (proj / "out").exists()


def test_finding_6_resume_restart_recomputes_and_records_the_new_sha256(tmp_path, models, monkeypatch, capsys):
    proj = project(tmp_path, models)
    r = sharded(proj, "out")
    interrupt_at(monkeypatch, 15)
    with pytest.raises(KeyboardInterrupt):
        api.run_recipe(r)
    new = proj / "math" / "model.safetensors"
    replace_keeping_size_and_mtime(new, models["code"] / "model.safetensors")
    calls = interrupt_at(monkeypatch, 10**9)
    assert cli.main(["run", str(r), "--resume=restart", "-q"]) == 0
    assert calls["n"] == 21  # nothing stale was kept
    api.run_recipe(sharded(proj, "fresh", name="fresh.yaml"))
    assert outputs(proj / "out") == outputs(proj / "fresh")
    recorded = json.loads((proj / "out" / "mergeengine.json").read_text())["provenance"]["inputs"]["math"]
    assert recorded["files"]["model.safetensors"] == hashlib.sha256(new.read_bytes()).hexdigest()


def test_finding_6_resume_of_unchanged_inputs_keeps_the_shards(tmp_path, models, monkeypatch):
    proj = project(tmp_path, models)
    r = sharded(proj, "out")
    interrupt_at(monkeypatch, 15)
    with pytest.raises(KeyboardInterrupt):
        api.run_recipe(r)
    os.utime(proj / "math" / "model.safetensors")  # touched, same content: still resumable
    calls = interrupt_at(monkeypatch, 10**9)
    api.run_recipe(r, resume=True)
    assert 0 < calls["n"] < 21


def test_finding_6_cli_resume_flag_before_the_recipe(tmp_path, models, monkeypatch):
    proj = project(tmp_path, models)
    r = sharded(proj, "out")
    interrupt_at(monkeypatch, 15)
    with pytest.raises(KeyboardInterrupt):
        api.run_recipe(r)
    calls = interrupt_at(monkeypatch, 10**9)
    assert cli.main(["run", "--resume", str(r), "-q"]) == 0
    assert 0 < calls["n"] < 21


# --- 7. recipe parsing ----------------------------------------------------------------------------


def test_finding_7_duplicate_keys_are_errors_with_both_lines(tmp_path, models):
    proj = project(tmp_path, models)
    r = proj / "recipe.yaml"
    r.write_text(textwrap.dedent("""\
        steps:
          - {id: base, op: load, model: ./base}
          - {id: out, op: save, input: base, path: out, path: elsewhere}
        name: x
        steps:
          - {id: base, op: load, model: /somewhere/else}
        """))
    with pytest.raises(RecipeError) as err:
        api.validate(r)
    lines = err.value.problems
    assert any(re.search(r"recipe.yaml:3:\d+: duplicate key 'path' \(first at line 3\)", line) for line in lines)
    assert any(re.search(r"recipe.yaml:5:1: duplicate key 'steps' \(first at line 1\)", line) for line in lines)


def test_finding_7_alias_bomb_is_refused(tmp_path, models):
    proj = project(tmp_path, models)
    bomb = ["provenance:", '  a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, cur in zip("abcdefgh", "bcdefghi"):
        bomb.append(f"  {cur}: &{cur} [{', '.join(['*' + prev] * 9)}]")
    r = ta(proj, "out")
    r.write_text(r.read_text() + "\n".join(bomb) + "\n")
    with pytest.raises(RecipeError, match="aliases are not allowed"):
        api.validate(r)
    r.write_text(r.read_text().split("provenance:")[0] + "provenance:\n  <<: {a: 1}\n")
    with pytest.raises(RecipeError, match=r"merge keys \(<<\) are not allowed"):
        api.validate(r)


def test_finding_7_recipe_is_parsed_once(tmp_path, models, monkeypatch):
    import yaml

    from mergeengine.recipe import loader

    proj = project(tmp_path, models)
    made = []

    class Counting(loader._LOADER):
        def __init__(self, stream):
            made.append(1)
            super().__init__(stream)

    monkeypatch.setattr(loader, "_LOADER", Counting)
    for name in ("compose", "safe_load", "load"):
        monkeypatch.setattr(yaml, name, lambda *a, **k: pytest.fail("parsed a second time"))
    api.validate(ta(proj, "out"))
    assert made == [1]


# --- 8. checkpoint headers ------------------------------------------------------------------------


def write_raw_safetensors(path: Path, header: object, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


F32x2 = {"dtype": "F32", "shape": [2]}
BAD_HEADERS = {
    "negative offsets": ({"a": {**F32x2, "data_offsets": [-8, 0]}}, 8, "malformed data_offsets"),
    "overlapping offsets": ({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [4, 12]}},
                            12, "overlaps"),
    "gap": ({"a": {**F32x2, "data_offsets": [8, 16]}}, 16, "gap at byte 0"),
    "beyond the file": ({"a": {**F32x2, "data_offsets": [0, 8]}}, 4, "truncated"),
    "trailing bytes": ({"a": {**F32x2, "data_offsets": [0, 8]}}, 12, "trailing bytes"),
    "JSON list": ([1, 2, 3], 0, "not a JSON object"),
    "string shape": ({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, 8, "malformed shape"),
    "negative shape": ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "malformed shape"),
    "unknown dtype": ({"a": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, 8, "unsupported dtype"),
    "entry not an object": ({"a": "x"}, 0, "must be an object"),
    "size mismatch": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, "need 12"),
    "metadata not strings": ({"__metadata__": {"format": 1}}, 0, "__metadata__"),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_finding_8_malformed_headers_are_one_line_errors(tmp_path, models, capsys, case):
    header, data_bytes, message = BAD_HEADERS[case]
    proj = project(tmp_path, models)
    bad = proj / "bad.safetensors"
    write_raw_safetensors(bad, header, b"\0" * data_bytes)
    r = write_recipe(proj, """
        steps:
          - {id: x, op: load, model: ./bad.safetensors}
          - {id: out, op: save, input: x, path: out}
        """)
    with pytest.raises(ModelError, match=message) as err:
        api.plan_recipe(r)
    assert str(bad) in str(err.value)
    assert cli.main(["run", str(r), "-q"]) == 1
    out = capsys.readouterr().err.strip()
    assert out.startswith(f"error: {bad}") and len(out.splitlines()) == 1 and "internal" not in out
    assert not (proj / "out").exists()


# --- 9. smaller: numbers, ~, hub lookups, path: / -------------------------------------------------


@pytest.mark.parametrize("field", ["lambda: .nan", "lambda: .inf", "lambda: -.inf", "lambda: 1e39", "lambda: '1e39'",
                                   "weights: [.nan]", "weights: [-1e40]"])
def test_finding_9_nonfinite_and_float32_overflow_numbers_are_refused(tmp_path, models, field):
    proj = project(tmp_path, models)
    r = write_recipe(proj, f"""
        steps:
          - {{id: base, op: load, model: ./base}}
          - {{id: math, op: load, model: ./math}}
          - {{id: m, op: merge, method: task_arithmetic, base: base, inputs: [math], {field}}}
          - {{id: out, op: save, input: m, path: out}}
        """)
    with pytest.raises(RecipeError, match=rf"recipe.yaml:4:\d+: step 'm': .*'{field.split(':')[0]}'"):
        api.validate(r)


def test_finding_9_nested_numbers_are_checked_for_every_op(tmp_path, models):
    proj = project(tmp_path, models)
    r = write_recipe(proj, """
        steps:
          - {id: base, op: load, model: ./base}
          - {id: math, op: load, model: ./math}
          - {id: d, op: diff, model: math, base: base}
          - {id: a, op: dpa_amplify, input: d, partitions: [{density: 0.1, scale: 1e39}]}
          - {id: out, op: save, input: a, path: out}
        """)
    with pytest.raises(RecipeError, match=r"recipe.yaml:5:\d+: step 'a': field 'scale': .*float32 range"):
        api.validate(r)


def test_finding_9_tilde_expands_in_model_and_save_paths(tmp_path, models, monkeypatch):
    home = tmp_path / "home"
    for name in ("base", "math"):
        shutil.copytree(models[name], home / "models" / name)
    monkeypatch.setenv("HOME", str(home))
    r = write_recipe(tmp_path, """
        steps:
          - {id: base, op: load, model: ~/models/base}
          - {id: math, op: load, model: ~/models/math}
          - {id: m, op: merge, method: task_arithmetic, base: base, inputs: [math]}
          - {id: out, op: save, input: m, path: ~/merged}
        """)
    api.run_recipe(r)
    assert (home / "merged" / "model.safetensors").is_file()
    assert not (tmp_path / "~").exists()


def test_finding_9_missing_local_folder_is_not_looked_up_on_the_hub(tmp_path, models, monkeypatch):
    from mergeengine.io import resolve

    proj = project(tmp_path, models)
    (proj / "models").mkdir()  # models/ exists, models/base does not: a typo, not a hub repo
    monkeypatch.setattr(resolve, "resolve_hub_model", lambda *a, **k: pytest.fail("looked up on the hub"))
    r = ta(proj, "out", base="models/base")
    with pytest.raises(ModelError, match="model not found.*local path, not a hub repo id") as err:
        api.plan_recipe(r)
    assert str(proj / "models" / "base") in str(err.value)


def test_finding_9_hub_id_is_tried_when_no_local_path_is_meant(tmp_path, models, monkeypatch):
    from mergeengine.io import resolve

    proj = project(tmp_path, models)
    asked = []

    def resolve_hub_model(repo_id, revision, allow_pickle=False):
        asked.append(repo_id)
        raise ModelError("not in the offline cache", file=repo_id)

    monkeypatch.setattr(resolve, "resolve_hub_model", resolve_hub_model)
    with pytest.raises(ModelError, match="not in the offline cache"):
        api.plan_recipe(ta(proj, "out", base="org/base"))
    assert asked == ["org/base"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_finding_9_root_path_is_refused_before_writing(tmp_path, models, monkeypatch, overwrite):
    proj = project(tmp_path, models)
    no_compute(monkeypatch)
    with pytest.raises(OutputError, match="a filesystem root cannot be an output folder"):
        api.run_recipe(ta(proj, "/"), overwrite=overwrite)
    assert not Path("/..partial").exists() and not Path("/.lock").exists()


