"""Models as pure ``init(key) -> params`` / ``apply(params, x) -> outputs`` pairs.

Parameters are plain nested dicts of arrays, so that ``jax.grad`` can be taken through an
inner ``jax.grad`` (second-order MAML) and ``vmap``-ed over tasks and clients without any
framework state. Batch norm in :func:`conv4` follows the MAML reference code (Finn et al.,
2017, https://github.com/cbfinn/maml): it normalises with the statistics of the batch it is
given and keeps no running averages, so a task's support and query batches are normalised
separately ("transductive" batch norm).

The model contract: ``apply(params, x)`` is all a model writes. Padding masks (``'mask'`` [B]
of a padded batch, 1 = real example, 0 = padding) are the loss's business
(:func:`fmljax.losses.predict`): per-example outputs of padding rows are simply left out of the
masked mean. A model whose outputs depend on the other examples of its batch (batch norm on
the batch's statistics) needs the mask to keep padding out of those statistics; it says so in
one way, by marking its apply with :func:`mask_aware`, and then receives ``mask=`` ([B], or
None for an unpadded batch). :func:`conv4` is mask-aware; :func:`mlp` and
:func:`logistic_regression` are plain.

Flax models: :func:`from_linen` and :func:`from_nnx` turn a ``flax.linen`` or ``flax.nnx``
module into a :class:`Model` whose params are a plain PyTree of the module's trainable
parameters (``'params'`` collection / ``nnx.Param`` variables). Their ``conv_impl`` picks how
the module's convolutions run, as ``impl`` does for :func:`conv4`: ``'im2col'`` wraps the apply
with :func:`fmljax.convs.batched_convs` (every ``lax.conv_general_dilated`` of the traced
program rewritten as strided slices and a matrix product, so that ``vmap`` over per-task
weights gives batched matrix products instead of grouped convolutions, whose backward pass is
slow on XLA:CPU), ``'lax'`` leaves the module's convolutions as they are, and ``'auto'`` (the
default) is ``'im2col'`` on the CPU backend and ``'lax'`` on GPU/TPU, resolved when the model is
built; :func:`conv_impl_of` returns the choice made (for benchmarks and run records). Values,
gradients and meta-gradients are the same either way, up to float rounding.

Batch norm inside inner loops. MAML-style inner loops call ``apply`` on a task's support and
query batches with parameters that are themselves functions of the meta-parameters, inside
``jax.grad`` of ``jax.grad`` and under ``vmap`` over tasks and clients. Every model here (the
built-in :func:`conv4` and the Flax adapters alike) therefore runs batch norm in the MAML
reference's *transductive* mode: each call normalises with the mean and variance of the batch
it is given (over the real examples only, for a mask-aware model on a padded batch), in
training mode. Running averages are never used and never kept: Flax's updated
``batch_stats`` (linen ``mutable=['batch_stats']``; the mutated ``nnx.BatchStat`` variables)
are discarded after each call, and the initial statistics, random-number state and any other
non-``Param`` state are captured as constants. Only the trainable parameters are arguments of
``apply``, so only they enter (meta-)gradients, optimiser states, Meta-SGD's per-parameter
rates and the federated average; a ``Model`` is a pure function, with nothing mutated under a
trace.

Shapes: ``B`` is the example axis of one batch; images are ``[B, H, W, ch]`` (NHWC).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, TypeVar

import jax
import jax.numpy as jnp

from fmljax.convs import batched_convs

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
    "conv_impl_of",
    "from_linen",
    "from_nnx",
    "logistic_regression",
    "mask_aware",
    "mlp",
    "takes_mask",
]

#: Convolution implementations of :func:`conv4` (``impl=``, see :func:`conv2d_same`) and of
#: :func:`from_linen` / :func:`from_nnx` (``conv_impl=``, see :func:`fmljax.convs.batched_convs`).
CONV_IMPLS = ("auto", "lax", "im2col")


class Model(NamedTuple):
    """A pure model: ``init(key) -> params`` and ``apply(params, x) -> outputs``.

    ``init`` returns the trainable parameters, a PyTree of arrays. ``apply(params, x)`` takes
    one batch ``x`` [B, ...] and returns outputs [B, ...]; it must be a pure function of its
    arguments (it is differentiated twice and ``vmap``-ed). A plain ``lambda p, x: ...`` is a
    valid ``apply``; an apply that needs the padding mask is marked with :func:`mask_aware`
    and is then called as ``apply(params, x, mask=mask)``.
    """

    init: Callable[[PRNGKey], Params]
    apply: Callable[..., jax.Array]  # apply(params, x) -> outputs; mask-aware: mask=None too


_MASK_AWARE = "__fmljax_mask_aware__"
_F = TypeVar("_F", bound=Callable[..., jax.Array])


def mask_aware(apply: _F) -> _F:
    """Mark ``apply(params, x, mask=None)`` as taking the padding mask (a decorator).

    The losses (:func:`fmljax.losses.predict`) pass ``mask=`` [B] (1 = real example, 0 =
    padding) to a marked apply when a batch has a ``'mask'``, and call it without one
    otherwise; an unmarked apply is always called as ``apply(params, x)``. Mark a model whose
    outputs depend on the other examples of the batch (batch norm on the batch's statistics),
    so that padding stays out of those statistics. Returns a wrapper with the same behaviour
    (``functools.wraps``); :func:`takes_mask` is true of it.
    """
    if not callable(apply):
        raise TypeError(f"mask_aware: apply={apply!r} is not callable")
    if takes_mask(apply):
        return apply

    @functools.wraps(apply)
    def marked(params: Params, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        return apply(params, x, mask=mask)

    setattr(marked, _MASK_AWARE, True)
    return marked  # type: ignore[return-value]


def takes_mask(apply: Callable[..., Any]) -> bool:
    """Whether ``apply`` was marked with :func:`mask_aware` (is called with ``mask=``)."""
    return getattr(apply, _MASK_AWARE, False) is True


_mark_mask_aware = mask_aware  # for the adapters, whose ``mask_aware`` argument shadows it


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

    def apply(params: Params, x: jax.Array) -> jax.Array:
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

    def apply(params: Params, x: jax.Array) -> jax.Array:
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
    [B, num_classes]; ``mask`` [B] keeps padded examples out of the batch-norm statistics
    (``apply`` is :func:`mask_aware`).

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

    return Model(init_fn, mask_aware(apply))


# --------------------------------------------------------------------------------------------
# Flax adapters: a linen or nnx module as a pure Model (see "Batch norm inside inner loops").


def _unwrap_params(params: Params, top_keys: frozenset) -> Params:
    """The bare params tree of ``params`` given bare or as ``{'params': tree}``."""
    if isinstance(params, Mapping) and set(params.keys()) == {"params"} and top_keys != {"params"}:
        return params["params"]
    return params


def _with_conv_impl(apply: Callable[..., Any], conv_impl: str) -> Callable[..., Any]:
    """``apply`` with ``conv_impl`` resolved (``'auto'`` by the backend, now) and applied.

    ``'im2col'`` wraps ``apply`` with :func:`fmljax.convs.batched_convs`; ``'lax'`` keeps it.
    The result carries the resolved choice as its ``conv_impl`` attribute, and the
    :func:`mask_aware` marker of ``apply`` if it has one.
    """
    resolved = _resolve_conv_impl(conv_impl)
    out = batched_convs(apply) if resolved == "im2col" else apply
    if takes_mask(apply):
        setattr(out, _MASK_AWARE, True)  # functools.wraps copies it too; kept explicitly
    out.conv_impl = resolved  # type: ignore[attr-defined]
    return out


def _check_conv_impl(conv_impl: Any, where: str) -> None:
    if not isinstance(conv_impl, str) or conv_impl not in CONV_IMPLS:
        raise ValueError(f"{where}: conv_impl={conv_impl!r} is not one of {CONV_IMPLS}")


def conv_impl_of(model: Model | Callable[..., Any]) -> str | None:
    """The convolution implementation a model (or its apply) was built with.

    Returns ``'im2col'`` or ``'lax'`` for a :func:`from_linen` / :func:`from_nnx` model (its
    ``conv_impl`` resolved when it was built: ``'auto'`` never appears), and None for any
    other model (:func:`conv4` resolves its ``impl`` when traced; a user's apply has no record).
    """
    apply = model.apply if isinstance(model, Model) else model
    impl = getattr(apply, "conv_impl", None)
    return impl if impl in ("lax", "im2col") else None


def from_linen(
    module: Any,
    example_x: jax.Array,
    *,
    mask_aware: bool = False,
    conv_impl: Literal["auto", "lax", "im2col"] = "auto",
    **apply_kwargs: Any,
) -> Model:
    """A ``flax.linen`` module as a :class:`Model` (trainable ``'params'`` only).

    Args:
      module: a ``flax.linen.Module``; ``module(x, **apply_kwargs)`` returns outputs [B, ...].
      example_x: an input batch [B, ...] used to initialise the module (shapes only matter).
      mask_aware: the module's ``__call__`` takes ``mask=`` (a [B] array, 1 = real example,
        0 = padding, or None for an unpadded batch) and the returned apply is marked
        :func:`mask_aware`. Linen's ``BatchNorm(...)(h, mask=...)`` wants a mask
        broadcastable to ``h``: pass ``mask[:, None, None, None] > 0`` for ``h`` [B, H, W, ch]
        (None keeps every example).
      conv_impl: how the module's convolutions run, one of :data:`CONV_IMPLS`. ``'im2col'``:
        the apply is wrapped with :func:`fmljax.convs.batched_convs`, which rewrites every
        ``lax.conv_general_dilated`` of the traced program (``nn.Conv``, ``nn.ConvTranspose``,
        direct ``lax`` calls; any layout, stride, padding, dilation or group count) as strided
        slices and one matrix product, so that under ``vmap`` with per-task weights (MAML's
        meta-step) they are batched matrix products, to every order of derivative, instead
        of grouped convolutions (slow in the backward pass on XLA:CPU). ``'lax'``: the
        module's convolutions as they are. ``'auto'`` (the default): ``'im2col'`` if
        ``jax.default_backend()`` is ``'cpu'`` when ``from_linen`` is called, ``'lax'``
        otherwise. The resolved choice is ``apply.conv_impl`` (:func:`conv_impl_of`). Both
        compute the same function (equal up to float rounding); params are the same.
        Convolutions inside primitives the rewrite does not know (``shard_map``,
        ``pallas_call``, ...) stay as they are, with a warning (see :mod:`fmljax.convs`).
      **apply_kwargs: further keyword arguments of every ``module`` call (init and apply),
        e.g. ``train=True`` or ``deterministic=True`` for a module with dropout (a pure
        ``apply(params, x)`` has no random key to draw dropout masks from).

    Returns:
      ``Model(init, apply)``: ``init(key)`` is ``module.init(key, example_x, ...)['params']``
      (the bare tree); ``apply(params, x)`` (``params`` bare or as ``{'params': tree}``) is
      ``module.apply({'params': params, **other}, x, ...)``, where ``other`` are the
      module's other collections (``'batch_stats'``, ...) from one initialisation with key 0,
      captured as constants. Batch norm should use the batch's own statistics
      (``use_running_average=False``, the MAML reference's transductive mode): the
      non-``'params'`` collections are passed ``mutable`` and their updated values (running
      averages) are discarded, so nothing but ``params`` enters a (meta-)gradient.
    """
    from flax import linen as nn

    if not isinstance(module, nn.Module):
        raise TypeError(f"from_linen: module={module!r} is not a flax.linen.Module")
    _check_conv_impl(conv_impl, "from_linen")
    example_x = jnp.asarray(example_x)
    init_kw = dict(apply_kwargs)
    if mask_aware:
        init_kw["mask"] = jnp.ones(example_x.shape[:1], example_x.dtype)
    variables = dict(module.init(jax.random.key(0), example_x, **init_kw))
    if "params" not in variables:
        raise ValueError("from_linen: the module has no 'params' collection (nothing to train)")
    top_keys = frozenset(variables["params"].keys())
    other = {k: v for k, v in variables.items() if k != "params"}
    mutable = tuple(other)

    def init(key: PRNGKey) -> Params:
        return dict(module.init(key, example_x, **init_kw))["params"]

    def call(params: Params, x: jax.Array, **kw: Any) -> jax.Array:
        variables = {"params": _unwrap_params(params, top_keys), **other}
        if not mutable:
            return module.apply(variables, x, **apply_kwargs, **kw)
        out, _ = module.apply(variables, x, mutable=mutable, **apply_kwargs, **kw)
        return out  # the updated batch statistics are discarded

    if mask_aware:

        def apply_masked(params: Params, x: jax.Array, mask: jax.Array | None = None):
            return call(params, x, mask=mask)

        return Model(init, _with_conv_impl(_mark_mask_aware(apply_masked), conv_impl))

    def apply(params: Params, x: jax.Array) -> jax.Array:
        return call(params, x)

    return Model(init, _with_conv_impl(apply, conv_impl))


def from_nnx(
    module: Any,
    *,
    mask_aware: bool = False,
    conv_impl: Literal["auto", "lax", "im2col"] = "auto",
) -> Model:
    """A ``flax.nnx`` module as a :class:`Model` (the ``nnx.Param`` variables only).

    Args:
      module: an ``nnx.Module``, or a factory ``rngs -> Module`` (called with
        ``nnx.Rngs(key)``); ``module(x)`` returns outputs [B, ...].
      mask_aware: ``module(x, mask=mask)`` takes the padding mask ([B], 1 = real, or None);
        the returned apply is marked :func:`mask_aware`. ``nnx.BatchNorm(h, mask=...)`` wants
        a mask broadcastable to ``h``, e.g. ``mask[:, None, None, None] > 0``.
      conv_impl: how the module's convolutions run, one of :data:`CONV_IMPLS`, as in
        :func:`from_linen`: ``'im2col'`` wraps the apply with
        :func:`fmljax.convs.batched_convs` (every ``lax.conv_general_dilated``, e.g. of
        ``nnx.Conv``, as strided slices and a matrix product: batched matrix products under
        ``vmap`` over per-task weights, no grouped convolutions); ``'lax'`` leaves them;
        ``'auto'`` (the default) is ``'im2col'`` if ``jax.default_backend()`` is ``'cpu'``
        when ``from_nnx`` is called and ``'lax'`` otherwise. The resolved choice is
        ``apply.conv_impl`` (:func:`conv_impl_of`). Both compute the same function.

    Returns:
      ``Model(init, apply)``. ``init(key)`` returns the parameters as a plain nested dict of
      arrays (``nnx.split(m, nnx.Param, ...)``'s state as a pure dict): of a fresh module
      ``module(nnx.Rngs(key))`` for a factory, or the given module's current parameters (the
      key is then unused). ``apply(params, x)`` (``params`` bare or as ``{'params': tree}``)
      rebuilds the module inside the function (``nnx.merge`` of the graph definition, new
      ``Param`` variables holding ``params`` and new copies of the non-``Param`` state) and
      calls it with its batch norms on the batch's statistics (``use_running_average=False``:
      training mode; other attributes such as dropout's ``deterministic`` stay as the module
      has them). Nothing created outside a trace is mutated under it (no
      ``TraceContextError`` under ``jax.grad`` of ``jax.grad`` or ``vmap``); the updated
      batch statistics and random-number state are discarded, and the given module is never
      changed. The non-``Param`` state is that of the given module (of ``module(nnx.Rngs(0))``
      for a factory), captured as constants.
    """
    from flax import nnx

    _check_conv_impl(conv_impl, "from_nnx")
    if isinstance(module, nnx.Module):
        factory, template = None, module
    elif callable(module):
        factory, template = module, module(nnx.Rngs(0))
        if not isinstance(template, nnx.Module):
            raise TypeError(f"from_nnx: the factory returned {template!r}, not an nnx.Module")
    else:
        raise TypeError(f"from_nnx: module={module!r} is neither an nnx.Module nor a factory")
    template = nnx.view(template, use_running_average=False, raise_if_not_found=False)
    graphdef, param_state, rest_state = nnx.split(template, nnx.Param, ...)
    param_def = jax.tree.structure(param_state)
    rest_leaves, rest_def = jax.tree.flatten(rest_state)
    pure = nnx.to_pure_dict(param_state)
    pure_def = jax.tree.structure(pure)
    top_keys = frozenset(pure.keys())

    def init(key: PRNGKey) -> Params:
        if factory is None:
            del key  # a given module: its current parameters
            return nnx.to_pure_dict(param_state)
        _, state, _ = nnx.split(factory(nnx.Rngs(key)), nnx.Param, ...)
        return nnx.to_pure_dict(state)

    def call(params: Params, x: jax.Array, **kw: Any) -> jax.Array:
        params = _unwrap_params(params, top_keys)
        if jax.tree.structure(params) != pure_def:
            raise ValueError(
                "from_nnx: params do not have the module's parameter structure "
                f"{pure_def}; got {jax.tree.structure(params)}"
            )
        # New variables, made inside the caller's trace: merging and running the module
        # mutates only them (batch statistics, RNG counts), never state made outside it.
        p_state = jax.tree.unflatten(param_def, jax.tree.leaves(params))
        r_state = jax.tree.unflatten(rest_def, rest_leaves)
        return nnx.merge(graphdef, p_state, r_state)(x, **kw)

    if mask_aware:

        def apply_masked(params: Params, x: jax.Array, mask: jax.Array | None = None):
            return call(params, x, mask=mask)

        return Model(init, _with_conv_impl(_mark_mask_aware(apply_masked), conv_impl))

    def apply(params: Params, x: jax.Array) -> jax.Array:
        return call(params, x)

    return Model(init, _with_conv_impl(apply, conv_impl))
