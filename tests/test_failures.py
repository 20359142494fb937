"""Failures inside a round: non-finite clients, dropout, stragglers, and the loop's reaction."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from helpers import flat, rel_err, tiny_sinusoid_config

import fmljax
from fmljax import train
from fmljax.federated import RoundConfig

NUM_CLIENTS = 6


def _setup(nan_client: int | None = None):
    model = fmljax.mlp((1, 4, 1), activation=jnp.tanh, dtype=jnp.float64)
    loss = fmljax.mse_loss(model.apply)
    params = model.init(jax.random.key(0))
    data = fmljax.data.sample_sinusoid_clients(jax.random.key(1), NUM_CLIENTS, jnp.float64)
    data["num_examples"] = jnp.arange(1, NUM_CLIENTS + 1, dtype=jnp.float64)
    if nan_client is not None:
        data["amplitude"] = data["amplitude"].at[nan_client].set(jnp.nan)
    return loss, params, data, fmljax.data.sinusoid_task_sampler(3, 3)


def _cfg(**kw) -> RoundConfig:
    base = dict(clients_per_round=3, tasks_per_client=1, local_steps=3, local_lr=0.05)
    return RoundConfig(**(base | kw))


def _chosen(key, m=3, n=NUM_CLIENTS):
    """The clients a round with ``key`` samples (the documented key contract)."""
    k_sample, _ = jax.random.split(key)
    return np.asarray(jax.random.choice(k_sample, n, (m,), replace=False))


def test_non_finite_client_rejects_the_round(x64):
    key = jax.random.key(2)
    bad = int(_chosen(key)[1])
    loss, params, data, sampler = _setup(nan_client=bad)
    alg = fmljax.build("fedmeta-fomaml", loss, sampler, _cfg())
    state = alg.init(params)
    new, m = jax.jit(alg.update)(state, key, data)
    assert not bool(m["finite"])
    np.testing.assert_array_equal(flat(new.params), flat(state.params))  # bitwise unchanged
    assert int(new.round) == 0
    ids, fin = np.asarray(m["client_id"]), np.asarray(m["client_finite"])
    assert ids[~fin].tolist() == [bad]
    # A round that does not sample the bad client is accepted.
    other = next(k for k in range(50) if bad not in _chosen(jax.random.key(k)))
    ok, m = jax.jit(alg.update)(state, jax.random.key(other), data)
    assert bool(m["finite"]) and int(ok.round) == 1
    assert np.isfinite(flat(ok.params)).all()


def test_dropout_averages_only_finished_clients(x64):
    loss, params, data, sampler = _setup()

    def finished(key):  # the documented key contract of the dropout draw
        k_drop = jax.random.split(jax.random.fold_in(key, 2), 3)[0]
        return ~np.asarray(jax.random.bernoulli(k_drop, 0.5, (3,)))

    key = next(k for k in map(jax.random.key, range(20)) if 0 < finished(k).sum() < 3)
    alg = fmljax.build("fedmeta-fomaml", loss, sampler, _cfg(dropout_prob=0.5))
    new, m = jax.jit(alg.update)(alg.init(params), key, data)
    active = np.asarray(m["client_active"])
    np.testing.assert_array_equal(active, finished(key))  # some clients dropped, not all
    assert int(m["clients_finished"]) == active.sum()
    # The same round without dropout, with the dropped clients' weights set to zero.
    ids = np.asarray(m["client_id"])
    weights = np.asarray(data["num_examples"]).copy()
    weights[ids[~active]] = 0.0
    zeroed = {**data, "num_examples": jnp.asarray(weights)}
    plain = fmljax.build("fedmeta-fomaml", loss, sampler, _cfg())
    ref, ref_m = jax.jit(plain.update)(plain.init(params), key, zeroed)
    assert rel_err(flat(new.params), flat(ref.params)) < 1e-12
    np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-12)


def test_round_where_every_client_dropped_leaves_the_state(x64):
    loss, params, data, sampler = _setup()
    alg = fmljax.build(
        "fedavg", loss, sampler, _cfg(dropout_prob=0.99), server_optimizer=optax.adam(0.1)
    )
    state = alg.init(params)
    new, m = jax.jit(fmljax.scan_rounds(alg.update, 2))(state, jax.random.key(0), data)
    np.testing.assert_array_equal(flat(new.params), flat(state.params))
    np.testing.assert_array_equal(flat(new.opt_state), flat(state.opt_state))
    assert int(new.round) == 2  # the rounds took place; nobody reported
    assert np.asarray(m["clients_finished"]).tolist() == [0, 0]
    assert np.asarray(m["finite"]).all() and np.isnan(np.asarray(m["loss"])).all()


@pytest.mark.parametrize("name", ["fedmeta-fomaml", "fedavg"])
def test_straggler_equals_a_client_with_fewer_local_steps(x64, name):
    """A straggler's masked steps: the same update as a client configured with fewer steps."""
    loss, params, data, sampler = _setup()
    cfg = _cfg(clients_per_round=1, local_steps=3, straggler_prob=1.0)
    alg = fmljax.build(name, loss, sampler, cfg)
    key = jax.random.key(1)
    new, m = jax.jit(alg.update)(alg.init(params), key, data)
    steps = int(m["client_steps"][0])
    assert 1 <= steps < 3
    short = fmljax.build(
        name, loss, sampler, dataclasses.replace(cfg, local_steps=steps, straggler_prob=0.0)
    )
    ref, ref_m = jax.jit(short.update)(short.init(params), key, data)
    assert rel_err(flat(new.params), flat(ref.params)) < 1e-12
    np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-12)


# ---- the training loop -------------------------------------------------------------------------


@train.register_task("test-sinusoid-nan", fields=("nan_client",))
def _nan_task(config: ml_collections.ConfigDict) -> train.TaskSetup:
    """The sinusoid task with the amplitude of client ``config.nan_client`` set to NaN."""
    setup = train.TASKS["sinusoid"](config)
    data = dict(setup.train_data)
    data["amplitude"] = data["amplitude"].at[config.nan_client].set(jnp.nan)
    return dataclasses.replace(setup, train_data=data)


def _loop_config(**kw) -> ml_collections.ConfigDict:
    c = tiny_sinusoid_config(
        task="test-sinusoid-nan",
        algorithm="fedmeta-fomaml",
        server_optimizer="sgd",
        server_lr=1.0,
        num_rounds=12,
        eval_every=12,
        keep_checkpoints=3,
        nan_client=0,
    )
    c.update(kw)
    return c


def _first_round_sampling(config, client: int, num_rounds: int = 12) -> int | None:
    """The first 1-based round whose sampled clients include ``client`` (the loop's keys)."""
    _, k_rounds, _ = jax.random.split(jax.random.key(config.seed), 3)
    for r in range(num_rounds):
        chosen = _chosen(
            jax.random.fold_in(k_rounds, r), config.clients_per_round, config.num_clients
        )
        if client in chosen:
            return r + 1
    return None


def _pick_bad_client(config, lo: int, hi: int) -> tuple[int, int]:
    for c in range(config.num_clients):
        r = _first_round_sampling(config, c)
        if r is not None and lo <= r <= hi:
            return c, r
    raise AssertionError("no client first sampled in that window")


def test_loop_stops_on_nan_and_keeps_the_last_good_checkpoint(tmp_path):
    config = _loop_config()
    bad, failing = _pick_bad_client(config, 3, 6)
    config.nan_client = bad
    workdir = str(tmp_path / "run")
    with pytest.raises(train.NonFiniteRoundError) as info:
        train.train_and_evaluate(config, workdir)
    err = info.value
    assert err.round == failing and err.clients == [bad]
    assert f"round {failing}: non-finite loss or gradient on client {bad}" in str(err)
    good = (failing - 1) // 2 * 2  # the last checkpoint before the failing round
    assert f"the last good checkpoint (round {good})" in str(err)
    assert int(err.state.round) == failing - 1 and np.isfinite(flat(err.state.params)).all()
    ckpt = train.load_checkpoint(workdir)
    assert ckpt["step"] == good
    assert np.isfinite(flat(ckpt["state"]["server"]["params"])).all()
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rounds = [json.loads(line)["round"] for line in f]
    assert max(rounds) == failing - 1  # every accepted round is logged, the failed one not

    # The debug switch runs the rounds without jit and stops at the same round and client.
    with pytest.raises(train.NonFiniteRoundError) as info:
        train.train_and_evaluate(
            _loop_config(nan_client=bad, debug_nojit=True), str(tmp_path / "debug")
        )
    assert (info.value.round, info.value.clients) == (failing, [bad])
