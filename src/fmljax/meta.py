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

from fmljax.losses import masked_mean

Params = Any
Batch = Any
LossFn = Callable[[Params, Batch], jax.Array]

__all__ = [
    "METHODS",
    "adapt",
    "meta_gradient",
    "prototypical_logits",
    "prototypical_loss",
    "prototypical_metrics",
]

METHODS = ("maml", "fomaml", "hf", "hf-fd", "reptile", "meta-sgd")


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


def adapt(
    loss_fn: LossFn,
    params: Params,
    support: Batch,
    *,
    inner_lr: Any,
    inner_steps: int,
    remat: bool = False,
    return_trajectory: bool = False,
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

    Returns:
      theta_S, or ``(theta_S, trajectory)``.
    """
    inner_steps = _check_steps("adapt", inner_steps)
    inner_lr = _check_rate("adapt", "inner_lr", inner_lr)
    grad_fn = jax.grad(loss_fn)

    def step(p, _):
        p_next = _sub(p, _scaled(inner_lr, grad_fn(p, support)))
        return p_next, (p if return_trajectory else None)

    body = jax.checkpoint(step) if remat else step
    adapted, trajectory = jax.lax.scan(body, params, None, length=inner_steps)
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


def _validate(method: str, inner_steps: Any, fd_delta: float, hessian_batch: Any) -> None:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"meta_gradient: method={method!r} is not one of {METHODS}")
    _check_steps("meta_gradient", inner_steps)
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

    Returns:
      ``(query_loss, grads)``: the query loss at the adapted parameters and the meta-gradient
      (a PyTree like ``params``, or a pair for ``"meta-sgd"``).
    """
    _validate(method, inner_steps, fd_delta, hessian_batch)
    inner_lr = _check_rate("meta_gradient", "inner_lr", inner_lr)
    if _is_scalar(fd_delta):
        fd_delta = float(fd_delta)
    kw = dict(inner_steps=int(inner_steps), remat=remat)

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
        if method == "hf":
            hu = _hvp(loss_fn, theta_j, hbatch, u)
        else:
            hu = _fd_hvp(loss_fn, theta_j, hbatch, u, fd_delta)
        return _sub(v, hu), None

    v, _ = jax.lax.scan(back, v, trajectory, reverse=True)
    return loss, v


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
    logits = prototypical_logits(embed, params, support, query["x"], num_ways)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, query["y"])
    correct = (jnp.argmax(logits, -1) == query["y"]).astype(logits.dtype)
    return {"loss": masked_mean(ce, query), "accuracy": masked_mean(correct, query)}
