"""Synthetic(alpha, beta) against the definition of FedProx's generator (fmljax.data.synthetic)."""

from __future__ import annotations

import numpy as np
import pytest

from fmljax.data.synthetic import VARIANTS, generate_synthetic, synthetic_federated


def reference(alpha, beta, num_users, seed, iid=False, multiplier=1):
    """The official generator's procedure, step by step in its draw order (loop form)."""
    np.random.seed(seed)
    d, k = 60, 10
    samples = (np.random.lognormal(4, 2, num_users).astype(int) + 50) * multiplier
    mean_w = np.random.normal(0, alpha, num_users)
    mean_b = mean_w
    b_user = np.random.normal(0, beta, num_users)
    mean_x = np.zeros((num_users, d))
    cov_x = np.diag([(j + 1) ** -1.2 for j in range(d)])
    for i in range(num_users):
        mean_x[i] = np.ones(d) * b_user[i] if iid else np.random.normal(b_user[i], 1, d)
    if iid:
        w_global = np.random.normal(0, 1, (d, k))
        b_global = np.random.normal(0, 1, k)
    xs, ys = [], []
    for i in range(num_users):
        w = np.random.normal(mean_w[i], 1, (d, k))
        b = np.random.normal(mean_b[i], 1, k)
        if iid:
            w, b = w_global, b_global
        xx = np.random.multivariate_normal(mean_x[i], cov_x, samples[i])
        yy = np.zeros(samples[i])
        for j in range(samples[i]):
            logits = np.dot(xx[j], w) + b
            e = np.exp(logits - logits.max())
            yy[j] = np.argmax(e / e.sum())
        xs.append(xx)
        ys.append(yy)
    return samples, xs, ys


# Tolerances of the comparison with the generator's procedure. The sample counts are the same
# computation on both sides (RandomState's lognormal, libm, a cast): compared exactly. The
# inputs x are not: multivariate_normal transforms
# the same standard normals through LAPACK's SVD of the covariance and a BLAS product, whose
# rounding depends on the CPU's kernels, and the covariance itself is built with np.power
# here and with Python's ** there (numpy's SIMD power may differ by one ulp). On an Intel
# Xeon 561 of 120,180 values differed by one ulp (2.2e-16, values of order 1). X_RTOL leaves
# four orders of magnitude above that, and is far below what one draw out of order gives
# (an O(1) difference). The labels are an argmax of x @ W + b: a one-ulp change of x can
# flip it only where the two largest logits are nearly tied, so labels are compared exactly
# wherever that margin exceeds LABEL_MARGIN (x's error times |W| summed over 60 inputs is
# below 1e-12 here).
X_RTOL, X_ATOL = 1e-12, 1e-12
LABEL_MARGIN = 1e-9


@pytest.mark.parametrize("alpha,beta,iid", [(0.5, 0.5, False), (1.0, 1.0, False), (0, 0, True)])
def test_against_the_generator_procedure(alpha, beta, iid):
    n, xs, ys = reference(alpha, beta, 6, seed=3, iid=iid)
    gen = generate_synthetic(alpha, beta, num_clients=6, seed=3, iid=iid)
    np.testing.assert_array_equal(gen.num_samples, n)
    for a, b in zip(gen.x, xs, strict=True):
        np.testing.assert_allclose(a, b, rtol=X_RTOL, atol=X_ATOL)
    for x, y, w, b, y_ref in zip(gen.x, gen.y, gen.W, gen.b, ys, strict=True):
        logits = np.sort(x @ w + b, axis=1)
        clear = logits[:, -1] - logits[:, -2] > LABEL_MARGIN
        assert clear.mean() > 0.99  # nearly every label is far from a tie
        np.testing.assert_array_equal(y[clear], y_ref.astype(int)[clear])


def test_counts_labels_and_covariance():
    gen = generate_synthetic(1.0, 1.0, seed=0)
    assert len(gen.x) == 30 and gen.W.shape == (30, 60, 10) and gen.b.shape == (30, 10)
    rs = np.random.RandomState(0)
    np.testing.assert_array_equal(gen.num_samples, rs.lognormal(4, 2, 30).astype(int) + 50)
    assert gen.num_samples.min() >= 50
    for x, y, w, b, n in zip(gen.x, gen.y, gen.W, gen.b, gen.num_samples, strict=True):
        assert x.shape == (n, 60) and y.shape == (n,)
        # The generator's own expression on the same arrays: exact by construction.
        np.testing.assert_array_equal(y, np.argmax(x @ w + b, axis=1))
    assert set(np.concatenate(gen.y).tolist()) == set(range(10))
    # x ~ N(v_k, diag(j^-1.2)): per-coordinate variance of the largest device
    big = int(np.argmax(gen.num_samples))
    var = gen.x[big].var(axis=0)
    target = np.arange(1, 61) ** -1.2
    assert gen.num_samples[big] > 1000
    assert np.max(np.abs(var / target - 1)) < 0.25
    np.testing.assert_allclose(gen.x[big].mean(0), gen.v[big], atol=4 * np.sqrt(1 / 1000))


def test_alpha_beta_are_standard_deviations_and_zero_means_one_prior():
    same = generate_synthetic(0.0, 0.0, seed=1)
    assert np.all(same.u == 0) and np.all(same.B == 0)
    # every device's W_k, b_k ~ N(0, 1): device means agree up to sampling noise 1/sqrt(610)
    means0 = np.concatenate([same.W.reshape(30, -1), same.b], axis=1).mean(1)
    assert np.std(means0) < 3 / np.sqrt(610)
    assert np.std(same.v.mean(1)) < 3 / np.sqrt(60)
    spread = generate_synthetic(1.0, 1.0, seed=1)
    means1 = np.concatenate([spread.W.reshape(30, -1), spread.b], axis=1).mean(1)
    np.testing.assert_allclose(means1, spread.u, atol=4 / np.sqrt(610))
    assert 0.5 < np.std(spread.u) < 1.6 and 0.5 < np.std(spread.B) < 1.6  # sd 1, 30 draws
    iid = generate_synthetic(0.0, 0.0, seed=1, iid=True, num_clients=3)
    assert np.all(iid.W == iid.W[0]) and np.all(iid.b == iid.b[0])


def test_pfedme_variant_five_times_the_samples():
    assert VARIANTS["pfedme"][:2] == (100, 5)
    gen = generate_synthetic(0.5, 0.5, variant="pfedme", num_clients=4, seed=0)
    rs = np.random.RandomState(0)
    np.testing.assert_array_equal(gen.num_samples, (rs.lognormal(4, 2, 4).astype(int) + 50) * 5)
    fed = synthetic_federated(0.5, 0.5, variant="pfedme", num_clients=4, seed=0)
    np.testing.assert_array_equal(fed["num_examples"], (0.75 * gen.num_samples).astype(int))


def test_federated_padded_layout():
    gen = generate_synthetic(0.5, 0.5, num_clients=8, seed=2)
    fed = synthetic_federated(0.5, 0.5, num_clients=8, seed=2)
    n = gen.num_samples
    n_train = (0.9 * n).astype(int)
    m = fed["train"]["x"].shape[1]
    assert fed["train"]["x"].shape == (8, n_train.max(), 60) and m == n_train.max()
    assert fed["test"]["y"].shape == (8, (n - n_train).max())
    assert str(fed["train"]["y"].dtype) == "int32" and str(fed["train"]["x"].dtype) == "float32"
    np.testing.assert_array_equal(np.asarray(fed["train"]["mask"]).sum(1), n_train)
    np.testing.assert_array_equal(np.asarray(fed["test"]["mask"]).sum(1), n - n_train)
    np.testing.assert_array_equal(fed["num_examples"], n_train)
    tr_x, te_x = np.asarray(fed["train"]["x"]), np.asarray(fed["test"]["x"])
    for c in range(8):
        real = tr_x[c, : n_train[c]]
        test = te_x[c, : n[c] - n_train[c]]
        allx = np.concatenate([real, test])
        # train + test is a permutation of the device's examples, no overlap
        assert sorted(map(tuple, allx.round(5))) == sorted(
            map(tuple, gen.x[c].astype(np.float32).round(5))
        )
        assert np.all(tr_x[c, n_train[c] :] == 0)
    capped = synthetic_federated(0.5, 0.5, num_clients=8, seed=2, max_examples=60)
    assert capped["train"]["x"].shape[1] <= 54


def test_error_bad_variant_and_parameters():
    with pytest.raises(ValueError, match=r"variant='leaf' is not known; allowed: 'fedprox', 'p"):
        generate_synthetic(1, 1, variant="leaf")
    with pytest.raises(ValueError, match=r"alpha=-1 must be >= 0 \(a standard deviation\)"):
        generate_synthetic(-1, 1)
    with pytest.raises(ValueError, match=r"train_fraction=1.5 must be in \(0, 1\)"):
        synthetic_federated(1, 1, num_clients=2, train_fraction=1.5)
