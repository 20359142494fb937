"""examples/my_algorithm.py: a user's algorithm, registered from outside the library, runs
through fmljax.build, equals FedAvg where it should, and trains through experiments/main.py."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import flat, rel_err

import fmljax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "my_algorithm.py")


@pytest.fixture(autouse=True)
def _unregister():
    """The example registers 'fedavgm-clipped'; other tests count fmljax.ALGORITHMS."""
    yield
    fmljax.ALGORITHMS.pop("fedavgm-clipped", None)
    sys.modules.pop("my_algorithm", None)


def _load(path: str, name: str):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_tiny_run_learns(capsys):
    mse = _load(EXAMPLE, "my_algorithm").main(["--rounds", "30", "--clients", "20"])
    assert np.isfinite(mse)
    line = capsys.readouterr().out.strip()
    before, after = (float(v) for v in line.split("train loss ")[1].split(";")[0].split(" -> "))
    assert after < before, line


def test_without_clipping_or_momentum_it_is_fedavg(x64):
    """clip huge and momentum 0: the same update as FedAvg with server SGD(1) (1e-12: the
    same arithmetic, one more multiplication by exactly 1)."""
    _load(EXAMPLE, "my_algorithm")
    model = fmljax.mlp((1, 4, 1), dtype=jnp.float64)
    loss = fmljax.mse_loss(model.apply)
    data = fmljax.data.sample_sinusoid_clients(jax.random.key(0), 5, jnp.float64)
    sampler = fmljax.data.sinusoid_task_sampler(3, 3)
    cfg = fmljax.RoundConfig(clients_per_round=3, tasks_per_client=1, local_steps=2, local_lr=0.1)
    params = model.init(jax.random.key(1))
    mine = fmljax.build("fedavgm-clipped", loss, sampler, cfg, clip=1e30, momentum=0.0)
    ref = fmljax.build("fedavg", loss, sampler, cfg, server_optimizer=optax.sgd(1.0))
    got, m = jax.jit(mine.update)(mine.init(params), jax.random.key(2), data)
    want, _ = jax.jit(ref.update)(ref.init(params), jax.random.key(2), data)
    assert rel_err(flat(got.params), flat(want.params)) < 1e-12
    clipped = fmljax.build("fedavgm-clipped", loss, sampler, cfg, clip=1e-3, momentum=0.0)
    small, _ = jax.jit(clipped.update)(clipped.init(params), jax.random.key(2), data)
    step = jax.tree.map(jnp.subtract, params, small.params)
    assert float(optax.global_norm(step)) <= 1e-3 * (1 + 1e-9)  # an average of clipped updates


def test_trained_through_experiments_main(tmp_path, capsys):
    config = tmp_path / "my_algorithm_config.py"
    config.write_text(
        "import importlib.util, sys\n"
        "from helpers import tiny_sinusoid_config\n"
        f"spec = importlib.util.spec_from_file_location('my_algorithm', {EXAMPLE!r})\n"
        "if 'my_algorithm' not in sys.modules:\n"
        "    sys.modules['my_algorithm'] = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(sys.modules['my_algorithm'])\n\n"
        "def get_config():\n"
        "    return tiny_sinusoid_config(algorithm='fedavgm-clipped', eval_inner_steps=0,\n"
        "                                server_optimizer='sgd', server_lr=1.0,\n"
        "                                algorithm_options={'clip': 0.5})\n"
    )
    main = _load(os.path.join(ROOT, "experiments", "main.py"), "fmljax_experiments_main")
    workdir = tmp_path / "run"
    sys.path.insert(0, os.path.dirname(__file__))
    try:
        code = main.cli(["main.py", f"--config={config}", f"--workdir={workdir}",
                         "--compilation_cache="])  # fmt: skip
    finally:
        sys.path.remove(os.path.dirname(__file__))
    assert code == 0, capsys.readouterr().err
    with open(workdir / "summary.json") as f:
        summary = json.load(f)
    assert summary["algorithm"] == "fedavgm-clipped" and summary["rounds"] == 4
