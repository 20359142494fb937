"""The training loop: a federated run from an ml_collections config, resumable, with files.

``train_and_evaluate(config, workdir)`` builds the task source and the algorithm named in the
config, compiles ``rounds_per_call`` rounds into one jitted call (``lax.scan`` over rounds,
server state donated), and writes into ``workdir``:

* ``config.json``: the config of the run;
* ``metrics.jsonl``: one JSON object per line, ``{'round', 'split', <metric>: value, ...,
  'wall_s'}``; ``split`` is ``'train'`` for round metrics and ``'val'`` for periodic
  personalised evaluation;
* ``checkpoints/``: orbax checkpoints of the server state every ``checkpoint_every`` rounds
  (the last ``keep_checkpoints`` kept);
* ``summary.json``: the final personalised evaluation on the test clients, each metric's mean
  and 95% confidence interval over the evaluation clients.

Round ``r`` uses the key ``fold_in(PRNGKey(seed), r)``, so the clients and tasks a round sees
are a pure function of (seed, round): re-running the same command on the same ``workdir``
resumes from the last checkpoint and ends with the same numbers as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import fmljax
from fmljax.federated import ALGORITHMS, RoundConfig, ServerState, scan_rounds

__all__ = [
    "TASKS",
    "TaskSetup",
    "comparison_table",
    "confidence_interval",
    "register_task",
    "run_experiment",
    "train_and_evaluate",
]


@dataclasses.dataclass(frozen=True)
class TaskSetup:
    """What a task source gives the training loop."""

    model: fmljax.Model
    loss_fn: Callable  # loss_fn(params, batch) -> scalar
    metrics_fn: Callable  # metrics_fn(params, batch) -> dict of scalars
    sample_task: Callable  # sample_task(key, client) -> (support, query)
    train_data: Any  # federated training clients, leading axis C
    val_data: Any  # held-out clients for periodic evaluation
    test_data: Any  # held-out clients for the final evaluation
    target_metric: str  # the metric the progress line shows ('mse', 'accuracy')


TASKS: dict[str, Callable[[ml_collections.ConfigDict], TaskSetup]] = {}


def register_task(name: str):
    """Decorator: register ``builder(config) -> TaskSetup`` under ``config.task == name``."""

    def deco(fn):
        TASKS[name] = fn
        return fn

    return deco


@register_task("sinusoid")
def _sinusoid(config: ml_collections.ConfigDict) -> TaskSetup:
    """Each client one sinusoid (MAML's distribution); held-out clients for val and test."""
    dtype = jnp.float64 if config.get("float64", False) else jnp.float32
    hidden = tuple(config.get("hidden", (40, 40)))
    model = fmljax.mlp((1, *hidden, 1), dtype=dtype)
    key = jax.random.key(config.data_seed)
    k_tr, k_va, k_te = jax.random.split(key, 3)
    return TaskSetup(
        model=model,
        loss_fn=fmljax.mse_loss(model.apply),
        metrics_fn=fmljax.regression_metrics(model.apply),
        sample_task=fmljax.data.sinusoid_task_sampler(config.support_size, config.query_size),
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
    raise ValueError(f"config.server_optimizer={name!r} is not one of ('sgd', 'adam')")


def round_config(config: ml_collections.ConfigDict) -> RoundConfig:
    """The :class:`RoundConfig` fields taken from ``config`` (unknown ones are ignored)."""
    fields = {f.name for f in dataclasses.fields(RoundConfig)}
    return RoundConfig(**{k: v for k, v in config.items() if k in fields})


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Check every field the loop reads; errors name the field, its value and what is allowed."""

    def need(cond: bool, field: str, allowed: str) -> None:
        if not cond:
            raise ValueError(f"config.{field}={config.get(field)!r} is invalid: must be {allowed}")

    need(config.get("task") in TASKS, "task", f"one of {tuple(TASKS)}")
    for name in str(config.get("algorithm", "")).split(","):
        need(
            name in ALGORITHMS,
            "algorithm",
            f"one (or a comma-separated list) of {tuple(ALGORITHMS)}",
        )
    for field in (
        "num_rounds",
        "rounds_per_call",
        "eval_every",
        "checkpoint_every",
        "keep_checkpoints",
    ):
        v = config.get(field)
        need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, field, "an int >= 1")
    for field in ("eval_every", "checkpoint_every"):
        need(
            config[field] % config.rounds_per_call == 0,
            field,
            f"a multiple of rounds_per_call={config.rounds_per_call}",
        )
    need(
        config.num_rounds % config.rounds_per_call == 0,
        "num_rounds",
        f"a multiple of rounds_per_call={config.rounds_per_call}",
    )
    need(float(config.get("server_lr", 0)) > 0, "server_lr", "> 0")
    round_config(config).validate()


def confidence_interval(values: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of the normal 95% confidence interval (1.96 standard errors)."""
    v = np.asarray(values, np.float64).ravel()
    half = 1.96 * v.std(ddof=1) / math.sqrt(v.size) if v.size > 1 else float("nan")
    return float(v.mean()), float(half)


class _Log:
    """metrics.jsonl writer (flushed and synced per write) and a terminal progress line."""

    def __init__(self, path: str, resume_round: int):
        if os.path.exists(path):  # drop lines past the checkpoint we resume from
            with open(path) as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln)["round"] <= resume_round]
            with open(path, "w") as f:
                f.writelines(keep)
        self._f = open(path, "a")
        self._tty = sys.stdout.isatty()

    def write(self, records: list[dict]) -> None:
        for r in records:
            self._f.write(json.dumps(r) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def progress(self, text: str) -> None:
        if self._tty:
            sys.stdout.write("\r\033[K" + text)
        else:
            sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def close(self) -> None:
        if self._tty:
            sys.stdout.write("\n")
        self._f.close()


def _summary(per_client: Mapping[str, jax.Array]) -> dict[str, dict[str, float]]:
    out = {}
    for k, v in per_client.items():
        mean, ci = confidence_interval(np.asarray(v))
        out[k] = {"mean": mean, "ci95": ci, "n": int(np.asarray(v).size)}
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train ``config.algorithm`` on ``config.task``; write the run's files into ``workdir``.

    Returns the summary (also written to ``workdir/summary.json``).
    """
    import orbax.checkpoint as ocp

    validate_config(config)
    if "," in config.algorithm:
        raise ValueError("train_and_evaluate runs one algorithm; main.py splits the list")
    os.makedirs(workdir, exist_ok=True)
    setup = TASKS[config.task](config)
    alg = fmljax.build(
        config.algorithm,
        setup.loss_fn,
        setup.sample_task,
        round_config(config),
        server_optimizer=make_server_optimizer(config),
        metrics_fn=setup.metrics_fn,
        fine_tune=bool(config.get("fine_tune", False)),
    )
    key = jax.random.key(config.seed)
    k_init, k_rounds, k_eval = jax.random.split(key, 3)
    state = alg.init(setup.model.init(k_init))

    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))

    ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
    manager = ocp.CheckpointManager(
        ckpt_dir,
        options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True),
    )
    start = 0
    if manager.latest_step() is not None:
        start = int(manager.latest_step())
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        state = manager.restore(start, args=ocp.args.StandardRestore(abstract))
        state = ServerState(*state) if not isinstance(state, ServerState) else state

    log = _Log(os.path.join(workdir, "metrics.jsonl"), start)
    run_rounds = jax.jit(scan_rounds(alg.update, config.rounds_per_call), donate_argnums=0)
    evaluate = jax.jit(alg.evaluate)
    t0 = time.time()
    rounds = start
    try:
        while rounds < config.num_rounds:
            state, metrics = run_rounds(state, k_rounds, setup.train_data)
            metrics = jax.device_get(metrics)
            wall = time.time() - t0
            records = [
                {
                    "round": rounds + i + 1,
                    "split": "train",
                    **{k: float(v[i]) for k, v in metrics.items()},
                    "wall_s": wall,
                }
                for i in range(config.rounds_per_call)
            ]
            rounds += config.rounds_per_call
            if rounds % config.eval_every == 0 or rounds == config.num_rounds:
                val = jax.device_get(
                    evaluate(state, jax.random.fold_in(k_eval, rounds), setup.val_data)
                )
                records.append(
                    {
                        "round": rounds,
                        "split": "val",
                        **{k: float(np.mean(v)) for k, v in val.items()},
                        "wall_s": time.time() - t0,
                    }
                )
            log.write(records)
            last = records[-1]
            shown = last.get(setup.target_metric, last.get("loss"))
            log.progress(
                f"{config.algorithm} round {rounds}/{config.num_rounds} "
                f"{(rounds - start) / max(time.time() - t0, 1e-9):.1f} rounds/s "
                f"{last['split']} {setup.target_metric if setup.target_metric in last else 'loss'}"
                f"={shown:.4f}"
            )
            if rounds % config.checkpoint_every == 0 or rounds == config.num_rounds:
                manager.save(rounds, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
    finally:
        log.close()
        manager.close()

    test = evaluate(state, jax.random.fold_in(k_eval, 2**31 - 1), setup.test_data)
    summary = {
        "algorithm": config.algorithm,
        "task": config.task,
        "rounds": int(state.round),
        "wall_s": time.time() - t0,
        "test": _summary(jax.device_get(test)),
    }
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
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
    names = [n.strip() for n in str(config.algorithm).split(",") if n.strip()]
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
