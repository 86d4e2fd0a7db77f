"""Meta-learning the masking policy: the meta objective and its gradient with respect to the policy.

Pure functions only (no I/O, no jax.config). phi = the policy's parameters, theta = the language
model's (an input of every meta step, never updated here). The derivation, with the reasons for
each choice, is docs/meta_gradient.md; in short:

- q = softmax of the policy's logits over a context's maskable tokens (the sampler's own
  distribution; unit logits mean-pooled); the mask m is drawn from sg(logits) with fixed noise;
  each masked token's loss is weighted by w_i = exp(d_i - mean_{j masked} d_j), d = lp - sg(lp),
  lp = log min(1, T Q_u) (clip_weights; else log q): 1 in value, likelihood-ratio gradient
  (policies/meta_weights.py); mask_credit > 0 spreads each token's credit over its context's
  mask (`share_credit`: the whole-mask score function).
- The inner examples are the intermediate stage's (`corruption`); `label_source` maps w onto
  the labels, so the inner loss equals that stage's loss in value (`mlm_examples`). K optax
  steps (policies/unroll.py: microbatched gradients, optional QA step, remat), then the outer
  loss on the contexts' own questions minus (contrastive) other contexts' questions.
- Regularizers: -entropy_weight * H (normalized entropy of q) + budget_weight * B, B =
  (mean_i min(1, T q_i) - sum T / sum n)^2. Estimators: second_order (jax.grad through the
  unroll) or first_order, the surrogate -a <grad L_mlm(theta_0, phi), sg(grad L_down(theta_0))>
  whose per-label alignments come from one jvp. tests/policies/test_meta.py checks the first
  against central finite differences in float64 (`reference_phi`), the second against its
  definition.
- The jitted, data-parallel meta step that applies the gradient is policies/meta_step.py.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from meta_mask.config import MetaConfig
from meta_mask.policies.corrupt import corrupt_full_sentence_jax, corrupt_spans_jax
from meta_mask.policies.meta_weights import (
    log_inclusion,
    mask_weights,
    policy_regularizers,
    sample_masks,
    share_credit,
)
from meta_mask.policies.unroll import (
    LmLoss,
    frozen_leaves,
    microbatched_losses,
    normalized,
    outer_loss,
    unroll,
)
from meta_mask.special_tokens import SpecialTokens
from meta_mask.training import remat

Array = jax.Array
PyTree = Any
Batch = Mapping[str, Array]
Metrics = dict[str, Array]
# (phi, input_ids [B,L], valid [B,L], unit_ids [B,L] | None) -> logits [B,L] (-inf off valid)
PolicyFn = Callable[[PyTree, Array, Array, Array | None], Array]
# (input_ids [B,L], mask [B,L]) -> a SpanSeq2SeqBatch (with "label_source")
Corrupt = Callable[[Array, Array], Mapping[str, Array]]


def policy_fn_from_net(net: Any) -> PolicyFn:
    """The PolicyFn of a PolicyNet (linen module)."""
    return lambda phi, ids, valid, unit_ids=None: net.apply({"params": phi}, ids, valid, unit_ids)


@dataclass(frozen=True)
class MetaSetup:
    """The static parts of a meta problem: config, policy, LM loss and special token ids."""

    cfg: MetaConfig
    policy_fn: PolicyFn
    lm_loss: LmLoss
    special: SpecialTokens
    # (input_ids [B, L], mask [B, L]) -> the corrupted example with "label_source" (see
    # `corruption`); default: full sentence, one <mask> per masked token.
    corrupt: Corrupt | None = None

    def __post_init__(self) -> None:
        if self.corrupt is None:
            default = functools.partial(corrupt_full_sentence_jax, special=self.special)
            object.__setattr__(self, "corrupt", default)
        if not self.cfg.mask_rate > 0:
            raise ValueError(
                "MetaSetup needs the sampling rate: MetaConfig.mask_rate > 0 (the meta learner "
                "resolves 0 to the intermediate stage's --policy.mask_rate)"
            )


def corruption(
    output_format: str, infill: str, special: SpecialTokens, *, enc_len: int, dec_len: int
) -> Corrupt:
    """The jittable corruption of the intermediate stage's output format (policies/corrupt.py),
    so the inner step trains on exactly the examples the stage will: masked_spans via
    corrupt_spans_jax, full_sentence via corrupt_full_sentence_jax (every real token is a
    label; label_source points the masked ones at themselves). BERT's 80/10/10 replacement
    has no jitted form (policies/corrupt.py draws it on the host)."""
    if output_format == "masked_spans":
        return functools.partial(
            corrupt_spans_jax, enc_len=enc_len, dec_len=dec_len, special=special, infill=infill
        )
    return functools.partial(corrupt_full_sentence_jax, special=special, infill=infill)


def mlm_examples(input_ids: Array, mask: Array, weights: Array, setup: MetaSetup) -> dict:
    """The MLM batch of `input_ids` masked by `mask`, corrupted as the intermediate stage does
    (setup.corrupt), with "weights" = (the reconstruction of masked token i: w_i; any other
    label: 1) / N, N its real labels (a constant): sum(weights * ce) is the stage's mean
    loss in value, and carries w's gradient on the masked tokens' own labels."""
    ex = dict(setup.corrupt(input_ids, mask))
    source = ex.pop("label_source")
    on_label = jnp.take_along_axis(weights, jnp.maximum(source, 0), axis=-1)
    w = ex["weights"] * jnp.where(source >= 0, on_label, 1.0).astype(weights.dtype)
    count = jnp.maximum(jnp.sum(ex["weights"]), 1).astype(weights.dtype)  # no gradient
    return {**ex, "weights": w / count}


def _flat(x: Array) -> Array:
    """[K, B, ...] -> [B * K, ...], sentence-major: with B split over devices the flat rows
    stay split in contiguous blocks (a K-major flattening would need a resharding)."""
    return x.swapaxes(0, 1).reshape((-1,) + x.shape[2:])


def _unflat(x: Array, shape: tuple[int, ...]) -> Array:
    """The inverse of _flat: [B * K, ...] -> `shape` = [K, B, ...]."""
    return x.reshape((shape[1], shape[0]) + tuple(shape[2:])).swapaxes(0, 1)


def _policy_logits(setup: MetaSetup, phi: PyTree, batch: Batch, leading: int) -> Array:
    """Policy logits for a [leading..., B, L] batch (flattened into one call)."""
    unit_ids = batch.get("unit_ids")
    ids, valid = batch["input_ids"], batch["valid"]
    if leading:
        ids, valid = _flat(ids), _flat(valid)
        unit_ids = None if unit_ids is None else _flat(unit_ids)
    # Recomputed in the backward pass: over K x B sentences the policy's activations would
    # stay live through the whole unroll (~15 MiB per inner step on the benchmark config).
    # (remat.recomputed, not jax.checkpoint, whose recomputation XLA schedules up front.)
    policy = remat.recomputed(lambda p, inputs: setup.policy_fn(p, *inputs))
    logits = policy(phi, (ids, valid, unit_ids))
    return _unflat(logits, batch["input_ids"].shape) if leading else logits


def _check_inner(setup: MetaSetup, inner_batches: Batch, noise: Array) -> None:
    shape = tuple(inner_batches["input_ids"].shape)
    if len(shape) != 3 or shape[0] != setup.cfg.inner_steps:
        raise ValueError(
            f"inner_batches['input_ids'] must be [K, B, L] with K = MetaConfig.inner_steps="
            f"{setup.cfg.inner_steps}; got shape {shape}"
        )
    for name, arr in (("inner_batches['valid']", inner_batches["valid"]), ("noise", noise)):
        if tuple(arr.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(arr.shape)}; expected {shape}")
    micro = setup.cfg.inner_microbatches
    if shape[1] % micro:
        raise ValueError(
            f"MetaConfig.inner_microbatches={micro} must divide the inner batch size; "
            f"inner_batches['input_ids'] has shape {shape} (B = {shape[1]})"
        )


def policy_masks(
    phi: PyTree,
    batch: Batch,
    noise: Array,
    setup: MetaSetup,
    *,
    masks: Array | None = None,
    reference_phi: PyTree | None = None,
    leading: int = 0,
) -> tuple[Array, Array, Array]:
    """(logits, masks, weights) for a policy-masked batch: masks from fixed noise unless given;
    weights (on masked tokens) from `log_inclusion`, relative to `reference_phi` when given
    (else stop_gradient)."""
    cfg = setup.cfg
    logits = _policy_logits(setup, phi, batch, leading)
    valid, units = batch["valid"], batch.get("unit_ids")
    flat = (lambda x: x) if not leading else _flat
    if masks is None:
        masks = sample_masks(
            flat(logits),
            flat(valid),
            flat(noise),
            cfg.mask_rate,
            None if units is None else flat(units),
        )
        masks = _unflat(masks, valid.shape) if leading else masks

    def log_p(lg: Array) -> Array:
        return log_inclusion(lg, valid, units, cfg.mask_rate, cfg.clip_weights)

    log_p_ref = None
    if reference_phi is not None:
        log_p_ref = log_p(_policy_logits(setup, reference_phi, batch, leading))
    weights = mask_weights(log_p(logits), masks, log_p_ref)
    if cfg.mask_credit:
        weights = share_credit(weights, masks, cfg.mask_credit)
    return logits, masks, weights


def _regularizers(
    logits: Array, masks: Array, valid: Array, cfg: MetaConfig
) -> tuple[Array, Metrics]:
    """policy_regularizers, with metrics["mask_rate"] = masked / maskable tokens."""
    reg, metrics = policy_regularizers(logits, valid, cfg)
    metrics["mask_rate"] = jnp.sum(masks) / jnp.maximum(jnp.sum(valid), 1)
    return reg, metrics


def inner_loop(
    phi: PyTree,
    theta: PyTree,
    inner_batches: Batch,
    noise: Array,
    setup: MetaSetup,
    *,
    masks: Array | None = None,
    reference_phi: PyTree | None = None,
    qa: Batch | None = None,
) -> tuple[PyTree, Array, Metrics]:
    """theta_K(phi), the policy's regularizer loss and metrics.

    inner_batches: batches.MaskableBatch [K,B,L] (with optional "unit_ids"); noise: Gumbel
    [K,B,L]; masks: optional fixed masks [K,B,L]. qa (needed iff cfg.downstream_steps = N > 0):
    a Seq2SeqBatch of N * B' question -> answer pairs, N QA steps after the MLM steps, step i
    on rows [i B', (i + 1) B').
    """
    cfg = setup.cfg
    _check_inner(setup, inner_batches, noise)
    if cfg.downstream_steps and qa is None:
        raise ValueError("MetaConfig.downstream_steps > 0 needs a `qa` batch (the QA steps)")
    logits, masks, weights = policy_masks(
        phi, inner_batches, noise, setup, masks=masks, reference_phi=reference_phi, leading=1
    )
    examples = jax.vmap(lambda i, m, w: mlm_examples(i, m, w, setup))(
        inner_batches["input_ids"], masks, weights
    )
    extra = qa_steps(qa, cfg.downstream_steps) if cfg.downstream_steps else ()
    theta_k = unroll(setup.cfg, setup.lm_loss, theta, examples, extra)
    reg, metrics = _regularizers(logits, masks, inner_batches["valid"], cfg)
    return theta_k, reg, metrics


def qa_steps(qa: Batch, n: int) -> tuple[dict, ...]:
    """The in-loop QA steps' batches: `qa`'s rows in n equal consecutive blocks, normalized."""
    rows = jax.tree.leaves(qa)[0].shape[0]
    if rows % n:
        raise ValueError(f"{rows} QA rows do not split into downstream_steps={n} equal batches")
    size = rows // n
    return tuple(
        normalized(jax.tree.map(lambda x, i=i: x[i * size : (i + 1) * size], qa)) for i in range(n)
    )


def downstream_loss(
    lm_loss: LmLoss, theta: PyTree, outer_batch: Batch, contrast: Batch | None = None
) -> tuple[Array, Metrics]:
    """The outer objective: the questions' loss, minus (contrastive) the loss of questions
    about other contexts. Anything an MLM step does for every question alike (answer format,
    output-embedding drift) cancels in the difference; what remains is what the masked
    contexts taught about their own questions."""
    own = outer_loss(lm_loss, theta, outer_batch)
    if contrast is None:
        return own, {"outer_loss": own}
    other = outer_loss(lm_loss, theta, contrast)
    return own - other, {"outer_loss": own - other, "outer_own": own, "outer_contrast": other}


def meta_loss(
    phi: PyTree,
    theta: PyTree,
    inner_batches: Batch,
    outer_batch: Batch,
    noise: Array,
    setup: MetaSetup,
    *,
    masks: Array | None = None,
    reference_phi: PyTree | None = None,
    contrast: Batch | None = None,
    qa: Batch | None = None,
) -> tuple[Array, Metrics]:
    """L_down(theta_K(phi)) + regularizers, and metrics (outer_loss, entropy, mean_p, ...)."""
    theta_k, reg, metrics = inner_loop(
        phi, theta, inner_batches, noise, setup, masks=masks, reference_phi=reference_phi, qa=qa
    )
    out, out_metrics = downstream_loss(setup.lm_loss, theta_k, outer_batch, contrast)
    return out + reg, {**metrics, **out_metrics}


def first_order_loss(
    phi: PyTree,
    theta: PyTree,
    inner_batches: Batch,
    outer_batch: Batch,
    noise: Array,
    setup: MetaSetup,
    *,
    masks: Array | None = None,
    reference_phi: PyTree | None = None,
    contrast: Batch | None = None,
) -> tuple[Array, Metrics]:
    """The first-order surrogate -a <grad L_mlm(theta, phi), sg(grad L_down(theta))> + regs;
    its phi-gradient is the first-order meta-gradient (module docstring). Metrics carry
    outer_loss = L_down(theta) and the alignment <grad L_mlm, grad L_down>."""
    cfg = setup.cfg
    _check_inner(setup, inner_batches, noise)
    lm_loss = setup.lm_loss
    (down, down_metrics), down_grad = jax.value_and_grad(
        lambda th: downstream_loss(lm_loss, th, outer_batch, contrast), has_aux=True
    )(theta)
    down_grad = jax.lax.stop_gradient(down_grad)
    if cfg.inner_frozen:  # frozen groups do not move: no part in the alignment
        down_grad = jax.tree.map(
            lambda g, frozen: jnp.zeros_like(g) if frozen else g,
            down_grad,
            frozen_leaves(cfg, theta),
        )
    logits, masks, weights = policy_masks(
        phi, inner_batches, noise, setup, masks=masks, reference_phi=reference_phi, leading=1
    )
    examples = jax.vmap(lambda i, m, w: mlm_examples(i, m, w, setup))(
        inner_batches["input_ids"], masks, weights
    )
    label_weights = examples["weights"]

    def per_label_alignment(ex: Batch) -> Array:
        # c_j = <grad ce_j(theta), grad L_down(theta)> for every label: one jvp per microbatch.
        ce = lambda th: microbatched_losses(lm_loss, th, ex, cfg.inner_microbatches)  # noqa: E731
        return jax.jvp(ce, (theta,), (down_grad,))[1]

    align = jax.lax.map(per_label_alignment, jax.lax.stop_gradient(examples))  # [K, B, T]
    alignment = jnp.sum(label_weights * jax.lax.stop_gradient(align))
    reg, metrics = _regularizers(logits, masks, inner_batches["valid"], cfg)
    surrogate = -cfg.inner_learning_rate * alignment
    return surrogate + reg, {**metrics, **down_metrics, "alignment": alignment}


def meta_gradient(
    phi: PyTree,
    theta: PyTree,
    inner_batches: Batch,
    outer_batch: Batch,
    noise: Array,
    setup: MetaSetup,
    *,
    contrast: Batch | None = None,
    qa: Batch | None = None,
) -> tuple[PyTree, Array, Metrics]:
    """(d objective / d phi, objective, metrics) with the estimator of setup.cfg.estimator."""
    if setup.cfg.estimator == "second_order":
        fn = functools.partial(meta_loss, setup=setup, contrast=contrast, qa=qa)
    else:
        if setup.cfg.downstream_steps:
            raise ValueError(
                "MetaConfig.downstream_steps > 0 needs estimator='second_order' (the first-order "
                "estimator evaluates the downstream gradient at theta_0, before any step)"
            )
        fn = functools.partial(first_order_loss, setup=setup, contrast=contrast)
    (loss, metrics), grads = jax.value_and_grad(fn, has_aux=True)(
        phi, theta, inner_batches, outer_batch, noise
    )
    return grads, loss, metrics
