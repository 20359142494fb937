"""iMAML (implicit meta-gradient) and ANIL / BOIL (an inner loop on a subset of parameters).

float64 throughout: iMAML against its closed form on a quadratic task and against
differentiating an inner loop run to convergence; ANIL against finite differences and a
plain-loop re-implementation; both learn on a tiny sinusoid problem.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import flat, flat_grad_fd, rel_err

import fmljax
from fmljax.meta import adapt, head_mask, meta_gradient

# ---- iMAML ----------------------------------------------------------------------------------


def _quadratic(n: int = 4, seed: int = 0):
    """Support loss 0.5 x'Ax - b'x (A SPD, eigenvalues in [1, 2]), query 0.5 x'Cx - d'x."""
    rs = np.random.RandomState(seed)
    q, _ = np.linalg.qr(rs.randn(n, n))
    a = q @ np.diag(np.linspace(1.0, 2.0, n)) @ q.T
    c = rs.randn(n, n)
    c = c @ c.T / n + np.eye(n)
    b, d, theta = rs.randn(n), rs.randn(n), rs.randn(n)
    loss = lambda x, m: 0.5 * x @ m["M"] @ x - m["v"] @ x
    support = {"M": jnp.asarray(a), "v": jnp.asarray(b)}
    query = {"M": jnp.asarray(c), "v": jnp.asarray(d)}
    return loss, jnp.asarray(theta), support, query, (a, b, c, d, theta)


def test_imaml_equals_the_closed_form_on_a_quadratic(x64):
    """phi* = (A + lam I)^-1 (b + lam theta); d phi*/d theta = lam (A + lam I)^-1, so the
    meta-gradient is lam (A + lam I)^-1 (C phi* - d). The inner loop (rate 1/3 on a Hessian
    with eigenvalues in [2, 3]: a contraction of 1/3 per step) has converged to 1e-40 after
    80 steps, and 4 CG steps are exact for a 4-dimensional SPD system: agreement to 1e-10
    (round-off of the 4x4 solves)."""
    loss, theta, support, query, (a, b, c, d, th) = _quadratic()
    lam = 1.0
    ql, g = jax.jit(
        lambda t: meta_gradient(
            loss, t, support, query, inner_lr=1 / 3, inner_steps=80, method="imaml",
            lam=lam, cg_steps=4,
        )
    )(theta)  # fmt: skip
    phi = np.linalg.solve(a + lam * np.eye(4), b + lam * th)
    want = lam * np.linalg.solve(a + lam * np.eye(4), c @ phi - d)
    assert rel_err(g, want) < 1e-10
    np.testing.assert_allclose(ql, 0.5 * phi @ c @ phi - d @ phi, rtol=1e-10)
    # Fewer CG steps than the dimension: an approximation, not the solution.
    _, g2 = meta_gradient(
        loss, theta, support, query, inner_lr=1 / 3, inner_steps=80, method="imaml",
        lam=lam, cg_steps=1,
    )  # fmt: skip
    assert rel_err(g2, want) > 1e-4


def _mlp_problem():
    model = fmljax.mlp((1, 6, 1), activation=jnp.tanh, dtype=jnp.float64)
    loss = fmljax.mse_loss(model.apply)
    params = model.init(jax.random.key(0))
    support, query = fmljax.data.sample_sinusoid_task(jax.random.key(1), 5, 5, jnp.float64)
    return loss, params, support, query


def test_imaml_equals_differentiating_a_converged_inner_loop(x64):
    """On an MLP, the gradient of the query loss at the minimiser of the proximal problem,
    computed by differentiating 400 plain gradient steps on it (theta enters as the start and
    in the regulariser), equals iMAML's implicit gradient: the loop has converged (gradient
    of the proximal problem < 1e-12) and 40 CG steps solve the 19-parameter system. Tolerance
    1e-8: the unrolled derivative converges at the loop's contraction rate, like the
    iterate."""
    loss, params, support, query = _mlp_problem()
    lam, lr, steps = 4.0, 0.1, 400

    def proximal(p, theta):
        d = jax.tree.map(jnp.subtract, p, theta)
        return loss(p, support) + 0.5 * lam * sum(jnp.sum(x * x) for x in jax.tree.leaves(d))

    def unrolled(theta):
        def step(p, _):
            return jax.tree.map(lambda a, g: a - lr * g, p, jax.grad(proximal)(p, theta)), None

        phi, _ = jax.lax.scan(step, theta, None, length=steps)
        return loss(phi, query), phi

    (ql_ref, phi), g_ref = jax.jit(jax.value_and_grad(unrolled, has_aux=True))(params)
    stationary = jax.grad(proximal)(phi, params)
    assert np.abs(flat(stationary)).max() < 1e-12  # the loop has converged
    ql, g = jax.jit(
        lambda t: meta_gradient(
            loss, t, support, query, inner_lr=lr, inner_steps=steps, method="imaml",
            lam=lam, cg_steps=40,
        )
    )(params)  # fmt: skip
    assert rel_err(flat(g), flat(g_ref)) < 1e-8
    np.testing.assert_allclose(ql, ql_ref, rtol=1e-10)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(lam=0.0), "lam=0.0 is invalid: must be a finite number > 0"),
        (dict(lam=float("inf")), "lam=inf is invalid"),
        (dict(cg_steps=0), "cg_steps=0 is invalid: must be an int >= 1"),
        (dict(cg_steps=2.5), "cg_steps=2.5 is invalid"),
    ],
)
def test_imaml_bad_arguments_are_named(kw, message):
    loss, theta, support, query, _ = _quadratic()
    with pytest.raises(ValueError, match=message):
        meta_gradient(
            loss, theta, support, query, inner_lr=0.1, inner_steps=1, method="imaml", **kw
        )


# ---- ANIL / BOIL ----------------------------------------------------------------------------


def test_head_mask_anil_and_boil():
    params = fmljax.conv4(5).init(jax.random.key(0))
    anil = head_mask(params)
    assert all(jax.tree.leaves(anil["head"])) and not any(jax.tree.leaves(anil["conv0"]))
    boil = head_mask(params, body=True)
    assert not any(jax.tree.leaves(boil["head"])) and all(jax.tree.leaves(boil["conv3"]))
    mlp = fmljax.mlp((1, 4, 4, 1)).init(jax.random.key(0))
    assert head_mask(mlp)["dense2"] == {"w": True, "b": True}
    with pytest.raises(ValueError, match="head='fc' is not a top-level key"):
        head_mask(mlp, "fc")
    with pytest.raises(ValueError, match="selects no parameter"):
        adapt(lambda p, b: 0.0, mlp, None, inner_lr=0.1, inner_steps=1,
              adapt_mask=jax.tree.map(lambda _: False, mlp))  # fmt: skip


@functools.partial(jax.jit, static_argnums=(0, 4))
def _plain_anil_adapt(loss, params, support, lr, steps):
    """ANIL's inner loop written out: SGD on the head only, the body as it is."""
    head = params["dense2"]
    for _ in range(steps):
        g = jax.grad(lambda h: loss({**params, "dense2": h}, support))(head)
        head = jax.tree.map(lambda h, gi: h - lr * gi, head, g)
    return {**params, "dense2": head}


@pytest.mark.parametrize("steps", [1, 3])
def test_anil_meta_gradient_equals_finite_differences_and_the_plain_loop(x64, steps):
    """ANIL's meta-gradient reaches the body too (its features move the head's adaptation):
    against central differences (eps 1e-5: truncation error ~1e-10, rel. 1e-6 allowed), and
    the adapted parameters against a plain loop (1e-12: the same operations). HF with the mask
    is the same exact gradient (1e-10)."""
    model = fmljax.mlp((1, 5, 5, 1), activation=jnp.tanh, dtype=jnp.float64)
    loss = fmljax.mse_loss(model.apply)
    params = model.init(jax.random.key(0))
    support, query = fmljax.data.sample_sinusoid_task(jax.random.key(1), 5, 5, jnp.float64)
    mask, lr = head_mask(params), 0.3

    adapted = adapt(loss, params, support, inner_lr=lr, inner_steps=steps, adapt_mask=mask)
    want = _plain_anil_adapt(loss, params, support, lr, steps)
    assert rel_err(flat(adapted), flat(want)) < 1e-12
    np.testing.assert_array_equal(flat(adapted["dense0"]), flat(params["dense0"]))

    outer = lambda p: loss(_plain_anil_adapt(loss, p, support, lr, steps), query)
    kw = dict(inner_lr=lr, inner_steps=steps, adapt_mask=mask)
    ql, g = jax.jit(lambda p: meta_gradient(loss, p, support, query, method="maml", **kw))(params)
    assert np.abs(flat(g["dense0"])).max() > 1e-6  # the body gets a meta-gradient
    assert rel_err(flat(g), flat_grad_fd(outer, params)) < 1e-6
    _, g_hf = jax.jit(lambda p: meta_gradient(loss, p, support, query, method="hf", **kw))(params)
    assert rel_err(flat(g_hf), flat(g)) < 1e-10
    _, g_fo = meta_gradient(loss, params, support, query, method="fomaml", **kw)
    assert rel_err(flat(g_fo), flat(jax.grad(loss)(want, query))) < 1e-12
    # Meta-SGD with a mask: the rates keep the parameters' structure; the frozen rates get 0.
    rates = jax.tree.map(lambda p: jnp.full_like(p, lr), params)
    _, (gp, glr) = meta_gradient(
        loss, params, support, query, inner_lr=rates, inner_steps=steps, method="meta-sgd",
        adapt_mask=mask,
    )  # fmt: skip
    assert jax.tree.structure(glr) == jax.tree.structure(params)
    assert not np.any(flat(glr["dense0"])) and np.any(flat(glr["dense2"]))
    assert rel_err(flat(gp), flat(g)) < 1e-10  # equal rates: the same as MAML


def test_boil_adapts_the_body_only(x64):
    model = fmljax.mlp((1, 5, 1), dtype=jnp.float64)
    loss = fmljax.mse_loss(model.apply)
    params = model.init(jax.random.key(0))
    support, _ = fmljax.data.sample_sinusoid_task(jax.random.key(1), 5, 5, jnp.float64)
    mask = lambda path, leaf: "dense1" not in path  # a partition function: BOIL
    adapted = adapt(loss, params, support, inner_lr=0.1, inner_steps=2, adapt_mask=mask)
    np.testing.assert_array_equal(flat(adapted["dense1"]), flat(params["dense1"]))
    assert np.abs(flat(adapted["dense0"]) - flat(params["dense0"])).max() > 0


# ---- they learn -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kw",
    [("imaml", dict(method="imaml", lam=1.0, cg_steps=5)), ("anil", dict(method="maml"))],
)
def test_it_learns_on_sinusoids(name, kw):
    """150 meta-steps of 8 sinusoid tasks: the post-adaptation MSE on 64 new tasks falls
    (measured on this CPU: iMAML 6.01 -> 4.28, ANIL by more than a third; asserted: by a
    fifth and by a third)."""
    model = fmljax.mlp((1, 32, 32, 1))
    loss = fmljax.mse_loss(model.apply)
    params = model.init(jax.random.key(0))
    if name == "anil":
        kw = dict(kw, adapt_mask=head_mask(params))
    lr = 0.1 if name == "anil" else 0.02  # the whole net at 0.1 diverges on A up to 5
    step_kw = dict(inner_lr=lr, inner_steps=5, **kw)
    opt = optax.adam(1e-2)

    def task(k):
        return fmljax.data.sample_sinusoid_task(k, 10, 10)

    def post_loss(p, key):
        tasks = jax.vmap(task)(jax.random.split(key, 64))
        one = lambda s, q: loss(adapt(loss, p, s, inner_lr=lr, inner_steps=5,
                                      adapt_mask=kw.get("adapt_mask")), q)  # fmt: skip
        return jnp.mean(jax.vmap(one)(*tasks))

    @jax.jit
    def train(p, key):
        def body(carry, k):
            p, o = carry
            s, q = jax.vmap(task)(jax.random.split(k, 8))
            _, g = jax.vmap(lambda s, q: meta_gradient(loss, p, s, q, **step_kw))(s, q)
            upd, o = opt.update(jax.tree.map(lambda x: x.mean(0), g), o)
            return (optax.apply_updates(p, upd), o), None

        (p, _), _ = jax.lax.scan(body, (p, opt.init(p)), jax.random.split(key, 150))
        return p

    key = jax.random.key(7)
    before = float(jax.jit(post_loss)(params, key))
    after = float(jax.jit(post_loss)(train(params, jax.random.key(3)), key))
    assert after < (0.8 if name == "imaml" else 0.67) * before, (before, after)


def test_fedmeta_anil_round_equals_its_meta_gradient(x64):
    """FedMeta-MAML with the ANIL mask: one client, one task, local rate 1 and server SGD(1)
    give params - meta_gradient(..., adapt_mask) of the task the key contract draws (1e-12:
    the same arithmetic in another program); personalisation moves the head only."""
    model = fmljax.mlp((1, 5, 1), activation=jnp.tanh, dtype=jnp.float64)
    loss = fmljax.mse_loss(model.apply)
    params = model.init(jax.random.key(0))
    data = fmljax.data.sample_sinusoid_clients(jax.random.key(1), 3, jnp.float64)
    sampler = fmljax.data.sinusoid_task_sampler(4, 4)
    mask = lambda path, leaf: "dense1" in path  # the head of a 1-5-1 MLP
    cfg = fmljax.RoundConfig(clients_per_round=1, tasks_per_client=1, local_lr=1.0, inner_lr=0.3)
    alg = fmljax.build("fedmeta-maml", loss, sampler, cfg, server_optimizer=optax.sgd(1.0),
                       adapt_mask=mask, eval_sample_task=sampler)  # fmt: skip
    key = jax.random.key(2)
    new, _ = jax.jit(alg.update)(alg.init(params), key, data)
    k_sample, k_clients = jax.random.split(key)  # the documented key contract
    c = int(jax.random.choice(k_sample, 3, (1,), replace=False)[0])
    task_key = jax.random.split(jax.random.fold_in(jax.random.split(k_clients, 1)[0], 0), 1)[0]
    client = jax.tree.map(lambda a: a[c], data)
    support, query = sampler(task_key, client)
    _, g = meta_gradient(loss, params, support, query, inner_lr=0.3, inner_steps=1,
                         method="maml", adapt_mask=mask)  # fmt: skip
    want = jax.tree.map(lambda p, gi: p - gi, params, g)
    assert rel_err(flat(new.params), flat(want)) < 1e-12
    assert np.abs(flat(g["dense0"])).max() > 0  # the body learns from the head's adaptation
    adapted = alg.personalize(new.params, support)
    np.testing.assert_array_equal(flat(adapted["dense0"]), flat(new.params["dense0"]))
    assert np.abs(flat(adapted["dense1"]) - flat(new.params["dense1"])).max() > 0
