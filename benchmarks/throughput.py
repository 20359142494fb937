"""Meta-step and federated-round throughput, with an interleaved simple baseline.

    python benchmarks/throughput.py --workload=omniglot-5w1s --method=maml --inner-steps=1 \
        --baseline --json
    python benchmarks/throughput.py --workload=sinusoid --method=maml --inner-steps=1 \
        --steps-per-call=10 --baseline --json
    python benchmarks/throughput.py --workload=fed-round --model=conv4 --method=fedmeta-maml \
        --inner-steps=1 --clients=32 --baseline --json
    python benchmarks/throughput.py --workload=meta-step \
        --model=benchmarks/models_example.py:small_cnn --method=maml --baseline --json
    python benchmarks/throughput.py --workload=fed-round --model=benchmarks.models_example:small_cnn \
        --method=fedmeta-maml --clients=32 --baseline --json

Workloads (all built from the library's own ``fmljax.conv4`` / ``fmljax.mlp`` /
``fmljax.meta_gradient`` / ``fmljax.build``; nothing is reimplemented here):

* ``sinusoid``: MLP 1-40-40-1, K = 10 support + 10 query points, meta-batch 25, inner rate 0.01.
* ``omniglot-5w1s``: the MAML reference Conv4 (stride 2, SAME, batch norm on the batch's own
  statistics, ReLU, spatial mean, linear head), 5 support + 75 query 28x28x1 images per task,
  meta-batch 32, inner rate 0.4. Random images: the cost does not depend on the pixels.
* ``omniglot-5w1s-pool``: the same with stride 1 and 2x2 max-pool after each block.
* ``omniglot-20w1s``: 20-way 1-shot, 20 support + 300 query, meta-batch 16 (MAML's setting).
* ``fed-round``: one federated round (``--clients`` M clients x 5 local meta-steps x 4 tasks),
  ``--model=mlp`` (sinusoid clients), ``--model=conv4`` (5-way 1-shot episodes of random
  images per client) or a user's model (``--model=PKG.MODULE:FUNCTION``, below).
* ``meta-step``: the meta-step of a user's model (``--model=PKG.MODULE:FUNCTION``, required):
  its meta-batch (``--meta-batch``, default the provider's ``meta_batch``) of tasks drawn by
  its ``sample_task``, task ``i`` from client ``i mod C`` of its ``clients``.

A user's model, ``--model=PKG.MODULE:FUNCTION`` or ``--model=path/to/file.py:FUNCTION``
(``PKG.MODULE`` is imported from ``sys.path``, the current directory first as with
``python -m``; a file path is loaded as a module): ``FUNCTION()`` is called with no arguments
(bind any options in a small wrapper function) and returns a :class:`UserModel` or a dict with
its keys:

* ``model``: ``init(key) -> params`` and ``apply(params, x)`` (e.g. ``fmljax.Model``; a
  flax.linen module wrapped by hand: ``init = lambda k: module.init(k, x0)['params']``,
  ``apply = lambda p, x, mask=None: module.apply({'params': p}, x)``);
* ``loss_fn``: ``loss_fn(params, batch) -> scalar`` (e.g. ``fmljax.cross_entropy_loss(apply)``);
* ``sample_task``: ``sample_task(key, client) -> (support, query)``, pure and jittable, on ONE
  client's slice of ``clients`` (e.g. ``fmljax.data.episode_task_sampler(...)``);
* ``clients``: a PyTree of arrays with a leading client axis C (``fed-round`` needs C >=
  ``--clients``; an optional ``'num_examples'`` [C] weighs the average);
* optional ``inner_lr`` (default 0.1), ``meta_batch`` (tasks per meta-step, default 32) and
  ``name`` (free text, reported as ``model_name``).

``benchmarks/models_example.py`` is an example (a flax.linen CNN, ``small_cnn``). The
provider is called, its shapes checked with ``jax.eval_shape`` (``model.init``,
``sample_task`` on client 0, ``loss_fn``) and its values validated before anything compiles;
a bad ``--model`` (module or file not found, no such function, a wrong return value) is one
line on stderr naming ``--model`` and what is allowed, exit code 2. A user's model runs with
``--workload=meta-step`` or ``fed-round`` only (the other workloads are built-in models), and
not with ``--conv-impl`` / ``--baseline-conv-impl`` / ``--pytorch`` (Conv4 only).

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
the one-jit line carrying ``speedup_vs_<baseline>`` ratios of the medians. Every field is what
ran: ``model`` is ``mlp``, ``conv4`` or the ``--model`` string of a user's model (whose
``name`` is ``model_name``, else null); ``conv_impl`` is the Conv4's, or for a user's model
made by ``fmljax.from_linen`` / ``from_nnx`` the one it resolved (``fmljax.conv_impl_of``),
else null;
``param_count`` and ``param_shapes`` (``{"path/to/leaf": [shape]}``) are those of
``model.init`` (Meta-SGD's learned rates, as many again, are not counted); ``task_shapes``
the shapes of one task's support and query; ``inner_lr`` the inner rate. Timing: the
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
import math
import numbers
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import fmljax
from fmljax.mapping import map_over

META_WORKLOADS = ("sinusoid", "omniglot-5w1s", "omniglot-5w1s-pool", "omniglot-20w1s")
WORKLOADS = META_WORKLOADS + ("meta-step", "fed-round")
BUILTIN_MODELS = ("mlp", "conv4")
USER_WORKLOADS = ("meta-step", "fed-round")


# ------------------------------------------------------------------------------------ user models
class UserModel(NamedTuple):
    """What ``--model=PKG.MODULE:FUNCTION`` returns (a dict with these keys will do).

    ``model``: ``init(key) -> params`` / ``apply(params, x)``; ``loss_fn(params, batch) ->
    scalar``; ``sample_task(key, client) -> (support, query)`` on one client of ``clients``
    (a PyTree with a leading client axis C); ``inner_lr``, ``meta_batch`` (tasks per
    ``meta-step``) and ``name`` (reported as ``model_name``) are optional.
    """

    model: Any
    loss_fn: Callable[..., Any]
    sample_task: Callable[..., Any]
    clients: Any
    inner_lr: float = 0.1
    meta_batch: int = 32
    name: str | None = None


_REQUIRED = tuple(f for f in UserModel._fields if f not in UserModel._field_defaults)
_MODEL_ALLOWED = (
    "allowed: mlp, conv4, PKG.MODULE:FUNCTION or path/to/file.py:FUNCTION, FUNCTION() returning "
    f"a dict or NamedTuple with {', '.join(_REQUIRED)} "
    f"(optional: {', '.join(UserModel._field_defaults)})"
)


class ModelError(ValueError):
    """A bad ``--model``: the message is one line naming ``--model`` and what is allowed."""


def _import_provider(spec: str):
    """The module of ``PKG.MODULE`` (``sys.path``, the current directory first) or a file."""
    import importlib
    import importlib.util

    where = spec.rpartition(":")[0]
    if where.endswith(".py") or os.sep in where or "/" in where:
        if not os.path.isfile(where):
            raise ModelError(f"--model={spec!r}: no such file {where!r}; {_MODEL_ALLOWED}")
        name = "_throughput_user_" + os.path.splitext(os.path.basename(where))[0]
        module_spec = importlib.util.spec_from_file_location(name, where)
        if module_spec is None or module_spec.loader is None:
            raise ModelError(f"--model={spec!r}: {where!r} is not a Python file; {_MODEL_ALLOWED}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclasses (flax modules) look their module up
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise ModelError(
                f"--model={spec!r}: importing {where!r} raised {type(e).__name__}: {e}"
            ) from e
        return module
    if not where or not all(part.isidentifier() for part in where.split(".")):
        raise ModelError(f"--model={spec!r}: {where!r} is not a module name; {_MODEL_ALLOWED}")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as e:
        raise ModelError(
            f"--model={spec!r}: cannot import module {where!r} ({e}); {_MODEL_ALLOWED}"
        ) from e
    except Exception as e:
        raise ModelError(
            f"--model={spec!r}: importing {where!r} raised {type(e).__name__}: {e}"
        ) from e
    finally:
        if added:
            sys.path.remove(os.getcwd())


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _num_leading(tree: Any) -> int:
    leaves = jax.tree.leaves(tree)
    sizes = {getattr(a, "shape", ())[:1] for a in leaves}
    if not leaves or any(len(s) != 1 for s in sizes) or len(sizes) != 1:
        got = sorted({tuple(getattr(a, "shape", ())) for a in leaves})[:4]
        raise ValueError(f"must be a PyTree of arrays with one leading client axis; got {got}")
    return sizes.pop()[0]


def load_user_model(spec: str) -> UserModel:
    """Resolve ``--model=PKG.MODULE:FUNCTION`` (or ``path/file.py:FUNCTION``), call FUNCTION()
    and check what it returns (values and, by ``jax.eval_shape``, shapes; nothing compiles).

    Raises:
      ModelError: one line naming ``--model`` and what is allowed.
    """
    try:
        return _load_user_model(spec)
    except ModelError as e:
        if "allowed:" in str(e):
            raise
        raise ModelError(f"{e}; {_MODEL_ALLOWED}") from e


def _load_user_model(spec: str) -> UserModel:
    if ":" not in spec:
        raise ModelError(f"--model={spec!r} is not a built-in model; {_MODEL_ALLOWED}")
    module = _import_provider(spec)
    fn_name = spec.rpartition(":")[2]
    fn = getattr(module, fn_name, None) if fn_name.isidentifier() else None
    if not callable(fn):
        have = sorted(
            k
            for k, v in vars(module).items()
            if callable(v)
            and not k.startswith("_")
            and getattr(v, "__module__", None) == module.__name__
        )
        raise ModelError(
            f"--model={spec!r}: {spec.rpartition(':')[0]!r} has no function {fn_name!r} "
            f"(its functions: {', '.join(have) or 'none'}); {_MODEL_ALLOWED}"
        )
    try:
        got = fn()
    except Exception as e:
        raise ModelError(f"--model={spec!r}: {fn_name}() raised {_one_line(e)}") from e
    if hasattr(got, "_asdict"):
        got = got._asdict()
    if not isinstance(got, dict):
        raise ModelError(
            f"--model={spec!r}: {fn_name}() returned a {type(got).__name__}; {_MODEL_ALLOWED}"
        )
    missing = [k for k in _REQUIRED if k not in got]
    unknown = [k for k in got if k not in UserModel._fields]
    if missing or unknown:
        what = "; ".join(
            x
            for x in (
                missing and f"missing {', '.join(missing)}",
                unknown and f"unknown {', '.join(map(str, unknown))}",
            )
            if x
        )
        raise ModelError(f"--model={spec!r}: {fn_name}() returned {what}; {_MODEL_ALLOWED}")
    user = UserModel(**got)

    def bad(field: str, why: str) -> ModelError:
        return ModelError(f"--model={spec!r}: {fn_name}() returned {field}: {why}")

    if not (
        callable(getattr(user.model, "init", None)) and callable(getattr(user.model, "apply", None))
    ):
        raise bad("model", f"{type(user.model).__name__} has no callable init and apply")
    for field in ("loss_fn", "sample_task"):
        if not callable(getattr(user, field)):
            raise bad(field, f"{getattr(user, field)!r} is not callable")
    lr = user.inner_lr
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not 0 < lr < math.inf:
        raise bad("inner_lr", f"{lr!r} is not a finite number > 0")
    mb = user.meta_batch
    if isinstance(mb, bool) or not isinstance(mb, numbers.Integral) or mb < 1:
        raise bad("meta_batch", f"{mb!r} is not an int >= 1")
    if user.name is not None and not isinstance(user.name, str):
        raise bad("name", f"{user.name!r} is not a str or None")
    try:
        _num_leading(user.clients)
    except ValueError as e:
        raise bad("clients", str(e)) from e
    # shapes, traced only: model.init, sample_task on client 0, loss_fn on its support
    key = jax.random.key(0)
    client0 = jax.tree.map(lambda a: a[0], user.clients)
    try:
        params = jax.eval_shape(user.model.init, key)
    except Exception as e:
        raise bad("model", f"model.init(key) raised {_one_line(e)}") from e
    try:
        task = jax.eval_shape(user.sample_task, key, client0)
    except Exception as e:
        raise bad("sample_task", f"sample_task(key, clients[0]) raised {_one_line(e)}") from e
    if not (isinstance(task, tuple | list) and len(task) == 2):
        raise bad(
            "sample_task",
            f"sample_task(key, clients[0]) returned {type(task).__name__}, "
            "not a (support, query) pair",
        )
    try:
        loss = jax.eval_shape(user.loss_fn, params, task[0])
    except Exception as e:
        raise bad("loss_fn", f"loss_fn(params, support) raised {_one_line(e)}") from e
    if getattr(loss, "shape", None) != ():
        raise bad("loss_fn", f"loss_fn(params, support) is not a scalar: {loss}")
    return user._replace(inner_lr=float(lr), meta_batch=int(mb))


def _shapes(tree: Any) -> dict[str, list[int]]:
    """``{"path/to/leaf": [shape]}`` of a PyTree of arrays (or of ``ShapeDtypeStruct``-s)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k, simple=True, separator="/"): list(a.shape) for k, a in flat}


def _ran(params, support, query, inner_lr) -> dict:
    """The JSON fields that say what model and tasks ran (one task's support / query)."""
    return dict(
        param_count=int(sum(math.prod(a.shape) for a in jax.tree.leaves(params))),
        param_shapes=_shapes(params),
        task_shapes={"support": _shapes(support), "query": _shapes(query)},
        inner_lr=inner_lr,
    )


# ------------------------------------------------------------------------------------ setup
def _workload_spec(args) -> dict:
    user = getattr(args, "user", None)
    if args.workload == "meta-step" or user is not None:  # a user's model (checked in main)
        spec = dict(model=args.model, user=user, tasks=user.meta_batch, inner_lr=user.inner_lr)
    elif args.workload == "sinusoid":
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
    if spec.get("user") is not None:
        return spec["user"].model, spec["user"].loss_fn
    if spec["model"] == "mlp":
        model = fmljax.mlp((1, 40, 40, 1))
        return model, fmljax.mse_loss(model.apply)
    model = fmljax.conv4(spec["ways"], mode=spec["mode"], impl=conv_impl)
    return model, fmljax.cross_entropy_loss(model.apply)


def _meta_batches(spec: dict, n: int, key) -> tuple[dict, dict]:
    """``n`` meta-batches: support/query dicts with leading axes [n, T, ...]."""
    t = spec["tasks"]
    if spec.get("user") is not None:  # task i of the n*t from client i mod C
        user = spec["user"]
        c = jax.tree.leaves(user.clients)[0].shape[0]
        take = jax.vmap(
            lambda k, i: user.sample_task(k, jax.tree.map(lambda a: a[i], user.clients))
        )
        s, q = take(jax.random.split(key, n * t), jnp.arange(n * t) % c)
        shape = lambda tree: jax.tree.map(lambda a: a.reshape((n, t) + a.shape[1:]), tree)
        return shape(s), shape(q)
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


def make_meta_step(args, task_grad, opt):
    """The timed meta-step: ``((params, opt_state), (support, query)) -> (new state, loss)``,
    the per-task meta-gradients mapped over the task axis (``args.task_map``), their mean and
    the ``opt`` step (``benchmarks/roofline.py`` counts the FLOPs of this same function)."""

    def meta_step(state, batch):
        p, o = state
        s, q = batch
        losses, grads = map_over(lambda t: task_grad(p, *t), (s, q), args.task_map, args.task_chunk)
        g = jax.tree.map(lambda a: jnp.mean(a, 0), grads)
        upd, o = opt.update(g, o, p)
        return (optax.apply_updates(p, upd), o), jnp.mean(losses)

    return meta_step


def meta_contenders(args) -> tuple[list[Contender], int]:
    spec = _workload_spec(args)
    n = args.steps_per_call
    model, loss_fn = _model_and_loss(spec, args.conv_impl)
    opt = optax.adam(1e-3)
    model_params = model.init(jax.random.key(0))
    params = _meta_params(args, model_params, spec["inner_lr"])
    support, query = _meta_batches(spec, n, jax.random.key(1))
    task0 = lambda tree: jax.tree.map(lambda a: a[0, 0], tree)
    args.ran = _ran(model_params, task0(support), task0(query), spec["inner_lr"])
    task_grad = _task_grad_fn(args, loss_fn, spec["inner_lr"])

    meta_step = make_meta_step(args, task_grad, opt)

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
    user = getattr(args, "user", None)
    if user is not None:
        model, loss_fn, sampler, data = user.model, user.loss_fn, user.sample_task, user.clients
        inner_lr, b_loss_fn = user.inner_lr, user.loss_fn
    elif args.model == "mlp":
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
    task = jax.eval_shape(sampler, jax.random.key(3), jax.tree.map(lambda a: a[0], data))
    args.ran = _ran(params, *task, inner_lr)
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
    p.add_argument(
        "--model",
        default=None,
        metavar="{mlp,conv4,PKG.MODULE:FUNCTION,path/to/file.py:FUNCTION}",
        help="fed-round: mlp (default), conv4 or a user's model; meta-step: a user's model "
        "(required). A user's FUNCTION() returns a dict or NamedTuple with model, loss_fn, "
        "sample_task, clients (optional: inner_lr, meta_batch, name), e.g. "
        "--model=benchmarks/models_example.py:small_cnn (see the top of this help)",
    )
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--tasks-per-client", type=int, default=4)
    p.add_argument("--task-map", choices=fmljax.mapping.MAP_MODES, default="vmap")
    p.add_argument("--task-chunk", type=int, default=None, help="chunk size of --task-map=chunked")
    p.add_argument("--client-map", choices=fmljax.mapping.MAP_MODES, default="vmap")
    p.add_argument("--client-chunk", type=int, default=None)
    p.add_argument(
        "--conv-impl",
        choices=fmljax.models.CONV_IMPLS,
        default=None,
        help="Conv4's convolution (default auto; not with a user's --model)",
    )
    p.add_argument(
        "--baseline-conv-impl",
        choices=fmljax.models.CONV_IMPLS,
        default=None,
        help="Conv4's conv of the loop baselines (default: lax per task; fed-round: --conv-impl)",
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


def _usage_error(message: str) -> None:
    """One line on stderr and exit code 2 (argparse's code), before anything compiles."""
    print(f"throughput.py: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _user_conv_impl(args) -> str | None:
    """What a user's model built by ``fmljax.from_linen`` / ``from_nnx`` did with its
    convolutions (``'im2col'`` or ``'lax'``, see ``fmljax.conv_impl_of``); else None."""
    user = getattr(args, "user", None)
    return None if user is None else fmljax.conv_impl_of(user.model)


def _check_user_model(args) -> None:
    """Resolve ``--model``: ``args.user`` is the :class:`UserModel` or None (built-in)."""
    args.user = None
    if args.model is None:  # fed-round: mlp; a meta workload: its own
        args.model = "mlp" if args.workload == "fed-round" else None
    if args.model is not None and args.model not in BUILTIN_MODELS:
        try:
            args.user = load_user_model(args.model)
        except ModelError as e:
            _usage_error(str(e))
    if args.user is None:
        if args.workload == "meta-step":
            given = f"--model={args.model!r}" if args.model else "no --model"
            _usage_error(
                f"{given}: --workload=meta-step needs a user's model (the built-in ones run "
                f"as {', '.join(META_WORKLOADS)} and fed-round); allowed: "
                "--model=PKG.MODULE:FUNCTION or --model=path/to/file.py:FUNCTION"
            )
        if args.model is not None and args.workload in META_WORKLOADS:
            own = _workload_spec(args)["model"]
            if args.model != own:
                _usage_error(
                    f"--model={args.model!r}: --workload={args.workload} runs its own model, "
                    f"{own}; allowed: --model={own} or no --model"
                )
        return
    if args.workload not in USER_WORKLOADS:
        _usage_error(
            f"--model={args.model!r}: a user's model does not run as --workload="
            f"{args.workload} (a built-in model's workload); allowed: --workload=meta-step or "
            "--workload=fed-round"
        )
    for flag, value in (
        ("--conv-impl", args.conv_impl),
        ("--baseline-conv-impl", args.baseline_conv_impl),
        ("--pytorch", args.pytorch or None),
    ):
        if value is not None:
            _usage_error(
                f"{flag} is for the built-in conv4 only, not --model={args.model!r}; allowed: "
                f"no {flag} with a user's model"
            )
    c = _num_leading(args.user.clients)
    if args.workload == "fed-round" and args.clients > c:
        _usage_error(
            f"--clients={args.clients}: --model={args.model!r} has {c} clients; allowed: "
            f"--clients <= {c}"
        )


def main(argv=None) -> list[dict]:
    p = parser()
    args = p.parse_args(argv)

    fed = args.workload == "fed-round"
    allowed = tuple(fmljax.ALGORITHMS) if fed else fmljax.METHODS
    if args.method not in allowed:
        p.error(f"--method={args.method!r}: for --workload={args.workload} one of {allowed}")
    _check_user_model(args)
    if args.user is None:  # record what ran
        args.conv_impl = fmljax.models._resolve_conv_impl(args.conv_impl or "auto")
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
        model_name=None if args.user is None else args.user.name,
        **args.ran,
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
            conv_impl=c.info.get("conv_impl") or _user_conv_impl(args),
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
