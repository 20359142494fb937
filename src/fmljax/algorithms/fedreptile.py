"""FedReptile: Reptile (Nichol, Achiam & Schulman, 2018, "On First-Order Meta-Learning
Algorithms") as the server step, after Jiang, Konecny, Rush & Kannan, 2019, "Improving
Federated Learning Personalization via Model Agnostic Meta Learning" (arXiv:1909.12488).

Each local step's per-task update is Reptile's ``theta - adapt(theta)`` after ``inner_steps``
SGD steps of rate ``inner_lr`` on the task's merged support + query batch; with server rate
1, one local step and ``inner_steps = S`` this is FedAvg's update (Jiang et al.'s
observation, checked by the tests). Personalisation: ``eval_inner_steps`` (None:
``inner_steps``) SGD steps.
"""

from __future__ import annotations

from typing import Any

import jax

from fmljax.algorithms.fedmeta import eval_steps, gradient_steps_client, require_inner_steps
from fmljax.meta import meta_gradient
from fmljax.rounds import AlgorithmSpec, merge_batches, sgd_personalization

__all__ = ["build"]


def build(loss_fn, sample_task, config, *, adapt_mask: Any = None) -> AlgorithmSpec:
    """FedReptile's parts: local steps on the mean Reptile update of T tasks, the weighted
    average, the server optimiser of ``build`` (the ``fedreptile`` wrapper: ``optax.sgd(
    server_lr)``) and SGD personalisation."""
    require_inner_steps("fedreptile", config)

    def task_gradient(params: Any, task_key: jax.Array, client: Any):
        batch = merge_batches(*sample_task(task_key, client))
        return meta_gradient(
            loss_fn,
            params,
            batch,
            batch,
            inner_lr=config.inner_lr,
            inner_steps=config.inner_steps,
            method="reptile",
            remat=config.remat,
            adapt_mask=adapt_mask,
        )

    return AlgorithmSpec(
        gradient_steps_client(task_gradient, config),
        sgd_personalization(loss_fn, eval_steps(config), config.inner_lr, adapt_mask),
    )
