"""Micro-measurement: a user's Conv4 written with ``lax.conv_general_dilated``, vmapped second-order
MAML meta-step, original against ``fmljax.convs.batched_convs`` (interleaved, one process).

    python benchmarks/batched_convs.py [--tasks=8] [--hw=28] [--filters=64] [--shots=1]
                                       [--ways=5] [--calls=10] [--json]

The model is the MAML Omniglot Conv4 written the way a user would (four 3x3 stride-2 'SAME'
convolutions with bias, batch norm with batch statistics, ReLU, a linear head), with plain
``lax.conv_general_dilated``. The step is ``jax.jit(jax.vmap(meta_gradient(..., "maml")))``
over ``--tasks`` tasks, 1 inner step: after the inner step every task has its own kernels, so
``vmap`` turns the original's convolutions into grouped convolutions (jax issue #13800 on CPU),
and ``batched_convs`` turns them into batched matrix products. Both programs are compiled
first and checked to agree, then called alternately ``--calls`` times each (after one warm-up
call each, ``block_until_ready`` on every result); the medians and their ratio are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import fmljax
from fmljax.convs import batched_convs


def user_conv4(params, x):
    """x [B, H, W, 1] -> logits [B, N]; params from :func:`init`."""
    for i in range(4):
        p = params[f"conv{i}"]
        x = lax.conv_general_dilated(
            x, p["w"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        x = x + p["b"]
        mean = x.mean((0, 1, 2))
        var = x.var((0, 1, 2))
        x = (x - mean) / jnp.sqrt(var + 1e-3) + p["offset"]
        x = jax.nn.relu(x)
    return x.mean((1, 2)) @ params["head"]["w"] + params["head"]["b"]


def init(key, ways, filters):
    keys = jax.random.split(key, 5)
    params, cin = {}, 1
    for i in range(4):
        w = jax.random.normal(keys[i], (3, 3, cin, filters)) * np.sqrt(2 / (9 * cin))
        params[f"conv{i}"] = {"w": w, "b": jnp.zeros(filters), "offset": jnp.zeros(filters)}
        cin = filters
    head = jax.random.normal(keys[4], (filters, ways)) / np.sqrt(filters)
    params["head"] = {"w": head, "b": jnp.zeros(ways)}
    return params


def step_fn(apply, params):
    loss_fn = fmljax.cross_entropy_loss(apply)

    def one(s, q):
        return fmljax.meta_gradient(
            loss_fn, params, s, q, inner_lr=0.4, inner_steps=1, method="maml"
        )

    return jax.jit(jax.vmap(one))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--hw", type=int, default=28)
    ap.add_argument("--filters", type=int, default=64)
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--queries", type=int, default=5, help="query examples per way")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    for name in ("tasks", "hw", "filters", "ways", "shots", "queries", "calls"):
        if getattr(a, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(a, name)}")

    params = init(jax.random.key(0), a.ways, a.filters)
    rng = np.random.default_rng(0)

    def batch(k):
        n = a.ways * k
        x = rng.standard_normal((a.tasks, n, a.hw, a.hw, 1)).astype(np.float32)
        y = np.tile(np.arange(n) % a.ways, (a.tasks, 1))
        return {"x": jnp.asarray(x), "y": jnp.asarray(y)}

    support, query = batch(a.shots), batch(a.queries)
    steps = {
        "original": step_fn(user_conv4, params),
        "batched_convs": step_fn(batched_convs(user_conv4), params),
    }
    compile_s, outs = {}, {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        compiled = step.lower(support, query).compile()
        compile_s[name] = time.perf_counter() - t0
        steps[name] = compiled
        outs[name] = jax.block_until_ready(compiled(support, query))  # warm-up
    diff = max(
        float(jnp.max(jnp.abs(u - v)))
        for u, v in zip(
            jax.tree.leaves(outs["original"]), jax.tree.leaves(outs["batched_convs"]), strict=True
        )
    )
    times = {name: [] for name in steps}
    for _ in range(a.calls):
        for name, compiled in steps.items():
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(support, query))
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "config": vars(a),
        "backend": jax.default_backend(),
        "load_average": os.getloadavg(),
        "compile_s": compile_s,
        "median_s": med,
        "tasks_per_s": {name: a.tasks / m for name, m in med.items()},
        "speedup": med["original"] / med["batched_convs"],
        "max_abs_diff": diff,
    }
    if a.json:
        print(json.dumps(result))
        return
    print(f"config {vars(a)}  backend {result['backend']}  load {result['load_average']}")
    for name in steps:
        print(
            f"{name:>14}: median {med[name] * 1e3:8.2f} ms/step  "
            f"{a.tasks / med[name]:7.1f} tasks/s  compile {compile_s[name]:.1f} s"
        )
    print(f"speedup (original / batched_convs): {result['speedup']:.2f}x   max |diff| {diff:.2e}")


if __name__ == "__main__":
    main()
