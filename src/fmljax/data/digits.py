"""Handwritten digits from scikit-learn's bundled ``load_digits`` as a small federated image set.

The UCI "Optical Recognition of Handwritten Digits" test set (Alpaydin & Kaynak, 1998): 1,797
real 8x8 scans of digits 0..9 (32x32 bitmaps counted in 4x4 blocks, values 0..16), shipped
inside scikit-learn, so nothing is downloaded. Images are returned NHWC float32 ``[n, 8, 8, 1]``
scaled to [0, 1] (value / 16), labels int32.

:func:`digits_federated` splits them over clients by label (Dirichlet(alpha), pathological s
classes per client, or IID; see :mod:`fmljax.data.partition`), each client 75/25 train/test
by default, padded with masks to one shape.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fmljax.data.partition import federate, partition_labels

__all__ = ["digits_federated", "load_digits_images"]


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """``(x [1797, 8, 8, 1] float32 in [0, 1], y [1797] int32)`` from scikit-learn."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[..., None]
    return x, bunch.target.astype(np.int32)


def digits_federated(
    num_clients: int = 10,
    *,
    partition: str = "dirichlet",
    alpha: float = 0.5,
    classes_per_client: int = 2,
    test_fraction: float = 0.25,
    seed: int = 0,
    min_examples: int = 8,
) -> dict[str, Any]:
    """Digits split over ``num_clients`` clients (layout of :func:`fmljax.data.partition.
    federate`): ``{'train': {'x': [C, M, 8, 8, 1], 'y', 'mask'}, 'test': {...},
    'num_examples': [C]}``.

    ``partition``: ``'dirichlet'`` (``alpha``; redrawn until each client has ``min_examples``),
    ``'pathological'`` (``classes_per_client``) or ``'iid'``.
    """
    x, y = load_digits_images()
    parts = partition_labels(
        y,
        num_clients,
        partition,
        alpha=alpha,
        classes_per_client=classes_per_client,
        seed=seed,
        min_examples=min_examples,
    )
    return federate(x, y, parts, test_fraction=test_fraction, seed=seed)
