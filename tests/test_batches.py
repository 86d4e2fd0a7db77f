"""The batch contracts (meta_mask/batches.py) are what the producers produce: each producer's
keys are its contract's keys (required ones always, optional ones only where documented) with
the documented dtypes; and SpecialTokens holds a tokenizer's ids (special_tokens.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from meta_mask import batches
from meta_mask.config import MetaConfig
from meta_mask.data.seq2seq import EncodedExamples, train_batch
from meta_mask.policies.corrupt import corrupt_full_sentence_jax, corrupt_np, corrupt_spans_jax
from meta_mask.policies.heuristic import collate
from meta_mask.policies.meta_train import meta_batch
from meta_mask.policies.mlm_batches import policy_batch
from meta_mask.policies.supervised import collate_triples, eval_batches, make_policy_batches
from meta_mask.special_tokens import MissingSpecialTokenError, SpecialTokens
from tests.data.tokenizer_helpers import word_tokenizer
from tests.helpers import BART_SPECIAL

SPECIAL = dataclasses.replace(BART_SPECIAL, sentinels=(9, 8, 7))


def keys_of(contract, *, optional=()) -> set[str]:
    assert set(optional) <= contract.__optional_keys__
    return set(contract.__required_keys__) | set(optional)


def records(n=4):
    """<s> w w .. </s> records (token ids 10.., one word per token), the first word an entity."""
    out = []
    for i in range(n):
        words = 3 + i % 3
        out.append(
            {
                "input_ids": [0, *range(10, 10 + words), 2],
                "word_ids": [-1, *range(words), -1],
                "entity_spans": [[1, 2]],
                "entity_labels": ["PERSON"],
                "answer_labels": [0, 1] + [0] * words,
                "text": " ".join(f"w{10 + j}" for j in range(words)),
                "answer": f"w10-{i}",
            }
        )
    return out


def test_policy_batches_of_records_and_of_the_corpus_stream():
    batch = collate(records(), 8, special=SPECIAL)
    assert set(batch) == keys_of(batches.PolicyBatch)
    assert batch["valid"].dtype == bool and batch["example_ids"].dtype == np.int64
    # The stream's corpus batch, as policy_batch reads it, gives the same policy batch.
    n = len(batch["input_ids"])
    lengths = (batch["input_ids"] != SPECIAL.pad).sum(1).astype(np.int32)
    corpus_batch: batches.CorpusBatch = {
        "input_ids": batch["input_ids"],
        "word_ids": batch["word_ids"],
        "lengths": lengths,
        "entity_spans": np.tile(np.array([[[1, 2]]], np.int32), (n, 1, 1)),
        "num_entities": np.ones(n, np.int32),
        "indices": np.arange(n, dtype=np.int64),
    }
    from_stream = policy_batch(corpus_batch, [["PERSON"]] * n, SPECIAL)
    assert set(from_stream) == set(batch)
    for key in batch:
        np.testing.assert_array_equal(np.asarray(from_stream[key]), np.asarray(batch[key]))


def test_triple_and_policy_train_batches():
    triples = records()
    batch = collate_triples(triples, 8, special=SPECIAL)
    assert set(batch) == keys_of(batches.TripleBatch)
    (evaluated,) = eval_batches(triples, 8, 6, special=SPECIAL)
    assert set(evaluated) == keys_of(batches.TripleBatch, optional={"rows"})
    assert evaluated["rows"] == 4 and not evaluated["valid"][4:].any()
    for units, optional in (("token", ()), ("word", {"unit_ids"})):
        (train,) = make_policy_batches(
            triples, 8, 2, special=SPECIAL, seed=0, num_steps=1, units=units
        )
        assert set(train) == keys_of(batches.PolicyTrainBatch, optional=optional)
        assert train["labels"].dtype == np.float32


def test_seq2seq_batches_of_every_producer():
    ids = np.array([[0, 10, 11, 12, 2, 1], [0, 13, 2, 1, 1, 1]], np.int32)
    mask = np.array([[0, 1, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0]], bool)
    seq2seq_keys = keys_of(batches.Seq2SeqBatch)
    produced = {
        "corrupt_np": corrupt_np(
            ids, mask, output_format="masked_spans", enc_len=6, dec_len=6, special=SPECIAL
        ),
        "train_batch": train_batch(
            EncodedExamples(ids, ids, 0, 0), np.array([1, 0]), special=SPECIAL
        ),
    }
    for name, out in produced.items():
        assert set(out) == seq2seq_keys, name
        for key in ("input_ids", "decoder_input_ids", "labels"):
            assert out[key].dtype == np.int32, (name, key)
        assert out["weights"].dtype == np.float32, name
        np.testing.assert_array_equal(
            np.asarray(out["decoder_input_ids"]),
            batches.shift_right(np.asarray(out["labels"]), SPECIAL.decoder_start),
        )
    # The jitted corruptions of the meta step also say where each label comes from.
    for out in (
        corrupt_spans_jax(ids, mask, enc_len=6, dec_len=6, special=SPECIAL),
        corrupt_full_sentence_jax(ids, mask, SPECIAL),
    ):
        assert set(out) == keys_of(batches.SpanSeq2SeqBatch)


def test_meta_batches():
    triples = records(6)
    qa = EncodedExamples(
        np.full((6, 5), SPECIAL.pad, np.int32), np.full((6, 4), SPECIAL.pad, np.int32), 0, 0
    )
    cfg = MetaConfig(
        inner_steps=2,
        inner_batch_size=3,
        outer_batch_size=2,
        policy_units="word",
        mask_rate=0.2,
        contrastive=False,  # every record is an inner context: none is left to contrast
    )
    out = meta_batch(triples, qa, 0, cfg, special=SPECIAL, seed=0, length=8)
    assert set(out) == keys_of(batches.MetaBatches)
    assert set(out["inner"]) == keys_of(batches.MaskableBatch, optional={"unit_ids", "example_ids"})
    assert out["inner"]["input_ids"].shape == (2, 3, 8)
    assert set(out["outer"]) == keys_of(batches.Seq2SeqBatch)


def test_shift_right_is_one_function_for_numpy_and_jax():
    labels = np.array([[5, 6, 7, 2], [8, 2, 1, 1]], np.int32)
    host = batches.shift_right(labels, 2)
    assert isinstance(host, np.ndarray) and host.dtype == np.int32
    np.testing.assert_array_equal(host, [[2, 5, 6, 7], [2, 8, 2, 1]])
    device = jax.jit(lambda x: batches.shift_right(x, 2))(jnp.asarray(labels))
    assert isinstance(device, jax.Array)
    np.testing.assert_array_equal(np.asarray(device), host)


def test_special_tokens_of_a_tokenizer():
    tok = word_tokenizer(["a b c"])  # the world layout: <s> <pad> </s> <unk> <mask> sentinels
    special = SpecialTokens.of(tok, decoder_start_token_id=2)
    assert (special.pad, special.eos, special.bos, special.mask) == (1, 2, 0, 4)
    assert special.decoder_start == 2 and special.unmaskable == (0, 1, 2)
    assert special.sentinels[:2] == (5, 6) and len(special.sentinels) == 100
    assert hash(special) == hash(SpecialTokens.of(tok, 2))  # a static value under jit
    with pytest.raises(dataclasses.FrozenInstanceError):
        special.pad = 0


def test_special_tokens_name_a_missing_token():
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 4}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        unk_token="<unk>",
        bos_token="<s>",
        pad_token="<pad>",
        eos_token="</s>",
    )
    with pytest.raises(MissingSpecialTokenError, match="no mask token"):
        SpecialTokens.of(tok, 2)
