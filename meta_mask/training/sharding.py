"""Device mesh, shardings of batches and parameters, and placement of host batches.

Owns the one mapping from a `MeshConfig` to a `jax.sharding.Mesh` with axes ("data", "fsdp"),
the shardings the train step is jitted with, and `shard_batch`, which turns a host batch into
a global jax.Array laid out over the mesh. Every device holds a distinct slice of the batch
(the batch dimension is split over data x fsdp); parameters are replicated over "data" and,
when fsdp > 1, big matrices are split over "fsdp" along their largest divisible dimension.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from meta_mask.config import MeshConfig

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)
# The batch dimension is split over every device: in FSDP the fsdp axis also sees distinct data.
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
# Leaves smaller than this stay replicated even with fsdp > 1: splitting them saves no memory
# worth the all-gather latency.
MIN_FSDP_SIZE = 2**14


def mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> tuple[int, int]:
    """(data, fsdp) sizes for `num_devices`; `data=-1` takes all devices left after fsdp."""
    if mesh_cfg.fsdp < 1:
        raise ValueError(f"MeshConfig.fsdp={mesh_cfg.fsdp}; must be >= 1")
    data = mesh_cfg.data
    if data == -1:
        if num_devices % mesh_cfg.fsdp:
            raise ValueError(
                f"MeshConfig.fsdp={mesh_cfg.fsdp} does not divide the {num_devices} devices"
            )
        data = num_devices // mesh_cfg.fsdp
    if data < 1:
        raise ValueError(f"MeshConfig.data={mesh_cfg.data}; must be -1 (all devices) or >= 1")
    if data * mesh_cfg.fsdp != num_devices:
        raise ValueError(
            f"MeshConfig data={mesh_cfg.data} x fsdp={mesh_cfg.fsdp} = {data * mesh_cfg.fsdp} "
            f"devices, but {num_devices} are available; set data=-1 to use them all"
        )
    return data, mesh_cfg.fsdp


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp") mesh over `devices` (default: all devices) with Auto axes.

    Auto axes let the compiler propagate shardings inside the step from the explicit in/out
    shardings we give `jax.jit` (jax.make_mesh's own default is Explicit axes).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device of the mesh; other dims whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_divisor(mesh: Mesh) -> int:
    """The global batch size must be a multiple of this."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Place a host batch (dict of arrays with a leading batch dim) on the mesh.

    Single process: `batch` is the global batch. Multi-process: `batch` is this process's
    slice, and the global array is assembled from every process's slice.
    """
    sharding = batch_sharding(mesh)
    divisor = batch_divisor(mesh)
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        if value.ndim == 0:
            raise ValueError(f"batch[{name!r}] is a scalar; every batch entry needs a batch dim")
        if jax.process_count() == 1:
            if value.shape[0] % divisor:
                raise ValueError(
                    f"batch[{name!r}] has batch size {value.shape[0]}, not a multiple of the "
                    f"{divisor} devices it is split over (mesh {dict(mesh.shape)})"
                )
            out[name] = jax.device_put(value, sharding)
        else:
            # Each process contributes its local rows; jax checks the local shard shapes.
            out[name] = jax.make_array_from_process_local_data(sharding, value)
    return out


def _shape(x: Any) -> tuple[int, ...]:
    """Shape of an array, a jax.ShapeDtypeStruct, or a Python scalar."""
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> PartitionSpec:
    """Split the largest dim divisible by `fsdp` of a big (>= 2-D) array; else replicate."""
    if fsdp == 1 or len(shape) < 2 or math.prod(shape) < min_size:
        return PartitionSpec()
    # Largest dim first; ties broken towards the leading dim (stable sort).
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = FSDP_AXIS
            return PartitionSpec(*spec)
    return PartitionSpec()


def param_shardings(tree: Any, mesh: Mesh, *, min_size: int = MIN_FSDP_SIZE) -> Any:
    """A NamedSharding per leaf of `tree` (params, or a whole TrainState).

    With fsdp = 1 every leaf is replicated. With fsdp > 1, each leaf of >= `min_size`
    elements and >= 2 dims is split over "fsdp" along its largest dimension divisible by the
    fsdp size. The rule depends only on a leaf's shape, so AdamW moments get the same sharding
    as their parameters when this is applied to a whole TrainState.
    """
    fsdp = mesh.shape[FSDP_AXIS]
    return jax.tree.map(lambda x: NamedSharding(mesh, _fsdp_spec(_shape(x), fsdp, min_size)), tree)
