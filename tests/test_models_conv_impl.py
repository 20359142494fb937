"""conv4(impl="im2col") computes the same function as conv4(impl="lax"), to every order used.

float64, tiny shapes: values, first-order (FOMAML) and second-order (MAML, 1 inner step)
meta-gradients, vmapped over tasks (per-task weights after the inner step), strided and
pooled, with and without a batch-norm mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmljax
from fmljax.models import conv2d_same

TOL = 1e-10


def _max_abs_diff(a, b) -> float:
    return max(
        float(jnp.max(jnp.abs(x - y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_conv2d_same_matches_lax(x64):
    kx, kw = jax.random.split(jax.random.key(0))
    w = jax.random.normal(kw, (3, 3, 3, 4), jnp.float64)
    for size, stride, pad in (
        ((7, 7), 2, "SAME"),
        ((8, 5), 2, "SAME"),
        ((8, 5), 1, "SAME"),
        ((8, 5), 2, "VALID"),
        ((7, 6), 1, "VALID"),
    ):
        x = jax.random.normal(kx, (2, *size, 3), jnp.float64)
        a, b = jax.jit(
            lambda x, w, s=stride, p=pad: (
                conv2d_same(x, w, s, "lax", p),
                conv2d_same(x, w, s, "im2col", p),
            )
        )(x, w)
        assert a.shape == b.shape
        assert _max_abs_diff(a, b) < TOL, (size, stride, pad)


# The third case is another implementation's network protocol (3 blocks, VALID padding,
# learned batch-norm scale, PyTorch's epsilon and initialisation): the config fields of
# experiments/configs/omniglot_maml.py.
OTHER = dict(blocks=3, padding="VALID", bn_scale=True, bn_eps=1e-5, init="torch")


@pytest.mark.parametrize(
    "mode,hw,masked,extra",
    [("strided", 9, True, {}), ("pooled", 16, False, {}), ("strided", 15, True, OTHER)],
    ids=["strided", "pooled", "other-protocol"],
)
def test_conv4_im2col_equals_lax(x64, mode, hw, masked, extra):
    kw_ = dict(in_channels=2, filters=2, mode=mode, dtype=jnp.float64, **extra)
    lax_model = fmljax.conv4(3, impl="lax", **kw_)
    col_model = fmljax.conv4(3, impl="im2col", **kw_)
    params = lax_model.init(jax.random.key(1))
    # non-zero biases/offsets so every parameter matters
    params = jax.tree.map(
        lambda p: p + 0.1 * jax.random.normal(jax.random.key(p.size), p.shape, p.dtype), params
    )
    T, ks, kq = 2, 3, 4
    k1, k2 = jax.random.split(jax.random.key(2))
    xs = jax.random.normal(k1, (T, ks, hw, hw, 2), jnp.float64)
    xq = jax.random.normal(k2, (T, kq, hw, hw, 2), jnp.float64)
    ys = jnp.tile(jnp.arange(ks) % 3, (T, 1))
    yq = jnp.tile(jnp.arange(kq) % 3, (T, 1))
    support = {"x": xs, "y": ys}
    query = {"x": xq, "y": yq}
    if masked:
        support["mask"] = jnp.tile(jnp.array([1, 1, 0]), (T, 1))
        query["mask"] = jnp.tile(jnp.array([1, 0, 1, 1]), (T, 1))

    # values
    b = {k: v[0] for k, v in query.items()}
    a, c = jax.jit(
        lambda p, b: (
            lax_model.apply(p, b["x"], mask=b.get("mask")),
            col_model.apply(p, b["x"], mask=b.get("mask")),
        )
    )(params, b)
    assert _max_abs_diff(a, c) < TOL

    def meta(model, method):
        loss_fn = fmljax.cross_entropy_loss(model.apply)
        return jax.vmap(
            lambda s, q: fmljax.meta_gradient(
                loss_fn, params, s, q, inner_lr=0.4, inner_steps=1, method=method
            )
        )(support, query)

    def all_four(support, query):
        return {
            (impl, method): meta(model, method)
            for impl, model in (("lax", lax_model), ("im2col", col_model))
            for method in ("fomaml", "maml")
        }

    # One compile for the four programs; optimisation level 0 keeps it short (the values are
    # what is checked here, not speed).
    out = (
        jax.jit(all_four)
        .lower(support, query)
        .compile(compiler_options={"xla_backend_optimization_level": 0})(support, query)
    )
    for method in ("fomaml", "maml"):
        (la, ga), (lc, gc) = out[("lax", method)], out[("im2col", method)]
        assert _max_abs_diff(la, lc) < TOL, method
        assert _max_abs_diff(ga, gc) < TOL, method
        assert np.all(np.isfinite(np.asarray(jax.tree.leaves(gc)[0])))
    # second order differs from first order (the Hessian term is really there)
    assert _max_abs_diff(out[("im2col", "maml")][1], out[("im2col", "fomaml")][1]) > 1e-6


def test_conv4_rejects_unknown_impl():
    with pytest.raises(ValueError, match="impl"):
        fmljax.conv4(5, impl="winograd")


def test_conv4_protocol_arguments():
    """Block count, initialisers and their bounds; bad values are refused by name."""
    ref = fmljax.conv4(5, filters=8).init(jax.random.key(0))
    torch = fmljax.conv4(5, filters=8, blocks=3, bn_scale=True, init="torch").init(
        jax.random.key(0)
    )
    assert sorted(ref) == ["conv0", "conv1", "conv2", "conv3", "head"]
    assert sorted(torch) == ["conv0", "conv1", "conv2", "head"]
    assert set(torch["conv1"]) == {"w", "b", "scale", "offset"}
    # Glorot: zero biases, |w| <= sqrt(6 / (fan_in + fan_out)); torch: +-1/sqrt(fan_in), both.
    assert not np.any(np.asarray(ref["conv1"]["b"]))
    assert float(jnp.max(jnp.abs(ref["conv1"]["w"]))) <= np.sqrt(6 / (72 + 72))
    for name, fan_in in (("conv1", 72), ("head", 8)):
        for leaf in ("w", "b"):
            v = np.asarray(torch[name][leaf])
            assert np.all(np.abs(v) <= 1 / np.sqrt(fan_in)) and np.std(v) > 0.2 / np.sqrt(fan_in)
    for kw, field in (
        ({"padding": "same"}, "padding"),
        ({"init": "kaiming"}, "init"),
        ({"blocks": 0}, "blocks"),
        ({"bn_eps": 0.0}, "bn_eps"),
    ):
        with pytest.raises(ValueError, match=field):
            fmljax.conv4(5, **kw)
