"""``from_linen`` / ``from_nnx`` with ``conv_impl='im2col'`` (``fmljax.convs.batched_convs``)
compute the same function as with ``conv_impl='lax'``, to every order MAML uses.

A linen and an nnx CNN (float64, 8x8 inputs, 2-4 channels) with strided, SAME-padded,
explicitly (asymmetrically) padded, dilated and multi-channel convolutions, NHWC, and for linen
also an NCHW convolution written with ``lax.conv_general_dilated`` and ``dimension_numbers``
(plus a mask-aware batch norm). Built from the same module with the same weights, both
implementations give the same outputs, gradients and second-order MAML meta-gradients, also
under ``jax.vmap`` over tasks (per-task weights after the inner step), and only the im2col
program is free of grouped convolutions.

Tolerance 1e-10 (relative, norm-wise): both sides are float64 sums of a few hundred O(1) terms
through a second-order MAML step, rounding ~1e-14; wrong indices, pads or groups give O(1)
errors. Each model compiles one program holding both implementations (optimisation level 0:
values are checked here, not speed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from helpers import flat, rel_err
from jax import lax

import fmljax
from fmljax.models import CONV_IMPLS, conv_impl_of, from_linen, from_nnx, takes_mask

F64 = jnp.float64
TOL = 1e-10
T, B, HW, CIN, WAYS = 2, 3, 8, 2, 3  # tasks, examples per batch, image size, channels, classes
INNER_LR = 0.3


# ---- the models -------------------------------------------------------------------------------


class NCHWConv(nn.Module):
    """A strided VALID convolution in NCHW / OIHW through ``lax.conv_general_dilated``."""

    features: int

    @nn.compact
    def __call__(self, x):  # x [B, H, W, C]
        w = self.param(
            "kernel", nn.initializers.lecun_normal(), (self.features, x.shape[-1], 2, 2), F64
        )
        y = lax.conv_general_dilated(
            jnp.transpose(x, (0, 3, 1, 2)),
            w,
            window_strides=(2, 1),
            padding="VALID",
            rhs_dilation=(1, 2),
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
        )
        return jnp.transpose(y, (0, 2, 3, 1))


def _bn_mask(mask, ndim):
    return None if mask is None else mask.reshape((-1,) + (1,) * (ndim - 1)) > 0


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x, mask=None):
        h = jnp.tanh(nn.Conv(3, (3, 3), strides=2, padding="SAME", param_dtype=F64)(x))
        h = nn.Conv(4, (3, 2), padding=((1, 2), (0, 1)), param_dtype=F64)(h)  # explicit
        h = nn.BatchNorm(use_running_average=False, use_fast_variance=False, param_dtype=F64)(
            h, mask=_bn_mask(mask, h.ndim)
        )
        h = jnp.tanh(h)
        h = jnp.tanh(
            nn.Conv(3, (2, 2), kernel_dilation=2, padding="SAME", param_dtype=F64)(h)
        )  # dilated
        h = jnp.tanh(NCHWConv(2)(h))
        return nn.Dense(WAYS, param_dtype=F64)(jnp.mean(h, axis=(1, 2)))


class NnxCNN(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        kw = dict(param_dtype=F64, rngs=rngs)
        self.c1 = nnx.Conv(CIN, 3, (3, 3), strides=2, padding="SAME", **kw)
        self.c2 = nnx.Conv(3, 4, (2, 3), strides=(1, 2), padding=((2, 0), (1, 1)), **kw)
        self.c3 = nnx.Conv(4, 3, (2, 2), kernel_dilation=(2, 1), padding="SAME", **kw)
        self.c4 = nnx.Conv(3, 2, (3, 2), padding="VALID", use_bias=False, **kw)
        self.head = nnx.Linear(2, WAYS, **kw)

    def __call__(self, x):
        h = x
        for conv in (self.c1, self.c2, self.c3, self.c4):
            h = jnp.tanh(conv(h))
        return self.head(jnp.mean(h, axis=(1, 2)))


def _models(kind: str):
    """``{impl: Model}`` for 'lax' and 'im2col', built from one module (the same weights)."""
    if kind == "linen":
        module, x = LinenCNN(), jnp.zeros((B, HW, HW, CIN), F64)
        return {i: from_linen(module, x, mask_aware=True, conv_impl=i) for i in ("lax", "im2col")}
    module = NnxCNN(rngs=nnx.Rngs(0))
    return {i: from_nnx(module, conv_impl=i) for i in ("lax", "im2col")}


def _tasks(masked: bool):
    """T tasks of support and query batches [T, B, 8, 8, 2] (host-side numpy normals)."""
    rng = np.random.default_rng(1)

    def batch():
        b = {"x": rng.standard_normal((T, B, HW, HW, CIN)), "y": rng.integers(0, WAYS, (T, B))}
        if masked:  # the last query example of each task is padding
            b["mask"] = np.tile(np.array([1.0] * (B - 1) + [0.0]), (T, 1))
        return b

    support = batch()
    support.pop("mask", None)
    return support, batch()


def _maml(loss, params, support, query):
    return fmljax.meta_gradient(
        loss, params, support, query, inner_lr=INNER_LR, inner_steps=1, method="maml"
    )


def _everything(model, params, support, query):
    """Outputs, the loss gradient and the MAML meta-gradient of task 0, and the vmapped
    meta-gradient over all tasks."""
    loss = fmljax.cross_entropy_loss(model.apply)
    s0, q0 = jax.tree.map(lambda a: a[0], (support, query))
    out = fmljax.losses.predict(model.apply, params, q0)
    grad = jax.grad(loss)(params, s0)
    meta = _maml(loss, params, s0, q0)
    vmapped = jax.vmap(lambda s, q: _maml(loss, params, s, q))(support, query)
    return out, grad, meta, vmapped


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_im2col_equals_lax(x64, kind):
    models = _models(kind)
    assert conv_impl_of(models["lax"]) == "lax" and conv_impl_of(models["im2col"]) == "im2col"
    assert models["im2col"].apply.conv_impl == "im2col"
    assert (
        takes_mask(models["im2col"].apply) == takes_mask(models["lax"].apply) == (kind == "linen")
    )
    params = models["lax"].init(jax.random.key(0))
    params = jax.tree.map(lambda a: a + 0.2 * np.sign(np.asarray(a) + 0.1), params)  # O(1)
    support, query = _tasks(masked=kind == "linen")

    def both(params, support, query):
        return {i: _everything(m, params, support, query) for i, m in models.items()}

    args = (params, support, query)
    compiled = (
        jax.jit(both).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})
    )
    got = compiled(*args)
    names = ("outputs", "gradient", "maml", "vmapped maml")
    for name, a, b in zip(names, got["im2col"], got["lax"], strict=True):
        assert jax.tree.structure(a) == jax.tree.structure(b), name
        fa, fb = flat(a), flat(b)
        assert fa.dtype == np.float64 and np.all(np.isfinite(fa)), name
        assert np.linalg.norm(fb) > 1e-3, name  # not trivially zero
        assert rel_err(fa, fb) < TOL, (name, rel_err(fa, fb))
    # The vmapped meta-gradient of each task is that task's meta-gradient (task 0 computed alone).
    v_loss, v_grads = got["im2col"][3]
    m_loss, m_grads = got["lax"][2]
    assert rel_err(flat(jax.tree.map(lambda a: a[0], v_grads)), flat(m_grads)) < TOL
    assert abs(float(v_loss[0]) - float(m_loss)) < TOL * max(1.0, abs(float(m_loss)))


def _eqns(jaxpr) -> list:
    """Every equation of a (closed) jaxpr, at any depth of sub-jaxprs."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    out = []
    for eqn in jaxpr.eqns:
        out.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out += _eqns(sub)
    return out


def _grouped_convs(jaxpr) -> list:
    return [
        e
        for e in _eqns(jaxpr)
        if e.primitive.name == "conv_general_dilated"
        and (e.params["feature_group_count"] > 1 or e.params["batch_group_count"] > 1)
    ]


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_vmapped_meta_gradient_has_no_grouped_conv_with_im2col(x64, kind):
    models = _models(kind)
    params = models["lax"].init(jax.random.key(0))
    support, query = _tasks(masked=kind == "linen")

    def jaxpr(model):
        loss = fmljax.cross_entropy_loss(model.apply)
        step = jax.vmap(lambda s, q: _maml(loss, params, s, q))
        return jax.make_jaxpr(step)(support, query)

    with_lax = jaxpr(models["lax"])
    assert _grouped_convs(with_lax)  # per-task weights: grouped convolutions (the check bites)
    with_im2col = jaxpr(models["im2col"])
    assert _grouped_convs(with_im2col) == []
    assert not any(e.primitive.name == "conv_general_dilated" for e in _eqns(with_im2col))
    assert any(e.primitive.name == "dot_general" for e in _eqns(with_im2col))


# ---- the conv_impl argument -------------------------------------------------------------------


def test_auto_is_resolved_by_the_backend_when_the_model_is_built(x64, monkeypatch):
    x = jnp.zeros((B, HW, HW, CIN), F64)
    for backend, want in (("cpu", "im2col"), ("gpu", "lax"), ("tpu", "lax")):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        linen = from_linen(LinenCNN(), x, mask_aware=True)  # conv_impl='auto', the default
        nnx_model = from_nnx(lambda rngs: NnxCNN(rngs=rngs), conv_impl="auto")
        assert conv_impl_of(linen) == conv_impl_of(nnx_model) == want, backend
        assert nnx_model.apply.conv_impl == want and conv_impl_of(linen.apply) == want
        assert takes_mask(linen.apply) and not takes_mask(nnx_model.apply)
    # Built on "tpu" above: the choice stays 'lax' whatever the backend is now.
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert conv_impl_of(linen) == "lax"
    # Models not built by the adapters have no record.
    assert conv_impl_of(fmljax.mlp((1, 2, 1))) is None
    assert conv_impl_of(lambda p, x: x) is None


def test_mask_aware_marker_and_name_survive_the_wrapping(x64):
    x = jnp.zeros((B, HW, HW, CIN), F64)
    for impl in ("lax", "im2col"):
        for mask_aware in (False, True):
            m = from_linen(LinenCNN(), x, mask_aware=mask_aware, conv_impl=impl)
            assert takes_mask(m.apply) is mask_aware and conv_impl_of(m) == impl
            assert m.apply.__name__ == ("apply_masked" if mask_aware else "apply")
        m = from_nnx(NnxCNN(rngs=nnx.Rngs(0)), mask_aware=False, conv_impl=impl)
        assert not takes_mask(m.apply) and conv_impl_of(m) == impl


@pytest.mark.parametrize("bad", ["IM2COL", "conv", None, 1])
def test_bad_conv_impl(bad):
    allowed = str(CONV_IMPLS).replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=rf"from_linen: conv_impl=.* is not one of {allowed}"):
        from_linen(LinenCNN(), jnp.zeros((1, HW, HW, CIN)), conv_impl=bad)
    with pytest.raises(ValueError, match=rf"from_nnx: conv_impl=.* is not one of {allowed}"):
        from_nnx(lambda rngs: NnxCNN(rngs=rngs), conv_impl=bad)
