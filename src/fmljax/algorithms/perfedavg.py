"""Per-FedAvg: Fallah, Mokhtari & Ozdaglar, 2020, "Personalized Federated Learning with
Theoretical Guarantees: A Model-Agnostic Meta-Learning Approach", NeurIPS.

The client runs ``local_steps`` (the paper's tau) steps of rate ``local_lr`` (beta) on the
mean of ``tasks_per_client`` per-task MAML meta-gradients with inner rate ``inner_lr``
(alpha): first order (``perfedavg-fo``), Hessian-free with the central-difference
Hessian-vector product on an independent batch D'' of the same task (``perfedavg-hf``, see
the key contract of :mod:`fmljax.federated`) or exact second order (``perfedavg-so``).
Algorithm 1 averages uniformly: ``RoundConfig(weighting='uniform')``.
"""

from __future__ import annotations

from fmljax.algorithms.fedmeta import builder

__all__ = ["VARIANTS", "builder_of"]

#: variant -> meta_gradient method
VARIANTS = {"fo": "fomaml", "hf": "hf-fd", "so": "maml"}


def builder_of(variant: str):
    """The builder of ``perfedavg-<variant>`` (FedMeta's client with the variant's method)."""
    return builder(f"perfedavg-{variant}", VARIANTS[variant])
