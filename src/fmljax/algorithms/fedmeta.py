"""FedMeta: Chen, Luo, Dong, Li & He, 2018, "Federated Meta-Learning with Fast Convergence and
Efficient Communication" (arXiv:1802.07876), with MAML (Finn et al., 2017), first-order MAML
and Meta-SGD (Li et al., 2017) as the meta-learner.

Each local step draws ``tasks_per_client`` (T) tasks (keys ``split(fold_in(client_key, s),
T)``), computes each task's meta-gradient (:func:`fmljax.meta.meta_gradient`, mapped over T),
averages them and takes an SGD step of rate ``local_lr``. Personalisation: the meta-learner's
own inner loop (``eval_inner_steps`` steps, None: ``inner_steps``; Meta-SGD with its learned
per-parameter rates).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fmljax.mapping import map_over
from fmljax.meta import meta_gradient
from fmljax.rounds import AlgorithmSpec, ClientUpdate, local_steps, sgd_personalization

__all__ = ["builder", "meta_client", "require_inner_steps"]


def require_inner_steps(name: str, config: Any) -> None:
    """A meta-learner needs an inner loop: ValueError unless ``inner_steps`` >= 1."""
    if config.inner_steps < 1:
        raise ValueError(
            f"{name}: RoundConfig.inner_steps={config.inner_steps} is invalid: must be an int "
            ">= 1 for a meta-learning algorithm"
        )


def _same_task(sample_task: Any) -> Any:
    return getattr(sample_task, "same_task", None) or getattr(
        getattr(sample_task, "train", None), "same_task", None
    )


def meta_client(loss_fn, sample_task, config, method: str, adapt_mask: Any = None) -> ClientUpdate:
    """The meta-learners' client update.

    ``client_update(server_params, client, key, steps) -> (delta, {'loss': []})``: S masked
    local steps of ``p <- p - local_lr * mean_t g_t``, ``g_t`` the meta-gradient of task t of
    ``method`` ('maml', 'fomaml', 'meta-sgd', 'hf-fd'; for Meta-SGD ``server_params`` is
    ``{'params', 'inner_lr'}`` and so is ``g_t``); ``'loss'``: the mean query loss after
    adaptation over the steps done. The Hessian batch of 'hf-fd' (D'') follows the key
    contract of :mod:`fmljax.federated`.
    """
    cfg = config
    is_metasgd = method == "meta-sgd"
    same_task = _same_task(sample_task)

    def task_gradient(meta_params: Any, task_key: jax.Array, client: Any):
        support, query = sample_task(task_key, client)
        if is_metasgd:
            params, lr = meta_params["params"], meta_params["inner_lr"]
        else:
            params, lr = meta_params, cfg.inner_lr
        hessian_batch = None
        if method == "hf-fd":  # D'': an independent batch of the same task
            other = jax.random.fold_in(task_key, 1)
            if same_task is not None:
                hessian_batch = same_task(task_key, other, client)[0]
            else:
                hessian_batch = sample_task(other, client)[0]
        loss, grads = meta_gradient(
            loss_fn,
            params,
            support,
            query,
            inner_lr=lr,
            inner_steps=cfg.inner_steps,
            method=method,
            hessian_batch=hessian_batch,
            fd_delta=cfg.fd_delta,
            remat=cfg.remat,
            adapt_mask=adapt_mask,
        )
        if is_metasgd:
            grads = {"params": grads[0], "inner_lr": grads[1]}
        return loss, grads

    return gradient_steps_client(task_gradient, config)


def gradient_steps_client(task_gradient, config) -> ClientUpdate:
    """The client update of local steps on mean per-task gradients:
    ``task_gradient(params, task_key, client) -> (loss [], grad)`` mapped over T task keys
    ``split(fold_in(key, s), T)`` of step ``s``."""
    cfg = config

    def client_update(server_params: Any, client: Any, key: jax.Array, steps: jax.Array):
        def local_step(p, s):
            task_keys = jax.random.split(jax.random.fold_in(key, s), cfg.tasks_per_client)
            losses, grads = map_over(
                lambda k: task_gradient(p, k, client), task_keys, cfg.task_map, cfg.task_chunk
            )
            g = jax.tree.map(lambda x: jnp.mean(x, axis=0), grads)
            return jax.tree.map(lambda a, b: a - cfg.local_lr * b, p, g), jnp.mean(losses)

        end, loss = local_steps(local_step, server_params, steps, cfg)
        return jax.tree.map(jnp.subtract, server_params, end), {"loss": loss}

    return client_update


def eval_steps(config: Any) -> int:
    """The adaptation steps of an evaluation: ``eval_inner_steps``, None: ``inner_steps``."""
    return config.inner_steps if config.eval_inner_steps is None else config.eval_inner_steps


def builder(name: str, method: str):
    """The builder of ``name`` (meta-gradient ``method``): ``builder(loss_fn, sample_task,
    config, *, adapt_mask=None) -> AlgorithmSpec``."""
    is_metasgd = method == "meta-sgd"

    def build(loss_fn, sample_task, config, *, adapt_mask: Any = None) -> AlgorithmSpec:
        require_inner_steps(name, config)
        if is_metasgd:

            def init(params: Any) -> Any:
                rates = jax.tree.map(lambda p: jnp.full_like(p, config.inner_lr), params)
                return {"params": params, "inner_lr": rates}

            split = lambda meta: (meta["params"], meta["inner_lr"])
        else:
            init, split = (lambda p: p), None
        return AlgorithmSpec(
            meta_client(loss_fn, sample_task, config, method, adapt_mask),
            sgd_personalization(loss_fn, eval_steps(config), config.inner_lr, adapt_mask, split),
            init=init,
        )

    build.__doc__ = f"{name}: FedMeta's parts with meta_gradient(method={method!r})."
    return build
