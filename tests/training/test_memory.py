"""Tests for meta_mask.training.memory: the estimates behind launch/README.md's memory table,
checked against what jax really saves for the backward pass and against XLA's memory_analysis()
of the compiled train step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meta_mask.config import MetaConfig, OptimConfig, tiny_model_config
from meta_mask.model import bart
from meta_mask.training import memory, steps

CONFIGS = {
    "tiny": tiny_model_config(dropout=0.1),
    "wider": tiny_model_config(
        dropout=0.1,
        d_model=64,
        encoder_ffn_dim=256,
        decoder_ffn_dim=256,
        vocab_size=300,
        encoder_layers=3,
        decoder_layers=1,
    ),
}
SHAPES = [(8, 16, 16), (4, 64, 32)]  # (batch, source, target)


def _batch(b: int, s: int, t: int) -> dict:
    ids = {k: jnp.ones((b, n), jnp.int32) for k, n in (("input_ids", s), ("labels", t))}
    return {**ids, "decoder_input_ids": jnp.ones((b, t), jnp.int32), "weights": jnp.ones((b, t))}


def _residuals(cfg, b: int, s: int, t: int) -> list:
    """Shapes of the residuals jax.vjp keeps for the train loss's backward pass."""
    loss = steps.default_loss_fn(bart.Bart(cfg))
    abstract_params = jax.eval_shape(lambda: bart.init_params(cfg, jax.random.key(0)))
    batch = _batch(b, s, t)

    def backward_fn(params):
        return jax.vjp(lambda q: loss(q, batch, jax.random.key(0))[0], params)[1]

    return jax.tree.leaves(jax.eval_shape(backward_fn, abstract_params))


def residual_activation_bytes(cfg, b: int, s: int, t: int) -> int:
    """Bytes of every batch-shaped residual: [B, ..], [B*S, ..], [B*T, ..], statistics too.

    A residual is batch-shaped when it grows with the batch (traced again at 2B; the program,
    and so the order of its residuals, is the same). Parameters and their casts do not grow,
    and a first-dimension test would take them for activations when a parameter dimension
    happens to equal B*S (the tiny config's vocab of 128 at B*S = 8*16).
    """
    one, two = _residuals(cfg, b, s, t), _residuals(cfg, 2 * b, s, t)
    return sum(
        x.size * x.dtype.itemsize for x, y in zip(one, two, strict=True) if x.shape != y.shape
    )


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_param_count_is_exact(name):
    cfg = CONFIGS[name]
    params = jax.eval_shape(lambda: bart.init_params(cfg, jax.random.key(0)))
    assert memory.num_params(cfg) == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


@pytest.mark.parametrize(("name", "shape"), list(zip(sorted(CONFIGS), SHAPES, strict=True)))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("remat", [False, True])
def test_saved_activations_match_the_backward_residuals(name, shape, dtype, remat):
    cfg = CONFIGS[name].replace(dtype=dtype, remat=remat)
    estimate = memory.saved_activation_bytes(cfg, *shape)
    measured = residual_activation_bytes(cfg, *shape)
    assert estimate == pytest.approx(measured, rel=0.03)
    # Without dropout no dropout output or mask is kept.
    cfg = cfg.replace(dropout=0.0)
    estimate = memory.saved_activation_bytes(cfg, *shape)
    assert 0.95 <= estimate / residual_activation_bytes(cfg, *shape) <= 1.15


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_attention_and_activation_dropout_are_counted(dtype):
    # Their own rates (off by default): each keeps its output and a byte mask, on the attention
    # probabilities [B, H, L, L] and on the feed-forward activations [B, L, F].
    cfg = CONFIGS["tiny"].replace(
        dtype=dtype, attention_dropout=0.1, activation_dropout=0.2, encoder_attention_heads=2
    )
    shape = (3, 12, 8)
    assert memory.saved_activation_bytes(cfg, *shape) > memory.saved_activation_bytes(
        cfg.replace(attention_dropout=0.0, activation_dropout=0.0), *shape
    )
    estimate = memory.saved_activation_bytes(cfg, *shape)
    assert estimate == pytest.approx(residual_activation_bytes(cfg, *shape), rel=0.03)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_train_step_estimate_matches_xla_memory_analysis(name):
    cfg = CONFIGS[name]
    b, s, t = 8, 16, 16
    optim = OptimConfig(total_steps=10)
    tx = steps.make_optimizer(optim)
    params = jax.eval_shape(lambda: bart.init_params(cfg, jax.random.key(0)))
    state = jax.eval_shape(lambda p: steps.create_train_state(p, tx), params)
    batch = jax.eval_shape(lambda: _batch(b, s, t))
    step = steps.make_train_step(bart.Bart(cfg), optim, jit=False)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, batch, rng).compile()
    analysis = compiled.memory_analysis()
    est = memory.train_step_memory(cfg, b, s, t)
    batch_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(batch))
    # Arguments: params + Adam's two moments (+ the batch and a few scalars), all donated.
    state_bytes = est.params + est.optimizer
    assert analysis.argument_size_in_bytes - batch_bytes == pytest.approx(state_bytes, rel=0.01)
    assert analysis.alias_size_in_bytes == pytest.approx(state_bytes, rel=0.01)
    # Temporaries: gradients + saved activations. The estimate counts jax's residuals, an upper
    # bound: XLA keeps one buffer for the copies jax saves of one array (each Dense reshapes
    # its input itself, so q, k and v keep three) and fuses elementwise residuals (LayerNorm,
    # gelu, softmax intermediates) away, recomputing them in the backward. On CPU it needs
    # 66-71% of the estimate here (76% for BART-base at launch/README.md's batch).
    ratio = analysis.temp_size_in_bytes / (est.gradients + est.activations)
    assert 0.6 <= ratio <= 1.05, f"XLA temporaries / estimate = {ratio:.3f}"


def test_fsdp_divides_state_and_activations_follow_the_per_device_batch():
    cfg = tiny_model_config(dropout=0.1)
    one, four = (
        memory.train_step_memory(cfg, 8, 16, 16),
        memory.train_step_memory(cfg, 8, 16, 16, fsdp=4),
    )
    assert four.params * 4 == pytest.approx(one.params, abs=4)
    assert four.activations == one.activations  # activations follow the per-device batch
    kw = dict(src=16, tgt=16, outer_src=16, outer_tgt=8)
    meta_cfg = MetaConfig(inner_steps=4, inner_batch_size=8, outer_batch_size=8, mask_rate=0.3)
    whole = memory.meta_step_memory(cfg, meta_cfg, **kw)
    split = memory.meta_step_memory(cfg, meta_cfg, devices=4, fsdp=4, **kw)
    micro = memory.meta_step_memory(
        cfg, dataclasses.replace(meta_cfg, inner_microbatches=4), devices=1, **kw
    )
    assert split.optimizer * 4 == pytest.approx(whole.optimizer, abs=16)
    # 8 sentences over 4 devices (the outer batch too), or in 4 microbatches: 2 at a time.
    step2 = memory.activation_peak_bytes(cfg, 2, 16, 16)
    assert split.activations == max(2 * step2, memory.activation_peak_bytes(cfg, 2, 16, 8))
    assert split.activations < micro.activations < whole.activations


def test_stored_thetas_of_flat_and_nested_unrolls():
    assert [memory.stored_thetas(k) for k in (1, 4, 8)] == [1, 4, 8]
    # K // S segment starts + the S steps of the segment being differentiated.
    assert memory.stored_thetas(8, 3) == 2 + 3
    assert memory.stored_thetas(32, 6) == 5 + 6
    assert memory.stored_thetas(4, 4) == memory.stored_thetas(4, 8) == 4  # one segment: flat


META_LM = tiny_model_config(
    d_model=64, encoder_ffn_dim=256, decoder_ffn_dim=256, vocab_size=300, encoder_layers=3
)
META_CASES = {  # inner optimizer -> (K, remat_segment) compiled; the first is the base
    "sgd": [(2, 0), (1, 0), (8, 0), (8, 3)],
    "adam": [(4, 0), (6, 2)],
}


def _meta_peak(k: int, segment: int, opt: str) -> tuple[int, memory.Estimate]:
    """XLA's peak bytes (temp + arguments + outputs - donated) of the compiled, donated meta
    step on META_LM (8 contexts of 48 tokens; 8 questions 24 -> 12), and the estimate."""
    from meta_mask.policies import meta, meta_step, unroll
    from meta_mask.policies import net as netlib
    from meta_mask.special_tokens import SpecialTokens

    length, b = 48, 8
    special = SpecialTokens(pad=1, eos=2, bos=0, mask=META_LM.vocab_size - 1, decoder_start=2)
    cfg = MetaConfig(
        inner_steps=k,
        remat_segment=segment,
        inner_optimizer=opt,
        inner_batch_size=b,
        outer_batch_size=b,
        mask_rate=0.3,
    )
    pnet = netlib.PolicyNet(
        vocab_size=META_LM.vocab_size, d_model=16, num_layers=1, num_heads=2, ffn_dim=32,
        max_length=length, pad_id=special.pad,
    )  # fmt: skip
    phi = jax.eval_shape(lambda: netlib.init_policy_params(pnet, jax.random.key(1), length=length))
    theta = jax.eval_shape(lambda: bart.init_params(META_LM, jax.random.key(0)))
    setup = meta.MetaSetup(
        cfg, meta.policy_fn_from_net(pnet), unroll.bart_lm_loss(bart.Bart(META_LM)), special
    )
    state = jax.eval_shape(lambda p: meta_step.create_meta_state(p, cfg), phi)
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    batches = {
        "inner": {
            "input_ids": ints(k, b, length),
            "valid": jax.ShapeDtypeStruct((k, b, length), jnp.bool_),
            "example_ids": ints(k, b),
        },
        "outer": {
            "input_ids": ints(b, 24),
            "decoder_input_ids": ints(b, 12),
            "labels": ints(b, 12),
            "weights": jax.ShapeDtypeStruct((b, 12), jnp.float32),
        },
    }
    rng = jax.eval_shape(lambda: jax.random.key(0))
    compiled = meta_step.make_meta_step(setup).lower(state, theta, batches, rng).compile()
    a = compiled.memory_analysis()
    peak = (
        a.temp_size_in_bytes
        + a.argument_size_in_bytes
        + a.output_size_in_bytes
        - a.alias_size_in_bytes
    )
    n_phi = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(phi))
    estimate = memory.meta_step_memory(
        META_LM, cfg, src=length, tgt=length, outer_src=24, outer_tgt=12, policy_params=n_phi
    )
    return peak, estimate


@pytest.mark.slow  # compiles meta steps for several K (~40 s idle)
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_meta_step_estimate_matches_xla_memory_analysis(opt):
    """The estimate against XLA's buffer assignment of the compiled meta step (CPU): the total
    (XLA fuses some of the counted activations away, most at K = 1, whose single step is a
    forward pass), and how it grows with K and shrinks with nested checkpointing from the
    first case: the stored copies of theta, which must match closely."""
    (k0, s0), *others = META_CASES[opt]
    peak0, est0 = _meta_peak(k0, s0, opt)
    for k, segment in [(k0, s0), *others]:
        peak, est = _meta_peak(k, segment, opt) if (k, segment) != (k0, s0) else (peak0, est0)
        ratio = peak / est.total
        assert 0.65 <= ratio <= 1.1, (k, segment, peak / 2**20, est.total / 2**20)
        if k >= 2 and (k, segment) != (k0, s0):
            assert peak - peak0 == pytest.approx(est.total - est0.total, rel=0.1), (k, segment)
