"""N-way K-shot episodes and client batch samplers (fmljax.data.episodes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmljax.data.episodes import (
    check_episode_config,
    client_batch_sampler,
    episode_task_sampler,
    full_client_task,
    rotate_classes,
    sample_episode,
)

CLASSES, EXAMPLES, HW = 12, 6, 5


def coded_images(classes: int = CLASSES, examples: int = EXAMPLES, hw: int = HW) -> np.ndarray:
    """Constant images whose value is ``100 * class + example + 1`` (rotation invariant)."""
    code = 100 * np.arange(classes)[:, None] + np.arange(examples)[None, :] + 1
    return np.broadcast_to(code[:, :, None, None], (classes, examples, hw, hw)).astype(np.float32)


def decode(x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(x[:, 0, 0, 0]).astype(int) - 1
    return v // 100, v % 100


def test_episode_shapes_labels_distinct_disjoint():
    images = jnp.asarray(coded_images())
    n, k, q = 5, 2, 3
    support, query = jax.jit(lambda key: sample_episode(key, images, ways=n, shots=k, queries=q))(
        jax.random.key(0)
    )
    assert support["x"].shape == (n * k, HW, HW, 1) and support["x"].dtype == jnp.float32
    assert query["x"].shape == (n * q, HW, HW, 1)
    assert support["y"].dtype == jnp.int32 and query["y"].dtype == jnp.int32
    np.testing.assert_array_equal(support["y"], np.repeat(np.arange(n), k))
    np.testing.assert_array_equal(query["y"], np.repeat(np.arange(n), q))
    s_cls, s_ex = decode(support["x"])
    q_cls, q_ex = decode(query["x"])
    # one class per label, distinct classes, the same class for a label in support and query
    label_class = {int(y): set() for y in range(n)}
    for y, c in zip(np.asarray(support["y"]), s_cls, strict=True):
        label_class[int(y)].add(int(c))
    for y, c in zip(np.asarray(query["y"]), q_cls, strict=True):
        label_class[int(y)].add(int(c))
    assert all(len(v) == 1 for v in label_class.values())
    assert len({next(iter(v)) for v in label_class.values()}) == n
    # no query example inside its own support set, no repeated example
    s_items = set(zip(s_cls.tolist(), s_ex.tolist(), strict=True))
    q_items = set(zip(q_cls.tolist(), q_ex.tolist(), strict=True))
    assert len(s_items) == n * k and len(q_items) == n * q
    assert not s_items & q_items


def test_episode_deterministic_and_label_order_shuffled():
    images = jnp.asarray(coded_images())
    sample = jax.jit(lambda key: sample_episode(key, images, ways=4, shots=1, queries=1))
    a = sample(jax.random.key(3))
    b = sample(jax.random.key(3))
    c = sample(jax.random.key(4))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0]["x"], c[0]["x"])
    # over many episodes, which class gets label 0 varies, and is not always the smallest id
    keys = jax.random.split(jax.random.key(5), 200)
    sup, _ = jax.vmap(lambda kk: sample_episode(kk, images, ways=4, shots=1, queries=1))(keys)
    cls = (np.asarray(sup["x"][:, :, 0, 0, 0]).astype(int) - 1) // 100  # [200, 4]
    assert len(set(cls[:, 0].tolist())) == CLASSES
    assert np.mean(cls[:, 0] == cls.min(axis=1)) < 0.5
    # every class is picked about equally often (uniform over classes)
    counts = np.bincount(cls.ravel(), minlength=CLASSES)
    assert counts.min() > 0.5 * counts.mean()


def test_episode_num_classes_restricts_to_real_classes():
    images = jnp.asarray(coded_images())
    keys = jax.random.split(jax.random.key(0), 100)
    fn = jax.vmap(lambda kk: sample_episode(kk, images, ways=3, shots=2, queries=2, num_classes=5))
    sup, qry = fn(keys)
    s_cls, _ = decode(sup["x"].reshape((-1, HW, HW, 1)))
    q_cls, _ = decode(qry["x"].reshape((-1, HW, HW, 1)))
    assert s_cls.max() < 5 and q_cls.max() < 5
    assert set(s_cls.tolist()) == set(range(5))


def test_episode_query_images_held_out():
    train = coded_images()
    held = coded_images() + 50.0  # example codes 50.. mark held-out drawings
    s, q = sample_episode(
        jax.random.key(1),
        jnp.asarray(train),
        ways=3,
        shots=4,
        queries=6,
        query_images=jnp.asarray(held),
    )
    s_cls, s_ex = decode(s["x"])
    q_cls, q_ex = decode(q["x"])
    assert np.all(s_ex < 50) and np.all(q_ex >= 50)
    for y in range(3):
        assert set(s_cls[np.asarray(s["y"]) == y]) == set(q_cls[np.asarray(q["y"]) == y])


def test_maml_rotation_one_turn_per_class_per_task():
    # an asymmetric image: a single ink pixel whose position shows the rotation
    base = np.zeros((CLASSES, EXAMPLES, HW, HW), np.float32)
    base[:, :, 0, 1] = 1.0
    images = jnp.asarray(base)
    turns_seen = set()
    keys = jax.random.split(jax.random.key(0), 20)
    sup, qry = jax.jit(
        jax.vmap(
            lambda kk: sample_episode(kk, images, ways=4, shots=2, queries=2, augmentation="maml")
        )
    )(keys)
    for s, q in zip(np.asarray(sup["x"][..., 0]), np.asarray(qry["x"][..., 0]), strict=True):
        xs = s.reshape(4, 2, HW, HW)
        xq = q.reshape(4, 2, HW, HW)
        for n in range(4):
            imgs = np.concatenate([xs[n], xq[n]])
            turn = [r for r in range(4) if np.array_equal(np.rot90(base[0, 0], r), imgs[0])]
            assert len(turn) == 1
            assert all(np.array_equal(imgs[0], im) for im in imgs)  # same turn, whole class
            turns_seen.add(turn[0])
    assert turns_seen == {0, 1, 2, 3}
    # 'none' leaves the images as stored
    s, _ = sample_episode(jax.random.key(0), images, ways=4, shots=2, queries=2)
    assert np.all(np.asarray(s["x"][..., 0]) == base[0, 0])


def test_rotate_classes_vinyals_expansion():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 2, (3, 2, 4, 4)).astype(np.uint8)
    out = rotate_classes(images)
    assert out.shape == (12, 2, 4, 4)
    for r in range(4):
        for c in range(3):
            np.testing.assert_array_equal(out[r * 3 + c], np.rot90(images[c], r, axes=(1, 2)))


def test_episode_task_sampler_vmaps_over_clients_and_tasks():
    c, t = 3, 4
    images = np.stack([coded_images() + 10000 * i for i in range(c)])
    data = {"images": jnp.asarray(images), "num_classes": jnp.asarray([12, 7, 5], jnp.int32)}
    sampler = episode_task_sampler(ways=5, shots=1, queries=2, augmentation="maml", data=data)
    keys = jax.random.split(jax.random.key(0), (c, t))
    sup, qry = jax.jit(jax.vmap(jax.vmap(sampler, in_axes=(0, None)), in_axes=(0, 0)))(keys, data)
    assert sup["x"].shape == (c, t, 5, HW, HW, 1) and qry["y"].shape == (c, t, 10)
    vals = np.asarray(sup["x"][..., 0, 0, 0]).astype(int) - 1
    client = vals // 10000
    cls = (vals % 10000) // 100
    assert np.all(client == np.arange(c)[:, None, None])
    assert cls[1].max() < 7 and cls[2].max() < 5


# ---------------------------------------------------------------------------- labelled clients


def padded_clients() -> dict:
    """Two clients, 7 and 4 real train examples of an 9-long padded array; x codes (c, i)."""
    m = 9
    x = np.zeros((2, m, 2), np.float32)
    mask = np.zeros((2, m), np.float32)
    for c, n in enumerate((7, 4)):
        x[c, :n, 0] = c
        x[c, :n, 1] = np.arange(n) + 1
        mask[c, :n] = 1
    y = (x[..., 1] % 3).astype(np.int32)
    test = {"x": jnp.full((2, 3, 2), -1.0), "y": jnp.zeros((2, 3), jnp.int32)}
    test["mask"] = jnp.ones((2, 3))
    return {
        "train": {"x": jnp.asarray(x), "y": jnp.asarray(y), "mask": jnp.asarray(mask)},
        "test": test,
        "num_examples": jnp.asarray([7.0, 4.0]),
    }


def test_client_batch_sampler_disjoint_real_train_only():
    data = padded_clients()
    sampler = client_batch_sampler(2, 2, data=data)
    keys = jax.random.split(jax.random.key(0), 50)
    sample_many = jax.jit(jax.vmap(sampler, in_axes=(0, None)))
    for c in range(2):
        client = jax.tree.map(lambda a, c=c: a[c], data)
        sup, qry = sample_many(keys, client)
        assert sup["x"].shape == (50, 2, 2) and qry["mask"].shape == (50, 2)
        assert np.all(np.asarray(sup["mask"]) == 1) and np.all(np.asarray(qry["mask"]) == 1)
        ids_s = np.asarray(sup["x"][..., 1])
        ids_q = np.asarray(qry["x"][..., 1])
        assert np.all(ids_s >= 1) and np.all(ids_q >= 1)  # real train rows, never test (-1)
        for a, b in zip(ids_s, ids_q, strict=True):
            assert not set(a.tolist()) & set(b.tolist()) and len(set(a.tolist())) == 2
        assert np.all(np.asarray(sup["x"][..., 0]) == c)


def test_client_batch_sampler_masks_a_small_client_without_data_check():
    data = padded_clients()
    sampler = client_batch_sampler(3, 3)  # client 1 has only 4 real examples
    client = jax.tree.map(lambda a: a[1], data)
    sup, qry = sampler(jax.random.key(0), client)
    assert float(sup["mask"].sum() + qry["mask"].sum()) == 4.0
    assert np.all(np.asarray(sup["mask"]) == 1)  # real examples fill the support first


def test_full_client_task_is_train_then_test():
    data = padded_clients()
    client = jax.tree.map(lambda a: a[0], data)
    s, q = full_client_task(jax.random.key(0), client)
    np.testing.assert_array_equal(s["x"], client["train"]["x"])
    np.testing.assert_array_equal(q["mask"], client["test"]["mask"])


# ---------------------------------------------------------------------------- bad input


def test_error_more_ways_than_classes():
    images = jnp.asarray(coded_images())
    with pytest.raises(ValueError, match=r"ways=13 is more than the 12 classes.*ways <= 12"):
        sample_episode(jax.random.key(0), images, ways=13, shots=1, queries=1)


def test_error_more_ways_than_a_client_has():
    data = {
        "images": jnp.zeros((3, 10, EXAMPLES, HW, HW)),
        "num_classes": jnp.asarray([10, 4, 8]),
    }
    with pytest.raises(ValueError, match=r"ways=5 is more than the 4 classes of client 1"):
        episode_task_sampler(ways=5, shots=1, queries=1, data=data)


def test_error_more_shots_than_examples():
    images = jnp.asarray(coded_images())
    with pytest.raises(
        ValueError, match=r"shots=4 \+ queries=3 = 7 is more than the 6 examples per class"
    ):
        sample_episode(jax.random.key(0), images, ways=2, shots=4, queries=3)
    with pytest.raises(ValueError, match=r"shots=7 is more than the 6 support examples"):
        sample_episode(jax.random.key(0), images, ways=2, shots=7, queries=1, query_images=images)


def test_error_unknown_augmentation():
    with pytest.raises(ValueError, match=r"augmentation='rot' is not known; allowed: 'none'"):
        episode_task_sampler(ways=2, shots=1, queries=1, augmentation="rot")


def test_error_wrong_image_shape():
    with pytest.raises(ValueError, match=r"images must have shape \[classes, examples, H, W\]"):
        sample_episode(jax.random.key(0), jnp.zeros((12, 28, 28)), ways=2, shots=1, queries=1)
    with pytest.raises(ValueError, match=r"got shape \(12, 28\)"):
        check_episode_config({"images": np.zeros((12, 28))}, ways=2, shots=1, queries=1)
    with pytest.raises(ValueError, match=r"H == W"):
        rotate_classes(np.zeros((2, 2, 4, 5)))


def test_error_batch_sizes_above_smallest_client():
    with pytest.raises(
        ValueError, match=r"support_size=3 \+ query_size=2 = 5 is more than the 4 'train' "
    ):
        client_batch_sampler(3, 2, data=padded_clients())
