"""Tests for meta_mask.training.steps: losses, optimizer, schedule, the train step."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from meta_mask.config import OptimConfig
from meta_mask.model.bart import Bart, init_params
from meta_mask.training import steps
from tests.training.helpers import (
    PAD,
    assert_runs_match,
    make_batch,
    one_layer_config,
    place,
    run_on_devices,
    tiny_setup,
)


@pytest.fixture(scope="module")
def common():
    """The tiny model (dropout on), its initial state on the host, and one compiled step that
    the train-step tests share (donate=False, so a state can be reused)."""
    model, optim, state = tiny_setup()
    host_state = jax.tree.map(np.asarray, state)
    return model, optim, host_state, steps.make_train_step(model, optim, donate=False)


def assert_trees_close(a, b, **kw):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


# ----------------------------------------------------------------------------- losses


def test_token_losses_match_numpy_cross_entropy():
    model, _, state = tiny_setup()
    batch = make_batch(1)
    ce = np.asarray(jax.jit(functools.partial(steps.token_losses, model))(state.params, batch))
    logits = np.asarray(
        jax.jit(model.apply)(
            {"params": state.params}, batch["input_ids"], batch["decoder_input_ids"]
        ),
        np.float64,
    )
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, batch["labels"][..., None], -1)[..., 0]
    assert ce.shape == batch["labels"].shape and ce.dtype == np.float32
    np.testing.assert_allclose(ce, lse - picked, rtol=1e-5, atol=1e-5)


def test_label_smoothing_matches_optax_smooth_labels():
    model, _, state = tiny_setup()
    batch = make_batch(2)
    eps = 0.1
    ce = jax.jit(functools.partial(steps.token_losses, model, label_smoothing=eps))(
        state.params, batch
    )
    logits = jax.jit(model.apply)(
        {"params": state.params}, batch["input_ids"], batch["decoder_input_ids"]
    )
    onehot = jax.nn.one_hot(batch["labels"], logits.shape[-1])
    ref = optax.softmax_cross_entropy(logits, optax.smooth_labels(onehot, eps))
    np.testing.assert_allclose(ce, ref, rtol=1e-5, atol=1e-6)


def test_weighted_loss_is_weighted_mean_of_token_losses():
    model, _, state = tiny_setup()
    batch = make_batch(3)
    rng = np.random.default_rng(0)
    batch["weights"] = batch["weights"] * rng.uniform(0.2, 1.0, batch["weights"].shape).astype(
        np.float32
    )
    ce = np.asarray(jax.jit(functools.partial(steps.token_losses, model))(state.params, batch))
    weighted_loss = jax.jit(functools.partial(steps.weighted_loss, model))
    loss, metrics = weighted_loss(state.params, batch)
    w = batch["weights"].astype(np.float64)
    np.testing.assert_allclose(loss, (w * ce.astype(np.float64)).sum() / w.sum(), rtol=1e-5)
    assert int(metrics["tokens"]) == int((batch["labels"] != PAD).sum())
    # Weights summing below 1 are not blown up: the denominator is max(sum(w), 1).
    batch["weights"] = np.zeros_like(batch["weights"])
    batch["weights"][0, 0] = 0.25
    loss, _ = weighted_loss(state.params, batch)
    np.testing.assert_allclose(loss, 0.25 * ce[0, 0], rtol=1e-5)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_fused_head_loss_equals_the_logits_path_in_value_and_gradient(label_smoothing):
    # weighted_loss runs the model's fused LM head + loss (custom_vjp); token_losses the plain
    # logits -> cross_entropy path that autodiff differentiates. Same numbers, same gradient.
    model, _, state = tiny_setup()
    batch = make_batch(5)
    batch["labels"][0, -3:] = -100  # out-of-range padding labels under zero weight
    batch["weights"][0, -3:] = 0.0

    def plain(params):
        ce = steps.token_losses(model, params, batch, label_smoothing=label_smoothing)
        return jnp.sum(batch["weights"] * ce) / jnp.maximum(jnp.sum(batch["weights"]), 1.0)

    def fused(params):
        return steps.weighted_loss(model, params, batch, label_smoothing=label_smoothing)[0]

    loss_p, grad_p = jax.jit(jax.value_and_grad(plain))(state.params)
    loss_f, grad_f = jax.jit(jax.value_and_grad(fused))(state.params)
    np.testing.assert_allclose(loss_f, loss_p, rtol=1e-6)
    assert_trees_close(grad_f, grad_p, rtol=1e-4, atol=1e-7)
    assert float(jnp.abs(grad_f["shared"]["embedding"]).max()) > 0
    assert float(jnp.abs(grad_f["final_logits_bias"]).max()) == 0.0  # a buffer in HF


def test_padding_with_zero_weight_changes_neither_loss_nor_gradient():
    model, _, state = tiny_setup()
    short = make_batch(4, src_len=16, tgt_len=16)
    # The same examples with 8 more <pad> on both sides and junk labels under zero weight.
    long = {k: np.pad(v, ((0, 0), (0, 8)), constant_values=PAD) for k, v in short.items()}
    long["weights"] = np.pad(short["weights"], ((0, 0), (0, 8)))
    pad_pos = long["weights"] == 0
    long["labels"] = np.where(pad_pos, 77, long["labels"]).astype(np.int32)
    loss_and_grad = jax.jit(
        jax.value_and_grad(functools.partial(steps.weighted_loss, model), has_aux=True)
    )
    (loss_s, m_s), grad_s = loss_and_grad(state.params, short)
    (loss_l, m_l), grad_l = loss_and_grad(state.params, long)
    np.testing.assert_allclose(loss_s, loss_l, rtol=1e-6)
    assert int(m_s["tokens"]) == int(m_l["tokens"])
    assert_trees_close(grad_s, grad_l, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- optimizer


def test_schedule_values_at_chosen_steps():
    base = dict(learning_rate=1.0, warmup_steps=10, total_steps=110, end_lr_fraction=0.1)
    lin = steps.learning_rate_schedule(OptimConfig(schedule="linear", **base))
    cos = steps.learning_rate_schedule(OptimConfig(schedule="cosine", **base))
    const = steps.learning_rate_schedule(OptimConfig(schedule="constant", **base))
    for sched in (lin, cos, const):
        np.testing.assert_allclose([sched(0), sched(5), sched(10)], [0.0, 0.5, 1.0], atol=1e-6)
    # Linear: 1.0 at step 10 -> 0.1 at step 110.
    np.testing.assert_allclose([lin(60), lin(110), lin(500)], [0.55, 0.1, 0.1], atol=1e-6)
    # Cosine: 0.1 + 0.9 * (1 + cos(pi * t / 100)) / 2.
    want = [0.1 + 0.45 * (1 + np.cos(np.pi * t / 100)) for t in (25, 50, 100)]
    np.testing.assert_allclose([cos(35), cos(60), cos(110)], want, atol=1e-6)
    np.testing.assert_allclose([const(60), const(110)], [1.0, 1.0], atol=1e-6)
    no_warmup = steps.learning_rate_schedule(
        OptimConfig(learning_rate=2.0, warmup_steps=0, total_steps=4, schedule="linear")
    )
    np.testing.assert_allclose([no_warmup(0), no_warmup(2), no_warmup(4)], [2, 1, 0], atol=1e-6)
    with pytest.raises(ValueError, match="warmup_steps=20"):
        steps.learning_rate_schedule(OptimConfig(warmup_steps=20, total_steps=10))
    with pytest.raises(ValueError, match="total_steps=0"):
        steps.learning_rate_schedule(OptimConfig(total_steps=0))


def test_weight_decay_mask_excludes_biases_and_layer_norms():
    _, _, state = tiny_setup()
    mask = steps.weight_decay_mask(state.params)
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): v
        for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]
    }
    assert flat["shared/embedding"] and flat["encoder/embed_positions/embedding"]
    assert flat["encoder/layers_0/self_attn/q_proj/kernel"]
    assert flat["decoder/layers_0/encoder_attn/out_proj/kernel"]
    assert flat["decoder/layers_0/fc2/kernel"]
    assert not flat["final_logits_bias"]
    for side in ("encoder", "decoder"):
        assert not flat[f"{side}/layernorm_embedding/scale"]
        assert not flat[f"{side}/layernorm_embedding/bias"]
        assert not flat[f"{side}/layers_0/final_layer_norm/scale"]
        assert not flat[f"{side}/layers_0/self_attn_layer_norm/bias"]
        assert not flat[f"{side}/layers_0/fc1/bias"]
    # Exactly the >= 2-D leaves (kernels and embeddings) decay in BART.
    params = {
        "/".join(str(getattr(k, "key", k)) for k in path): v
        for path, v in jax.tree_util.tree_flatten_with_path(state.params)[0]
    }
    assert {k for k, v in flat.items() if v} == {k for k, p in params.items() if p.ndim >= 2}


def test_optimizer_decays_only_masked_params():
    # With zero gradients Adam's step is 0, so the update is exactly -lr * wd * param.
    optim = OptimConfig(
        learning_rate=0.5, weight_decay=0.1, warmup_steps=0, schedule="constant", total_steps=10
    )
    _, _, state = tiny_setup(optim=optim)
    tx = steps.make_optimizer(optim)
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(state.params), state.params)
    mask = steps.weight_decay_mask(state.params)
    for u, p, m in zip(
        jax.tree.leaves(updates), jax.tree.leaves(state.params), jax.tree.leaves(mask), strict=True
    ):
        np.testing.assert_allclose(u, -0.05 * p if m else np.zeros_like(p), rtol=1e-6)


# ----------------------------------------------------------------------------- train step


def test_overfits_one_batch():
    optim = OptimConfig(
        learning_rate=3e-3, warmup_steps=0, schedule="constant", weight_decay=0.0, total_steps=200
    )
    model, _, state = tiny_setup(dropout=0.0, optim=optim)
    batch = make_batch(6)
    train_step = steps.make_train_step(model, optim)
    rng = jax.random.key(0)
    losses = []
    for _ in range(200):
        state, metrics = train_step(state, batch, rng)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
    assert float(metrics["accuracy"]) > 0.95
    assert int(state.step) == 200
    assert int(metrics["tokens"]) == int(batch["weights"].sum())


def test_train_step_traces_once_and_donates_the_state(common):
    model, optim, host_state, keep = common
    traces = []
    base = steps.default_loss_fn(model)

    def counting_loss(params, batch, rng):
        traces.append(1)  # runs only while tracing
        return base(params, batch, rng)

    donate = steps.make_train_step(model, optim, loss_fn=counting_loss)
    state = place(host_state)
    kept, _ = keep(state, make_batch(10), jax.random.key(1))
    assert not any(x.is_deleted() for x in jax.tree.leaves(state))
    new_state, _ = donate(state, make_batch(10), jax.random.key(1))
    # Donated: the old state's buffers now belong to the new state.
    assert all(x.is_deleted() for x in jax.tree.leaves(state.params))
    assert all(x.is_deleted() for x in jax.tree.leaves(state.opt_state))
    assert_trees_close(new_state.params, kept.params, rtol=0, atol=0)
    for i in range(3):
        new_state, _ = donate(new_state, make_batch(11 + i), jax.random.key(1))
    # A state as init returns it (one device, not on the mesh) is moved, not traced for.
    donate(jax.tree.map(jnp.asarray, host_state), make_batch(14), jax.random.key(1))
    assert len(traces) == 1
    assert donate.jitted._cache_size() == 1


@pytest.mark.slow  # op-by-op execution of a whole train step: ~27 s on 2 cores
def test_jit_equals_no_jit_with_dropout(common):
    model, optim, host_state, jitted = common
    state = place(host_state)
    eager = steps.make_train_step(model, optim, jit=False)
    rng = jax.random.key(3)
    s_jit, s_eager = state, state
    for i in range(2):
        batch = make_batch(20 + i)
        s_jit, m_jit = jitted(s_jit, batch, rng)
        s_eager, m_eager = eager(s_eager, batch, rng)
        np.testing.assert_allclose(m_jit["loss"], m_eager["loss"], rtol=1e-5)
    assert int(s_jit.step) == int(s_eager.step) == 2
    assert_trees_close(s_jit.params, s_eager.params, rtol=1e-4, atol=1e-6)
    assert_trees_close(s_jit.opt_state, s_eager.opt_state, rtol=1e-4, atol=1e-7)
    # Dropout really is on: a different base rng gives a different loss and gradient.
    _, other = jitted(state, make_batch(20), jax.random.key(4))
    _, first = jitted(state, make_batch(20), rng)
    assert float(other["loss"]) != float(first["loss"])
    assert float(other["grad_norm"]) != float(first["grad_norm"])


def test_metrics_report_schedule_step_and_clipped_gradients(common):
    _, optim, host_state, train_step = common
    state = place(host_state)
    lrs = []
    for i in range(3):
        state, metrics = train_step(state, make_batch(30 + i), jax.random.key(0))
        lrs.append(float(metrics["learning_rate"]))
        assert set(metrics) >= {"loss", "accuracy", "tokens", "grad_norm", "learning_rate"}
        if i == 0:
            # Clipping sits before Adam: after one step mu = (1 - b1) * clipped gradient,
            # whose norm is clip_norm whenever the raw norm exceeds it.
            assert float(metrics["grad_norm"]) > optim.clip_norm
            mu = state.opt_state[1][0].mu
            np.testing.assert_allclose(
                optax.tree.norm(mu), (1 - optim.b1) * optim.clip_norm, rtol=1e-4
            )
    # Warmup over 4 steps to 1e-3: the rate used by updates 0, 1, 2.
    np.testing.assert_allclose(lrs, [0.0, 2.5e-4, 5e-4], rtol=1e-6, atol=1e-12)
    assert int(state.step) == 3


def test_bfloat16_compute_keeps_float32_params_and_loss():
    optim = OptimConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10)
    cfg = one_layer_config(dtype="bfloat16")
    params = init_params(cfg, jax.random.key(0))
    state = place(steps.create_train_state(params, steps.make_optimizer(optim)))
    train_step = steps.make_train_step(Bart(cfg), optim)
    batch = make_batch(9)
    state, first = train_step(state, batch, jax.random.key(0))
    for _ in range(4):
        state, metrics = train_step(state, batch, jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert metrics["loss"].dtype == jnp.float32
    assert float(metrics["loss"]) < float(first["loss"])


# ----------------------------------------------------------------------------- multi-device


def test_multi_device_mesh_step_equals_single_device(tmp_path, common):
    _, _, host_state, train_step = common
    state = place(host_state)
    for i in range(3):
        state, metrics = train_step(state, make_batch(40 + i), jax.random.key(5))
    result = tmp_path / "multi"
    run_on_devices("tests.training.mesh_steps", result, devices=4)
    facts = json.loads(result.with_suffix(".json").read_text())
    # The batch really was split over 4 devices and, with fsdp=2, the embedding over "fsdp".
    assert facts["data4"] == {"emb_spec": [], "batch_shards": 4}
    assert facts["data2_fsdp2"] == {"emb_spec": ["fsdp", None], "batch_shards": 4}
    assert_runs_match(
        result.with_suffix(".npz"), ("data4", "data2_fsdp2"), metrics["loss"], state.params
    )
