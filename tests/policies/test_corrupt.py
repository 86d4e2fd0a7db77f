"""Output formats: hand-written golden examples, round trips over random masks, 80/10/10 law,
the JAX same-length variant, and shift_right against transformers' BART."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.bart.modeling_bart import shift_tokens_right

from meta_mask.batches import shift_right
from meta_mask.policies.corrupt import (
    corrupt_full_sentence_jax,
    corrupt_np,
    corrupt_spans_jax,
    non_special_ids,
)
from meta_mask.policies.sampler import BatchRng
from meta_mask.special_tokens import SpecialTokens, sentinel_ids
from tests.helpers import BART_SPECIAL as SPECIAL  # no sentinels: every span becomes <mask>

MASK = SPECIAL.mask
S0, S1, S2 = 100, 99, 98  # <extra_id_0>, <extra_id_1>, <extra_id_2> (T5 numbers them downwards)


def with_sentinels(sentinels) -> SpecialTokens:
    return dataclasses.replace(SPECIAL, sentinels=tuple(sentinels))


# <s> A B C D </s>, and a shorter padded sentence <s> E F </s> <pad> <pad>
IDS = np.array([[0, 10, 11, 12, 13, 2], [0, 20, 21, 2, 1, 1]], np.int32)
# Masks A and C D in row 0; F in row 1 (and a padding position, which must be ignored).
MASKED = np.array([[0, 1, 0, 1, 1, 0], [0, 0, 1, 0, 1, 0]], bool)


def run(fmt, infill="span", sentinels=(S0, S1, S2), enc_len=8, dec_len=8, **kw):
    return corrupt_np(
        IDS,
        MASKED,
        output_format=fmt,
        enc_len=enc_len,
        dec_len=dec_len,
        special=with_sentinels(sentinels),
        infill=infill,
        **kw,
    )


def check(out, enc, labels, dec_in, n_labels):
    np.testing.assert_array_equal(out["input_ids"], enc)
    np.testing.assert_array_equal(out["labels"], labels)
    np.testing.assert_array_equal(out["decoder_input_ids"], dec_in)
    weights = (np.arange(out["labels"].shape[1]) < np.array(n_labels)[:, None]).astype(np.float32)
    np.testing.assert_array_equal(out["weights"], weights)
    for v in out.values():
        assert v.dtype in (np.int32, np.float32)


def test_golden_masked_spans_with_sentinels():
    check(
        run("masked_spans"),
        enc=[[0, S0, 11, S1, 2, 1, 1, 1], [0, 20, S0, 2, 1, 1, 1, 1]],
        labels=[[S0, 10, S1, 12, 13, 2, 1, 1], [S0, 21, 2, 1, 1, 1, 1, 1]],
        dec_in=[[2, S0, 10, S1, 12, 13, 2, 1], [2, S0, 21, 2, 1, 1, 1, 1]],
        n_labels=[6, 3],
    )


def test_golden_masked_spans_without_sentinels_uses_mask():
    check(
        run("masked_spans", sentinels=()),
        enc=[[0, MASK, 11, MASK, 2, 1, 1, 1], [0, 20, MASK, 2, 1, 1, 1, 1]],
        labels=[[MASK, 10, MASK, 12, 13, 2, 1, 1], [MASK, 21, 2, 1, 1, 1, 1, 1]],
        dec_in=[[2, MASK, 10, MASK, 12, 13, 2, 1], [2, MASK, 21, 2, 1, 1, 1, 1]],
        n_labels=[6, 3],
    )


def test_golden_masked_spans_per_token():
    check(
        run("masked_spans", infill="token"),
        enc=[[0, S0, 11, S1, S2, 2, 1, 1], [0, 20, S0, 2, 1, 1, 1, 1]],
        labels=[[S0, 10, S1, 12, S2, 13, 2, 1], [S0, 21, 2, 1, 1, 1, 1, 1]],
        dec_in=[[2, S0, 10, S1, 12, S2, 13, 2], [2, S0, 21, 2, 1, 1, 1, 1]],
        n_labels=[7, 3],
    )


def test_golden_full_sentence_text_infilling():
    check(
        run("full_sentence"),
        enc=[[0, MASK, 11, MASK, 2, 1, 1, 1], [0, 20, MASK, 2, 1, 1, 1, 1]],
        labels=[[0, 10, 11, 12, 13, 2, 1, 1], [0, 20, 21, 2, 1, 1, 1, 1]],
        dec_in=[[2, 0, 10, 11, 12, 13, 2, 1], [2, 0, 20, 21, 2, 1, 1, 1]],
        n_labels=[6, 4],
    )


def test_golden_full_sentence_per_token():
    check(
        run("full_sentence", infill="token", enc_len=6, dec_len=6),
        enc=[[0, MASK, 11, MASK, MASK, 2], [0, 20, MASK, 2, 1, 1]],
        labels=[[0, 10, 11, 12, 13, 2], [0, 20, 21, 2, 1, 1]],
        dec_in=[[2, 0, 10, 11, 12, 13], [2, 0, 20, 21, 2, 1]],
        n_labels=[6, 4],
    )


def test_overflowing_target_drops_trailing_spans_whole():
    # Row 0 needs 6 target slots (S0 A S1 C D </s>); with 4, only "S0 A" + </s> fits.
    check(
        run("masked_spans", dec_len=4),
        enc=[[0, S0, 11, 12, 13, 2, 1, 1], [0, 20, S0, 2, 1, 1, 1, 1]],
        labels=[[S0, 10, 2, 1], [S0, 21, 2, 1]],
        dec_in=[[2, S0, 10, 2], [2, S0, 21, 2]],
        n_labels=[3, 3],
    )
    # Random masks: every target fits, whole runs are kept or dropped, a prefix of them kept.
    rng = np.random.default_rng(5)
    ids, mask = random_batch(rng)
    sentinels = list(range(200, 180, -1))
    kw = dict(output_format="masked_spans", enc_len=20, special=with_sentinels(sentinels))
    full = corrupt_np(ids, mask, dec_len=40, **kw)
    short = corrupt_np(ids, mask, dec_len=8, **kw)
    for i in range(len(ids)):
        n = int(short["weights"][i].sum())
        assert short["labels"][i][n - 1] == 2
        ref = full["labels"][i][: int(full["weights"][i].sum()) - 1].tolist()
        got = short["labels"][i][: n - 1].tolist()
        # The kept target is the full target cut just before a sentinel.
        assert got == ref[: len(got)] and (len(got) == len(ref) or ref[len(got)] in sentinels)
        enc = short["input_ids"][i][short["input_ids"][i] != 1].tolist()
        assert fill_in(enc, got, sentinels) == ids[i][ids[i] != 1].tolist()


def test_jax_same_length_variant_equals_numpy():
    ref = run("full_sentence", infill="token", enc_len=6, dec_len=6)
    out = corrupt_full_sentence_jax(IDS, MASKED, SPECIAL)
    for k in ref:
        np.testing.assert_array_equal(np.asarray(out[k]), ref[k], err_msg=k)


def test_shift_right_matches_transformers_bart():
    labels = np.array([[0, 10, 11, 2, 1, 1], [5, 6, 7, 8, 9, 2]], np.int32)
    ref = shift_tokens_right(torch.tensor(labels), pad_token_id=1, decoder_start_token_id=2)
    np.testing.assert_array_equal(shift_right(labels, 2), ref.numpy())
    # The jax variant (the jitted producers' path): the same ids, a jax array back.
    out = jax.jit(lambda x: shift_right(x, 2))(jnp.asarray(labels))
    assert isinstance(out, jax.Array) and out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out), ref.numpy())


def random_batch(rng, b=200, length=20):
    ids = np.full((b, length), 1, np.int32)
    mask = rng.random((b, length)) < 0.3
    for i in range(b):
        n = rng.integers(0, length - 1)
        ids[i, : n + 2] = np.r_[0, rng.integers(5, 90, n), 2]
        mask[i, 0] = mask[i, n + 1] = False  # the sampler never masks specials
    return ids, mask


def fill_in(enc_row, label_row, sentinels):
    """Rebuild the sentence from a masked_spans example (what the model must learn)."""
    spans, cur = {}, None
    for t in label_row:
        if t in sentinels:
            cur = t
            spans[cur] = []
        else:
            spans[cur].append(t)
    out = []
    for t in enc_row:
        out.extend(spans[t] if t in sentinels else [t])
    return out


def test_masked_spans_round_trip_over_random_masks():
    rng = np.random.default_rng(0)
    ids, mask = random_batch(rng)
    sentinels = list(range(200, 190, -1))
    out = corrupt_np(
        ids,
        mask,
        output_format="masked_spans",
        enc_len=20,
        dec_len=24,
        special=with_sentinels(sentinels),
    )
    for i in range(len(ids)):
        real = ids[i][ids[i] != 1].tolist()
        n = int(out["weights"][i].sum())
        labels = out["labels"][i][:n].tolist()
        assert labels[-1] == 2 and (out["labels"][i][n:] == 1).all()
        enc = out["input_ids"][i][out["input_ids"][i] != 1].tolist()
        # Label positions hold the masked tokens in order, each span after its own sentinel.
        real_mask = mask[i] & (ids[i] != 1)  # corrupt ignores masked padding
        assert [t for t in labels[:-1] if t not in sentinels] == ids[i][real_mask].tolist()
        assert fill_in(enc, labels[:-1], sentinels) == real
        runs = int((real_mask & ~np.r_[False, real_mask[:-1]]).sum())
        assert [t for t in enc if t in sentinels] == sentinels[:runs]


@pytest.mark.parametrize("infill", ["span", "token"])
@pytest.mark.parametrize("dec_len", [24, 9, 4])
def test_jax_masked_spans_equal_numpy_including_dropped_spans(infill, dec_len):
    # The meta-learned policy's inner step trains on exactly the examples the intermediate
    # stage writes: random masks, short targets that drop trailing spans, with and without
    # sentinels, one token per span or whole spans.
    rng = np.random.default_rng(7)
    ids, mask = random_batch(rng)
    for sentinels in (list(range(200, 180, -1)), []):
        kw = dict(enc_len=20, dec_len=dec_len, special=with_sentinels(sentinels), infill=infill)
        ref = corrupt_np(ids, mask, output_format="masked_spans", **kw)
        out = jax.jit(lambda i, m, kw=kw: corrupt_spans_jax(i, m, **kw))(ids, mask)
        for k in ref:
            np.testing.assert_array_equal(np.asarray(out[k]), ref[k], err_msg=k)
        # label_source points every span token of the target at its input position.
        src = np.asarray(out["label_source"])
        has = src >= 0
        np.testing.assert_array_equal(
            ref["labels"][has], np.take_along_axis(ids, np.maximum(src, 0), 1)[has]
        )
        kept = ref["labels"] != 1
        n_span_tokens = (kept & ~np.isin(ref["labels"], [*sentinels, MASK, 2])).sum()
        assert has.sum() == n_span_tokens


@pytest.mark.parametrize("infill", ["span", "token"])
def test_jax_full_sentence_equals_numpy_over_random_masks(infill):
    ids, mask = random_batch(np.random.default_rng(11))
    length = ids.shape[1]
    ref = corrupt_np(
        ids, mask, output_format="full_sentence", enc_len=length, dec_len=length,
        special=SPECIAL, infill=infill,
    )  # fmt: skip
    out = jax.jit(lambda i, m: corrupt_full_sentence_jax(i, m, SPECIAL, infill=infill))(ids, mask)
    for k in ref:
        np.testing.assert_array_equal(np.asarray(out[k]), ref[k], err_msg=k)
    src = np.asarray(out["label_source"])
    np.testing.assert_array_equal(src >= 0, mask & (ids != SPECIAL.pad))


def test_full_sentence_span_infilling_round_trip():
    rng = np.random.default_rng(1)
    ids, mask = random_batch(rng)
    out = corrupt_np(
        ids, mask, output_format="full_sentence", enc_len=20, dec_len=20, special=SPECIAL
    )
    np.testing.assert_array_equal(out["labels"], ids)
    for i in range(len(ids)):
        # Collapse each masked run of the original into one <mask>: that is the encoder input.
        expect, prev = [], False
        for t, m in zip(ids[i], mask[i], strict=True):
            if t == 1:
                break
            if m and not prev:
                expect.append(MASK)
            elif not m:
                expect.append(t)
            prev = m
        assert out["input_ids"][i][: len(expect)].tolist() == expect
        assert (out["input_ids"][i][len(expect) :] == 1).all()


def test_80_10_10_replacement_law_and_determinism():
    b, length = 400, 40
    ids = np.full((b, length), 50, np.int32)
    ids[:, 0], ids[:, -1] = 0, 2
    mask = np.zeros((b, length), bool)
    mask[:, 1:-1] = True
    rng = BatchRng(seed=0, step=0, example_ids=np.arange(b))
    random_ids = np.arange(60, 90)  # disjoint from the sentence, so replacements are visible
    kw = dict(output_format="full_sentence", enc_len=length, dec_len=length, special=SPECIAL)
    kw.update(infill="token", replace_80_10_10=True, rng=rng, random_ids=random_ids)
    out = corrupt_np(ids, mask, **kw)
    enc = out["input_ids"][:, 1:-1]
    np.testing.assert_allclose((enc == MASK).mean(), 0.8, atol=0.01)
    np.testing.assert_allclose(np.isin(enc, random_ids).mean(), 0.1, atol=0.01)
    np.testing.assert_allclose((enc == 50).mean(), 0.1, atol=0.01)
    np.testing.assert_array_equal(out["labels"], ids)
    np.testing.assert_array_equal(corrupt_np(ids, mask, **kw)["input_ids"], out["input_ids"])
    # Span infilling: a whole masked run shares one action (one <mask>, all random or all kept).
    kw["infill"] = "span"
    enc = corrupt_np(ids, mask, **kw)["input_ids"]
    for row in enc:
        body = row[1 : np.flatnonzero(row == 2)[0]]
        assert body.tolist() == [MASK] or np.isin(body, random_ids).all() or (body == 50).all()
        assert len(body) in (1, length - 2)


def test_errors_name_the_parameter():
    with pytest.raises(ValueError, match="enc_len"):
        run("masked_spans", enc_len=3)
    with pytest.raises(ValueError, match="dec_len"):
        run("masked_spans", dec_len=4, overflow="error")
    with pytest.raises(ValueError, match="dec_len"):
        run("full_sentence", dec_len=5)
    with pytest.raises(ValueError, match="overflow"):
        run("masked_spans", overflow="truncate")
    with pytest.raises(ValueError, match="sentinels"):
        run("masked_spans", sentinels=(S0,))
    with pytest.raises(ValueError, match="output_format"):
        run("spans")
    with pytest.raises(ValueError, match="full_sentence"):
        run("masked_spans", replace_80_10_10=True)


def test_sentinel_ids_from_a_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4, "a": 5}
    vocab.update({f"<extra_id_{i}>": 6 + i for i in range(3)})
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>"
    )
    assert sentinel_ids(tok) == [6, 7, 8]
    tok.add_special_tokens({"mask_token": "<mask>", "pad_token": "<pad>", "bos_token": "<s>"})
    tok.add_special_tokens({"eos_token": "</s>"})
    assert non_special_ids(tok).tolist() == [5]
