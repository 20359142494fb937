"""Task and client sources: sinusoids (procedural), Omniglot, Synthetic(alpha, beta), digits."""

from fmljax.data.sinusoid import (
    sample_sinusoid_clients,
    sample_sinusoid_task,
    sinusoid_points,
    sinusoid_task_sampler,
)

__all__ = [
    "sample_sinusoid_clients",
    "sample_sinusoid_task",
    "sinusoid_points",
    "sinusoid_task_sampler",
]
