"""Every federated algorithm learns: personalised sinusoid MSE falls well below round 0's.

300 rounds of 5 clients x 2 tasks (K = Q = 10) on a 1-40-40-1 MLP, compiled as one
``scan_rounds`` call per algorithm. The personalised MSE is measured on 100 held-out clients
after adapting on each one's own support points (5 steps); it must fall below 80% of its value
at round 0 (measured here: ratios 0.61 to 0.75).
"""

from __future__ import annotations

import jax
import optax
import pytest

import fmljax
from fmljax.federated import RoundConfig

BASE = {
    "clients_per_round": 5,
    "tasks_per_client": 2,
    "inner_lr": 0.01,
    "inner_steps": 1,
    "eval_inner_steps": 5,
}
META = ({"local_lr": 1.0}, optax.adam(3e-3), {})
PER_FEDAVG = ({"local_steps": 2, "local_lr": 2e-3, "inner_lr": 5e-3}, optax.sgd(1.0), {})
SETUPS = {
    "fedavg": ({"local_steps": 5, "local_lr": 0.01}, optax.sgd(1.0), {"fine_tune": True}),
    "fedmeta-maml": META,
    "fedmeta-fomaml": META,
    "fedmeta-metasgd": ({"local_lr": 1.0}, optax.adam(1e-3), {}),
    "perfedavg-fo": PER_FEDAVG,
    "perfedavg-hf": PER_FEDAVG,
    "perfedavg-so": PER_FEDAVG,
    "fedreptile": ({"local_lr": 1.0, "inner_steps": 5}, optax.sgd(1.0), {}),
    "fedprox": (
        {"local_steps": 5, "local_lr": 0.01},
        optax.sgd(1.0),
        {"fine_tune": True, "mu": 0.01},
    ),
}


@pytest.mark.parametrize("name", list(SETUPS))
def test_every_algorithm_learns_on_sinusoids(name):
    assert set(SETUPS) == set(fmljax.ALGORITHMS)
    fields, server_opt, kw = SETUPS[name]
    model = fmljax.mlp((1, 40, 40, 1))
    train = fmljax.data.sample_sinusoid_clients(jax.random.key(1), 200)
    test = fmljax.data.sample_sinusoid_clients(jax.random.key(2), 100)
    alg = fmljax.build(
        name,
        fmljax.mse_loss(model.apply),
        fmljax.data.sinusoid_task_sampler(10, 10),
        RoundConfig(**(BASE | fields)),
        server_optimizer=server_opt,
        metrics_fn=fmljax.regression_metrics(model.apply),
        **kw,
    )
    state = alg.init(model.init(jax.random.key(0)))
    evaluate = jax.jit(alg.evaluate)
    before = float(evaluate(state, jax.random.key(5), test)["mse"].mean())
    state, metrics = jax.jit(fmljax.scan_rounds(alg.update, 300))(state, jax.random.key(3), train)
    after = float(evaluate(state, jax.random.key(5), test)["mse"].mean())
    assert int(state.round) == 300 and metrics["loss"].shape == (300,)
    assert after < 0.8 * before, (name, before, after)
