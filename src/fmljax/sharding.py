"""Rounds sharded over a device mesh's client axis, on one host or many.

The round function of :mod:`fmljax.federated` is not changed: it is jitted here with input and
output shardings (the GSPMD / ``jax.jit`` partitioner, Xu et al., 2021, "GSPMD: General and
Scalable Parallelization for ML Computation Graphs"), and it is built with a
:class:`~fmljax.federated.ClientSharding` whose ``constrain`` lays the M sampled clients out
along the mesh's client axis (``jax.lax.with_sharding_constraint``). Then

* the server state, the round key and the federated dataset are replicated on every device;
* every device samples the same M clients and runs the local work of its M / D of them
  (M padded with masked clients to a multiple of the D devices on the client axis; padded
  clients have weight zero and are never aggregated, never dropped silently);
* the weighted average of the client updates is one all-reduce over the client axis, after
  which every device applies the same server step to its replica.

Across hosts, call :func:`initialize_distributed` (``jax.distributed.initialize``) first; the
mesh then spans every process's devices and the same program runs in every process (JAX's
multi-controller model). On CPU, processes exchange data through gloo
(``jax_cpu_collectives_implementation='gloo'``).

Usage::

    mesh = fmljax.sharding.client_mesh()                     # all devices on 'clients'
    alg = fmljax.build(name, loss, sampler, cfg,
                       client_sharding=fmljax.sharding.client_sharding(mesh))
    step = fmljax.sharding.jit_round(fmljax.scan_rounds(alg.update, 10), mesh)
    state = fmljax.sharding.replicate(alg.init(params), mesh)
    state, metrics = step(state, key, fmljax.sharding.replicate(data, mesh))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fmljax.federated import ClientSharding

__all__ = [
    "CLIENT_AXIS",
    "client_mesh",
    "client_sharding",
    "initialize_distributed",
    "jit_round",
    "replicate",
    "replicated",
    "to_host",
    "validate_mesh",
]

CLIENT_AXIS = "clients"


def validate_mesh(
    mesh_shape: Sequence[int],
    mesh_axes: Sequence[str],
    client_axis: str = CLIENT_AXIS,
    num_devices: int | None = None,
    *,
    prefix: str = "",
) -> tuple[int, ...]:
    """Check a mesh description before anything is compiled; return the resolved shape.

    ``mesh_shape`` entries are ints >= 1, or one -1 for "the remaining devices";
    ``mesh_axes`` are distinct names, as many as ``mesh_shape`` entries; ``client_axis`` must
    be one of them; the product must equal ``num_devices`` (default: all devices). Errors
    name the field (with ``prefix``, e.g. ``'config.'``), its value and what is allowed.
    """
    shape, axes = tuple(mesh_shape), tuple(mesh_axes)
    if not all(isinstance(a, str) and a for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(
            f"{prefix}mesh_axes={axes!r} is invalid: must be distinct non-empty axis names"
        )
    if len(shape) != len(axes) or not all(
        isinstance(n, int) and not isinstance(n, bool) and (n >= 1 or n == -1) for n in shape
    ):
        raise ValueError(
            f"{prefix}mesh_shape={shape!r} is invalid: must be {len(axes)} ints (one per axis of "
            f"mesh_axes={axes!r}), each >= 1 or -1 for the remaining devices"
        )
    if sum(n == -1 for n in shape) > 1:
        raise ValueError(f"{prefix}mesh_shape={shape!r} is invalid: at most one entry may be -1")
    if client_axis not in axes:
        raise ValueError(
            f"{prefix}client_axis={client_axis!r} is invalid: must be one of mesh_axes={axes!r}"
        )
    n = jax.device_count() if num_devices is None else int(num_devices)
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n % known:
            raise ValueError(
                f"{prefix}mesh_shape={shape!r} is invalid: the fixed axes ({known} devices) "
                f"must divide the {n} devices"
            )
        shape = tuple(n // known if s == -1 else s for s in shape)
    if math.prod(shape) != n:
        raise ValueError(
            f"{prefix}mesh_shape={shape!r} is invalid: its product must equal the number of "
            f"devices ({n}); use -1 for one axis to take the remaining devices"
        )
    return shape


def client_mesh(
    mesh_shape: Sequence[int] = (-1,),
    mesh_axes: Sequence[str] = (CLIENT_AXIS,),
    client_axis: str = CLIENT_AXIS,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """``jax.make_mesh`` over ``devices`` (default: every device of every process).

    Axes are ``AxisType.Auto`` (the partitioner propagates shardings; the round only
    constrains its client axis).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = validate_mesh(mesh_shape, mesh_axes, client_axis, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(shape)
    return jax.make_mesh(shape, tuple(mesh_axes), axis_types=auto, devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of an array held whole on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def client_sharding(mesh: Mesh, client_axis: str = CLIENT_AXIS) -> ClientSharding:
    """Pad the sampled clients to a multiple of the client axis' size and shard them on it."""
    if client_axis not in mesh.axis_names:
        raise ValueError(
            f"client_axis={client_axis!r} is invalid: must be one of the mesh's axes "
            f"{tuple(mesh.axis_names)!r}"
        )
    sharding = NamedSharding(mesh, P(client_axis))

    def constrain(tree: Any) -> Any:
        return jax.lax.with_sharding_constraint(tree, sharding)

    return ClientSharding(int(mesh.shape[client_axis]), constrain)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every leaf of ``tree`` whole on every device of ``mesh`` (any number of hosts).

    Every process must pass the same values (each builds them from the same seed); works for
    typed PRNG keys. Uses ``jax.make_array_from_callback``, so no device needs to be
    addressable from one process.
    """
    sharding = replicated(mesh)

    def put(x: Any) -> jax.Array:
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(x)
            data = put(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=impl)
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree)


def jit_round(
    fn: Callable[[Any, jax.Array, Any], tuple[Any, Any]],
    mesh: Mesh,
    *,
    donate_state: bool = True,
) -> Callable[[Any, jax.Array, Any], tuple[Any, Any]]:
    """``jax.jit(fn)`` for ``fn(state, key, data) -> (state, metrics)`` on ``mesh``.

    State, key and data go in replicated; the state comes out replicated; the metrics'
    shardings are left to the partitioner (per-client metrics come out sharded over the
    client axis, which is how a test sees that the round is partitioned). ``fn`` is a round
    (``alg.update``) or several (:func:`fmljax.scan_rounds`) of an algorithm built with
    :func:`client_sharding` of the same mesh.
    """
    rep = replicated(mesh)
    return jax.jit(
        fn,
        in_shardings=(rep, rep, rep),
        out_shardings=(rep, None),
        donate_argnums=(0,) if donate_state else (),
    )


def to_host(tree: Any) -> Any:
    """NumPy copies of ``tree``'s leaves, gathered from every process where needed."""

    def get(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_collectives: str = "gloo",
) -> None:
    """``jax.distributed.initialize`` once per process, before any device is touched.

    With no arguments, JAX detects the cluster (Cloud TPU, SLURM, Open MPI, Kubernetes). On
    the CPU backend, cross-process collectives need ``cpu_collectives`` ('gloo' or 'mpi').
    A second call in the same process is a no-op.
    """
    if jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
