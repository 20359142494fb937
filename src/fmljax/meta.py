"""Meta-gradients of one task as pure functions.

Implements the meta-learners that fmljax's federated algorithms run inside each client:

* MAML, exact second order and first order (Finn, Abbeel & Levine, 2017,
  "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML);
* Hessian-free MAML with Hessian-vector products, exact (forward-over-reverse) or by the
  central difference of Per-FedAvg (Fallah, Mokhtari & Ozdaglar, 2020, "Personalized
  Federated Learning with Theoretical Guarantees: A Model-Agnostic Meta-Learning Approach",
  NeurIPS);
* Reptile (Nichol, Achiam & Schulman, 2018, "On First-Order Meta-Learning Algorithms");
* Meta-SGD, per-parameter learned inner rates (Li, Zhou, Chen & Li, 2017, "Meta-SGD:
  Learning to Learn Quickly for Few-Shot Learning");
* iMAML, the implicit meta-gradient of a proximally regularised inner problem, by conjugate
  gradient on ``(I + H / lam)`` with Hessian-vector products (Rajeswaran, Finn, Kakade &
  Levine, 2019, "Meta-Learning with Implicit Gradients", NeurIPS);
* ANIL / BOIL, an inner loop on a subset of the parameters (``adapt_mask``; Raghu, Raghu,
  Bengio & Vinyals, 2020, "Rapid Learning or Feature Reuse?", ICLR; Oh, Yoo, Kim & Yun,
  2021, "BOIL: Towards Representation Change for Few-shot Learning", ICLR): the head only
  (ANIL) or the body only (BOIL); the outer gradient still reaches every parameter;
* prototypical networks as the metric baseline (Snell, Swersky & Zemel, 2017, NeurIPS).

Everything here is a pure function of PyTrees for one task (no task axis): ``vmap`` it over
tasks (T) and clients (C), ``jit`` it at the edge. Inner loops run under ``lax.scan`` so the
compile time does not grow with the number of inner steps; ``remat=True`` rematerialises each
inner step (``jax.checkpoint``) so second-order memory stays flat in the step count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmljax.losses import masked_mean, real_examples

Params = Any
Batch = Any
LossFn = Callable[[Params, Batch], jax.Array]

__all__ = [
    "METHODS",
    "adapt",
    "head_mask",
    "meta_gradient",
    "prototypical_logits",
    "prototypical_loss",
    "prototypical_metrics",
]

METHODS = ("maml", "fomaml", "hf", "hf-fd", "reptile", "meta-sgd", "imaml")


def _is_per_parameter(lr: Any, params: Params) -> bool:
    """True when ``lr`` is a PyTree shaped like ``params`` (per-parameter rates)."""
    return jax.tree.structure(lr) == jax.tree.structure(params) and not isinstance(lr, (int, float))


def _scaled(lr: Any, tree: Params) -> Params:
    """``lr * tree``, with ``lr`` a scalar or a PyTree shaped like ``tree``."""
    if _is_per_parameter(lr, tree):
        return jax.tree.map(lambda a, g: a * g, lr, tree)
    return jax.tree.map(lambda g: lr * g, tree)


def _sub(a: Params, b: Params) -> Params:
    return jax.tree.map(jnp.subtract, a, b)


def _vdot(a: Params, b: Params) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# ---- the adapted subset (ANIL / BOIL) --------------------------------------------------------


def head_mask(params: Params, head: str | None = None, *, body: bool = False) -> Params:
    """``adapt_mask`` of ANIL (``body=False``: only the head adapts) or BOIL (``body=True``:
    everything but the head adapts).

    ``head``: the top-level key of ``params`` that is the head; default: the last top-level
    key in JAX's (sorted) order, which is ``'head'`` for :func:`fmljax.conv4` and the last
    ``'dense<i>'`` layer for :func:`fmljax.mlp` (up to 10 layers).
    """
    if not isinstance(params, Mapping) or not params:
        raise ValueError("head_mask: params must be a non-empty mapping of layers")
    keys = sorted(params)
    head = keys[-1] if head is None else head
    if head not in params:
        raise ValueError(f"head_mask: head={head!r} is not a top-level key of params {keys}")
    out = {}
    for k, v in params.items():
        adapts = (k == head) != body
        out[k] = jax.tree.map(lambda _, a=adapts: a, v)
    return out


def _resolve_mask(adapt_mask: Any, params: Params) -> Params | None:
    """``adapt_mask`` as a PyTree of Python bools shaped like ``params`` (None: adapt all).

    Accepted: a PyTree of bools with the structure of ``params``, or a function
    ``(path: str, leaf) -> bool`` of each leaf's key path (``jax.tree_util.keystr``)."""
    if adapt_mask is None:
        return None
    if callable(adapt_mask):
        mask = jax.tree_util.tree_map_with_path(
            lambda path, x: bool(adapt_mask(jax.tree_util.keystr(path), x)), params
        )
    else:
        mask = adapt_mask
        if jax.tree.structure(mask) != jax.tree.structure(params):
            raise ValueError(
                "adapt_mask must be a PyTree of bools with the structure of params, or a "
                f"function (path, leaf) -> bool; got {jax.tree.structure(mask)}"
            )
        mask = jax.tree.map(lambda m: bool(m), mask)
    if not any(jax.tree.leaves(mask)):
        raise ValueError("adapt_mask is invalid: it selects no parameter to adapt")
    return mask


def _split(mask: Params, tree: Params) -> tuple[Params, Params]:
    """``(adapted, frozen)``: ``tree`` with None in place of the frozen / adapted leaves."""
    adapted = jax.tree.map(lambda m, x: x if m else None, mask, tree)
    frozen = jax.tree.map(lambda m, x: None if m else x, mask, tree)
    return adapted, frozen


def _merge(mask: Params, adapted: Params, frozen: Params) -> Params:
    return jax.tree.map(lambda m, a, f: a if m else f, mask, adapted, frozen)


def adapt(
    loss_fn: LossFn,
    params: Params,
    support: Batch,
    *,
    inner_lr: Any,
    inner_steps: int,
    remat: bool = False,
    return_trajectory: bool = False,
    adapt_mask: Any = None,
) -> Params | tuple[Params, Params]:
    """``inner_steps`` plain SGD steps on ``loss_fn(., support)`` from ``params``.

    ``theta_{j+1} = theta_j - inner_lr * grad loss_fn(theta_j, support)``, under ``lax.scan``.
    Differentiable: ``jax.grad`` of a function of the result differentiates through the inner
    gradients (second order).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: the starting point theta_0.
      support: the batch the inner loop trains on.
      inner_lr: a scalar or a PyTree shaped like ``params`` (per-parameter rates).
      inner_steps: number of steps (a Python or NumPy int, >= 0).
      remat: rematerialise each step in the backward pass (``jax.checkpoint``).
      return_trajectory: also return the stacked iterates theta_0..theta_{S-1} (leading axis
        ``inner_steps``), used by the Hessian-free backward pass.
      adapt_mask: the parameters the steps change (ANIL / BOIL, see :func:`head_mask`): a
        PyTree of bools shaped like ``params`` or a function ``(path, leaf) -> bool``; the
        others stay at ``params`` (and the gradient is taken w.r.t. the adapted ones only).
        None: all.

    Returns:
      theta_S, or ``(theta_S, trajectory)``.
    """
    inner_steps = _check_steps("adapt", inner_steps)
    inner_lr = _check_rate("adapt", "inner_lr", inner_lr)
    mask = _resolve_mask(adapt_mask, params)
    if mask is None:
        start, lr = params, inner_lr
        full = lambda a: a
    else:
        start, frozen = _split(mask, params)
        lr = _split(mask, inner_lr)[0] if _is_per_parameter(inner_lr, params) else inner_lr
        full = lambda a: _merge(mask, a, frozen)
    grad_fn = jax.grad(lambda a, batch: loss_fn(full(a), batch))

    def step(a, _):
        a_next = _sub(a, _scaled(lr, grad_fn(a, support)))
        return a_next, (full(a) if return_trajectory else None)

    body = jax.checkpoint(step) if remat else step
    adapted, trajectory = jax.lax.scan(body, start, None, length=inner_steps)
    adapted = full(adapted)
    return (adapted, trajectory) if return_trajectory else adapted


def _hvp(loss_fn: LossFn, params: Params, batch: Batch, vector: Params) -> Params:
    """Exact Hessian-vector product, forward-over-reverse; the Hessian is never formed."""
    return jax.jvp(lambda p: jax.grad(loss_fn)(p, batch), (params,), (vector,))[1]


def _fd_hvp(loss_fn: LossFn, params: Params, batch: Batch, vector: Params, delta: float):
    """Per-FedAvg's central difference ``[g(w + d v) - g(w - d v)] / (2 d)``."""
    grad_fn = jax.grad(loss_fn)
    plus = grad_fn(jax.tree.map(lambda p, v: p + delta * v, params, vector), batch)
    minus = grad_fn(jax.tree.map(lambda p, v: p - delta * v, params, vector), batch)
    return jax.tree.map(lambda a, b: (a - b) / (2.0 * delta), plus, minus)


def _is_int(v: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_scalar(v: Any) -> bool:
    """A concrete Python or NumPy number (bools included, to be refused): not an array, not a
    tracer, not a PyTree of rates."""
    return isinstance(v, int | float | np.integer | np.floating | np.bool_)


def _is_finite_positive(v: Any) -> bool:
    """A concrete scalar ``v`` (see :func:`_is_scalar`) is a finite number > 0, not a bool."""
    if isinstance(v, bool | np.bool_):
        return False
    try:
        return math.isfinite(float(v)) and v > 0
    except OverflowError:  # an int too large for a float
        return False


def _check_rate(where: str, name: str, value: Any) -> Any:
    """A concrete scalar rate must be a finite number > 0 and is returned as a Python float
    (NumPy scalars are not weakly typed and would change the parameters' dtype); tracers and
    PyTrees pass unchecked (their values are not known here), but every leaf must be a
    number or an array."""
    if _is_scalar(value):
        if not _is_finite_positive(value):
            raise ValueError(f"{where}: {name}={value!r} is invalid: must be a finite number > 0")
        return float(value)
    leaves = jax.tree.leaves(value)
    if not leaves or not all(_is_scalar(x) or hasattr(x, "dtype") for x in leaves):
        raise ValueError(
            f"{where}: {name}={value!r} is invalid: must be a finite number > 0 or a PyTree of "
            "per-parameter rates shaped like params"
        )
    return value


def _check_steps(where: str, inner_steps: Any) -> int:
    if not _is_int(inner_steps) or inner_steps < 0:
        raise ValueError(
            f"{where}: inner_steps={inner_steps!r} must be a Python int >= 0 "
            "(it fixes the length of the compiled inner loop)"
        )
    return int(inner_steps)


def _cg(matvec: Callable[[Params], Params], b: Params, steps: int) -> Params:
    """``steps`` conjugate-gradient iterations for ``A x = b`` from ``x = 0`` (``A`` symmetric,
    given by ``matvec``), under ``lax.scan``: a fixed count, as in the iMAML code, so that the
    result is the same under ``vmap`` as in a loop over tasks."""

    def div(num: jax.Array, den: jax.Array) -> jax.Array:  # 0 once the residual is 0
        ok = den != 0
        return jnp.where(ok, num / jnp.where(ok, den, 1), 0)

    def body(carry, _):
        x, r, p, rs = carry
        ap = matvec(p)
        alpha = div(rs, _vdot(p, ap))
        x = jax.tree.map(lambda x, p: x + alpha * p, x, p)
        r = jax.tree.map(lambda r, ap: r - alpha * ap, r, ap)
        rs_new = _vdot(r, r)
        beta = div(rs_new, rs)
        p = jax.tree.map(lambda r, p: r + beta * p, r, p)
        return (x, r, p, rs_new), None

    x0 = jax.tree.map(jnp.zeros_like, b)
    (x, *_), _ = jax.lax.scan(body, (x0, b, b, _vdot(b, b)), None, length=steps)
    return x


def _validate(
    method: str, inner_steps: Any, fd_delta: float, hessian_batch: Any, lam: Any, cg_steps: Any
) -> None:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"meta_gradient: method={method!r} is not one of {METHODS}")
    _check_steps("meta_gradient", inner_steps)
    if method == "imaml":
        if not (_is_finite_positive(lam) if _is_scalar(lam) else hasattr(lam, "dtype")):
            raise ValueError(
                f"meta_gradient: lam={lam!r} is invalid: must be a finite number > 0 (iMAML's "
                "regulariser lambda)"
            )
        if not _is_int(cg_steps) or cg_steps < 1:
            raise ValueError(
                f"meta_gradient: cg_steps={cg_steps!r} is invalid: must be an int >= 1"
            )
    if method == "hf-fd" and not (
        _is_finite_positive(fd_delta) if _is_scalar(fd_delta) else hasattr(fd_delta, "dtype")
    ):
        raise ValueError(
            f"meta_gradient: fd_delta={fd_delta!r} must be > 0 and finite (a finite number > 0)"
        )
    if hessian_batch is not None and method not in ("hf", "hf-fd"):
        raise ValueError(
            f"meta_gradient: hessian_batch is only used by methods 'hf' and 'hf-fd', "
            f"not method={method!r}"
        )


def meta_gradient(
    loss_fn: LossFn,
    params: Params,
    support: Batch,
    query: Batch,
    *,
    inner_lr: Any,
    inner_steps: int,
    method: str,
    hessian_batch: Batch | None = None,
    fd_delta: float = 1e-3,
    remat: bool = False,
    adapt_mask: Any = None,
    lam: float = 1.0,
    cg_steps: int = 5,
) -> tuple[jax.Array, Any]:
    """Query loss after adaptation and the meta-gradient of one task.

    Let ``adapt(theta)`` be ``inner_steps`` SGD steps with rate ``inner_lr`` on the support
    loss from ``theta`` (see :func:`adapt`) and ``F(theta) = loss_fn(adapt(theta), query)``.

    Methods:
      * ``"maml"``: the exact gradient of ``F`` (``jax.grad`` through the inner ``jax.grad``).
      * ``"fomaml"``: first-order MAML, the gradient of the query loss at the adapted
        parameters, the inner gradients treated as constants.
      * ``"hf"``: Hessian-free MAML. The exact gradient of ``F`` computed by the backward
        recursion ``v <- v - H(theta_j) (inner_lr * v)`` for ``j = S-1 .. 0`` from
        ``v = grad loss_fn(theta_S, query)``, each ``H(theta_j) u`` an exact Hessian-vector
        product (forward-over-reverse) of the support loss at the inner iterate ``theta_j``
        (or of ``hessian_batch`` if given). For one inner step this is Per-FedAvg's
        ``(I - alpha H) grad f(theta')``; for ``S > 1`` it is still the exact MAML gradient
        when ``hessian_batch`` is None, computed from the S stored iterates instead of the
        activations of the whole inner loop.
      * ``"hf-fd"``: as ``"hf"`` with each Hessian-vector product replaced by Per-FedAvg's
        central difference ``[grad f(w + d u) - grad f(w - d u)] / (2 d)``, ``d = fd_delta``,
        on ``hessian_batch`` (default: the support batch).
      * ``"reptile"``: the pseudo-gradient ``params - adapt(params)``.
      * ``"meta-sgd"``: ``inner_lr`` is a PyTree of learned rates shaped like ``params``;
        ``grads`` is the pair ``(dF/dparams, dF/dinner_lr)``, both exact.
      * ``"imaml"``: iMAML. The inner loop runs ``inner_steps`` SGD steps on the proximal
        problem ``loss_fn(phi, support) + lam / 2 * ||phi - theta||^2`` from ``theta``; the
        meta-gradient is the implicit one, ``(I + H / lam)^{-1} grad loss_fn(phi, query)``
        with ``H`` the support loss's Hessian at ``phi``, solved by ``cg_steps`` conjugate-
        gradient iterations of exact Hessian-vector products. It equals the gradient of the
        query loss at the exact minimiser ``phi*(theta)`` when the inner loop has converged
        (and CG too), whatever path the inner loop took.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: the meta-parameters theta (a PyTree).
      support: the batch the inner loop adapts on (one task, no task axis).
      query: the batch the adapted parameters are scored on.
      inner_lr: scalar or per-parameter PyTree (a PyTree is required for ``"meta-sgd"``).
      inner_steps: number of inner SGD steps S (a Python or NumPy int, >= 0).
      method: one of :data:`METHODS`.
      hessian_batch: batch for the Hessian-vector products of ``"hf"`` / ``"hf-fd"``
        (Per-FedAvg's independent batch D''); default: the support batch.
      fd_delta: the finite-difference step of ``"hf-fd"``.
      remat: rematerialise each inner step in the backward pass (bounds second-order memory).
      adapt_mask: the parameters the inner loop adapts (ANIL: :func:`head_mask`; see
        :func:`adapt`); the meta-gradient is w.r.t. every parameter all the same. Not for
        ``"imaml"``.
      lam: iMAML's regulariser lambda (> 0).
      cg_steps: iMAML's conjugate-gradient iterations (>= 1).

    Returns:
      ``(query_loss, grads)``: the query loss at the adapted parameters and the meta-gradient
      (a PyTree like ``params``, or a pair for ``"meta-sgd"``).
    """
    _validate(method, inner_steps, fd_delta, hessian_batch, lam, cg_steps)
    inner_lr = _check_rate("meta_gradient", "inner_lr", inner_lr)
    if _is_scalar(fd_delta):
        fd_delta = float(fd_delta)
    mask = _resolve_mask(adapt_mask, params)
    if mask is not None and method == "imaml":
        raise ValueError("meta_gradient: adapt_mask is not supported by method='imaml'")
    kw = dict(inner_steps=int(inner_steps), remat=remat, adapt_mask=mask)

    if method == "imaml":
        return _imaml(loss_fn, params, support, query, inner_lr, float(lam), int(cg_steps), kw)

    if method == "maml":

        def outer(p):
            return loss_fn(adapt(loss_fn, p, support, inner_lr=inner_lr, **kw), query)

        return jax.value_and_grad(outer)(params)

    if method == "meta-sgd":
        if not _is_per_parameter(inner_lr, params):
            raise ValueError(
                "meta_gradient: method='meta-sgd' needs inner_lr to be a PyTree shaped like "
                f"params (learned per-parameter rates), got {type(inner_lr).__name__}"
            )

        def outer_sgd(p, lr):
            return loss_fn(adapt(loss_fn, p, support, inner_lr=lr, **kw), query)

        loss, (g_params, g_lr) = jax.value_and_grad(outer_sgd, argnums=(0, 1))(params, inner_lr)
        return loss, (g_params, g_lr)

    if method in ("fomaml", "reptile"):
        adapted = jax.lax.stop_gradient(adapt(loss_fn, params, support, inner_lr=inner_lr, **kw))
        if method == "reptile":
            return loss_fn(adapted, query), _sub(params, adapted)
        return jax.value_and_grad(loss_fn)(adapted, query)

    # "hf" and "hf-fd": a backward recursion of Hessian-vector products over the iterates.
    adapted, trajectory = adapt(
        loss_fn, params, support, inner_lr=inner_lr, return_trajectory=True, **kw
    )
    loss, v = jax.value_and_grad(loss_fn)(adapted, query)
    hbatch = support if hessian_batch is None else hessian_batch

    def back(v, theta_j):
        u = _scaled(inner_lr, v)
        if mask is not None:  # the frozen parameters do not move: their rows of J are I
            u = jax.tree.map(lambda m, x: x if m else jnp.zeros_like(x), mask, u)
        if method == "hf":
            hu = _hvp(loss_fn, theta_j, hbatch, u)
        else:
            hu = _fd_hvp(loss_fn, theta_j, hbatch, u, fd_delta)
        return _sub(v, hu), None

    v, _ = jax.lax.scan(back, v, trajectory, reverse=True)
    return loss, v


def _imaml(loss_fn, params, support, query, inner_lr, lam, cg_steps, kw) -> tuple[Any, Any]:
    """iMAML's implicit meta-gradient (Rajeswaran et al., 2019, Algorithm 1 and eq. 7)."""
    theta = jax.lax.stop_gradient(params)

    def proximal(p, batch):
        d = _sub(p, theta)
        return loss_fn(p, batch) + 0.5 * lam * _vdot(d, d)

    phi = jax.lax.stop_gradient(adapt(proximal, params, support, inner_lr=inner_lr, **kw))
    loss, v = jax.value_and_grad(loss_fn)(phi, query)
    matvec = lambda x: jax.tree.map(lambda a, hx: a + hx / lam, x, _hvp(loss_fn, phi, support, x))
    return loss, _cg(matvec, v, cg_steps)


# --------------------------------------------------------------------------------------------
# Prototypical networks (Snell et al., 2017).


def prototypical_logits(
    embed: Callable[[Params, jax.Array], jax.Array],
    params: Params,
    support: Mapping[str, jax.Array],
    query_x: jax.Array,
    num_ways: int,
) -> jax.Array:
    """Negative squared Euclidean distances [Q_total, N] from query embeddings to prototypes.

    Prototypes are the (masked) means of the support embeddings of each class 0..N-1.
    """
    support = real_examples(support)  # padded rows zeroed: never NaN in a prototype
    z_s = embed(params, support["x"])  # [N*K, D]
    z_q = embed(params, query_x)  # [N*Q, D]
    onehot = jax.nn.one_hot(support["y"], num_ways, dtype=z_s.dtype)  # [N*K, N]
    if "mask" in support:
        onehot = onehot * support["mask"].astype(z_s.dtype)[:, None]
    counts = jnp.maximum(onehot.sum(0), 1.0)  # [N]
    protos = (onehot.T @ z_s) / counts[:, None]  # [N, D]
    d2 = jnp.sum(z_q**2, -1, keepdims=True) - 2.0 * z_q @ protos.T + jnp.sum(protos**2, -1)[None, :]
    return -d2


def prototypical_loss(
    embed: Callable[[Params, jax.Array], jax.Array],
    params: Params,
    support: Mapping[str, jax.Array],
    query: Mapping[str, jax.Array],
    num_ways: int,
) -> jax.Array:
    """Cross-entropy of the query labels under the prototypical softmax over -distances."""
    return prototypical_metrics(embed, params, support, query, num_ways)["loss"]


def prototypical_metrics(
    embed: Callable[[Params, jax.Array], jax.Array],
    params: Params,
    support: Mapping[str, jax.Array],
    query: Mapping[str, jax.Array],
    num_ways: int,
) -> dict[str, jax.Array]:
    """``{'loss', 'accuracy'}`` of a prototypical classifier on the query batch."""
    query = real_examples(query)
    logits = prototypical_logits(embed, params, support, query["x"], num_ways)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, query["y"])
    correct = (jnp.argmax(logits, -1) == query["y"]).astype(logits.dtype)
    return {"loss": masked_mean(ce, query), "accuracy": masked_mean(correct, query)}
