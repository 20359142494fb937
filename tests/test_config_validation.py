"""Every bad config field is named (field, value, what is allowed) before anything compiles."""

from __future__ import annotations

import dataclasses
import re

import jax
import ml_collections
import pytest
from helpers import tiny_sinusoid_config

import fmljax
from fmljax import sharding, train


def _config(**kw) -> ml_collections.ConfigDict:
    return tiny_sinusoid_config(**kw)


@train.register_task("test-three-features")
def _three_features(config: ml_collections.ConfigDict) -> train.TaskSetup:
    """The sinusoid task with a model that expects 3 input features (the data has 1)."""
    setup = train.TASKS["sinusoid"](config)
    model = fmljax.mlp((3, *config.hidden, 1))
    return dataclasses.replace(setup, model=model, loss_fn=fmljax.mse_loss(model.apply))


@pytest.fixture
def no_compile(monkeypatch):
    """Fail if anything is compiled; the round's jit is also replaced by a tripwire."""
    events = []
    listener = lambda name, *a, **kw: events.append(name) if "backend_compile" in name else None
    jax.monitoring.register_event_duration_secs_listener(listener)

    def tripwire(*a, **kw):
        raise AssertionError("the round was compiled before the error")

    monkeypatch.setattr(sharding, "jit_round", tripwire)
    yield events
    jax.monitoring.unregister_event_duration_listener(listener)


STATIC = [  # (field overrides, the message); all raised by validate_config, before any data
    (dict(algorithm="scaffold"), "config.algorithm='scaffold' is invalid: must be one"),
    (dict(task="cifar"), "config.task='cifar' is invalid: must be one of"),
    (dict(model="resnet"), "config.model='resnet' is invalid: must be one of ('mlp', 'conv4'"),
    (dict(local_lr=0.0), "config.local_lr=0.0 is invalid: must be a finite number > 0"),
    (dict(inner_lr=-0.1), "config.inner_lr=-0.1 is invalid: must be a finite number > 0"),
    (dict(server_lr=0), "config.server_lr=0 is invalid: must be a finite number > 0"),
    (dict(local_steps=0), "config.local_steps=0 is invalid: must be an int >= 1"),
    (dict(tasks_per_client=-2), "config.tasks_per_client=-2 is invalid: must be an int >= 1"),
    (dict(inner_steps=0), "config.inner_steps=0 is invalid: must be an int >= 1 for"),
    (dict(num_rounds=0), "config.num_rounds=0 is invalid: must be an int >= 1"),
    (
        dict(inner_lrr=0.5),
        "config.inner_lrr is not a field of a run of task 'sinusoid' (did you mean 'inner_lr'?)",
    ),
    (dict(clients_per_round=9), "config.clients_per_round=9 is invalid: must be <= config.num"),
    (dict(support_size=0), "config.support_size=0 is invalid: must be an int >= 1"),
    (dict(hidden=(4, 0)), "config.hidden=(4, 0) is invalid: must be a tuple of layer widths"),
    (dict(server_optimizer="rmsprop"), "config.server_optimizer='rmsprop' is invalid: must be"),
    (dict(dropout_prob=1.5), "config.dropout_prob=1.5 is invalid: must be a float in [0, 1)"),
    (dict(straggler_prob=0.5), "config.straggler_prob=0.5 is invalid: must be 0 when local_st"),
    (dict(task_map="pmap"), "config.task_map='pmap' is not one of"),
    (dict(fine_tune=True), "config.fine_tune=True is invalid: must be False unless config.alg"),
    (
        dict(client_axis="data"),
        "config.client_axis='data' is invalid: must be one of config.mesh_axes=('clients',)",
    ),
    (dict(mesh_shape=(-1, 2)), "config.mesh_shape=(-1, 2) is invalid: must be 1 ints, one per"),
]


@pytest.mark.parametrize("overrides, message", STATIC, ids=[next(iter(o)) for o, _ in STATIC])
def test_bad_field_is_named_before_anything_compiles(no_compile, tmp_path, overrides, message):
    config = _config(**overrides)
    with pytest.raises(ValueError, match=re.escape(message)):
        train.validate_config(config)
    with pytest.raises(ValueError, match=re.escape(message)):
        train.train_and_evaluate(config, str(tmp_path))
    assert no_compile == []
    assert not (tmp_path / "checkpoints").exists()


DATA = [  # errors that need the task's data: raised before the round is compiled
    (
        dict(mesh_shape=(3,)),
        "config.mesh_shape=(3,) is invalid: its product must equal the number of devices (1)",
    ),
    (dict(model="conv4"), "config.model='conv4' is invalid for task 'sinusoid': must be 'mlp'"),
    (
        dict(task="test-three-features"),
        "config: the model does not fit the data of task 'test-three-features'",
    ),
]


@pytest.mark.parametrize("overrides, message", DATA, ids=["mesh", "task-model", "shapes"])
def test_bad_field_against_the_data_is_named_before_the_round_compiles(
    no_compile, tmp_path, overrides, message
):
    with pytest.raises(ValueError, match=re.escape(message)):
        train.train_and_evaluate(_config(**overrides), str(tmp_path))


def test_clients_per_round_against_the_data():
    """Tasks whose client count is no config field are checked on their data."""
    setup = train.TASKS["sinusoid"](_config(num_clients=3))
    with pytest.raises(ValueError, match=re.escape("must be <= the number of training clients")):
        train.validate_setup(_config(clients_per_round=5), setup)


def test_mesh_description_errors():
    with pytest.raises(ValueError, match=re.escape("mesh_axes=('x', 'x') is invalid: must be")):
        sharding.validate_mesh((1, 1), ("x", "x"), "x", 1)
    with pytest.raises(ValueError, match=re.escape("mesh_shape=(-1, -1) is invalid: at most")):
        sharding.validate_mesh((-1, -1), ("clients", "model"), "clients", 1)
    assert sharding.validate_mesh((-1, 2), ("clients", "model"), "clients", 8) == (4, 2)
    mesh = sharding.client_mesh()
    with pytest.raises(ValueError, match=re.escape("client_axis='batch' is invalid: must be one")):
        sharding.client_sharding(mesh, "batch")
