"""Tiny models, tasks and finite differences shared by the tests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator

import jax
import jax.flatten_util
import jax.numpy as jnp
import ml_collections
import numpy as np

import fmljax


def tiny_mlp():
    """A 1-6-6-1 tanh MLP (smooth, so finite differences are exact to O(eps^2))."""
    return fmljax.mlp((1, 6, 6, 1), activation=jnp.tanh, dtype=jnp.float64)


def tiny_conv4(num_classes: int = 3):
    """A Conv4 with 2 filters and learned BN scale and offset, for 8x8x1 inputs."""
    return fmljax.conv4(
        num_classes, filters=2, mode="strided", bn_scale=True, bn_offset=True, dtype=jnp.float64
    )


def regression_task(key, k: int = 5, q: int = 7):
    s, qy = fmljax.data.sample_sinusoid_task(key, k, q, dtype=jnp.float64)
    return s, qy


def image_task(key, n: int = 3, k: int = 2, q: int = 3, hw: int = 8):
    k1, k2 = jax.random.split(key)
    support = {
        "x": jax.random.normal(k1, (n * k, hw, hw, 1), jnp.float64),
        "y": jnp.repeat(jnp.arange(n), k),
    }
    query = {
        "x": jax.random.normal(k2, (n * q, hw, hw, 1), jnp.float64),
        "y": jnp.repeat(jnp.arange(n), q),
    }
    return support, query


def flat_grad_fd(f, params, eps: float = 1e-5) -> np.ndarray:
    """Central finite differences of a scalar ``f`` along every coordinate of ``params``.

    A Python loop over one jitted evaluation: ``vmap`` over perturbed parameters would turn a
    convolution into a grouped convolution, which XLA's CPU backend runs slowly.
    """
    flat_p, unravel = jax.flatten_util.ravel_pytree(params)
    f_flat = jax.jit(lambda v: f(unravel(v)))
    g = np.empty(flat_p.size)
    for i in range(flat_p.size):
        e = jnp.zeros_like(flat_p).at[i].set(eps)
        g[i] = (float(f_flat(flat_p + e)) - float(f_flat(flat_p - e))) / (2 * eps)
    return g


def flat(tree) -> np.ndarray:
    return np.asarray(jax.flatten_util.ravel_pytree(tree)[0])


def rel_err(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def tiny_sinusoid_config(**overrides) -> ml_collections.ConfigDict:
    """A tiny federated sinusoid run config for ``fmljax.train`` (a few rounds, a 1-4-1 MLP)."""
    c = {
        "task": "sinusoid",
        "algorithm": "fedmeta-maml",
        "seed": 0,
        "data_seed": 0,
        "hidden": (4,),
        "num_clients": 8,
        "num_eval_clients": 2,
        "support_size": 3,
        "query_size": 3,
        "clients_per_round": 2,
        "tasks_per_client": 1,
        "local_steps": 1,
        "local_lr": 0.1,
        "inner_lr": 0.01,
        "inner_steps": 1,
        "eval_inner_steps": 1,
        "server_optimizer": "adam",
        "server_lr": 1e-3,
        "num_rounds": 4,
        "rounds_per_call": 2,
        "eval_every": 4,
        "checkpoint_every": 2,
        "keep_checkpoints": 1,
    }
    return ml_collections.ConfigDict(c | overrides)


# ---- runs on real files: compilation cache, compile counts, snapshots of a workdir ----------


@contextlib.contextmanager
def persistent_compilation_cache(path) -> Iterator[None]:
    """JAX's persistent compilation cache in ``path`` for the body, every program cached.

    Runs of the same config compile the same programs: the second one loads them (and the
    same executables give the same bits). The settings are restored afterwards."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {n: getattr(jax.config, n) for n in names}
    for n, v in zip(names, (str(path), 0.0, 0), strict=True):
        jax.config.update(n, v)
    cc.reset_cache()
    try:
        yield
    finally:
        for n, v in old.items():
            jax.config.update(n, v)
        cc.reset_cache()


@contextlib.contextmanager
def count_compiles() -> Iterator[list[str]]:
    """The XLA compilations in the body (one entry each; persistent-cache hits included)."""
    events: list[str] = []

    def listener(name, *args, **kwargs):
        if "backend_compile" in name or "cache_retrieval" in name:
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def snapshot(directory) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``directory`` (empty when absent)."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def records(workdir, drop=("wall_s",)) -> list[dict]:
    """The records of a run's metrics.jsonl without the fields ``drop``."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(ln).items() if k not in drop} for ln in f]
