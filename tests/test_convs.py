"""batched_convs(apply) computes the same function as apply, with no convolution left.

float64, tiny shapes. Tolerance 1e-10 (absolute and relative): both sides are float64 sums of
at most a few hundred terms of size O(1), through a second-order MAML step, whose rounding is
around 1e-14; 1e-10 leaves four orders of margin and still catches any wrong index, pad or
group (those are O(1) errors). Each case compiles one program holding the original and the
transformed function (optimisation level 0: values are checked here, not speed).
"""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fmljax
from fmljax.convs import batched_convs

TOL = 1e-10
T, KS, KQ, WAYS = 2, 3, 4, 3  # tasks, support and query examples per task, classes


def _assert_close(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=TOL, atol=TOL)


def _compile(fn, *args):
    return (
        jax.jit(fn)
        .lower(*args)
        .compile(compiler_options={"xla_backend_optimization_level": 0})(*args)
    )


def _prims(jaxpr) -> list:
    """Every equation of a (closed) jaxpr, at any depth of sub-jaxprs."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    out = []
    for eqn in jaxpr.eqns:
        out.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out += _prims(sub)
    return out


def _convs(jaxpr) -> list:
    return [e for e in _prims(jaxpr) if e.primitive.name == "conv_general_dilated"]


def _normal(seed, shape):
    """float64 normals from numpy (host-side: no eager XLA program compiled per shape)."""
    return np.random.default_rng(seed).standard_normal(shape)


# --- models: convolutions of every kind, then mean over space and a linear head -------------


def _conv(x, w, spec):
    return lax.conv_general_dilated(
        x,
        w,
        spec["strides"],
        spec["padding"],
        lhs_dilation=spec.get("lhs_dilation"),
        rhs_dilation=spec.get("rhs_dilation"),
        dimension_numbers=spec["dn"],
        feature_group_count=spec.get("groups", 1),
    )


def _head(y, out_layout, v):
    """Mean over the spatial axes of ``y`` (layout ``out_layout``), then [N, C] @ v."""
    spatial = tuple(i for i, a in enumerate(out_layout) if a not in "NC")
    y = jnp.mean(jnp.tanh(y), spatial)
    if out_layout.index("C") < out_layout.index("N"):
        y = y.T
    return y @ v


def _layered(specs, fixed=None):
    """apply(params, x): the convolutions of ``specs`` in turn (tanh between), a linear head.

    ``fixed``: a kernel closed over as a constant, applied after the first layer (same layout).
    """

    def apply(params, x):
        for i, spec in enumerate(specs):
            x = jnp.tanh(_conv(x, params[f"w{i}"], spec) + params[f"b{i}"])
            if i == 0 and fixed is not None:
                x = _conv(x, fixed, dict(specs[0], strides=(1,) * len(spec["strides"])))
        return _head(x, specs[-1]["dn"][2], params["v"])

    return apply


NHWC = ("NHWC", "HWIO", "NHWC")
NCHW = ("NCHW", "OIHW", "NCHW")

CASES = {
    # NHWC: strided SAME (3 -> 4 channels), a closed-over constant 1x1 kernel, explicit
    # asymmetric pads with input dilation (a transposed convolution).
    "nhwc-strided-asym-dilated": dict(
        x=(6, 6, 3),
        specs=[
            dict(dn=NHWC, strides=(2, 2), padding="SAME", w=(3, 3, 3, 4)),
            dict(dn=NHWC, strides=(1, 1), padding=((1, 2), (0, 1)), lhs_dilation=(2, 1),
                 w=(2, 2, 4, 2)),
        ],
        fixed=(1, 1, 4, 4),
    ),
    # NCHW: VALID with kernel dilation and unequal strides, grouped (2 groups of 2 channels)
    # SAME, depthwise (4 groups of 1) with explicit pads.
    "nchw-valid-kdilated-grouped-depthwise": dict(
        x=(2, 7, 6),
        specs=[
            dict(dn=NCHW, strides=(1, 2), padding="VALID", rhs_dilation=(2, 1), w=(4, 2, 2, 2)),
            dict(dn=NCHW, strides=(1, 1), padding="SAME", groups=2, w=(4, 2, 2, 2)),
            dict(dn=NCHW, strides=(1, 1), padding=((0, 1), (1, 0)), groups=4, w=(4, 1, 2, 2)),
        ],
    ),
    "1d-nwc": dict(
        x=(8, 2),
        specs=[
            dict(dn=("NWC", "WIO", "NWC"), strides=(2,), padding="SAME", rhs_dilation=(2,),
                 w=(3, 2, 3)),
            dict(dn=("NWC", "WIO", "NWC"), strides=(1,), padding=((2, 0),), w=(2, 3, 2)),
        ],
    ),
    # 3-D, with a negative (cropping) pad and a mixed layout (channels first on the input,
    # last on the output).
    "3d-mixed-layout": dict(
        x=(2, 4, 4, 4),
        specs=[
            dict(dn=("NCDHW", "OIDHW", "NDHWC"), strides=(2, 1, 1),
                 padding=((1, 1), (0, 0), (-1, 1)), w=(2, 2, 2, 2, 2)),
        ],
    ),
}  # fmt: skip


def _case(name):
    case = CASES[name]
    specs = case["specs"]
    params = {"v": _normal(9, (specs[-1]["w"][specs[-1]["dn"][1].index("O")], WAYS))}
    for i, spec in enumerate(specs):
        params[f"w{i}"] = 0.5 * _normal(i, spec["w"])
        cout = spec["w"][spec["dn"][1].index("O")]
        bshape = [1] * len(spec["dn"][2])
        bshape[spec["dn"][2].index("C")] = cout
        params[f"b{i}"] = 0.1 * _normal(10 + i, tuple(bshape))
    fixed = _normal(20, case["fixed"]) if "fixed" in case else None
    apply = _layered(specs, fixed)
    in_layout = specs[0]["dn"][0]
    x_shape = list(case["x"])
    x_shape.insert(in_layout.index("N"), 0)  # placeholder for the batch axis

    def batch(key, n):
        shape = list(x_shape)
        shape[in_layout.index("N")] = n
        xs = np.stack([_normal(key + t, tuple(shape)) for t in range(T)])
        return {"x": xs, "y": np.tile(np.arange(n) % WAYS, (T, 1))}

    return apply, params, batch(100, KS), batch(200, KQ)


def _linen_case():
    """A flax.linen CNN (strided conv, batch norm with batch statistics, dilated conv)."""

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(3, (3, 3), strides=2, padding="SAME")(x)
            x = nn.relu(nn.BatchNorm(use_running_average=False)(x))
            x = nn.Conv(3, (2, 2), padding="VALID", kernel_dilation=2)(x)
            return nn.Dense(WAYS)(jnp.tanh(x).mean((1, 2)))

    module = CNN()
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 7, 7, 2)))
    variables = jax.tree.map(lambda p: 0.5 * _normal(p.size, p.shape), shapes)
    stats = variables["batch_stats"]  # closed over: the running statistics are not used

    def apply(params, x):
        return module.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])[0]

    def batch(key, n):
        return {"x": _normal(key, (T, n, 7, 7, 2)), "y": np.tile(np.arange(n) % WAYS, (T, 1))}

    return apply, variables["params"], batch(100, KS), batch(200, KQ)


def _everything(apply, params, support, query):
    """Outputs, gradients w.r.t. params and input, and T vmapped MAML meta-gradients."""
    x = support["x"][0]

    def scalar(p, x):
        return jnp.sum(jnp.sin(apply(p, x)))

    loss_fn = fmljax.cross_entropy_loss(apply)
    meta = jax.vmap(
        lambda s, q: fmljax.meta_gradient(
            loss_fn, params, s, q, inner_lr=0.4, inner_steps=1, method="maml"
        )
    )(support, query)
    return {"out": apply(params, x), "grad": jax.grad(scalar, (0, 1))(params, x), "maml": meta}


@pytest.mark.parametrize("name", [*CASES, "flax-linen"])
def test_matches_original(x64, name):
    apply, params, support, query = _linen_case() if name == "flax-linen" else _case(name)
    both = _compile(
        lambda p, s, q: (
            _everything(apply, p, s, q),
            _everything(batched_convs(apply), p, s, q),
        ),
        params,
        support,
        query,
    )
    _assert_close(both[0], both[1])
    # the meta-gradient is really second order and really per task
    g = jax.tree.leaves(both[1]["maml"][1])
    assert max(float(np.max(np.abs(a[0] - a[1]))) for a in g) > 1e-6


def test_rare_forms_and_dtypes(x64):
    """batch groups, precision / preferred_element_type, and float32 / bfloat16 in and out."""
    x, w = _normal(0, (4, 3, 5, 5)), _normal(1, (6, 3, 3, 3))

    def bgc(w, x):  # a kernel-gradient-like conv: N split into 2 groups, O too
        return lax.conv_general_dilated(
            x, w, (1, 1), "VALID", dimension_numbers=NCHW, batch_group_count=2
        )

    def mixed(w, x):  # HWNC / OHWI / CNWH, both dilations, precision and accumulation type
        return lax.conv_general_dilated(
            x.transpose(2, 3, 0, 1),  # [N, C, H, W] -> [H, W, N, C]
            w.transpose(0, 2, 3, 1),  # [O, I, kh, kw] -> [O, kh, kw, I]
            (1, 2),
            ((2, 0), (1, 3)),
            lhs_dilation=(1, 2),
            rhs_dilation=(1, 2),
            dimension_numbers=("HWNC", "OHWI", "CNWH"),
            precision=lax.Precision.HIGHEST,
            preferred_element_type=jnp.float64,
        )

    def check(w, x):
        out = {}
        for name, f in (("bgc", bgc), ("mixed", mixed)):
            for tag, g in (("orig", f), ("new", batched_convs(f))):
                out[name, tag] = (
                    g(w, x),
                    jax.grad(lambda w, x: jnp.sum(jnp.sin(g(w, x))), (0, 1))(w, x),
                )
        return out

    out = _compile(check, w, x)
    for name in ("bgc", "mixed"):
        _assert_close(out[name, "orig"], out[name, "new"])

    def low(w, x):
        return lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=NCHW, preferred_element_type=jnp.float32
        )

    for dt in (jnp.float32, jnp.bfloat16):
        a = low(w.astype(dt), x.astype(dt))
        b = batched_convs(low)(w.astype(dt), x.astype(dt))
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=1e-2 if dt == jnp.bfloat16 else 1e-5, atol=1e-2)


def test_vmap_over_task_weights_has_no_grouped_conv(x64):
    """Per-task kernels under vmap: the original's gradient has grouped convolutions, the
    transformed one has no convolution at all."""
    apply, params, support, query = _case("nchw-valid-kdilated-grouped-depthwise")
    loss_fn = fmljax.cross_entropy_loss(apply)
    per_task = jax.tree.map(lambda p: np.stack([p, 2 * p]), params)

    def step(loss_fn):
        return jax.vmap(jax.grad(loss_fn))(per_task, support)

    original = _convs(jax.make_jaxpr(lambda: step(loss_fn))())
    assert any(e.params["feature_group_count"] > 1 or e.params["batch_group_count"] > 1
               for e in original)  # fmt: skip
    new_loss = fmljax.cross_entropy_loss(batched_convs(apply))
    assert _convs(jax.make_jaxpr(lambda: step(new_loss))()) == []
    text = jax.jit(lambda: step(new_loss)).lower().as_text()
    assert "convolution" not in text and "dot_general" in text


def test_sub_jaxprs_and_custom_rules(x64):
    """Convs inside jit, checkpoint, scan, cond, while, custom_jvp and custom_vjp are rewritten;
    custom rules are kept (a deliberately wrong custom_vjp gradient stays wrong)."""
    spec = dict(dn=NHWC, strides=(1, 1), padding="SAME")

    @jax.custom_jvp
    def cj(x, w):
        return _conv(x, w, spec)

    @cj.defjvp
    def _cj_jvp(primals, tangents):
        (x, w), (dx, dw) = primals, tangents
        return cj(x, w), _conv(dx, w, spec) + _conv(x, dw, spec)

    @jax.custom_vjp
    def cv(x, w):
        return _conv(x, w, spec)

    def _cv_fwd(x, w):
        return _conv(x, w, spec), (x, w)

    def _cv_bwd(res, g):  # three times the true gradient: visible if the rule were dropped
        x, w = res
        _, vjp = jax.vjp(lambda x, w: _conv(x, w, spec), x, w)
        return tuple(3 * t for t in vjp(g))

    cv.defvjp(_cv_fwd, _cv_bwd)

    def apply(p, x):
        x = jax.jit(lambda x: jnp.tanh(_conv(x, p["a"], spec)))(x)
        x = jax.checkpoint(lambda x: jnp.tanh(_conv(x, p["b"], spec)))(x)
        x, _ = lax.scan(lambda c, w: (jnp.tanh(_conv(c, w, spec)), None), x, p["stack"])
        x = lax.cond(x.sum() > 0, lambda x: _conv(x, p["a"], spec), jnp.sin, x)
        x = lax.fori_loop(0, 2, lambda i, x: jnp.tanh(_conv(x, p["b"], spec)), x)  # a scan
        x = jnp.tanh(cj(x, p["a"])) + jnp.tanh(cv(x, p["b"]))
        return jnp.sum(x**2)

    p = {"a": 0.3 * _normal(0, (3, 3, 2, 2)), "b": 0.3 * _normal(1, (2, 2, 2, 2))}
    p["stack"] = 0.3 * _normal(2, (2, 3, 3, 2, 2))
    x = _normal(3, (2, 5, 5, 2))
    new = batched_convs(apply)

    def looped(p, x):  # a while loop: forward-mode differentiable only
        def body(c):
            return c[0] + 1, jnp.tanh(_conv(c[1], p["b"], spec))

        return jnp.sum(lax.while_loop(lambda c: c[0] < x.shape[0], body, (0, x))[1] ** 2)

    def check(p, x):
        def second(f):  # a second-order derivative through every construct
            return jax.grad(lambda p: jax.grad(f)(p, x)["a"].sum())(p)

        def jvp(f):
            return jax.jvp(lambda p: f(p, x), (p,), (jax.tree.map(jnp.ones_like, p),))

        return [
            (f(p, x), jax.grad(f, (0, 1))(p, x), second(f), jvp(w))
            for f, w in ((apply, looped), (new, batched_convs(looped)))
        ]

    a, b = _compile(check, p, x)
    _assert_close(a, b)
    assert not _convs(jax.make_jaxpr(jax.grad(lambda p: jax.grad(new)(p, x)["b"].sum()))(p))
    assert _convs(jax.make_jaxpr(apply)(p, x)) and not _convs(jax.make_jaxpr(new)(p, x))
    assert _convs(jax.make_jaxpr(looped)(p, x))
    assert not _convs(jax.make_jaxpr(batched_convs(looped))(p, x))


def test_one_trace_per_configuration(x64):
    """jit(vmap(batched_convs(apply))) traces apply once; a MAML step traces it as often as
    the untransformed one; static (non-array) arguments are passed through."""
    apply, params, support, query = _case("nhwc-strided-asym-dilated")
    count = {"n": 0}

    def counted(p, x, scale, *, act):
        count["n"] += 1
        assert isinstance(scale, float) and act in ("tanh", "sin")
        return scale * getattr(jnp, act)(apply(p, x))

    per_task = jax.tree.map(lambda p: np.stack([p, 2 * p]), params)
    f = jax.jit(jax.vmap(lambda p, x: batched_convs(counted)(p, x, 0.5, act="tanh")))
    a = f(per_task, support["x"])
    f(jax.tree.map(lambda p: p + 1, per_task), support["x"] + 1)
    assert count["n"] == 1
    b = jax.vmap(lambda p, x: counted(p, x, 0.5, act="tanh"))(per_task, support["x"])
    np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL)

    def traces(fn):
        count["n"] = 0
        loss_fn = fmljax.cross_entropy_loss(lambda p, x: fn(p, x, 1.0, act="sin"))
        step = jax.jit(
            jax.vmap(
                lambda s, q: fmljax.meta_gradient(
                    loss_fn, params, s, q, inner_lr=0.4, inner_steps=1, method="maml"
                )
            )
        )
        jax.block_until_ready(step.lower(support, query))
        jax.block_until_ready(step.lower(support, query))
        return count["n"]

    assert traces(batched_convs(counted)) == traces(counted) >= 1


def test_program_without_convolutions_is_unchanged(x64):
    """No convolution: the same jaxpr, equation for equation (closed-over constant, inner
    jit, custom_jvp relu, scan)."""
    const = np.linspace(-1.0, 1.0, 12).reshape(4, 3)

    def mlp(p, x):
        h = jax.jit(lambda h: jax.nn.relu(h @ p["w"] + const[0, :3]))(x)
        h, _ = lax.scan(lambda c, _: (jnp.tanh(c @ const[:3]), None), h, None, length=2)
        return jax.checkpoint(lambda h: h @ p["v"])(h)

    p = {"w": _normal(0, (5, 3)), "v": _normal(1, (3, 2))}
    x = _normal(2, (4, 5))
    grad = jax.grad(lambda p, f: jnp.sum(f(p, x) ** 2))
    assert str(jax.make_jaxpr(mlp)(p, x)) == str(jax.make_jaxpr(batched_convs(mlp))(p, x))
    assert str(jax.make_jaxpr(lambda p: grad(p, mlp))(p)) == str(
        jax.make_jaxpr(lambda p: grad(p, batched_convs(mlp)))(p)
    )


def test_unknown_primitive_is_left_alone_with_a_warning(x64):
    """A conv inside shard_map (not rewritten): a warning that names it, values unchanged."""
    mesh = jax.make_mesh((1,), ("d",))
    spec = dict(dn=NHWC, strides=(1, 1), padding="SAME")

    def apply(w, x):
        inner = jax.shard_map(
            lambda x: _conv(x, w, spec), mesh=mesh, in_specs=jax.P(), out_specs=jax.P()
        )
        return inner(x)

    w, x = _normal(0, (3, 3, 2, 2)), _normal(1, (1, 5, 5, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = batched_convs(apply)(w, x)
    assert any("shard_map" in str(c.message) for c in caught)
    np.testing.assert_allclose(y, apply(w, x), rtol=TOL, atol=TOL)
