"""Checkpoints: the full TrainState plus the run config, and bare parameter trees.

Owns every read and write of training state on disk, through orbax. A checkpoint step holds
two items: "state" (params, opt_state, step; arrays via StandardSave) and "metadata" (the run
config as JSON). Restoring checks the stored tree against the caller's target before reading
a byte, and fails with the parameter path and both shapes, or the config field and both
values. Orbax writes each step to `<step>.orbax-checkpoint-tmp-*` and renames it when complete,
so a run killed mid-save leaves a tmp folder that is ignored (and cleaned up) next time.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

STATE_ITEM = "state"
METADATA_ITEM = "metadata"


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk does not fit what the caller asked to restore into."""


# ----------------------------------------------------------------------------- tree checks


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path(path: tuple[Any, ...]) -> str:
    return "/".join(_key_name(k) for k in path)


def _shapes_by_path(tree: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    # Dict keys, dataclass fields and NamedTuple fields all become names, so a TrainState and
    # the nested dicts/lists orbax stores for it flatten to the same paths.
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path(p): (tuple(x.shape), np.dtype(x.dtype)) for p, x in leaves}


def check_tree_matches(stored: Any, target: Any, where: str) -> None:
    """Raise CheckpointMismatchError naming every path whose presence, shape or dtype differs.

    `stored` is orbax's metadata tree of the checkpoint, `target` the (abstract) tree the caller
    restores into; `where` names the checkpoint in the message.
    """
    have = _shapes_by_path(stored)
    want = _shapes_by_path(target)
    problems = []
    for path in sorted(want.keys() - have.keys()):
        problems.append(f"{path!r}: missing from the checkpoint (target shape {want[path][0]})")
    for path in sorted(have.keys() - want.keys()):
        problems.append(f"{path!r}: in the checkpoint (shape {have[path][0]}) but not the target")
    for path in sorted(want.keys() & have.keys()):
        (s_shape, s_dtype), (t_shape, t_dtype) = have[path], want[path]
        if s_shape != t_shape or s_dtype != t_dtype:
            problems.append(
                f"{path!r}: checkpoint has shape {s_shape} {s_dtype}, "
                f"target has shape {t_shape} {t_dtype}"
            )
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointMismatchError(
            f"checkpoint {where} does not match the target state:\n  {shown}{more}"
        )


def _flatten_dict(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten_dict(value, name + "."))
        else:
            flat[name] = value
    return flat


def to_jsonable(metadata: Any) -> dict[str, Any]:
    """A dataclass config or mapping as plain JSON types (tuples become lists)."""
    if dataclasses.is_dataclass(metadata) and not isinstance(metadata, type):
        metadata = dataclasses.asdict(metadata)
    return json.loads(json.dumps(metadata))


def check_metadata_matches(
    stored: Mapping[str, Any],
    expected: Any,
    sections: Iterable[str],
    where: str,
    defaults: Any = None,
) -> None:
    """Raise CheckpointMismatchError naming each field of `sections` whose value differs. A
    field the checkpoint lacks (written before that option existed) counts as its value in
    `defaults` (the sections of the default config), when given."""
    expected = to_jsonable(expected)
    defaults = to_jsonable(defaults) if defaults is not None else {}
    problems = []
    for section in sections:
        have = _flatten_dict(stored.get(section, {}), section + ".")
        want = _flatten_dict(expected.get(section, {}), section + ".")
        default = _flatten_dict(defaults.get(section, {}), section + ".")
        have.update({f: default[f] for f in want.keys() - have.keys() if f in default})
        for field in sorted(have.keys() | want.keys()):
            missing = "<missing>"
            if have.get(field, missing) != want.get(field, missing):
                problems.append(
                    f"{field}: checkpoint has {have.get(field, missing)!r}, "
                    f"expected {want.get(field, missing)!r}"
                )
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint {where} was written with a different config:\n  " + "\n  ".join(problems)
        )


def abstract_tree(tree: Any, sharding: Any = None) -> Any:
    """ShapeDtypeStructs with shardings to restore into, from arrays or ShapeDtypeStructs.

    `sharding` (one Sharding for every leaf, or a pytree of them like `tree`) overrides the
    leaves' own shardings. Leaves with neither (numpy arrays, ShapeDtypeStructs from
    jax.eval_shape) go to the first local device.
    """
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def one(x: Any, s: Any = None) -> jax.ShapeDtypeStruct:
        if s is None:
            s = getattr(x, "sharding", None)
        if not isinstance(s, jax.sharding.Sharding):
            s = default
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    if sharding is None:
        return jax.tree.map(one, tree)
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, sharding), tree)
    return jax.tree.map(one, tree, sharding)


# ----------------------------------------------------------------------------- manager


class CheckpointManager:
    """Numbered TrainState checkpoints with the run config, under one directory.

    save(step, state, metadata) writes (asynchronously: arrays are copied to host before it
    returns, so the caller may donate `state` to the next step right away) when `step` is a
    multiple of save_interval_steps, or always with force=True; the newest max_to_keep steps
    are kept. Use as a context manager, or call close(), so pending writes finish.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
        best_fn: Callable[[Mapping[str, Any]], Any] | None = None,
    ) -> None:
        self.directory = os.path.abspath(os.fspath(directory))
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        registry.add(STATE_ITEM, ocp.args.StandardSave)
        registry.add(STATE_ITEM, ocp.args.StandardRestore)
        registry.add(METADATA_ITEM, ocp.args.JsonSave)
        registry.add(METADATA_ITEM, ocp.args.JsonRestore)
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps={save_interval_steps}; must be >= 1")
        # Our own rule (step % interval == 0) decides saves: orbax's policy also saves the
        # first step it sees, whatever its number.
        self.save_interval_steps = save_interval_steps
        # The newest `max_to_keep` steps (to resume from) and, with `best_fn`, the best step
        # saved with metrics (to select): best_fn(metrics) -> a sortable key, larger is better.
        keep: Any = ocp.checkpoint_managers.LatestN(n=max_to_keep)
        if best_fn is not None:
            best = ocp.checkpoint_managers.BestN(
                get_metric_fn=best_fn, n=1, keep_checkpoints_without_metrics=False
            )
            keep = ocp.checkpoint_managers.AnyPreservationPolicy([keep, best])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=keep,
            best_fn=best_fn,
            best_mode="max",
            create=True,
            # Leftovers of a save that was killed before its final rename.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._best_fn = best_fn
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=registry
        )

    def save(
        self,
        step: int,
        state: Any,
        metadata: Any,
        *,
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Write `state` and `metadata` (a dict or dataclass config) as `step`; True if saved.

        Saves when step % save_interval_steps == 0, or always with force=True. `metrics` (the
        step's evaluation) rank the step for `best_step` when the manager has a best_fn.
        """
        if not force and step % self.save_interval_steps:
            return False
        return self._manager.save(
            int(step),
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.StandardSave(state),
                    METADATA_ITEM: ocp.args.JsonSave(to_jsonable(metadata)),
                }
            ),
            metrics=None if metrics is None else dict(metrics),
            force=True,
        )

    def wait_until_finished(self) -> None:
        """Block until every pending write is on disk (renamed into place)."""
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        """The newest complete step, or None when there is none."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step whose metrics rank highest by best_fn (None without a best_fn or metrics)."""
        if self._best_fn is None:
            return None
        return self._manager.best_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def _step_or_latest(self, step: int | None) -> int:
        self.wait_until_finished()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}"
            )
        return step

    def metadata(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata (run config) stored with `step` (default: latest)."""
        step = self._step_or_latest(step)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()})
        )
        return restored[METADATA_ITEM]

    def restore(
        self,
        target_state: Any,
        *,
        step: int | None = None,
        expected_metadata: Any = None,
        compare_sections: Iterable[str] = ("model",),
        sharding: Any = None,
        defaults: Any = None,
    ) -> Any:
        """Read `step` (default: latest) into the structure, shapes and shardings of `target_state`.

        `target_state` may hold arrays or jax.ShapeDtypeStructs; `sharding` (one, or a pytree)
        places the result where the train step expects it, e.g. `sharding.replicated(mesh)`
        for a target from jax.eval_shape, which carries none. Before reading, every leaf's
        shape and dtype is checked against the checkpoint, and when `expected_metadata` is
        given, each field of its `compare_sections` (default: the model config) must equal the
        stored one (a field the checkpoint lacks counts as its value in `defaults`); both
        raise CheckpointMismatchError naming what differs.
        """
        step = self._step_or_latest(step)
        where = os.path.join(self.directory, str(step))
        if expected_metadata is not None:
            check_metadata_matches(
                self.metadata(step), expected_metadata, compare_sections, where, defaults
            )
        stored = self._manager.item_metadata(step)[STATE_ITEM]
        check_tree_matches(getattr(stored, "tree", stored), target_state, where)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{STATE_ITEM: ocp.args.StandardRestore(abstract_tree(target_state, sharding))}
            ),
        )
        return restored[STATE_ITEM]

    def close(self) -> None:
        """Finish pending writes and release orbax's background threads."""
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- bare params


def save_params(path: str | os.PathLike, params: Any, *, overwrite: bool = False) -> None:
    """Write a bare parameter tree (e.g. a learned policy) to the folder `path`."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(os.fspath(path)), params, force=overwrite)
        checkpointer.wait_until_finished()


def load_params(path: str | os.PathLike, target: Any = None, sharding: Any = None) -> Any:
    """Read a tree written by `save_params`.

    With `target` (arrays or ShapeDtypeStructs), shapes and dtypes are checked first
    (CheckpointMismatchError names the path) and arrays land with `sharding` or else the
    target's own shardings; without it, the stored tree is returned as saved.
    """
    path = os.path.abspath(os.fspath(path))
    with ocp.StandardCheckpointer() as checkpointer:
        if target is None:
            return checkpointer.restore(path)
        stored = checkpointer.metadata(path)
        stored = getattr(stored, "item_metadata", stored)
        check_tree_matches(getattr(stored, "tree", stored), target, path)
        return checkpointer.restore(path, abstract_tree(target, sharding))
