"""Masked losses and metrics on batches ``{'x': [B, ...], 'y': [B, ...], 'mask': [B]}``.

Every loss here is a mean over the real examples of a batch: an optional ``'mask'`` (1.0 for a
real example, 0.0 for padding) removes padded examples from the loss, its gradient and the
metrics, so that clients of unequal size can share one compiled round.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fmljax.models import takes_mask

Batch = Mapping[str, jax.Array]
Params = Any
ApplyFn = Callable[..., jax.Array]  # apply(params, x) -> outputs (mask-aware: mask=...)
LossFn = Callable[[Params, Batch], jax.Array]
MetricsFn = Callable[[Params, Batch], dict[str, jax.Array]]

__all__ = [
    "REDUCTIONS",
    "classification_metrics",
    "cross_entropy_loss",
    "masked_mean",
    "mse_loss",
    "predict",
    "real_examples",
    "regression_metrics",
]


def _real(mask: jax.Array | None, a: jax.Array) -> jax.Array:
    """``a`` [B, ...] with the padded rows (``mask == 0``) replaced by zeros (``where``, so a
    NaN or inf in padding never reaches a loss, its gradient or a metric)."""
    if mask is None:
        return a
    real = (mask > 0).reshape((-1,) + (1,) * (a.ndim - 1))
    return jnp.where(real, a, jnp.zeros((), a.dtype))


def real_examples(batch: Batch) -> Batch:
    """``batch`` with its padded examples' ``'x'`` and ``'y'`` set to zero (no ``'mask'``:
    unchanged). The losses here call it first; a padded row's values are never used."""
    mask = batch.get("mask")
    if mask is None:
        return batch
    out = dict(batch)
    for k in ("x", "y"):
        if k in batch:
            out[k] = _real(mask, batch[k])
    return out


def predict(apply: ApplyFn, params: Params, batch: Batch) -> jax.Array:
    """``apply(params, batch['x'])`` with padded rows zeroed (:func:`real_examples`); a
    :func:`fmljax.models.mask_aware` apply also gets the batch's ``'mask'`` [B] (when it has
    one) as ``mask=``, to keep padding out of its batch statistics. A plain apply never sees
    the mask: padded rows are dropped by the losses' masked means."""
    mask = batch.get("mask")
    x = _real(mask, batch["x"])
    if mask is not None and takes_mask(apply):
        return apply(params, x, mask=mask)
    return apply(params, x)


def masked_mean(values: jax.Array, batch: Batch) -> jax.Array:
    """Mean of per-example ``values`` [B] over the examples whose ``batch['mask']`` is 1;
    the others are selected away (``where``), so a non-finite padded value cannot leak in."""
    mask = batch.get("mask")
    if mask is None:
        return jnp.mean(values)
    real = mask > 0
    total = jnp.sum(jnp.where(real, values, jnp.zeros((), values.dtype)))
    return total / jnp.maximum(jnp.sum(real.astype(values.dtype)), 1.0)


def mse_loss(apply: ApplyFn) -> LossFn:
    """``loss(params, batch)``: mean squared error of ``apply(params, x)`` against ``y``."""

    def loss(params: Params, batch: Batch) -> jax.Array:
        pred = predict(apply, params, batch)
        err = jnp.square(pred - _real(batch.get("mask"), batch["y"]).reshape(pred.shape))
        return masked_mean(err.reshape(err.shape[0], -1).mean(-1), batch)

    return loss


#: Reductions of :func:`cross_entropy_loss` (``reduction=``).
REDUCTIONS = ("mean", "per_way_sum")


def cross_entropy_loss(apply: ApplyFn, reduction: str = "mean") -> LossFn:
    """``loss(params, batch)``: softmax cross-entropy of the logits against integer ``y``.

    ``reduction``: ``'mean'`` (the default) averages over the real examples of the batch;
    ``'per_way_sum'`` is the MAML reference code's loss (``cbfinn/maml``: per-example
    cross-entropy divided by the shots K, summed over the N * K examples), i.e. N times the
    mean, N being the number of classes (the logits' last axis): with K examples of each of
    the N ways, the sum over ways of each way's mean loss. The reference's inner rates (0.4
    for 5-way Omniglot) are rates for that loss; with ``'mean'`` the same rate is an N times
    smaller step.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"cross_entropy_loss: reduction={reduction!r} is not one of {REDUCTIONS}")

    def loss(params: Params, batch: Batch) -> jax.Array:
        logits = predict(apply, params, batch)
        y = _real(batch.get("mask"), batch["y"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        mean = masked_mean(ce, batch)
        return mean * logits.shape[-1] if reduction == "per_way_sum" else mean

    return loss


def regression_metrics(apply: ApplyFn) -> MetricsFn:
    """``metrics(params, batch) -> {'mse': ...}``."""
    loss = mse_loss(apply)
    return lambda params, batch: {"mse": loss(params, batch)}


def classification_metrics(apply: ApplyFn) -> MetricsFn:
    """``metrics(params, batch) -> {'loss': ..., 'accuracy': ...}``."""

    def metrics(params: Params, batch: Batch) -> dict[str, jax.Array]:
        logits = predict(apply, params, batch)
        y = _real(batch.get("mask"), batch["y"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = (jnp.argmax(logits, -1) == y).astype(logits.dtype)
        return {"loss": masked_mean(ce, batch), "accuracy": masked_mean(correct, batch)}

    return metrics
