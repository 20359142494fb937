"""Sharded rounds on 8 virtual CPU devices; run by test_sharding.py in a subprocess.

Not collected by a plain ``pytest tests/`` (the name does not start with ``test_``): the
device count must be set before jax is imported, which only a fresh process can do::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 pytest tests/sharded_checks.py
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import flat, rel_err
from jax.sharding import PartitionSpec as P

import fmljax
from fmljax import sharding
from fmljax.federated import RoundConfig

NUM_CLIENTS = 7


def _setup():
    model = fmljax.mlp((1, 4, 4, 1), activation=jnp.tanh, dtype=jnp.float64)
    loss = fmljax.mse_loss(model.apply)
    params = model.init(jax.random.key(0))
    data = fmljax.data.sample_sinusoid_clients(jax.random.key(1), NUM_CLIENTS, jnp.float64)
    data["num_examples"] = jnp.arange(1, NUM_CLIENTS + 1, dtype=jnp.float64)
    return loss, params, data, fmljax.data.sinusoid_task_sampler(3, 3)


# (algorithm, devices on the client axis, clients per round, local steps, server optimiser,
#  rounds per call): 3 clients on 8 devices and 6 on 4 are padded with masked clients.
CASES = [
    ("fedmeta-maml", 8, 3, 1, "adam", 2),
    ("perfedavg-so", 4, 6, 2, "sgd", 1),
]


@pytest.mark.parametrize("name, devices, m, steps, opt, rounds", CASES)
def test_sharded_round_equals_single_device(name, devices, m, steps, opt, rounds):
    assert jax.device_count() == 8
    with jax.enable_x64(True):
        loss, params, data, sampler = _setup()
        cfg = RoundConfig(
            clients_per_round=m,
            tasks_per_client=1,
            local_steps=steps,
            local_lr=0.05,
            inner_lr=0.03,
            inner_steps=1,
        )
        server = optax.adam(0.01) if opt == "adam" else optax.sgd(1.0)
        key = jax.random.key(11)
        single = fmljax.build(name, loss, sampler, cfg, server_optimizer=server)
        ref_state, ref_metrics = jax.jit(fmljax.scan_rounds(single.update, rounds))(
            single.init(params), key, data
        )

        mesh = sharding.client_mesh(devices=jax.devices()[:devices])
        alg = fmljax.build(
            name,
            loss,
            sampler,
            cfg,
            server_optimizer=server,
            client_sharding=sharding.client_sharding(mesh),
        )
        step = sharding.jit_round(fmljax.scan_rounds(alg.update, rounds), mesh)
        args = (
            sharding.replicate(alg.init(params), mesh),
            sharding.replicate(key, mesh),
            sharding.replicate(data, mesh),
        )
        compiled = step.lower(*args).compile()
        state, metrics = compiled(*args)

        # Values: the same round, float64.
        assert rel_err(flat(state.params), flat(ref_state.params)) < 1e-10
        if jax.tree.leaves(ref_state.opt_state):
            assert rel_err(flat(state.opt_state), flat(ref_state.opt_state)) < 1e-10
        np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-10)
        assert int(state.round) == rounds
        assert rel_err(flat(state.params), flat(params)) > 1e-6  # the rounds moved the model

        # Padding: every sampled client is there (none dropped), the pads are masked.
        m_pad = -(-m // devices) * devices
        ids = np.asarray(metrics["client_id"])
        assert ids.shape == (rounds, m_pad)
        np.testing.assert_array_equal(ids[:, :m], ref_metrics["client_id"])
        assert (ids[:, m:] == -1).all()
        assert not np.asarray(metrics["client_active"])[:, m:].any()
        assert np.asarray(metrics["client_active"])[:, :m].all()

        # Partitioning: the server state is replicated on every device, the per-client
        # outputs come out split over the client axis (the partitioner chose it), one block
        # of m_pad / devices clients per device, and the program has the all-reduce.
        for leaf in jax.tree.leaves(state):
            assert leaf.sharding.is_fully_replicated
            assert len(leaf.sharding.device_set) == devices
        for k in ("client_loss", "client_finite", "client_id"):
            out = metrics[k]
            assert out.sharding.spec == P(None, sharding.CLIENT_AXIS), (k, out.sharding)
            shards = out.addressable_shards
            assert len({s.device for s in shards}) == devices
            assert {s.data.shape for s in shards} == {(rounds, m_pad // devices)}
        out_specs = [s.spec for s in jax.tree.leaves(compiled.output_shardings[1])]
        assert P(None, sharding.CLIENT_AXIS) in out_specs
        assert "all-reduce" in compiled.as_text()


def test_dropout_and_stragglers_sharded_equal_single_device():
    with jax.enable_x64(True):
        loss, params, data, sampler = _setup()
        cfg = RoundConfig(
            clients_per_round=5,
            tasks_per_client=1,
            local_steps=3,
            local_lr=0.05,
            inner_lr=0.03,
            dropout_prob=0.4,
            straggler_prob=0.5,
        )
        key = jax.random.key(4)
        single = fmljax.build("fedmeta-fomaml", loss, sampler, cfg)
        ref, ref_m = jax.jit(fmljax.scan_rounds(single.update, 3))(single.init(params), key, data)
        mesh = sharding.client_mesh()
        alg = fmljax.build(
            "fedmeta-fomaml", loss, sampler, cfg, client_sharding=sharding.client_sharding(mesh)
        )
        step = sharding.jit_round(fmljax.scan_rounds(alg.update, 3), mesh)
        state, m = step(sharding.replicate(alg.init(params), mesh), key, data)
        assert rel_err(flat(state.params), flat(ref.params)) < 1e-10
        np.testing.assert_array_equal(m["client_active"][:, :5], ref_m["client_active"])
        np.testing.assert_array_equal(m["client_steps"][:, :5], ref_m["client_steps"])


def test_client_map_other_than_vmap_is_refused_when_sharded():
    model = fmljax.mlp((1, 4, 1))
    loss, sampler = fmljax.mse_loss(model.apply), fmljax.data.sinusoid_task_sampler(3, 3)
    mesh = sharding.client_mesh()
    with pytest.raises(ValueError, match="client_map='map' is invalid with clients sharded"):
        fmljax.build(
            "fedavg",
            loss,
            sampler,
            RoundConfig(client_map="map"),
            client_sharding=sharding.client_sharding(mesh),
        )
