"""The physical limit beside the throughput figures: FLOPs of one task and the matmul peak.

    python benchmarks/roofline.py --json >> benchmarks/results/roofline-$(hostname).jsonl
    python benchmarks/roofline.py --workload=omniglot-5w1s --method=maml --sizes=2048,4096 \
        --repeats=10

Two measurements, one JSON line (``--json``; otherwise a few lines of text):

* **FLOPs of the work.** XLA's cost analysis (``jax.jit(f).lower(...).compile()
  .cost_analysis()['flops']``, a multiply-add counted as 2) of the programs that
  ``benchmarks/throughput.py`` times, built with its own builders (``_workload_spec``,
  ``_model_and_loss``, ``_meta_batches``, ``_task_grad_fn``, ``make_meta_step``), so the
  configuration is exactly that of ``--workload`` there (default ``omniglot-5w1s``: the MAML
  Conv4, 5-way 1-shot, 5 support + 75 query 28x28x1 images, inner rate 0.4, 1 inner step,
  meta-batch 32, the default convolution of this backend): ``flops_per_task`` is ONE task's
  meta-gradient of ``--method`` (default ``maml``, second order), ``flops_per_task_first_order``
  the same task's ``fomaml`` gradient, and ``flops_meta_batch_step`` the whole meta-step
  (``meta_batch`` tasks ``vmap``-ped, their mean and the Adam step), whose ratio to
  ``meta_batch x flops_per_task`` is ``batch_over_tasks`` (about 1: the cross-check).
  XLA counts a ``while`` loop's body once, whatever its trip count, so the batch step is
  counted with ``task_map="vmap"`` (a ``lax.map`` over tasks would count one task) and one
  inner step (``while_loops`` is the number of ``while`` ops left in the per-task program).
  ``flops_per_task_lowered`` is the count of the unoptimised program, for comparison. Nothing
  is run: the programs are built from shapes (``jax.eval_shape``) and compiled without LLVM's
  optimisation (``FAST_COMPILE``; XLA's HLO passes, hence the count, are the same;
  ``--full-compile`` compiles them fully).
* **The machine's matrix-product peak.** One float32 ``jnp.dot`` of two n x n matrices per
  ``--sizes`` entry (default 2048 and 4096): compiled, one untimed warm-up call, then
  ``--repeats`` timed calls with ``block_until_ready``; FLOP/s = 2 n^3 / median time.
  ``peak_gflops`` is the best size's median figure (``peak_size``); every size is in ``peak``.

The ceiling: ``ceiling_tasks_per_s = peak_gflops * 1e9 / flops_per_task``, the tasks/s of a
program doing exactly this work at the matmul peak; a measured tasks/s figure is the
fraction :func:`fraction_of_peak` ``= tasks/s * flops_per_task / peak FLOP/s`` of it
(``benchmarks/sweep.py table`` prints it beside every matching figure of RESULTS.md).

Every record says where and when it ran: ``device`` (``platform:device_kind``, as in
``throughput.py``), ``device_kind``, ``cpu_model`` (``/proc/cpuinfo``'s model name: the device
itself when the platform is ``cpu``), ``num_cpus``, ``host``, ``jax_version`` and the load
average at the start (``load_avg_start``: 1, 5 and 15 minutes) and end (``load_avg_1m_end``),
so a reader can see whether the machine was quiet. Run it on a quiet machine: the peak is
only as good as the machine was idle.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

import fmljax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import throughput  # noqa: E402  (the benchmark's own programs)

DEFAULT_SIZES = (2048, 4096)
FIRST_ORDER = "fomaml"


# ------------------------------------------------------------------------------------ FLOPs
def flops_of(compiled_or_lowered) -> float | None:
    """XLA's ``'flops'`` of a compiled (or lowered) program; None where none is reported.

    ``cost_analysis()`` returns a dict in current jax, a list of one dict per program in older
    ones (and may be None or raise on some backends)."""
    try:
        cost = compiled_or_lowered.cost_analysis()
    except Exception:
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    if not cost:
        return None
    flops = cost.get("flops")
    return None if flops is None or flops < 0 else float(flops)


def _args(workload: str, method: str, meta_batch: int | None, conv_impl: str | None):
    """throughput.py's own parsed command line for this workload (so its defaults apply)."""
    argv = [f"--workload={workload}", f"--method={method}", "--inner-steps=1", "--task-map=vmap"]
    if meta_batch is not None:
        argv.append(f"--meta-batch={meta_batch}")
    args = throughput.parser().parse_args(argv)
    args.user = None
    args.conv_impl = fmljax.models._resolve_conv_impl(conv_impl or "auto")
    return args


# The counted programs never run: LLVM's optimisation (most of XLA:CPU's compile time) is
# skipped; the HLO passes, and so the cost analysis, are the same (checked equal for the Conv4
# task on XLA:CPU; ``--full-compile`` where in doubt).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _compile(lowered, fast: bool):
    if fast:
        try:
            return lowered.compile(compiler_options=FAST_COMPILE)
        except Exception:  # a backend without the option: the ordinary compile
            pass
    return lowered.compile()


def _while_loops(compiled) -> int | None:
    try:
        text = compiled.as_text()
    except Exception:
        return None
    return sum(" while(" in line for line in text.splitlines())


def _first(tree):
    """The shapes of one element of the leading axis."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), tree)


def _task_program(args):
    """Params, one meta-batch's support / query ([T, ...]) and the per-task gradient, as
    shapes only (``jax.eval_shape``: the count needs no values, and nothing runs)."""
    spec = throughput._workload_spec(args)
    model, loss_fn = throughput._model_and_loss(spec, args.conv_impl)
    params = jax.eval_shape(
        lambda k: throughput._meta_params(args, model.init(k), spec["inner_lr"]),
        jax.random.key(0),
    )
    support, query = jax.eval_shape(
        lambda k: throughput._meta_batches(spec, 1, k), jax.random.key(1)
    )
    return (
        spec,
        params,
        _first(support),
        _first(query),
        throughput._task_grad_fn(args, loss_fn, spec["inner_lr"]),
    )


def count_flops(
    workload: str = "omniglot-5w1s",
    method: str = "maml",
    meta_batch: int | None = None,
    conv_impl: str | None = None,
    batch: bool = True,
    fast_compile: bool = True,
) -> dict:
    """XLA's FLOP counts of throughput.py's ``workload`` programs (1 inner step).

    Returns ``flops_per_task`` (one task's ``method`` meta-gradient), ``flops_per_task_lowered``
    (unoptimised), ``flops_per_task_first_order`` (the same task's ``fomaml`` gradient),
    ``flops_by_method`` (both, by name), ``flops_meta_batch_step`` (``meta_batch`` tasks
    ``vmap``-ped + mean + Adam; None unless ``batch``), ``batch_over_tasks`` (that / (meta_batch
    x flops_per_task)), ``while_loops``, ``meta_batch``, ``conv_impl``, ``inner_steps``,
    ``compile_s`` (all compilations together). ``fast_compile``: compile with
    :data:`FAST_COMPILE` (no LLVM optimisation; the HLO, hence the count, is unchanged).
    """
    if workload not in throughput.META_WORKLOADS:
        raise ValueError(f"workload={workload!r}: one of {throughput.META_WORKLOADS}")
    t0 = time.perf_counter()
    out: dict = {}
    by_method: dict[str, float | None] = {}
    for m in dict.fromkeys((method, FIRST_ORDER)):
        args = _args(workload, m, meta_batch, conv_impl)
        spec, params, support, query, task_grad = _task_program(args)
        lowered = jax.jit(task_grad).lower(params, _first(support), _first(query))
        compiled = _compile(lowered, fast_compile)
        by_method[m] = flops_of(compiled)
        if m == method:
            out.update(
                flops_per_task=by_method[m],
                flops_per_task_lowered=flops_of(lowered),
                while_loops=_while_loops(compiled),
                meta_batch=spec["tasks"],
                conv_impl=args.conv_impl if spec["model"] == "conv4" else None,
                model=spec["model"],
                inner_lr=spec["inner_lr"],
            )
            if batch:
                opt = optax.adam(1e-3)
                step = throughput.make_meta_step(args, task_grad, opt)
                state0 = (params, jax.eval_shape(opt.init, params))
                compiled_b = _compile(jax.jit(step).lower(state0, (support, query)), fast_compile)
                out["flops_meta_batch_step"] = flops_of(compiled_b)
    per_task, step = out["flops_per_task"], out.get("flops_meta_batch_step")
    out.update(
        workload=workload,
        method=method,
        inner_steps=1,
        flops_per_task_first_order=by_method[FIRST_ORDER],
        flops_by_method=by_method,
        flops_meta_batch_step=step,
        flops_meta_batch_step_per_task=None if step is None else step / out["meta_batch"],
        batch_over_tasks=(step / (out["meta_batch"] * per_task)) if step and per_task else None,
        compile_s=time.perf_counter() - t0,
        fast_compile=fast_compile,
    )
    return out


# ------------------------------------------------------------------------------------ peak
def measure_peak(
    sizes=DEFAULT_SIZES, repeats: int = 10, dtype: str = "float32", precision: str | None = None
) -> dict:
    """The matrix-product peak: per n, one n x n by n x n ``jnp.dot`` compiled, warmed up once
    and timed ``repeats`` times (``block_until_ready``); FLOP/s = 2 n^3 / median seconds.

    Returns ``peak_gflops`` (the best size's median figure), ``peak_size`` and ``peak``: one
    dict per size with ``n``, ``median_s``, ``min_s``, ``gflops`` (median), ``gflops_best``
    (from the fastest call) and ``xla_flops`` (XLA's count of the dot, 2 n^3).
    """
    if repeats < 1 or not sizes or any(int(n) < 1 for n in sizes):
        raise ValueError(f"sizes={sizes!r}, repeats={repeats!r}: sizes >= 1 and repeats >= 1")
    dot = jax.jit(lambda a, b: jnp.dot(a, b, precision=precision))
    rows = []
    for i, n in enumerate(int(n) for n in sizes):
        ka, kb = jax.random.split(jax.random.key(i))
        a = jax.random.normal(ka, (n, n), dtype)
        b = jax.random.normal(kb, (n, n), dtype)
        compiled = dot.lower(a, b).compile()
        jax.block_until_ready(compiled(a, b))  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(a, b))
            times.append(time.perf_counter() - t0)
        med, best = statistics.median(times), min(times)
        flops = 2.0 * n**3
        rows.append(
            dict(
                n=n,
                median_s=med,
                min_s=best,
                gflops=flops / med / 1e9,
                gflops_best=flops / best / 1e9,
                xla_flops=flops_of(compiled),
            )
        )
        del a, b
    top = max(rows, key=lambda r: r["gflops"])
    return dict(
        peak_gflops=top["gflops"],
        peak_size=top["n"],
        peak=rows,
        dtype=dtype,
        precision=precision,
        repeats=repeats,
    )


# ------------------------------------------------------------------------------------ ceiling
def fraction_of_peak(tasks_per_s: float, flops_per_task: float, peak_gflops: float) -> float:
    """The fraction of the matmul peak a throughput figure is: tasks/s x FLOPs per task /
    peak FLOP/s (``peak_gflops`` in GFLOP/s). 1.0 would be the ceiling."""
    for name, v in (
        ("tasks_per_s", tasks_per_s),
        ("flops_per_task", flops_per_task),
        ("peak_gflops", peak_gflops),
    ):
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < math.inf:
            raise ValueError(f"{name}={v!r}: a finite number >= 0")
    if peak_gflops == 0:
        raise ValueError("peak_gflops=0: a finite number > 0")
    return tasks_per_s * flops_per_task / (peak_gflops * 1e9)


def ceiling_tasks_per_s(flops_per_task: float, peak_gflops: float) -> float:
    """The tasks/s at the matmul peak: peak FLOP/s / FLOPs per task."""
    return peak_gflops * 1e9 / flops_per_task


# ------------------------------------------------------------------------------------ machine
def cpu_model() -> str | None:
    """``model name`` of /proc/cpuinfo (None where there is none: not Linux, or not x86)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or None


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine() -> dict:
    dev = jax.devices()[0]
    return dict(
        device=f"{dev.platform}:{dev.device_kind}",
        device_kind=dev.device_kind,
        platform=dev.platform,
        num_devices=jax.device_count(),
        cpu_model=cpu_model(),
        num_cpus=os.cpu_count(),
        host=platform.node(),
        jax_version=jax.__version__,
    )


# ------------------------------------------------------------------------------------ main
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workload", choices=throughput.META_WORKLOADS, default="omniglot-5w1s")
    p.add_argument(
        "--method",
        choices=fmljax.METHODS,
        default="maml",
        help="the method of flops_per_task (fomaml is always counted too)",
    )
    p.add_argument(
        "--sizes",
        default=",".join(map(str, DEFAULT_SIZES)),
        help="comma-separated n of the n x n float32 dots (default %(default)s)",
    )
    p.add_argument("--repeats", type=int, default=10, help="timed dots per size (median)")
    p.add_argument(
        "--precision",
        choices=("default", "high", "highest"),
        default=None,
        help="jnp.dot precision (default: jax's default, as the timed programs use)",
    )
    p.add_argument(
        "--conv-impl",
        choices=fmljax.models.CONV_IMPLS,
        default=None,
        help="Conv4's convolution (default auto, as throughput.py)",
    )
    p.add_argument(
        "--full-compile",
        action="store_true",
        help="count FLOPs of fully optimised compilations (default: LLVM optimisation off, "
        "which leaves XLA's HLO and its cost analysis unchanged and compiles faster)",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--tag", default=None, help="free text copied into the JSON line")
    return p


def main(argv=None) -> dict:
    p = parser()
    a = p.parse_args(argv)
    try:
        sizes = tuple(int(x) for x in a.sizes.split(",") if x.strip())
    except ValueError:
        p.error(f"--sizes={a.sizes!r}: comma-separated integers")
    if not sizes or min(sizes) < 1 or a.repeats < 1:
        p.error(f"--sizes={a.sizes!r} --repeats={a.repeats}: sizes >= 1, repeats >= 1")
    t0 = time.perf_counter()
    load_start = _load()
    rec: dict = dict(kind="roofline", **machine(), load_avg_start=load_start)
    rec.update(
        count_flops(a.workload, a.method, conv_impl=a.conv_impl, fast_compile=not a.full_compile)
    )
    rec.update(measure_peak(sizes, a.repeats, precision=a.precision))
    rec.update(
        ceiling_tasks_per_s=(
            ceiling_tasks_per_s(rec["flops_per_task"], rec["peak_gflops"])
            if rec["flops_per_task"]
            else None
        ),
        load_avg_1m_end=(_load() or [None])[0],
        wall_s=time.perf_counter() - t0,
        tag=a.tag,
    )
    if a.json:
        print(json.dumps(rec), flush=True)
    else:
        g = lambda v: "–" if v is None else f"{v / 1e9:.4g} GFLOP"
        print(
            f"{rec['workload']} {rec['method']} (conv {rec['conv_impl']}): "
            f"{g(rec['flops_per_task'])}/task, {FIRST_ORDER} {g(rec['flops_per_task_first_order'])}"
            f"/task; meta-batch {rec['meta_batch']} step {g(rec['flops_meta_batch_step'])} "
            f"({rec['batch_over_tasks']:.3f}x {rec['meta_batch']} tasks)\n"
            f"matmul peak on {rec['device']} ({rec['cpu_model']}): "
            + ", ".join(f"n={r['n']}: {r['gflops']:.1f} GFLOP/s" for r in rec["peak"])
            + f"; ceiling {rec['ceiling_tasks_per_s']:.1f} tasks/s; load at start "
            f"{load_start}",
            flush=True,
        )
    return rec


if __name__ == "__main__":
    main(sys.argv[1:])
