"""A run's files, written so that a kill at any moment loses nothing that was written.

Three parts, used by :func:`fmljax.train.train_and_evaluate`:

* :func:`atomic_write`: a file is written to a temporary file in the same directory, synced,
  and renamed over the old one, so a reader (or the next process) sees the old contents or
  the new ones, never a truncated mix. Every file of a run that is rewritten goes through it.
* :class:`MetricsLog`: ``metrics.jsonl``, one JSON object per line, appended and synced per
  call. On resume the lines past the checkpoint are dropped by an atomic rewrite; a partial
  last line (what a kill in the middle of a write leaves) is dropped with a warning, and a
  corrupt line anywhere else is refused with an error naming the file and line.
* :class:`Checkpointer`: orbax checkpoints of the training state whose metadata carries a
  SHA-256 of every array they hold (the state's leaves and the round key, with dtypes and
  shapes). :meth:`Checkpointer.restore` verifies it and falls back to the newest checkpoint
  that restores and verifies; each one it skips is named in one line with the reason and
  moved, never deleted, to ``checkpoints_damaged/`` beside ``checkpoints/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

__all__ = [
    "Checkpointer",
    "MetricsLog",
    "Progress",
    "atomic_write",
    "checksum",
    "read_metrics",
    "warn",
]


def warn(message: str) -> None:
    """One line on stderr, prefixed ``fmljax:``."""
    sys.stderr.write(f"fmljax: {message}\n")
    sys.stderr.flush()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, text: str) -> None:
    """Replace ``path`` by ``text``: temporary file in the same directory, fsync, rename."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


def read_metrics(path: str) -> list[dict]:
    """The records of ``path``; a partial last line is dropped with a warning.

    Raises ValueError naming the file and the line for a corrupt line that is not the last
    one (the file is then left as it is, for the user to look at).
    """
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    records = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        last = i == len(lines) - 1  # no newline after it: the write was cut
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or "round" not in record or "split" not in record:
                raise ValueError("not a metrics record")
        except ValueError as e:
            if last:
                warn(
                    f"{path}: line {i + 1} is incomplete (a write was cut); dropped "
                    f"({len(raw)} bytes)"
                )
                break
            raise ValueError(
                f"{path}: line {i + 1} is not a metrics record ({type(e).__name__}: {e}); "
                "the file is left as it is: mend or remove that line, or use a new workdir"
            ) from None
        records.append(record)
    return records


class MetricsLog:
    """``metrics.jsonl``: records appended, flushed and synced per :meth:`write`."""

    def __init__(self, path: str, resume_round: int, enabled: bool = True):
        self.path = path
        self._f = None
        if not enabled:  # another process of a multi-host run writes the files
            return
        if os.path.exists(path):  # keep the lines up to the checkpoint we resume from
            records = read_metrics(path)
            kept = [r for r in records if r["round"] <= resume_round and r["split"] != "test"]
            with open(path, "rb") as f:
                unchanged = f.read() == b"".join((json.dumps(r) + "\n").encode() for r in kept)
            if not unchanged:  # the final 'test' record is written again at the end
                atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._f = open(path, "a")

    def write(self, records: list[dict]) -> None:
        if self._f is None:
            return
        self._f.write("".join(json.dumps(r) + "\n" for r in records))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _host(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:  # replicated over hosts
        return np.asarray(x.addressable_data(0))
    return np.asarray(jax.device_get(x))


def _path(path: tuple) -> str:
    """A leaf's path by names and indices only, so that a NamedTuple and the dict orbax
    restores it as (without a target) give the same path."""
    parts = []
    for k in path:
        for attr in ("name", "key", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def checksum(tree: Any) -> str:
    """SHA-256 over every array leaf of ``tree`` in path order: path, dtype, shape, bytes."""
    h = hashlib.sha256()
    leaves = sorted((_path(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree))
    for path, leaf in leaves:
        a = np.ascontiguousarray(_host(leaf))
        h.update(f"{path}:{a.dtype.str}{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _drop_closed_loop_noise() -> None:
    """Keep one line per damaged checkpoint: when orbax's restore fails, tensorstore still
    completes the other reads of that restore and their callbacks find orbax's event loop
    closed; each would print a 6-line ``RuntimeError('Event loop is closed')`` traceback
    through ``sys.unraisablehook``. Only that exact error is dropped, everything else goes
    to the hook that was installed before."""
    previous = sys.unraisablehook
    if getattr(previous, "_fmljax", False):
        return

    def hook(unraisable):
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        previous(unraisable)

    hook._fmljax = True
    sys.unraisablehook = hook


class _Refused(Exception):
    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class Checkpointer:
    """Verified orbax checkpoints of ``{'state': PyTree of arrays, 'meta': JSON}`` per step.

    ``save(step, state, meta)`` adds ``meta['checksum']``; ``restore(abstract)`` returns the
    newest ``(step, state, meta)`` that restores and whose arrays hash to its checksum (or
    None), moving each damaged newer one to ``<workdir>/checkpoints_damaged/``.
    """

    def __init__(self, workdir: str, keep: int, *, read_only: bool = False):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.damaged_directory = os.path.abspath(os.path.join(workdir, "checkpoints_damaged"))
        options = (
            ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
            if read_only
            else ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, cleanup_tmp_directories=True
            )
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(int(s) for s in self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        ocp = self._ocp
        meta = {**meta, "checksum": checksum(state)}
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )

    def load(
        self, step: int, abstract: Any | None, check: Callable[[int, dict], None] | None = None
    ) -> tuple[Any, dict]:
        """Step ``step``'s state (restored into ``abstract``, or as NumPy-like arrays) and meta.

        ``check(step, meta)`` runs on the metadata before the arrays are read; what it raises
        is passed on (a refusal is not damage). Raises for any damage."""
        ocp = self._ocp
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]
        if not isinstance(meta, dict):
            raise ValueError("its metadata is not a JSON object")
        if check is not None:
            try:
                check(step, meta)
            except Exception as e:
                raise _Refused(e) from e
        state = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )["state"]
        if "checksum" not in meta:
            warn(
                f"the checkpoint of step {step} in {self.directory} has no checksum (written "
                "by an older fmljax): restored unverified"
            )
        elif checksum(state) != meta["checksum"]:
            raise ValueError("its arrays do not match the checksum it recorded")
        return state, meta

    def restore(
        self,
        abstract: Callable[[], Any] | Any | None = None,
        check: Callable[[int, dict], None] | None = None,
        *,
        move_damaged: bool = True,
    ) -> tuple[int, Any, dict] | None:
        """The newest checkpoint that verifies, as ``(step, state, meta)``; None if none.

        ``check(step, meta)`` may refuse a checkpoint (its error is raised as it is)."""
        _drop_closed_loop_noise()
        for step in reversed(self.steps()):
            try:
                target = abstract() if callable(abstract) else abstract
                return (step, *self.load(step, target, check))
            except _Refused as e:
                raise e.error from None
            except Exception as e:  # any damage: missing, truncated, changed
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                where = "moved to " + self.damaged_directory if move_damaged else "left in place"
                warn(
                    f"the checkpoint of step {step} in {self.directory} is damaged and was "
                    f"skipped ({type(e).__name__}: {reason[:200]}); {where}"
                )
                if move_damaged:
                    self._move_aside(step)
        return None

    def _move_aside(self, step: int) -> None:
        os.makedirs(self.damaged_directory, exist_ok=True)
        target = os.path.join(self.damaged_directory, str(step))
        n = 1
        while os.path.exists(target):
            target = os.path.join(self.damaged_directory, f"{step}.{n}")
            n += 1
        shutil.move(os.path.join(self.directory, str(step)), target)
        self._manager.reload()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """The run's progress: a rich progress bar on a terminal, one line per call elsewhere.

    The speed is the current one: rounds per second of the calls of the last ~10 seconds
    (the first call of a process, which compiles, is left out), and the ETA is the remaining
    rounds at that speed.
    """

    def __init__(self, name: str, start: int, total: int, enabled: bool = True):
        import time

        self._time = time.perf_counter
        self.name, self.total, self.enabled = name, total, enabled
        self._samples: list[tuple[float, int]] = []  # (time, rounds) after each call
        self._calls = 0
        self._bar = None
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(name, total=total, completed=start, info="compiling")

    def rate(self) -> float | None:
        """Rounds per second over the recent calls (None until two calls have finished)."""
        if len(self._samples) < 2:
            return None
        (t0, r0), (t1, r1) = self._samples[0], self._samples[-1]
        return (r1 - r0) / max(t1 - t0, 1e-9)

    def update(self, rounds: int, text: str) -> None:
        """After a call: ``rounds`` done so far; ``text`` the latest metric."""
        now = self._time()
        self._calls += 1
        self._samples.append((now, rounds))
        while len(self._samples) > 2 and now - self._samples[1][0] >= 10.0:
            self._samples.pop(0)
        if not self.enabled:
            return
        rate = self.rate()
        speed = (
            f"{rate:.1f} rounds/s, ETA {_duration((self.total - rounds) / rate)}"
            if rate
            else "measuring speed"
        )
        info = f"{speed}  {text}"
        if self._bar is not None:
            self._bar.update(self._task, completed=rounds, info=info)
        else:
            sys.stdout.write(f"{self.name} round {rounds}/{self.total} {info}\n")
            sys.stdout.flush()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
