"""One of the processes of test_sharding.py's two-process test (not a pytest module).

    python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_JSON

Each process has 2 CPU devices; after ``jax.distributed.initialize`` on 127.0.0.1 the mesh
spans the 4 devices of both processes (gloo CPU collectives). The round of 3 clients (padded
to 4, one per device) runs sharded for 3 rounds; process 0 writes the result to OUT_JSON and
the test compares it with the same rounds run in one process on one device
(:func:`problem` is shared by both; importing this module changes no jax setting).
"""

from __future__ import annotations

import json
import sys

import jax

from fmljax import sharding

NUM_ROUNDS = 3


def problem(client_sharding=None):
    """(algorithm, params, key, data) of the test: Per-FedAvg-FO, 3 of 5 clients, float64."""
    import jax.numpy as jnp
    import optax

    import fmljax
    from fmljax.federated import RoundConfig

    model = fmljax.mlp((1, 4, 4, 1), activation=jnp.tanh, dtype=jnp.float64)
    loss = fmljax.mse_loss(model.apply)
    params = model.init(jax.random.key(0))
    data = fmljax.data.sample_sinusoid_clients(jax.random.key(1), 5, jnp.float64)
    sampler = fmljax.data.sinusoid_task_sampler(3, 3)
    cfg = RoundConfig(
        clients_per_round=3, tasks_per_client=1, local_steps=2, local_lr=0.05, inner_lr=0.03
    )
    alg = fmljax.build(
        "perfedavg-fo",
        loss,
        sampler,
        cfg,
        server_optimizer=optax.adam(0.01),
        client_sharding=client_sharding,
    )
    return alg, params, jax.random.key(7), data


def main(process_id: int, num_processes: int, port: int, out: str) -> None:
    import numpy as np

    import fmljax

    jax.config.update("jax_num_cpu_devices", 2)  # before the backend starts
    jax.config.update("jax_enable_x64", True)
    sharding.initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id)

    mesh = sharding.client_mesh()  # all 4 devices of both processes
    alg, params, key, data = problem(sharding.client_sharding(mesh))
    step = sharding.jit_round(fmljax.scan_rounds(alg.update, NUM_ROUNDS), mesh)
    state, metrics = step(
        sharding.replicate(alg.init(params), mesh),
        sharding.replicate(key, mesh),
        sharding.replicate(data, mesh),
    )
    sharded = jax.flatten_util.ravel_pytree(sharding.to_host(state.params))[0]
    client_loss = sharding.to_host(metrics["client_loss"])

    if process_id == 0:
        with open(out, "w") as f:
            json.dump(
                {
                    "devices": jax.device_count(),
                    "processes": jax.process_count(),
                    "mesh_devices": int(mesh.devices.size),
                    "client_loss_addressable": bool(metrics["client_loss"].is_fully_addressable),
                    "client_loss_spec": str(metrics["client_loss"].sharding.spec),
                    "sharded": np.asarray(sharded).tolist(),
                    "loss": np.asarray(sharding.to_host(metrics["loss"])).tolist(),
                    "client_loss": np.asarray(client_loss)[:, :3].tolist(),
                },
                f,
            )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
