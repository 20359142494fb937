"""Other ways to write the task-batched Conv4 convolution, timed against ``conv4(impl="im2col")``.

    python benchmarks/conv_variants.py [--workload=omniglot-5w1s] [--steps=10] [--json]

Issue 6 asks for a per-task-weight convolution that is not a grouped convolution. The library
keeps ``"im2col"`` (strided slices of the padded input concatenated into patches, one batched
matrix product); these are the alternatives that were measured and not kept, so that the
figures in ``benchmarks/RESULTS.md`` can be reproduced. All compute the same function as
``lax.conv_general_dilated`` (checked here before timing) and are differentiable to any order:

* ``phase``: the stride-2 taps are unit-stride slices of the input's 2x2 phases
  (``x.reshape(B, H/2, 2, W/2, 2, C)``), so that the transpose (col2im) adds unit-stride pads;
* ``sum``: no patch tensor: ``sum_taps slice_tap @ W[tap]``, nine batched products of depth C;
* ``cnhw``: channels-first activations ``[C, B, H, W]``: the patches concatenate contiguous
  tap blocks and batch norm reduces the last axis.

Each variant's one-jit second-order meta-step (the ``throughput.py`` program, ``--task-map``
``map`` by default) is compiled in this process and timed interleaved with ``im2col``, call
by call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import fmljax
from fmljax import models

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import throughput  # noqa: E402  (the benchmark's own meta-step program)


def _taps(x, kh, kw, stride, layout="nhwc"):
    """The kh*kw strided slices of the 'SAME'-padded input, in (dh, dw) order."""
    sp = (1, 2) if layout == "nhwc" else (2, 3)
    pads = [models._pads(x.shape[a], stride, k) for a, k in zip(sp, (kh, kw), strict=True)]
    widths = [(0, 0)] * 4
    for a, (lo, hi, _) in zip(sp, pads, strict=True):
        widths[a] = (lo, hi)
    xp = jnp.pad(x, widths)
    (ho, wo) = (pads[0][2], pads[1][2])
    out = []
    for dh in range(kh):
        for dw in range(kw):
            start, limit, strides = [0] * 4, list(xp.shape), [1] * 4
            for a, d, n in zip(sp, (dh, dw), (ho, wo), strict=True):
                start[a], limit[a], strides[a] = d, d + (n - 1) * stride + 1, stride
            out.append(jax.lax.slice(xp, start, limit, strides))
    return out


def conv_phase(x, w, stride):
    if stride != 2:
        return models.conv2d_same(x, w, stride, "im2col")
    b, h, wd, c = x.shape
    kh, kw, cin, cout = w.shape
    pt, _, ho = models._pads(h, 2, kh)
    pl, _, wo = models._pads(wd, 2, kw)
    hq, wq = ho + (kh - 1) // 2, wo + (kw - 1) // 2
    xp = jnp.pad(x, ((0, 0), (pt, 2 * hq - h - pt), (pl, 2 * wq - wd - pl), (0, 0)))
    xr = xp.reshape(b, hq, 2, wq, 2, c)
    phase = {(p, q): xr[:, :, p, :, q, :] for p in range(2) for q in range(2)}
    cols = [
        phase[(dh % 2, dw % 2)][:, dh // 2 : dh // 2 + ho, dw // 2 : dw // 2 + wo, :]
        for dh in range(kh)
        for dw in range(kw)
    ]
    patches = jnp.concatenate(cols, axis=-1)
    return jnp.einsum("bhwk,kc->bhwc", patches, w.reshape(kh * kw * cin, cout))


def conv_sum(x, w, stride):
    kh, kw = w.shape[:2]
    out = 0.0
    for i, col in enumerate(_taps(x, kh, kw, stride)):
        out = out + jnp.einsum("bhwk,kc->bhwc", col, w[i // kw, i % kw])
    return out


def _conv4_with(conv, num_classes, mode="strided"):
    """``fmljax.conv4``'s network and parameters with another NHWC convolution."""
    base = fmljax.conv4(num_classes, mode=mode, impl="im2col")
    stride = 2 if mode == "strided" else 1

    def apply(params, x, mask=None):
        h = x
        for i in range(4):
            p = params[f"conv{i}"]
            h = conv(h, p["w"], stride) + p["b"]
            h = models.batch_norm(h, p.get("scale"), p.get("offset"), mask=mask)
            h = jax.nn.relu(h)
            if mode == "pooled":
                h = jax.lax.reduce_window(
                    h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
                )
        return jnp.mean(h, axis=(1, 2)) @ params["head"]["w"] + params["head"]["b"]

    return models.Model(base.init, models.mask_aware(apply))


def _conv4_cnhw(num_classes, mode="strided"):
    base = fmljax.conv4(num_classes, mode=mode, impl="im2col")
    stride = 2 if mode == "strided" else 1

    def bn(h, offset, mask, eps=1e-3):  # h [C, B, P]
        m = jnp.ones((1, h.shape[1], 1), h.dtype) if mask is None else mask[None, :, None]
        count = jnp.maximum(jnp.sum(m) * h.shape[2], 1.0)
        mean = jnp.sum(h * m, axis=(1, 2), keepdims=True) / count
        var = jnp.sum(jnp.square(h - mean) * m, axis=(1, 2), keepdims=True) / count
        return (h - mean) * jax.lax.rsqrt(var + eps) + offset[:, None, None]

    def apply(params, x, mask=None):
        h = jnp.moveaxis(x, -1, 0)  # [C, B, H, W]
        for i in range(4):
            p = params[f"conv{i}"]
            kh, kw, cin, cout = p["w"].shape
            taps = _taps(h, kh, kw, stride, layout="cnhw")
            c, b, ho, wo = taps[0].shape
            patches = jnp.concatenate(taps, axis=0).reshape(kh * kw * c, b * ho * wo)
            h = jnp.einsum("kc,kp->cp", p["w"].reshape(kh * kw * cin, cout), patches)
            h = h.reshape(cout, b, ho * wo) + p["b"][:, None, None]
            h = jax.nn.relu(bn(h, p["offset"], mask)).reshape(cout, b, ho, wo)
            if mode == "pooled":
                h = jax.lax.reduce_window(
                    h, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID"
                )
        return jnp.mean(h, axis=(2, 3)).T @ params["head"]["w"] + params["head"]["b"]

    return models.Model(base.init, models.mask_aware(apply))


VARIANTS = {
    "phase": lambda n, mode: _conv4_with(conv_phase, n, mode),
    "sum": lambda n, mode: _conv4_with(conv_sum, n, mode),
    "cnhw": _conv4_cnhw,
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--workload", default="omniglot-5w1s", choices=("omniglot-5w1s", "omniglot-5w1s-pool")
    )
    p.add_argument("--variants", default="phase,sum,cnhw")
    p.add_argument("--task-map", default="map", choices=("map", "vmap"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    mode = "pooled" if args.workload.endswith("-pool") else "strided"
    names = ["im2col"] + args.variants.split(",")

    # the same function: forward and the gradient of the MAML query loss, against lax
    ref = fmljax.conv4(5, mode=mode, impl="lax")
    params = ref.init(jax.random.key(0))
    x = (jax.random.uniform(jax.random.key(1), (6, 28, 28, 1)) > 0.5).astype(jnp.float32)
    y = jnp.arange(6) % 5
    for name in names[1:]:
        model = VARIANTS[name](5, mode)
        batch = {"x": x, "y": y}
        g_ref = jax.grad(fmljax.cross_entropy_loss(ref.apply))(params, batch)
        g = jax.grad(fmljax.cross_entropy_loss(model.apply))(params, batch)
        err = max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True)
        )
        if err > 1e-4:
            raise SystemExit(f"{name}: gradient differs from lax by {err}")

    contenders = []
    for name in names:
        ns = argparse.Namespace(
            workload=args.workload,
            method="maml",
            inner_steps=1,
            task_map=args.task_map,
            task_chunk=None,
            conv_impl="im2col",
            baseline_conv_impl="lax",
            steps_per_call=1,
            remat=False,
            baseline=False,
            compile_only=False,
            pytorch=False,
            meta_batch=None,
        )
        if name != "im2col":
            make = VARIANTS[name]
            throughput._model_and_loss = lambda spec, impl, make=make: (
                lambda m: (m, fmljax.cross_entropy_loss(m.apply))
            )(make(spec["ways"], spec["mode"]))
        c = throughput.meta_contenders(ns)[0][0]
        jax.block_until_ready(c.call())
        contenders.append((name, c))
    times = {name: [] for name in names}
    for _ in range(args.steps):
        for name, c in contenders:
            t0 = time.perf_counter()
            jax.block_until_ready(c.call())
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["im2col"])
    for name, c in contenders:
        med = statistics.median(times[name])
        rec = dict(
            workload=args.workload,
            task_map=args.task_map,
            variant=name,
            tasks_per_s=32 / med,
            step_ms_median=1e3 * med,
            compile_s=c.info["compile_s"],
            peak_bytes=c.info["peak_bytes"],
            speed_vs_im2col=base / med,
            timed_steps=args.steps,
            load_avg_1m=os.getloadavg()[0],
            device=f"{jax.devices()[0].platform}",
            jax_version=jax.__version__,
        )
        print(
            json.dumps(rec)
            if args.json
            else f"{name:>7} {rec['tasks_per_s']:6.1f} tasks/s  {rec['speed_vs_im2col']:.2f}x im2col  compile {rec['compile_s']:.1f} s"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
