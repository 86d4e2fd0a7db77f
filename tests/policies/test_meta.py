"""The meta-learning core: the meta-gradient against central finite differences (float64), the
scan unroll against a hand-written loop, gradient flow (every policy parameter; never through a
heuristic's fixed scores or the sampled mask), the first-order estimator against its definition
and the exact meta-gradient, a toy where meta steps learn to mask the rewarded token ids, and
the real Bart through the whole path.

Finite differences need float64 end to end. Bart (model/bart.py) and training.steps compute
layer norms, attention and logits in float32 whatever the dtype, so the float64 checks use a
small float64 seq2seq LM written here (embeddings, encoder self-attention, cross-attention,
tied output; the same batch format and LmLoss contract as `bart_lm_loss`); Bart itself is run
through meta_gradient / meta_step in float32 below.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from meta_mask.config import MetaConfig, tiny_model_config
from meta_mask.model.bart import Bart, init_params
from meta_mask.policies import meta, meta_step, meta_weights, unroll
from meta_mask.policies import net as netlib
from meta_mask.policies.corrupt import corrupt_full_sentence_jax, corrupt_spans_jax
from meta_mask.special_tokens import SpecialTokens
from tests.helpers import x64

V, L, B, D = 48, 12, 3, 16
PAD, MASK_ID = 1, V - 1
SPECIAL = SpecialTokens(pad=PAD, eos=2, bos=0, mask=MASK_ID, decoder_start=2)
KEY_IDS = (10, 11, 12, 13, 14)  # the toy's rewarded ids

RATE = 0.15  # the sampler's mask rate inside the meta step (the learner resolves it)


# ----------------------------------------------------------------------------- a float64 LM


def init_tiny_lm(seed, d=D, vocab=V, length=L):
    rng = np.random.default_rng(seed)
    n = lambda shape, s=0.5: jnp.asarray(s * rng.normal(size=shape), jnp.float32)
    return {
        "emb": n((vocab, d)),
        "pos": n((length, d)),
        "wq": n((d, d), 0.3),
        "wk": n((d, d), 0.3),
        "wv": n((d, d), 0.3),
        "w1": n((d, d), 0.3),
        "bias": jnp.zeros((vocab,), jnp.float32),
    }


def tiny_lm_loss(theta, batch):
    """Per-token CE [B, T] of a one-layer encoder + cross-attending decoder (any float dtype)."""
    ids, dec = batch["input_ids"], batch["decoder_input_ids"]
    d = theta["emb"].shape[1]
    x = theta["emb"][ids] + theta["pos"][: ids.shape[1]]
    real = ids != PAD
    s = jnp.einsum("bqd,bkd->bqk", x @ theta["wq"], x @ theta["wk"]) / math.sqrt(d)
    a = jax.nn.softmax(jnp.where(real[:, None, :], s, -1e9), axis=-1)
    h = jnp.tanh(a @ (x @ theta["wv"]) + x)
    y = theta["emb"][dec] + theta["pos"][: dec.shape[1]]
    c = jax.nn.softmax(jnp.where(real[:, None, :], y @ h.transpose(0, 2, 1) / math.sqrt(d), -1e9))
    z = jnp.tanh((y + c @ h) @ theta["w1"])
    logp = jax.nn.log_softmax(z @ theta["emb"].T + theta["bias"], axis=-1)
    return -jnp.take_along_axis(logp, batch["labels"][..., None], axis=-1)[..., 0]


# ----------------------------------------------------------------------------- problems


def sentences(rng, shape, length=L, keys_per_sentence=2):
    """<s> filler... </s> pad: ids [.., length] with some KEY_IDS placed at random, valid mask."""
    ids = rng.integers(20, V - 1, size=shape + (length,)).astype(np.int32)
    ids[..., 0] = 0
    n_real = length - 2  # leave room for </s> and one pad
    ids[..., n_real + 1] = 2
    ids[..., n_real + 2 :] = PAD
    flat = ids.reshape(-1, length)
    for row in flat:
        pos = rng.choice(np.arange(1, n_real + 1), keys_per_sentence, replace=False)
        row[pos] = rng.choice(KEY_IDS, keys_per_sentence)
    ids = flat.reshape(ids.shape)
    valid = (ids > 3) & (ids != MASK_ID)
    return ids, valid


def qa_batch(rng, b):
    """The toy downstream task: recover the key tokens of a sentence where they are masked
    (corrupt_full_sentence_jax's format, built in numpy)."""
    ids, _ = sentences(rng, (b,))
    key = np.isin(ids, KEY_IDS)
    dec = np.concatenate([np.full((b, 1), 2, np.int32), ids[:, :-1]], axis=1)
    return {
        "input_ids": np.where(key, MASK_ID, ids).astype(np.int32),
        "decoder_input_ids": dec,
        "labels": ids,
        "weights": key.astype(np.float32),
    }


def policy_net(**kw):
    base = dict(vocab_size=V, pad_id=PAD, d_model=16, num_layers=1, num_heads=2, ffn_dim=32)
    base["max_length"] = L
    return netlib.PolicyNet(**{**base, **kw})


def make_problem(cfg, seed=0, lm="tiny", dtype=jnp.float32, b=B, spans=False, contrast=False):
    """A meta problem: (setup, phi, theta, inner, outer, noise, extra) with extra the keyword
    batches of meta_loss / meta_gradient: "qa" (downstream_steps = N: N batches of b),
    "contrast" (with `contrast`). `spans`: the inner step writes masked_spans examples (as an
    intermediate stage in that format does), else full sentences with one <mask> per token."""
    rng = np.random.default_rng(seed)
    k = cfg.inner_steps
    ids, valid = sentences(rng, (k, b))
    inner = {"input_ids": jnp.asarray(ids), "valid": jnp.asarray(valid)}
    outer = {k_: jnp.asarray(v) for k_, v in qa_batch(rng, b).items()}
    noise = jnp.asarray(rng.gumbel(size=(k, b, L)), jnp.float32)
    pnet = policy_net()
    phi = netlib.init_policy_params(pnet, jax.random.key(seed + 1), length=L)
    if lm == "tiny":
        theta, lm_loss = init_tiny_lm(seed + 2), tiny_lm_loss
    else:
        mcfg = tiny_model_config(vocab_size=V, encoder_layers=1, decoder_layers=1)
        model = Bart(mcfg)
        theta, lm_loss = init_params(mcfg, jax.random.key(seed + 2)), unroll.bart_lm_loss(model)
    cast = jax.jit(lambda t: jax.tree.map(lambda x: x.astype(dtype), t))
    phi, theta, noise = cast(phi), cast(theta), noise.astype(dtype)
    outer["weights"] = outer["weights"].astype(dtype)
    corrupt = (
        meta.corruption("masked_spans", "span", SPECIAL, enc_len=L, dec_len=L) if spans else None
    )
    setup = meta.MetaSetup(cfg, meta.policy_fn_from_net(pnet), lm_loss, SPECIAL, corrupt)

    def qa_of(rng, steps=1):
        qa = {k_: jnp.asarray(v) for k_, v in qa_batch(rng, b * steps).items()}
        return {**qa, "weights": qa["weights"].astype(dtype)}

    extra = {}
    if cfg.downstream_steps:
        extra["qa"] = qa_of(rng, cfg.downstream_steps)
    if contrast:
        extra["contrast"] = qa_of(rng)
    return setup, phi, theta, inner, outer, noise, extra


def fixed_masks(setup, phi, inner, noise):
    """The masks the policy samples at phi, to hold fixed while phi is perturbed."""
    return jax.jit(lambda p: meta.policy_masks(p, inner, noise, setup, leading=1)[1])(phi)


def tree_dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def tree_norm(a):
    return float(jnp.sqrt(tree_dot(a, a)))


def cosine(a, b):
    return float(tree_dot(a, b)) / (tree_norm(a) * tree_norm(b))


# ----------------------------------------------------------------------------- finite differences


slow = pytest.mark.slow
FD_CASES = [
    # (K, inner optimizer, inner lr, remat, remat_segment, downstream steps, entropy / budget
    # weights, the study's meta-learning: masked_spans inner examples, clipped weights,
    # contrastive outer)
    (1, "sgd", 0.5, False, 0, 0, 0.0, False),
    (3, "adam", 0.05, True, 0, 0, 0.0, False),
    (1, "sgd", 0.5, False, 0, 0, 0.05, True),
    (4, "sgd", 0.5, True, 2, 0, 0.0, False),  # nested checkpointing: 2 segments of 2
    (6, "adam", 0.05, True, 4, 0, 0.0, False),  # a segment of 4 and the remaining 2
    pytest.param(3, "sgd", 0.5, True, 0, 0, 0.0, False, marks=slow),
    pytest.param(1, "adam", 0.05, False, 0, 0, 0.0, False, marks=slow),
    pytest.param(2, "sgd", 0.5, True, 0, 1, 0.5, False, marks=slow),  # QA step + regularizers
    pytest.param(2, "sgd", 0.5, True, 0, 1, 0.05, True, marks=slow),
    pytest.param(6, "sgd", 0.5, True, 3, 1, 0.05, True, marks=slow),
    (2, "sgd", 0.5, True, 0, 3, 0.05, True),  # three QA steps after the MLM steps
]


@pytest.mark.parametrize("k,opt,lr,remat,segment,downstream_steps,reg,study", FD_CASES)
def test_meta_gradient_matches_central_finite_differences(
    k, opt, lr, remat, segment, downstream_steps, reg, study
):
    with x64():
        cfg = MetaConfig(
            inner_steps=k,
            inner_optimizer=opt,
            inner_learning_rate=lr,
            remat=remat,
            remat_segment=segment,
            downstream_steps=downstream_steps,
            entropy_weight=reg,
            budget_weight=reg,
            mask_rate=0.3,
            clip_weights=study,
        )
        _assert_meta_gradient_matches_finite_differences(cfg, spans=study, contrast=study)


def _assert_meta_gradient_matches_finite_differences(cfg, b=B, spans=False, contrast=False):
    """jax's meta-gradient against central differences of the reference-weighted objective in
    four directions (float64; call inside x64())."""
    k, opt = cfg.inner_steps, cfg.inner_optimizer
    setup, phi, theta, inner, outer, noise, extra = make_problem(
        cfg, dtype=jnp.float64, b=b, spans=spans, contrast=contrast
    )
    masks = fixed_masks(setup, phi, inner, noise)

    def objective(p):
        loss, _ = meta.meta_loss(
            p, theta, inner, outer, noise, setup, masks=masks, reference_phi=phi, **extra
        )
        return loss

    # The gradient meta_step uses (stop_gradient weights, masks from the noise) ...
    grads, loss, _ = jax.jit(
        lambda p: meta.meta_gradient(p, theta, inner, outer, noise, setup, **extra)
    )(phi)
    # ... is the derivative of the reference-weighted objective at phi_ref = phi.
    f = jax.jit(objective)
    assert float(f(phi)) == pytest.approx(float(loss), rel=1e-12)
    gnorm = tree_norm(grads)
    assert gnorm > 1e-4, "meta-gradient too small for a meaningful check"

    leaves, treedef = jax.tree.flatten(grads)
    dir_rng = np.random.default_rng(k)
    directions = [jax.tree.map(lambda g: g / gnorm, grads)]
    for _ in range(2):
        v = [dir_rng.normal(size=x.shape) for x in leaves]
        vn = math.sqrt(sum(float(np.sum(x * x)) for x in v))
        directions.append(jax.tree.unflatten(treedef, [jnp.asarray(x / vn) for x in v]))
    # One individual parameter: the largest-gradient entry of the head.
    one = jax.tree.map(jnp.zeros_like, grads)
    head = grads["head"]["kernel"]
    idx = np.unravel_index(int(jnp.argmax(jnp.abs(head))), head.shape)
    one["head"]["kernel"] = one["head"]["kernel"].at[idx].set(1.0)
    directions.append(one)

    # Adam's first steps are nearly sign(g): curvature is high, so a smaller step (the error
    # falls as eps^2: 7e-4, 7e-6, 4e-7 relative at eps 1e-5, 1e-6, 1e-7).
    eps, rtol = (1e-5, 1e-6) if opt == "sgd" else (1e-7, 5e-6)
    for v in directions:
        plus = f(jax.tree.map(lambda p, d: p + eps * d, phi, v))
        minus = f(jax.tree.map(lambda p, d: p - eps * d, phi, v))
        fd = float(plus - minus) / (2 * eps)
        exact = float(tree_dot(grads, v))
        # Relative to the gradient's norm (random directions can cancel to ~0).
        assert abs(fd - exact) <= rtol * gnorm + 1e-10, (fd, exact, gnorm)


def test_outer_loss_depends_on_phi_only_through_the_weights():
    """Without the reference, the weights are 1 in value: the meta loss equals the plain MLM
    unroll's outer loss at any phi (the forward is exactly the training the policy causes)."""
    cfg = MetaConfig(
        mask_rate=RATE,
        inner_steps=2,
        inner_learning_rate=0.5,
        entropy_weight=0.0,
        budget_weight=0.0,
    )
    for spans in (False, True):
        _assert_weights_are_one_in_value(cfg, spans)


def _assert_weights_are_one_in_value(cfg, spans):
    setup, phi, theta, inner, outer, noise, _ = make_problem(cfg, spans=spans)
    masks = fixed_masks(setup, phi, inner, noise)
    other = jax.tree.map(lambda x: x * 1.7 + 0.1, phi)
    loss = jax.jit(lambda p: meta.meta_loss(p, theta, inner, outer, noise, setup, masks=masks)[0])
    ref = _plain_mlm_unroll(theta, inner, outer, masks, setup)
    np.testing.assert_allclose(float(loss(phi)), float(ref), rtol=1e-6)
    np.testing.assert_allclose(float(loss(other)), float(ref), rtol=1e-6)


@functools.partial(jax.jit, static_argnums=(4,))
def _plain_mlm_unroll(th, inner, outer, masks, setup):
    """The intermediate stage's training by hand: SGD on the mean CE of the example's labels
    (full sentence: every token; masked_spans: the sentinels and spans), the example written
    by the policies.corrupt function of that format."""
    for kk in range(masks.shape[0]):
        if setup.corrupt.func is corrupt_full_sentence_jax:
            ex = corrupt_full_sentence_jax(inner["input_ids"][kk], masks[kk], SPECIAL)
        else:
            ex = corrupt_spans_jax(
                inner["input_ids"][kk], masks[kk], enc_len=L, dec_len=L, special=SPECIAL,
                infill="span",
            )  # fmt: skip
        w = ex["weights"]
        mean_ce = lambda t, ex=ex, w=w: jnp.sum(w * tiny_lm_loss(t, ex)) / jnp.sum(w)
        th = jax.tree.map(lambda t, gg: t - 0.5 * gg, th, jax.grad(mean_ce)(th))
    return unroll.outer_loss(tiny_lm_loss, th, outer)


# ----------------------------------------------------------------------------- scan == loop


@pytest.mark.parametrize("opt", ["adam", pytest.param("sgd", marks=slow)])
def test_scan_unroll_equals_python_loop(opt):
    """float64, so the comparison is tight even through Adam's near-sign first updates."""
    with x64():
        _scan_unroll_equals_python_loop(opt)


def _scan_unroll_equals_python_loop(opt):
    cfg = MetaConfig(
        inner_steps=3,
        inner_optimizer=opt,
        inner_learning_rate=0.3 if opt == "sgd" else 0.03,
        remat=True,
        entropy_weight=0.05,
        budget_weight=1.0,
        mask_rate=0.3,
    )
    setup, phi, theta, inner, outer, noise, _ = make_problem(cfg, seed=3, dtype=jnp.float64)

    def loop_loss(p):
        """The same K steps written out by hand: optax's pure functions in a Python loop."""
        logits = meta.policy_fn_from_net(policy_net())(
            p, inner["input_ids"].reshape(-1, L), inner["valid"].reshape(-1, L)
        ).reshape(inner["input_ids"].shape)
        masks = meta_weights.sample_masks(
            logits.reshape(-1, L), inner["valid"].reshape(-1, L), noise.reshape(-1, L), 0.3
        ).reshape(logits.shape)
        tx = optax.sgd(0.3) if opt == "sgd" else optax.adam(0.03, eps_root=unroll.ADAM_EPS_ROOT)
        th, state = theta, tx.init(theta)
        for kk in range(3):
            # Clipped: log min(1, T q) (token units), T = the sampler's target count.
            valid = inner["valid"][kk]
            _, q = meta_weights.policy_distribution(logits[kk], valid)
            t = meta_weights.target_counts(valid.sum(-1), 0.3)[:, None].astype(q.dtype)
            log_p = jnp.where(valid, jnp.log(jnp.minimum(1.0, t * q)), 0.0)
            d = jnp.where(masks[kk], log_p - jax.lax.stop_gradient(log_p), 0.0)
            w = jnp.where(masks[kk], jnp.exp(d - jnp.sum(d) / jnp.sum(masks[kk])), 0.0)
            ex = corrupt_full_sentence_jax(inner["input_ids"][kk], masks[kk], SPECIAL)
            # Every real token is a label (full sentence); a masked token's label carries w.
            label_w = ex["weights"] * jnp.where(masks[kk], w, 1.0)
            n = jnp.sum(ex["weights"])
            g = jax.grad(lambda t, ex=ex, w=label_w, n=n: jnp.sum(w * tiny_lm_loss(t, ex)) / n)(th)
            upd, state = tx.update(g, state, th)
            th = optax.apply_updates(th, upd)
        reg, _ = meta_weights.policy_regularizers(logits, inner["valid"], cfg)
        return unroll.outer_loss(tiny_lm_loss, th, outer) + reg, th

    theta_scan, _, _ = jax.jit(lambda p: meta.inner_loop(p, theta, inner, noise, setup))(phi)
    (loss_loop, theta_loop), g_loop = jax.jit(jax.value_and_grad(loop_loss, has_aux=True))(phi)
    g_scan, loss_scan, _ = jax.jit(
        lambda p: meta.meta_gradient(p, theta, inner, outer, noise, setup)
    )(phi)
    for a, b in zip(jax.tree.leaves(theta_scan), jax.tree.leaves(theta_loop), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(float(loss_scan), float(loss_loop), rtol=1e-12)
    assert tree_norm(g_loop) > 0
    for a, b in zip(jax.tree.leaves(g_scan), jax.tree.leaves(g_loop), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-11 * tree_norm(g_loop))


# ----------------------------------------------------------------------------- rematerialization

REMAT_CASES = [
    # (K, inner optimizer, remat_segment, microbatches, downstream steps, the study's parts)
    (4, "sgd", 2, 1, 0, False),
    pytest.param(6, "adam", 4, 2, 1, True, marks=slow),  # ~1 min on a shared CPU
    pytest.param(6, "sgd", 3, 2, 0, True, marks=slow),
    pytest.param(5, "adam", 2, 1, 1, False, marks=slow),
]


@pytest.mark.parametrize("k,opt,segment,micro,downstream_steps,study", REMAT_CASES)
def test_recomputed_and_nested_unrolls_equal_the_plain_one(
    k, opt, segment, micro, downstream_steps, study
):
    """remat (each step's hand-written forward-over-reverse backward pass, the first step's
    without a Hessian) and nested checkpointing (remat_segment) change nothing but memory and
    time: theta_K, the meta loss and the meta-gradient equal jax's own differentiation of the
    plain scan (float64, to rounding)."""
    with x64():
        results = {}
        for remat, seg in ((False, 0), (True, 0), (True, segment)):
            cfg = _micro_cfg(
                micro,
                inner_steps=k,
                inner_optimizer=opt,
                inner_learning_rate=0.5 if opt == "sgd" else 0.05,
                downstream_steps=downstream_steps,
                remat=remat,
                remat_segment=seg,
                clip_weights=study,
            )
            setup, phi, theta, inner, outer, noise, extra = make_problem(
                cfg, seed=11, dtype=jnp.float64, b=MICRO_B, spans=study, contrast=study
            )

            @jax.jit
            def run(
                phi, setup=setup, theta=theta, inner=inner, outer=outer, noise=noise, extra=extra
            ):
                qa = extra.get("qa")
                theta_k, _, _ = meta.inner_loop(phi, theta, inner, noise, setup, qa=qa)
                grads, loss, _ = meta.meta_gradient(phi, theta, inner, outer, noise, setup, **extra)
                return theta_k, loss, grads

            results[remat, seg] = run(phi)
        theta_ref, loss_ref, g_ref = results[False, 0]
        assert tree_norm(jax.tree.map(jnp.subtract, theta_ref, theta)) > 1e-3
        assert tree_norm(g_ref) > 1e-6
        for theta_k, loss, grads in results.values():
            _assert_trees_close(theta_k, theta_ref, rtol=1e-12, atol_scale=1e-14)
            np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-13)
            _assert_trees_close(grads, g_ref, rtol=1e-10, atol_scale=1e-13)


# ----------------------------------------------------------------------------- gradient flow


def _leaf_norms(tree):
    return {
        jax.tree_util.keystr(path): float(jnp.linalg.norm(x))
        for path, x in jax.tree_util.tree_leaves_with_path(tree)
    }


@pytest.mark.parametrize("lm", ["tiny", pytest.param("bart", marks=slow)])
def test_every_policy_parameter_gets_meta_gradient(lm):
    """Every leaf of phi receives a finite, non-zero meta-gradient (also through the real Bart,
    float32)."""
    cfg = MetaConfig(mask_rate=RATE, inner_steps=2, inner_learning_rate=0.5, remat=True)
    setup, phi, theta, inner, outer, noise, _ = make_problem(cfg, lm=lm)
    grads, loss, metrics = jax.jit(
        lambda p: meta.meta_gradient(p, theta, inner, outer, noise, setup)
    )(phi)
    norms = _leaf_norms(grads)
    assert all(np.isfinite(v) for v in norms.values()), norms
    assert all(v > 0 for v in norms.values()), {k: v for k, v in norms.items() if v == 0}
    assert np.isfinite(float(loss)) and float(metrics["mask_rate"]) > 0


def test_heuristic_scores_receive_no_meta_gradient():
    """The meta-gradient flows only through the policy's probabilities, never through the sampled
    mask: a tabular policy (phi = the scores themselves) gets a non-zero gradient, while the same
    fixed scores used as a heuristic (no dependence on phi) give the same masks and the same meta
    loss with exactly zero gradient, whatever the noise."""
    cfg = MetaConfig(
        mask_rate=RATE,
        inner_steps=2,
        inner_learning_rate=0.5,
        entropy_weight=0.0,
        budget_weight=0.0,
    )
    setup, _, theta, inner, outer, noise, _ = make_problem(cfg, seed=4)
    scores = jax.random.normal(jax.random.key(11), (2 * B, L))
    tabular = lambda phi, ids, valid, u=None: jnp.where(valid, phi["scores"], -jnp.inf)
    heuristic = lambda phi, ids, valid, u=None: jnp.where(valid, scores, -jnp.inf)
    phi = {"scores": scores}
    results = {}
    for name, fn in (("tabular", tabular), ("heuristic", heuristic)):
        s = meta.MetaSetup(cfg, fn, tiny_lm_loss, special=SPECIAL)
        grad_fn = jax.jit(lambda p, nz, s=s: meta.meta_gradient(p, theta, inner, outer, nz, s))
        for n_i, nz in enumerate((noise, noise[:, ::-1])):
            grads, loss, metrics = grad_fn(phi, nz)
            results[name, n_i] = (float(loss), float(jnp.abs(grads["scores"]).max()))
    assert results["tabular", 0][0] == pytest.approx(results["heuristic", 0][0], rel=1e-6)
    assert results["tabular", 0][0] != pytest.approx(results["heuristic", 1][0], rel=1e-4)
    assert results["tabular", 0][1] > 1e-6
    assert results["heuristic", 0][1] == 0.0 and results["heuristic", 1][1] == 0.0


# ----------------------------------------------------------------------------- first order


def test_first_order_estimator_matches_definition_and_aligns_with_exact():
    with x64():
        lr = 1e-3
        cfg = MetaConfig(
            inner_steps=1,
            inner_learning_rate=lr,
            estimator="first_order",
            entropy_weight=0.0,
            budget_weight=0.0,
            mask_rate=0.3,
        )
        setup, phi, theta, inner, outer, noise, _ = make_problem(cfg, seed=5, dtype=jnp.float64)
        masks = fixed_masks(setup, phi, inner, noise)
        exact_setup = meta.MetaSetup(
            dataclasses.replace(cfg, estimator="second_order"),
            setup.policy_fn,
            tiny_lm_loss,
            special=SPECIAL,
        )

        def mlm_loss(t, p):
            _, _, w = meta.policy_masks(p, inner, noise, setup, masks=masks, leading=1)
            total = 0.0
            for kk in range(cfg.inner_steps):
                ex = corrupt_full_sentence_jax(inner["input_ids"][kk], masks[kk], SPECIAL)
                label_w = ex["weights"] * jnp.where(masks[kk], w[kk], 1.0)
                total += jnp.sum(label_w * tiny_lm_loss(t, ex)) / jnp.sum(ex["weights"])
            return total

        @jax.jit
        def everything(p):
            g_fo, _, metrics = meta.meta_gradient(p, theta, inner, outer, noise, setup)
            # The definition, literally: -lr d/dphi <grad_theta L_mlm(theta, phi),
            # sg(grad L_down(theta))> by a double backward pass (the estimator uses one jvp).
            down_grad = jax.grad(lambda t: unroll.outer_loss(tiny_lm_loss, t, outer))(theta)
            align = lambda p: tree_dot(jax.grad(mlm_loss)(theta, p), down_grad)
            definition = jax.grad(lambda p: -lr * align(p))(p)
            g_exact, _, _ = meta.meta_gradient(p, theta, inner, outer, noise, exact_setup)
            return g_fo, metrics["alignment"], definition, align(p), g_exact

        g_fo, alignment, definition, alignment_def, g_exact = everything(phi)
        for a, b in zip(jax.tree.leaves(g_fo), jax.tree.leaves(definition), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12 * tree_norm(definition))
        np.testing.assert_allclose(float(alignment), float(alignment_def), rtol=1e-10)
        # Aligned with the exact K=1 (SGD) meta-gradient at a small inner learning rate ...
        cos = cosine(g_fo, g_exact)
        assert cos > 0.99, cos
        # ... as a first-order approximation: off by O(lr) relatively.
        rel = tree_norm(jax.tree.map(jnp.subtract, g_fo, g_exact)) / tree_norm(g_exact)
        assert rel < 0.05, rel


# ----------------------------------------------------------------------------- frozen groups


def test_frozen_groups_keep_their_values_and_the_others_step_as_without_freezing():
    cfg = MetaConfig(inner_steps=1, inner_learning_rate=0.5, mask_rate=0.3)
    setup, phi, theta, inner, _, noise, _ = make_problem(cfg, seed=3)
    masks = fixed_masks(setup, phi, inner, noise)

    def stepped(frozen):
        s = dataclasses.replace(setup, cfg=dataclasses.replace(cfg, inner_frozen=frozen))
        return jax.jit(lambda p: meta.inner_loop(p, theta, inner, noise, s, masks=masks)[0])(phi)

    free, frozen = stepped(()), stepped(("emb", "bias"))
    for name in theta:
        if name in ("emb", "bias"):
            np.testing.assert_array_equal(frozen[name], theta[name])
            assert not np.array_equal(free[name], theta[name]), name  # it would have moved
        else:  # K = 1: the gradient at theta_0 does not depend on what is frozen
            np.testing.assert_allclose(frozen[name], free[name], rtol=1e-6, atol=1e-7)
            assert not np.array_equal(frozen[name], theta[name]), name


def test_meta_gradient_with_a_frozen_group_matches_central_finite_differences():
    with x64():
        cfg = MetaConfig(
            inner_steps=2,
            inner_optimizer="adam",
            inner_learning_rate=0.05,
            inner_frozen=("emb",),
            remat=True,
            entropy_weight=0.0,
            budget_weight=0.0,
            mask_rate=0.3,
        )
        _assert_meta_gradient_matches_finite_differences(cfg)


def test_first_order_alignment_leaves_out_the_frozen_groups():
    # The alignment is linear in the downstream gradient: freezing a partition's two halves in
    # turn gives two alignments that sum to the unfrozen one (ignoring the freeze gives twice).
    cfg = MetaConfig(inner_steps=1, estimator="first_order", mask_rate=0.3)
    setup, phi, theta, inner, outer, noise, _ = make_problem(cfg, seed=4)

    def alignment(frozen):
        s = dataclasses.replace(setup, cfg=dataclasses.replace(cfg, inner_frozen=frozen))
        return float(
            jax.jit(lambda p: meta.meta_gradient(p, theta, inner, outer, noise, s))(phi)[2][
                "alignment"
            ]
        )

    both = alignment(())
    rest = tuple(name for name in theta if name != "emb")
    assert abs(both) > 1e-6
    np.testing.assert_allclose(alignment(("emb",)) + alignment(rest), both, rtol=1e-4)


def test_an_unknown_frozen_group_is_refused_naming_the_groups():
    with pytest.raises(ValueError, match="no LM parameter group 'embeddings'.*emb, pos"):
        unroll.frozen_leaves(MetaConfig(inner_frozen=("embeddings",)), init_tiny_lm(0))
    mcfg = tiny_model_config(vocab_size=V, encoder_layers=1, decoder_layers=1)
    leaves = unroll.frozen_leaves(
        MetaConfig(inner_frozen=("shared",)), init_params(mcfg, jax.random.key(0))
    )
    paths = [jax.tree_util.keystr(p) for p, f in jax.tree_util.tree_leaves_with_path(leaves) if f]
    assert paths == ["['shared']['embedding']"]  # BART's token embedding, tied to the output


def test_share_credit_mixes_each_masked_tokens_cotangent_with_its_rows_mean():
    mask = jnp.array([[[1, 1, 0, 1], [0, 1, 0, 0]]], bool)  # [K=1, B=2, L=4]
    credit = jnp.array([[[1.0, 2.0, 7.0, 6.0], [5.0, -4.0, 9.0, 3.0]]])
    for alpha in (0.0, 0.25, 1.0):
        w = jnp.where(mask, 1.0, 0.0)
        g = jax.grad(lambda w, a=alpha: jnp.sum(credit * meta_weights.share_credit(w, mask, a)))(w)
        row_mean = jnp.array([[[3.0], [-4.0]]])  # (1 + 2 + 6) / 3, -4 / 1
        want = jnp.where(mask, (1 - alpha) * credit + alpha * row_mean, credit)
        np.testing.assert_allclose(g, want, rtol=1e-6)
        np.testing.assert_array_equal(meta_weights.share_credit(w, mask, alpha), w)  # identity


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_mask_credit_is_the_per_token_credit_averaged_over_each_row(alpha):
    # The definition, literally: c_i = d(first-order objective)/d w_i at w = 1 (a masked
    # token's own credit), c' = (1 - alpha) c + alpha * (its row's mean c), and the estimator
    # is d/dphi sum_i sg(c'_i) w_i(phi).
    with x64():
        lr = 1e-2
        cfg = MetaConfig(
            inner_steps=1,
            inner_learning_rate=lr,
            estimator="first_order",
            entropy_weight=0.0,
            budget_weight=0.0,
            mask_rate=0.3,
            mask_credit=alpha,
        )
        setup, phi, theta, inner, outer, noise, _ = make_problem(cfg, seed=7, dtype=jnp.float64)
        plain = dataclasses.replace(setup, cfg=dataclasses.replace(cfg, mask_credit=0.0))
        masks = fixed_masks(setup, phi, inner, noise)
        down_grad = jax.grad(lambda t: unroll.outer_loss(tiny_lm_loss, t, outer))(theta)

        def objective(w):  # -lr <grad_theta L_mlm(theta; w), grad L_down(theta)>
            def mlm(t):
                ex = meta.mlm_examples(inner["input_ids"][0], masks[0], w[0], plain)
                return jnp.sum(ex["weights"] * tiny_lm_loss(t, ex))

            return -lr * tree_dot(jax.grad(mlm)(theta), down_grad)

        @jax.jit
        def everything(p):
            got, _, _ = meta.meta_gradient(p, theta, inner, outer, noise, setup)
            c = jax.grad(objective)(jnp.where(masks, 1.0, 0.0))
            m = masks.astype(c.dtype)
            row = jnp.sum(c * m, -1, keepdims=True) / jnp.maximum(jnp.sum(m, -1, keepdims=True), 1)
            shared = jax.lax.stop_gradient((1 - alpha) * c + alpha * row)
            weights = lambda q: meta.policy_masks(q, inner, noise, plain, masks=masks, leading=1)[2]
            want = jax.grad(lambda q: jnp.sum(jnp.where(masks, shared, 0.0) * weights(q)))(p)
            per_token, _, _ = meta.meta_gradient(p, theta, inner, outer, noise, plain)
            return got, want, per_token

        got, want, per_token = everything(phi)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12 * tree_norm(want))
        assert tree_norm(jax.tree.map(jnp.subtract, got, per_token)) > 1e-3 * tree_norm(got)


# ----------------------------------------------------------------------------- microbatching

MICRO_B = 4  # inner batch size of the microbatching tests: splits into 2 and 4


def _micro_cfg(micro, **kw):
    base = dict(
        inner_batch_size=MICRO_B,
        inner_microbatches=micro,
        entropy_weight=0.05,
        budget_weight=1.0,
        mask_rate=0.3,
    )
    return MetaConfig(**{"mask_rate": RATE, **base, **kw})


def _assert_trees_close(a, b, rtol, atol_scale=0.0):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol_scale * tree_norm(b) + 1e-300)


MICRO_CASES = [
    # (K, inner optimizer, microbatches, downstream steps, estimator)
    (1, "sgd", 2, 0, "second_order"),
    pytest.param(2, "adam", 4, 0, "second_order", marks=slow),
    (2, "sgd", 4, 1, "second_order"),
    (2, "adam", 2, 0, "first_order"),
    pytest.param(2, "sgd", 2, 0, "second_order", marks=slow),
    pytest.param(1, "adam", 4, 0, "second_order", marks=slow),
    pytest.param(1, "adam", 2, 1, "second_order", marks=slow),
]


@pytest.mark.parametrize("k,opt,micro,downstream_steps,estimator", MICRO_CASES)
def test_microbatched_inner_steps_equal_the_unsplit_ones(
    k, opt, micro, downstream_steps, estimator
):
    """Gradient accumulation over microbatches changes nothing but memory: theta_K, the meta
    loss and the meta-gradient equal the unsplit step's (float64, to summation order), because
    N and the weights' centring are taken over the whole inner batch before the split."""
    with x64():
        kw = dict(
            inner_steps=k,
            inner_optimizer=opt,
            inner_learning_rate=0.5 if opt == "sgd" else 0.05,
            downstream_steps=downstream_steps,
            estimator=estimator,
        )
        results = []
        for m in (1, micro):
            setup, phi, theta, inner, outer, noise, extra = make_problem(
                _micro_cfg(m, **kw), seed=9, dtype=jnp.float64, b=MICRO_B, contrast=True
            )

            @jax.jit
            def run(
                phi, setup=setup, theta=theta, inner=inner, outer=outer, noise=noise, extra=extra
            ):
                qa = extra.get("qa")
                theta_k, _, _ = meta.inner_loop(phi, theta, inner, noise, setup, qa=qa)
                grads, loss, metrics = meta.meta_gradient(
                    phi, theta, inner, outer, noise, setup, **extra
                )
                return theta_k, loss, grads, metrics

            results.append(run(phi))
        (theta_1, loss_1, g_1, met_1), (theta_m, loss_m, g_m, met_m) = results
        # A comparison that means something: theta moved and the meta-gradient is not ~0.
        assert tree_norm(jax.tree.map(jnp.subtract, theta_1, theta)) > 1e-3
        assert tree_norm(g_1) > 1e-6
        _assert_trees_close(theta_m, theta_1, rtol=1e-10, atol_scale=1e-13)
        np.testing.assert_allclose(float(loss_m), float(loss_1), rtol=1e-12)
        np.testing.assert_allclose(float(met_m["outer_loss"]), float(met_1["outer_loss"]), 1e-12)
        _assert_trees_close(g_m, g_1, rtol=1e-8, atol_scale=1e-11)


@pytest.mark.parametrize("k,opt,lr", [(2, "sgd", 0.5), pytest.param(2, "adam", 0.05, marks=slow)])
def test_microbatched_meta_gradient_matches_central_finite_differences(k, opt, lr):
    with x64():
        cfg = _micro_cfg(2, inner_steps=k, inner_optimizer=opt, inner_learning_rate=lr, remat=True)
        _assert_meta_gradient_matches_finite_differences(cfg, b=MICRO_B)


def test_microbatch_errors_name_the_fields():
    with pytest.raises(ValueError, match="inner_microbatches=0 must be >= 1"):
        MetaConfig(mask_rate=RATE, inner_microbatches=0)
    with pytest.raises(ValueError, match="inner_microbatches=4 must divide inner_batch_size=6"):
        MetaConfig(mask_rate=RATE, inner_batch_size=6, inner_microbatches=4)
    # Batches whose size the config does not describe are checked where they arrive.
    setup, phi, theta, inner, outer, noise, _ = make_problem(_micro_cfg(2))  # B = 3
    with pytest.raises(ValueError, match=r"inner_microbatches=2 must divide.*\(B = 3\)"):
        meta.meta_loss(phi, theta, inner, outer, noise, setup)


@pytest.mark.slow  # two compilations of a 16-sentence meta-gradient (~15 s on a shared CPU)
def test_microbatches_lower_the_meta_gradients_peak_memory():
    """Activations dominate (a one-layer BART, 16 sentences, two inner steps: the second one's
    backward pass is second order): with 4 microbatches the compiled meta-gradient's temporary
    memory (XLA's buffer assignment, deterministic) is well below the unsplit one's (4.05 MB ->
    1.98 MB on CPU; what remains is full-batch work: the policy net, masks, weights,
    corruption, the copies of theta). (At K = 1 the unroll's one step needs no second-order
    pass and little memory to begin with.)"""
    b = 16
    temp = {}
    for m in (1, 4):
        cfg = _micro_cfg(m, inner_batch_size=b, inner_steps=2, remat=True)
        setup, phi, theta, inner, outer, noise, _ = make_problem(cfg, seed=2, b=b, lm="bart")
        fn = jax.jit(functools.partial(meta.meta_gradient, setup=setup))
        compiled = fn.lower(phi, theta, inner, outer, noise).compile()
        temp[m] = compiled.memory_analysis().temp_size_in_bytes
    assert temp[4] < 0.6 * temp[1], temp


# ----------------------------------------------------------------------------- learning


def _key_mass(setup, phi, ids, valid):
    """Mean probability mass q puts on the key ids per sentence."""

    @jax.jit
    def mass(phi):
        _, q = meta_weights.policy_distribution(setup.policy_fn(phi, ids, valid, None), valid)
        return jnp.mean(jnp.sum(jnp.where(jnp.isin(ids, jnp.asarray(KEY_IDS)), q, 0.0), -1))

    return float(mass(phi))


@pytest.mark.parametrize("estimator", ["second_order", "first_order"])
def test_meta_steps_learn_to_mask_the_rewarded_tokens(estimator):
    """Downstream = recover masked key tokens; MLM on key tokens helps it, MLM on filler hurts
    it. A few meta steps raise the policy's probability mass on the key ids."""
    cfg = MetaConfig(
        inner_steps=1,
        inner_learning_rate=0.05,
        estimator=estimator,
        learning_rate=3e-2,
        entropy_weight=0.0,
        budget_weight=0.0,
        mask_rate=0.2,
    )
    setup, phi, theta, _, _, _, _ = make_problem(cfg, seed=6)
    rng = np.random.default_rng(6)
    step = meta_step.make_meta_step(setup)
    state = meta_step.create_meta_state(phi, cfg)
    probe_ids, probe_valid = sentences(np.random.default_rng(1), (16,))
    before = _key_mass(setup, phi, probe_ids, probe_valid)
    for _ in range(40):
        ids, valid = sentences(rng, (1, 8))
        batches = {
            "inner": {"input_ids": ids, "valid": valid},
            "outer": qa_batch(rng, 8),
        }
        state, metrics = step(state, theta, batches, jax.random.key(0))
        assert np.isfinite(float(metrics["loss"]))
    after = _key_mass(setup, state.params, probe_ids, probe_valid)
    # Two key tokens of ~9 maskable ones: ~0.2 at the start (0.5-0.75 after 40 steps).
    assert after > before + 0.15, (before, after)
    assert int(state.step) == 40


@pytest.mark.slow
def test_meta_step_with_bart_runs_and_lowers_meta_loss():
    """The jitted meta step end to end on the real Bart (float32, K=2, adam inner)."""
    cfg = MetaConfig(
        mask_rate=RATE,
        inner_steps=2,
        inner_optimizer="adam",
        inner_learning_rate=0.01,
        learning_rate=1e-2,
    )
    setup, phi, theta, inner, outer, _, _ = make_problem(cfg, lm="bart", seed=8)
    step = meta_step.make_meta_step(setup, donate=False)
    state = meta_step.create_meta_state(phi, cfg)
    batches = {"inner": inner, "outer": outer}
    losses = []
    for _ in range(8):
        state, metrics = step(state, theta, batches, jax.random.key(0))
        losses.append(float(metrics["loss"]))
        assert all(np.isfinite(float(v)) for v in metrics.values())
    assert min(losses[1:]) < losses[0]


# ----------------------------------------------------------------------------- contracts


def test_policy_probabilities_respect_the_budget():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, L)))
    valid = jnp.asarray(np.arange(L)[None, :] < np.array([[3], [6], [9], [0]])) & (
        jnp.arange(L) > 0
    )
    p = meta_weights.policy_probabilities(logits, valid, 0.3)
    t = meta_weights.target_counts(valid.sum(-1), 0.3)
    # The sampler's own count (rule 4) on each sentence.
    np.testing.assert_array_equal(t, [1, 2, 2, 0])
    assert float(jnp.max(jnp.where(valid, 0.0, p))) == 0.0
    assert np.all(np.asarray(jnp.sum(p, -1)) <= np.asarray(t) + 1e-6)
    _, q = meta_weights.policy_distribution(logits, valid)
    np.testing.assert_allclose(jnp.sum(q, -1), [1, 1, 1, 0], atol=1e-6)
    # Shift invariance: adding a constant to a sentence's logits changes nothing.
    np.testing.assert_allclose(
        meta_weights.policy_probabilities(logits + 3.0, valid, 0.3), p, atol=1e-6
    )


def test_errors_name_the_field():
    cfg = MetaConfig(mask_rate=RATE, inner_steps=2)
    setup, phi, theta, inner, outer, noise, _ = make_problem(cfg)
    bad = {k: v[:1] for k, v in inner.items()}
    with pytest.raises(ValueError, match="inner_steps=2"):
        meta.meta_loss(phi, theta, bad, outer, noise[:1], setup)

    def with_qa_steps(n):
        mcfg = MetaConfig(mask_rate=RATE, inner_steps=2, downstream_steps=n)
        return meta.MetaSetup(mcfg, setup.policy_fn, tiny_lm_loss, SPECIAL)

    with pytest.raises(ValueError, match="downstream"):
        meta.meta_loss(phi, theta, inner, outer, noise, with_qa_steps(1))
    with pytest.raises(ValueError, match="estimator"):
        MetaConfig(mask_rate=RATE, estimator="third_order")
    with pytest.raises(ValueError, match="remat_segment=2 needs remat=True"):
        MetaConfig(remat=False, remat_segment=2)
    with pytest.raises(ValueError, match="remat_segment=-1 must be >= 0"):
        MetaConfig(remat_segment=-1)
    with pytest.raises(ValueError, match="downstream_steps=-1 must be >= 0"):
        MetaConfig(downstream_steps=-1)
    with pytest.raises(ValueError, match="do not split into downstream_steps=2"):
        meta.meta_loss(phi, theta, inner, outer, noise, with_qa_steps(2), qa=outer)  # 3 rows


def test_n_qa_steps_are_n_steps_on_consecutive_blocks_of_the_qa_rows():
    """downstream_steps = 2: after the MLM steps, a step on the first half of the QA rows, then
    one on the second (the unroll's `extra` batches, in order); not one step on all of them."""
    cfg = MetaConfig(mask_rate=RATE, inner_steps=1, downstream_steps=2, inner_learning_rate=0.5)
    setup, phi, theta, inner, outer, noise, extra = make_problem(cfg)
    qa = extra["qa"]
    first, second = ({k: v[i * B : (i + 1) * B] for k, v in qa.items()} for i in (0, 1))
    theta_k = jax.jit(lambda p: meta.inner_loop(p, theta, inner, noise, setup, qa=qa)[0])(phi)
    masks = fixed_masks(setup, phi, inner, noise)

    def by_hand(batches, s):
        _, _, w = meta.policy_masks(phi, inner, noise, s, masks=masks, leading=1)
        ex = jax.vmap(lambda i, m, w: meta.mlm_examples(i, m, w, s))(inner["input_ids"], masks, w)
        extra_ = tuple(unroll.normalized(b) for b in batches)
        return unroll.unroll(s.cfg, s.lm_loss, theta, ex, extra_)

    expected = jax.jit(lambda: by_hand((first, second), setup))()
    _assert_trees_close(theta_k, expected, rtol=1e-6, atol_scale=1e-7)
    one = meta.MetaSetup(
        dataclasses.replace(cfg, downstream_steps=1), setup.policy_fn, tiny_lm_loss, SPECIAL
    )
    merged = jax.jit(lambda: by_hand((qa,), one))()
    assert tree_norm(jax.tree.map(jnp.subtract, theta_k, merged)) > 1e-4


# ----------------------------------------------------------------------------- the study's parts


def test_clipped_weights_give_no_credit_past_always_masked():
    """log min(1, T Q_u): a unit already masked at T Q_u >= 1 gets no gradient; below, the
    gradient is that of log q (and a unit's Q sums its tokens' q)."""
    valid = jnp.asarray([[False, True, True, True, True, True, True, False]])
    units = jnp.asarray([[-1, 1, 1, 3, 4, 5, 6, -1]])  # tokens 1-2 form one unit
    rate = 0.4  # T = round(0.4 * 6) = 2

    def log_p(logits, i):
        return meta_weights.log_inclusion(logits, valid, units, rate, clip=True)[0, i]

    high = jnp.asarray([[0.0, 3.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0]])  # Q_unit ~ 0.89: T Q > 1
    assert float(log_p(high, 1)) == 0.0 and float(log_p(high, 2)) == 0.0
    assert float(jnp.abs(jax.grad(log_p)(high, 1)).max()) == 0.0
    flat = jnp.zeros((1, 8))  # q = 1/6 each: Q_unit = 1/3, T Q = 2/3 < 1
    np.testing.assert_allclose(float(log_p(flat, 1)), np.log(2 / 3), rtol=1e-6)
    np.testing.assert_allclose(float(log_p(flat, 3)), np.log(2 / 6), rtol=1e-6)
    g = jax.grad(log_p)(flat, 3)
    g_ref = jax.grad(lambda lg: meta_weights.policy_distribution(lg, valid)[0][0, 3])(flat)
    np.testing.assert_allclose(g, g_ref, atol=1e-7)


def test_contrastive_outer_loss_is_own_minus_contrast():
    cfg = MetaConfig(mask_rate=RATE, inner_steps=1, inner_learning_rate=0.5)
    setup, phi, theta, inner, outer, noise, extra = make_problem(cfg, contrast=True)
    _, metrics = jax.jit(lambda p: meta.meta_loss(p, theta, inner, outer, noise, setup, **extra))(
        phi
    )
    np.testing.assert_allclose(
        float(metrics["outer_loss"]),
        float(metrics["outer_own"]) - float(metrics["outer_contrast"]),
        rtol=1e-6,
    )
    objective = meta_step.make_meta_objective(setup)
    batches = {"inner": inner, "outer": outer, **extra}
    evaluated = objective(phi, theta, batches, jax.random.key(0), 0)
    assert np.isfinite(float(evaluated["outer_loss"]))
