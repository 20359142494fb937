"""Round time against device count: the same sharded round on 1, 2, 4, 8, ... devices.

    python benchmarks/scaling.py                        # 1, 2, 4, 8 virtual CPU devices
    python benchmarks/scaling.py --devices=1,2,4,8 --platform=gpu   # real accelerators

With ``--platform=cpu`` (the default) every device count runs in its own subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=D`` (the CPU device count is fixed when
jax starts); on an accelerator every count runs in this process on the first D devices. Each
measurement: build the round (FedMeta-MAML on MAML's 1-40-40-1 sinusoid MLP by default),
shard the M clients over a ``('clients',)`` mesh (:mod:`fmljax.sharding`), compile, run
``--warmup`` untimed calls, then time ``--repeats`` calls of ``--rounds_per_call`` rounds each
with ``jax.block_until_ready``. Prints one JSON object per device count (JSON lines), with
the median and the spread, and a markdown table at the end. Virtual CPU devices share the
host's cores, so they show the partitioning's overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def measure(args: argparse.Namespace, num_devices: int) -> dict:
    """Time the sharded round on the first ``num_devices`` devices of this process."""
    import jax
    import jax.numpy as jnp
    import optax

    import fmljax
    from fmljax import sharding
    from fmljax.federated import RoundConfig

    devices = jax.devices()[:num_devices]
    if len(devices) < num_devices:
        raise SystemExit(f"--devices asks for {num_devices} devices, this host has {len(devices)}")
    hidden = tuple(int(h) for h in args.hidden.split(","))
    model = fmljax.mlp((1, *hidden, 1))
    loss = fmljax.mse_loss(model.apply)
    data = fmljax.data.sample_sinusoid_clients(jax.random.key(1), args.num_clients)
    sampler = fmljax.data.sinusoid_task_sampler(args.support, args.support)
    cfg = RoundConfig(
        clients_per_round=args.clients_per_round,
        tasks_per_client=args.tasks_per_client,
        local_steps=args.local_steps,
        local_lr=1e-3,
        inner_lr=1e-2,
        inner_steps=args.inner_steps,
    )
    mesh = sharding.client_mesh(devices=devices)
    alg = fmljax.build(
        args.algorithm,
        loss,
        sampler,
        cfg,
        server_optimizer=optax.adam(1e-3),
        client_sharding=sharding.client_sharding(mesh),
    )
    step = sharding.jit_round(fmljax.scan_rounds(alg.update, args.rounds_per_call), mesh)
    state = sharding.replicate(alg.init(model.init(jax.random.key(0))), mesh)
    key = sharding.replicate(jax.random.key(2), mesh)
    data = sharding.replicate(data, mesh)
    t0 = time.perf_counter()
    state, metrics = step(state, key, data)
    jax.block_until_ready((state, metrics))
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        state, metrics = step(state, key, data)
    jax.block_until_ready((state, metrics))
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        state, metrics = step(state, key, data)
        jax.block_until_ready((state, metrics))
        times.append((time.perf_counter() - t0) / args.rounds_per_call)
    assert bool(jnp.all(metrics["finite"]))
    return {
        "devices": num_devices,
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "algorithm": args.algorithm,
        "clients_per_round": args.clients_per_round,
        "padded_clients": -(-args.clients_per_round // num_devices) * num_devices,
        "tasks_per_client": args.tasks_per_client,
        "local_steps": args.local_steps,
        "hidden": list(hidden),
        "rounds_timed": args.repeats * args.rounds_per_call,
        "round_s_median": statistics.median(times),
        "round_s_min": min(times),
        "round_s_max": max(times),
        "first_call_s": compile_s,
        "cpu_count": os.cpu_count(),
    }


def table(rows: list[dict]) -> str:
    base = rows[0]["round_s_median"]  # speed-up: against the first (smallest) device count
    out = [
        "| devices | clients/device | round ms (median) | min | max | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['devices']} | {r['padded_clients'] // r['devices']} | "
            f"{1e3 * r['round_s_median']:.2f} | {1e3 * r['round_s_min']:.2f} | "
            f"{1e3 * r['round_s_max']:.2f} | "
            f"{base / r['round_s_median']:.2f} |"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts")
    p.add_argument("--platform", default="cpu", help="'cpu' (virtual devices) or gpu / tpu")
    p.add_argument("--algorithm", default="fedmeta-maml")
    p.add_argument("--num_clients", type=int, default=100)
    p.add_argument("--clients_per_round", type=int, default=16)
    p.add_argument("--tasks_per_client", type=int, default=4)
    p.add_argument("--local_steps", type=int, default=2)
    p.add_argument("--inner_steps", type=int, default=1)
    p.add_argument("--support", type=int, default=10)
    p.add_argument("--hidden", default="40,40")
    p.add_argument("--rounds_per_call", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="", help="also append the JSON lines to this file")
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.repeats * args.rounds_per_call < 10:
        p.error("time at least 10 rounds (--repeats x --rounds_per_call >= 10)")

    if args.child:  # one virtual-CPU device count, in a fresh process
        print(json.dumps(measure(args, args.child)), flush=True)
        return
    counts = [int(d) for d in args.devices.split(",")]
    rows = []
    for d in counts:
        if args.platform == "cpu":
            env = dict(os.environ, JAX_PLATFORMS="cpu")
            env["XLA_FLAGS"] = (
                env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={d}"
            ).strip()
            argv = [a for a in sys.argv[1:] if not a.startswith("--child")]
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), *argv, f"--child={d}"],
                env=env,
                capture_output=True,
                text=True,
            )
            if proc.returncode:
                raise SystemExit(proc.stdout + proc.stderr)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            row = measure(args, d)
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    print("\n" + table(rows))


if __name__ == "__main__":
    main()
