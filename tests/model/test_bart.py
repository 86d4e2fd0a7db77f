"""Flax BART vs PyTorch BART (transformers): logits parity, decode cache, dtype, remat, dropout."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meta_mask.batches import shift_right
from meta_mask.config import tiny_model_config
from meta_mask.model.bart import (
    Bart,
    Dropout,
    cross_entropy,
    decode_step,
    head_cross_entropy,
    init_cache,
    init_params,
    reorder_cache,
)
from tests.model.hf_fixtures import (
    jax_logits,
    make_torch_bart,
    padded_batch,
    save_and_load,
    torch_logits,
)


def _forward(config):
    return functools.partial(jax_logits, config)


@functools.cache
def _cache_fns(config, max_decode_len):
    """Jitted (encode, init_cache, decode_step) for `config`."""
    model = Bart(config)
    encode = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask, method=Bart.encode))
    init = jax.jit(lambda p, enc, mask: init_cache(model, p, enc, mask, max_decode_len))
    step = jax.jit(lambda p, c, tok, mask: decode_step(model, p, c, tok, mask))
    return encode, init, step


PARITY_CONFIGS = {
    "base_like_gelu": dict(),
    "scale_embedding": dict(scale_embedding=True),
    "relu_unequal": dict(
        activation_function="relu",
        encoder_layers=3,
        decoder_layers=1,
        encoder_attention_heads=8,
        decoder_attention_heads=2,
        encoder_ffn_dim=48,
        decoder_ffn_dim=80,
    ),
    "gelu_new": dict(activation_function="gelu_new"),
    "silu_scaled": dict(activation_function="silu", scale_embedding=True),
}


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_logits_match_torch_with_padding(name, tmp_path):
    torch_model = make_torch_bart(seed=len(name), **PARITY_CONFIGS[name])
    config, params = save_and_load(torch_model, tmp_path)
    vocab = config.vocab_size
    ids, mask = padded_batch([12, 7, 3], vocab, seed=1)
    dec, dec_mask = padded_batch([9, 4, 6], vocab, seed=2)
    dec_mask[1, :2] = 0  # left padding in one row: tests that our decoder mask means what HF's does

    ref = torch_logits(torch_model, ids, dec, mask, dec_mask)
    ours = _forward(config)(params, ids, dec, mask, dec_mask)
    assert ours.dtype == jnp.float32 and ours.shape == ref.shape
    keep = dec_mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[keep], ref[keep], atol=1e-4, rtol=0)
    # The logits must actually depend on the masks (else the comparison above proves little).
    unmasked = _forward(config)(params, ids, dec, np.ones_like(mask))
    assert np.abs(np.asarray(unmasked)[1, 2:4] - ref[1, 2:4]).max() > 1e-3


def test_default_attention_mask_is_non_pad(tmp_path):
    config = tiny_model_config()
    params = init_params(config, jax.random.PRNGKey(0))
    ids, mask = padded_batch([10, 5], config.vocab_size, seed=3)
    dec, _ = padded_batch([6, 6], config.vocab_size, seed=4)
    a = _forward(config)(params, ids, dec)
    b = _forward(config)(params, ids, dec, mask)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _full_and_incremental(config, params, ids, mask, dec):
    encode, init, step = _cache_fns(config, dec.shape[1])
    cache = init(params, encode(params, ids, mask), mask)
    steps = []
    for t in range(dec.shape[1]):
        logits, cache = step(params, cache, dec[:, t : t + 1], mask)
        assert logits.shape == (dec.shape[0], 1, config.vocab_size)
        steps.append(logits[:, 0])
    return np.asarray(_forward(config)(params, ids, dec, mask)), np.stack(steps, axis=1), cache


def test_incremental_decoding_matches_full_pass(tmp_path):
    torch_model = make_torch_bart(seed=5, scale_embedding=True, decoder_layers=3)
    config, params = save_and_load(torch_model, tmp_path)
    ids, mask = padded_batch([11, 6], config.vocab_size, seed=5)
    dec, _ = padded_batch([8, 8], config.vocab_size, seed=6)
    full, incremental, cache = _full_and_incremental(config, params, ids, mask, dec)
    np.testing.assert_allclose(incremental, full, atol=1e-5, rtol=0)
    # And against the torch reference (every decoder position is real here).
    np.testing.assert_allclose(incremental, torch_logits(torch_model, ids, dec, mask), atol=1e-4)
    assert int(cache["decoder"]["position_index"]) == dec.shape[1]
    assert int(cache["decoder"]["layers_0"]["self_attn"]["cache_index"]) == dec.shape[1]


def test_cache_layout_and_reorder():
    config = tiny_model_config(remat=True)  # decoding also works with rematerialized layers
    params = init_params(config, jax.random.PRNGKey(1))
    encode, init, step = _cache_fns(config, 4)
    ids, mask = padded_batch([9, 5, 7], config.vocab_size, seed=7)
    cache = init(params, encode(params, ids, mask), mask)
    heads, head_dim = config.decoder_attention_heads, config.d_model // 4
    layer = cache["decoder"]["layers_1"]
    assert layer["self_attn"]["cached_key"].shape == (3, heads, 4, head_dim)
    assert layer["encoder_attn"]["cross_key"].shape == (3, heads, ids.shape[1], head_dim)
    # Reordering the batch of the cache == decoding a reordered batch.
    order = jnp.array([2, 0, 0])
    tok = jnp.full((3, 1), config.decoder_start_token_id, jnp.int32)
    first, c1 = step(params, cache, tok, mask)
    full = jax_logits(config.replace(remat=False), params, ids, tok, mask)
    np.testing.assert_allclose(np.asarray(first), full, atol=1e-5)
    logits_a, _ = step(params, reorder_cache(c1, order), tok[order], mask[order])
    c2 = init(params, encode(params, ids[order], mask[order]), mask[order])
    _, c2 = step(params, c2, tok, mask[order])
    logits_b, _ = step(params, c2, tok, mask[order])
    np.testing.assert_allclose(np.asarray(logits_a), np.asarray(logits_b), atol=1e-6)


def test_decode_rejects_decoder_mask_and_multi_token_steps():
    # Shape-only evaluation: the checks fire while tracing, so nothing needs compiling.
    config = tiny_model_config()
    model = Bart(config)
    params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(2)))
    enc = jax.ShapeDtypeStruct((1, 6, config.d_model), jnp.float32)
    mask = jnp.ones((1, 6), bool)
    cache = jax.eval_shape(lambda p, e: init_cache(model, p, e, mask, 4), params, enc)
    tokens2 = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    with pytest.raises(ValueError, match="one token per step"):
        jax.eval_shape(lambda p, c, t: decode_step(model, p, c, t, mask), params, cache, tokens2)

    def step_with_decoder_mask(p, c):
        return model.apply(
            {"params": p, "cache": c},
            jnp.zeros((1, 1), jnp.int32),
            None,
            mask,
            jnp.ones((1, 1), bool),
            decode=True,
            method=Bart.decode,
            mutable=["cache"],
        )

    with pytest.raises(ValueError, match="decoder_attention_mask"):
        jax.eval_shape(step_with_decoder_mask, params, cache)
    too_long = config.max_position_embeddings + 1
    with pytest.raises(ValueError, match="max_decode_len length 65 exceeds"):
        jax.eval_shape(lambda p, e: init_cache(model, p, e, mask, too_long), params, enc)
    ids = jax.ShapeDtypeStruct((1, too_long), jnp.int32)
    with pytest.raises(ValueError, match="input_ids length 65 exceeds max_position_embeddings"):
        jax.eval_shape(lambda p, i: model.apply({"params": p}, i, method=Bart.encode), params, ids)


def test_bfloat16_compute_close_to_float32():
    config = tiny_model_config()
    params = init_params(config, jax.random.PRNGKey(3))
    ids, mask = padded_batch([12, 8], config.vocab_size, seed=9)
    dec, dec_mask = padded_batch([7, 5], config.vocab_size, seed=10)
    f32 = _forward(config)(params, ids, dec, mask, dec_mask)
    bf16 = _forward(config.replace(dtype="bfloat16"))(params, ids, dec, mask, dec_mask)
    assert bf16.dtype == jnp.float32
    assert np.isfinite(np.asarray(bf16)).all()
    keep = dec_mask.astype(bool)
    diff = np.abs(np.asarray(bf16) - np.asarray(f32))[keep].max()
    assert 0 < diff < 0.05 * np.abs(np.asarray(f32)[keep]).max() + 0.02
    # The compute really is bf16: encoder output carries the compute dtype.
    enc = _cache_fns(config.replace(dtype="bfloat16"), 1)[0](params, ids, mask)
    assert enc.dtype == jnp.bfloat16


def test_remat_gives_identical_logits_and_gradients():
    config = tiny_model_config(dropout=0.1)
    params = init_params(config, jax.random.PRNGKey(4))
    ids, mask = padded_batch([10, 6], config.vocab_size, seed=11)
    labels, weights = padded_batch([8, 5], config.vocab_size, seed=12)
    dec = shift_right(labels, config.decoder_start_token_id)

    def loss_fn(p, cfg):
        logits = Bart(cfg).apply(
            {"params": p},
            ids,
            dec,
            mask,
            deterministic=False,
            rngs={"dropout": jax.random.PRNGKey(0)},
        )
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
        return (nll * weights).sum() / weights.sum(), logits

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=1)
    (l0, lg0), g0 = grad_fn(params, config)
    (l1, lg1), g1 = grad_fn(params, config.replace(remat=True))
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(lg1), np.asarray(lg0), atol=1e-6, rtol=0)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-5)
    assert float(jnp.abs(g0["final_logits_bias"]).max()) == 0.0  # a buffer in HF: never trained
    assert float(jnp.abs(g0["decoder"]["layers_0"]["fc1"]["kernel"]).max()) > 0


def test_dropout_only_when_not_deterministic():
    config = tiny_model_config(dropout=0.1, attention_dropout=0.1, activation_dropout=0.1)
    params = init_params(config, jax.random.PRNGKey(5))
    ids, mask = padded_batch([10, 6], config.vocab_size, seed=13)
    dec, _ = padded_batch([6, 6], config.vocab_size, seed=14)
    model = Bart(config)

    @functools.partial(jax.jit, static_argnums=0)
    def apply(det, key):
        return model.apply(
            {"params": params}, ids, dec, mask, deterministic=det, rngs={"dropout": key}
        )

    def run(det, seed):
        return np.asarray(apply(det, jax.random.PRNGKey(seed)))

    np.testing.assert_array_equal(run(True, 0), run(True, 1))
    np.testing.assert_array_equal(run(False, 0), run(False, 0))
    assert np.abs(run(False, 0) - run(False, 1)).max() > 1e-4
    assert np.abs(run(False, 0) - run(True, 0)).max() > 1e-4


def test_dropout_keeps_the_right_fraction_independently_and_reproducibly():
    rate, shape = 0.1, (64, 128, 32)
    x = jnp.ones(shape)

    def drop(seed):
        return np.asarray(
            Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(seed)})
        )

    a = drop(0)
    kept = a != 0
    n = kept.size
    # Keep probability 1 - rate within 5 standard deviations; kept values scaled by its inverse.
    assert abs(kept.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n)
    np.testing.assert_allclose(a[kept], 1 / (1 - rate), rtol=1e-6)
    np.testing.assert_array_equal(drop(0), a)  # a pure function of the rng (resume redraws it)
    b = drop(1) != 0
    # Another rng: a different mask, uncorrelated with this one; within one mask, neighbours
    # (along every axis, including the flat index the bits are hashed from) are uncorrelated.
    assert (kept != b).mean() > 0.1
    bound = 5 / np.sqrt(n)
    assert abs(np.corrcoef(kept.ravel(), b.ravel())[0, 1]) < bound
    for axis in range(3):
        pairs = np.moveaxis(kept, axis, 0)
        assert abs(np.corrcoef(pairs[1:].ravel(), pairs[:-1].ravel())[0, 1]) < 2 * bound
    flat = kept.ravel()
    for lag in (1, 2, 16, 2**16):
        assert abs(np.corrcoef(flat[lag:], flat[:-lag])[0, 1]) < 2 * bound


def test_head_cross_entropy_equals_autodiff_of_cross_entropy():
    n, d, v = 24, 16, 40
    keys = jax.random.split(jax.random.key(0), 4)
    rows = jax.random.normal(keys[0], (n, d))
    table = jax.random.normal(keys[1], (v, d))
    bias = jax.random.normal(keys[2], (v,))
    labels = jax.random.randint(keys[3], (n,), 0, v)
    labels = labels.at[:3].set(jnp.array([-100, v, -1]))  # out of range: weight 0 in a batch
    weights = jnp.where(jnp.arange(n) < 3, 0.0, jnp.linspace(0.5, 1.5, n))
    top = jnp.argmax(rows @ table.T + bias, axis=-1)
    labels = labels.at[3:6].set(top[3:6])  # some labels are the argmax: counted correct

    for eps in (0.0, 0.1):

        def plain(rows, table, eps=eps):
            nll, correct = cross_entropy(rows @ table.T + jax.lax.stop_gradient(bias), labels, eps)
            return jnp.sum(weights * nll), (nll, correct)

        def fused(rows, table, eps=eps):
            nll, correct = head_cross_entropy(rows, table, bias, labels, eps)
            return jnp.sum(weights * nll), (nll, correct)

        (_, (nll_p, ok_p)), grads_p = jax.value_and_grad(plain, (0, 1), has_aux=True)(rows, table)
        (_, (nll_f, ok_f)), grads_f = jax.value_and_grad(fused, (0, 1), has_aux=True)(rows, table)
        np.testing.assert_allclose(nll_f, nll_p, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(ok_f, ok_p)
        assert ok_f[3:6].all() and not ok_f[:3].any()
        for g_f, g_p in zip(grads_f, grads_p, strict=True):
            np.testing.assert_allclose(g_f, g_p, rtol=1e-5, atol=1e-5)
    bias_grad = jax.grad(lambda b: jnp.sum(head_cross_entropy(rows, table, b, labels, 0.0)[0]))
    assert float(jnp.abs(bias_grad(bias)).max()) == 0.0  # HF's final_logits_bias: a buffer


def test_init_params_follow_hf_init():
    config = tiny_model_config(vocab_size=512, d_model=64, init_std=0.05)
    params = init_params(config, jax.random.PRNGKey(6))
    emb = np.asarray(params["shared"]["embedding"])
    assert np.all(emb[config.pad_token_id] == 0)  # HF zeroes the padding_idx row
    assert abs(emb.std() - 0.05) < 0.005
    layer = params["encoder"]["layers_0"]
    assert abs(float(layer["fc1"]["kernel"].std()) - 0.05) < 0.005
    assert np.all(np.asarray(layer["fc1"]["bias"]) == 0)
    assert np.all(np.asarray(layer["final_layer_norm"]["scale"]) == 1)
    assert np.all(np.asarray(params["final_logits_bias"]) == 0)
    assert params["encoder"]["embed_positions"]["embedding"].shape == (66, 64)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
