"""The training loop: a federated run from an ml_collections config, resumable, with files.

``train_and_evaluate(config, workdir)`` builds the task source and the algorithm named in the
config, compiles ``rounds_per_call`` rounds into one jitted call (``lax.scan`` over rounds,
server state donated), and writes into ``workdir``:

* ``config.json``: the config of the run;
* ``metrics.jsonl``: one JSON object per line, ``{'round', 'split', <metric>: value, ...,
  'wall_s'}``; ``split`` is ``'train'`` for round metrics, ``'val'`` for periodic
  personalised evaluation and ``'test'`` for the final one (the means of ``summary.json``);
  ``wall_s`` counts from the run's first start, summed over resumed processes (the elapsed
  time is kept in each checkpoint);
* ``checkpoints/``: orbax checkpoints of the whole training state every ``checkpoint_every``
  rounds and when the process gets SIGTERM or SIGINT (the last ``keep_checkpoints`` kept);
* ``summary.json``: the final personalised evaluation on the test clients, each metric's mean
  and 95% confidence interval over the evaluation clients; ``wall_s`` (cumulative) and
  ``wall_s_this_process``; ``model_bytes`` (the server's parameters, Meta-SGD's rates
  included), ``bytes_per_round`` (``2 * clients_per_round * model_bytes``: down and up) and
  ``bytes_communicated`` (times the rounds); ``code_version``, the git commit of the library
  that ran it.

Checkpoints and resume
    A checkpoint holds the server state (parameters, optimiser state, round counter), the
    rounds' random key and, as JSON, the config fingerprint and the round (which is the
    data-sampling position: round ``r`` uses the key ``fold_in(k_rounds, r)``, so the clients
    and tasks a round sees are a pure function of (seed, round)) and a SHA-256 of its arrays
    (:func:`fmljax.runlog.checksum`). Orbax writes each one into a temporary directory and
    renames it when complete, so a process killed while writing leaves no checkpoint that
    looks whole (the partial directory is deleted on the next start). Re-running the same
    command on the same ``workdir`` resumes from the newest checkpoint that verifies (a
    damaged one is named in one line and moved to ``checkpoints_damaged/``) and ends with
    bit-identical parameters to an uninterrupted run (same devices). ``rounds_per_call`` may
    differ between runs: a call is cut short to end on the next evaluation round,
    checkpoint round or ``num_rounds`` (one more compile per distinct call length).
    A checkpoint written by a different config (other algorithm, model shapes, rates, seed,
    ...) is refused with the list of fields that differ; fields that only steer the loop
    (:data:`LOOP_FIELDS`) may change between runs, and with ``config.init_from`` (a warm
    start from another run's checkpoint) only the state's shapes and dtypes must agree.

Devices and hosts
    The round runs on a mesh (:mod:`fmljax.sharding`) of every device (``config.mesh_shape``,
    default ``(-1,)``, axes ``config.mesh_axes`` (``('clients',)``), sharded over
    ``config.client_axis``): the M sampled clients are spread over the devices (padded with
    masked clients to a multiple of the device count), the server state is replicated.
    ``config.distributed = True`` calls ``jax.distributed.initialize`` first (arguments
    ``coordinator_address``, ``num_processes``, ``process_id`` from the config, or detected on
    TPU pods and SLURM); every process then runs this same function and process 0 writes the
    files.

Failures
    A round whose loss or update is non-finite on a client that finished it is rejected by
    the round itself (the state stays the previous one); the loop then raises
    :class:`NonFiniteRoundError` naming the round and the clients, writes no checkpoint, and
    the last good checkpoint stays. ``config.debug_nojit = True`` runs the rounds one by one
    without ``jit`` on one device (``jax.disable_jit``), so that a failing client can be
    stepped through with a debugger; the error carries the state and key of the failing
    round (``err.state``, ``err.key``) to call ``alg.update`` on by hand.

Configuration
    :func:`validate_config` checks every field the loop reads before any data is built or
    any program compiled; :func:`validate_setup` checks the config against the task's data
    (client counts, model and data shapes, with ``jax.eval_shape``: nothing is compiled).
    Each error names the field, its value and what is allowed. A field that no part of the
    run reads is refused (with "did you mean"); a task of one's own declares its fields with
    ``register_task(name, fields=(...))``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import fmljax
from fmljax import runlog, samplers, sharding
from fmljax.federated import ALGORITHMS, RoundConfig, ServerState, scan_rounds

__all__ = [
    "COMMON_FIELDS",
    "LOOP_FIELDS",
    "MODELS",
    "SERVER_OPTIMIZERS",
    "TASKS",
    "TASK_FIELDS",
    "NonFiniteRoundError",
    "TaskSetup",
    "comparison_table",
    "confidence_interval",
    "config_fingerprint",
    "known_fields",
    "load_checkpoint",
    "register_task",
    "run_experiment",
    "train_and_evaluate",
    "validate_config",
    "validate_setup",
]

MODELS = ("mlp", "conv4", "logistic_regression")
SERVER_OPTIMIZERS = ("sgd", "adam")

# Fields that steer the loop, not the numbers it computes: they may change between a run and
# its resumption. Every other field is part of the checkpoint's config fingerprint.
LOOP_FIELDS = (
    "num_rounds",
    "rounds_per_call",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "debug_nojit",
    "mesh_shape",
    "mesh_axes",
    "client_axis",
    "distributed",
    "coordinator_address",
    "num_processes",
    "process_id",
    "init_from",
    "runlocal",
)


class NonFiniteRoundError(FloatingPointError):
    """A round had a non-finite loss or update; it was rejected and the run stopped.

    Attributes: ``round`` (1-based, the round that failed), ``clients`` (indices of the
    failing clients in the training data), ``state`` (the last good server state, the input
    of the failing round), ``key`` (that round's key: ``alg.update(state, key, data)``
    reproduces it).
    """

    def __init__(self, message: str, round: int, clients: list[int], state: Any, key: Any):
        super().__init__(message)
        self.round, self.clients, self.state, self.key = round, clients, state, key


@dataclasses.dataclass(frozen=True)
class TaskSetup:
    """What a task source gives the training loop.

    ``sample_task`` draws the training tasks of the rounds (from ``train_data``);
    ``eval_sample_task`` the evaluation tasks of ``val_data`` / ``test_data`` (support to
    adapt on, query to score). ``eval_sample_task=None``: ``sample_task.evaluation`` of a
    split-aware sampler (:func:`fmljax.data.client_batch_sampler` on
    :func:`fmljax.data.federate` data: adapt on each client's ``'train'`` examples, score on
    its ``'test'`` examples), else ``sample_task`` itself, which :func:`validate_setup`
    refuses for evaluation data that holds held-out examples (see :func:`fmljax.build`).
    """

    model: fmljax.Model
    loss_fn: Callable  # loss_fn(params, batch) -> scalar
    metrics_fn: Callable  # metrics_fn(params, batch) -> dict of scalars
    sample_task: Callable  # sample_task(key, client) -> (support, query), training tasks
    train_data: Any  # federated training clients, leading axis C
    val_data: Any  # held-out clients for periodic evaluation
    test_data: Any  # held-out clients for the final evaluation
    target_metric: str  # the metric the progress line shows ('mse', 'accuracy')
    eval_sample_task: Callable | None = None  # evaluation tasks (None: see above)


TASKS: dict[str, Callable[[ml_collections.ConfigDict], TaskSetup]] = {}
TASK_FIELDS: dict[str, tuple[str, ...]] = {}

# Fields every run may have (besides :data:`LOOP_FIELDS` and the RoundConfig fields); a
# task's own fields are declared with ``register_task(name, fields=...)``. Any other field
# is refused, so that a misspelt one (``inner_lrr``) is not silently ignored.
COMMON_FIELDS = (
    "task",
    "algorithm",
    "model",
    "seed",
    "seeds",
    "data_seed",
    "overrides",
    "server_optimizer",
    "server_lr",
    "fine_tune",
    "algorithm_options",  # the algorithm's hyperparameters for fmljax.build, e.g. {'mu': 0.01}
    "float64",
    "hidden",
    "num_clients",
    "num_eval_clients",
    "support_size",
    "query_size",
    "target_accuracy",  # read by experiments/collect.py (rounds to a target)
    "finetune_rounds",  # experiments/configs/jiang.py: the warm start's length, recorded
    "stage",  # experiments/configs/jiang.py: which stage of the two-stage run
)


def register_task(name: str, fields: tuple[str, ...] = ()):
    """Decorator: register ``builder(config) -> TaskSetup`` under ``config.task == name``.

    ``fields``: the config fields the builder reads beyond :data:`COMMON_FIELDS`."""

    def deco(fn):
        TASKS[name] = fn
        TASK_FIELDS[name] = tuple(fields)
        return fn

    return deco


def known_fields(task: str) -> tuple[str, ...]:
    """Every config field a run of ``task`` may have."""
    rc = tuple(f.name for f in dataclasses.fields(RoundConfig))
    return (*COMMON_FIELDS, *LOOP_FIELDS, *rc, *TASK_FIELDS.get(task, ()))


def _did_you_mean(name: str, choices: Any) -> str:
    import difflib

    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


@register_task("sinusoid")
def _sinusoid(config: ml_collections.ConfigDict) -> TaskSetup:
    """Each client one sinusoid (MAML's distribution); held-out clients for val and test."""
    if config.get("model", "mlp") != "mlp":
        raise ValueError(
            f"config.model={config.model!r} is invalid for task 'sinusoid': must be 'mlp'"
        )
    dtype = jnp.float64 if config.get("float64", False) else jnp.float32
    hidden = tuple(config.get("hidden", (40, 40)))
    model = fmljax.mlp((1, *hidden, 1), dtype=dtype)
    key = jax.random.key(config.data_seed)
    k_tr, k_va, k_te = jax.random.split(key, 3)
    sampler = fmljax.data.sinusoid_task_sampler(config.support_size, config.query_size)
    return TaskSetup(
        model=model,
        loss_fn=fmljax.mse_loss(model.apply),
        metrics_fn=fmljax.regression_metrics(model.apply),
        sample_task=sampler,
        eval_sample_task=sampler,  # held-out clients: K and Q fresh points of each sinusoid
        train_data=fmljax.data.sample_sinusoid_clients(k_tr, config.num_clients, dtype),
        val_data=fmljax.data.sample_sinusoid_clients(k_va, config.num_eval_clients, dtype),
        test_data=fmljax.data.sample_sinusoid_clients(k_te, config.num_eval_clients, dtype),
        target_metric="mse",
    )


def make_server_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """``config.server_optimizer`` in {'sgd', 'adam'} with ``config.server_lr``."""
    name, lr = config.server_optimizer, config.server_lr
    if name == "sgd":
        return optax.sgd(lr)
    if name == "adam":
        return optax.adam(lr)
    raise ValueError(
        f"config.server_optimizer={name!r} is invalid: must be one of {SERVER_OPTIMIZERS}"
    )


def algorithm_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``config.algorithm_options`` as keyword arguments of :func:`fmljax.build` (the
    algorithm's hyperparameters, e.g. ``{'mu': 0.01}`` for FedProx); ``{}`` when absent."""
    options = config.get("algorithm_options", None)
    if options is None:
        return {}
    return dict(options.to_dict() if hasattr(options, "to_dict") else options)


def round_config(config: ml_collections.ConfigDict) -> RoundConfig:
    """The :class:`RoundConfig` fields taken from ``config`` (unknown ones are ignored)."""
    fields = {f.name for f in dataclasses.fields(RoundConfig)}
    return RoundConfig(**{k: v for k, v in config.items() if k in fields})


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Check every field the loop reads; errors name the field, its value and what is allowed.

    Needs no data and compiles nothing: call it before anything else.
    """

    def need(cond: bool, field: str, allowed: str) -> None:
        if not cond:
            raise ValueError(f"config.{field}={config.get(field)!r} is invalid: must be {allowed}")

    task = config.get("task")
    need(
        task in TASKS,
        "task",
        f"one of {tuple(sorted(TASKS))}{_did_you_mean(task, TASKS)}",
    )
    known = known_fields(task)
    for field in config.keys():
        if field not in known:
            raise ValueError(
                f"config.{field} is not a field of a run of task {task!r}"
                f"{_did_you_mean(field, known)}; a task's own fields are declared with "
                "register_task(name, fields=...)"
            )
    names = str(config.get("algorithm", "")).split(",")
    for name in names:
        need(
            name.strip() in ALGORITHMS,
            "algorithm",
            f"one (or a comma-separated list) of {tuple(ALGORITHMS)}"
            + _did_you_mean(name.strip(), ALGORITHMS),
        )
    if "model" in config:
        need(config.model in MODELS, "model", f"one of {MODELS}")
    for field in (
        "num_rounds",
        "rounds_per_call",
        "eval_every",
        "checkpoint_every",
        "keep_checkpoints",
    ):
        v = config.get(field)
        need(_is_int(v) and v >= 1, field, "an int >= 1")
    for field in ("seed", "data_seed"):
        if field in config:
            need(_is_int(config[field]) and config[field] >= 0, field, "an int >= 0")
    for field in ("num_clients", "num_eval_clients", "support_size", "query_size"):
        if field in config:
            need(_is_int(config[field]) and config[field] >= 1, field, "an int >= 1")
    if "hidden" in config:
        hidden = config.hidden
        need(
            isinstance(hidden, (tuple, list)) and all(_is_int(h) and h >= 1 for h in hidden),
            "hidden",
            "a tuple of layer widths, each an int >= 1",
        )
    need(
        config.get("server_optimizer") in SERVER_OPTIMIZERS,
        "server_optimizer",
        f"one of {SERVER_OPTIMIZERS}",
    )
    lr = config.get("server_lr", 0)
    finite = lambda v: _is_number(v) and math.isfinite(v) and v > 0
    need(finite(lr), "server_lr", "a finite number > 0")
    for field in ("local_lr", "inner_lr", "fd_delta"):
        if field in config:
            need(finite(config[field]), field, "a finite number > 0")
    if "num_clients" in config and "clients_per_round" in config:
        need(
            config.clients_per_round <= config.num_clients,
            "clients_per_round",
            f"<= config.num_clients={config.num_clients}",
        )
    for field in ("fine_tune", "debug_nojit", "distributed", "float64"):
        if field in config:
            need(isinstance(config[field], bool), field, "True or False")
    need(
        not config.get("fine_tune", False) or config.algorithm in ("fedavg", "fedprox"),
        "fine_tune",
        "False unless config.algorithm is 'fedavg' or 'fedprox'",
    )
    options = config.get("algorithm_options", None)
    need(
        options is None or isinstance(options, Mapping | ml_collections.ConfigDict),
        "algorithm_options",
        "None or a dict of the algorithm's hyperparameters (e.g. {'mu': 0.01} for 'fedprox')",
    )
    mesh_axes = tuple(config.get("mesh_axes", (sharding.CLIENT_AXIS,)))
    client_axis = config.get("client_axis", sharding.CLIENT_AXIS)
    need(
        isinstance(client_axis, str) and client_axis in mesh_axes,
        "client_axis",
        f"one of config.mesh_axes={mesh_axes!r}",
    )
    shape = config.get("mesh_shape", (-1,))
    need(
        isinstance(shape, (tuple, list))
        and len(shape) == len(mesh_axes)
        and all(_is_int(n) and (n >= 1 or n == -1) for n in shape)
        and sum(n == -1 for n in shape) <= 1,
        "mesh_shape",
        f"{len(mesh_axes)} ints, one per axis of config.mesh_axes={mesh_axes!r}, each >= 1 "
        "or one -1 for the remaining devices",
    )
    rc = round_config(config)
    try:
        rc.validate()
    except ValueError as e:  # the config's own names for RoundConfig's fields
        raise ValueError(str(e).replace("RoundConfig.", "config.")) from None
    algorithm = str(config.algorithm).strip()
    if algorithm in ("fedavg", "fedprox"):  # a list: run_experiment checks each run
        fine_tune = config.get("fine_tune", False)
        fmljax.federated._check_fine_tune(
            fine_tune, rc, "config.", "config.fine_tune", f"config.algorithm={algorithm!r}"
        )
    for name in str(config.algorithm).split(","):
        if ALGORITHMS[name.strip()][0] == "meta":
            need(rc.inner_steps >= 1, "inner_steps", f"an int >= 1 for {name.strip()!r}")


def validate_setup(config: ml_collections.ConfigDict, setup: TaskSetup) -> None:
    """Check the config against the task's data without compiling anything.

    ``clients_per_round`` against the training clients, and the model against the data: the
    loss of one task of the first client is traced with ``jax.eval_shape`` (shapes only).
    """

    def clients(data: Any) -> int:
        leaves = jax.tree.leaves(data)
        return int(leaves[0].shape[0]) if leaves else 0

    c = clients(setup.train_data)
    if config.clients_per_round > c:
        raise ValueError(
            f"config.clients_per_round={config.clients_per_round} is invalid: must be <= the "
            f"number of training clients of task {config.task!r} ({c})"
        )
    for split, data in (("val_data", setup.val_data), ("test_data", setup.test_data)):
        if clients(data) < 1:
            raise ValueError(f"task {config.task!r}: {split} has no clients")
    client = jax.tree.map(lambda x: x[0], setup.train_data)
    key = jax.random.key(0)
    try:
        support, query = jax.eval_shape(setup.sample_task, key, client)
    except Exception as e:
        raise ValueError(
            f"task {config.task!r}: sample_task fails on the training data with "
            f"support_size={config.get('support_size')!r}, "
            f"query_size={config.get('query_size')!r}: {e}"
        ) from e
    params = jax.eval_shape(setup.model.init, key)
    shapes = lambda t: jax.tree.map(lambda a: tuple(a.shape), t)
    for name, batch in (("support", support), ("query", query)):
        try:
            out = jax.eval_shape(setup.loss_fn, params, batch)
        except Exception as e:
            raise ValueError(
                f"config: the model does not fit the data of task {config.task!r} "
                f"(model={config.get('model', 'default')!r}, "
                f"hidden={config.get('hidden')!r}): parameter shapes {shapes(params)} "
                f"against {name} batch shapes {shapes(batch)}: {e}"
            ) from e
        if out.shape != ():
            raise ValueError(
                f"task {config.task!r}: the loss on a {name} batch has shape {out.shape}, "
                "must be a scalar"
            )
    _check_labels(config, setup, params, support)
    _check_memory(config, params)
    _check_evaluation(config, setup)


def _check_evaluation(config: ml_collections.ConfigDict, setup: TaskSetup) -> None:
    """The evaluation sampler on the first validation and test client (shapes only): a plain
    sampler is refused for data with held-out examples (it would score training data)."""
    eval_task, guard = samplers.evaluation_sampler(setup.sample_task, setup.eval_sample_task)
    for split in ("val_data", "test_data"):
        data = getattr(setup, split)
        if guard:
            try:
                samplers.check_heldout_evaluation(f"task {config.task!r}", setup.sample_task, data)
            except ValueError as e:
                raise ValueError(
                    f"{e} (TaskSetup.eval_sample_task of the task's builder; {split})"
                ) from None
        client = jax.tree.map(lambda x: x[0], data)
        try:
            jax.eval_shape(eval_task, jax.random.key(0), client)
        except Exception as e:
            raise ValueError(
                f"task {config.task!r}: the evaluation sampler fails on {split}: {e}"
            ) from e


def _label_arrays(data: Any, where: str) -> list[tuple[str, np.ndarray]]:
    """``(path, labels of real examples)`` of every integer ``'y'`` in ``data``."""
    out = []

    def visit(node: Any, path: str) -> None:
        if isinstance(node, Mapping):
            y = node.get("y")
            if y is not None and jnp.issubdtype(jnp.asarray(y).dtype, jnp.integer):
                y = np.asarray(y)
                mask = node.get("mask")
                real = y if mask is None else y[np.asarray(mask) > 0]
                out.append((f"{path}['y']", real))
            for k, v in node.items():
                if k not in ("x", "y", "mask"):
                    visit(v, f"{path}[{k!r}]")

    visit(data, where)
    return out


def _check_labels(config: ml_collections.ConfigDict, setup: TaskSetup, params, batch) -> None:
    """Integer labels of every split within the model's classes (out-of-range labels would
    give NaN or silently wrong losses, and accuracies that look plausible)."""
    if not isinstance(batch, Mapping) or "x" not in batch or "y" not in batch:
        return
    if not jnp.issubdtype(batch["y"].dtype, jnp.integer):
        return
    try:
        logits = jax.eval_shape(setup.model.apply, params, batch["x"])
    except Exception:  # a model that needs more than (params, x): the loss was checked
        return
    classes = int(logits.shape[-1])
    for split in ("train_data", "val_data", "test_data"):
        for path, y in _label_arrays(getattr(setup, split), split):
            if y.size and (y.min() < 0 or y.max() >= classes):
                bad = y[(y < 0) | (y >= classes)]
                raise ValueError(
                    f"task {config.task!r}: {path} has labels {sorted(set(bad.tolist()))[:5]} "
                    f"outside the model's classes: must be in [0, {classes - 1}] (the model "
                    f"has {classes} outputs)"
                )


def _available_bytes() -> tuple[int | None, str]:
    device = jax.devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"
    except (ValueError, OSError, AttributeError):
        return None, ""


def _check_memory(config: ml_collections.ConfigDict, params: Any) -> None:
    """A lower bound of a round's memory against the device's: the meta-parameters once,
    and an adapted copy and a gradient per task the round runs at the same time."""
    p_bytes = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
    rc = round_config(config)
    together = (rc.clients_per_round if rc.client_map == "vmap" else 1) * (
        rc.tasks_per_client if rc.task_map == "vmap" else 1
    )
    need = p_bytes * (1 + 2 * together)
    have, what = _available_bytes()
    if have is not None and need > have:
        gib = lambda b: f"{b / 2**30:.1f} GiB"
        raise ValueError(
            f"config: the model does not fit in memory: its parameters take {gib(p_bytes)}, "
            f"and a round of {together} task(s) at once (clients_per_round="
            f"{rc.clients_per_round}, client_map={rc.client_map!r}, tasks_per_client="
            f"{rc.tasks_per_client}, task_map={rc.task_map!r}) needs at least {gib(need)}, "
            f"more than {what} ({gib(have)}); use a smaller model, fewer clients or tasks "
            "per round, or client_map / task_map = 'map'"
        )


def confidence_interval(values: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of the normal 95% confidence interval (1.96 standard errors)."""
    v = np.asarray(values, np.float64).ravel()
    half = 1.96 * v.std(ddof=1) / math.sqrt(v.size) if v.size > 1 else float("nan")
    return float(v.mean()), float(half)


def code_version() -> str | None:
    """The git commit of the fmljax source (``+dirty`` with uncommitted changes), or None."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        run = lambda *a: subprocess.run(
            ["git", "-C", here, *a], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        commit = run("rev-parse", "--short=7", "HEAD")
        dirty = run("status", "--porcelain", "--untracked-files=no", "--", here)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def _summary(per_client: Mapping[str, jax.Array]) -> dict[str, dict[str, float]]:
    out = {}
    for k, v in per_client.items():
        mean, ci = confidence_interval(np.asarray(v))
        out[k] = {"mean": mean, "ci95": ci, "n": int(np.asarray(v).size)}
    return out


def config_fingerprint(config: ml_collections.ConfigDict, state: Any) -> dict[str, Any]:
    """What must agree between a checkpoint and the run that resumes from it.

    Every config field except :data:`LOOP_FIELDS`, and the shape and dtype of every leaf of
    the training state (JSON-ready)."""
    fields = {k: v for k, v in config.to_dict().items() if k not in LOOP_FIELDS}
    leaves = jax.tree_util.tree_leaves_with_path(state)
    shapes = {
        jax.tree_util.keystr(path): [list(np.shape(x)), str(jnp.asarray(x).dtype)]
        if not isinstance(x, jax.ShapeDtypeStruct)
        else [list(x.shape), str(x.dtype)]
        for path, x in leaves
    }
    return json.loads(json.dumps({"config": fields, "state": shapes}, default=repr))


def _fingerprint_differences(
    saved: dict[str, Any], current: dict[str, Any], most: int = 6
) -> list[str]:
    """One line per differing config field, then up to ``most`` differing state leaves."""
    out = []
    for part, what in (("config", "config.{}"), ("state", "state{}")):
        a, b = saved.get(part, {}), current.get(part, {})
        lines = [
            f"{what.format(k)}: checkpoint {a.get(k, '<absent>')!r}, "
            f"this run {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b), key=lambda k: (not k.startswith(".params"), k))
            if a.get(k, "<absent>") != b.get(k, "<absent>")
        ]
        if part == "state" and len(lines) > most:
            lines = [*lines[:most], f"state: ... and {len(lines) - most} more leaves"]
        out += lines
    return out


def load_checkpoint(workdir: str, step: int | None = None) -> dict[str, Any]:
    """The contents of a run's checkpoint (default: the newest that verifies) as NumPy arrays.

    ``{'state': {'server': (params, opt_state, round), 'rng_key': uint32 [2]}, 'meta':
    {'round', 'fingerprint', 'checksum', ...}, 'step'}``; for inspection and tests (training
    restores typed). Read only: a damaged checkpoint is reported and left where it is.
    """
    ckpt = runlog.Checkpointer(workdir, 1, read_only=True)
    try:
        if step is None:
            got = ckpt.restore(None, move_damaged=False)
            if got is None:
                raise FileNotFoundError(f"no checkpoint that verifies in {ckpt.directory}")
            step, state, meta = got
        else:
            state, meta = ckpt.load(step, None)
    finally:
        ckpt.close()
    return {"state": state, "meta": meta, "step": int(step)}


class _Signals:
    """Turns SIGTERM / SIGINT into a flag the loop checks between calls (main thread only)."""

    def __init__(self):
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _first_failure(metrics: Mapping[str, np.ndarray]) -> int | None:
    bad = np.flatnonzero(~np.asarray(metrics["finite"], bool))
    return int(bad[0]) if bad.size else None


def _failure_message(
    round_: int, metrics: Mapping[str, np.ndarray], i: int, last_good: int | None, where: str
) -> tuple[str, list[int]]:
    ids = np.asarray(metrics["client_id"][i])
    active = np.asarray(metrics["client_active"][i], bool)
    finite = np.asarray(metrics["client_finite"][i], bool)
    losses = np.asarray(metrics["client_loss"][i])
    bad = [int(c) for c in ids[active & ~finite]]
    details = ", ".join(
        f"client {int(c)} (loss={float(lo)!r}{', non-finite update' if np.isfinite(lo) else ''})"
        for c, lo in zip(ids[active & ~finite], losses[active & ~finite], strict=True)
    )
    what = (
        f"non-finite loss or gradient on {details}"
        if bad
        else "every client was finite but the server update is non-finite"
    )
    kept = (
        f"the last good checkpoint (round {last_good}) in {where} is kept"
        if last_good is not None
        else "no checkpoint had been written yet"
    )
    return (
        f"round {round_}: {what}; the round was rejected (the state stays that of round "
        f"{round_ - 1}) and the run stopped; {kept}. Sampled clients of this round: "
        f"{[int(c) for c in ids[ids >= 0]]}. Set config.debug_nojit=True to run the rounds "
        "without jit and inspect the client (the error carries .state and .key).",
        bad,
    )


class _Interrupted(Exception):
    """A signal arrived while the main thread waited for a compilation."""


def _in_thread(fn: Callable[[], Any], signals: _Signals) -> Any:
    """``fn()`` in a worker thread; the main thread polls ``signals`` meanwhile.

    XLA compiles without returning to the interpreter, so a signal handler of the main
    thread would only run once the compilation is done (seconds to minutes); compiling in a
    worker lets the loop act on SIGTERM / SIGINT at once (raises :class:`_Interrupted`).
    """
    out: dict[str, Any] = {}

    def work() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # re-raised in the main thread
            out["error"] = e

    worker = threading.Thread(target=work, name="fmljax-compile", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.05)
        if signals.received is not None:
            raise _Interrupted
    if "error" in out:
        raise out["error"]
    return out["value"]


def _call_rounds(rounds: int, config: ml_collections.ConfigDict) -> int:
    """Rounds of the next call from round ``rounds``: ``rounds_per_call``, cut short so that
    the call ends on the next evaluation round, checkpoint round or ``num_rounds``."""
    stops = [config.num_rounds - rounds]
    for every in (config.eval_every, config.checkpoint_every):
        stops.append(every - rounds % every)
    return min(config.rounds_per_call, *stops)


@dataclasses.dataclass
class _Run:
    """What one process of a run holds: the built task and algorithm, devices and keys."""

    config: ml_collections.ConfigDict
    setup: TaskSetup
    alg: Any
    mesh: Any
    put: Callable[[Any], Any]
    k_rounds: jax.Array
    k_eval: jax.Array
    state: Any  # the server state of round 0 (replaced by the restored one)
    fingerprint: dict[str, Any]

    @property
    def debug(self) -> bool:
        return bool(self.config.get("debug_nojit", False))

    def bundle(self, state: Any) -> dict[str, Any]:
        return {"server": state, "rng_key": self.put(jax.random.key_data(self.k_rounds))}


def _build_run(config: ml_collections.ConfigDict) -> _Run:
    """Validate the config against itself and the task's data, build the algorithm."""
    validate_config(config)
    if "," in config.algorithm:
        raise ValueError("train_and_evaluate runs one algorithm; main.py splits the list")
    debug = bool(config.get("debug_nojit", False))
    if config.get("distributed", False):
        sharding.initialize_distributed(
            config.get("coordinator_address", None),
            config.get("num_processes", None),
            config.get("process_id", None),
        )
    mesh_axes = tuple(config.get("mesh_axes", (sharding.CLIENT_AXIS,)))
    client_axis = config.get("client_axis", sharding.CLIENT_AXIS)
    mesh_shape = tuple(config.get("mesh_shape", (-1,)))
    if not debug:
        sharding.validate_mesh(mesh_shape, mesh_axes, client_axis, prefix="config.")
    setup = TASKS[config.task](config)
    validate_setup(config, setup)
    mesh = None if debug else sharding.client_mesh(mesh_shape, mesh_axes, client_axis)
    alg = fmljax.build(
        config.algorithm,
        setup.loss_fn,
        setup.sample_task,
        round_config(config),
        server_optimizer=make_server_optimizer(config),
        metrics_fn=setup.metrics_fn,
        fine_tune=bool(config.get("fine_tune", False)),
        eval_sample_task=setup.eval_sample_task,
        client_sharding=None if mesh is None else sharding.client_sharding(mesh, client_axis),
        **algorithm_options(config),
    )
    k_init, k_rounds, k_eval = jax.random.split(jax.random.key(config.seed), 3)
    state = alg.init(setup.model.init(k_init))
    put = (lambda t: t) if mesh is None else (lambda t: sharding.replicate(t, mesh))
    fingerprint = config_fingerprint(config, state)
    return _Run(config, setup, alg, mesh, put, k_rounds, k_eval, put(state), fingerprint)


def _restore(run: _Run, ckpt: runlog.Checkpointer) -> tuple[int, Any, float]:
    """``(round, state, wall seconds before)`` of the newest checkpoint that verifies."""
    config = run.config
    abstract = lambda: jax.tree.map(ocp_abstract, run.bundle(run.state))

    def check(step: int, meta: dict) -> None:
        where = f"the checkpoint of round {step} in {ckpt.directory}"
        diff = _fingerprint_differences(meta.get("fingerprint", {}), run.fingerprint)
        if config.get("init_from", None):  # a warm start: only the state must fit
            diff = [d for d in diff if d.startswith("state")]
        if diff:
            raise ValueError(
                f"{where} was written by a different config and is refused; what differs: "
                + "; ".join(diff)
                + "; use a new workdir for this config (or restore the old config to resume)"
            )
        if config.num_rounds < step and not config.get("init_from", None):
            raise ValueError(
                f"config.num_rounds={config.num_rounds} is invalid: {where} is past it; must "
                f"be >= {step} to resume this run (or use a new workdir)"
            )

    got = ckpt.restore(abstract, check)
    if got is None:
        return 0, run.state, 0.0
    start, restored, meta = got
    where = f"the checkpoint of round {start} in {ckpt.directory}"
    state = ServerState(*restored["server"])
    saved_key = np.asarray(jax.device_get(restored["rng_key"]))
    own_key = np.asarray(jax.random.key_data(run.k_rounds))
    if not np.array_equal(saved_key, own_key):
        raise ValueError(
            f"{where} holds the round key {saved_key.tolist()}, this run's seed gives "
            f"{own_key.tolist()}: refused"
        )
    if int(jax.device_get(state.round)) != start:
        raise ValueError(f"{where} holds round {int(state.round)}: refused")
    wall_before = 0.0 if config.get("init_from", None) else float(meta.get("wall_s", 0.0))
    return start, state, wall_before


def ocp_abstract(x: Any) -> Any:
    """The shape, dtype and sharding orbax restores an array leaf into."""
    import orbax.checkpoint as ocp

    return ocp.utils.to_shape_dtype_struct(x)


def _finished_summary(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
    """The summary of a run of this config that already finished in ``workdir``, or None."""
    try:
        with open(os.path.join(workdir, "summary.json")) as f:
            summary = json.load(f)
        with open(os.path.join(workdir, "config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    same = lambda c: {k: v for k, v in c.items() if k not in LOOP_FIELDS}
    current = json.loads(_config_json(config))
    if same(saved) != same(current) or summary.get("rounds") != config.num_rounds:
        return None
    return summary


def _config_json(config: ml_collections.ConfigDict, **kw: Any) -> str:
    """``config`` as JSON; NumPy scalars (a sweep over ``np.arange``) as Python numbers."""
    plain = lambda v: v.item() if isinstance(v, np.generic) else repr(v)
    return json.dumps(config.to_dict(), default=plain, **kw)


def _record(rounds: int, split: str, values: Mapping[str, Any], wall: float) -> dict:
    return {"round": rounds, "split": split, **{k: float(v) for k, v in values.items()},
            "wall_s": wall}  # fmt: skip


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train ``config.algorithm`` on ``config.task``; write the run's files into ``workdir``.

    Returns the summary (also written to ``workdir/summary.json``); a run that already
    finished in ``workdir`` with this config returns its summary and computes nothing.
    Raises :class:`NonFiniteRoundError` when a round is non-finite; on SIGTERM / SIGINT
    (also during a compilation), writes a checkpoint of the last completed round and raises
    ``SystemExit(128 + signal)`` / ``KeyboardInterrupt``.
    """
    if not isinstance(workdir, str) or not workdir.strip():
        raise ValueError(f"workdir={workdir!r} is invalid: must be a non-empty path")
    validate_config(config)
    lead = jax.process_index() == 0
    done = _finished_summary(config, workdir)
    if done is not None:
        if lead:
            print(
                f"{config.algorithm}: the run in {workdir} is complete (round "
                f"{done['rounds']} of {config.num_rounds}); its summary is "
                f"{os.path.join(workdir, 'summary.json')}",
                flush=True,
            )
        return done
    run = _build_run(config)
    os.makedirs(workdir, exist_ok=True)
    ckpt = runlog.Checkpointer(workdir, config.keep_checkpoints)
    try:
        start, state, wall_before = _restore(run, ckpt)
        if lead:
            runlog.atomic_write(
                os.path.join(workdir, "config.json"), _config_json(config, indent=2)
            )
        log = runlog.MetricsLog(os.path.join(workdir, "metrics.jsonl"), start, enabled=lead)
        try:
            clock = _Clock(wall_before)
            state = _loop(run, state, start, ckpt, log, clock, lead)
            ckpt.wait()
            return _finish(run, state, workdir, log, clock, lead)
        finally:
            log.close()
    finally:
        ckpt.close()


class _Clock:
    """Wall seconds of this run, summed over its processes (the earlier ones' from the
    checkpoint)."""

    def __init__(self, before: float):
        self.before, self.t0 = before, time.time()

    def this_process(self) -> float:
        return time.time() - self.t0

    def __call__(self) -> float:
        return self.before + self.this_process()


class _Rounds:
    """The compiled calls: one program per call length (usually one), each compiled in a
    worker thread (:func:`_in_thread`); ``debug_nojit`` runs the rounds one by one."""

    def __init__(self, run: _Run, signals: _Signals, say: Callable[[str], None] = print):
        self.run, self.signals, self._compiled, self.say = run, signals, {}, say
        rep = None if run.debug else sharding.replicated(run.mesh)
        self._evaluate = (
            run.alg.evaluate
            if run.debug
            else jax.jit(run.alg.evaluate, in_shardings=(rep, rep, rep), out_shardings=rep)
        )
        self._evaluators: dict[str, Any] = {}

    def __call__(self, state: Any, n: int, data: Any) -> tuple[Any, dict[str, np.ndarray]]:
        run, key = self.run, self.run.put(self.run.k_rounds)
        if run.debug:  # one round per call, stop at a failure
            one = scan_rounds(run.alg.update, 1)
            metrics = []
            for _ in range(n):
                state, m = one(state, key, data)
                metrics.append(sharding.to_host(m))
                if _first_failure(metrics[-1]) is not None:
                    break  # a rejected round returns the state it was given
            return state, {k: np.concatenate([m[k] for m in metrics]) for k in metrics[0]}
        if n not in self._compiled:
            self.say(f"{run.config.algorithm}: compiling a call of {n} round(s)")
            jitted = sharding.jit_round(scan_rounds(run.alg.update, n), run.mesh)
            self._compiled[n] = _in_thread(
                lambda: jitted.lower(state, key, data).compile(), self.signals
            )
        state, m = self._compiled[n](state, key, data)
        return state, sharding.to_host(m)

    def evaluate(self, state: Any, key: jax.Array, data: Any, split: str) -> dict:
        key = self.run.put(key)
        if self.run.debug:
            return sharding.to_host(self._evaluate(state, key, data))
        if split not in self._evaluators:
            self._evaluators[split] = _in_thread(
                lambda: self._evaluate.lower(state, key, data).compile(), self.signals
            )
        return sharding.to_host(self._evaluators[split](state, key, data))


def _loop(run, state, start, ckpt, log, clock, lead) -> Any:
    """Rounds ``start + 1 .. num_rounds``: calls, records, evaluations, checkpoints."""
    config, put = run.config, run.put
    train_data, val_data = put(run.setup.train_data), put(run.setup.val_data)
    progress = runlog.Progress(config.algorithm, start, config.num_rounds, enabled=lead)
    rounds, last_saved = start, (start if ckpt.steps() else None)
    scalar_metrics = ("loss", "update_norm", "clients_finished")

    def save(state: Any) -> None:
        nonlocal last_saved
        meta = {
            "round": rounds,
            "seed": config.seed,
            "sampling": f"round r uses fold_in(k_rounds, r); next round {rounds}",
            "fingerprint": run.fingerprint,
            "wall_s": clock(),
        }
        ckpt.save(rounds, run.bundle(state), meta)
        last_saved = rounds

    no_jit = jax.disable_jit() if run.debug else contextlib.nullcontext()
    with _Signals() as signals, no_jit:
        calls = _Rounds(run, signals, progress.message)
        try:
            while rounds < config.num_rounds and signals.received is None:
                n = _call_rounds(rounds, config)
                state, metrics = calls(state, n, train_data)
                bad = _first_failure(metrics)
                good = len(metrics["finite"]) if bad is None else bad
                wall = clock()
                records = [
                    _record(rounds + i + 1, "train",
                            {k: metrics[k][i] for k in scalar_metrics}, wall)
                    for i in range(good)
                ]  # fmt: skip
                if bad is not None:
                    log.write(records)
                    failed = rounds + bad + 1
                    message, clients = _failure_message(
                        failed, metrics, bad, last_saved, ckpt.directory
                    )
                    key = jax.random.fold_in(run.k_rounds, failed - 1)
                    raise NonFiniteRoundError(message, failed, clients, state, key)
                rounds += n
                if rounds % config.eval_every == 0 or rounds == config.num_rounds:
                    key = jax.random.fold_in(run.k_eval, rounds)
                    val = calls.evaluate(state, key, val_data, "val")
                    records.append(
                        _record(rounds, "val", {k: np.mean(v) for k, v in val.items()}, clock())
                    )
                log.write(records)
                last = records[-1]
                metric = run.setup.target_metric if run.setup.target_metric in last else "loss"
                progress.update(rounds, f"{last['split']} {metric}={last[metric]:.4f}")
                if rounds % config.checkpoint_every == 0 or rounds == config.num_rounds:
                    save(state)
        except _Interrupted:
            pass  # a signal during a compilation: the state of `rounds` is intact
        finally:
            progress.close()
        if signals.received is not None:
            _stop(signals.received, rounds, last_saved, lambda: save(state), ckpt, progress)
    return state


def _stop(signum, rounds, last_saved, save, ckpt, progress) -> None:
    """Write a checkpoint of ``rounds`` (unless there is one), say so, and exit."""
    if rounds and rounds != last_saved:
        save()
    ckpt.wait()
    if rounds:
        what = f"checkpoint of round {rounds} written"
    else:
        what = "stopped before round 1 finished: nothing to save"
    progress.message(f"signal {signum}: {what}; re-run the same command to resume")
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def _finish(run, state, workdir, log, clock, lead) -> dict[str, Any]:
    """The final evaluation on the test clients; the 'test' record and ``summary.json``."""
    config = run.config
    no_jit = jax.disable_jit() if run.debug else contextlib.nullcontext()
    with _Signals() as signals, no_jit:
        calls = _Rounds(run, signals, lambda text: None)
        key = jax.random.fold_in(run.k_eval, 2**31 - 1)
        try:
            test = calls.evaluate(state, key, run.put(run.setup.test_data), "test")
        except _Interrupted:
            raise SystemExit(128 + signals.received) from None
    final_round = int(jax.device_get(state.round))
    # What one client exchanges per round: the meta-parameters down and the update up (Meta-SGD:
    # parameters and learned rates); the round's total is that times the clients per round.
    model_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params))
    bytes_per_round = 2 * config.clients_per_round * model_bytes
    summary = {
        "algorithm": config.algorithm,
        "task": config.task,
        "rounds": final_round,
        "wall_s": clock(),
        "wall_s_this_process": clock.this_process(),
        "model_bytes": model_bytes,
        "bytes_per_round": bytes_per_round,
        "bytes_communicated": bytes_per_round * final_round,
        "code_version": code_version(),
        "test": _summary(test),
    }
    if lead:
        means = {k: np.mean(v) for k, v in test.items()}
        log.write([_record(final_round, "test", means, summary["wall_s"])])
        runlog.atomic_write(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2))
    return summary


def algorithm_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """``config`` for one algorithm: ``algorithm = name`` plus ``config.overrides[name]``."""
    one = ml_collections.ConfigDict(config.to_dict())
    one.algorithm = name
    overrides = config.get("overrides", None) or {}
    for field, value in dict(overrides.get(name.replace("-", "_"), {})).items():
        one[field] = value
    if "overrides" in one:
        del one["overrides"]
    return one


def run_experiment(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
    """Run every algorithm of ``config.algorithm`` (comma-separated); return their summaries."""
    names = [n.strip() for n in str(config.get("algorithm", "")).split(",") if n.strip()]
    if not names:
        raise ValueError(
            f"config.algorithm={config.get('algorithm')!r} is invalid: must be one (or a "
            f"comma-separated list) of {tuple(ALGORITHMS)}"
        )
    configs = {n: algorithm_config(config, n) for n in names}
    for c in configs.values():  # every run's config is checked before anything compiles
        validate_config(c)
    if len(names) == 1:
        return {names[0]: train_and_evaluate(configs[names[0]], workdir)}
    return {n: train_and_evaluate(c, os.path.join(workdir, n)) for n, c in configs.items()}


def comparison_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table of each run's final personalised test metrics (mean +- 95% CI)."""
    metrics = sorted({m for s in summaries.values() for m in s["test"]})
    head = "| algorithm | rounds | wall s | " + " | ".join(metrics) + " |"
    rule = "|---" * (3 + len(metrics)) + "|"
    rows = [head, rule]
    for name, s in summaries.items():
        cells = [
            f"{s['test'][m]['mean']:.4f} ± {s['test'][m]['ci95']:.4f}" if m in s["test"] else ""
            for m in metrics
        ]
        rows.append(f"| {name} | {s['rounds']} | {s['wall_s']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
