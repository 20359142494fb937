"""Round details found by an independent re-implementation (issue 12): the key after a
rejected round, the aggregation weighting, float64 weights, Per-FedAvg-HF's D''."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import flat, rel_err

import fmljax
from fmljax.data.episodes import episode_task_sampler
from fmljax.federated import RoundConfig, client_weights

C = 6


def _setup(nan_client=None, num_examples=None):
    model = fmljax.mlp((1, 4, 1), activation=jnp.tanh, dtype=jnp.float64)
    loss = fmljax.mse_loss(model.apply)
    data = fmljax.data.sample_sinusoid_clients(jax.random.key(1), C, jnp.float64)
    data["num_examples"] = (
        jnp.arange(1, C + 1, dtype=jnp.float64) if num_examples is None else num_examples
    )
    if nan_client is not None:
        data["amplitude"] = data["amplitude"].at[nan_client].set(jnp.nan)
    return loss, model.init(jax.random.key(0)), data, fmljax.data.sinusoid_task_sampler(3, 3)


def _chosen(key, m=2):
    k_sample, _ = jax.random.split(key)
    return set(np.asarray(jax.random.choice(k_sample, C, (m,), replace=False)).tolist())


def test_a_rejected_round_ends_the_call_instead_of_repeating(x64):
    """Round 1 of a 4-round call is rejected: rounds 2 and 3 are skipped (before: each
    repeated the rejected round with its key), and the call returns the input state of the
    failing round, what a loop that stops at the failure returns (to 1e-12 in float64: a
    call of another length is another XLA program, which may order sums differently)."""
    key = jax.random.key(5)
    bad = next(c for c in range(C) if c in _chosen(jax.random.fold_in(key, 1))
               and c not in _chosen(jax.random.fold_in(key, 0)))  # fmt: skip
    loss, params, data, sampler = _setup(nan_client=bad)
    cfg = RoundConfig(clients_per_round=2, tasks_per_client=1, local_lr=0.05)
    alg = fmljax.build("fedmeta-fomaml", loss, sampler, cfg)
    state, m = jax.jit(fmljax.scan_rounds(alg.update, 4))(alg.init(params), key, data)
    assert np.asarray(m["finite"]).tolist() == [True, False, False, False]
    assert np.asarray(m["skipped"]).tolist() == [False, False, True, True]
    assert (
        np.isnan(np.asarray(m["loss"])[2:]).all() and (np.asarray(m["client_id"])[2:] == -1).all()
    )
    assert int(state.round) == 1
    one, _ = jax.jit(fmljax.scan_rounds(alg.update, 1))(alg.init(params), key, data)
    assert rel_err(flat(state.params), flat(one.params)) < 1e-12


def test_uniform_weighting_is_one_over_m(x64):
    """'uniform' ignores num_examples: it equals the default weighting on data whose clients
    all have the same count (1e-12: the same arithmetic up to summation order), and differs
    from the default on unequal counts."""
    loss, params, data, sampler = _setup()
    equal = dict(data, num_examples=jnp.ones((C,), jnp.float64))

    def round_(weighting, d):
        cfg = RoundConfig(
            clients_per_round=3, tasks_per_client=1, local_lr=0.05, weighting=weighting
        )
        alg = fmljax.build("fedavg", loss, sampler, cfg, server_optimizer=optax.sgd(1.0))
        return jax.jit(alg.update)(alg.init(params), jax.random.key(2), d)[0].params

    uniform = round_("uniform", data)
    assert rel_err(flat(uniform), flat(round_("num_examples", equal))) < 1e-12
    assert rel_err(flat(uniform), flat(round_("num_examples", data))) > 1e-6
    with pytest.raises(ValueError, match="RoundConfig.weighting='size' is invalid: must be one of"):
        RoundConfig(weighting="size").validate()


def test_float32_counts_are_normalised_in_float64(x64):
    data = {"num_examples": jnp.asarray([1, 2, 3], jnp.float32)}
    w = client_weights(data, 3)
    assert w.dtype == jnp.float64
    np.testing.assert_array_equal(np.asarray(w / w.sum()), np.array([1, 2, 3]) / 6.0)


def _labelled_images(classes=6, examples=8):
    """images[c, e] is filled with c * 100 + e: every pixel names its class and example."""
    v = np.arange(classes)[:, None] * 100 + np.arange(examples)[None, :]
    return jnp.asarray(np.broadcast_to(v[:, :, None, None], (classes, examples, 4, 4)), jnp.float32)


def test_hessian_batch_is_the_same_task_with_other_examples():
    images = _labelled_images()
    sampler = episode_task_sampler(ways=3, shots=2, queries=2)
    key, other = jax.random.key(0), jax.random.key(9)
    support, _ = sampler(key, {"images": images})
    d2, _ = sampler.same_task(key, other, {"images": images})
    cls = lambda b: (np.asarray(b["x"])[:, 0, 0, 0] // 100).astype(int)
    ex = lambda b: (np.asarray(b["x"])[:, 0, 0, 0] % 100).astype(int)
    label_to_class = lambda b: {
        int(y): int(c) for y, c in zip(np.asarray(b["y"]), cls(b), strict=True)
    }
    assert label_to_class(d2) == label_to_class(support)  # same classes, same labels
    assert ex(d2).tolist() != ex(support).tolist()  # other examples
    fresh, _ = sampler(other, {"images": images})
    assert label_to_class(fresh) != label_to_class(support)  # what D'' used to be


def test_perfedavg_hf_draws_its_hessian_batch_from_the_same_task():
    images = _labelled_images()
    sampler = episode_task_sampler(ways=3, shots=2, queries=2)
    calls = []
    original = sampler.same_task

    def spy(key, other, client):
        calls.append(1)
        return original(key, other, client)

    sampler.same_task = spy
    model = fmljax.mlp((16, 3))
    loss = fmljax.cross_entropy_loss(lambda p, x: model.apply(p, x.reshape(x.shape[0], -1)))
    data = {"images": images[None].repeat(2, 0), "num_examples": jnp.ones((2,))}
    cfg = RoundConfig(clients_per_round=2, tasks_per_client=1, local_lr=0.1, inner_lr=0.1)
    alg = fmljax.build("perfedavg-hf", loss, sampler, cfg)
    _, m = jax.jit(alg.update)(alg.init(model.init(jax.random.key(0))), jax.random.key(1), data)
    assert calls and bool(m["finite"])
