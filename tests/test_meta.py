"""Meta-gradients against finite differences and closed forms, in float64."""

from __future__ import annotations

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import flat, flat_grad_fd, image_task, regression_task, rel_err, tiny_conv4, tiny_mlp

import fmljax
from fmljax.meta import adapt, meta_gradient

CASES = ["mlp", "conv4"]


def _problem(kind: str):
    key = jax.random.key(0)
    if kind == "mlp":
        model = tiny_mlp()
        loss = fmljax.mse_loss(model.apply)
        support, query = regression_task(jax.random.key(1))
        lr = 0.05
    else:
        model = tiny_conv4()
        loss = fmljax.cross_entropy_loss(model.apply)
        support, query = image_task(jax.random.key(1))
        lr = 0.1
    return model.init(key), loss, support, query, lr


METHODS = ("maml", "fomaml", "hf", "hf-fd", "reptile")


def _compile_once(fn, *args):
    """One program for all the checks of a test; optimisation level 0 keeps the compile short
    (the values are what is checked here, not speed; the same XLA ops are run)."""
    return (
        jax.jit(fn)
        .lower(*args)
        .compile(compiler_options={"xla_backend_optimization_level": 0})(*args)
    )


@functools.partial(jax.jit, static_argnums=(0, 4))
def _manual_adapt(loss, params, support, lr, steps):
    """The inner loop written as a plain Python loop (reference for adapt)."""
    for _ in range(steps):
        g = jax.grad(loss)(params, support)
        params = jax.tree.map(lambda p, gi: p - lr * gi, params, g)
    return params


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("steps", [1, 3])
def test_maml_equals_finite_differences(x64, kind, steps):
    params, loss, support, query, lr = _problem(kind)

    def outer(p):
        return loss(adapt(loss, p, support, inner_lr=lr, inner_steps=steps), query)

    qloss, g = _compile_once(
        lambda p: meta_gradient(
            loss, p, support, query, inner_lr=lr, inner_steps=steps, method="maml"
        ),
        params,
    )
    assert g is not None and qloss.dtype == jnp.float64
    fd = flat_grad_fd(outer, params)
    assert rel_err(flat(g), fd) < 1e-6
    np.testing.assert_allclose(qloss, outer(params), rtol=1e-12)


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("steps", [1, 3])
def test_first_order_hessian_free_and_reptile(x64, kind, steps):
    params, loss, support, query, lr = _problem(kind)

    def everything(p):
        out = {
            m: meta_gradient(loss, p, support, query, inner_lr=lr, inner_steps=steps, method=m)
            for m in METHODS
        }
        adapted = _manual_adapt(loss, p, support, lr, steps)
        return out, adapted, jax.grad(loss)(adapted, query), loss(adapted, query)

    out, adapted, g_query, adapted_loss = _compile_once(everything, params)
    g = {m: flat(out[m][1]) for m in METHODS}

    # fomaml: the query gradient at the adapted parameters, and not the exact gradient.
    assert rel_err(g["fomaml"], flat(g_query)) < 1e-12
    assert rel_err(g["fomaml"], g["maml"]) > 1e-3
    # hf: the exact gradient through Hessian-vector products.
    assert rel_err(g["hf"], g["maml"]) < 1e-10
    # hf-fd: the central-difference Hessian-vector product, within 1e-4 of hf.
    assert rel_err(g["hf-fd"], g["hf"]) < 1e-4
    # reptile: params - adapted, and the query loss at the adapted parameters.
    expect = jax.tree.map(jnp.subtract, params, adapted)
    assert rel_err(g["reptile"], flat(expect)) < 1e-12
    np.testing.assert_allclose(out["reptile"][0], adapted_loss, rtol=1e-12)


def test_hf_fd_uses_the_hessian_batch(x64):
    """Per-FedAvg-HF's Hessian batch D'' replaces the support batch in the HVP only."""
    params, loss, support, query, lr = _problem("mlp")
    hb, _ = regression_task(jax.random.key(7))
    _, g_hf = meta_gradient(
        loss, params, support, query, inner_lr=lr, inner_steps=1, method="hf", hessian_batch=hb
    )
    _, g_fd = meta_gradient(
        loss,
        params,
        support,
        query,
        inner_lr=lr,
        inner_steps=1,
        method="hf-fd",
        hessian_batch=hb,
        fd_delta=1e-4,
    )
    # (I - lr H_D'') g(theta'), theta' adapted on the support batch.
    adapted = _manual_adapt(loss, params, support, lr, 1)
    g_q = jax.grad(loss)(adapted, query)
    hvp = jax.jvp(lambda p: jax.grad(loss)(p, hb), (params,), (g_q,))[1]
    expect = jax.tree.map(lambda a, b: a - lr * b, g_q, hvp)
    assert rel_err(flat(g_hf), flat(expect)) < 1e-12
    assert rel_err(flat(g_fd), flat(expect)) < 1e-6


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("steps", [1, 3])
def test_meta_sgd_gradients_match_finite_differences(x64, kind, steps):
    params, loss, support, query, lr = _problem(kind)
    rates = jax.tree.map(
        lambda p: lr * (1.0 + 0.5 * jax.random.uniform(jax.random.key(3), p.shape, p.dtype)),
        params,
    )
    _, (g_p, g_lr) = _compile_once(
        lambda p, a: meta_gradient(
            loss, p, support, query, inner_lr=a, inner_steps=steps, method="meta-sgd"
        ),
        params,
        rates,
    )

    def f_params(p):
        return loss(adapt(loss, p, support, inner_lr=rates, inner_steps=steps), query)

    def f_rates(a):
        return loss(adapt(loss, params, support, inner_lr=a, inner_steps=steps), query)

    assert rel_err(flat(g_lr), flat_grad_fd(f_rates, rates)) < 1e-6
    assert rel_err(flat(g_p), flat_grad_fd(f_params, params)) < 1e-6


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_maml_closed_form_on_quadratics(x64, steps):
    """L_s = 1/2 t'At - b't, L_q = 1/2 t'Ct - d't: grad = ((I - aA)^S)' (C t_S - d)."""
    rng = np.random.default_rng(0)
    n = 5
    m1, m2 = rng.normal(size=(n, n)), rng.normal(size=(n, n))
    A, C = m1 @ m1.T / n + np.eye(n), m2 @ m2.T / n + np.eye(n)
    b, d, theta = rng.normal(size=n), rng.normal(size=n), rng.normal(size=n)
    alpha = 0.1

    def loss(t, batch):
        return 0.5 * t @ batch["M"] @ t - batch["v"] @ t

    support, query = (
        {"M": jnp.asarray(A), "v": jnp.asarray(b)},
        {"M": jnp.asarray(C), "v": jnp.asarray(d)},
    )
    t = theta.copy()
    for _ in range(steps):
        t = t - alpha * (A @ t - b)
    jac = np.linalg.matrix_power(np.eye(n) - alpha * A, steps)
    expect = jac.T @ (C @ t - d)
    for method in ("maml", "hf"):
        ql, g = meta_gradient(
            loss,
            jnp.asarray(theta),
            support,
            query,
            inner_lr=alpha,
            inner_steps=steps,
            method=method,
        )
        np.testing.assert_allclose(g, expect, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ql, 0.5 * t @ C @ t - d @ t, rtol=1e-12)
    # First-order MAML drops the Jacobian: the gradient at t_S.
    _, g_fo = meta_gradient(
        loss, jnp.asarray(theta), support, query, inner_lr=alpha, inner_steps=steps, method="fomaml"
    )
    np.testing.assert_allclose(g_fo, C @ t - d, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "dtype, method",
    [(jnp.float64, m) for m in fmljax.METHODS]
    + [(jnp.float32, m) for m in ("maml", "hf-fd", "meta-sgd")],
)
def test_vmap_over_tasks_and_clients_equals_loop(dtype, method):
    """vmap over tasks and over clients (nested) equals the plain Python loop, in f32 and f64."""
    with jax.enable_x64(dtype == jnp.float64):
        model = fmljax.mlp((1, 8, 8, 1), dtype=dtype)
        loss = fmljax.mse_loss(model.apply)
        params = model.init(jax.random.key(0))
        lr = (
            jax.tree.map(lambda p: jnp.full_like(p, 0.02), params) if method == "meta-sgd" else 0.02
        )
        keys = jax.random.split(jax.random.key(1), 6).reshape(2, 3)  # [C=2, T=3]
        tasks = jax.vmap(jax.vmap(lambda k: fmljax.data.sample_sinusoid_task(k, 5, 5, dtype)))(keys)

        def one(s, q):
            return meta_gradient(loss, params, s, q, inner_lr=lr, inner_steps=2, method=method)

        got = jax.jit(jax.vmap(jax.vmap(one)))(*tasks)
        one = jax.jit(one)  # the per-task reference, called in a Python loop
        for c in range(2):
            for t in range(3):
                s, q = jax.tree.map(lambda a: a[c, t], tasks)
                want = one(s, q)
                tol = 1e-12 if dtype == jnp.float64 else 2e-5
                assert jnp.asarray(want[0]).dtype == dtype
                np.testing.assert_allclose(got[0][c, t], want[0], rtol=tol)
                np.testing.assert_allclose(
                    flat(jax.tree.map(lambda a: a[c, t], got[1])),
                    flat(want[1]),
                    rtol=tol,
                    atol=tol,
                )


def test_meta_gradient_is_differentiable_again(x64):
    """grad works through meta_gradient (e.g. for hyper-gradients of the outer loss)."""
    params, loss, support, query, _ = _problem("mlp")

    def f(lr):
        return meta_gradient(
            loss, params, support, query, inner_lr=lr, inner_steps=2, method="maml"
        )[0]

    g = jax.grad(f)(0.05)
    fd = (f(0.05 + 1e-6) - f(0.05 - 1e-6)) / 2e-6
    np.testing.assert_allclose(g, fd, rtol=1e-6)


def test_remat_gives_the_same_gradient(x64):
    params, loss, support, query, lr = _problem("mlp")
    a = meta_gradient(loss, params, support, query, inner_lr=lr, inner_steps=3, method="maml")
    b = meta_gradient(
        loss, params, support, query, inner_lr=lr, inner_steps=3, method="maml", remat=True
    )
    assert rel_err(flat(b[1]), flat(a[1])) < 1e-12


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="sgd"), "method='sgd' is not one of"),
        (dict(method="maml", inner_steps=-1), "inner_steps=-1 must be a Python int >= 0"),
        (dict(method="maml", inner_steps=2.0), "inner_steps=2.0 must be a Python int"),
        (dict(method="hf-fd", fd_delta=0.0), "fd_delta=0.0 must be > 0"),
        (dict(method="meta-sgd"), "needs inner_lr to be a PyTree shaped like params"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    model = fmljax.mlp((1, 4, 1))
    params = model.init(jax.random.key(0))
    s, q = fmljax.data.sample_sinusoid_task(jax.random.key(1), 3, 3)
    kw = dict(inner_lr=0.1, inner_steps=1) | kwargs
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        meta_gradient(fmljax.mse_loss(model.apply), params, s, q, **kw)


# ---- prototypical networks ------------------------------------------------------------------


def test_prototypical_loss_closed_form_and_gradient(x64):
    n, k, q, dim = 3, 2, 2, 4
    rng = np.random.default_rng(0)
    support = {"x": jnp.asarray(rng.normal(size=(n * k, dim))), "y": jnp.repeat(jnp.arange(n), k)}
    query = {"x": jnp.asarray(rng.normal(size=(n * q, dim))), "y": jnp.repeat(jnp.arange(n), q)}

    def embed(w, x):
        return jnp.tanh(x @ w)

    w = jnp.asarray(rng.normal(size=(dim, 5)))
    # Closed form with numpy: prototypes are class means, logits are -squared distances.
    zs, zq = (
        np.tanh(np.asarray(support["x"]) @ np.asarray(w)),
        np.tanh(np.asarray(query["x"]) @ np.asarray(w)),
    )
    protos = np.stack([zs[np.asarray(support["y"]) == c].mean(0) for c in range(n)])
    logits = -((zq[:, None, :] - protos[None]) ** 2).sum(-1)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expect = -logp[np.arange(n * q), np.asarray(query["y"])].mean()
    got = fmljax.prototypical_loss(embed, w, support, query, n)
    np.testing.assert_allclose(got, expect, rtol=1e-12)
    g = jax.grad(lambda w: fmljax.prototypical_loss(embed, w, support, query, n))(w)
    fd = flat_grad_fd(lambda w: fmljax.prototypical_loss(embed, w, support, query, n), w)
    assert rel_err(np.asarray(g).ravel(), fd) < 1e-6
    # A masked support example changes nothing.
    padded = {
        "x": jnp.concatenate([support["x"], 100.0 * jnp.ones((1, dim))]),
        "y": jnp.concatenate([support["y"], jnp.array([0])]),
        "mask": jnp.concatenate([jnp.ones(n * k), jnp.zeros(1)]),
    }
    np.testing.assert_allclose(
        fmljax.prototypical_loss(embed, w, padded, query, n), expect, rtol=1e-12
    )


def test_conv4_batch_norm_ignores_masked_examples(x64):
    """Padding rows change neither the real rows' logits nor the masked loss (batch norm)."""
    model = tiny_conv4()
    params = model.init(jax.random.key(0))
    support, _ = image_task(jax.random.key(1))
    n = support["x"].shape[0]
    padded = {
        "x": jnp.concatenate([support["x"], 50.0 * jnp.ones((3, 8, 8, 1))]),
        "y": jnp.concatenate([support["y"], jnp.zeros(3, jnp.int32)]),
        "mask": jnp.concatenate([jnp.ones(n), jnp.zeros(3)]),
    }
    loss = fmljax.cross_entropy_loss(model.apply)
    value_and_grad = jax.jit(jax.value_and_grad(loss))  # one compile per batch shape
    (loss_pad, g_pad), (loss_real, g) = (
        value_and_grad(params, padded),
        value_and_grad(params, support),
    )
    np.testing.assert_allclose(loss_pad, loss_real, rtol=1e-12)
    assert rel_err(flat(g_pad), flat(g)) < 1e-10
    for mode in ("strided", "pooled"):
        m = fmljax.conv4(5, mode=mode, filters=4)
        out = jax.eval_shape(m.apply, m.init(jax.random.key(0)), jnp.ones((2, 16, 16, 1)))
        assert out.shape == (2, 5)
