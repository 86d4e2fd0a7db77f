"""The data-parallel meta step on a mesh, and the problem the tests compare it on.

    python -m tests.training.meta_steps OUT [full|quick]         # 8 simulated devices
    python -m tests.training.meta_steps OUT ADDRESS PROCESS_ID   # one of 2 jax.distributed
                                                                 # processes, 2 devices each

`run(mesh, fsdp, cfg)` takes STEPS meta steps of a tiny Bart on `mesh` (theta FSDP-sharded when
`fsdp`), every process building the same global batches (a function of the step) and
contributing its own rows, as policies/meta_train.py does. The 8-device run uses data=2 x
fsdp=4, the two processes data=2 x fsdp=2; each writes OUT.npz (or OUT/meta<ID>.npz): the
first step's meta-gradient, every step's metrics and where the batches and theta lived.
tests/training/test_scale_out.py and test_distributed.py compare them with `run` on one device.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from meta_mask.config import MeshConfig, MetaConfig
from meta_mask.model.bart import Bart
from meta_mask.policies import meta, meta_step, meta_train, unroll
from meta_mask.policies import net as netlib
from meta_mask.special_tokens import SpecialTokens
from meta_mask.training import distributed, sharding
from tests.training.helpers import host_params, one_layer_config

V, L, B, T = 128, 12, 8, 6
STEPS = 2
MIN_SIZE = 256  # split the tiny matrices over "fsdp" as BART-base's would be
SPECIAL = SpecialTokens(pad=1, eos=2, bos=0, mask=V - 1, decoder_start=2)
# K = 3: the first step, then a nested scan of the other 2 (segments of 1); microbatches split
# every device's rows; Adam inner steps; the contrastive outer loss.
CFG = MetaConfig(
    inner_steps=3,
    inner_optimizer="adam",
    inner_learning_rate=0.01,
    inner_batch_size=B,
    outer_batch_size=B,
    inner_microbatches=2,
    remat=True,
    remat_segment=1,
    contrastive=True,
    mask_rate=0.3,
    learning_rate=1e-2,
)
# What CI runs (the comprehensive CFG above is a slow test): one SGD step of the whole batch,
# which still splits the inner, outer and contrast rows over the devices and all-reduces the
# meta-gradient, at a fraction of the tracing.
QUICK = MetaConfig(
    inner_steps=1,
    inner_learning_rate=0.5,
    inner_batch_size=B,
    outer_batch_size=B,
    contrastive=True,
    mask_rate=0.3,
    learning_rate=1e-2,
)
CONFIGS = {"full": CFG, "quick": QUICK}
LM = one_layer_config(vocab_size=V)


def _questions(rng: np.random.Generator) -> dict:
    ids = rng.integers(4, V - 1, size=(B, L)).astype(np.int32)
    labels = rng.integers(4, V - 1, size=(B, T)).astype(np.int32)
    dec = np.concatenate([np.full((B, 1), SPECIAL.decoder_start, np.int32), labels[:, :-1]], 1)
    weights = (rng.random((B, T)) < 0.8).astype(np.float32)
    return {"input_ids": ids, "decoder_input_ids": dec, "labels": labels, "weights": weights}


def batches(step: int, k: int = CFG.inner_steps) -> dict:
    """The global host batches of meta step `step` with K = `k` (the same in every process)."""
    rng = np.random.default_rng(100 + step)
    ids = rng.integers(4, V - 1, size=(k, B, L)).astype(np.int32)
    ids[..., 0], ids[..., -1] = SPECIAL.bos, SPECIAL.eos
    valid = np.ones_like(ids, bool)
    valid[..., 0] = valid[..., -1] = False
    inner = {
        "input_ids": ids,
        "valid": valid,
        "example_ids": rng.permutation(k * B).reshape(k, B).astype(np.int32),
    }
    return {"inner": inner, "outer": _questions(rng), "contrast": _questions(rng)}


def meta_gradient(setup: meta.MetaSetup, phi, theta, placed: dict, rng: jax.Array, step: int):
    """The gradient the meta step takes at `step` (its noise, its batches)."""
    noise = meta_step.batch_noise(rng, step, placed)
    inner = {k: v for k, v in placed["inner"].items() if k != "example_ids"}
    grads, _, _ = meta.meta_gradient(
        phi, theta, inner, placed["outer"], noise, setup, contrast=placed.get("contrast")
    )
    return grads


def run(
    mesh: jax.sharding.Mesh, fsdp: bool = False, cfg: MetaConfig = CFG
) -> dict[str, np.ndarray]:
    """STEPS meta steps of `cfg` on `mesh`: "grad<path>" (the first step's meta-gradient),
    "<metric>/<step>" and placement facts."""
    pnet = netlib.PolicyNet(
        vocab_size=V, d_model=16, num_layers=1, num_heads=2, ffn_dim=32, max_length=L,
        pad_id=SPECIAL.pad,
    )  # fmt: skip
    phi = netlib.init_policy_params(pnet, jax.random.key(1), length=L)
    setup = meta.MetaSetup(
        cfg, meta.policy_fn_from_net(pnet), unroll.bart_lm_loss(Bart(LM)), SPECIAL
    )
    theta = host_params(LM, 2)
    theta_sharding = sharding.param_shardings(theta, mesh, min_size=MIN_SIZE if fsdp else 2**62)
    theta = sharding.place(theta, theta_sharding)
    step = meta_step.make_meta_step(setup, mesh=mesh, theta_sharding=theta_sharding)
    state = meta_step.create_meta_state(phi, cfg)
    repl = sharding.replicated(mesh)
    out: dict[str, np.ndarray] = {}
    # The meta-gradient itself at the first step (Adam's first updates are ~sign(gradient):
    # the parameters after them are ill-conditioned where a gradient is at rounding level).
    first = meta_step.shard_meta_batches(meta_train.host_rows(batches(0, cfg.inner_steps)), mesh)
    grad_fn = jax.jit(lambda p, th, b: meta_gradient(setup, p, th, b, jax.random.key(3), 0))
    phi_placed = sharding.place(phi, jax.tree.map(lambda _: repl, phi))
    # Compile both programs before running either, then meet: on a loaded machine one process
    # can still be compiling when the other reaches the first collective, and the CPU
    # collectives give up after 30 s.
    grad_fn = grad_fn.lower(phi_placed, theta, first).compile()
    step = step.lower(state, theta, first, jax.random.key(3)).compile()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("meta_steps: compiled")
    grads = grad_fn(phi_placed, theta, first)
    for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
        out["grad" + jax.tree_util.keystr(path)] = np.asarray(leaf)
    for s in range(STEPS):
        placed = meta_step.shard_meta_batches(
            meta_train.host_rows(batches(s, cfg.inner_steps)), mesh
        )
        state, metrics = step(state, theta, placed, jax.random.key(3))
        for name, value in metrics.items():
            out[f"{name}/{s}"] = np.asarray(value)
    shards = placed["inner"]["input_ids"].addressable_shards
    out["inner_shard_rows"] = np.asarray(sorted({s.data.shape[1] for s in shards}))
    out["theta_sharded"] = np.asarray(not theta["shared"]["embedding"].sharding.is_fully_replicated)
    return out


def assert_matches(result: dict, reference: dict) -> None:
    """A multi-device `run` against the one-device one. The forward (losses) to float32
    rounding; the meta-gradient within 5e-3 of its norm: it is a difference of near-equal
    alignments (the baseline-centred weights), so summation order alone moves it by ~1.5e-3
    (one device, 1 vs 2 inner microbatches); a missing or doubled all-reduce would move it by
    O(1). Step 1 follows Adam's first, sign-like update: looser."""
    for name, value in reference.items():
        if name.startswith(("loss/", "outer_", "mask_rate/", "entropy/")):
            # The losses are differences of two ~5 nats (contrastive): absolute tolerances.
            tol = 2e-6 if name.endswith("/0") else 1e-4
            np.testing.assert_allclose(result[name], value, rtol=tol, atol=tol, err_msg=name)
    grads = [k for k in reference if k.startswith("grad[")]
    norm = np.sqrt(sum(float(np.sum(reference[k] ** 2)) for k in grads))
    diff = np.sqrt(sum(float(np.sum((result[k] - reference[k]) ** 2)) for k in grads))
    assert norm > 1e-3 and diff <= 5e-3 * norm, (diff, norm)


def main() -> None:
    if len(sys.argv) <= 3:
        assert jax.device_count() == 8, jax.devices()
        cfg = CONFIGS[sys.argv[2] if len(sys.argv) == 3 else "full"]
        result = run(sharding.make_mesh(MeshConfig(data=2, fsdp=4)), fsdp=True, cfg=cfg)
        np.savez(sys.argv[1] + ".npz", **result)
        return
    out, address, pid = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    assert distributed.initialize(
        "on", distributed.DistributedArgs(address, num_processes=2, process_id=pid)
    )
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
    result = run(sharding.make_mesh(MeshConfig(data=2, fsdp=2)), fsdp=True)
    np.savez(out / f"meta{pid}.npz", **result)


if __name__ == "__main__":
    main()
