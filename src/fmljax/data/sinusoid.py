"""Sinusoid regression tasks (Finn et al., 2017, MAML, section 5.1), sampled on the device.

A task is ``y = A sin(x - phi)`` with amplitude ``A ~ U[0.1, 5]`` and phase ``phi ~ U[0, pi]``;
inputs are ``x ~ U[-5, 5]``. For federated runs each client owns one sinusoid (its amplitude
and phase), so a client's data is ``{'amplitude': [], 'phase': []}`` and a "task" of that
client is a fresh draw of K support and Q query points from its function. Nothing is stored:
points are drawn with ``jax.random`` inside the jitted round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Batch = dict[str, jax.Array]

__all__ = [
    "AMPLITUDE_RANGE",
    "INPUT_RANGE",
    "PHASE_RANGE",
    "sample_sinusoid_clients",
    "sample_sinusoid_task",
    "sinusoid_points",
    "sinusoid_task_sampler",
]

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, float(jnp.pi))
INPUT_RANGE = (-5.0, 5.0)


def sample_sinusoid_clients(key: jax.Array, num_clients: int, dtype=jnp.float32) -> Batch:
    """Draw C clients' sinusoids: ``{'amplitude': [C], 'phase': [C], 'num_examples': [C]}``.

    ``num_examples`` is 1 for every client (equal aggregation weights).
    """
    if num_clients < 1:
        raise ValueError(f"sample_sinusoid_clients: num_clients={num_clients} must be >= 1")
    ka, kp = jax.random.split(key)
    return {
        "amplitude": jax.random.uniform(ka, (num_clients,), dtype, *AMPLITUDE_RANGE),
        "phase": jax.random.uniform(kp, (num_clients,), dtype, *PHASE_RANGE),
        "num_examples": jnp.ones((num_clients,), dtype),
    }


def sinusoid_points(key: jax.Array, client: Batch, n: int) -> Batch:
    """``n`` points ``{'x': [n, 1], 'y': [n, 1]}`` of one client's sinusoid."""
    dtype = client["amplitude"].dtype
    x = jax.random.uniform(key, (n, 1), dtype, *INPUT_RANGE)
    return {"x": x, "y": client["amplitude"] * jnp.sin(x - client["phase"])}


def sinusoid_task_sampler(
    support_size: int, query_size: int
) -> Callable[[jax.Array, Any], tuple[Batch, Batch]]:
    """A task sampler ``sample(key, client) -> (support [K], query [Q])`` for one client."""
    if support_size < 1 or query_size < 1:
        raise ValueError(
            f"sinusoid_task_sampler: support_size={support_size} and query_size={query_size} "
            "must be >= 1"
        )

    def sample(key: jax.Array, client: Batch) -> tuple[Batch, Batch]:
        ks, kq = jax.random.split(key)
        return sinusoid_points(ks, client, support_size), sinusoid_points(kq, client, query_size)

    return sample


def sample_sinusoid_task(
    key: jax.Array, support_size: int, query_size: int, dtype=jnp.float32
) -> tuple[Batch, Batch]:
    """One MAML sinusoid task: a fresh amplitude and phase, K support and Q query points."""
    kc, kt = jax.random.split(key)
    client = jax.tree.map(lambda a: a[0], sample_sinusoid_clients(kc, 1, dtype))
    return sinusoid_task_sampler(support_size, query_size)(kt, client)
