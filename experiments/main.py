"""Run a federated meta-learning experiment from an ml_collections config.

    python experiments/main.py --config=experiments/configs/NAME.py[:ARG] --workdir=DIR \
        [--config.FIELD=VALUE ...]

``config.algorithm`` is one algorithm name or a comma-separated list; with a list, each
algorithm runs in ``DIR/<algorithm>/`` and a comparison table is printed (and written to
``DIR/comparison.md``) at the end. ``config.overrides.<algorithm with '-' as '_'>`` holds
per-algorithm field overrides. ``config.seeds`` (optional, a tuple of ints) repeats the whole
experiment once per seed in ``DIR/seed<N>/`` (``config.seed = N``). ``config.init_from``
(optional, per algorithm through ``overrides``) names a finished run's directory whose last
checkpoint starts this run (a warm start, e.g. Reptile fine-tuning after FedAvg; Jiang et al.,
2019). The loop itself is :func:`fmljax.train.train_and_evaluate`; the task sources of the
reproductions are registered by :mod:`fmljax.tasks`. Re-running the same command on the same
DIR resumes from the last checkpoints.
"""

from __future__ import annotations

import os
import shutil

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

import fmljax.tasks  # noqa: F401  (registers the reproductions' task sources)
from fmljax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints, summary.")
_CACHE = flags.DEFINE_string(
    "compilation_cache",
    os.path.join(os.path.expanduser("~"), ".cache", "fmljax", "jax"),
    "JAX persistent compilation cache directory ('' disables it): seeds and resumed runs of "
    "the same config reuse the compiled rounds instead of compiling them again.",
)
flags.mark_flags_as_required(["config", "workdir"])


def _names(config: ml_collections.ConfigDict) -> list[str]:
    return [n.strip() for n in str(config.algorithm).split(",") if n.strip()]


def warm_start(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Copy each algorithm's ``init_from`` checkpoints into its run directory (once).

    Nothing is copied where the run directory already has checkpoints (a resumed run)."""
    names = _names(config)
    for name in names:
        one = train.algorithm_config(config, name)
        source = one.get("init_from", None)
        if not source:
            continue
        run_dir = workdir if len(names) == 1 else os.path.join(workdir, name)
        src = os.path.join(source, "checkpoints")
        dst = os.path.join(run_dir, "checkpoints")
        if not os.path.isdir(src):
            raise ValueError(
                f"config.init_from={source!r} is invalid: must be a run directory with "
                "checkpoints/ (run that experiment first)"
            )
        if not os.path.isdir(dst):
            os.makedirs(run_dir, exist_ok=True)
            shutil.copytree(src, dst)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
    """One experiment (every algorithm of the list) in ``workdir``; prints the table."""
    warm_start(config, workdir)
    summaries = train.run_experiment(config, workdir)
    if len(summaries) > 1:
        table = train.comparison_table(summaries)
        print("\n" + table, flush=True)
        with open(os.path.join(workdir, "comparison.md"), "w") as f:
            f.write(table + "\n")
    return summaries


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
    if _CACHE.value:
        jax.config.update("jax_compilation_cache_dir", _CACHE.value)
    config, workdir = _CONFIG.value, _WORKDIR.value
    seeds = tuple(config.get("seeds", None) or ())
    if not seeds:
        run(config, workdir)
        return
    for seed in seeds:
        one = ml_collections.ConfigDict(config.to_dict())
        one.seed = int(seed)
        del one["seeds"]
        print(f"\n=== seed {seed}", flush=True)
        run(one, os.path.join(workdir, f"seed{seed}"))


if __name__ == "__main__":
    app.run(main)
