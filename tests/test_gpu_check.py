"""``benchmarks/gpu_check.sh``: its plan fits the 8-minute budget, and every command in it is one
that our command lines accept and our configs validate (checked here, on the CPU, so that the
one GPU call a session may get is not spent on a typo); ``benchmarks/gpu_summary.py`` reads
the logs and run directories it is given."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

import fmljax
import fmljax.tasks  # registers the reproductions' tasks
from fmljax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def _module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH="/usr/bin:/bin")  # no nvidia-smi: a CPU machine
    return subprocess.run(
        ["bash", SCRIPT, *args], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.fixture(scope="module")
def plan() -> list[tuple[str, int, list[str]]]:
    out = _check("--dry-run")
    assert out.returncode == 0, out.stderr
    steps = re.findall(r"^  (\S+)\s+<=\s+(\d+) s: python (.+)$", out.stdout, re.M)
    total = re.search(r"total time limit: (\d+) s of (\d+)", out.stdout)
    assert total and int(total.group(1)) <= int(total.group(2)) == 480, out.stdout
    return [(name, int(limit), shlex.split(cmd)) for name, limit, cmd in steps]


def test_plan_runs_the_targets_and_every_full_omniglot_command(plan):
    names = [name for name, _, _ in plan]
    assert {"omniglot-5w1s", "omniglot-5w1s-pool", "fed-round-conv4"} <= set(names)
    assert "omniglot-5w1s-2000" in names
    full = {cmd[1] for _, _, cmd in plan if cmd[0] == "experiments/main.py"}
    for setting in ("5w1s", "5w5s", "20w1s", "20w5s"):  # each `,full` command, unchanged
        smoke = [cmd for name, _, cmd in plan if name == f"smoke-{setting}-full"]
        assert len(smoke) == 1 and len(smoke[0]) == 3, smoke
        assert f"--config=experiments/configs/omniglot_maml.py:{setting},full" in full


def test_throughput_commands_parse(plan):
    throughput = _module("benchmarks/throughput.py", "throughput")
    cmds = [cmd[1:] for _, _, cmd in plan if cmd[0] == "benchmarks/throughput.py"]
    assert len(cmds) == 3
    for argv in cmds:
        args = throughput.parser().parse_args(argv + ["--pytorch", "--tag=x"])
        allowed = fmljax.ALGORITHMS if args.workload == "fed-round" else fmljax.METHODS
        assert args.method in allowed and args.baseline and args.json


def _config_of(argv: list[str]):
    """The config an ``experiments/main.py`` command line gives (``--config=FILE:ARG`` and
    ``--config.FIELD=VALUE`` overrides, cast to the field's type as ml_collections does)."""
    spec = next(a for a in argv if a.startswith("--config="))[len("--config=") :]
    path, arg = spec.split(":")
    config = _module(path, os.path.basename(path)[:-3]).get_config(arg)
    for a in argv:
        if a.startswith("--config."):
            field, value = a[len("--config.") :].split("=", 1)
            assert field in config, field
            old = config[field]
            config[field] = type(old)(value) if isinstance(old, int | float) else value
    return config


def test_experiment_commands_validate(plan):
    cmds = [cmd[1:] for _, _, cmd in plan if cmd[0] == "experiments/main.py"]
    assert len(cmds) == 5
    for argv in cmds:
        config = _config_of(argv)
        assert config.filters == 64 and config.num_eval_tasks == 600  # the reference protocol
        for alg in str(config.algorithm).split(","):
            train.validate_config(train.algorithm_config(config, alg))
    two_thousand = _config_of(cmds[0])
    assert (two_thousand.num_rounds, two_thousand.algorithm) == (2000, "fedmeta-maml")


def test_refuses_unknown_arguments_and_a_machine_without_gpu():
    bad = _check("--budget=9")
    assert bad.returncode == 2 and "--budget=9" in bad.stderr
    no_gpu = _check()
    assert no_gpu.returncode == 2 and "no NVIDIA GPU" in no_gpu.stderr


def test_summary_reads_throughput_lines_and_runs(tmp_path):
    log = tmp_path / "t.log"
    rec = {"impl": "onejit", "tasks_per_s": 123.4, "device": "gpu:H200"}
    rec |= {"speedup_vs_loop-tasks": 2.5}
    log.write_text("compiling\n" + json.dumps(rec) + "\n" + json.dumps({"impl": "loop"}) + "\n")
    summary = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_summary.py")]
    out = subprocess.run(summary + ["omniglot-5w1s", str(log), str(tmp_path)], capture_output=True)
    assert out.stdout.decode().strip() == "123.4 tasks/s, 2.50x loop-tasks"

    run = tmp_path / "omniglot_5w1s_2000" / "fedmeta-maml"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    lines = [{"round": 500, "split": "val", "accuracy": 0.9}, {"round": 500, "split": "train"}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    args = ["--json", "omniglot-5w1s-2000", str(log), str(tmp_path), "ok", "61", "H200"]
    out = subprocess.run(summary + args, capture_output=True)
    got = json.loads(out.stdout)
    assert got == {
        "kind": "gpu_check_step",
        "step": "omniglot-5w1s-2000",
        "status": "ok",
        "wall_s": 61,
        "card": "H200",
        "rounds": 500,
        "val_accuracy": {"500": 0.9},
    }
