"""The one-jit round against a plain Python loop, retracing, the Jiang et al. identity."""

from __future__ import annotations

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import flat, rel_err

import fmljax
from fmljax.federated import ALGORITHMS, RoundConfig, merge_batches
from fmljax.meta import meta_gradient

NUM_CLIENTS = 5
MODES = [("vmap", None), ("map", None), ("chunked", 2), ("unroll", None)]


def _setup(dtype=jnp.float64):
    model = fmljax.mlp((1, 8, 8, 1), dtype=dtype)
    loss = fmljax.mse_loss(model.apply)
    params = model.init(jax.random.key(0))
    data = fmljax.data.sample_sinusoid_clients(jax.random.key(1), NUM_CLIENTS, dtype)
    # Unequal client weights, so that the weighted average is exercised.
    data["num_examples"] = jnp.arange(1, NUM_CLIENTS + 1, dtype=dtype)
    sampler = fmljax.data.sinusoid_task_sampler(4, 6)
    return model, loss, params, data, sampler


def _config(**kw) -> RoundConfig:
    base = dict(
        clients_per_round=3,
        tasks_per_client=2,
        local_steps=2,
        local_lr=0.05,
        inner_lr=0.03,
        inner_steps=2,
    )
    return RoundConfig(**(base | kw))


def reference_round(name, cfg, loss, sampler, server_opt, meta_params, opt_state, key, data):
    """The same round written as plain Python loops over clients, local steps and tasks."""
    rule, method = ALGORITHMS[name]
    num_clients = jax.tree.leaves(data)[0].shape[0]
    k_sample, k_clients = jax.random.split(key)
    chosen = np.asarray(
        jax.random.choice(k_sample, num_clients, (cfg.clients_per_round,), replace=False)
    )
    client_keys = jax.random.split(k_clients, cfg.clients_per_round)
    mg = jax.jit(
        functools.partial(meta_gradient, loss, inner_steps=cfg.inner_steps, fd_delta=cfg.fd_delta),
        static_argnames="method",
    )
    deltas, losses, weights = [], [], []
    for i, c in enumerate(chosen):
        client = jax.tree.map(lambda x: x[c], data)
        p = meta_params
        step_losses = []
        if rule == "fedavg":
            tkeys = jax.random.split(jax.random.fold_in(client_keys[i], 0), cfg.tasks_per_client)
            batches = [merge_batches(*sampler(k, client)) for k in tkeys]
            for _ in range(cfg.local_steps):
                val, g = jax.value_and_grad(
                    lambda p: sum(loss(p, b) for b in batches) / len(batches)
                )(p)
                p = jax.tree.map(lambda a, b: a - cfg.local_lr * b, p, g)
                step_losses.append(val)
        else:
            for s in range(cfg.local_steps):
                tkeys = jax.random.split(
                    jax.random.fold_in(client_keys[i], s), cfg.tasks_per_client
                )
                gs, ls = [], []
                for tk in tkeys:
                    sup, qry = sampler(tk, client)
                    if rule == "reptile":
                        b = merge_batches(sup, qry)
                        ql, g = mg(p, b, b, inner_lr=cfg.inner_lr, method="reptile")
                    elif method == "meta-sgd":
                        ql, (gp, ga) = mg(
                            p["params"], sup, qry, inner_lr=p["inner_lr"], method="meta-sgd"
                        )
                        g = {"params": gp, "inner_lr": ga}
                    else:
                        hb = None
                        if method == "hf-fd":
                            hb = sampler(jax.random.fold_in(tk, 1), client)[0]
                        ql, g = mg(
                            p, sup, qry, inner_lr=cfg.inner_lr, method=method, hessian_batch=hb
                        )
                    gs.append(g)
                    ls.append(ql)
                g = jax.tree.map(lambda *a: sum(a) / len(a), *gs)
                p = jax.tree.map(lambda a, b: a - cfg.local_lr * b, p, g)
                step_losses.append(sum(ls) / len(ls))
        deltas.append(jax.tree.map(jnp.subtract, meta_params, p))
        losses.append(sum(step_losses) / len(step_losses))
        weights.append(float(data["num_examples"][c]))
    w = np.asarray(weights) / sum(weights)
    delta = jax.tree.map(lambda *d: sum(wi * di for wi, di in zip(w, d, strict=True)), *deltas)
    updates, opt_state = server_opt.update(delta, opt_state, meta_params)
    return optax.apply_updates(meta_params, updates), float(np.dot(w, losses))


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_round_equals_python_loop_for_every_mapping(x64, name):
    _, loss, params, data, sampler = _setup()
    server_opt = optax.adam(0.01) if name == "fedmeta-maml" else optax.sgd(1.0)
    key = jax.random.key(42)
    ref = None
    for client_map, chunk in MODES:
        task_map, task_chunk = (client_map, chunk)
        cfg = _config(
            client_map=client_map, client_chunk=chunk, task_map=task_map, task_chunk=task_chunk
        )
        alg = fmljax.build(name, loss, sampler, cfg, server_optimizer=server_opt)
        state = alg.init(params)
        if ref is None:
            ref = reference_round(
                name, cfg, loss, sampler, server_opt, state.params, state.opt_state, key, data
            )
        new_state, metrics = jax.jit(alg.update)(state, key, data)
        assert rel_err(flat(new_state.params), flat(ref[0])) < 1e-10, (client_map, task_map)
        np.testing.assert_allclose(metrics["loss"], ref[1], rtol=1e-10)
        assert int(new_state.round) == 1
        # The round moved the model.
        assert rel_err(flat(new_state.params), flat(state.params)) > 1e-6


def test_mixed_mappings_agree(x64):
    """Clients mapped one way and tasks another give the same round."""
    _, loss, params, data, sampler = _setup()
    key = jax.random.key(3)
    outs = []
    for cm, tm in [("vmap", "map"), ("map", "vmap"), ("chunked", "unroll")]:
        cfg = _config(client_map=cm, task_map=tm, client_chunk=2)
        alg = fmljax.build("perfedavg-so", loss, sampler, cfg)
        outs.append(flat(jax.jit(alg.update)(alg.init(params), key, data)[0].params))
    assert rel_err(outs[1], outs[0]) < 1e-10 and rel_err(outs[2], outs[0]) < 1e-10


@pytest.mark.parametrize("name", ["fedmeta-maml", "fedavg"])
def test_second_round_with_fresh_data_does_not_retrace(name):
    _, loss, params, _, sampler = _setup(jnp.float32)
    alg = fmljax.build(name, loss, sampler, _config())
    traces = []
    chex.clear_trace_counter()

    def counted(state, key, data):
        traces.append(1)
        return alg.update(state, key, data)

    update = jax.jit(chex.assert_max_traces(counted, n=1), donate_argnums=0)
    state = alg.init(params)
    for r in range(3):
        data = fmljax.data.sample_sinusoid_clients(jax.random.key(100 + r), NUM_CLIENTS)
        state, _ = update(state, jax.random.key(r), data)
    jax.block_until_ready(state)
    assert len(traces) == 1
    assert int(state.round) == 3


@pytest.mark.parametrize("local_steps", [1, 3])
def test_fedreptile_with_server_rate_one_equals_fedavg(x64, local_steps):
    """Jiang et al. (2019): FedAvg with k local steps == Reptile with server rate 1."""
    _, loss, params, data, sampler = _setup()
    k = 4
    cfg_avg = _config(clients_per_round=1, tasks_per_client=1, local_steps=k, local_lr=0.05)
    # Reptile: one local meta-step of k inner steps at the same rate; local_lr = 1 moves the
    # client to its adapted parameters, server rate 1 takes them.
    cfg_rep = _config(
        clients_per_round=1,
        tasks_per_client=1,
        local_steps=1,
        local_lr=1.0,
        inner_steps=k,
        inner_lr=0.05,
    )
    avg = fmljax.fedavg(loss, sampler, cfg_avg)
    rep = fmljax.fedreptile(loss, sampler, cfg_rep, server_lr=1.0)
    s_avg, s_rep = avg.init(params), rep.init(params)
    for r in range(local_steps):
        key = jax.random.key(r)
        s_avg, _ = jax.jit(avg.update)(s_avg, key, data)
        s_rep, _ = jax.jit(rep.update)(s_rep, key, data)
        assert rel_err(flat(s_rep.params), flat(s_avg.params)) < 1e-12
    # With a server rate below one the two differ (Reptile interpolates).
    half = fmljax.fedreptile(loss, sampler, cfg_rep, server_lr=0.5)
    s_half, _ = jax.jit(half.update)(half.init(params), jax.random.key(0), data)
    assert rel_err(flat(s_half.params), flat(s_avg.params)) > 1e-6


def test_scan_rounds_equals_a_loop_of_rounds(x64):
    _, loss, params, data, sampler = _setup()
    alg = fmljax.build("fedmeta-fomaml", loss, sampler, _config())
    key = jax.random.key(5)
    state = alg.init(params)
    for _ in range(3):
        state, _ = jax.jit(alg.update)(state, jax.random.fold_in(key, state.round), data)
    scanned, metrics = jax.jit(fmljax.scan_rounds(alg.update, 3))(alg.init(params), key, data)
    assert metrics["loss"].shape == (3,)
    assert rel_err(flat(scanned.params), flat(state.params)) < 1e-12


def test_personalized_evaluation_adapts_on_support_only(x64):
    """evaluate() scores the query set after adapting on the support set, never on the query."""
    model, loss, params, data, _ = _setup()

    def sampler(key, client):
        s, q = fmljax.data.sinusoid_task_sampler(4, 6)(key, client)
        return s, q

    alg = fmljax.build(
        "fedmeta-maml",
        loss,
        sampler,
        _config(eval_inner_steps=3),
        metrics_fn=fmljax.regression_metrics(model.apply),
    )
    state = alg.init(params)
    got = jax.jit(alg.evaluate)(state, jax.random.key(9), data)
    assert got["mse"].shape == (NUM_CLIENTS,)
    keys = jax.random.split(jax.random.key(9), NUM_CLIENTS)
    for c in range(NUM_CLIENTS):
        client = jax.tree.map(lambda x: x[c], data)
        tk = jax.random.split(keys[c], 1)[0]
        sup, qry = sampler(tk, client)
        p = params
        for _ in range(3):
            p = jax.tree.map(lambda a, g: a - 0.03 * g, p, jax.grad(loss)(p, sup))
        np.testing.assert_allclose(got["mse"][c], loss(p, qry), rtol=1e-10)
        np.testing.assert_allclose(got["mse_before"][c], loss(params, qry), rtol=1e-10)


def test_more_evaluation_steps_keep_metasgd_learned_rates(x64):
    """eval_more_steps continues the adaptation with the algorithm's rule: Meta-SGD's rates."""
    model, loss, params, data, sampler = _setup()
    alg = fmljax.build(
        "fedmeta-metasgd", loss, sampler, _config(eval_inner_steps=1, eval_more_steps=(4, 2))
    )
    state = alg.init(params)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    rates = jax.tree.unflatten(  # a different positive rate for every parameter
        treedef,
        [
            jax.random.uniform(k, x.shape, x.dtype, 0.0, 0.1)
            for k, x in zip(keys, leaves, strict=True)
        ],
    )
    state = state._replace(params={"params": params, "inner_lr": rates})
    got = jax.jit(alg.evaluate)(state, jax.random.key(9), data)
    assert {"loss", "loss_2steps", "loss_4steps", "loss_before"} <= set(got)
    ckeys = jax.random.split(jax.random.key(9), NUM_CLIENTS)
    for c in range(NUM_CLIENTS):
        client = jax.tree.map(lambda x: x[c], data)
        sup, qry = sampler(jax.random.split(ckeys[c], 1)[0], client)
        p, want = params, {}
        for step in range(1, 5):
            p = jax.tree.map(lambda a, r, g: a - r * g, p, rates, jax.grad(loss)(p, sup))
            want[step] = loss(p, qry)
        np.testing.assert_allclose(got["loss"][c], want[1], rtol=1e-10)
        np.testing.assert_allclose(got["loss_2steps"][c], want[2], rtol=1e-10)
        np.testing.assert_allclose(got["loss_4steps"][c], want[4], rtol=1e-10)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(eval_more_steps=(2,)), "eval_more_steps=(2,) is invalid: every count must be >"),
        (dict(eval_more_steps=(0,)), "eval_more_steps=(0,) is invalid: must be a tuple of"),
        (
            dict(clients_per_round=0),
            "RoundConfig.clients_per_round=0 is invalid: must be an int >= 1",
        ),
        (dict(local_lr=-1.0), "RoundConfig.local_lr=-1.0 is invalid: must be a finite number > 0"),
        (dict(inner_steps=0), "inner_steps=0 is invalid: must be an int >= 1"),
        (dict(task_map="pmap"), "task_map='pmap' is not one of"),
        (dict(client_map="chunked"), "client_map='chunked' needs a chunk size >= 1"),
    ],
)
def test_bad_config_is_named_before_compiling(kwargs, message):
    _, loss, _, _, sampler = _setup(jnp.float32)
    with pytest.raises(ValueError, match=re.escape(message)):
        fmljax.build("fedmeta-maml", loss, sampler, _config(**kwargs))


def test_unknown_algorithm_and_too_many_clients():
    _, loss, params, data, sampler = _setup(jnp.float32)
    with pytest.raises(ValueError, match="algorithm='scaffold' is not one of"):
        fmljax.build("scaffold", loss, sampler, _config())
    alg = fmljax.build("fedavg", loss, sampler, _config(clients_per_round=NUM_CLIENTS + 1))
    with pytest.raises(ValueError, match="clients_per_round=6 is invalid: must be <= the number"):
        alg.update(alg.init(params), jax.random.key(0), data)
