"""Synthetic(alpha, beta): the federated classification benchmark of FedProx.

Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith, 2020, "Federated Optimization in Heterogeneous
Networks" (MLSys), section 5.1, as the official generator ``litian96/FedProx``
``data/synthetic_*/generate_synthetic.py`` makes it (a setup after Shamir, Srebro & Zhang,
2014): for device k = 1..C,

* sample count ``n_k = floor(LogNormal(4, 2)) + 50``;
* ``u_k ~ N(0, alpha)``, ``B_k ~ N(0, beta)`` (alpha, beta are standard deviations, as the code
  calls ``np.random.normal(0, alpha, C)``);
* ``v_k ~ N(B_k, 1)`` per coordinate (d = 60), ``Sigma = diag(j^-1.2)``, ``x ~ N(v_k, Sigma)``;
* ``W_k ~ N(u_k, 1)`` (d x 10), ``b_k ~ N(u_k, 1)`` (10): the official code uses ``mean_b =
  mean_W``, one ``u_k`` for both;
* ``y = argmax(x W_k + b_k)`` (the code's ``argmax(softmax(.))``, the same).

``iid=True`` is the generator's ``synthetic_iid``: ``v_k = B_k`` (all coordinates) and one
global ``W, b ~ N(0, 1)`` for all devices (the per-device ``W_k, b_k`` are still drawn, then
discarded, so the random stream is the official one).

The draws are made with ``numpy.random.RandomState(seed)`` in the official order, so for the
same seed the counts, features, labels and parameters equal those of the official script (the
official FedProx scripts set no seed; pFedMe's use ``np.random.seed(0)``). Then each device's
examples are shuffled with ``RandomState(seed + 1)`` (the official script shuffles with
Python's unseeded ``random``) and the first ``int(train_fraction * n_k)`` become train: 0.9
for FedProx (30 devices) as in its script. Variant ``'pfedme'`` (Dinh, Tran & Nguyen, 2020,
"Personalized Federated Learning with Moreau Envelopes", ``generate_synthetic_05_05.py``) has
100 users and ``5 * n_k`` samples, with pFedMe's 75/25 split.

Generated host-side once, then held as padded device arrays with masks (see
:func:`fmljax.data.partition.federate`'s layout).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from fmljax.data.partition import pad_clients

__all__ = [
    "VARIANTS",
    "SyntheticClients",
    "generate_synthetic",
    "synthetic_federated",
]

VARIANTS = {
    # name: (default clients, sample multiplier, default train fraction)
    "fedprox": (30, 1, 0.9),
    "pfedme": (100, 5, 0.75),
}
DIMENSION = 60
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class SyntheticClients:
    """The generator's output, per device k = 0..C-1 (host numpy).

    ``x[k]``: ``[n_k, 60]`` float64; ``y[k]``: ``[n_k]`` int64 in 0..9; ``num_samples``
    ``[C]``; parameters ``u`` ``[C]`` (mean of W_k and b_k), ``B`` ``[C]``, ``v`` ``[C, 60]``
    (mean of x), ``W`` ``[C, 60, 10]`` and ``b`` ``[C, 10]`` (the ones that labelled x).
    """

    x: list[np.ndarray]
    y: list[np.ndarray]
    num_samples: np.ndarray
    u: np.ndarray
    B: np.ndarray
    v: np.ndarray
    W: np.ndarray
    b: np.ndarray


def _variant(variant: str) -> tuple[int, int, float]:
    if variant not in VARIANTS:
        raise ValueError(
            f"variant={variant!r} is not known; allowed: {', '.join(map(repr, VARIANTS))}"
        )
    return VARIANTS[variant]


def generate_synthetic(
    alpha: float,
    beta: float,
    *,
    num_clients: int | None = None,
    variant: str = "fedprox",
    iid: bool = False,
    seed: int = 0,
) -> SyntheticClients:
    """Draw Synthetic(alpha, beta) exactly as the official generator (module docstring)."""
    default_clients, multiplier, _ = _variant(variant)
    c = default_clients if num_clients is None else num_clients
    if not isinstance(c, (int, np.integer)) or c < 1:
        raise ValueError(f"num_clients={num_clients!r} must be an integer >= 1")
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not value >= 0:
            raise ValueError(f"{name}={value!r} must be >= 0 (a standard deviation)")
    rs = np.random.RandomState(seed)
    d, k = DIMENSION, NUM_CLASSES
    counts = (rs.lognormal(4, 2, c).astype(int) + 50) * multiplier
    mean_w = rs.normal(0, alpha, c)
    big_b = rs.normal(0, beta, c)
    cov = np.diag(np.power(np.arange(1, d + 1, dtype=np.float64), -1.2))
    if iid:
        v = np.ones((c, d)) * big_b[:, None]
        w_global = rs.normal(0, 1, (d, k))
        b_global = rs.normal(0, 1, k)
    else:
        v = np.stack([rs.normal(big_b[i], 1, d) for i in range(c)])
    xs, ys, ws, bs = [], [], [], []
    for i in range(c):
        w = rs.normal(mean_w[i], 1, (d, k))
        b = rs.normal(mean_w[i], 1, k)
        if iid:
            w, b = w_global, b_global
        x = rs.multivariate_normal(v[i], cov, counts[i])
        xs.append(x)
        ys.append(np.argmax(x @ w + b, axis=1))
        ws.append(w)
        bs.append(b)
    return SyntheticClients(
        x=xs, y=ys, num_samples=counts, u=mean_w, B=big_b, v=v, W=np.stack(ws), b=np.stack(bs)
    )


def synthetic_federated(
    alpha: float,
    beta: float,
    *,
    num_clients: int | None = None,
    variant: str = "fedprox",
    iid: bool = False,
    seed: int = 0,
    train_fraction: float | None = None,
    max_examples: int | None = None,
) -> dict[str, Any]:
    """Synthetic(alpha, beta) as a padded federated dataset of device arrays.

    ``{'train': {'x': [C, M, 60], 'y': [C, M] int32, 'mask': [C, M]}, 'test': {...},
    'num_examples': [C]}``. ``train_fraction``: default 0.9 (``'fedprox'``) or 0.75
    (``'pfedme'``). ``max_examples`` (default: none) keeps only the first ``max_examples``
    (shuffled) examples of a device, a memory cap that departs from the paper: log-normal
    counts reach ~25,000 for one pFedMe device, and every device is padded to the largest.
    """
    _, _, default_fraction = _variant(variant)
    fraction = default_fraction if train_fraction is None else train_fraction
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"train_fraction={train_fraction!r} must be in (0, 1)")
    if max_examples is not None and max_examples < 2:
        raise ValueError(f"max_examples={max_examples!r} must be >= 2 (one train, one test)")
    gen = generate_synthetic(
        alpha, beta, num_clients=num_clients, variant=variant, iid=iid, seed=seed
    )
    rs = np.random.RandomState(seed + 1)
    tr_x, tr_y, te_x, te_y = [], [], [], []
    for x, y in zip(gen.x, gen.y, strict=True):
        perm = rs.permutation(len(x))[:max_examples]
        n_train = int(fraction * len(perm))
        tr_x.append(x[perm[:n_train]])
        tr_y.append(y[perm[:n_train]])
        te_x.append(x[perm[n_train:]])
        te_y.append(y[perm[n_train:]])
    return {
        "train": pad_clients(tr_x, tr_y),
        "test": pad_clients(te_x, te_y),
        "num_examples": jnp.asarray([len(t) for t in tr_y], jnp.float32),
    }
