"""Padded clients inside the core's federated round (fmljax.federated): a round over clients
of unequal sizes (padded, masked) equals the same round run client by client on the unpadded
data, and padding values change no gradient and no metric.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmljax
from fmljax.data.digits import digits_federated
from fmljax.data.episodes import full_client_task
from fmljax.federated import RoundConfig, build


def whole_train_task(key, client):
    """Deterministic task: support = query = the client's whole (masked) train set."""
    del key
    return dict(client["train"]), dict(client["train"])


def unpadded(fed: dict, c: int) -> dict:
    """Client ``c`` alone (C = 1), cut to its real examples, with no mask at all."""
    out = {}
    for part in ("train", "test"):
        n = int(np.asarray(fed[part]["mask"][c]).sum())
        out[part] = {k: fed[part][k][c : c + 1, :n] for k in ("x", "y")}
    out["num_examples"] = fed["num_examples"][c : c + 1]
    return out


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


@pytest.fixture(scope="module")
def digits() -> dict:
    fed = digits_federated(3, partition="dirichlet", alpha=0.5, seed=1)
    sizes = np.asarray(fed["train"]["mask"]).sum(1)
    assert len(set(sizes.tolist())) == 3  # unequal clients
    return fed


@pytest.mark.parametrize("name", ["fedavg", "fedmeta-maml"])
def test_padded_round_equals_client_by_client(digits, name):
    model = fmljax.mlp((64, 16, 10))
    loss = fmljax.cross_entropy_loss(model.apply)
    cfg = RoundConfig(
        clients_per_round=3, tasks_per_client=1, local_steps=3, local_lr=0.3, inner_lr=0.2
    )
    alg = build(name, loss, whole_train_task, cfg)
    state = alg.init(model.init(jax.random.key(0)))
    update = jax.jit(alg.update)
    padded, _ = update(state, jax.random.key(1), digits)

    one = build(name, loss, whole_train_task, dataclasses.replace(cfg, clients_per_round=1))
    one_update = jax.jit(one.update)
    p0 = flat(state.params)
    weights = np.asarray(digits["num_examples"]) / np.asarray(digits["num_examples"]).sum()
    expected = p0.copy()
    for c in range(3):
        alone, _ = one_update(state, jax.random.key(1), unpadded(digits, c))
        expected -= weights[c] * (p0 - flat(alone.params))
    assert np.abs(flat(padded.params) - p0).max() > 1e-3  # the round did move
    np.testing.assert_allclose(flat(padded.params), expected, rtol=2e-5, atol=2e-6)

    # whatever the padding holds, the round is the same
    noisy = jax.tree.map(lambda a: a, digits)
    for part in ("train", "test"):
        pad = digits[part]["mask"] == 0
        noise = jax.random.normal(jax.random.key(2), digits[part]["x"].shape) * 100
        noisy[part] = {
            "x": jnp.where(pad[..., None, None, None], noise, digits[part]["x"]),
            "y": jnp.where(pad, 7, digits[part]["y"]),
            "mask": digits[part]["mask"],
        }
    again, _ = update(state, jax.random.key(1), noisy)
    np.testing.assert_allclose(flat(again.params), flat(padded.params), rtol=1e-6, atol=1e-7)


def test_padded_evaluation_equals_unpadded(digits):
    model = fmljax.mlp((64, 16, 10))
    loss = fmljax.cross_entropy_loss(model.apply)
    cfg = RoundConfig(clients_per_round=3, inner_lr=0.5, inner_steps=3)
    ev = build(
        "fedmeta-maml",
        loss,
        full_client_task,
        cfg,
        metrics_fn=fmljax.classification_metrics(model.apply),
    )
    state = ev.init(model.init(jax.random.key(0)))
    evaluate = jax.jit(ev.evaluate)
    padded = evaluate(state, jax.random.key(0), digits)
    for c in range(3):
        alone = evaluate(state, jax.random.key(0), unpadded(digits, c))
        for k in ("accuracy", "loss", "accuracy_before", "loss_before"):
            np.testing.assert_allclose(padded[k][c], alone[k][0], rtol=1e-5, atol=1e-6)
