"""``benchmarks/throughput.py --model=PKG.MODULE:FUNCTION``: a user's model (the example
provider ``benchmarks/models_example.py``, a flax.linen CNN) runs as the meta-step and the
federated round with their baselines, at tiny size, and every JSON field says what ran (the
``--model`` string, the parameter count and shapes of the model, no Conv4 ``conv_impl``); a bad
``--model`` is one line on stderr naming ``--model`` and what is allowed, exit code 2, before
anything compiles."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = "benchmarks/models_example.py"
TINY = ["--steps=1", "--warmup=0", "--json"]


def _module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def throughput():
    return _module("benchmarks/throughput.py", "throughput")


@pytest.fixture(scope="module")
def tiny_params():
    example = _module(EXAMPLE, "models_example_under_test")
    return example.tiny_cnn()["model"].init(jax.random.key(0))


def _lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _check_ran(rec: dict, model: str, params) -> None:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    assert rec["model"] == model
    assert rec["model_name"] == "SmallCNN linen 2-way, 4 ch, 8x8"
    assert rec["param_count"] == sum(math.prod(a.shape) for a in jax.tree.leaves(params)) == 198
    assert rec["param_shapes"] == {
        jax.tree_util.keystr(k, simple=True, separator="/"): list(a.shape) for k, a in leaves
    }
    assert rec["param_shapes"]["Conv_0/kernel"] == [3, 3, 1, 4]
    assert rec["conv_impl"] is None  # no Conv4 ran
    assert rec["task_shapes"] == {
        "support": {"x": [2, 8, 8, 1], "y": [2]},
        "query": {"x": [4, 8, 8, 1], "y": [4]},
    }
    assert rec["inner_lr"] == 0.4


def test_meta_step_of_a_user_model_file(throughput, tiny_params, capsys):
    model = f"{EXAMPLE}:tiny_cnn"
    argv = ["--workload=meta-step", f"--model={model}", "--method=maml", "--baseline", *TINY]
    records = throughput.main(argv)
    assert _lines(capsys) == records
    assert [r["impl"] for r in records] == ["onejit", "loop-tasks"]
    for rec in records:
        _check_ran(rec, model, tiny_params)
        assert rec["workload"] == "meta-step" and rec["tasks_per_step"] == 2  # its meta_batch
        assert rec["step_ms_median"] > 0


def test_fed_round_of_a_user_model_module(throughput, tiny_params, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # PKG.MODULE from the current directory, as with python -m
    model = "benchmarks.models_example:tiny_cnn"
    argv = ["--workload=fed-round", f"--model={model}", "--method=fedmeta-maml", "--clients=2"]
    argv += ["--local-steps=1", "--tasks-per-client=1", "--baseline", *TINY]
    records = throughput.main(argv)
    assert _lines(capsys) == records
    assert [r["impl"] for r in records] == ["onejit", "loop-clients"]
    for rec in records:
        _check_ran(rec, model, tiny_params)
        assert (rec["clients"], rec["tasks_per_step"]) == (2, 2)


def test_builtin_models_report_their_parameters(throughput, capsys):
    argv = ["--workload=sinusoid", "--method=maml", "--meta-batch=2", "--compile-only", "--json"]
    (rec,) = throughput.main(argv)
    assert (rec["model"], rec["model_name"], rec["conv_impl"]) == ("mlp", None, None)
    assert rec["param_count"] == (1 * 40 + 40) + (40 * 40 + 40) + (40 * 1 + 1)
    assert rec["param_shapes"]["dense0/w"] == [1, 40]
    assert rec["task_shapes"]["support"]["x"] == [10, 1] and rec["inner_lr"] == 0.01
    capsys.readouterr()


PROVIDERS = """
import jax
import jax.numpy as jnp
import fmljax

def good(**kw):
    model = fmljax.mlp((1, 4, 1))
    return dict(model=model, loss_fn=fmljax.mse_loss(model.apply),
                sample_task=fmljax.data.sinusoid_task_sampler(2, 2),
                clients=fmljax.data.sample_sinusoid_clients(jax.random.key(0), 3), **kw)

def a_list():
    return [1, 2]

def missing():
    return {"model": fmljax.mlp((1, 1))}

def unknown():
    return good(colour="red")

def no_init():
    return {**good(), "model": object()}

def raises():
    raise RuntimeError("no GPU here")

def bad_lr():
    return good(inner_lr=-1.0)

def bad_task():
    return {**good(), "sample_task": lambda key, client: client}

def bad_loss():
    return {**good(), "loss_fn": lambda params, batch: jnp.ones(3)}

def bad_clients():
    return {**good(), "clients": {"a": jnp.ones((3,)), "b": jnp.ones((4,))}}
"""


@pytest.fixture(scope="module")
def providers(tmp_path_factory):
    path = tmp_path_factory.mktemp("providers") / "my_models.py"
    path.write_text(PROVIDERS)
    return str(path)


META = ["--workload=meta-step", "--method=maml"]
FED = ["--workload=fed-round", "--method=fedavg"]
BAD = [
    (META + ["--model=nosuch"], "is not a built-in model"),
    (META + ["--model=no_such_pkg.mod:f"], "cannot import module 'no_such_pkg.mod'"),
    (META + ["--model=benchmarks/nope.py:f"], "no such file 'benchmarks/nope.py'"),
    (META + [f"--model={EXAMPLE}:nope"], "has no function 'nope' (its functions: SmallCNN"),
    (META + ["--model={p}:a_list"], "a_list() returned a list"),
    (META + ["--model={p}:missing"], "returned missing loss_fn, sample_task, clients"),
    (META + ["--model={p}:unknown"], "returned unknown colour"),
    (META + ["--model={p}:no_init"], "returned model: object has no callable init and apply"),
    (META + ["--model={p}:raises"], "raises() raised RuntimeError: no GPU here"),
    (META + ["--model={p}:bad_lr"], "returned inner_lr: -1.0 is not a finite number > 0"),
    (META + ["--model={p}:bad_task"], "not a (support, query) pair"),
    (META + ["--model={p}:bad_loss"], "loss_fn(params, support) is not a scalar"),
    (META + ["--model={p}:bad_clients"], "returned clients: must be a PyTree of arrays"),
    (META, "no --model: --workload=meta-step needs a user's model"),
    (META + ["--model=conv4"], "--workload=meta-step needs a user's model"),
    (
        ["--workload=omniglot-5w1s", "--method=maml", "--model={p}:good"],
        "not run as --workload=omniglot-5w1s",
    ),
    (["--workload=omniglot-5w1s", "--method=maml", "--model=mlp"], "runs its own model, conv4"),
    (META + ["--model={p}:good", "--conv-impl=im2col"], "--conv-impl is for the built-in conv4"),
    (FED + ["--model={p}:good", "--baseline-conv-impl=lax"], "--baseline-conv-impl is for"),
    (META + ["--model={p}:good", "--pytorch"], "--pytorch is for the built-in conv4 only"),
    (FED + ["--model={p}:good"], "--clients=32: --model="),  # the provider has 3 clients
]


@pytest.mark.parametrize("argv, message", BAD, ids=[m for _, m in BAD])
def test_bad_model_is_one_line_exit_2_before_compiling(
    throughput, providers, argv, message, capsys, monkeypatch
):
    def no_compile(*a, **k):
        raise AssertionError("compiled")

    monkeypatch.setattr(throughput, "_compile", no_compile)
    argv = [a.replace("{p}", providers) for a in argv]
    with pytest.raises(SystemExit) as e:
        throughput.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count("\n") == 1 and err.startswith("throughput.py: error: "), err
    assert message in err and "--model" in err and "; allowed: " in err


def test_a_good_provider_passes_and_a_bad_one_fails_on_the_command_line(providers):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    script = os.path.join(ROOT, "benchmarks", "throughput.py")
    out = subprocess.run(
        [sys.executable, script, *META, f"--model={providers}:raises"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [
        f"throughput.py: error: --model='{providers}:raises': raises() raised RuntimeError: "
        "no GPU here; allowed: mlp, conv4, PKG.MODULE:FUNCTION or path/to/file.py:FUNCTION, "
        "FUNCTION() returning a dict or NamedTuple with model, loss_fn, sample_task, clients "
        "(optional: inner_lr, meta_batch, name)"
    ]
    good = [*META, f"--model={providers}:good", "--meta-batch=2", "--compile-only", "--json"]
    out = subprocess.run(
        [sys.executable, script, *good], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    (rec,) = [json.loads(line) for line in out.stdout.splitlines()]
    assert rec["model"] == f"{providers}:good" and rec["model_name"] is None
    assert rec["param_count"] == (1 * 4 + 4) + (4 * 1 + 1) and rec["conv_impl"] is None
    assert (rec["tasks_per_step"], rec["inner_lr"]) == (2, 0.1)  # --meta-batch, the default rate


def test_help_documents_the_protocol(throughput):
    text = throughput.parser().format_help()
    for word in ("PKG.MODULE:FUNCTION", "path/to/file.py:FUNCTION", "models_example.py:small_cnn"):
        assert word in text
    for field in throughput.UserModel._fields:
        assert f"``{field}``" in text


def test_a_flax_adapter_model_reports_its_conv_impl(throughput, capsys, tmp_path):
    """A provider whose model is ``fmljax.from_linen(...)`` reports the conv_impl the adapter
    resolved (``conv_impl='lax'`` asked for here, so the answer is known on any backend)."""
    provider = tmp_path / "linen_provider.py"
    provider.write_text(
        "import sys\n"
        f"sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r})\n"
        "import jax.numpy as jnp, fmljax, models_example as ex\n\n"
        "def provider():\n"
        "    p = ex.tiny_cnn()\n"
        "    m = fmljax.from_linen(ex.SmallCNN(ways=2, features=4), jnp.zeros((2, 8, 8, 1)),\n"
        "                          conv_impl='lax')\n"
        "    return dict(p, model=m, loss_fn=fmljax.cross_entropy_loss(m.apply))\n"
    )
    argv = ["--workload=meta-step", f"--model={provider}:provider", "--method=fomaml", *TINY]
    records = throughput.main(argv)
    capsys.readouterr()
    assert [r["conv_impl"] for r in records] == ["lax"]
