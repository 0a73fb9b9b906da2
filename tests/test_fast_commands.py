"""``validate`` and ``--help`` start fast: they never run torch's (or numpy's) import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parent.parent / "recipes" / "examples" / "dppa.yaml"

PROBE = """
import contextlib, io, json, sys
from mergeengine.cli import main
from mergeengine.lazy import loaded
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        code = main(sys.argv[1:])
    except SystemExit as exc:  # --help
        code = exc.code
print(json.dumps({"code": code, "out": out.getvalue(), "torch": loaded("torch"), "numpy": loaded("numpy"),
                  "torch_C": "torch._C" in sys.modules, "networkx": "networkx" in sys.modules}))
"""


def _probe(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_validate_imports_no_torch():
    r = _probe("validate", str(EXAMPLE))
    assert r["code"] == 0 and "ok (9 steps)" in r["out"]
    assert not r["torch"] and not r["torch_C"] and not r["numpy"] and not r["networkx"], r


def test_validate_errors_import_no_torch(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE.read_text().replace("lambda: 1.0", "lamda: 1.0"))
    r = _probe("validate", str(bad))
    assert r["code"] == 1 and not r["torch"] and not r["torch_C"], r


def test_help_imports_no_torch():
    for command in (["plan", "--help"], ["run", "--help"], ["--help"]):
        r = _probe(*command)
        assert r["code"] == 0 and "usage" in r["out"] and not r["torch"] and not r["torch_C"], (command, r)


def test_deferred_modules_work_when_touched():
    code = ("from mergeengine.lazy import defer, loaded; defer(); import torch, numpy as np; "
            "assert not loaded('torch'); t = torch.arange(3.0) + 1; assert loaded('torch'); "
            "print(float(t.sum()), np.float32(2).dtype, isinstance(t, torch.Tensor))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["6.0", "float32", "True"]


def test_cli_and_eval_cli_import_one_way():
    eval_cli = (Path(__file__).parent.parent / "mergeengine" / "eval" / "cli.py").read_text()
    assert "mergeengine.cli" not in eval_cli.replace(":mod:`mergeengine.cli`", "")
