"""FedAvg: McMahan, Moore, Ramage, Hampson & Aguera y Arcas, 2017, "Communication-Efficient
Learning of Deep Networks from Decentralized Data", AISTATS.

The client draws its round data once (``tasks_per_client`` (T) tasks, support and query
together: the key ``fold_in(client_key, 0)``) and runs ``local_steps`` (S) full-batch SGD
steps of rate ``local_lr`` on it (McMahan et al.'s B = infinity, E = S). With
``fine_tune=True``, FedAvg + local fine-tuning at evaluation (``eval_inner_steps`` steps,
None: ``inner_steps``); plain FedAvg scores the global model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fmljax.mapping import map_over
from fmljax.rounds import (
    AlgorithmSpec,
    ClientUpdate,
    local_steps,
    merge_batches,
    sgd_personalization,
)

__all__ = ["build", "local_sgd_client"]


def local_sgd_client(loss_fn, sample_task, config, mu: float = 0.0) -> ClientUpdate:
    """FedAvg's client update, with FedProx's proximal term when ``mu`` > 0.

    ``client_update(server_params, client, key, steps) -> (delta, {'loss': []})``: S masked
    steps (``steps`` [] int32 done) of ``p <- p - local_lr * grad h(p)`` on the merged
    (support + query) batches ``[T, K + Q, ...]`` of T tasks, with
    ``h(p) = mean_t loss_fn(p, batch_t) + (mu / 2) ||p - w_t||^2`` (``w_t`` the server's
    parameters); ``delta = w_t - p_end``; ``'loss'``: the mean over the steps done of the
    data term (the proximal term excluded, so the loss compares with FedAvg's). ``mu`` == 0
    (static) is FedAvg's program exactly.
    """
    cfg = config
    mu = float(mu)

    def client_update(server_params: Any, client: Any, key: jax.Array, steps: jax.Array):
        task_keys = jax.random.split(jax.random.fold_in(key, 0), cfg.tasks_per_client)
        tasks = map_over(
            lambda k: merge_batches(*sample_task(k, client)),
            task_keys,
            cfg.task_map,
            cfg.task_chunk,
        )  # [T, K + Q, ...]
        batch_loss = lambda p: jnp.mean(
            map_over(lambda b: loss_fn(p, b), tasks, cfg.task_map, cfg.task_chunk)
        )

        def sgd_step(p, s):
            loss, g = jax.value_and_grad(batch_loss)(p)
            if mu > 0:  # grad of (mu / 2) ||p - w_t||^2
                g = jax.tree.map(lambda gi, pi, wi: gi + mu * (pi - wi), g, p, server_params)
            return jax.tree.map(lambda a, b: a - cfg.local_lr * b, p, g), loss

        end, loss = local_steps(sgd_step, server_params, steps, cfg)
        return jax.tree.map(jnp.subtract, server_params, end), {"loss": loss}

    return client_update


def personalization(loss_fn, config, fine_tune: bool, adapt_mask: Any = None):
    """Plain FedAvg: no adaptation (0 steps); FedAvg + fine-tuning: SGD of rate ``inner_lr``
    for ``eval_inner_steps`` (None: ``inner_steps``) steps on the support batch."""
    if not fine_tune:
        steps = 0
    elif config.eval_inner_steps is not None:
        steps = config.eval_inner_steps
    else:
        steps = config.inner_steps
    return sgd_personalization(loss_fn, steps, config.inner_lr, adapt_mask)


def build(
    loss_fn, sample_task, config, *, fine_tune: bool = False, adapt_mask: Any = None
) -> AlgorithmSpec:
    """FedAvg's parts: :func:`local_sgd_client` (mu = 0), the weighted average, the server
    optimiser of ``build`` (default ``optax.sgd(1.0)``: the model average), and
    :func:`personalization`."""
    from fmljax.federated import _check_fine_tune

    _check_fine_tune(bool(fine_tune), config, "RoundConfig.", "fine_tune", "fedavg")
    return AlgorithmSpec(
        local_sgd_client(loss_fn, sample_task, config),
        personalization(loss_fn, config, bool(fine_tune), adapt_mask),
    )
