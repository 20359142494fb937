"""Bad input through the Python API: a ValueError naming the field, the bad value and the
allowed range, raised before anything is compiled; good input of the same kinds still runs."""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import flat, rel_err

import fmljax
from fmljax import RoundConfig, adapt, meta_gradient

# The event XLA's backend compile records (jax/_src/dispatch.py: BACKEND_COMPILE_EVENT).
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
NAN, INF = float("nan"), float("inf")

# Everything a call needs is made here, before any compilation is counted.
MODEL = fmljax.mlp((1, 4, 1))
LOSS = fmljax.mse_loss(MODEL.apply)
PARAMS = MODEL.init(jax.random.key(0))
SUPPORT, QUERY = fmljax.data.sample_sinusoid_task(jax.random.key(1), 3, 3)
SAMPLER = fmljax.data.sinusoid_task_sampler(3, 3)
BASE = dict(clients_per_round=2, tasks_per_client=1, local_steps=2, inner_lr=0.03)


@contextlib.contextmanager
def count_compiles():
    """Yields a list that gets one entry per XLA backend compilation while the block runs."""
    events: list[str] = []

    def listener(event: str, duration: float, **kw) -> None:
        if event == COMPILE_EVENT:
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _cfg(**kw) -> RoundConfig:
    return RoundConfig(**(BASE | kw))


def _build(name="fedmeta-maml", config=None, **kw):
    config = _cfg() if config is None else config
    return lambda: fmljax.build(name, LOSS, SAMPLER, config, **kw)


def _round(**kw):
    return _build(config=_cfg(**kw))


def _meta(**kw):
    args = dict(inner_lr=0.1, inner_steps=1, method="maml") | kw
    return lambda: meta_gradient(LOSS, PARAMS, SUPPORT, QUERY, **args)


def _adapt(**kw):
    args = dict(inner_lr=0.1, inner_steps=1) | kw
    return lambda: adapt(LOSS, PARAMS, SUPPORT, **args)


F = "fedmeta-maml: RoundConfig."
INT1, INT0, FINITE = "must be an int >= 1", "must be an int >= 0", "must be a finite number > 0"
MAPS = "is not one of ('vmap', 'map', 'chunked', 'unroll')"
# (id, the call, the exception, the field and its value as the message shows them, the rule)
CASES = [
    ("cpr-zero", _round(clients_per_round=0), ValueError, F + "clients_per_round=0", INT1),
    ("cpr-float", _round(clients_per_round=2.0), ValueError, F + "clients_per_round=2.0", INT1),
    ("cpr-bool", _round(clients_per_round=True), ValueError, F + "clients_per_round=True", INT1),
    ("cpr-str", _round(clients_per_round="3"), ValueError, F + "clients_per_round='3'", INT1),
    (
        "cpr-np-bool",
        _round(clients_per_round=np.bool_(True)),
        ValueError,
        "clients_per_round=",
        INT1,
    ),
    ("tpc-neg", _round(tasks_per_client=-1), ValueError, F + "tasks_per_client=-1", INT1),
    ("steps-none", _round(local_steps=None), ValueError, F + "local_steps=None", INT1),
    ("inner-steps-neg", _round(inner_steps=-1), ValueError, F + "inner_steps=-1", INT0),
    ("inner-steps-meta", _round(inner_steps=0), ValueError, F + "inner_steps=0", INT1),
    (
        "inner-steps-reptile",
        _build("fedreptile", _cfg(inner_steps=0)),
        ValueError,
        "fedreptile: RoundConfig.inner_steps=0",
        INT1,
    ),
    (
        "eval-steps",
        _round(eval_inner_steps=-1),
        ValueError,
        F + "eval_inner_steps=-1",
        "must be None or an int >= 0",
    ),
    (
        "eval-tasks",
        _round(eval_tasks_per_client=0),
        ValueError,
        F + "eval_tasks_per_client=0",
        INT1,
    ),
    (
        "more-zero",
        _round(eval_more_steps=(0,)),
        ValueError,
        F + "eval_more_steps=(0,)",
        "must be a tuple of distinct ints >= 1",
    ),
    (
        "more-dup",
        _round(eval_more_steps=(3, 3)),
        ValueError,
        F + "eval_more_steps=(3, 3)",
        "must be a tuple of distinct ints >= 1",
    ),
    (
        "more-int",
        _round(eval_more_steps=3),
        ValueError,
        F + "eval_more_steps=3",
        "must be a tuple of distinct ints >= 1",
    ),
    ("local-lr-str", _round(local_lr="abc"), ValueError, F + "local_lr='abc'", FINITE),
    ("local-lr-none", _round(local_lr=None), ValueError, F + "local_lr=None", FINITE),
    ("local-lr-inf", _round(local_lr=INF), ValueError, F + "local_lr=inf", FINITE),
    ("local-lr-nan", _round(local_lr=NAN), ValueError, F + "local_lr=nan", FINITE),
    ("local-lr-huge-int", _round(local_lr=10**400), ValueError, F + "local_lr=1000", FINITE),
    ("inner-lr-none", _round(inner_lr=None), ValueError, F + "inner_lr=None", FINITE),
    ("inner-lr-neg", _round(inner_lr=-0.01), ValueError, F + "inner_lr=-0.01", FINITE),
    ("inner-lr-np-inf", _round(inner_lr=np.float64(INF)), ValueError, F + "inner_lr=", FINITE),
    ("fd-str", _round(fd_delta="x"), ValueError, F + "fd_delta='x'", FINITE),
    ("fd-nan", _round(fd_delta=NAN), ValueError, F + "fd_delta=nan", FINITE),
    ("fd-zero", _round(fd_delta=0.0), ValueError, F + "fd_delta=0.0", FINITE),
    (
        "drop-one",
        _round(dropout_prob=1.0),
        ValueError,
        F + "dropout_prob=1.0",
        "a float in [0, 1) (at 1.0 every sampled client would drop out of every round",
    ),
    (
        "drop-above",
        _round(dropout_prob=1.5),
        ValueError,
        F + "dropout_prob=1.5",
        "must be a float in [0, 1)",
    ),
    ("drop-neg", _round(dropout_prob=-0.1), ValueError, F + "dropout_prob=-0.1", "in [0, 1)"),
    ("drop-str", _round(dropout_prob="0.5"), ValueError, F + "dropout_prob='0.5'", "in [0, 1)"),
    ("drop-nan", _round(dropout_prob=NAN), ValueError, F + "dropout_prob=nan", "in [0, 1)"),
    (
        "straggle-above",
        _round(straggler_prob=1.5),
        ValueError,
        F + "straggler_prob=1.5",
        "must be a float in [0, 1]",
    ),
    (
        "straggle-none",
        _round(straggler_prob=None),
        ValueError,
        F + "straggler_prob=None",
        "must be a float in [0, 1]",
    ),
    (
        "straggle-one-step",
        _round(straggler_prob=0.5, local_steps=1),
        ValueError,
        F + "straggler_prob=0.5",
        "must be 0 when local_steps=1",
    ),
    ("client-map", _round(client_map="pmap"), ValueError, F + "client_map='pmap'", MAPS),
    ("task-map-none", _round(task_map=None), ValueError, F + "task_map=None", MAPS),
    (
        "chunked-no-chunk",
        _round(client_map="chunked"),
        ValueError,
        F + "client_map='chunked'",
        "needs a chunk size >= 1",
    ),
    (
        "client-chunk",
        _round(client_chunk=0),
        ValueError,
        F + "client_chunk=0",
        "must be None or an int >= 1",
    ),
    (
        "task-chunk-float",
        _round(task_map="chunked", task_chunk=2.5),
        ValueError,
        F + "task_chunk=2.5",
        "must be None or an int >= 1",
    ),
    ("remat-str", _round(remat="yes"), ValueError, F + "remat='yes'", "must be True or False"),
    (
        "server-opt-float",
        _build(server_optimizer=0.1),
        ValueError,
        "fedmeta-maml: server_optimizer=0.1",
        "must be None or an optax.GradientTransformation (e.g. optax.sgd(0.1))",
    ),
    (
        "server-opt-uncalled",
        _build(server_optimizer=optax.sgd),
        ValueError,
        "fedmeta-maml: server_optimizer=<function sgd",
        "must be None or an optax.Gradient",
    ),
    (
        "config-dict",
        _build(config={"clients_per_round": 3}),
        ValueError,
        "fedmeta-maml: config={'clients_per_round': 3}",
        "must be a fmljax.RoundConfig",
    ),
    ("name-empty", _build(""), ValueError, "algorithm=''", "is not one of ('fedavg', "),
    (
        "name-typo",
        _build("fedmeta-mam"),
        ValueError,
        "algorithm='fedmeta-mam'",
        "; did you mean 'fedmeta-maml'?",
    ),
    ("name-none", _build(None), ValueError, "algorithm=None", "is not one of ('fedavg', "),
    (
        "fine-tune-str",
        _build("fedavg", fine_tune="yes"),
        ValueError,
        "fedavg: fine_tune='yes'",
        "must be True or False",
    ),
    (
        "loss-none",
        lambda: fmljax.build("fedavg", None, SAMPLER, _cfg()),
        ValueError,
        "fedavg: loss_fn=None",
        "must be callable",
    ),
    ("mg-lr-neg", _meta(inner_lr=-0.01), ValueError, "meta_gradient: inner_lr=-0.01", FINITE),
    ("mg-lr-nan", _meta(inner_lr=NAN), ValueError, "meta_gradient: inner_lr=nan", FINITE),
    ("mg-lr-inf", _meta(inner_lr=INF), ValueError, "meta_gradient: inner_lr=inf", FINITE),
    (
        "mg-lr-np-zero",
        _meta(inner_lr=np.float32(0)),
        ValueError,
        "meta_gradient: inner_lr=",
        FINITE,
    ),
    ("mg-lr-bool", _meta(inner_lr=True), ValueError, "meta_gradient: inner_lr=True", FINITE),
    (
        "mg-lr-none",
        _meta(inner_lr=None),
        ValueError,
        "meta_gradient: inner_lr=None",
        FINITE + " or a PyTree of per-parameter rates",
    ),
    (
        "mg-lr-str",
        _meta(inner_lr="abc"),
        ValueError,
        "meta_gradient: inner_lr='abc'",
        FINITE + " or a PyTree of per-parameter rates",
    ),
    (
        "mg-lr-metasgd-neg",
        _meta(inner_lr=-1.0, method="meta-sgd"),
        ValueError,
        "meta_gradient: inner_lr=-1.0",
        FINITE,
    ),
    (
        "mg-steps-neg",
        _meta(inner_steps=-1),
        ValueError,
        "meta_gradient: inner_steps=-1",
        "must be a Python int >= 0",
    ),
    (
        "mg-steps-float",
        _meta(inner_steps=1.5),
        ValueError,
        "meta_gradient: inner_steps=1.5",
        "must be a Python int >= 0",
    ),
    (
        "mg-method",
        _meta(method="sgd"),
        ValueError,
        "meta_gradient: method='sgd'",
        "is not one of ('maml', ",
    ),
    (
        "mg-fd-nan",
        _meta(method="hf-fd", fd_delta=NAN),
        ValueError,
        "meta_gradient: fd_delta=nan",
        "must be > 0 and finite",
    ),
    (
        "mg-fd-str",
        _meta(method="hf-fd", fd_delta="x"),
        ValueError,
        "meta_gradient: fd_delta='x'",
        "must be > 0 and finite",
    ),
    ("adapt-lr-zero", _adapt(inner_lr=0.0), ValueError, "adapt: inner_lr=0.0", FINITE),
    ("adapt-lr-nan", _adapt(inner_lr=NAN), ValueError, "adapt: inner_lr=nan", FINITE),
    (
        "adapt-steps",
        _adapt(inner_steps=-2),
        ValueError,
        "adapt: inner_steps=-2",
        "must be a Python int >= 0",
    ),
]


@pytest.mark.parametrize(
    "call, exc, field, allowed", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_named_before_anything_compiles(call, exc, field, allowed):
    with count_compiles() as compiles:
        with pytest.raises(exc) as err:
            call()
    message = str(err.value)
    assert field in message, message
    assert allowed in message, message
    assert compiles == [], f"compiled {len(compiles)} program(s) before refusing"


def test_the_cases_are_distinct_and_enough():
    assert len({c[0] for c in CASES}) == len(CASES) >= 25


def test_the_compile_counter_sees_a_compilation():
    x = jnp.arange(3.0)
    with count_compiles() as compiles:
        jax.jit(lambda v: v * 1.2345 + 0.5)(x).block_until_ready()
    assert len(compiles) >= 1


def test_runner_prefix_rewrite_keeps_the_field():
    """The runner rewrites 'RoundConfig.' to 'config.': the prefix must be exactly that."""
    with pytest.raises(ValueError) as err:
        RoundConfig(local_lr=INF).validate()
    assert str(err.value).startswith("RoundConfig.local_lr=inf is invalid: ")


# ---- good input of the same kinds is accepted -------------------------------------------------


def test_numpy_scalars_are_accepted_and_normalised(x64):
    np_cfg = RoundConfig(
        clients_per_round=np.int64(2),
        tasks_per_client=np.int32(1),
        local_steps=np.int64(2),
        local_lr=np.float64(0.05),
        inner_lr=np.float64(0.03),
        inner_steps=np.int64(1),
        eval_inner_steps=np.int64(1),
        eval_more_steps=(np.int64(2),),
        eval_tasks_per_client=np.int16(1),
        client_map="chunked",
        client_chunk=np.int64(2),
        remat=np.bool_(False),
        fd_delta=np.float32(1e-3),
        dropout_prob=np.float64(0.0),
    )
    np_cfg.validate("fedmeta-maml")
    alg = fmljax.build("fedmeta-maml", LOSS, SAMPLER, np_cfg)
    assert type(alg.config.clients_per_round) is int and type(alg.config.local_lr) is float
    py_cfg = RoundConfig(
        clients_per_round=2,
        tasks_per_client=1,
        local_steps=2,
        local_lr=0.05,
        inner_lr=0.03,
        inner_steps=1,
        eval_inner_steps=1,
        eval_more_steps=(2,),
        client_map="chunked",
        client_chunk=2,
        fd_delta=float(np.float32(1e-3)),
    )
    ref = fmljax.build("fedmeta-maml", LOSS, SAMPLER, py_cfg)
    data = fmljax.data.sample_sinusoid_clients(jax.random.key(3), 4)
    key = jax.random.key(4)
    # float32 parameters stay float32 under x64: NumPy float64 rates must not promote them.
    new, _ = alg.update(alg.init(PARAMS), key, data)
    want, _ = ref.update(ref.init(PARAMS), key, data)
    assert jax.tree.leaves(new.params)[0].dtype == jnp.float32
    # The NumPy scalars are normalised to Python ones: the same program, so the same bits.
    np.testing.assert_array_equal(flat(new.params), flat(want.params))


@pytest.mark.parametrize(
    "kw",
    [
        dict(dropout_prob=0.99),
        dict(straggler_prob=1.0),
        dict(straggler_prob=0),
        dict(eval_more_steps=[2, 3]),
        dict(local_lr=1, inner_lr=np.int64(1)),
        dict(task_map="chunked", task_chunk=1, remat=True),
    ],
)
def test_edge_values_inside_the_range_are_accepted(kw):
    fmljax.build("fedmeta-maml", LOSS, SAMPLER, _cfg(**kw))


def test_optimizers_and_wrappers_are_accepted():
    fmljax.build("fedmeta-maml", LOSS, SAMPLER, _cfg(), server_optimizer=optax.adam(0.1))
    fmljax.build("fedmeta-maml", LOSS, SAMPLER, _cfg(), server_optimizer=None)
    fmljax.fedreptile(LOSS, SAMPLER, _cfg(), server_lr=0.5)
    fmljax.fedavg(LOSS, SAMPLER, _cfg(), fine_tune=np.bool_(True))


def test_tracer_inner_lr_passes_under_jit():
    eager = meta_gradient(LOSS, PARAMS, SUPPORT, QUERY, inner_lr=0.1, inner_steps=2, method="maml")

    @jax.jit
    def jitted(lr):
        return meta_gradient(
            LOSS, PARAMS, SUPPORT, QUERY, inner_lr=lr, inner_steps=2, method="maml"
        )

    got = jitted(jnp.float32(0.1))
    assert rel_err(flat(got[1]), flat(eager[1])) < 1e-5
    # A traced rate is not checked (its value is unknown at trace time), even a negative one.
    assert np.isfinite(float(jitted(jnp.float32(-0.01))[0]))
    adapted = jax.jit(lambda lr: adapt(LOSS, PARAMS, SUPPORT, inner_lr=lr, inner_steps=1))(0.1)
    assert jax.tree.structure(adapted) == jax.tree.structure(PARAMS)


def test_numpy_rate_steps_and_rate_trees_are_accepted(x64):
    py = meta_gradient(LOSS, PARAMS, SUPPORT, QUERY, inner_lr=0.1, inner_steps=2, method="hf")
    npy = meta_gradient(
        LOSS, PARAMS, SUPPORT, QUERY, inner_lr=np.float64(0.1), inner_steps=np.int64(2), method="hf"
    )
    assert jax.tree.leaves(npy[1])[0].dtype == jnp.float32  # not promoted by the NumPy rate
    np.testing.assert_array_equal(flat(npy[1]), flat(py[1]))  # the same program: same bits
    rates = jax.tree.map(lambda p: jnp.full_like(p, 0.1), PARAMS)
    loss, (g_params, g_lr) = meta_gradient(
        LOSS, PARAMS, SUPPORT, QUERY, inner_lr=rates, inner_steps=1, method="meta-sgd"
    )
    assert math.isfinite(float(loss))
    meta_gradient(
        LOSS, PARAMS, SUPPORT, QUERY, inner_lr=jnp.asarray(0.1), inner_steps=0, method="fomaml"
    )
    meta_gradient(
        LOSS,
        PARAMS,
        SUPPORT,
        QUERY,
        inner_lr=1,
        inner_steps=1,
        method="hf-fd",
        fd_delta=np.float32(1e-3),
    )
