"""The Flax examples at a tiny size: they run, print one line per method, return finite scores.

(examples/my_federated_data.py has its own test file.) The defaults are timed in the closing
notes and the README; here only the code path is exercised, in a few seconds each.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example(name: str):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(ROOT, "examples", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # flax.linen modules are dataclasses: they look their module up
    spec.loader.exec_module(module)
    return module


def test_nnx_sinusoid_tiny(capsys):
    out = _example("nnx_sinusoid").main(
        ["--iterations", "3", "--hidden", "4", "--meta-batch", "2", "--eval-tasks", "4"]
    )
    assert set(out) == {"maml", "fomaml"} and all(math.isfinite(v) and v > 0 for v in out.values())
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == ["maml", "fomaml"]
    assert "post-adaptation MSE on 4 held-out tasks" in lines[0]


def test_flax_maml_omniglot_tiny_on_the_procedural_stand_in(capsys, monkeypatch):
    monkeypatch.delenv("FMLJAX_OMNIGLOT", raising=False)
    argv = ["--iterations", "2", "--filters", "4", "--image-size", "14", "--eval-tasks", "2"]
    out = _example("flax_maml_omniglot").main([*argv, "--meta-batch", "2", "--queries", "1"])
    assert set(out) == {"maml", "fomaml"} and all(0.0 <= v <= 1.0 for v in out.values())
    lines = capsys.readouterr().out.splitlines()
    assert "5-way 1-shot accuracy on 2 held-out episodes" in lines[-2]


def test_bad_flag_is_refused():
    with pytest.raises(SystemExit):
        _example("nnx_sinusoid").main(["--iterations", "many"])
