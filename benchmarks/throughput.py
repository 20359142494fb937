"""Meta-step and federated-round throughput, with an interleaved simple baseline.

    python benchmarks/throughput.py --workload=omniglot-5w1s --method=maml --inner-steps=1 \
        --baseline --json
    python benchmarks/throughput.py --workload=sinusoid --method=maml --inner-steps=1 \
        --steps-per-call=10 --baseline --json
    python benchmarks/throughput.py --workload=fed-round --model=conv4 --method=fedmeta-maml \
        --inner-steps=1 --clients=32 --baseline --json

Workloads (all built from the library's own ``fmljax.conv4`` / ``fmljax.mlp`` /
``fmljax.meta_gradient`` / ``fmljax.build``; nothing is reimplemented here):

* ``sinusoid``: MLP 1-40-40-1, K = 10 support + 10 query points, meta-batch 25, inner rate 0.01.
* ``omniglot-5w1s``: the MAML reference Conv4 (stride 2, SAME, batch norm on the batch's own
  statistics, ReLU, spatial mean, linear head), 5 support + 75 query 28x28x1 images per task,
  meta-batch 32, inner rate 0.4. Random images: the cost does not depend on the pixels.
* ``omniglot-5w1s-pool``: the same with stride 1 and 2x2 max-pool after each block.
* ``omniglot-20w1s``: 20-way 1-shot, 20 support + 300 query, meta-batch 16 (MAML's setting).
* ``fed-round``: one federated round (``--clients`` M clients x 5 local meta-steps x 4 tasks),
  ``--model=mlp`` (sinusoid clients) or ``--model=conv4`` (5-way 1-shot episodes of random
  images per client).

Methods: every ``fmljax.METHODS`` entry (meta-step workloads) and every ``fmljax.ALGORITHMS``
name (``fed-round``).

The timed meta-step (``impl = "onejit"``) is one compiled program: the per-task meta-gradients
mapped over the task axis with ``fmljax.mapping.map_over`` (``--task-map``), their mean, and the
Adam 1e-3 outer step; ``--steps-per-call=N`` runs N such steps (on N different batches) in one
``lax.scan``. The federated round is ``jax.jit(alg.update)`` (``scan_rounds`` for N > 1) with
a server Adam 1e-3.

``--baseline`` runs, in the same process and interleaved call by call with the one-jit program:

* ``loop-tasks``: a Python loop over the T tasks around a jitted per-task
  ``fmljax.meta_gradient`` (conv4 with ``--baseline-conv-impl``, default ``lax``), then a
  jitted mean + Adam step;
* ``loop-clients`` (``fed-round``): a Python loop over the M clients around a jitted client
  update (conv4 with ``--baseline-conv-impl``, by default the same convolution as the one-jit
  round: the client update ``vmap``-s its own T tasks, where ``lax`` convolutions would be
  grouped ones; a one-client round of the same algorithm,
  ``fmljax.build(clients_per_round=1)``,
  whose server step is ``sgd(1.0)``, so ``delta = params - new params``), then a jitted
  average + Adam step, the way fedjax runs rounds;
* ``jit-vmap-1step`` (only when ``--steps-per-call > 1``): the plain single-step
  ``jit(vmap)`` meta-step, one call per step.

``--pytorch`` adds ``eager-pytorch`` (Conv4 workloads, ``maml`` / ``fomaml``): the eager
PyTorch per-task loop of ``benchmarks/torch_reference.py`` on the same batches, interleaved
too (needs ``pip install torch==2.13.0``; torch is not an fmljax dependency).

Output: one JSON line per measured implementation (``--json``; otherwise a short text line),
the one-jit line carrying ``speedup_vs_<baseline>`` ratios of the medians. Timing: the
program is compiled with ``jax.jit(f).lower(...).compile()`` (``compile_s``, apart from the
first call), ``--warmup`` untimed calls, then ``--steps`` timed calls with
``jax.block_until_ready``; per-meta-step times (``step_ms_*``) are per call divided by
``--steps-per-call``. ``peak_bytes`` is the compiled program's memory analysis (arguments +
outputs + temporaries - aliased; ``temp_bytes`` and XLA's ``xla_peak_memory_bytes`` too); ``device_peak_bytes`` the device's ``memory_stats()``
peak where the backend reports one (GPU/TPU), else null. ``--profile=DIR`` writes a
``jax.profiler`` trace of 3 one-jit calls (TensorBoard / Perfetto). ``--compile-only`` stops
after compiling (compile time and memory of large inner-step counts without running them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import fmljax
from fmljax.mapping import map_over

META_WORKLOADS = ("sinusoid", "omniglot-5w1s", "omniglot-5w1s-pool", "omniglot-20w1s")
WORKLOADS = META_WORKLOADS + ("fed-round",)


# ------------------------------------------------------------------------------------ setup
def _workload_spec(args) -> dict:
    if args.workload == "sinusoid":
        spec = dict(model="mlp", tasks=25, support=10, query=10, inner_lr=0.01)
    else:
        ways = 20 if args.workload == "omniglot-20w1s" else 5
        spec = dict(
            model="conv4",
            ways=ways,
            tasks=16 if ways == 20 else 32,
            support=ways,  # 1 shot
            query=ways * 15,
            inner_lr=0.4,
            mode="pooled" if args.workload.endswith("-pool") else "strided",
        )
    if args.meta_batch is not None:
        spec["tasks"] = args.meta_batch
    return spec


def _model_and_loss(spec: dict, conv_impl: str):
    if spec["model"] == "mlp":
        model = fmljax.mlp((1, 40, 40, 1))
        return model, fmljax.mse_loss(model.apply)
    model = fmljax.conv4(spec["ways"], mode=spec["mode"], impl=conv_impl)
    return model, fmljax.cross_entropy_loss(model.apply)


def _meta_batches(spec: dict, n: int, key) -> tuple[dict, dict]:
    """``n`` meta-batches: support/query dicts with leading axes [n, T, ...]."""
    t = spec["tasks"]
    if spec["model"] == "mlp":
        keys = jax.random.split(key, n * t)
        s, q = jax.vmap(
            lambda k: fmljax.data.sample_sinusoid_task(k, spec["support"], spec["query"])
        )(keys)
        shape = lambda tree: jax.tree.map(lambda a: a.reshape((n, t) + a.shape[1:]), tree)
        return shape(s), shape(q)
    ks, kq = jax.random.split(key)
    ways = spec["ways"]
    img = lambda k, b: (jax.random.uniform(k, (n, t, b, 28, 28, 1)) > 0.8).astype(jnp.float32)
    lab = lambda b: jnp.broadcast_to(jnp.arange(b) // (b // ways), (n, t, b)).astype(jnp.int32)
    return (
        {"x": img(ks, spec["support"]), "y": lab(spec["support"])},
        {"x": img(kq, spec["query"]), "y": lab(spec["query"])},
    )


def _meta_params(args, params, inner_lr):
    if args.method == "meta-sgd":  # learned per-parameter rates, initialised to the inner rate
        return {
            "params": params,
            "inner_lr": jax.tree.map(lambda p: jnp.full_like(p, inner_lr), params),
        }
    return params


def _task_grad_fn(args, loss_fn, inner_lr):
    """(meta_params, support, query) -> (loss, grads like meta_params) for ONE task."""

    def task_grad(meta_params, support, query):
        if args.method == "meta-sgd":
            p, lr = meta_params["params"], meta_params["inner_lr"]
        else:
            p, lr = meta_params, inner_lr
        loss, g = fmljax.meta_gradient(
            loss_fn,
            p,
            support,
            query,
            inner_lr=lr,
            inner_steps=args.inner_steps,
            method=args.method,
            remat=args.remat,
        )
        if args.method == "meta-sgd":
            g = {"params": g[0], "inner_lr": g[1]}
        return loss, g

    return task_grad


# ------------------------------------------------------------------------------------ programs
class Contender:
    """One implementation: ``call()`` runs ``steps_per_call`` meta-steps (or rounds)."""

    def __init__(self, impl: str, call: Callable[[], Any], steps_per_call: int, **info):
        self.impl, self.call, self.steps_per_call, self.info = impl, call, steps_per_call, info
        self.times: list[float] = []


def _compile(fn, *example, donate=()):
    t0 = time.perf_counter()
    lowered = jax.jit(fn, donate_argnums=donate).lower(*example)
    compiled = lowered.compile()
    return compiled, time.perf_counter() - t0


def _memory(compiled) -> dict:
    """The compiled program's memory analysis: ``peak_bytes`` = arguments + outputs +
    temporaries - aliased (donated) bytes, and XLA's own ``peak_memory_in_bytes`` estimate."""
    out = {"peak_bytes": None, "xla_peak_memory_bytes": None, "temp_bytes": None}
    try:
        m = compiled.memory_analysis()
    except Exception:
        return out
    if m is None:
        return out
    out["peak_bytes"] = int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    out["temp_bytes"] = int(m.temp_size_in_bytes)
    out["xla_peak_memory_bytes"] = getattr(m, "peak_memory_in_bytes", None)
    return out


def _device_peak() -> int | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    if not stats:
        return None
    return stats.get("peak_bytes_in_use")


def meta_contenders(args) -> tuple[list[Contender], int]:
    spec = _workload_spec(args)
    n = args.steps_per_call
    model, loss_fn = _model_and_loss(spec, args.conv_impl)
    opt = optax.adam(1e-3)
    params = _meta_params(args, model.init(jax.random.key(0)), spec["inner_lr"])
    support, query = _meta_batches(spec, n, jax.random.key(1))
    task_grad = _task_grad_fn(args, loss_fn, spec["inner_lr"])

    def meta_step(state, batch):
        p, o = state
        s, q = batch
        losses, grads = map_over(lambda t: task_grad(p, *t), (s, q), args.task_map, args.task_chunk)
        g = jax.tree.map(lambda a: jnp.mean(a, 0), grads)
        upd, o = opt.update(g, o, p)
        return (optax.apply_updates(p, upd), o), jnp.mean(losses)

    def many_steps(state, s, q):
        return jax.lax.scan(meta_step, state, (s, q))

    state0 = (params, opt.init(params))
    compiled, compile_s = _compile(many_steps, state0, support, query)
    holder = {"state": state0}

    def call_main():
        holder["state"], losses = compiled(holder["state"], support, query)
        return holder["state"], losses

    main = Contender(
        "onejit",
        call_main,
        n,
        compile_s=compile_s,
        **_memory(compiled),
        conv_impl=args.conv_impl if spec["model"] == "conv4" else None,
    )
    out = [main]
    if args.pytorch and not args.compile_only:
        out.append(_pytorch_contender(args, spec, support, query))
    if args.compile_only or not args.baseline:
        return out, spec["tasks"]

    # loop over tasks around a jitted per-task meta-gradient (what a user would write)
    b_model, b_loss = _model_and_loss(spec, args.baseline_conv_impl)
    b_task_grad = _task_grad_fn(args, b_loss, spec["inner_lr"])
    s0 = jax.tree.map(lambda a: a[0], support)
    q0 = jax.tree.map(lambda a: a[0], query)
    one = lambda tree, t: jax.tree.map(lambda a: a[t], tree)
    grad_c, grad_compile_s = _compile(b_task_grad, params, one(s0, 0), one(q0, 0))

    def apply_mean(p, o, *grads):
        g = jax.tree.map(lambda *a: jnp.mean(jnp.stack(a), 0), *grads)
        upd, o = opt.update(g, o, p)
        return optax.apply_updates(p, upd), o

    upd_c = None
    bholder = {"state": (params, opt.init(params))}
    tasks_s = [
        [one(jax.tree.map(lambda a: a[i], support), t) for t in range(spec["tasks"])]
        for i in range(n)
    ]
    tasks_q = [
        [one(jax.tree.map(lambda a: a[i], query), t) for t in range(spec["tasks"])]
        for i in range(n)
    ]

    def call_loop():
        nonlocal upd_c
        p, o = bholder["state"]
        for i in range(n):
            grads = [grad_c(p, s, q)[1] for s, q in zip(tasks_s[i], tasks_q[i], strict=True)]
            if upd_c is None:
                upd_c = jax.jit(apply_mean)
            p, o = upd_c(p, o, *grads)
        bholder["state"] = (p, o)
        return p

    out.append(
        Contender(
            "loop-tasks",
            call_loop,
            n,
            compile_s=grad_compile_s,
            **_memory(grad_c),
            conv_impl=args.baseline_conv_impl if spec["model"] == "conv4" else None,
            task_map="python-loop",
        )
    )
    if n > 1:  # the plain single-step jit(vmap) reference of target 2

        def one_step(state, s, q):
            return meta_step(state, (s, q))

        one_c, one_compile_s = _compile(one_step, state0, s0, q0)
        rholder = {"state": state0}
        batches = [
            (jax.tree.map(lambda a: a[i], support), jax.tree.map(lambda a: a[i], query))
            for i in range(n)
        ]

        def call_ref():
            for s, q in batches:
                rholder["state"], loss = one_c(rholder["state"], s, q)
            return rholder["state"]

        out.append(
            Contender(
                "jit-vmap-1step",
                call_ref,
                n,
                compile_s=one_compile_s,
                **_memory(one_c),
                conv_impl=args.conv_impl if spec["model"] == "conv4" else None,
                per_call=1,
            )
        )
    return out, spec["tasks"]


def _pytorch_contender(args, spec: dict, support, query) -> Contender:
    """The eager PyTorch per-task loop (``benchmarks/torch_reference.py``), same batches."""
    if spec["model"] != "conv4" or args.method not in ("maml", "fomaml"):
        raise SystemExit("--pytorch: only Conv4 workloads with --method=maml or fomaml")
    import numpy as np
    import torch
    from torch_reference import EagerMAML

    n = args.steps_per_call
    runners = [
        EagerMAML(
            jax.tree.map(lambda a: np.asarray(a[i]), support),
            jax.tree.map(lambda a: np.asarray(a[i]), query),
            ways=spec["ways"],
            inner_lr=spec["inner_lr"],
            inner_steps=args.inner_steps,
            pooled=spec["mode"] == "pooled",
            second_order=args.method == "maml",
        )
        for i in range(n)
    ]
    for r in runners[1:]:  # one set of meta-parameters and one Adam state, as in the others
        r.params, r.opt = runners[0].params, runners[0].opt

    def call_torch():
        return [r.call() for r in runners]

    return Contender(
        "eager-pytorch",
        call_torch,
        n,
        compile_s=0.0,
        peak_bytes=None,
        temp_bytes=None,
        xla_peak_memory_bytes=None,
        conv_impl=f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        task_map="python-loop",
    )


def fed_contenders(args) -> tuple[list[Contender], int]:
    algorithm = args.method
    n = args.steps_per_call
    if args.model == "mlp":
        model = fmljax.mlp((1, 40, 40, 1))
        loss_fn = fmljax.mse_loss(model.apply)
        data = fmljax.data.sample_sinusoid_clients(jax.random.key(1), args.clients)
        sampler = fmljax.data.sinusoid_task_sampler(10, 10)
        inner_lr = 0.01
        b_loss_fn = loss_fn
    else:
        model = fmljax.conv4(5, impl=args.conv_impl)
        loss_fn = fmljax.cross_entropy_loss(model.apply)
        b_model = fmljax.conv4(5, impl=args.baseline_conv_impl)
        b_loss_fn = fmljax.cross_entropy_loss(b_model.apply)
        # each client: 10 classes x 20 drawings of random 28x28 "ink"
        images = jax.random.uniform(jax.random.key(1), (args.clients, 10, 20, 28, 28)) > 0.8
        data = {"images": images.astype(jnp.float32), "num_examples": jnp.ones((args.clients,))}
        sampler = fmljax.data.episode_task_sampler(ways=5, shots=1, queries=15)
        inner_lr = 0.4
    cfg = fmljax.RoundConfig(
        clients_per_round=args.clients,
        tasks_per_client=args.tasks_per_client,
        local_steps=args.local_steps,
        local_lr=1e-3,
        inner_lr=inner_lr,
        inner_steps=args.inner_steps,
        task_map=args.task_map,
        task_chunk=args.task_chunk,
        client_map=args.client_map,
        client_chunk=args.client_chunk,
        remat=args.remat,
    )
    alg = fmljax.build(algorithm, loss_fn, sampler, cfg, server_optimizer=optax.adam(1e-3))
    params = model.init(jax.random.key(0))
    run = fmljax.scan_rounds(alg.update, n)
    state0 = alg.init(params)
    key = jax.random.key(2)
    compiled, compile_s = _compile(run, state0, key, data)
    holder = {"state": state0, "r": 0}

    def call_main():
        holder["r"] += 1
        holder["state"], metrics = compiled(
            holder["state"], jax.random.fold_in(key, holder["r"]), data
        )
        return holder["state"], metrics

    main = Contender(
        "onejit",
        call_main,
        n,
        compile_s=compile_s,
        **_memory(compiled),
        conv_impl=args.conv_impl if args.model == "conv4" else None,
    )
    out = [main]
    if args.compile_only or not args.baseline:
        return out, args.clients * args.local_steps * args.tasks_per_client

    # fedjax-style: Python loop over clients around a jitted client update, then the server step
    one_cfg = cfg.__class__(**{**cfg.__dict__, "clients_per_round": 1})
    one_alg = fmljax.build(algorithm, b_loss_fn, sampler, one_cfg, server_optimizer=optax.sgd(1.0))
    one_state = one_alg.init(params)
    client_data = [jax.tree.map(lambda a, i=i: a[i : i + 1], data) for i in range(args.clients)]

    def client_update(state, key, cdata):
        new, metrics = one_alg.update(state, key, cdata)
        delta = jax.tree.map(jnp.subtract, state.params, new.params)
        return delta, metrics["loss"]

    cu_c, cu_compile_s = _compile(client_update, one_state, key, client_data[0])
    server_opt = optax.adam(1e-3)

    def server_step(p, o, *deltas):
        d = jax.tree.map(lambda *a: jnp.mean(jnp.stack(a), 0), *deltas)
        upd, o = server_opt.update(d, o, p)
        return optax.apply_updates(p, upd), o

    server_c = jax.jit(server_step)
    meta0 = one_state.params
    bholder = {"p": meta0, "o": server_opt.init(meta0), "r": 0}

    def call_loop():
        for _ in range(n):
            bholder["r"] += 1
            rkey = jax.random.fold_in(key, bholder["r"])
            st = one_state._replace(params=bholder["p"])
            deltas = [
                cu_c(st, jax.random.fold_in(rkey, c), client_data[c])[0]
                for c in range(args.clients)
            ]
            bholder["p"], bholder["o"] = server_c(bholder["p"], bholder["o"], *deltas)
        return bholder["p"]

    out.append(
        Contender(
            "loop-clients",
            call_loop,
            n,
            compile_s=cu_compile_s,
            **_memory(cu_c),
            conv_impl=args.baseline_conv_impl if args.model == "conv4" else None,
            client_map="python-loop",
        )
    )
    return out, args.clients * args.local_steps * args.tasks_per_client


# ------------------------------------------------------------------------------------ main
def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def parser() -> argparse.ArgumentParser:
    """The command line (``--help`` prints the module docstring and every flag)."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workload", choices=WORKLOADS, required=True)
    p.add_argument(
        "--method", required=True, help="a meta_gradient method or a federated algorithm"
    )
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument(
        "--meta-batch", type=int, default=None, help="tasks per meta-step (default: the workload's)"
    )
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--model", choices=("mlp", "conv4"), default="mlp", help="fed-round only")
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--tasks-per-client", type=int, default=4)
    p.add_argument("--task-map", choices=fmljax.mapping.MAP_MODES, default="vmap")
    p.add_argument("--task-chunk", type=int, default=None, help="chunk size of --task-map=chunked")
    p.add_argument("--client-map", choices=fmljax.mapping.MAP_MODES, default="vmap")
    p.add_argument("--client-chunk", type=int, default=None)
    p.add_argument("--conv-impl", choices=fmljax.models.CONV_IMPLS, default="auto")
    p.add_argument(
        "--baseline-conv-impl",
        choices=fmljax.models.CONV_IMPLS,
        default=None,
        help="conv of the loop baselines (default: lax per task; fed-round: --conv-impl)",
    )
    p.add_argument("--steps-per-call", type=int, default=1)
    p.add_argument("--remat", action="store_true")
    p.add_argument("--baseline", action="store_true")
    p.add_argument(
        "--pytorch",
        action="store_true",
        help="also time the eager PyTorch per-task loop (Conv4 maml/fomaml; needs torch)",
    )
    p.add_argument("--steps", type=int, default=10, help="timed calls (>= 10 for reported figures)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--profile", default=None, metavar="DIR")
    p.add_argument("--compile-only", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--tag", default=None, help="free text copied into every JSON line")
    return p


def main(argv=None) -> list[dict]:
    p = parser()
    args = p.parse_args(argv)

    fed = args.workload == "fed-round"
    allowed = tuple(fmljax.ALGORITHMS) if fed else fmljax.METHODS
    if args.method not in allowed:
        p.error(f"--method={args.method!r}: for --workload={args.workload} one of {allowed}")
    args.conv_impl = fmljax.models._resolve_conv_impl(args.conv_impl)  # record what ran
    if args.baseline_conv_impl is None:  # fed-round's client update vmaps its own tasks
        args.baseline_conv_impl = args.conv_impl if fed else "lax"
    if args.task_map == "chunked" and args.task_chunk is None:
        args.task_chunk = 8
    if args.client_map == "chunked" and args.client_chunk is None:
        args.client_chunk = 8

    load_before = _load()
    contenders, tasks_per_step = (fed_contenders if fed else meta_contenders)(args)

    if not args.compile_only:
        for c in contenders:  # warm-up (the first call is not timed)
            for _ in range(args.warmup):
                jax.block_until_ready(c.call())
        for _ in range(args.steps):  # interleaved: one call of each per repetition
            for c in contenders:
                t0 = time.perf_counter()
                jax.block_until_ready(c.call())
                c.times.append((time.perf_counter() - t0) / c.steps_per_call)
        if args.profile:
            os.makedirs(args.profile, exist_ok=True)
            with jax.profiler.trace(args.profile):
                for _ in range(3):
                    jax.block_until_ready(contenders[0].call())

    dev = jax.devices()[0]
    common = dict(
        workload=args.workload,
        model=(args.model if fed else _workload_spec(args)["model"]),
        method=args.method,
        inner_steps=args.inner_steps,
        clients=args.clients if fed else None,
        local_steps=args.local_steps if fed else None,
        tasks_per_client=args.tasks_per_client if fed else None,
        remat=args.remat,
        device=f"{dev.platform}:{dev.device_kind}",
        num_cpus=os.cpu_count(),
        jax_version=jax.__version__,
        host=platform.node(),
        load_avg_1m_start=load_before,
        load_avg_1m_end=_load(),
        timed_steps=0 if args.compile_only else args.steps,
        tag=args.tag,
    )
    device_peak = _device_peak()
    records = []
    for c in contenders:
        t = [x * 1e3 for x in c.times]
        med = statistics.median(t) if t else None
        rec = dict(
            impl=c.impl,
            **common,
            task_map=c.info.get("task_map", args.task_map),
            client_map=(c.info.get("client_map", args.client_map) if fed else None),
            conv_impl=c.info.get("conv_impl"),
            steps_per_call=c.info.get("per_call", c.steps_per_call),
            tasks_per_step=tasks_per_step,
            tasks_per_s=(tasks_per_step / (med / 1e3)) if med else None,
            step_ms_median=med,
            step_ms_min=min(t) if t else None,
            step_ms_max=max(t) if t else None,
            compile_s=c.info["compile_s"],
            peak_bytes=c.info["peak_bytes"],
            temp_bytes=c.info["temp_bytes"],
            xla_peak_memory_bytes=c.info["xla_peak_memory_bytes"],
            device_peak_bytes=device_peak,
        )
        records.append(rec)
    main_rec = records[0]
    for r in records[1:]:
        if main_rec["step_ms_median"] and r["step_ms_median"]:
            main_rec[f"speedup_vs_{r['impl']}"] = r["step_ms_median"] / main_rec["step_ms_median"]
    for r in records:
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            tps = "-" if r["tasks_per_s"] is None else f"{r['tasks_per_s']:.1f}"
            print(
                f"{r['impl']:>14} {r['workload']} {r['method']} S={r['inner_steps']} "
                f"map={r['task_map']} conv={r['conv_impl']} tasks/s={tps} "
                f"compile={r['compile_s']:.1f}s peak={r['peak_bytes']}",
                flush=True,
            )
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
