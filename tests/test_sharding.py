"""Sharded rounds: 8 virtual CPU devices and two processes, each in fresh subprocesses.

The device count of the CPU backend is fixed when jax is first imported, and this pytest
process has imported it already, so the checks run in child processes:

* ``tests/sharded_checks.py`` (under ``XLA_FLAGS=--xla_force_host_platform_device_count=8``):
  sharded == single-device rounds for FedMeta-MAML and Per-FedAvg-SO in float64, padded client
  counts, the output shardings and the all-reduce of the compiled program;
* ``tests/multiprocess_worker.py`` twice: ``jax.distributed.initialize`` on 127.0.0.1, gloo
  CPU collectives, 2 processes x 2 devices, a few rounds equal to the one-process result.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import jax.flatten_util
import multiprocess_worker
import numpy as np
import pytest

import fmljax

HERE = os.path.dirname(os.path.abspath(__file__))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def test_sharded_rounds_on_eight_virtual_devices():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "sharded_checks.py"],
        cwd=HERE,
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "4 passed" in proc.stdout, proc.stdout[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path, x64):
    out = str(tmp_path / "result.json")
    port = _free_port()
    worker = os.path.join(HERE, "multiprocess_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(i), "2", str(port), out],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode for p in procs):
        pytest.fail("a worker failed:\n" + "\n----\n".join(log[-4000:] for log in logs))
    with open(out) as f:
        r = json.load(f)
    assert (r["processes"], r["devices"], r["mesh_devices"]) == (2, 4, 4)
    # The per-client outputs live on both processes' devices: the round really is spread.
    assert not r["client_loss_addressable"]
    assert r["client_loss_spec"] == "P(None, 'clients')"
    # The same rounds in this process, on one device, without a mesh.
    alg, params, key, data = multiprocess_worker.problem()
    state, metrics = jax.jit(fmljax.scan_rounds(alg.update, multiprocess_worker.NUM_ROUNDS))(
        alg.init(params), key, data
    )
    single = np.asarray(jax.flatten_util.ravel_pytree(state.params)[0])
    sharded = np.asarray(r["sharded"])
    assert np.linalg.norm(sharded - single) / np.linalg.norm(single) < 1e-10
    np.testing.assert_allclose(r["loss"], metrics["loss"], rtol=1e-10)
    np.testing.assert_allclose(r["client_loss"], metrics["client_loss"], rtol=1e-10)
