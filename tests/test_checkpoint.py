"""Checkpoints of the whole training state: SIGKILL / SIGTERM and resume, bit for bit; refusal
of a checkpoint written by another config."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from fmljax import train

SCRIPT = """
import json, sys
import ml_collections
from fmljax import train
train.train_and_evaluate(ml_collections.ConfigDict(json.loads(sys.argv[1])), sys.argv[2])
"""


def _config(**kw) -> ml_collections.ConfigDict:
    c = dict(
        task="sinusoid",
        algorithm="fedmeta-fomaml",
        seed=3,
        data_seed=0,
        hidden=[8],
        num_clients=16,
        num_eval_clients=2,
        support_size=4,
        query_size=4,
        clients_per_round=3,
        tasks_per_client=1,
        local_steps=1,
        local_lr=1.0,
        inner_lr=0.01,
        inner_steps=1,
        eval_inner_steps=1,
        server_optimizer="adam",
        server_lr=1e-3,
        num_rounds=96,
        rounds_per_call=4,
        eval_every=96,
        checkpoint_every=16,
        keep_checkpoints=3,
    )
    return ml_collections.ConfigDict(c | kw)


def _start(config, workdir, cache_dir) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    # The runs share JAX's persistent compilation cache (as experiments/main.py does): only
    # the first compiles; the same executables then give the same bits.
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, config.to_json(), workdir],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _logged_round(workdir) -> int:
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            lines = [ln for ln in f if ln.endswith("\n")]
    except FileNotFoundError:
        return 0
    return json.loads(lines[-1])["round"] if lines else 0


def _stop_at(proc, workdir, round_, sig) -> int:
    """Send ``sig`` once the run has logged ``round_``; return the round logged by then."""
    deadline = time.time() + 300
    while _logged_round(workdir) < round_:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before round {round_}:\n{proc.stdout.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("the run made no progress")
        time.sleep(0.01)
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0]
    return proc.returncode, out


def _train_records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        recs = [json.loads(ln) for ln in f]
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in recs]


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


KILLS = 5


def _check_checkpoints(run_dir, keep) -> None:
    """Every checkpoint a kill left that orbax committed (``commit_success.txt``) is whole
    (written in a temporary directory, then renamed). A step folder without it can only be
    the oldest one, cut in the middle of its deletion (the keep policy removes it file by
    file after a newer save); restore skips such a folder (it fails verification)."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return
    steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
    committed = [s for s in steps if os.path.exists(f"{ckpt_dir}/{s}/commit_success.txt")]
    assert len(committed) <= keep + 1  # + 1: the kill may land between a save and a delete
    assert all(s < min(committed) for s in steps if s not in committed) if committed else True
    for step in committed:
        got = train.load_checkpoint(run_dir, step)
        assert got["meta"]["round"] == step == int(got["state"]["server"]["round"])


def _without_wall(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if not k.startswith("wall_s")}


def test_sigkills_at_random_moments_then_sigterm_then_resume_is_bit_identical(tmp_path):
    """KILLS real SIGKILLs of a real child at random moments (a random round, then a random
    delay of up to 0.3 s: inside a call, a metrics write, a checkpoint save, start-up or the
    final evaluation), each followed by a restart of the same command; then a SIGTERM; then
    the run to the end. Parameters, optimiser state and key, every metric but wall_s and the
    summary but its wall times equal those of an uninterrupted run, bit for bit (the same
    executables from the persistent cache, the same inputs: bit-exact by construction)."""
    config = _config(num_rounds=240, checkpoint_every=8)
    rng = random.Random()
    cache = str(tmp_path / "jax_cache")

    ref_dir = str(tmp_path / "ref")
    proc = _start(config, ref_dir, cache)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    ref = train.load_checkpoint(ref_dir)
    assert ref["step"] == config.num_rounds

    run_dir = str(tmp_path / "run")
    kills, starts = [], 0
    while len(kills) < KILLS:
        starts += 1
        assert starts <= 4 * KILLS, f"only {len(kills)} kills landed in {starts - 1} starts"
        target = _logged_round(run_dir) + rng.randrange(0, 40)
        proc = _start(config, run_dir, cache)
        deadline = time.time() + 300
        while _logged_round(run_dir) < target and proc.poll() is None:
            assert time.time() < deadline, "the run made no progress"
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            proc.kill()
            kills.append(_logged_round(run_dir))
        out = proc.communicate(timeout=120)[0]
        if os.path.exists(os.path.join(run_dir, "summary.json")):
            pytest.fail(f"the run finished before {KILLS} kills landed (kills at {kills})")
        assert proc.returncode == -signal.SIGKILL, out[-3000:]
        _check_checkpoints(run_dir, config.keep_checkpoints)

    print(f"SIGKILLs after rounds {kills} in {starts} starts")
    # Resume, then SIGTERM: the run writes a checkpoint of the round it reached and exits.
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    term_at = _logged_round(run_dir) + 8
    proc = _start(config, run_dir, cache)
    rc, out = _stop_at(proc, run_dir, term_at, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, out[-3000:]
    reached = _logged_round(run_dir)
    latest = train.load_checkpoint(run_dir)
    assert latest["step"] == reached, (latest["step"], reached)  # saved on the signal
    assert not [d for d in os.listdir(ckpt_dir) if "tmp" in d]  # leftovers were removed

    # Resume to the end.
    proc = _start(config, run_dir, cache)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    final = train.load_checkpoint(run_dir)
    assert final["step"] == config.num_rounds, kills
    for a, b in zip(_leaves(final["state"]), _leaves(ref["state"]), strict=True):
        np.testing.assert_array_equal(a, b)  # exactly: parameters, Adam moments, count, key
    assert _train_records(run_dir) == _train_records(ref_dir)  # the 'test' record included
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        walls = [json.loads(ln)["wall_s"] for ln in f]
    assert walls == sorted(walls)  # wall_s counts on across the processes
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(ref_dir, "summary.json")) as f:
        assert _without_wall(summary) == _without_wall(json.load(f))
    assert summary["wall_s"] >= summary["wall_s_this_process"]

    # A checkpoint of another config is refused, naming what differs.
    with pytest.raises(ValueError) as info:
        train.train_and_evaluate(_config(hidden=[4], algorithm="fedmeta-maml"), ref_dir)
    msg = str(info.value)
    assert "written by a different config and is refused" in msg
    assert "config.algorithm: checkpoint 'fedmeta-fomaml', this run 'fedmeta-maml'" in msg
    assert "config.hidden: checkpoint [8], this run [4]" in msg
    assert "state.params['dense0']['w']: checkpoint [[1, 8], 'float32'], this run [[1, 4]" in msg
    with pytest.raises(ValueError, match="config.server_optimizer: checkpoint 'adam', this run"):
        train.train_and_evaluate(_config(server_optimizer="sgd"), ref_dir)
