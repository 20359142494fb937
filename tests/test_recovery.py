"""Faults on real files and changed loop fields on resume (issue 10, items 2-6 and 9).

Every test runs a tiny sinusoid run in a temporary workdir through
:func:`fmljax.train.train_and_evaluate`, damages what a real fault damages (a cut or garbage
line in ``metrics.jsonl``, a flipped byte, a truncated file, a missing manifest, ``meta/``
or ``state/``, an empty step folder), resumes, and compares with the uninterrupted run. The
runs share JAX's persistent compilation cache, so only the first one compiles; resumed runs
load the same executables and the comparisons are exact (same programs, same inputs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import leaves, persistent_compilation_cache, records, snapshot, tiny_sinusoid_config

from fmljax import runlog, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**kw):
    base = dict(num_rounds=12, rounds_per_call=4, eval_every=4, checkpoint_every=4)
    return tiny_sinusoid_config(**(base | dict(keep_checkpoints=3) | kw))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with persistent_compilation_cache(tmp_path_factory.mktemp("jax_cache")):
        yield


@pytest.fixture(scope="module")
def ref(cache, tmp_path_factory):
    """The uninterrupted run: checkpoints 4, 8, 12, summary."""
    workdir = str(tmp_path_factory.mktemp("ref"))
    train.train_and_evaluate(_config(), workdir)
    return workdir


def _cut_after_checkpoint(ref: str, tmp_path) -> str:
    """A copy of ``ref`` as a process killed after its last checkpoint leaves it."""
    run = str(tmp_path / "run")
    shutil.copytree(ref, run)
    os.remove(os.path.join(run, "summary.json"))
    return run


def _assert_same_as(ref: str, run: str) -> None:
    a, b = train.load_checkpoint(run), train.load_checkpoint(ref)
    assert a["step"] == b["step"] == 12
    for x, y in zip(leaves(a["state"]), leaves(b["state"]), strict=True):
        np.testing.assert_array_equal(x, y)
    assert records(run) == records(ref)
    summary = lambda d: {
        k: v for k, v in json.load(open(f"{d}/summary.json")).items() if "wall" not in k
    }
    assert summary(run) == summary(ref)


def test_rounds_per_call_changed_on_resume_lands_on_every_round(cache, ref, tmp_path):
    """Item 2: resumed at round 9 with other rounds_per_call / checkpoint_every / eval_every,
    the run stops at num_rounds, checkpoints and evaluates on their rounds."""
    run = str(tmp_path / "run")
    train.train_and_evaluate(
        _config(num_rounds=9, rounds_per_call=3, checkpoint_every=3, eval_every=3), run
    )
    summary = train.train_and_evaluate(
        _config(rounds_per_call=5, checkpoint_every=2, eval_every=4), run
    )
    assert summary["rounds"] == 12
    recs = records(run)
    assert [r["round"] for r in recs if r["split"] == "train"] == list(range(1, 13))
    assert [r["round"] for r in recs if r["split"] == "val"] == [3, 6, 9, 12]
    assert [r["round"] for r in recs if r["split"] == "test"] == [12]
    steps = sorted(int(d) for d in os.listdir(f"{run}/checkpoints") if d.isdigit())
    assert steps == [9, 10, 12]  # keep 3: ..., 9 (first run), 10 and 12 (every 2 from 9)
    # The same rounds as the run that was never cut (other call lengths compile other
    # programs, so the numbers agree to float32 rounding, not bit for bit).
    ref_loss = [r["loss"] for r in records(ref) if r["split"] == "train"]
    got_loss = [r["loss"] for r in recs if r["split"] == "train"]
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)


def test_partial_last_line_is_dropped_and_the_run_resumes(cache, ref, tmp_path, capfd):
    """Item 4: a kill in the middle of a write leaves a cut last line."""
    run = _cut_after_checkpoint(ref, tmp_path)
    shutil.rmtree(f"{run}/checkpoints/12")
    path = f"{run}/metrics.jsonl"
    lines = open(path).read().splitlines(keepends=True)
    keep = [ln for ln in lines if json.loads(ln)["round"] <= 9]
    with open(path, "w") as f:
        f.writelines(keep)
        f.write(lines[len(keep)][:17])  # round 10's record, cut
    train.train_and_evaluate(_config(), run)
    cut = f"line {len(keep) + 1} is incomplete (a write was cut); dropped (17 bytes)"
    assert cut in capfd.readouterr().err
    _assert_same_as(ref, run)


def test_corrupt_middle_line_is_refused_and_left_as_it_is(cache, ref, tmp_path):
    run = _cut_after_checkpoint(ref, tmp_path)
    path = f"{run}/metrics.jsonl"
    lines = open(path).read().splitlines(keepends=True)
    lines[3] = '{"round": 4, "split": "train", "loss": 0.1\x00garbage\n'
    open(path, "w").writelines(lines)
    before = snapshot(run)
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 4 is not a metrics record"):
        train.train_and_evaluate(_config(), run)
    assert snapshot(run) == before


def _largest_file(directory: str) -> str:
    """The largest file of array data (``.../d/<hash>``) under ``directory``."""
    files = [
        os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs if r.endswith("state/d")
    ]
    return max(files, key=os.path.getsize)


def _flip_byte(path: str) -> None:
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))


DAMAGES = {
    "flipped byte": lambda d: _flip_byte(_largest_file(f"{d}/state")),
    # Arrays that orbax reads without an error but that are not the ones recorded.
    "arrays of another step": lambda d: (
        shutil.rmtree(f"{d}/state"),
        shutil.copytree(f"{d}/../8/state", f"{d}/state"),
    ),
    "truncated data": lambda d: os.truncate(_largest_file(f"{d}/state"), 10),
    "missing manifest": lambda d: os.remove(f"{d}/state/manifest.ocdbt"),
    "missing meta": lambda d: shutil.rmtree(f"{d}/meta"),
    "missing state": lambda d: shutil.rmtree(f"{d}/state"),
    "empty step folder": lambda d: (shutil.rmtree(d), os.makedirs(d)),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_latest_checkpoint_falls_back_and_is_kept_aside(
    cache, ref, tmp_path, capfd, damage
):
    """Items 5 and 6: the newest checkpoint that verifies is restored, the damaged one is
    named in one line and moved to checkpoints_damaged/, and the run ends as the
    uninterrupted one did."""
    run = _cut_after_checkpoint(ref, tmp_path)
    DAMAGES[damage](f"{run}/checkpoints/12")
    damaged = snapshot(f"{run}/checkpoints/12")
    train.train_and_evaluate(_config(), run)
    err = [ln for ln in capfd.readouterr().err.splitlines() if "fmljax:" in ln]
    assert len(err) == 1, err
    assert "the checkpoint of step 12" in err[0] and "is damaged and was skipped" in err[0]
    if damage == "arrays of another step":
        assert "do not match the checksum it recorded" in err[0]
    assert snapshot(f"{run}/checkpoints_damaged/12") == damaged  # kept, as it was
    _assert_same_as(ref, run)


def test_finished_run_says_it_is_complete_and_computes_nothing(cache, ref, capfd):
    """Item 9: a re-run of a finished run names it complete and where its summary is."""
    before = snapshot(ref)
    summary = train.train_and_evaluate(_config(), ref)
    out = capfd.readouterr().out
    assert f"is complete (round 12 of 12); its summary is {ref}/summary.json" in out
    assert summary == json.load(open(f"{ref}/summary.json"))
    assert snapshot(ref) == before


CHILD = """
import sys
from fmljax import runlog
print("ready", flush=True)
runlog.MetricsLog(sys.argv[1], int(sys.argv[2]))
print("done", flush=True)
"""


def test_sigkill_during_the_metrics_rewrite_loses_nothing(tmp_path):
    """Item 3: real SIGKILLs of a child process while it rewrites a long metrics.jsonl on
    resume: the file holds every original line or exactly the kept ones, never fewer."""
    path = str(tmp_path / "metrics.jsonl")
    recs = [
        {"round": r, "split": "train", "loss": r / 7, "pad": "x" * 200} for r in range(1, 60001)
    ]
    text = "".join(json.dumps(r) + "\n" for r in recs)
    kept = "".join(json.dumps(r) + "\n" for r in recs[:40000])
    rng = np.random.default_rng()
    outcomes = []
    for _ in range(4):
        open(path, "w").write(text)
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, path, "40000"], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline() == "ready\n"
        t0 = time.perf_counter()
        time.sleep(rng.uniform(0.0, 0.4))  # the rewrite of 13 MB takes about 0.1-0.5 s
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        got = open(path).read()
        assert got in (text, kept), (len(got), time.perf_counter() - t0)
        outcomes.append(got == kept)
        assert not [
            f for f in os.listdir(tmp_path) if f != "metrics.jsonl" and not f.startswith(".metrics")
        ]
    # Temporary files a kill leaves (".metrics.jsonl.*") are harmless: never read back.


def _start(args, cache_dir):
    env = dict(os.environ)
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "experiments/main.py"), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip


def test_sigterm_while_compiling_stops_at_once_and_sigint_has_no_traceback(tmp_path):
    """Item 9: a signal during the first compilation is acted on at once (the compilation
    runs in a worker thread); SIGINT after rounds ran writes a checkpoint, says so, and
    exits 130 without a traceback."""
    # Second-order MAML on a Conv4 (procedural Omniglot): a round that compiles for seconds.
    omniglot = os.path.join(ROOT, "experiments/configs/omniglot_maml.py:5w1s,test")
    proc = _start([f"--config={omniglot}", f"--workdir={tmp_path}/a", "--compilation_cache="], None)
    line = proc.stdout.readline()
    assert "compiling a call of" in line, (line, proc.stderr.read()[-2000:] if proc.poll() else "")
    time.sleep(0.5)
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    stopped = time.perf_counter() - t0
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, out[-2000:], err[-2000:])
    assert "signal 15: stopped before round 1 finished: nothing to save" in out + err
    assert stopped < 3.0, stopped
    assert not os.path.exists(f"{tmp_path}/a/checkpoints") or not os.listdir(
        f"{tmp_path}/a/checkpoints"
    )

    config = os.path.join(ROOT, "experiments/configs/sinusoid.py")
    fast = [f"--config={config}", "--config.algorithm=fedavg", "--config.num_clients=50",
            "--config.num_eval_clients=10", "--config.num_rounds=100000",
            "--config.rounds_per_call=10", "--config.eval_every=100000",
            "--config.checkpoint_every=100000"]  # fmt: skip
    proc = _start([*fast, f"--workdir={tmp_path}/b", f"--compilation_cache={tmp_path}/cache"], None)
    deadline = time.time() + 120
    while (
        not os.path.exists(f"{tmp_path}/b/metrics.jsonl")
        or not open(f"{tmp_path}/b/metrics.jsonl").read()
    ):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "checkpoint of round" in out and "re-run the same command to resume" in out
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    step = train.load_checkpoint(f"{tmp_path}/b")["step"]
    assert step == records(f"{tmp_path}/b")[-1]["round"]


def test_progress_shows_the_current_speed_and_an_eta(monkeypatch, capsys):
    """Item 9: rounds/s is the speed of the recent calls (the compiling first call left out),
    not the average since the start; the ETA is the remaining rounds at that speed."""
    now = [0.0]
    progress = runlog.Progress("fedavg", 0, 1000, enabled=True)
    progress._time = lambda: now[0]
    for t, r in [(30.0, 10), (31.0, 20), (32.0, 30), (33.0, 40)]:  # first call compiles 30 s
        now[0] = t
        progress.update(r, "train loss=1.0")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "fedavg round 10/1000 measuring speed  train loss=1.0"
    assert lines[-1] == "fedavg round 40/1000 10.0 rounds/s, ETA 1:36  train loss=1.0"
    for t in range(34, 60):  # the speed halves: the window follows it within ~10 s
        now[0] = float(t) * 1.0 + (t - 33)
        progress.update(40 + 10 * (t - 33), "")
    assert progress.rate() == pytest.approx(5.0)
