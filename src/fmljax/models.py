"""Models as pure ``init(key) -> params`` / ``apply(params, x) -> outputs`` pairs.

Parameters are plain nested dicts of arrays, so that ``jax.grad`` can be taken through an
inner ``jax.grad`` (second-order MAML) and ``vmap``-ed over tasks and clients without any
framework state. Batch norm in :func:`conv4` follows the MAML reference code (Finn et al.,
2017, https://github.com/cbfinn/maml): it normalises with the statistics of the batch it is
given and keeps no running averages, so a task's support and query batches are normalised
separately ("transductive" batch norm).

Shapes: ``B`` is the example axis of one batch; images are ``[B, H, W, ch]`` (NHWC).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

Params = Any  # a PyTree of arrays
PRNGKey = jax.Array

__all__ = [
    "CONV_IMPLS",
    "CONV_INITS",
    "PADDINGS",
    "Model",
    "batch_norm",
    "conv2d_same",
    "conv4",
    "logistic_regression",
    "mlp",
]

#: Convolution implementations of :func:`conv4` (``impl=``); see :func:`conv2d_same`.
CONV_IMPLS = ("auto", "lax", "im2col")


class Model(NamedTuple):
    """A pure model: ``init(key) -> params`` and ``apply(params, x) -> outputs``."""

    init: Callable[[PRNGKey], Params]
    apply: Callable[..., jax.Array]  # apply(params, x, mask=None) -> outputs


def _dense_init(key: PRNGKey, fan_in: int, fan_out: int, dtype) -> dict[str, jax.Array]:
    # Truncated-normal fan-in scaling as in the MAML reference code's fully connected nets.
    w = jax.random.truncated_normal(key, -2.0, 2.0, (fan_in, fan_out), dtype) * 0.01
    return {"w": w, "b": jnp.zeros((fan_out,), dtype)}


def mlp(
    sizes: Sequence[int] = (1, 40, 40, 1),
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
    dtype=jnp.float32,
    init_scale: Literal["maml", "lecun"] = "lecun",
) -> Model:
    """A fully connected network; the default 1-40-40-1 ReLU net is MAML's sinusoid regressor.

    Args:
      sizes: layer widths, input first, output last.
      activation: hidden non-linearity.
      dtype: parameter dtype.
      init_scale: ``"lecun"`` (variance 1/fan_in, the usual choice) or ``"maml"`` (the
        reference code's truncated normal with std 0.01).
    """
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"mlp: sizes={sizes} must have >= 2 entries, each >= 1")

    def init(key: PRNGKey) -> Params:
        keys = jax.random.split(key, len(sizes) - 1)
        layers = []
        for k, fi, fo in zip(keys, sizes[:-1], sizes[1:], strict=True):
            if init_scale == "maml":
                layers.append(_dense_init(k, fi, fo, dtype))
            else:
                w = jax.random.normal(k, (fi, fo), dtype) / jnp.sqrt(jnp.asarray(fi, dtype))
                layers.append({"w": w, "b": jnp.zeros((fo,), dtype)})
        return {f"dense{i}": layer for i, layer in enumerate(layers)}

    def apply(params: Params, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        del mask  # examples are independent
        n = len(sizes) - 1
        h = x.reshape(x.shape[0], -1)
        for i in range(n):
            h = h @ params[f"dense{i}"]["w"] + params[f"dense{i}"]["b"]
            if i < n - 1:
                h = activation(h)
        return h

    return Model(init, apply)


def logistic_regression(num_features: int, num_classes: int, dtype=jnp.float32) -> Model:
    """Multinomial logistic regression ``x @ w + b`` (FedProx / pFedMe Synthetic baselines)."""
    if num_features < 1 or num_classes < 2:
        raise ValueError(
            f"logistic_regression: num_features={num_features} must be >= 1 and "
            f"num_classes={num_classes} must be >= 2"
        )

    def init(key: PRNGKey) -> Params:
        del key
        return {
            "w": jnp.zeros((num_features, num_classes), dtype),
            "b": jnp.zeros((num_classes,), dtype),
        }

    def apply(params: Params, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        del mask  # examples are independent
        return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]

    return Model(init, apply)


def batch_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    offset: jax.Array | None = None,
    eps: float = 1e-3,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Normalise ``x`` [B, H, W, ch] with the mean and variance of this batch (no running stats).

    ``eps = 1e-3`` is TensorFlow's ``batch_norm`` default used by the MAML reference code.
    ``mask`` [B] (1 = real example) keeps padded examples out of the statistics.
    """
    axes = tuple(range(x.ndim - 1))
    if mask is None:
        mean = jnp.mean(x, axis=axes)
        var = jnp.mean(jnp.square(x - mean), axis=axes)
    else:
        m = mask.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        count = jnp.maximum(jnp.sum(m) * (x[0].size // x.shape[-1]), 1.0)
        mean = jnp.sum(x * m, axis=axes) / count
        var = jnp.sum(jnp.square(x - mean) * m, axis=axes) / count
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale
    if offset is not None:
        y = y + offset
    return y


#: Convolution paddings of :func:`conv2d_same` and :func:`conv4` (``padding=``).
PADDINGS = ("SAME", "VALID")
#: Initialisers of :func:`conv4` (``init=``).
CONV_INITS = ("glorot", "torch")


def _pads(n: int, stride: int, k: int, padding: str = "SAME") -> tuple[int, int, int]:
    """(pad_low, pad_high, out) of XLA's ``padding`` along one spatial axis."""
    if padding == "VALID":
        return 0, 0, (n - k) // stride + 1
    out = -(-n // stride)
    total = max((out - 1) * stride + k - n, 0)
    return total // 2, total - total // 2, out


def _resolve_conv_impl(impl: str) -> str:
    # "auto": measured in benchmarks/RESULTS.md. On XLA:CPU a convolution whose weights differ
    # per task (vmap over tasks after the inner step) lowers to a grouped convolution whose
    # backward pass is very slow (jax issue 13800); im2col + matmul is several times faster
    # there. Accelerators run grouped convolutions natively (cuDNN / TPU), so "auto" keeps the
    # lax convolution on them (not measured here: no accelerator was available).
    if impl == "auto":
        return "im2col" if jax.default_backend() == "cpu" else "lax"
    return impl


def conv2d_same(
    x: jax.Array, w: jax.Array, stride: int, impl: str = "lax", padding: str = "SAME"
) -> jax.Array:
    """2-D convolution, ``x`` [B, H, W, cin], ``w`` [kh, kw, cin, cout], XLA's ``padding``
    (``'SAME'``, the default, or ``'VALID'``).

    ``impl="lax"``: ``jax.lax.conv_general_dilated``. ``impl="im2col"``: the ``kh * kw``
    shifted (strided) slices of the padded input are concatenated into patches
    [B, Ho, Wo, kh * kw * cin] and multiplied by the kernel reshaped to [kh * kw * cin, cout].
    Both compute the same function (equal up to float rounding, to all orders of derivative).
    Under ``vmap`` with per-item weights, im2col becomes a batched matrix product, and its
    derivatives are matrix products, pads and slices: no grouped convolution anywhere (unlike
    ``lax.conv_general_dilated_patches``, whose transpose is one).
    """
    impl = _resolve_conv_impl(impl)
    if impl == "lax":
        return jax.lax.conv_general_dilated(
            x,
            w,
            window_strides=(stride, stride),
            padding=padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
    if impl != "im2col":
        raise ValueError(f"conv2d_same: impl={impl!r} is not one of {CONV_IMPLS}")
    b, h, wd, c = x.shape
    kh, kw, cin, cout = w.shape
    if cin != c:
        raise ValueError(f"conv2d_same: input has {c} channels, kernel expects {cin}")
    if padding not in PADDINGS:
        raise ValueError(f"conv2d_same: padding={padding!r} is not one of {PADDINGS}")
    pt, pb, ho = _pads(h, stride, kh, padding)
    pl, pr, wo = _pads(wd, stride, kw, padding)
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    cols = [
        jax.lax.slice(
            xp,
            (0, dh, dw, 0),
            (b, dh + (ho - 1) * stride + 1, dw + (wo - 1) * stride + 1, c),
            (1, stride, stride, 1),
        )
        for dh in range(kh)
        for dw in range(kw)
    ]
    patches = jnp.concatenate(cols, axis=-1)  # [B, Ho, Wo, kh*kw*cin], (dh, dw, c) order = HWIO
    return jnp.einsum("bhwk,kc->bhwc", patches, w.reshape(kh * kw * cin, cout))


def conv4(
    num_classes: int,
    *,
    in_channels: int = 1,
    filters: int = 64,
    mode: Literal["strided", "pooled"] = "strided",
    blocks: int = 4,
    padding: Literal["SAME", "VALID"] = "SAME",
    bn_scale: bool = False,
    bn_offset: bool = True,
    bn_eps: float = 1e-3,
    init: Literal["glorot", "torch"] = "glorot",
    dtype=jnp.float32,
    impl: Literal["auto", "lax", "im2col"] = "auto",
) -> Model:
    """The convolutional network of MAML's Omniglot/MiniImagenet experiments (4 blocks).

    Each block is a 3x3 convolution with ``filters`` channels, then batch norm on the batch's
    own statistics (learned offset by default, optional learned scale; the reference code's
    ``tf.contrib.layers.batch_norm`` has ``center=True, scale=False`` and ``epsilon=1e-3``),
    then ReLU. In ``"strided"`` mode the convolution has stride 2 (the reference code's
    Omniglot net); in ``"pooled"`` mode it has stride 1 and is followed by a 2x2 max-pool
    (``VALID``: odd sizes are floored, as ``nn.MaxPool2d(2)``). The features are averaged over
    space and a linear head maps them to ``num_classes`` logits.

    The defaults are the MAML reference (``cbfinn/maml``). The other arguments express the
    networks of other implementations: ``blocks`` (number of blocks), ``padding`` (XLA's
    ``'SAME'``, which for a 3x3 stride-1 convolution is PyTorch's ``padding=1``, or
    ``'VALID'``, PyTorch's ``padding=0``), ``bn_scale`` / ``bn_offset`` (learned batch-norm
    scale and offset, PyTorch's ``affine=True`` is both), ``bn_eps`` (PyTorch's default is
    ``1e-5``) and ``init``: ``"glorot"`` (the reference: Glorot-uniform kernels and head,
    zero biases) or ``"torch"`` (PyTorch's default ``Conv2d`` / ``Linear`` initialisation:
    kernel and bias uniform in +-1/sqrt(fan_in)).

    ``apply(params, x, mask=None)`` takes ``x`` [B, H, W, in_channels] and returns logits
    [B, num_classes]; ``mask`` [B] keeps padded examples out of the batch-norm statistics.

    ``impl`` picks the convolution (see :func:`conv2d_same`): ``"lax"``
    (``lax.conv_general_dilated``), ``"im2col"`` (strided slices + matrix product), or
    ``"auto"`` (the default): ``"im2col"`` on CPU, ``"lax"`` on GPU/TPU, resolved when
    ``apply`` is traced. Why, with the measurements: ``benchmarks/RESULTS.md``. On CPU the
    one-jit task-batched MAML meta-step with ``"im2col"`` is several times faster than with
    ``"lax"``, whose per-task-weight convolutions become grouped convolutions under ``vmap``.
    All choices compute the same function; parameters are interchangeable.
    """
    if num_classes < 2 or in_channels < 1 or filters < 1 or blocks < 1:
        raise ValueError(
            f"conv4: num_classes={num_classes} must be >= 2, in_channels={in_channels}, "
            f"filters={filters} and blocks={blocks} must be >= 1"
        )
    if mode not in ("strided", "pooled"):
        raise ValueError(f"conv4: mode={mode!r} is not one of 'strided', 'pooled'")
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv4: impl={impl!r} is not one of {CONV_IMPLS}")
    if padding not in PADDINGS:
        raise ValueError(f"conv4: padding={padding!r} is not one of {PADDINGS}")
    if init not in CONV_INITS:
        raise ValueError(f"conv4: init={init!r} is not one of {CONV_INITS}")
    if not bn_eps > 0:
        raise ValueError(f"conv4: bn_eps={bn_eps!r} must be > 0")
    stride = 2 if mode == "strided" else 1

    def dense(key: PRNGKey, shape: tuple[int, ...]) -> dict[str, jax.Array]:
        fan_in, fan_out = math.prod(shape[:-1]), math.prod(shape[:-2]) * shape[-1]
        if init == "torch":  # kaiming_uniform_(a=sqrt(5)): bound 1/sqrt(fan_in), bias alike
            kw, kb = jax.random.split(key)
            bound = jnp.sqrt(1.0 / fan_in)
            return {
                "w": jax.random.uniform(kw, shape, dtype, -bound, bound),
                "b": jax.random.uniform(kb, shape[-1:], dtype, -bound, bound),
            }
        # Glorot-uniform, as tf.contrib.layers.xavier_initializer in the reference.
        limit = jnp.sqrt(6.0 / (fan_in + fan_out))
        return {
            "w": jax.random.uniform(key, shape, dtype, -limit, limit),
            "b": jnp.zeros(shape[-1:], dtype),
        }

    def init_fn(key: PRNGKey) -> Params:
        keys = jax.random.split(key, blocks + 1)
        params: dict[str, Any] = {}
        cin = in_channels
        for i in range(blocks):
            block = dense(keys[i], (3, 3, cin, filters))
            if bn_scale:
                block["scale"] = jnp.ones((filters,), dtype)
            if bn_offset:
                block["offset"] = jnp.zeros((filters,), dtype)
            params[f"conv{i}"] = block
            cin = filters
        params["head"] = dense(keys[blocks], (filters, num_classes))
        return params

    def apply(params: Params, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        h = x
        for i in range(blocks):
            p = params[f"conv{i}"]
            h = conv2d_same(h, p["w"], stride, impl, padding)
            h = h + p["b"]
            h = batch_norm(h, p.get("scale"), p.get("offset"), eps=bn_eps, mask=mask)
            h = jax.nn.relu(h)
            if mode == "pooled":
                h = jax.lax.reduce_window(
                    h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
                )
        h = jnp.mean(h, axis=(1, 2))
        return h @ params["head"]["w"] + params["head"]["b"]

    return Model(init_fn, apply)
