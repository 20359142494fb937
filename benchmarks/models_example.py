"""An example ``--model`` provider of ``benchmarks/throughput.py``: a user's flax.linen CNN.

    python benchmarks/throughput.py --workload=meta-step \\
        --model=benchmarks/models_example.py:small_cnn --method=maml --baseline --json
    python benchmarks/throughput.py --workload=fed-round --model=benchmarks.models_example:small_cnn \\
        --method=fedmeta-maml --clients=32 --baseline --json

``small_cnn()`` returns the dict of :class:`throughput.UserModel` (``model``, ``loss_fn``,
``sample_task``, ``clients`` and the optional ``inner_lr``, ``meta_batch``, ``name``): a linen
``SmallCNN`` (two 3x3 stride-2 convolutions with ReLU, spatial mean, linear head; no batch
norm, so no mutable state) wrapped by hand as ``init(key) -> params`` / ``apply(params, x)``,
the cross-entropy loss, 5-way 1-shot episodes with 15 queries per class, and 32 clients of 10
classes x 20 random 28x28 "ink" images (the cost does not depend on the pixels). throughput.py
calls the function with no arguments: other settings are small wrappers, as
:func:`tiny_cnn` (the tests' size).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

import fmljax


class SmallCNN(nn.Module):
    """Conv(3x3, stride 2) + ReLU, ``blocks`` times, spatial mean, Dense(ways)."""

    ways: int = 5
    features: int = 32
    blocks: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for _ in range(self.blocks):
            x = nn.relu(nn.Conv(self.features, (3, 3), strides=2, padding="SAME")(x))
        return nn.Dense(self.ways)(jnp.mean(x, axis=(1, 2)))


def linen_model(module: nn.Module, example_x: jax.Array) -> fmljax.Model:
    """A parameter-only linen module as a pure ``fmljax.Model`` (params: its ``'params'``)."""

    def init(key: jax.Array):
        return module.init(key, example_x)["params"]

    def apply(params, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        del mask  # no batch statistics: padded examples do not change the real ones
        return module.apply({"params": params}, x)

    return fmljax.Model(init, apply)


def small_cnn(
    *,
    ways: int = 5,
    features: int = 32,
    image_size: int = 28,
    num_clients: int = 32,
    classes: int = 10,
    examples: int = 20,
    queries: int = 15,
    meta_batch: int = 32,
) -> dict:
    """The provider: ``--model=benchmarks/models_example.py:small_cnn`` (keyword arguments are
    for wrappers such as :func:`tiny_cnn`; throughput.py passes none)."""
    module = SmallCNN(ways=ways, features=features)
    model = linen_model(module, jnp.zeros((1, image_size, image_size, 1), jnp.float32))
    shape = (num_clients, classes, examples, image_size, image_size)
    images = (jax.random.uniform(jax.random.key(1), shape) > 0.8).astype(jnp.float32)
    return dict(
        model=model,
        loss_fn=fmljax.cross_entropy_loss(model.apply),
        sample_task=fmljax.data.episode_task_sampler(ways=ways, shots=1, queries=queries),
        clients={"images": images, "num_examples": jnp.ones((num_clients,), jnp.float32)},
        inner_lr=0.4,
        meta_batch=meta_batch,
        name=f"SmallCNN linen {ways}-way, {features} ch, {image_size}x{image_size}",
    )


def tiny_cnn() -> dict:
    """``small_cnn`` at test size: 8x8 images, 4 channels, 4 clients, 2 tasks per meta-step."""
    return small_cnn(
        ways=2,
        features=4,
        image_size=8,
        num_clients=4,
        classes=2,
        examples=4,
        queries=2,
        meta_batch=2,
    )
