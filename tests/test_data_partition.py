"""Label partitions, padding with masks, client sampling, and the digits set."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from fmljax.data.digits import digits_federated, load_digits_images
from fmljax.data.partition import (
    dirichlet_partition,
    federate,
    iid_partition,
    pad_clients,
    partition_labels,
    pathological_partition,
    sample_clients,
    split_clients,
)

LABELS = np.repeat(np.arange(10), 60)  # 600 examples, 10 classes


def classes_per_client(parts, labels=LABELS):
    return [len(np.unique(labels[p])) for p in parts]


def assert_disjoint_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n and len(np.unique(allidx)) == n


def test_dirichlet_skew_grows_as_alpha_shrinks():
    skewed = dirichlet_partition(LABELS, 10, 0.1, seed=0)
    flat = dirichlet_partition(LABELS, 10, 100.0, seed=0)
    assert_disjoint_cover(skewed, 600)
    assert_disjoint_cover(flat, 600)
    assert min(len(p) for p in skewed) >= 2
    assert np.mean(classes_per_client(skewed)) < 6 < np.mean(classes_per_client(flat))
    # near-IID at large alpha: each client's label histogram close to uniform
    hist = np.stack([np.bincount(LABELS[p], minlength=10) / len(p) for p in flat])
    assert np.abs(hist - 0.1).max() < 0.08
    again = dirichlet_partition(LABELS, 10, 0.1, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(skewed, again, strict=True))


def test_pathological_exactly_s_classes():
    parts = pathological_partition(LABELS, 10, 2, seed=0)
    assert_disjoint_cover(parts, 600)
    assert classes_per_client(parts) == [2] * 10
    parts3 = pathological_partition(LABELS, 7, 3, seed=1)
    assert classes_per_client(parts3) == [3] * 7
    assert sorted(len(p) for p in iid_partition(600, 7)) == [85] * 2 + [86] * 5


def test_split_clients_75_25():
    parts = iid_partition(600, 6, seed=0)
    train, test = split_clients(parts, seed=0)
    for p, tr, te in zip(parts, train, test, strict=True):
        assert len(tr) == int(0.75 * len(p)) and not set(tr) & set(te)
        assert set(tr) | set(te) == set(p.tolist())


def test_federate_pads_with_masks_and_keeps_rows():
    x = np.arange(50, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    y = np.arange(50) % 4
    parts = [np.arange(0, 8), np.arange(8, 12), np.arange(12, 50)]
    fed = federate(x, y, parts, seed=0)
    assert fed["train"]["x"].shape == (3, 28, 3) and fed["test"]["x"].shape == (3, 10, 3)
    np.testing.assert_array_equal(fed["num_examples"], [6, 3, 28])
    mask, tx = np.asarray(fed["train"]["mask"]), np.asarray(fed["train"]["x"])
    np.testing.assert_array_equal(mask.sum(1), [6, 3, 28])
    for c, p in enumerate(parts):
        rows = tx[c][mask[c] == 1][:, 0].astype(int)
        test_rows = np.asarray(fed["test"]["x"][c])[np.asarray(fed["test"]["mask"][c]) == 1]
        assert set(rows) | set(test_rows[:, 0].astype(int)) == set(p.tolist())
        assert not set(rows) & set(test_rows[:, 0].astype(int))
        np.testing.assert_array_equal(np.asarray(fed["train"]["y"][c])[mask[c] == 1], y[rows])
        assert np.all(tx[c][mask[c] == 0] == 0)
    assert str(fed["train"]["y"].dtype) == "int32"


def test_sample_clients_pure_function_of_seed_and_round():
    a = sample_clients(7, 3, 20, 5)
    assert a.shape == (5,) and str(a.dtype) == "int32" and len(set(np.asarray(a))) == 5
    np.testing.assert_array_equal(a, sample_clients(7, 3, 20, 5))
    jitted = jax.jit(sample_clients, static_argnums=(2, 3))
    np.testing.assert_array_equal(a, jitted(7, 3, 20, 5))
    rounds = np.stack([np.asarray(jitted(7, r, 20, 5)) for r in range(10)])
    assert len({tuple(r) for r in rounds}) > 5  # rounds differ
    np.testing.assert_array_equal(rounds[3], a)  # a resumed run at round 3 matches
    assert not np.array_equal(sample_clients(8, 3, 20, 5), a)
    weights = np.zeros(20)
    weights[[2, 11, 17]] = 1.0
    w = sample_clients(0, 0, 20, 3, weights=weights)
    assert sorted(np.asarray(w).tolist()) == [2, 11, 17]


def test_digits_images_and_federation():
    x, y = load_digits_images()
    assert x.shape == (1797, 8, 8, 1) and x.dtype == np.float32
    assert 0.0 == x.min() and x.max() == 1.0 and set(np.unique(y)) == set(range(10))
    fed = digits_federated(8, partition="pathological", classes_per_client=2, seed=0)
    assert fed["train"]["x"].shape[0] == 8 and fed["train"]["x"].shape[2:] == (8, 8, 1)
    for c in range(8):
        m = np.asarray(fed["train"]["mask"][c]) == 1
        assert len(np.unique(np.asarray(fed["train"]["y"][c])[m])) == 2
    fed_d = digits_federated(8, partition="dirichlet", alpha=0.3, seed=0)
    sizes = np.asarray(fed_d["train"]["mask"]).sum(1) + np.asarray(fed_d["test"]["mask"]).sum(1)
    assert sizes.sum() == 1797 and len(set(sizes.tolist())) > 1  # unequal clients


# ---------------------------------------------------------------------------- bad input


def test_error_unknown_partition():
    with pytest.raises(ValueError, match=r"partition='shards' is not known; allowed: 'dirich"):
        partition_labels(LABELS, 4, "shards")


def test_error_more_classes_per_client_than_classes():
    with pytest.raises(
        ValueError, match=r"classes_per_client=11 must be between 1 and the 10 classes"
    ):
        pathological_partition(LABELS, 4, 11)


def test_error_bad_alpha_and_client_counts():
    with pytest.raises(ValueError, match=r"alpha=0 must be > 0"):
        dirichlet_partition(LABELS, 4, 0)
    with pytest.raises(ValueError, match=r"clients_per_round=6 must be between 1 and num_cli"):
        sample_clients(0, 0, 5, 6)
    with pytest.raises(ValueError, match=r"num_clients=601 must be an integer between 1 and"):
        iid_partition(600, 601)


def test_error_client_too_small_for_a_test_split():
    with pytest.raises(ValueError, match=r"client 1 has 1 examples: test_fraction=0.25 leaves 0"):
        split_clients([np.arange(10), np.arange(10, 11)])
    with pytest.raises(ValueError, match=r"client index sets overlap"):
        federate(np.zeros((10, 2)), np.zeros(10), [np.arange(6), np.arange(4, 10)])
    with pytest.raises(ValueError, match=r"client 1 has x \(3, 4\) and y \(3,\); expected x"):
        pad_clients([np.zeros((2, 3)), np.zeros((3, 4))], [np.zeros(2), np.zeros(3)])
