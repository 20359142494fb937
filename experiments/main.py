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

Errors in the command line or the config (a misspelt field, a value out of range, a config
file that is not there) are one line on stderr naming the field, the value and what is
allowed, and the exit code is 2, before anything is built or compiled; ``--verbose`` adds the
traceback. A run stopped by SIGTERM / SIGINT writes a checkpoint and exits 143 / 130; a
non-finite round exits 1 (see :class:`fmljax.train.NonFiniteRoundError`).
"""

from __future__ import annotations

import os
import shutil
import sys
import traceback

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
_VERBOSE = flags.DEFINE_bool("verbose", False, "Print the traceback of an error too.")
app.define_help_flags()

USAGE_ERROR, FAILED = 2, 1


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


def main(config: ml_collections.ConfigDict, workdir: str) -> None:
    """The experiment of ``config`` (once per seed of ``config.seeds``) in ``workdir``."""
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
    if _CACHE.value:
        jax.config.update("jax_compilation_cache_dir", _CACHE.value)
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


def _innermost(e: BaseException) -> BaseException:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return e


def _chain(e: BaseException) -> list[BaseException]:
    out = [e]
    while out[-1].__cause__ is not None or out[-1].__context__ is not None:
        out.append(out[-1].__cause__ or out[-1].__context__)
    return out


def _flag_error(e: BaseException, argv: list[str]) -> str:
    """One line for an error of the command line (absl / ml_collections give a chain)."""
    chain = _chain(e)
    if any("has no attribute 'get_config'" in str(x) for x in chain):
        path = next((a.partition("=")[2] for a in argv if a.startswith("--config=")), "")
        return (
            f"--config={path}: the file has no function get_config() (a config file defines "
            "get_config() returning an ml_collections.ConfigDict)"
        )
    missing = [x for x in chain if isinstance(x, KeyError | AttributeError)]
    if missing:  # ml_collections: an override of a field the config does not have
        texts = [str(x.args[0]) if x.args else "" for x in missing]
        field = texts[-1].split("\n")[0].strip("'\"\\")
        given = next(
            (a.split("=")[0] for a in argv if a.split("=")[0] == f"--config.{field}"),
            next((a.split("=")[0] for a in argv if a.startswith("--config.") and
                  a.split("=")[0].endswith(field)), f"--config.{field}"),
        )  # fmt: skip
        hint = next((t for t in texts if "Did you mean" in t), "")
        close = hint.split("Did you mean")[1].split('"')[1] if hint else None
        return (
            f"{given}: the config has no field {field!r}"
            + (f" (did you mean {close!r}?)" if close else "")
            + "; a field is added in the config file, not on the command line"
        )
    return " ".join(str(e).split())


def _config_path_error(argv: list[str]) -> str | None:
    for a in argv:
        if a.startswith("--config=") or a == "--config":
            path = a.partition("=")[2].split(":")[0]
            if not path:
                return "--config: must name a config file (experiments/configs/NAME.py[:ARG])"
            if not os.path.isfile(path):
                return (
                    f"--config={path}: no such file (relative paths are taken from {os.getcwd()})"
                )
    return None


def _parse(argv: list[str]) -> None:
    """absl + ml_collections parsing of ``argv``, repeatable in one process: the config
    flag finds its ``--config.FIELD`` overrides in ``sys.argv``, and defines a flag for each,
    so ``sys.argv`` is ``argv`` meanwhile and the override flags of a previous call go."""
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
        delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()
    sys.modules.pop(f"{_CONFIG.name}_config", None)  # load_module would reuse the old one
    saved, sys.argv = sys.argv, list(argv)
    try:
        flags.FLAGS(argv)
    finally:
        sys.argv = saved


def cli(argv: list[str]) -> int:
    """Parse ``argv`` (``argv[0]`` the program) and run; return the exit code."""
    verbose = any(a in ("--verbose", "--verbose=true", "--verbose=True") for a in argv)
    say = lambda message: print(f"error: {message}", file=sys.stderr, flush=True)
    try:
        error = _config_path_error(argv)
        if error:
            say(error)
            return USAGE_ERROR
        _parse(argv)
        for name in ("config", "workdir"):
            if not flags.FLAGS[name].present and flags.FLAGS[name].value is None:
                say(f"--{name} is required")
                return USAGE_ERROR
        config, workdir = _CONFIG.value, _WORKDIR.value
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except Exception as e:  # every failure to parse the command line or load the config
        if verbose:
            traceback.print_exc()
        say(_flag_error(e, argv))
        return USAGE_ERROR
    if not workdir.strip():
        say(f"--workdir={workdir!r} is invalid: must be a directory path")
        return USAGE_ERROR
    try:
        main(config, workdir)
    except KeyboardInterrupt:  # the run has said which checkpoint it wrote
        return 128 + 2
    except SystemExit as e:
        return int(e.code or 0)
    except (ValueError, FileNotFoundError, train.NonFiniteRoundError) as e:
        if verbose:
            traceback.print_exc()
        say(str(e) if isinstance(e, train.NonFiniteRoundError) else " ".join(str(e).split(" ")))
        return FAILED if isinstance(e, train.NonFiniteRoundError) else USAGE_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv))
