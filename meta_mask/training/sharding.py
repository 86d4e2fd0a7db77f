"""Device mesh, shardings of batches and parameters, and placement of host batches.

Owns the one mapping from a `MeshConfig` to a `jax.sharding.Mesh` with axes ("data", "fsdp"),
the shardings the train step is jitted with, and `shard_batch`, which turns a host batch into
a global jax.Array laid out over the mesh. Every device holds a distinct slice of the batch
(the batch dimension is split over data x fsdp); parameters are replicated over "data" and,
when fsdp > 1, big matrices are split over "fsdp" by rules on their parameter path (the shared
embedding on its vocabulary, Dense kernels on their larger dimension), else by shape.
`sharded_call` / `init_sharded_params` create parameters and optimizer state directly in that
layout (shape first with `jax.eval_shape`, then one jit with `out_shardings`), so no tree is
ever materialized whole on one device. Multi-host start-up lives in `training/distributed.py`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from meta_mask.config import MeshConfig, ModelConfig

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


def batch_sharding(mesh: Mesh, dim: int = 0) -> NamedSharding:
    """The batch dimension `dim` (default the leading one) split over every device of the mesh;
    other dims whole."""
    return NamedSharding(mesh, PartitionSpec(*([None] * dim), BATCH_AXES))


def batch_divisor(mesh: Mesh) -> int:
    """The global batch size must be a multiple of this."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, dim: int = 0) -> dict[str, jax.Array]:
    """Place a host batch (dict of arrays with a batch dim, `dim`, default the leading one) on
    the mesh.

    Single process: `batch` is the global batch. Multi-process: `batch` is this process's
    slice, and the global array is assembled from every process's slice.
    """
    sharding = batch_sharding(mesh, dim)
    divisor = batch_divisor(mesh)
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        if value.ndim <= dim:
            what = "is a scalar" if value.ndim == 0 else f"has shape {value.shape}"
            raise ValueError(f"batch[{name!r}] {what}; every batch entry needs a batch dim {dim}")
        if jax.process_count() == 1:
            if value.shape[dim] % divisor:
                raise ValueError(
                    f"batch[{name!r}] has batch size {value.shape[dim]}, not a multiple of the "
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


# (regex searched in the "/"-joined parameter path, preferred dim to split over "fsdp"); the first
# matching rule wins. A preferred dim that the fsdp size does not divide (BART's vocabulary,
# 50265, is odd) falls back to the shape rule. The rules match inside a whole TrainState too
# (opt_state/.../mu/shared/embedding), so Adam's moments follow their parameter.
# - The shared embedding on the vocabulary: the output projection then yields vocab-sharded
#   logits, and the all-gathered dimension is the small one (d_model).
# - LayerNorm scales and biases (1-D) never match the size threshold: replicated.
# - Dense kernels [in, out] and everything else: the larger divisible dim (the shape rule).
PARTITION_RULES: tuple[tuple[str, int | None], ...] = (
    (r"(^|/)shared/embedding$", 0),
    (r"(^|/)kernel$", None),
)


def _path_name(path: tuple[Any, ...]) -> str:
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    return "/".join(names)


def _fsdp_spec(
    shape: tuple[int, ...], fsdp: int, min_size: int, preferred: int | None = None
) -> PartitionSpec:
    """Split `preferred`, else the largest dim divisible by `fsdp`, of a big (>= 2-D) array;
    small arrays and vectors stay replicated."""
    if fsdp == 1 or len(shape) < 2 or math.prod(shape) < min_size:
        return PartitionSpec()
    # Largest dim first; ties broken towards the leading dim (stable sort).
    order = sorted(range(len(shape)), key=lambda d: -shape[d])
    if preferred is not None:
        order.insert(0, preferred % len(shape))
    for dim in order:
        if shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = FSDP_AXIS
            return PartitionSpec(*spec)
    return PartitionSpec()


def partition_spec(
    path: str,
    shape: tuple[int, ...],
    fsdp: int,
    *,
    min_size: int = MIN_FSDP_SIZE,
    rules: Sequence[tuple[str, int | None]] = PARTITION_RULES,
) -> PartitionSpec:
    """The PartitionSpec of one leaf named `path` ("shared/embedding") of `shape`."""
    preferred = next((dim for pattern, dim in rules if re.search(pattern, path)), None)
    return _fsdp_spec(shape, fsdp, min_size, preferred)


def param_shardings(
    tree: Any,
    mesh: Mesh,
    *,
    min_size: int = MIN_FSDP_SIZE,
    rules: Sequence[tuple[str, int | None]] = PARTITION_RULES,
) -> Any:
    """A NamedSharding per leaf of `tree` (params, or a whole TrainState).

    With fsdp = 1 every leaf is replicated. With fsdp > 1, each leaf of >= `min_size`
    elements and >= 2 dims is split over "fsdp": along the dim its path's rule prefers (see
    PARTITION_RULES) when the fsdp size divides it, else along its largest divisible dim. The
    rules match path suffixes, so AdamW moments get the same sharding as their parameters when
    this is applied to a whole TrainState. Leaves no dim of which divides stay replicated.
    """
    fsdp = mesh.shape[FSDP_AXIS]

    def one(path: tuple[Any, ...], x: Any) -> NamedSharding:
        spec = partition_spec(_path_name(path), _shape(x), fsdp, min_size=min_size, rules=rules)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, tree)


def place(tree: Any, shardings: Any) -> Any:
    """Move every leaf of `tree` to its sharding in `shardings` (a pytree like `tree`).

    Leaves already there are kept. In a multi-process run a leaf that lives on this process
    only (e.g. parameters read from a Hugging Face file on every host) goes through host memory,
    where each process keeps just the slices its own devices hold.
    """

    def one(x: Any, s: NamedSharding) -> jax.Array:
        if isinstance(x, jax.Array) and x.sharding == s:
            return x
        if isinstance(x, jax.Array) and jax.process_count() > 1 and x.is_fully_addressable:
            x = np.asarray(x)
        return jax.device_put(x, s)

    return jax.tree.map(one, tree, shardings)


def sharded_call(
    fn: Callable[..., Any],
    *args: Any,
    mesh: Mesh,
    min_size: int = MIN_FSDP_SIZE,
    rules: Sequence[tuple[str, int | None]] = PARTITION_RULES,
) -> Any:
    """`fn(*args)` computed under jit with its outputs laid out by `param_shardings`.

    Shape first (`jax.eval_shape`, no FLOPs, no memory), then one jit whose `out_shardings`
    put each output leaf straight into its shards: a parameter tree or an optimizer state
    is created where the train step keeps it, never whole on one device. Array arguments must
    already be on `mesh` (or be host values / PRNG keys).
    """
    abstract = jax.eval_shape(fn, *args)
    shardings = param_shardings(abstract, mesh, min_size=min_size, rules=rules)
    return jax.jit(fn, out_shardings=shardings)(*args)


def init_sharded_params(
    config: ModelConfig,
    rng: jax.Array,
    mesh: Mesh,
    *,
    min_size: int = MIN_FSDP_SIZE,
    batch_shape: tuple[int, int] = (1, 8),
) -> Any:
    """BART parameters initialized directly in their FSDP layout over `mesh`.

    The same values as `bart.init_params(config, rng)` (jax's partitionable threefry draws the
    same numbers however the output is split), but each device only ever holds its shards.
    """
    from meta_mask.model import bart  # model code stays out of sharding's import graph

    ids = jnp.full(batch_shape, config.bos_token_id, jnp.int32)

    def init(key: jax.Array) -> Any:
        return bart.Bart(config).init(key, ids, ids)["params"]

    return sharded_call(init, rng, mesh=mesh, min_size=min_size)
