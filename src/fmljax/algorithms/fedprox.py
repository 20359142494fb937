"""FedProx: Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith, 2020, "Federated Optimization in
Heterogeneous Networks", MLSys.

Each client minimises its local objective plus a proximal term that keeps it near the
server's model ``w_t``: ``h_k(w) = F_k(w) + (mu / 2) ||w - w_t||^2`` (the paper's eq. 2),
here by FedAvg's local solver (``local_steps`` full-batch SGD steps on the round's tasks, see
:mod:`fmljax.algorithms.fedavg`); stragglers' partial work (``RoundConfig.straggler_prob``)
is aggregated, the paper's "variable amounts of work". ``mu = 0`` is FedAvg exactly; the
reference implementation (``litian96/FedProx``) defaults ``--mu`` to 0, and so does this
builder; the paper tunes mu in {0.001, 0.01, 0.1, 1}.

``fmljax.build("fedprox", loss_fn, sample_task, config, mu=0.01)``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fmljax.algorithms import fedavg
from fmljax.rounds import AlgorithmSpec

__all__ = ["build", "check_mu"]


def check_mu(mu: Any) -> float:
    """``mu`` as a Python float; ValueError naming ``mu`` and the range unless it is a finite
    real number >= 0 (not a bool)."""
    ok = isinstance(mu, int | float | np.integer | np.floating) and not isinstance(
        mu, bool | np.bool_
    )
    try:
        ok = ok and math.isfinite(float(mu)) and float(mu) >= 0
    except OverflowError:
        ok = False
    if not ok:
        raise ValueError(
            f"fedprox: mu={mu!r} is invalid: must be a finite number >= 0 (the weight of the "
            "proximal term (mu / 2) ||w - w_t||^2; 0 is FedAvg)"
        )
    return float(mu)


def build(
    loss_fn, sample_task, config, *, mu: float = 0.0, fine_tune: bool = False,
    adapt_mask: Any = None,
) -> AlgorithmSpec:  # fmt: skip
    """FedProx's parts: FedAvg's client with the proximal term of weight ``mu`` (a finite
    float >= 0), FedAvg's aggregation, server step and personalisation (``fine_tune``)."""
    from fmljax.federated import _check_fine_tune

    mu = check_mu(mu)
    _check_fine_tune(bool(fine_tune), config, "RoundConfig.", "fine_tune", "fedprox")
    return AlgorithmSpec(
        fedavg.local_sgd_client(loss_fn, sample_task, config, mu=mu),
        fedavg.personalization(loss_fn, config, bool(fine_tune), adapt_mask),
    )
