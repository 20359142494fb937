"""Federated partitions of labelled arrays, padding with masks, and per-round client sampling.

* Dirichlet(alpha) label skew: for each class, the proportions of its examples that go to the
  C clients are drawn from ``Dir(alpha * 1_C)`` (Hsu, Qi & Brown, 2019, "Measuring the Effects
  of Non-Identical Data Distribution for Federated Visual Classification"; Yurochkin et al.,
  2019). Small alpha: few classes per client; large alpha: close to IID.
* Pathological non-IID: each client holds exactly ``s`` classes (after McMahan et al., 2017,
  "Communication-Efficient Learning of Deep Networks from Decentralized Data", whose
  sort-and-shard split gives at most 2 classes per client).
* IID: a uniform random split into near-equal parts.

Each client's examples are then split into train and test (75/25 by default, ``int(0.75 *
n)`` train as in pFedMe's generators), and the clients are padded to a common length M with
``'mask'`` (1.0 real, 0.0 padding) so that one compiled round serves clients of any size.

A federated labelled dataset (:func:`federate`) is a dict of device arrays with leading axis C::

    {'train': {'x': [C, M, ...] float32, 'y': [C, M] int32, 'mask': [C, M] float32},
     'test':  {'x': [C, M', ...], 'y': [C, M'], 'mask': [C, M']},
     'num_examples': [C] float32}            # real train examples: the aggregation weight

``'test'`` is each client's held-out split: training rounds never read it, and
:func:`fmljax.data.client_batch_sampler`'s evaluation sampler (what ``evaluate`` of
:func:`fmljax.build` uses by default) adapts on ``'train'`` and scores ``'test'``.

Client sampling per round (:func:`sample_clients`) is a pure function of (seed, round), so a
resumed run samples the same clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "PARTITIONS",
    "dirichlet_partition",
    "federate",
    "iid_partition",
    "pad_clients",
    "partition_labels",
    "pathological_partition",
    "sample_clients",
    "split_clients",
]

PARTITIONS = ("dirichlet", "pathological", "iid")


def _check_clients(num_clients: int, n: int, where: str) -> None:
    if not isinstance(num_clients, (int, np.integer)) or not 1 <= num_clients <= n:
        raise ValueError(
            f"{where}: num_clients={num_clients!r} must be an integer between 1 and the {n} "
            "examples"
        )


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    *,
    seed: int = 0,
    min_examples: int = 2,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Dirichlet(alpha) label split: per class, client shares ``~ Dir(alpha * 1_C)``.

    Redrawn (up to ``max_tries`` times) until every client holds at least ``min_examples``
    examples. Returns C sorted index arrays into ``labels`` (disjoint, covering all).
    """
    labels = np.asarray(labels)
    _check_clients(num_clients, len(labels), "dirichlet_partition")
    if not alpha > 0:
        raise ValueError(f"dirichlet_partition: alpha={alpha!r} must be > 0")
    if min_examples * num_clients > len(labels):
        raise ValueError(
            f"dirichlet_partition: min_examples={min_examples} x num_clients={num_clients} is "
            f"more than the {len(labels)} examples"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for k in classes:
            idx = rng.permutation(np.flatnonzero(labels == k))
            shares = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for c, piece in enumerate(np.split(idx, cuts)):
                parts[c].append(piece)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(o) for o in out) >= min_examples:
            return out
    raise ValueError(
        f"dirichlet_partition: no draw in {max_tries} gave every one of num_clients="
        f"{num_clients} clients min_examples={min_examples} examples at alpha={alpha}; "
        "raise alpha or lower num_clients / min_examples"
    )


def pathological_partition(
    labels: np.ndarray, num_clients: int, classes_per_client: int, *, seed: int = 0
) -> list[np.ndarray]:
    """Each client holds exactly ``classes_per_client`` (s) distinct classes.

    The classes are shuffled and dealt round-robin (client i gets shuffled classes ``i*s ..
    i*s + s - 1`` modulo the number of classes L), so every class is used about equally; each
    class's examples are split evenly among the clients that hold it.
    """
    labels = np.asarray(labels)
    _check_clients(num_clients, len(labels), "pathological_partition")
    classes = np.unique(labels)
    if not isinstance(classes_per_client, (int, np.integer)) or not (
        1 <= classes_per_client <= len(classes)
    ):
        raise ValueError(
            f"pathological_partition: classes_per_client={classes_per_client!r} must be between "
            f"1 and the {len(classes)} classes present"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    holders: dict[Any, list[int]] = {k: [] for k in classes}
    for c in range(num_clients):
        for j in range(classes_per_client):
            holders[order[(c * classes_per_client + j) % len(classes)]].append(c)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for k, who in holders.items():
        if not who:
            continue
        idx = rng.permutation(np.flatnonzero(labels == k))
        if len(idx) < len(who):
            raise ValueError(
                f"pathological_partition: class {k} has {len(idx)} examples for {len(who)} "
                "clients; lower num_clients or classes_per_client"
            )
        for c, piece in zip(who, np.array_split(idx, len(who)), strict=True):
            parts[c].append(piece)
    return [np.sort(np.concatenate(p)) for p in parts]


def iid_partition(n: int, num_clients: int, *, seed: int = 0) -> list[np.ndarray]:
    """A uniform random split of ``range(n)`` into ``num_clients`` near-equal parts."""
    _check_clients(num_clients, n, "iid_partition")
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def partition_labels(
    labels: np.ndarray,
    num_clients: int,
    partition: str = "dirichlet",
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    seed: int = 0,
    min_examples: int = 2,
) -> list[np.ndarray]:
    """Dispatch by name: ``'dirichlet'`` (``alpha``), ``'pathological'``
    (``classes_per_client``) or ``'iid'``."""
    if partition == "dirichlet":
        return dirichlet_partition(labels, num_clients, alpha, seed=seed, min_examples=min_examples)
    if partition == "pathological":
        return pathological_partition(labels, num_clients, classes_per_client, seed=seed)
    if partition == "iid":
        return iid_partition(len(labels), num_clients, seed=seed)
    raise ValueError(
        f"partition={partition!r} is not known; allowed: {', '.join(map(repr, PARTITIONS))}"
    )


def split_clients(
    client_indices: Sequence[np.ndarray], *, test_fraction: float = 0.25, seed: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per client: shuffle, first ``int((1 - test_fraction) * n)`` train, the rest test."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} must be in (0, 1)")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c, idx in enumerate(client_indices):
        idx = rng.permutation(np.asarray(idx))
        n_train = int((1.0 - test_fraction) * len(idx))
        if not 1 <= n_train < len(idx):
            raise ValueError(
                f"client {c} has {len(idx)} examples: test_fraction={test_fraction} leaves "
                f"{n_train} for training; every client needs at least one train and one test "
                "example"
            )
        train.append(idx[:n_train])
        test.append(idx[n_train:])
    return train, test


def pad_clients(
    xs: Sequence[np.ndarray], ys: Sequence[np.ndarray], *, length: int | None = None
) -> dict[str, jax.Array]:
    """Stack unequal clients into ``{'x': [C, M, ...], 'y': [C, M], 'mask': [C, M]}``.

    ``M = length`` or the largest client; client c's examples come first, padding (x = 0,
    y = 0, mask = 0) after. ``y`` keeps a float dtype (regression) or becomes int32.
    """
    if len(xs) != len(ys) or not xs:
        raise ValueError(
            f"pad_clients: need as many x as y arrays (>= 1); got {len(xs)}, {len(ys)}"
        )
    sizes = [len(x) for x in xs]
    m = max(sizes) if length is None else length
    if m < max(sizes):
        raise ValueError(f"pad_clients: length={length} is below the largest client ({max(sizes)})")
    feat = np.asarray(xs[0]).shape[1:]
    y0 = np.asarray(ys[0])
    y_dtype = y0.dtype if np.issubdtype(y0.dtype, np.floating) else np.int32
    x = np.zeros((len(xs), m) + feat, np.float32)
    y = np.zeros((len(xs), m) + y0.shape[1:], y_dtype)
    mask = np.zeros((len(xs), m), np.float32)
    for c, (xc, yc) in enumerate(zip(xs, ys, strict=True)):
        xc, yc = np.asarray(xc), np.asarray(yc)
        if xc.shape[1:] != feat or len(xc) != len(yc):
            raise ValueError(
                f"pad_clients: client {c} has x {xc.shape} and y {yc.shape}; expected x "
                f"[n, {', '.join(map(str, feat))}] and y [n]"
            )
        x[c, : len(xc)] = xc
        y[c, : len(yc)] = yc
        mask[c, : len(xc)] = 1.0
    return {"x": jnp.asarray(x), "y": jnp.asarray(y), "mask": jnp.asarray(mask)}


def federate(
    x: np.ndarray,
    y: np.ndarray,
    client_indices: Sequence[np.ndarray],
    *,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> dict[str, Any]:
    """Build the padded federated dataset (layout in the module docstring) from index lists.

    Raises ValueError if clients overlap (an example in two clients) or a client is too small
    to hold one train and one test example.
    """
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise ValueError(f"federate: x has {len(x)} examples but y has {len(y)}")
    everything = np.concatenate([np.asarray(i) for i in client_indices])
    if len(np.unique(everything)) != len(everything):
        raise ValueError("federate: client index sets overlap; clients must be disjoint")
    train, test = split_clients(client_indices, test_fraction=test_fraction, seed=seed)
    return {
        "train": pad_clients([x[i] for i in train], [y[i] for i in train]),
        "test": pad_clients([x[i] for i in test], [y[i] for i in test]),
        "num_examples": jnp.asarray([len(i) for i in train], jnp.float32),
    }


def sample_clients(
    seed_or_key: int | jax.Array,
    round: int | jax.Array,
    num_clients: int,
    clients_per_round: int,
    *,
    weights: jax.Array | None = None,
) -> jax.Array:
    """The clients of round ``round``: ``clients_per_round`` distinct ids in ``[0, C)``, int32.

    A pure function of ``(seed_or_key, round)`` (the key is ``fold_in(key, round)``), so a run
    resumed at round r samples what the uninterrupted run sampled; jittable with ``round``
    traced. ``weights`` (e.g. ``num_examples``): sample without replacement with probability
    proportional to them; default uniform.
    """
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"sample_clients: num_clients={num_clients!r} must be an integer >= 1")
    if not isinstance(clients_per_round, (int, np.integer)) or not (
        1 <= clients_per_round <= num_clients
    ):
        raise ValueError(
            f"sample_clients: clients_per_round={clients_per_round!r} must be between 1 and "
            f"num_clients={num_clients}"
        )
    key = seed_or_key
    if isinstance(key, (int, np.integer)) or (
        jnp.ndim(key) == 0 and jnp.issubdtype(jnp.result_type(key), jnp.integer)
    ):
        key = jax.random.key(key)  # an integer seed (Python int or a traced scalar)
    key = jax.random.fold_in(key, round)
    p = None if weights is None else jnp.asarray(weights, jnp.float32) / jnp.sum(weights)
    ids = jax.random.choice(key, num_clients, (clients_per_round,), replace=False, p=p)
    return ids.astype(jnp.int32)
