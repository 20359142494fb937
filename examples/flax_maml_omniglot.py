"""MAML on Omniglot N-way K-shot episodes with a ``flax.linen`` Conv4 (batch norm).

The network of MAML's Omniglot experiments (Finn, Abbeel & Levine, 2017; ``cbfinn/maml``):
four blocks of 3x3 stride-2 convolution, batch norm on the batch's own statistics
(``use_running_average=False``, epsilon 1e-3, learned offset) and ReLU, a spatial mean and a
linear head, written in linen and turned into a pure model by :func:`fmljax.from_linen` (the
batch statistics are discarded after each call, only ``'params'`` are meta-learned).
Second-order and first-order MAML are meta-trained with Adam on the meta-train characters and
scored (accuracy after ``--inner-steps`` SGD steps on the support set) on held-out episodes of
the meta-test characters.

Data: ``--omniglot PATH`` or ``$FMLJAX_OMNIGLOT`` (see :func:`fmljax.data.omniglot.load_omniglot`);
without either, the procedural stand-in of :func:`fmljax.tasks.procedural_omniglot`.

    python examples/flax_maml_omniglot.py            # defaults: < 2 min on 2 CPU cores
    python examples/flax_maml_omniglot.py --iterations 2 --filters 4 --image-size 14 \\
        --eval-tasks 2 --meta-batch 2                # tiny
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

import fmljax
from fmljax.data.episodes import sample_episode
from fmljax.data.omniglot import load_omniglot, split_omniglot
from fmljax.tasks import procedural_omniglot


class Conv4(nn.Module):
    """MAML's Omniglot Conv4; ``x`` [B, H, W, 1] -> logits [B, ways]."""

    ways: int
    filters: int = 64

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = x
        for _ in range(4):
            h = nn.Conv(self.filters, (3, 3), strides=2, padding="SAME")(h)
            h = nn.BatchNorm(use_running_average=False, epsilon=1e-3, use_scale=False)(h)
            h = nn.relu(h)
        return nn.Dense(self.ways)(jnp.mean(h, axis=(1, 2)))


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--omniglot", default=os.environ.get("FMLJAX_OMNIGLOT"), help="data path")
    p.add_argument("--iterations", type=int, default=150, help="meta-training iterations")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=5, help="query examples per class")
    p.add_argument("--filters", type=int, default=16)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--meta-batch", type=int, default=8, help="tasks per meta-step")
    p.add_argument("--inner-lr", type=float, default=0.4)
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--meta-lr", type=float, default=1e-3)
    p.add_argument("--eval-tasks", type=int, default=100, help="held-out episodes")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load(args: argparse.Namespace) -> tuple[jax.Array, jax.Array]:
    """(meta-train images, meta-test images), each [classes, E, S, S]."""
    if args.omniglot:
        splits = split_omniglot(load_omniglot(args.omniglot, image_size=args.image_size))
    else:
        data = procedural_omniglot(image_size=args.image_size, seed=args.seed)
        splits = split_omniglot(data, "maml", sizes=(40, 10))
    return jnp.asarray(splits["train"].images), jnp.asarray(splits["test"].images)


def train(method: str, args: argparse.Namespace, images, test_images) -> float:
    """Meta-train with ``method`` ('maml' or 'fomaml'); held-out accuracy after adaptation."""
    s = args.image_size
    model = fmljax.from_linen(Conv4(args.ways, args.filters), jnp.zeros((2, s, s, 1)))
    # The reference's loss: per-example cross-entropy / K summed over the N * K examples.
    loss = fmljax.cross_entropy_loss(model.apply, reduction="per_way_sum")
    accuracy = fmljax.classification_metrics(model.apply)
    opt = optax.adam(args.meta_lr)
    key_init, key_train, key_eval = jax.random.split(jax.random.key(args.seed), 3)
    params = model.init(key_init)
    kw = dict(inner_lr=args.inner_lr, inner_steps=args.inner_steps)
    ep = dict(ways=args.ways, shots=args.shots, queries=args.queries, augmentation="maml")

    def episodes(key, pool, n):  # support [T, N*K, S, S, 1], query [T, N*Q, S, S, 1]
        return jax.vmap(lambda k: sample_episode(k, pool, **ep))(jax.random.split(key, n))

    # Tasks under lax.map, not vmap: per-task weights under vmap make lax convolutions
    # grouped convolutions, whose backward pass XLA:CPU runs slowly (see fmljax.conv4's impl).
    @jax.jit
    def step(params, opt_state, key):
        support, query = episodes(key, images, args.meta_batch)

        def one(s, q):
            return fmljax.meta_gradient(loss, params, s, q, method=method, **kw)

        _, grads = jax.lax.map(lambda sq: one(*sq), (support, query))
        updates, opt_state = opt.update(jax.tree.map(lambda g: g.mean(0), grads), opt_state)
        return optax.apply_updates(params, updates), opt_state

    opt_state = opt.init(params)
    for i in range(args.iterations):
        params, opt_state = step(params, opt_state, jax.random.fold_in(key_train, i))

    @jax.jit
    def held_out(params):
        support, query = episodes(key_eval, test_images, args.eval_tasks)

        def acc(sq):
            return accuracy(fmljax.adapt(loss, params, sq[0], **kw), sq[1])["accuracy"]

        return jnp.mean(jax.lax.map(acc, (support, query)))

    return float(held_out(params))


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run both methods; print and return ``{method: held-out accuracy after adaptation}``."""
    args = parse(argv)
    images, test_images = load(args)
    out = {}
    for method in ("maml", "fomaml"):
        out[method] = train(method, args, images, test_images)
        order = "second" if method == "maml" else "first"
        print(
            f"{method:7s} ({order} order): {args.ways}-way {args.shots}-shot accuracy on "
            f"{args.eval_tasks} held-out episodes = {100 * out[method]:.1f}%"
        )
    return out


if __name__ == "__main__":
    main()
