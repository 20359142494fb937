"""Bad input, through the command line and the Python API: one clear error, before anything
compiles, and the workdir as it was.

Every case runs against a copy of a finished run's workdir (checkpoints of rounds 4, 8 and 12,
metrics, summary): the error must name the field and what is allowed, no round or evaluation
program may be compiled (a tripwire replaces them), and every file of the workdir must have
the same bytes afterwards. The command line is ``experiments/main.py``'s ``cli`` called in
this process (exit code 2, one line on stderr).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import sys

import jax
import ml_collections
import numpy as np
import pytest
from helpers import snapshot, tiny_sinusoid_config

import fmljax.tasks
from fmljax import sharding, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main_module():
    """``experiments/main.py``, loaded once per process (it defines absl flags)."""
    name = "fmljax_experiments_main"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, f"{ROOT}/experiments/main.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@train.register_task("test-bad-labels", fields=train.TASK_FIELDS["synthetic"])
def _bad_labels(config: ml_collections.ConfigDict) -> train.TaskSetup:
    """Synthetic(0.5, 0.5) with two labels outside the model's 10 classes (99 and -3)."""
    setup = train.TASKS["synthetic"](
        ml_collections.ConfigDict(config.to_dict() | {"task": "synthetic"})
    )
    data = jax.tree.map(lambda x: x, setup.train_data)
    y = np.array(data["train"]["y"])
    y[0, 0], y[1, 1] = 99, -3
    data["train"] = {**data["train"], "y": y}
    return dataclasses.replace(setup, train_data=data)


@train.register_task("test-wide-input")
def _wide_input(config: ml_collections.ConfigDict) -> train.TaskSetup:
    """The sinusoid task with a model that expects 3 input features (the data has 1)."""
    setup = train.TASKS["sinusoid"](config)
    model = fmljax.mlp((3, *config.hidden, 1))
    return dataclasses.replace(setup, model=model, loss_fn=fmljax.mse_loss(model.apply))


BASE = dict(num_rounds=12, rounds_per_call=4, eval_every=12, checkpoint_every=4)
BASE["keep_checkpoints"] = 3
LABELS = dict(
    task="test-bad-labels",
    algorithm="fedavg",
    fine_tune=True,
    model="mlp",
    num_clients=6,
    max_examples=20,
)
LABELS |= dict(batch_size=4, support_size=3, query_size=3)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (12 rounds, checkpoints 4, 8, 12) and a config file that gives it."""
    root = tmp_path_factory.mktemp("finished")
    config = tiny_sinusoid_config(**BASE)
    train.train_and_evaluate(config, str(root / "run"))
    path = root / "tiny.py"
    path.write_text(
        "import ml_collections\n\n\ndef get_config():\n"
        f"    return ml_collections.ConfigDict({config.to_dict()!r})\n"
    )
    return root, config


@pytest.fixture
def workdir(finished, tmp_path):
    """A copy of the finished run's workdir, and its snapshot."""
    run = tmp_path / "run"
    shutil.copytree(finished[0] / "run", run)
    return str(run), snapshot(run)


@pytest.fixture
def no_compile(monkeypatch):
    """A tripwire in place of every round and evaluation program; the XLA compilations."""

    def tripwire(*a, **kw):
        raise AssertionError("a round or evaluation program was built before the error")

    monkeypatch.setattr(sharding, "jit_round", tripwire)
    monkeypatch.setattr(train, "_Rounds", tripwire)
    events: list[str] = []
    listener = lambda name, *a, **kw: events.append(name) if "backend_compile" in name else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    yield events
    jax.monitoring.unregister_event_duration_listener(listener)


# ---- the command line ----------------------------------------------------------------------

# (id, command-line arguments after the program ({cfg}: the tiny config file, {run}: the
# workdir), the fragments the one-line error must contain, whether it needs the task's data)
CLI = [
    ("no-config-file", ["--config=no/such/file.py", "--workdir={run}"],
     ["--config=no/such/file.py: no such file", "relative paths are taken from"], False),
    ("empty-config", ["--config=", "--workdir={run}"],
     ["--config: must name a config file"], False),
    ("no-config", ["--workdir={run}"], ["--config is required"], False),
    ("no-workdir", ["--config={cfg}"], ["--workdir is required"], False),
    ("empty-workdir", ["--config={cfg}", "--workdir="],
     ["--workdir='' is invalid: must be a directory path"], False),
    ("unknown-flag", ["--config={cfg}", "--workdir={run}", "--num_rounds=5"],
     ["num_rounds"], False),
    ("misspelt-override", ["--config={cfg}", "--workdir={run}", "--config.inner_lrr=0.1"],
     ["--config.inner_lrr: the config has no field 'inner_lrr' (did you mean 'inner_lr'?)"],
     False),
    ("new-field-override", ["--config={cfg}", "--workdir={run}", "--config.float64=True"],
     ["--config.float64: the config has no field 'float64'", "added in the config file"],
     False),
    ("float-for-int", ["--config={cfg}", "--workdir={run}", "--config.num_rounds=1.5"],
     ["num_rounds", "1.5"], False),
    ("text-for-float", ["--config={cfg}", "--workdir={run}", "--config.inner_lr=fast"],
     ["inner_lr", "fast"], False),
    ("inf-rate", ["--config={cfg}", "--workdir={run}", "--config.inner_lr=inf"],
     ["config.inner_lr=inf is invalid: must be a finite number > 0"], False),
    ("nan-rate", ["--config={cfg}", "--workdir={run}", "--config.server_lr=nan"],
     ["config.server_lr=nan is invalid: must be a finite number > 0"], False),
    ("negative-rate", ["--config={cfg}", "--workdir={run}", "--config.local_lr=-0.1"],
     ["config.local_lr=-0.1 is invalid: must be a finite number > 0"], False),
    ("empty-algorithm", ["--config={cfg}", "--workdir={run}", "--config.algorithm="],
     ["config.algorithm", "must be one"], False),
    ("misspelt-algorithm", ["--config={cfg}", "--workdir={run}", "--config.algorithm=fedmaml"],
     ["config.algorithm='fedmaml' is invalid: must be one", "did you mean"], False),
    ("misspelt-task", ["--config={cfg}", "--workdir={run}", "--config.task=sinusiod"],
     ["config.task='sinusiod' is invalid", "(did you mean 'sinusoid'?)"], False),
    ("zero-query", ["--config={cfg}", "--workdir={run}", "--config.query_size=0"],
     ["config.query_size=0 is invalid: must be an int >= 1"], False),
    ("zero-rounds-per-call", ["--config={cfg}", "--workdir={run}", "--config.rounds_per_call=0"],
     ["config.rounds_per_call=0 is invalid: must be an int >= 1"], False),
    ("zero-eval-every", ["--config={cfg}", "--workdir={run}", "--config.eval_every=0"],
     ["config.eval_every=0 is invalid: must be an int >= 1"], False),
    ("negative-checkpoint-every",
     ["--config={cfg}", "--workdir={run}", "--config.checkpoint_every=-4"],
     ["config.checkpoint_every=-4 is invalid: must be an int >= 1"], False),
    ("zero-keep", ["--config={cfg}", "--workdir={run}", "--config.keep_checkpoints=0"],
     ["config.keep_checkpoints=0 is invalid: must be an int >= 1"], False),
    ("too-many-clients", ["--config={cfg}", "--workdir={run}", "--config.clients_per_round=9"],
     ["config.clients_per_round=9 is invalid: must be <= config.num_clients"], False),
    ("zero-width", ["--config={cfg}", "--workdir={run}", "--config.hidden=(4,0)"],
     ["config.hidden=(4, 0) is invalid: must be a tuple of layer widths"], False),
    ("optimizer", ["--config={cfg}", "--workdir={run}", "--config.server_optimizer=rmsprop"],
     ["config.server_optimizer='rmsprop' is invalid: must be"], False),
    ("rounds-below-checkpoint", ["--config={cfg}", "--workdir={run}", "--config.num_rounds=8"],
     ["config.num_rounds=8", "12"], True),
    ("changed-on-resume", ["--config={cfg}", "--workdir={run}", "--config.inner_lr=0.02"],
     ["inner_lr", "0.02"], True),
    ("model-too-big", ["--config={cfg}", "--workdir={run}", "--config.hidden=(200000,200000)"],
     ["config: the model does not fit in memory"], True),
]  # fmt: skip


def _cli(args: list[str], cfg: str, run: str, capsys) -> tuple[int, str]:
    argv = ["main.py", *(a.format(cfg=cfg, run=run) for a in args), "--compilation_cache="]
    code = _main_module().cli(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "args, fragments, needs_data", [c[1:] for c in CLI], ids=[c[0] for c in CLI]
)
def test_command_line(finished, workdir, no_compile, capsys, args, fragments, needs_data):
    run, before = workdir
    code, err = _cli(args, str(finished[0] / "tiny.py"), run, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert snapshot(run) == before
    if not needs_data:
        assert no_compile == []


def _config_file(tmp_path, body: str) -> str:
    path = tmp_path / f"bad_{os.path.basename(tmp_path)}.py"  # a module name per file
    path.write_text(body)
    return str(path)


CONFIG_FILES = [
    ("misspelt-field",
     "from helpers import tiny_sinusoid_config\n\ndef get_config():\n"
     "    c = tiny_sinusoid_config()\n    c.inner_lrr = 0.5\n    return c\n",
     ["config.inner_lrr is not a field of a run of task 'sinusoid' (did you mean 'inner_lr'?)"]),
    ("syntax-error", "def get_config(:\n    pass\n", ["bad_", "line 1"]),
    ("no-get-config", "X = 1\n", ["the file has no function get_config()"]),
    ("init-from-nothing",
     "from helpers import tiny_sinusoid_config\n\ndef get_config():\n"
     "    return tiny_sinusoid_config(init_from='/no/such/run')\n",
     ["config.init_from='/no/such/run' is invalid: must be a run directory with checkpoints/"]),
]  # fmt: skip


@pytest.mark.parametrize(
    "body, fragments", [c[1:] for c in CONFIG_FILES], ids=[c[0] for c in CONFIG_FILES]
)
def test_config_file(workdir, no_compile, capsys, tmp_path, body, fragments):
    run, before = workdir
    sys.path.insert(0, os.path.dirname(__file__))
    try:
        code, err = _cli(
            ["--config={cfg}", "--workdir={run}"], _config_file(tmp_path, body), run, capsys
        )
    finally:
        sys.path.remove(os.path.dirname(__file__))
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert snapshot(run) == before
    assert no_compile == []


def test_omniglot_without_its_archive(workdir, no_compile, capsys, monkeypatch, tmp_path):
    """The Omniglot config's source is a placeholder: a path on the command line is taken,
    and a path that is not there is named."""
    run, before = workdir
    monkeypatch.delenv("FMLJAX_OMNIGLOT", raising=False)
    cfg = f"{ROOT}/experiments/configs/omniglot_maml.py:5w1s,cpu"
    missing = str(tmp_path / "omniglot.npz")
    code, err = _cli(["--config={cfg}", "--workdir={run}", f"--config.omniglot_source={missing}"],
                     cfg, run, capsys)  # fmt: skip
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and missing in err and "omniglot" in err, err
    assert snapshot(run) == before


def test_the_same_command_on_a_finished_run_changes_nothing(finished, workdir, capsys):
    run, before = workdir
    code = _main_module().cli(
        [
            "main.py",
            f"--config={finished[0] / 'tiny.py'}",
            f"--workdir={run}",
            "--compilation_cache=",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert f"the run in {run} is complete (round 12 of 12)" in out
    assert snapshot(run) == before


# ---- the Python API --------------------------------------------------------------------------

# (id, config overrides of the finished run's config, fragments of the ValueError, whether it
# needs the task's data)
API = [
    ("no-task", dict(task=None), ["config.task=None is invalid: must be one of"], False),
    ("unknown-task", dict(task="cifar"), ["config.task='cifar' is invalid"], False),
    ("model-name", dict(model="resnet"), ["config.model='resnet' is invalid: must be one of"],
     False),
    ("float-steps", dict(local_steps=2.5), ["config.local_steps=2.5 is invalid: must be an int"],
     False),
    ("bool-rounds", dict(num_rounds=True), ["config.num_rounds=True is invalid: must be an int"],
     False),
    ("zero-inner-steps", dict(inner_steps=0), ["config.inner_steps=0 is invalid"], False),
    ("zero-support", dict(support_size=0), ["config.support_size=0 is invalid: must be an int"],
     False),
    ("negative-tasks", dict(tasks_per_client=-2), ["config.tasks_per_client=-2 is invalid"],
     False),
    ("inf-server-lr", dict(server_lr=float("inf")),
     ["config.server_lr=inf is invalid: must be a finite number > 0"], False),
    ("fine-tune", dict(fine_tune=True), ["config.fine_tune=True is invalid"], False),
    ("straggler", dict(straggler_prob=0.5), ["config.straggler_prob=0.5 is invalid"], False),
    ("task-map", dict(task_map="pmap"), ["config.task_map='pmap' is not one of"], False),
    ("client-axis", dict(client_axis="data"), ["config.client_axis='data' is invalid"], False),
    ("unknown-field", dict(learning_rate=0.1),
     ["config.learning_rate is not a field of a run of task 'sinusoid'"], False),
    ("dropout-one", dict(dropout_prob=1.0),
     ["config.dropout_prob=1.0 is invalid: must be a float in [0, 1)"], False),
    ("negative-eval-steps", dict(eval_inner_steps=-1), ["config.eval_inner_steps=-1 is invalid"],
     False),
    ("task-model", dict(model="conv4"),
     ["config.model='conv4' is invalid for task 'sinusoid': must be 'mlp'"], True),
    ("shapes", dict(task="test-wide-input"),
     ["config: the model does not fit the data of task 'test-wide-input'"], True),
    ("labels", LABELS, ["outside the model's classes: must be in [0, 9]", "[-3, 99]"], True),
    ("rounds-below-checkpoint", dict(num_rounds=8), ["config.num_rounds=8", "12"], True),
]  # fmt: skip


@pytest.mark.parametrize(
    "overrides, fragments, needs_data", [c[1:] for c in API], ids=[c[0] for c in API]
)
def test_python_api(finished, workdir, no_compile, overrides, fragments, needs_data):
    run, before = workdir
    config = ml_collections.ConfigDict(finished[1].to_dict() | overrides)
    with pytest.raises(ValueError) as info:
        train.train_and_evaluate(config, run)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert snapshot(run) == before
    if not needs_data:
        assert no_compile == []


def test_python_api_run_level(finished, workdir, no_compile):
    """The workdir and the algorithm list of run_experiment."""
    run, before = workdir
    with pytest.raises(ValueError, match="workdir='' is invalid"):
        train.train_and_evaluate(finished[1], "")
    config = ml_collections.ConfigDict(finished[1].to_dict() | {"algorithm": " , "})
    with pytest.raises(ValueError, match="config.algorithm"):
        train.run_experiment(config, run)
    assert snapshot(run) == before
    assert no_compile == []


def test_numpy_ints_are_ints(finished, workdir, capsys):
    """numpy scalars (what a sweep over np.arange gives) are accepted where ints are."""
    run, before = workdir
    ints = dict(num_rounds=np.int64(12), clients_per_round=np.int32(2), seed=np.int64(0))
    config = ml_collections.ConfigDict(finished[1].to_dict() | ints)
    train.validate_config(config)
    summary = train.train_and_evaluate(config, run)
    assert summary["rounds"] == 12 and snapshot(run) == before
