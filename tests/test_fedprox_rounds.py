"""FedProx and composable rounds: mu = 0 is FedAvg, a Python-loop FedProx round from the key
contract, it learns, one compile per configuration, bad mu, register_algorithm."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import flat, rel_err

import fmljax
from fmljax.federated import RoundConfig, merge_batches

NUM_CLIENTS = 5


def _setup(dtype=jnp.float64):
    model = fmljax.mlp((1, 8, 8, 1), dtype=dtype)
    loss = fmljax.mse_loss(model.apply)
    params = model.init(jax.random.key(0))
    data = fmljax.data.sample_sinusoid_clients(jax.random.key(1), NUM_CLIENTS, dtype)
    data["num_examples"] = jnp.arange(1, NUM_CLIENTS + 1, dtype=dtype)
    return model, loss, params, data, fmljax.data.sinusoid_task_sampler(4, 6)


CFG = RoundConfig(clients_per_round=3, tasks_per_client=2, local_steps=3, local_lr=0.05)


def test_mu_zero_is_fedavg_bit_exact(x64):
    _, loss, params, data, sampler = _setup()
    key = jax.random.key(7)
    out = []
    for name, kw in (("fedavg", {}), ("fedprox", {"mu": 0.0}), ("fedprox", {})):
        alg = fmljax.build(name, loss, sampler, CFG, **kw)
        out.append(jax.jit(alg.update)(alg.init(params), key, data))
    for state, metrics in out[1:]:
        np.testing.assert_array_equal(flat(state.params), flat(out[0][0].params))
        np.testing.assert_array_equal(metrics["loss"], out[0][1]["loss"])


def reference_fedprox_round(cfg, mu, loss, sampler, params, key, data):
    """FedProx's round as Python loops from the documented key contract (server sgd(1))."""
    k_sample, k_clients = jax.random.split(key)
    chosen = np.asarray(jax.random.choice(k_sample, NUM_CLIENTS, (cfg.clients_per_round,), False))
    client_keys = jax.random.split(k_clients, cfg.clients_per_round)
    deltas, losses, weights = [], [], []
    for i, c in enumerate(chosen):
        client = jax.tree.map(lambda x: x[c], data)
        tkeys = jax.random.split(jax.random.fold_in(client_keys[i], 0), cfg.tasks_per_client)
        batches = [merge_batches(*sampler(k, client)) for k in tkeys]
        p, step_losses = params, []
        for _ in range(cfg.local_steps):
            data_loss = lambda q: sum(loss(q, b) for b in batches) / len(batches)
            prox = lambda q: (
                0.5
                * mu
                * sum(
                    jnp.sum((a - b) ** 2)
                    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(params), strict=True)
                )
            )
            g = jax.grad(lambda q: data_loss(q) + prox(q))(p)
            step_losses.append(data_loss(p))
            p = jax.tree.map(lambda a, b: a - cfg.local_lr * b, p, g)
        deltas.append(jax.tree.map(jnp.subtract, params, p))
        losses.append(sum(step_losses) / len(step_losses))
        weights.append(float(data["num_examples"][c]))
    w = np.asarray(weights) / sum(weights)
    delta = jax.tree.map(lambda *d: sum(wi * di for wi, di in zip(w, d, strict=True)), *deltas)
    return jax.tree.map(jnp.subtract, params, delta), float(np.dot(w, losses))


@pytest.mark.parametrize("mu", [0.5, 3.0])
def test_fedprox_round_equals_python_loop(x64, mu):
    _, loss, params, data, sampler = _setup()
    key = jax.random.key(11)
    alg = fmljax.build("fedprox", loss, sampler, CFG, mu=mu)
    state, metrics = jax.jit(alg.update)(alg.init(params), key, data)
    ref_params, ref_loss = reference_fedprox_round(CFG, mu, loss, sampler, params, key, data)
    assert rel_err(flat(state.params), flat(ref_params)) < 1e-10
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-10)
    # the proximal term changed the round: it is not FedAvg's
    avg = fmljax.build("fedavg", loss, sampler, CFG)
    avg_state, _ = jax.jit(avg.update)(avg.init(params), key, data)
    assert rel_err(flat(state.params), flat(avg_state.params)) > 1e-6


def test_fedprox_learns_and_compiles_once():
    model, loss, params, data, sampler = _setup(jnp.float32)
    train = fmljax.data.sample_sinusoid_clients(jax.random.key(4), 20)
    cfg = RoundConfig(clients_per_round=5, tasks_per_client=2, local_steps=5, local_lr=0.02)
    alg = fmljax.build("fedprox", loss, sampler, cfg, mu=0.01)
    traces = []

    def counted(state, key, data):
        traces.append(1)
        return alg.update(state, key, data)

    update = jax.jit(chex.assert_max_traces(counted, n=1))
    state = alg.init(params)
    first = None
    for r in range(60):
        state, metrics = update(state, jax.random.fold_in(jax.random.key(5), r), train)
        first = float(metrics["loss"]) if first is None else first
    last = float(metrics["loss"])
    assert len(traces) == 1 and int(state.round) == 60
    assert last < 0.7 * first, (first, last)


@pytest.mark.parametrize("mu", [-0.1, float("inf"), float("nan"), "0.1", None, True])
def test_bad_mu_is_named_before_compiling(mu):
    _, loss, _, _, sampler = _setup(jnp.float32)
    with pytest.raises(
        ValueError, match=r"fedprox: mu=.* is invalid: must be a finite number >= 0"
    ):
        fmljax.build("fedprox", loss, sampler, CFG, mu=mu)


def test_unknown_hyperparameter_is_named():
    _, loss, _, _, sampler = _setup(jnp.float32)
    with pytest.raises(ValueError, match=r"fedprox: m=0.1 is not an option.*did you mean 'mu'"):
        fmljax.build("fedprox", loss, sampler, CFG, m=0.1)
    with pytest.raises(ValueError, match=r"fedavg: mu=0.1 is not an option"):
        fmljax.build("fedavg", loss, sampler, CFG, mu=0.1)


def test_register_algorithm_runs_like_a_builtin(x64):
    """A user's algorithm (FedAvg with a scaled client update) through build and scan_rounds."""
    _, loss, params, data, sampler = _setup()
    from fmljax.algorithms import fedavg

    def scaled_fedavg(loss_fn, sample_task, config, *, scale=1.0):
        inner = fedavg.local_sgd_client(loss_fn, sample_task, config)

        def client_update(server_params, client, key, steps):
            delta, metrics = inner(server_params, client, key, steps)
            return jax.tree.map(lambda d: scale * d, delta), {
                **metrics,
                "scale": scale + 0 * metrics["loss"],
            }

        return fmljax.rounds.AlgorithmSpec(
            client_update, fedavg.personalization(loss_fn, config, False)
        )

    fmljax.register_algorithm("scaled-fedavg", scaled_fedavg)
    try:
        assert "scaled-fedavg" in fmljax.ALGORITHMS
        with pytest.raises(ValueError, match="already registered"):
            fmljax.register_algorithm("scaled-fedavg", scaled_fedavg)
        with pytest.raises(ValueError, match="built-in"):
            fmljax.register_algorithm("fedavg", scaled_fedavg, overwrite=True)
        key = jax.random.key(3)
        ref = fmljax.build("fedavg", loss, sampler, CFG)
        alg = fmljax.build("scaled-fedavg", loss, sampler, CFG, scale=1.0)
        s0, m0 = jax.jit(ref.update)(ref.init(params), key, data)
        s1, m1 = jax.jit(alg.update)(alg.init(params), key, data)
        np.testing.assert_array_equal(flat(s1.params), flat(s0.params))
        assert m1["client_scale"].shape == (CFG.clients_per_round,)
        half = fmljax.build("scaled-fedavg", loss, sampler, CFG, scale=0.5)
        s2, _ = jax.jit(half.update)(half.init(params), key, data)
        d0 = flat(s0.params) - flat(params)
        d2 = flat(s2.params) - flat(params)
        assert rel_err(d2, 0.5 * d0) < 1e-12
        state, metrics = jax.jit(fmljax.scan_rounds(alg.update, 3))(alg.init(params), key, data)
        assert int(state.round) == 3 and metrics["loss"].shape == (3,)
        from fmljax import train  # the runner's name check reads the same registry

        assert "scaled-fedavg" in train.ALGORITHMS
    finally:
        del fmljax.ALGORITHMS["scaled-fedavg"]


def test_registry_is_a_mapping_of_names_with_fedprox():
    assert "fedprox" in fmljax.ALGORITHMS and len(fmljax.ALGORITHMS) == 9
    family, method = fmljax.ALGORITHMS["fedprox"]
    assert (family, method) == ("fedavg", None)
    assert fmljax.ALGORITHMS["perfedavg-hf"] == ("meta", "hf-fd")


def test_fedprox_runs_through_train_with_algorithm_options(tmp_path):
    from helpers import tiny_sinusoid_config

    from fmljax import train

    config = tiny_sinusoid_config(
        algorithm="fedprox", eval_inner_steps=0, server_optimizer="sgd", server_lr=1.0
    )
    config.algorithm_options = {"mu": 0.01}
    train.validate_config(config)
    summary = train.train_and_evaluate(config, str(tmp_path))
    assert summary is not None
    bad = tiny_sinusoid_config(algorithm="fedprox", eval_inner_steps=0)
    bad.algorithm_options = {"mu": -1.0}
    with pytest.raises(ValueError, match="mu=-1.0 is invalid"):
        train.train_and_evaluate(bad, str(tmp_path / "bad"))
