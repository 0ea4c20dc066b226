"""Device mesh, parameter and batch shardings, and multi-host start-up: the one place for placement policy.

Mesh axes ('data', 'fsdp'). A parameter (and its optimizer state, EMA and the frozen teacher) is
split along its largest dimension that 'fsdp' divides, else replicated; it is replicated over
'data'. The batch is split over both axes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")

# Environment variables that start a multi-process GPU run (set by launch/ scripts, or by hand):
# the coordinator's host:port, the number of processes and this process's index.
COORDINATOR_ENV = "PERFLOW_COORDINATOR"
NUM_PROCESSES_ENV = "PERFLOW_NUM_PROCESSES"
PROCESS_ID_ENV = "PERFLOW_PROCESS_ID"


def initialize_distributed(tpu_pod: bool = False) -> None:
    """Join the other processes of a multi-host run, if this is one.

    On a Cloud TPU pod slice (``tpu_pod``) ``jax.distributed.initialize()`` finds the other hosts
    itself; on GPU clusters the three PERFLOW_* variables above name the coordinator, the
    number of processes and this one. One process on one machine needs neither.
    """
    if COORDINATOR_ENV in os.environ:
        missing = [name for name in (NUM_PROCESSES_ENV, PROCESS_ID_ENV) if name not in os.environ]
        if missing:
            raise ValueError(
                f"{COORDINATOR_ENV} is set but {', '.join(missing)} not: set all three for a multi-host run"
            )
        jax.distributed.initialize(
            coordinator_address=os.environ[COORDINATOR_ENV],
            num_processes=int(os.environ[NUM_PROCESSES_ENV]),
            process_id=int(os.environ[PROCESS_ID_ENV]),
        )
    elif tpu_pod:
        jax.distributed.initialize()


def resolve_mesh_shape(shape: Sequence[int], device_count: int | None = None) -> tuple[int, ...]:
    """(data, fsdp) sizes with a -1 filled in; checks the form, and the fit when ``device_count`` is given."""
    shape = tuple(int(size) for size in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape}: give two sizes, (data, fsdp), e.g. (-1, 1)")
    if any(size != -1 and size < 1 for size in shape):
        raise ValueError(f"mesh shape {shape}: sizes must be positive, or -1 for one of them to fill the devices")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one size may be -1, e.g. (-1, 1) or (1, -1)")
    if device_count is None:
        return shape
    known = int(np.prod([size for size in shape if size != -1]))
    if -1 in shape:
        if device_count % known:
            divisors = ", ".join(str(d) for d in range(1, device_count + 1) if device_count % d == 0)
            raise ValueError(
                f"mesh shape {shape} needs the {device_count} devices to split into groups of {known}: "
                f"use a size that divides {device_count} ({divisors})"
            )
        return tuple(device_count // known if size == -1 else size for size in shape)
    if known != device_count:
        raise ValueError(
            f"mesh shape {shape} holds {known} devices but there are {device_count}: make the sizes multiply to "
            f"{device_count}, or use -1 for one of them, e.g. (-1, 1) or (1, -1)"
        )
    return shape


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh; one entry of ``shape`` may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices).reshape(resolve_mesh_shape(shape, len(devices))), MESH_AXES)


def parameter_spec(shape: Sequence[int], fsdp_size: int) -> PartitionSpec:
    """Split the largest dimension that ``fsdp_size`` divides over 'fsdp'; replicate otherwise."""
    if fsdp_size > 1:
        for dim in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
            if shape[dim] % fsdp_size == 0:
                return PartitionSpec(*(["fsdp" if d == dim else None for d in range(len(shape))]))
    return PartitionSpec()


def parameter_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for every leaf of a parameter-shaped tree (params, optimizer state, EMA)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, parameter_spec(np.shape(x), fsdp)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The batch dimension split over both mesh axes."""
    return NamedSharding(mesh, PartitionSpec(MESH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def place(tree: Any, placement: jax.sharding.Sharding) -> Any:
    """Host arrays (the same on every process) as global arrays placed by ``placement``."""
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), placement, lambda index: x[index]), tree)


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's batch -> global arrays placed by `batch_sharding`.

    Every process calls it with its own [batch_size, ...] arrays; the result is
    [batch_size x process_count, ...], each device holding its consecutive slice, so the global batch
    must divide by the number of devices in the mesh. Text fields stay on the host: leave them out.
    """
    placement = batch_sharding(mesh)
    return {name: jax.make_array_from_process_local_data(placement, value) for name, value in batch.items()}
