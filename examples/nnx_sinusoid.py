"""MAML on sinusoids with a ``flax.nnx`` MLP: exact second order against first order.

MAML's sinusoid regression (Finn, Abbeel & Levine, 2017, section 5.1): a 1-40-40-1 ReLU
network (here an ``nnx`` module turned into a pure model by :func:`fmljax.from_nnx`) is
meta-trained with Adam on batches of tasks, each task a sinusoid of random amplitude and phase
with K support and K query points. Prints the post-adaptation MSE (``--inner-steps`` SGD steps
on K fresh points) on held-out tasks for second-order MAML and first-order MAML.

    python examples/nnx_sinusoid.py                 # defaults: < 1 min on 2 CPU cores
    python examples/nnx_sinusoid.py --iterations 5 --hidden 8 --eval-tasks 4   # tiny
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import fmljax


class MLP(nnx.Module):
    """``1 -> hidden -> hidden -> 1`` with ReLU."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in ((1, hidden), (hidden, hidden), (hidden, 1))]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=1500, help="meta-training iterations")
    p.add_argument("--hidden", type=int, default=40, help="hidden width")
    p.add_argument("--meta-batch", type=int, default=10, help="tasks per meta-step")
    p.add_argument("--shots", type=int, default=10, help="K support (and query) points")
    p.add_argument("--inner-lr", type=float, default=0.01)
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--meta-lr", type=float, default=1e-3)
    p.add_argument("--eval-tasks", type=int, default=200, help="held-out tasks")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def train(method: str, args: argparse.Namespace) -> float:
    """Meta-train with ``method`` ('maml' or 'fomaml'); the held-out post-adaptation MSE."""
    model = fmljax.from_nnx(lambda rngs: MLP(args.hidden, rngs=rngs))
    loss = fmljax.mse_loss(model.apply)
    opt = optax.adam(args.meta_lr)
    key_init, key_train, key_eval = jax.random.split(jax.random.key(args.seed), 3)
    params = model.init(key_init)
    kw = dict(inner_lr=args.inner_lr, inner_steps=args.inner_steps)

    def tasks(key, n):  # [T] tasks: support [T, K, 1], query [T, K, 1]
        keys = jax.random.split(key, n)
        return jax.vmap(lambda k: fmljax.data.sample_sinusoid_task(k, args.shots, args.shots))(keys)

    @jax.jit
    def step(params, opt_state, key):
        support, query = tasks(key, args.meta_batch)
        one = lambda s, q: fmljax.meta_gradient(loss, params, s, q, method=method, **kw)
        _, grads = jax.vmap(one)(support, query)
        updates, opt_state = opt.update(jax.tree.map(lambda g: g.mean(0), grads), opt_state)
        return optax.apply_updates(params, updates), opt_state

    opt_state = opt.init(params)
    for i in range(args.iterations):
        params, opt_state = step(params, opt_state, jax.random.fold_in(key_train, i))

    @jax.jit
    def held_out(params):
        support, query = tasks(key_eval, args.eval_tasks)
        adapted = jax.vmap(lambda s: fmljax.adapt(loss, params, s, **kw))(support)
        return jnp.mean(jax.vmap(loss)(adapted, query))

    return float(held_out(params))


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run both methods; print and return ``{method: held-out MSE after adaptation}``."""
    args = parse(argv)
    out = {}
    for method in ("maml", "fomaml"):
        out[method] = train(method, args)
        order = "second" if method == "maml" else "first"
        print(
            f"{method:7s} ({order} order): post-adaptation MSE on {args.eval_tasks} "
            f"held-out tasks = {out[method]:.4f}"
        )
    return out


if __name__ == "__main__":
    main()
