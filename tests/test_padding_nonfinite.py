"""Padded rows never reach a loss: NaN / inf in padding change no value and no gradient.

(issue 12: ``masked_mean`` multiplied by the mask, so ``0 * nan`` poisoned the loss and the
round was rejected.) float64; the padded batch must give exactly what the unpadded one gives
up to summation order (rel. 1e-12).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import flat, rel_err

import fmljax


def _poisoned(batch, pad: int, value: float):
    """``batch`` plus ``pad`` padded rows whose x (and float y) are ``value``."""
    x = jnp.concatenate([batch["x"], jnp.full((pad, *batch["x"].shape[1:]), value)])
    y = batch["y"]
    fill = value if jnp.issubdtype(y.dtype, jnp.floating) else 10**6  # a label out of range
    y = jnp.concatenate([y, jnp.full((pad, *y.shape[1:]), fill, y.dtype)])
    mask = jnp.concatenate([jnp.ones(len(batch["x"])), jnp.zeros(pad)])
    return {"x": x, "y": y, "mask": mask}


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_regression_padding_is_never_used(x64, value):
    model = fmljax.mlp((1, 8, 1), dtype=jnp.float64)
    loss = fmljax.mse_loss(model.apply)
    params = model.init(jax.random.key(0))
    support, query = fmljax.data.sample_sinusoid_task(jax.random.key(1), 5, 5, jnp.float64)
    padded = _poisoned(support, 3, value)
    assert rel_err(loss(params, padded), loss(params, support)) < 1e-12
    assert (
        rel_err(flat(jax.grad(loss)(params, padded)), flat(jax.grad(loss)(params, support))) < 1e-12
    )
    kw = dict(inner_lr=0.1, inner_steps=2, method="maml")
    _, g = fmljax.meta_gradient(loss, params, padded, _poisoned(query, 2, value), **kw)
    _, want = fmljax.meta_gradient(loss, params, support, query, **kw)
    assert np.isfinite(flat(g)).all() and rel_err(flat(g), flat(want)) < 1e-12


def test_classification_padding_is_never_used_with_a_mask_aware_conv4(x64):
    model = fmljax.conv4(3, filters=4, dtype=jnp.float64)
    loss = fmljax.cross_entropy_loss(model.apply)
    metrics = fmljax.classification_metrics(model.apply)
    params = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (6, 8, 8, 1), jnp.float64)  # 4 strided blocks: 1x1
    batch = {"x": x, "y": jnp.arange(6) % 3}
    padded = _poisoned(batch, 2, np.nan)
    loss, grad, metrics = jax.jit(loss), jax.jit(jax.grad(loss)), jax.jit(metrics)
    assert rel_err(loss(params, padded), loss(params, batch)) < 1e-12
    assert rel_err(flat(grad(params, padded)), flat(grad(params, batch))) < 1e-12
    got, ref = metrics(params, padded), metrics(params, batch)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-12)


def test_prototypical_padding_is_never_used(x64):
    embed = lambda p, x: jnp.tanh(x @ p)
    params = jax.random.normal(jax.random.key(0), (4, 3), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (6, 4), jnp.float64)
    support, query = {"x": x, "y": jnp.arange(6) % 3}, {"x": x[::-1], "y": jnp.arange(6) % 3}
    f = lambda p, s, q: fmljax.prototypical_loss(embed, p, s, q, 3)
    ps, pq = _poisoned(support, 2, np.inf), _poisoned(query, 2, np.nan)
    assert rel_err(f(params, ps, pq), f(params, support, query)) < 1e-12
    assert rel_err(jax.grad(f)(params, ps, pq), jax.grad(f)(params, support, query)) < 1e-12


def test_a_round_on_clients_with_nan_padding_is_not_rejected():
    """federate pads unequal clients; NaN written into every padded row leaves the round
    finite and equal (to float32 round-off, 1e-6) to the round on zero padding."""
    rs = np.random.RandomState(0)
    x, y = rs.randn(60, 3).astype(np.float32), rs.randint(0, 2, 60)
    fed = fmljax.data.federate(x, y, np.split(np.arange(60), [10, 25]))  # 10, 15, 35
    model = fmljax.mlp((3, 4, 2))
    loss = fmljax.cross_entropy_loss(model.apply)
    sampler = lambda key, client: (client["train"], client["train"])  # padded rows included
    alg = fmljax.build("fedavg", loss, sampler, fmljax.RoundConfig(clients_per_round=3),
                       server_optimizer=optax.sgd(1.0))  # fmt: skip
    nan = dict(fed, train=dict(fed["train"]))
    pad = np.asarray(fed["train"]["mask"]) == 0
    assert pad.any()
    nan["train"]["x"] = jnp.where(pad[..., None], jnp.nan, fed["train"]["x"])
    state = alg.init(model.init(jax.random.key(0)))
    step = jax.jit(alg.update)
    got, m = step(state, jax.random.key(1), nan)
    want, _ = step(state, jax.random.key(1), fed)
    assert bool(m["finite"])
    assert rel_err(flat(got.params), flat(want.params)) < 1e-6
