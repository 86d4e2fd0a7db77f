"""Tests for meta_mask.model.generate.

Part 1 checks the search logic on a toy step function (logits from a random table indexed by a
hash of the whole prefix, so a wrongly reordered cache changes the result) against plain-Python
references: an argmax loop, and a per-example, list-based re-statement of HF's beam search.
Part 2 checks the model-level `generate` against PyTorch BART's `generate` token for token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meta_mask.model import generate as gen

# ---------------------------------------------------------------------------------------------
# Part 1: toy step function and plain-Python references.

VOCAB, STATES = 12, 97
START, PAD, EOS = 2, 1, 2  # BART's: the decoder starts with </s>, which is also EOS


def _toy_table(seed: int, eos_bias: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(STATES, VOCAB)).astype(np.float32) * 2.0
    table[:, EOS] += eos_bias
    return table


def _next_state(state: int, token: int, position: int) -> int:
    return (state * 31 + token + 1 + position * 7) % STATES


def _toy_step(table: np.ndarray, calls: list | None = None):
    """step_fn whose logits depend on the whole prefix through a per-row hash in the cache.

    If `calls` is given, each executed step appends to it (a host callback), to count steps.
    """
    table = jnp.asarray(table)

    def step_fn(token_ids, cache):
        if calls is not None:
            jax.debug.callback(lambda: calls.append(1))
        state = (cache["state"] * 31 + token_ids[:, 0] + 1 + cache["index"] * 7) % STATES
        return table[state], {"state": state, "index": cache["index"] + 1}

    return step_fn


def _toy_cache(init_states: np.ndarray, num_beams: int = 1) -> dict:
    rows = np.repeat(np.asarray(init_states, np.int32), num_beams)
    return {"state": jnp.asarray(rows), "index": jnp.int32(0)}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def _process(scores, cur_len, *, max_length, min_length=0, forced_bos=None, forced_eos=None):
    """HF's processors, written out: min length, then forced BOS, then forced EOS."""
    scores = np.array(scores, np.float64)
    if cur_len < min_length:
        scores[EOS] = -np.inf
    for token, at_len in ((forced_bos, 1), (forced_eos, max_length - 1)):
        if token is not None and cur_len == at_len:
            scores[:] = -np.inf
            scores[token] = 0.0
    return scores


def _ref_greedy(table, init_state, *, max_length, **proc):
    seq, state = [START], init_state
    while len(seq) < max_length:
        state = _next_state(state, seq[-1], len(seq) - 1)
        scores = _process(table[state], len(seq), max_length=max_length, **proc)
        seq.append(int(np.argmax(scores)))
        if seq[-1] == EOS:
            break
    return seq + [PAD] * (max_length - len(seq))


def _ref_beam(table, init_states, *, num_beams, max_length, length_penalty, early_stopping, **proc):
    """HF's beam search as lists and sorts, one example at a time, all examples in lockstep.

    Per step and example: rank all (beam, token) continuations (ties: lower beam*V+token first),
    keep the best 2k; the best k that neither end in EOS nor reach max_length run on; those that
    stop and rank within the top k join the finished set (unless the example is closed), which
    keeps its best k by score / generated_len ** length_penalty. The batch stops when no example
    can improve, or (early_stopping=True) every example has k finished, or at max_length.
    """
    k = num_beams
    pen = lambda n: float(n) ** length_penalty
    examples = []
    for s0 in init_states:
        running = [([START], 0.0 if i == 0 else -1e9, int(s0)) for i in range(k)]
        examples.append({"running": running, "finished": [], "improvable": True})
    cur_len = 1
    while True:
        all_stop = True
        for ex in examples:
            cands = []
            for i, (seq, score, state) in enumerate(ex["running"]):
                new_state = _next_state(state, seq[-1], cur_len - 1)
                lp = _process(
                    _log_softmax(table[new_state]), cur_len, max_length=max_length, **proc
                )
                for v in range(VOCAB):
                    cands.append((score + lp[v], i * VOCAB + v, seq + [v], new_state))
            top = sorted(cands, key=lambda c: (-c[0], c[1]))[: 2 * k]
            stops = [c[2][-1] == EOS or cur_len + 1 >= max_length for c in top]
            all_stop &= all(stops)
            live = [c for c, st in zip(top, stops, strict=True) if not st]
            ex["running"] = [(c[2], c[0], c[3]) for c in live[:k]]
            full = len(ex["finished"]) == k
            if ex["improvable"] and not (early_stopping is True and full):
                ranked = zip(top[:k], stops[:k], strict=True)
                new = [(c[0] / pen(cur_len), c[2]) for c, st in ranked if st]
                merged = ex["finished"] + new
                order = sorted(range(len(merged)), key=lambda j: (-merged[j][0], j))
                ex["finished"] = [merged[j] for j in order[:k]]
        cur_len += 1
        hyp_len = (
            max_length - 1 if early_stopping == "never" and length_penalty > 0 else cur_len - 1
        )
        for ex in examples:
            if len(ex["finished"]) == k and ex["running"]:
                best = ex["running"][0][1] / pen(hyp_len)
                ex["improvable"] &= best > min(h[0] for h in ex["finished"])
        everyone_full = all(len(ex["finished"]) == k for ex in examples)
        if (
            not any(ex["improvable"] for ex in examples)
            or (early_stopping is True and everyone_full)
            or all_stop
        ):
            break
    seqs = [[h[1] + [PAD] * (max_length - len(h[1])) for h in ex["finished"]] for ex in examples]
    scores = [[h[0] for h in ex["finished"]] for ex in examples]
    return np.array(seqs), np.array(scores), cur_len - 1  # the number of model steps


INIT_STATES = np.array([0, 5, 17, 42, 63, 88])
TOY_MAX_LEN = 9
SEARCH_TOKENS = dict(
    max_length=TOY_MAX_LEN, decoder_start_token_id=START, eos_token_id=EOS, pad_token_id=PAD
)


def _assert_covers_eos_and_max_length(sequences: np.ndarray) -> None:
    """The case list exercises both stops: some rows end in EOS early, some run to max_length."""
    ended = (sequences[..., 1:] == EOS).any(-1)
    assert ended.any() and (~ended).any(), sequences


@pytest.mark.parametrize(
    "proc",
    [
        {},
        {"min_length": 5},
        {"forced_bos": 0, "forced_eos": EOS},
    ],
)
def test_greedy_matches_argmax_loop(proc):
    table = _toy_table(0, eos_bias=1.5)
    search = jax.jit(
        functools.partial(
            gen.greedy_search,
            _toy_step(table),
            batch_size=len(INIT_STATES),
            min_length=proc.get("min_length", 0),
            forced_bos_token_id=proc.get("forced_bos"),
            forced_eos_token_id=proc.get("forced_eos"),
            **SEARCH_TOKENS,
        )
    )
    got = np.asarray(search(_toy_cache(INIT_STATES)))
    want = np.array(
        [_ref_greedy(table, int(s), max_length=TOY_MAX_LEN, **proc) for s in INIT_STATES]
    )
    np.testing.assert_array_equal(got, want)
    if not proc:
        _assert_covers_eos_and_max_length(got)
    if "min_length" in proc:
        assert not (got[:, 1 : proc["min_length"]] == EOS).any()
    if "forced_bos" in proc:
        assert (got[:, 1] == 0).all()


BEAM_TABLE = (0, 2.0)  # (seed, eos_bias)
BEAM_CASES = [
    # (num_beams, length_penalty, early_stopping, processors)
    (3, 1.0, False, {}),
    (3, 1.0, True, {}),
    (3, 2.0, False, {}),
    (3, 2.0, "never", {}),
    (3, -1.0, "never", {}),
    (3, 0.0, False, {}),
    (2, 1.0, False, {"min_length": 4}),
    (4, 1.0, True, {"forced_bos": 0, "forced_eos": EOS}),
    (1, 1.0, False, {}),
]


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping,proc", BEAM_CASES)
def test_beam_search_matches_python_reference(num_beams, length_penalty, early_stopping, proc):
    table = _toy_table(*BEAM_TABLE)
    calls = []
    search = jax.jit(
        functools.partial(
            gen.beam_search,
            _toy_step(table, calls),
            batch_size=len(INIT_STATES),
            num_beams=num_beams,
            max_length=TOY_MAX_LEN,
            decoder_start_token_id=START,
            eos_token_id=EOS,
            pad_token_id=PAD,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            min_length=proc.get("min_length", 0),
            forced_bos_token_id=proc.get("forced_bos"),
            forced_eos_token_id=proc.get("forced_eos"),
        )
    )
    out = jax.block_until_ready(search(_toy_cache(INIT_STATES, num_beams)))
    want_seq, want_scores, want_steps = _ref_beam(
        table,
        INIT_STATES,
        num_beams=num_beams,
        max_length=TOY_MAX_LEN,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        **proc,
    )
    np.testing.assert_array_equal(np.asarray(out.sequences), want_seq)
    np.testing.assert_allclose(np.asarray(out.scores), want_scores, rtol=1e-5)
    assert len(calls) == want_steps  # the loop stops exactly when HF's would
    if (num_beams, length_penalty, early_stopping) == (3, 2.0, False):
        _assert_covers_eos_and_max_length(np.asarray(out.sequences)[:, 0])


def test_beam_cases_tell_early_stopping_modes_apart():
    """On the table the cases use, the three early_stopping modes pick different best beams."""
    table = _toy_table(*BEAM_TABLE)
    best = lambda lp, es: _ref_beam(
        table,
        INIT_STATES,
        num_beams=3,
        max_length=TOY_MAX_LEN,
        length_penalty=lp,
        early_stopping=es,
    )[0][:, 0]
    assert (best(1.0, True) != best(1.0, False)).any()
    assert (best(2.0, "never") != best(2.0, False)).any()


def test_beam_search_with_one_beam_is_greedy_on_the_best_path():
    """A sanity property independent of the reference: 1 beam, no EOS bias -> greedy's path."""
    table = _toy_table(2, eos_bias=0.0)
    kw = SEARCH_TOKENS
    greedy = gen.greedy_search(_toy_step(table), _toy_cache(INIT_STATES), len(INIT_STATES), **kw)
    beam = gen.beam_search(
        _toy_step(table), _toy_cache(INIT_STATES), len(INIT_STATES), num_beams=1, **kw
    )
    np.testing.assert_array_equal(np.asarray(beam.sequences)[:, 0], np.asarray(greedy))


def test_invalid_options_are_named():
    kw = dict(decoder_start_token_id=START, eos_token_id=EOS, pad_token_id=PAD)
    step, cache = _toy_step(_toy_table(0, 0.0)), _toy_cache(INIT_STATES, 2)
    with pytest.raises(ValueError, match="early_stopping"):
        gen.beam_search(step, cache, 6, num_beams=2, max_length=5, early_stopping="always", **kw)
    with pytest.raises(ValueError, match="max_length"):
        gen.greedy_search(step, cache, 6, max_length=1, **kw)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_loop_stops_as_soon_as_every_sequence_is_done(num_beams):
    """With EOS overwhelmingly likely, greedy needs one model step and beam search two (step 1
    finishes beam 0's EOS; step 2 fills the finished set), not max_length - 1."""
    calls = []
    counted_step = _toy_step(_toy_table(0, eos_bias=100.0), calls)

    kw = SEARCH_TOKENS
    if num_beams == 1:
        out = gen.greedy_search(counted_step, _toy_cache(INIT_STATES), len(INIT_STATES), **kw)
    else:
        cache = _toy_cache(INIT_STATES, num_beams)
        out = gen.beam_search(counted_step, cache, len(INIT_STATES), num_beams=num_beams, **kw)
        out = out.sequences[:, 0]
    jax.block_until_ready(out)
    assert len(calls) == (1 if num_beams == 1 else 2)
    np.testing.assert_array_equal(np.asarray(out)[:, :2], [[START, EOS]] * len(INIT_STATES))


# ---------------------------------------------------------------------------------------------
# Part 2: the model-level generate against PyTorch BART's generate.

HF_MAX_LEN = 14
HF_LENGTHS = [7, 12, 5, 9, 16, 3, 10, 14]  # source lengths, right-padded to 16


def _spread_torch_bart(eos_bias: float):
    """A tiny random torch BART whose greedy/beam outputs vary with the input and the step.

    With the fixtures' default perturbation the tied embeddings make a random BART repeat one
    token forever; large decoder positions make each step pick a different token, a stronger
    cross-attention makes the choice depend on the source, and `eos_bias` on EOS's logit makes
    some sequences stop early (at the first step or mid-way) while others run to max_length.
    """
    import torch
    import transformers

    from tests.model import hf_fixtures

    model = hf_fixtures.make_torch_bart(seed=0, noise=0.1)
    with torch.no_grad():
        model.model.decoder.embed_positions.weight.mul_(10.0)
        for layer in model.model.decoder.layers:
            layer.encoder_attn.out_proj.weight.mul_(5.0)
        model.final_logits_bias[0, EOS] += eos_bias
    # Only the special tokens: every generation option is passed to generate() explicitly.
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=0, eos_token_id=EOS, pad_token_id=PAD, decoder_start_token_id=START
    )
    return model


@pytest.fixture(scope="module")
def hf_bart(tmp_path_factory):
    """The same checkpoint as a torch model and as ours, plus a padded source batch."""
    from meta_mask.model.bart import Bart
    from tests.model import hf_fixtures

    torch_model = _spread_torch_bart(eos_bias=1.2)
    config, params = hf_fixtures.save_and_load(torch_model, tmp_path_factory.mktemp("bart"))
    ids, mask = hf_fixtures.padded_batch(HF_LENGTHS, config.vocab_size, seed=0)
    return torch_model, Bart(config), config, params, ids, mask


def _generate_fn(model, config, **options):
    return gen.make_generate_fn(model, config=config, max_length=HF_MAX_LEN, **options)


def _hf_generate(torch_model, ids, mask, **options) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = torch_model.generate(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            max_length=HF_MAX_LEN,
            do_sample=False,
            no_repeat_ngram_size=0,
            **options,
        ).numpy()
    # HF crops to the longest row; ours is padded to max_length.
    padded = np.full((len(ids), HF_MAX_LEN), PAD, out.dtype)
    padded[:, : out.shape[1]] = out
    return padded


GENERATE_CASES = [
    # num_beams, length_penalty, early_stopping, min_length, forced_bos, forced_eos
    (1, 1.0, False, 0, None, EOS),  # BART's defaults
    (1, 1.0, False, 6, 0, None),
    (4, 1.0, False, 0, None, EOS),
    (4, 1.0, True, 0, None, EOS),
    (4, 2.0, False, 0, None, None),
    (4, 2.0, "never", 4, 0, EOS),
]


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping,min_len,bos,eos", GENERATE_CASES)
def test_generate_matches_torch_bart(
    hf_bart, num_beams, length_penalty, early_stopping, min_len, bos, eos
):
    torch_model, model, config, params, ids, mask = hf_bart
    config = config.replace(forced_bos_token_id=bos, forced_eos_token_id=eos)
    options = dict(
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        min_length=min_len,
    )
    ours = np.asarray(_generate_fn(model, config, **options)(params, ids, mask))
    forced = {
        k: v
        for k, v in (("forced_bos_token_id", bos), ("forced_eos_token_id", eos))
        if v is not None
    }
    want = _hf_generate(torch_model, ids, mask, **options, **forced)
    np.testing.assert_array_equal(ours, want)
    if min_len == 0 and bos is None and eos is not None:
        # Not degenerate: rows differ, some stop on EOS before max_length and some run to it.
        assert len({tuple(row) for row in want}) >= 4, want
        ended_early = (want[:, 1:-1] == EOS).any(-1)
        assert ended_early.any() and (~ended_early).any(), want


def test_make_generate_fn_compiles_once_per_shape(hf_bart, monkeypatch):
    _, model, config, params, ids, mask = hf_bart
    traces = []
    real_generate = gen.generate

    def counting_generate(*args, **kwargs):
        traces.append(1)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(gen, "generate", counting_generate)
    # The options of the first parity case: a fresh jit, but XLA's persistent cache can serve it.
    fn = gen.make_generate_fn(model, config=config, max_length=HF_MAX_LEN)
    first = fn(params, ids, mask)
    shifted = np.where(mask == 1, np.maximum(ids, 4) + 1, ids).astype(np.int32)
    fn(params, shifted, mask)
    fn(jax.tree.map(lambda p: p * 1.01, params), ids, mask)
    assert len(traces) == 1
    fn(params, ids[:3], mask[:3])  # a new batch shape traces again
    assert len(traces) == 2
    np.testing.assert_array_equal(np.asarray(fn(params, ids, mask)), np.asarray(first))
