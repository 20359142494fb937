"""Per-task convolutions for any model: every ``conv_general_dilated`` rewritten as im2col.

In MAML-style meta-learning every task has its own weights after the inner step and the
meta-step is ``vmap``-ped over the T tasks. ``vmap`` of a ``lax.conv_general_dilated`` whose
kernel carries the task axis becomes one *grouped* convolution (``feature_group_count = T``,
and ``batch_group_count = T`` in its kernel gradient), and XLA:CPU computes the backward pass
of grouped convolutions very slowly (jax-ml/jax issue #13800, "Grouped convolution backward
pass is slow on CPU"): about 25x slower than the matrix products the same work needs.
:func:`fmljax.models.conv2d_same` avoids this for the built-in Conv4 with the im2col
formulation (Chellapilla, Puri and Simard, "High Performance Convolutional Neural Networks for
Document Processing", 2006): the ``kh * kw`` strided slices of the padded input are
concatenated into patches and multiplied by the reshaped kernel. Under ``vmap`` with per-task
weights that product is a batched matrix product, and all its derivatives are matrix products,
pads and slices, so no grouped convolution appears at any order of derivative.

:func:`batched_convs` gives the same to any ``apply(params, x, *args, **kwargs)`` (a Flax
linen or nnx module's apply, a Haiku transform, a plain function): at call time it traces
``apply`` with :func:`jax.make_jaxpr` on the abstract values of its array arguments, and
evaluates that jaxpr with an interpreter that replaces each ``conv_general_dilated`` equation
by :func:`conv_im2col` (``lax.pad``, ``lax.slice``, ``lax.dot_general``) and binds every other
primitive unchanged. Because the replacement is made of ordinary primitives, ``jax.grad``,
``jax.vmap``, ``jax.jit``, ``lax.map`` / ``lax.scan`` and any nesting of them apply to it as to
any other function; the rewrite happens wherever ``apply`` is traced.

What the interpreter does with equations that hold sub-jaxprs, when a convolution is inside
(otherwise the equation is bound as it is):

* ``jit`` / ``pjit``, ``closed_call``, ``core_call``: the body is inlined (rewritten in place;
  XLA inlines such calls anyway; shardings given to an inner ``jit`` are dropped with it).
* ``remat2`` (``jax.checkpoint``): re-applied with :func:`jax.checkpoint`, the same ``policy``
  and ``prevent_cse``, around the rewritten body.
* ``scan``, ``while``, ``cond``: rebuilt with :func:`jax.lax.scan` (same ``length``,
  ``reverse``, ``unroll``), :func:`jax.lax.while_loop` and :func:`jax.lax.switch`.
* ``custom_jvp_call`` / ``custom_vjp_call``: the primitive is bound again with its custom rule
  kept: the primal function, the JVP rule (custom_jvp) and the forward and backward functions
  (custom_vjp) are each wrapped so that their convolutions are rewritten too. Derivatives
  still come from the user's rule.
* any other primitive (``shard_map``, ``pallas_call``, ...): bound as it is, its convolutions
  left alone, with a :class:`UserWarning` naming it.

Convolutions supported: any number of spatial dimensions (1-D, 2-D, 3-D...), any
``window_strides``, explicit padding (``'SAME'`` / ``'VALID'`` arrive explicit in the jaxpr;
negative pads crop), ``lhs_dilation`` (transposed convolutions) and ``rhs_dilation`` (atrous),
any ``dimension_numbers``, ``feature_group_count > 1`` (grouped and depthwise, as a per-group
batched matrix product), ``batch_group_count > 1`` (a kernel-gradient convolution, likewise),
``precision`` and ``preferred_element_type`` passed to the ``dot_general``. The one fallback:
an equation with an explicit ``out_sharding`` is bound as the original primitive, because the
im2col layout would not carry that sharding. Values equal the convolution's up to the order of
floating-point summation.

Non-array arguments (Python scalars, strings, ``None``, modules...) are static: they are fixed
while tracing, as ``static_argnums`` would be; arrays (including tracers and typed PRNG keys)
are abstract. ``apply`` is traced exactly once per call of the transformed function, as often
as the untransformed function would run in Python, so under ``jax.jit`` nothing is traced
again beyond what ``jit`` itself does. A program without convolutions is evaluated from its
jaxpr as traced, the same primitives with the same parameters.

Shapes (2-D, NHWC): ``x`` [B, H, W, Cin], kernel [kh, kw, Cin / G, Cout], patches
[B, Ho, Wo, kh * kw * Cin]; under ``vmap`` over T tasks with per-task kernels the product is
the batched matmul [T, B * Ho * Wo, kh * kw * Cin] x [T, kh * kw * Cin, Cout].
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend as jex
import numpy as np
from jax import lax
from jax._src import source_info_util  # name stacks, as jax.core.eval_jaxpr keeps them

__all__ = ["batched_convs", "conv_im2col"]

_CONV = "conv_general_dilated"
_INLINE = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr"}


def batched_convs(apply: Callable[..., Any]) -> Callable[..., Any]:
    """``apply`` with every ``conv_general_dilated`` replaced by its im2col formulation.

    Args:
      apply: any ``apply(params, x, *args, **kwargs)`` (or any function of arrays and static
        values) whose outputs are a PyTree of arrays (non-array leaves are returned as they are).

    Returns:
      A function with the same signature and the same values whose traced program has no
      ``conv_general_dilated`` (see the module docstring for the few cases left alone), so that
      under ``jax.vmap`` with per-task weights it has no grouped convolution, to any order of
      derivative. Use it as ``jax.jit(jax.vmap(batched_convs(apply)))`` or inside a loss.
    """

    @functools.wraps(apply)
    def transformed(*args, **kwargs):
        return _call(apply, args, kwargs)

    return transformed


# --- tracing a Python function and evaluating it rewritten ----------------------------------


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic)


def _call(f: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """``f(*args, **kwargs)``, traced once to a jaxpr and evaluated with the rewrite."""
    leaves, treedef = jax.tree.flatten((tuple(args), kwargs))
    dyn_pos = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]
    out_info: dict[str, Any] = {}

    def flat(*dyn):
        full = list(leaves)
        for i, v in zip(dyn_pos, dyn, strict=True):
            full[i] = v
        a, kw = jax.tree.unflatten(treedef, full)
        out_leaves, out_tree = jax.tree.flatten(f(*a, **kw))
        mask = [_is_array(leaf) for leaf in out_leaves]
        out_info.update(tree=out_tree, mask=mask)
        out_info["static"] = [leaf for leaf, m in zip(out_leaves, mask, strict=True) if not m]
        return [leaf for leaf, m in zip(out_leaves, mask, strict=True) if m]

    closed = jax.make_jaxpr(flat)(*[leaves[i] for i in dyn_pos])
    dyn_in = [leaves[i] for i in dyn_pos]
    if _has_conv(closed.jaxpr):
        dyn_out = _eval(closed.jaxpr, closed.consts, dyn_in)
    else:  # nothing to rewrite: the same primitives with the same parameters
        dyn_out = jex.core.jaxpr_as_fun(closed)(*dyn_in)
    dyn_iter, static_iter = iter(dyn_out), iter(out_info["static"])
    out = [next(dyn_iter) if m else next(static_iter) for m in out_info["mask"]]
    return jax.tree.unflatten(out_info["tree"], out)


def _has_conv(jaxpr: Any) -> bool:
    """Whether ``jaxpr`` (open or closed) holds a convolution, at any depth of sub-jaxprs."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == _CONV:
            return True
        if any(_has_conv(sub) for sub in jex.core.jaxprs_in_params(eqn.params)):
            return True
    return False


def _eval(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """Evaluate an open jaxpr like ``jax.core.eval_jaxpr``, with the rewrite."""
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jex.core.Literal) else env[v]

    for v, x in itertools.chain(
        zip(jaxpr.constvars, consts, strict=True), zip(jaxpr.invars, args, strict=True)
    ):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
        with (
            source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack),
            eqn.ctx.manager,
        ):
            outs = _eval_eqn(eqn, invals)
        if not eqn.primitive.multiple_results:
            outs = [outs]
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _eval_closed(closed: Any, args: Sequence[Any]) -> list[Any]:
    return _eval(closed.jaxpr, closed.consts, args)


def _eval_eqn(eqn: Any, invals: list[Any]) -> Any:
    prim, params = eqn.primitive, eqn.params
    name = prim.name
    if name == _CONV:
        if params.get("out_sharding") is not None:
            return prim.bind(*invals, **params)
        return conv_im2col(*invals, **{k: v for k, v in params.items() if k != "out_sharding"})
    if not any(_has_conv(sub) for sub in jex.core.jaxprs_in_params(params)):
        return prim.bind(*invals, **prim.get_bind_params(params))
    if name in _INLINE:
        sub = params[_INLINE[name]]
        consts = getattr(sub, "consts", ())
        return _eval(getattr(sub, "jaxpr", sub), consts, invals)
    rule = _HIGHER_ORDER.get(name)
    if rule is None:
        warnings.warn(
            f"batched_convs: primitive {name!r} holds convolutions and is not rewritten; "
            "they stay lax.conv_general_dilated",
            stacklevel=2,
        )
        return prim.bind(*invals, **prim.get_bind_params(params))
    return rule(eqn, invals)


# --- higher-order primitives ------------------------------------------------------------------


def _remat(eqn: Any, invals: list[Any]) -> list[Any]:
    p = eqn.params
    body = functools.partial(lambda jaxpr, *a: _eval(jaxpr, (), a), p["jaxpr"])
    return jax.checkpoint(body, prevent_cse=p["prevent_cse"], policy=p["policy"])(*invals)


def _scan(eqn: Any, invals: list[Any]) -> list[Any]:
    p = eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc : nc + nk], invals[nc + nk :]

    def body(carry, x):
        out = _eval_closed(p["jaxpr"], [*consts, *carry, *x])
        return out[:nk], out[nk:]

    carry, ys = lax.scan(
        body, init, xs, length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
    )
    return [*carry, *ys]


def _while(eqn: Any, invals: list[Any]) -> list[Any]:
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = invals[:cn], invals[cn : cn + bn], invals[cn + bn :]

    def cond(v):
        return _eval_closed(p["cond_jaxpr"], [*cconsts, *v])[0]

    def body(v):
        return _eval_closed(p["body_jaxpr"], [*bconsts, *v])

    return lax.while_loop(cond, body, init)


def _cond(eqn: Any, invals: list[Any]) -> list[Any]:
    index, ops = invals[0], invals[1:]
    branches = [
        functools.partial(lambda b, *a: _eval_closed(b, a), b) for b in eqn.params["branches"]
    ]
    return lax.switch(index, branches, *ops)


def _rewritten(fun: Any) -> Any:
    """A ``linear_util.WrappedFun`` whose calls run through :func:`_call` (convs rewritten)."""
    return jex.linear_util.wrap_init(
        lambda *a: _call(fun.call_wrapped, a, {}), debug_info=fun.debug_info
    )


def _custom_call(eqn: Any, invals: list[Any]) -> list[Any]:
    """custom_jvp_call / custom_vjp_call: bind again with every function of the rule rewritten.

    ``get_bind_params`` turns the equation back into the functions jax binds (custom_jvp:
    primal and JVP rule; custom_vjp: primal, forward and backward); each is wrapped so that
    when jax calls it, it is traced and evaluated with the rewrite. The rule stays the user's.
    """
    prim = eqn.primitive
    bind_params = prim.get_bind_params(eqn.params)
    call_jaxpr = eqn.params["call_jaxpr"]
    primal = jex.linear_util.wrap_init(
        lambda *a: _eval_closed(call_jaxpr, a), debug_info=call_jaxpr.jaxpr.debug_info
    )
    fun, *rules = bind_params.pop("subfuns")
    del fun
    subfuns = (primal, *map(_rewritten, rules))
    return prim.bind(*invals, subfuns=subfuns, **bind_params)


_HIGHER_ORDER: dict[str, Callable[[Any, list[Any]], list[Any]]] = {
    "remat2": _remat,
    "checkpoint": _remat,
    "scan": _scan,
    "while": _while,
    "cond": _cond,
    "custom_jvp_call": _custom_call,
    "custom_vjp_call": _custom_call,
}


# --- the convolution ----------------------------------------------------------------------------


def conv_im2col(
    lhs: jax.Array,
    rhs: jax.Array,
    *,
    window_strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int],
    rhs_dilation: Sequence[int],
    dimension_numbers: lax.ConvDimensionNumbers,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """``lax.conv_general_dilated`` (with the parameters of its jaxpr equation) as im2col.

    The input goes to [N, S..., C] (S the d spatial axes) and the kernel to [k..., C / G, O];
    the input is padded, with ``lhs_dilation - 1`` zeros between elements (``lax.pad``, whose
    negative pads crop); for each of the ``prod(k)`` kernel offsets the strided window
    ``lax.slice`` [N, o..., C] is taken, starting at ``offset * rhs_dilation``; the slices are
    concatenated to patches [N, o..., prod(k) * C] and contracted with the kernel by one
    ``lax.dot_general`` (per group, as a batch dimension, for feature or batch groups), and
    the result is transposed to the output layout.
    """
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    nsp = len(window_strides)
    g, bg = feature_group_count, batch_group_count
    x = lax.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))  # [N, S..., C]
    w = lax.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))  # [k..., C / G, O]
    n, c = x.shape[0], x.shape[-1]
    ks, cout = w.shape[:nsp], w.shape[-1]
    kk = int(np.prod(ks))

    pads = [(lo, hi, d - 1) for (lo, hi), d in zip(padding, lhs_dilation, strict=True)]
    if any(p != (0, 0, 0) for p in pads):
        x = lax.pad(x, np.zeros((), x.dtype), [(0, 0, 0), *pads, (0, 0, 0)])
    keff = [(k - 1) * d + 1 for k, d in zip(ks, rhs_dilation, strict=True)]
    outs = [
        max(0, (p - e) // s + 1)
        for p, e, s in zip(x.shape[1:-1], keff, window_strides, strict=True)
    ]
    out_dtype = preferred_element_type or lhs.dtype
    if min(outs, default=1) == 0 or kk == 0:
        r = lax.full((n // bg, *outs, cout), 0, out_dtype)
        return _to_layout(r, out_spec)

    cols = []
    for offs in itertools.product(*map(range, ks)):
        start = [0, *(j * d for j, d in zip(offs, rhs_dilation, strict=True)), 0]
        limit = [
            n,
            *(
                b + (o - 1) * s + 1
                for b, o, s in zip(start[1:-1], outs, window_strides, strict=True)
            ),
            c,
        ]
        cols.append(lax.slice(x, start, limit, (1, *window_strides, 1)))
    patches = cols[0] if kk == 1 else lax.concatenate(cols, nsp + 1)  # [N, o..., K * C]
    dot = functools.partial(
        lax.dot_general, precision=precision, preferred_element_type=preferred_element_type
    )
    sp = tuple(range(1, nsp + 1))  # spatial axes of [N, o..., ...]

    if g == 1 and bg == 1:
        r = dot(patches, w.reshape(kk * c, cout), (((nsp + 1,), (0,)), ((), ())))
    elif bg == 1:  # feature groups: channels and outputs split group-major
        cg, og = c // g, cout // g
        p5 = patches.reshape(n, *outs, kk, g, cg)
        w4 = w.reshape(kk, cg, g, og)
        r = dot(p5, w4, (((nsp + 1, nsp + 3), (0, 1)), ((nsp + 2,), (2,))))  # [G, N, o..., Og]
        r = lax.transpose(r, (1, *(a + 1 for a in sp), 0, nsp + 2)).reshape(n, *outs, cout)
    else:  # batch groups: N split group-major, outputs split group-major
        nb, ob = n // bg, cout // bg
        p4 = patches.reshape(bg, nb, *outs, kk * c)
        w3 = w.reshape(kk * c, bg, ob)
        r = dot(p4, w3, (((nsp + 2,), (0,)), ((0,), (1,))))  # [BG, Nb, o..., Ob]
        r = lax.transpose(r, (1, *(a + 1 for a in sp), 0, nsp + 2)).reshape(nb, *outs, cout)
    return _to_layout(r, out_spec)


def _to_layout(r: jax.Array, out_spec: Sequence[int]) -> jax.Array:
    """[N, o..., O] to the output layout of ``out_spec`` (batch, feature, spatial... axes)."""
    nsp = r.ndim - 2
    role_axis = [0, nsp + 1, *range(1, nsp + 1)]  # axis of r holding N, O, spatial i
    perm = [0] * r.ndim
    for role, axis in enumerate(out_spec):
        perm[axis] = role_axis[role]
    return lax.transpose(r, perm)
