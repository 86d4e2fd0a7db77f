"""The policy network and LearnedScorer: -inf on special/padding tokens, padding-independence,
gradient to every parameter, embeddings copied from the LM and frozen (zero gradient, zero
update), unit (word) pooling, parameter counts at BART-base scale, and learned scores through
the shared sampler under the budget."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meta_mask.config import MetaConfig, ModelConfig, tiny_model_config
from meta_mask.model.bart import Bart, init_params
from meta_mask.policies import meta_step, meta_weights
from meta_mask.policies import net as netlib
from meta_mask.policies.heuristic import collate
from meta_mask.policies.sampler import BatchRng, mask_batch_np, sample_mask_jax, sample_mask_np
from tests.helpers import BART_SPECIAL

V, L = 64, 16


def records(rng, n=4):
    """Tokenized sentence records <s> w w w ... </s> with 1-2 tokens per word."""
    out = []
    for _ in range(n):
        words = int(rng.integers(3, 7))
        ids, word_ids = [0], [-1]
        for w in range(words):
            for _ in range(int(rng.integers(1, 3))):
                ids.append(int(rng.integers(4, V)))
                word_ids.append(w)
        out.append({"input_ids": ids + [2], "word_ids": word_ids + [-1]})
    return out


def small_net(**kw):
    base = dict(vocab_size=V, pad_id=BART_SPECIAL.pad, d_model=16, num_layers=2, num_heads=2)
    base.update(ffn_dim=32, max_length=32)
    return netlib.PolicyNet(**{**base, **kw})


@pytest.fixture(scope="module")
def batch():
    return collate(records(np.random.default_rng(0)), L, special=BART_SPECIAL)


def apply(net, params, batch, unit_ids=None):
    fn = jax.jit(lambda p, i, v, u: net.apply({"params": p}, i, v, u))
    return fn(params, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["valid"]), unit_ids)


def test_logits_are_minus_inf_exactly_off_valid(batch):
    net = small_net()
    params = netlib.init_policy_params(net, jax.random.key(0))
    logits = np.asarray(apply(net, params, batch))
    assert logits.shape == batch["input_ids"].shape
    assert np.all(np.isneginf(logits[~batch["valid"]]))
    assert np.all(np.isfinite(logits[batch["valid"]]))
    assert np.std(logits[batch["valid"]]) > 0  # not a constant policy


def test_real_tokens_do_not_see_padding(batch):
    """The same sentences padded to 16 and to 24 get the same logits on their tokens."""
    net = small_net()
    params = netlib.init_policy_params(net, jax.random.key(1))
    short = apply(net, params, batch)
    longer = collate(records(np.random.default_rng(0)), 24, special=BART_SPECIAL)
    long = apply(net, params, longer)
    np.testing.assert_allclose(
        np.asarray(long)[:, :L][batch["valid"]], np.asarray(short)[batch["valid"]], rtol=1e-5
    )


def _grad_of_softmax_objective(net, params, batch):
    """Gradient of a generic objective on the per-sentence softmax (what meta.py uses)."""
    target = jnp.asarray(np.random.default_rng(3).normal(size=batch["input_ids"].shape))
    valid = jnp.asarray(batch["valid"])

    def objective(p):
        logits = net.apply({"params": p}, jnp.asarray(batch["input_ids"]), valid)
        log_q, _ = meta_weights.policy_distribution(logits, valid)
        return jnp.sum(jnp.where(valid, target * log_q, 0.0))

    return jax.jit(jax.grad(objective))(params)


@pytest.mark.parametrize("repeat_buckets", [0, 4])
def test_every_parameter_gets_gradient(batch, repeat_buckets):
    net = small_net(repeat_buckets=repeat_buckets)
    params = netlib.init_policy_params(net, jax.random.key(2))
    grads = _grad_of_softmax_objective(net, params, batch)
    zero = [
        jax.tree_util.keystr(path)
        for path, g in jax.tree_util.tree_leaves_with_path(grads)
        if not float(jnp.abs(g).max()) > 0
    ]
    assert not zero, f"parameters without gradient: {zero}"


def test_repeat_counts_count_other_occurrences_in_the_same_example():
    ids = jnp.asarray([[0, 7, 8, 7, 9, 7, 2, 1], [0, 7, 5, 5, 2, 1, 1, 1]])
    valid = jnp.asarray([[0, 1, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(
        netlib.repeat_counts(ids, valid, buckets=8),
        [[0, 2, 0, 2, 0, 2, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0]],
    )
    # Capped at buckets - 1; token 7 of row 1 does not count row 0's occurrences.
    np.testing.assert_array_equal(
        netlib.repeat_counts(ids, valid, buckets=2)[0], [0, 1, 0, 1, 0, 1, 0, 0]
    )


def test_repeat_buckets_add_one_vector_per_count_to_the_input(batch):
    """The feature is only an addition to the token's input vector: with its table at zero the
    net computes exactly what the net without it computes from the same other parameters; a
    nonzero table changes the logits of rows with recurring tokens."""
    plain = small_net()
    params = netlib.init_policy_params(plain, jax.random.key(5))
    net = small_net(repeat_buckets=4)
    table = netlib.init_policy_params(net, jax.random.key(6))["repeats"]
    assert table.shape == (4, 16)
    zero = {**params, "repeats": jnp.zeros_like(table)}
    np.testing.assert_array_equal(apply(net, zero, batch), apply(plain, params, batch))
    counts = netlib.repeat_counts(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["valid"]), 4)
    assert int(counts.max()) > 0
    changed = apply(net, {**params, "repeats": table}, batch) != apply(plain, params, batch)
    assert bool(jnp.any(changed))


def test_lm_embeddings_copied_and_frozen(batch):
    """use_lm_embeddings: the table is the LM's shared embedding; frozen = zero gradient and the
    policy optimizer leaves it bit-identical, while the rest trains."""
    mcfg = tiny_model_config(vocab_size=V)
    lm_table = init_params(mcfg, jax.random.key(3))["shared"]["embedding"]
    cfg = MetaConfig(
        policy_d_model=16, policy_heads=2, policy_ffn_dim=32, policy_max_length=32
    )  # defaults: use_lm_embeddings=True, freeze_embeddings=True
    net = netlib.policy_net_from_config(cfg, V, mcfg.d_model, BART_SPECIAL.pad)
    params = netlib.init_policy_params(net, jax.random.key(4), lm_embedding=lm_table)
    np.testing.assert_array_equal(params["embed"], lm_table)
    assert params["embed_proj"]["kernel"].shape == (mcfg.d_model, 16)

    grads = _grad_of_softmax_objective(net, params, batch)
    assert float(jnp.abs(grads["embed"]).max()) == 0.0
    assert float(jnp.abs(grads["embed_proj"]["kernel"]).max()) > 0
    tx = meta_step.make_policy_optimizer(cfg)

    @jax.jit
    def two_updates(params, grads):
        state = tx.init(params)
        for _ in range(2):
            updates, state = tx.update(grads, state, params)
            params = jax.tree.map(lambda p, u: p + u, params, updates)
        return params

    new = two_updates(params, grads)
    np.testing.assert_array_equal(new["embed"], lm_table)
    assert not np.array_equal(new["embed_proj"]["kernel"], params["embed_proj"]["kernel"])

    unfrozen = net.clone(freeze_embeddings=False)
    grads = _grad_of_softmax_objective(unfrozen, params, batch)
    assert float(jnp.abs(grads["embed"]).max()) > 0

    with pytest.raises(ValueError, match="embed_dim"):
        netlib.init_policy_params(small_net(), jax.random.key(0), lm_embedding=lm_table)


def test_word_pooling_scores_whole_words(batch):
    scorer = netlib.LearnedScorer(
        small_net(), netlib.init_policy_params(small_net(), jax.random.key(5)), units="word"
    )
    raw = np.asarray(apply(scorer.net, scorer.params, batch))
    scores, unit_ids = scorer(batch, BatchRng(0, 0, batch["example_ids"]))
    for b in range(scores.shape[0]):
        for u in np.unique(unit_ids[b][unit_ids[b] >= 0]):
            members = unit_ids[b] == u
            np.testing.assert_allclose(scores[b][members], raw[b][members].mean(), rtol=1e-5)
    # Whole words are masked together by the sampler.
    noise = BatchRng(0, 0, batch["example_ids"]).noise(L)
    mask = sample_mask_np(scores, unit_ids, batch["valid"], noise, mask_rate=0.3)
    for b in range(mask.shape[0]):
        for u in np.unique(unit_ids[b][mask[b]]):
            assert mask[b][unit_ids[b] == u].all()


def test_learned_scorer_through_the_sampler_under_the_budget():
    recs = records(np.random.default_rng(6), n=8)
    batch = collate(recs, L, example_ids=range(100, 108), special=BART_SPECIAL)
    net = small_net()
    scorer = netlib.LearnedScorer(net, netlib.init_policy_params(net, jax.random.key(6)))
    rng = BatchRng(seed=1, step=3, example_ids=batch["example_ids"])
    scores, unit_ids = scorer(batch, rng)
    assert scores.dtype == np.float32 and unit_ids.dtype == np.int32
    mask = mask_batch_np(scorer, batch, rng, mask_rate=0.25)
    n = batch["valid"].sum(1)
    want = np.minimum(np.maximum(np.floor(0.25 * n + 0.5), n > 0), n)
    np.testing.assert_array_equal(mask.sum(1), want)  # token units: exactly the budget
    assert not mask[~batch["valid"]].any()
    # numpy and JAX samplers agree on the learned scores (-inf entries included).
    noise = rng.noise(L)
    jmask = jax.jit(lambda *a: sample_mask_jax(*a, mask_rate=0.25))(
        scores, unit_ids, batch["valid"], noise
    )
    np.testing.assert_array_equal(np.asarray(jmask), mask)


def test_param_counts_at_bart_base_scale():
    """Default MetaConfig at BART-base: trainable policy parameters well under 5% of the LM."""
    mc = ModelConfig()
    ids = jnp.zeros((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda: Bart(mc).init(jax.random.key(0), ids, ids))["params"]
    lm = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert lm == 139_470_681
    frozen = netlib.count_params(netlib.policy_net_from_config(MetaConfig(), 50265, 768, 1))
    assert frozen["trainable"] == 625_152 and frozen["trainable"] / lm < 0.005
    assert frozen["embedding"] == 50265 * 768
    own = MetaConfig(
        use_lm_embeddings=False, freeze_embeddings=False, policy_d_model=64, policy_ffn_dim=256
    )
    counts = netlib.count_params(netlib.policy_net_from_config(own, 50265, 768, 1))
    assert counts["trainable"] / lm < 0.025


def test_too_long_input_names_the_field():
    net = small_net(max_length=8)
    with pytest.raises(ValueError, match="policy_max_length"):
        net.init(jax.random.key(0), jnp.zeros((1, 9), jnp.int32), jnp.ones((1, 9), bool))


def test_log_probability_scores_draw_units_by_probability(batch):
    """scores="log_probability": the scores are log sigmoid(logit) (-inf off valid), so the
    sampler draws a unit in proportion to the probability that it is a target; two units the
    policy is sure of (logits 4 and 9) are then about equally likely to be masked first, where
    under the logits (odds) the surer one nearly always wins."""
    net = small_net()
    params = netlib.init_policy_params(net, jax.random.key(8))
    rng = BatchRng(0, 0, batch["example_ids"])
    logits, units = netlib.LearnedScorer(net, params)(batch, rng)
    probs, same_units = netlib.LearnedScorer(net, params, scores="log_probability")(batch, rng)
    np.testing.assert_array_equal(units, same_units)
    valid = batch["valid"]
    np.testing.assert_allclose(
        probs[valid], np.asarray(jax.nn.log_sigmoid(logits[valid])), rtol=1e-6, atol=1e-7
    )
    assert np.all(np.isneginf(probs[~valid]))
    with pytest.raises(ValueError, match="scores="):
        netlib.LearnedScorer(net, params, scores="odds")

    # Two sure targets among eight unlikely tokens, one unit drawn per example, 2000 draws.
    raw = np.full((2000, 10), -4.0, np.float32)
    raw[:, 0], raw[:, 1] = 4.0, 9.0
    unit_ids = np.tile(np.arange(10, dtype=np.int32), (2000, 1))
    ok = np.ones((2000, 10), bool)
    noise = BatchRng(3, 0, np.arange(2000)).noise(10)
    first = {}
    for name, scores in (("logits", raw), ("log_probability", np.asarray(jax.nn.log_sigmoid(raw)))):
        mask = sample_mask_np(scores, unit_ids, ok, noise, num_units=1)
        first[name] = mask[:, 0].mean(), mask[:, 1].mean()
    assert first["logits"][0] < 0.02 and first["logits"][1] > 0.98  # odds e^4 : e^9
    assert abs(first["log_probability"][0] - first["log_probability"][1]) < 0.1  # ~0.98 : ~1
