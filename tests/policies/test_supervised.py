"""The supervised masking policy on the synthetic world's world_qa contexts.

Checks: batches (fixed shapes, labels = answer tokens, order a pure function of (seed, step),
each triple once per epoch), both losses against hand-written formulas, the span-F1 metric on
hand-computed masks, that training puts the masks on answer tokens (dev span-F1 far above a
random scorer and the salient-span heuristic under the same budget and Gumbel draws, through
LearnedScorer + the shared sampler, with the budget met exactly), early stopping returning the
best evaluation's parameters (a dev set whose gold is the *names* peaks before training, so the
initial parameters come back), determinism, and a save/load round trip.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meta_mask.config import SupervisedConfig, WorldConfig
from meta_mask.data.tasks import example_from_dict
from meta_mask.data.tokenize import tokenize_sentences
from meta_mask.data.world import build_world, world_task
from meta_mask.data.world_tokenizer import world_tokenizer
from meta_mask.policies import supervised as sup
from meta_mask.policies.heuristic import RandomTokens, SalientSpans
from meta_mask.policies.net import LearnedScorer, PolicyNet, init_policy_params
from meta_mask.policies.sampler import BatchRng, mask_batch_np, target_counts_np
from meta_mask.training import loop
from meta_mask.training.checkpoint import load_params, save_params
from tests.helpers import BART_SPECIAL as SPECIAL  # the world tokenizer's layout

L = 16
RATE = 0.25  # ~2 of a world sentence's 7-10 maskable tokens: an answer is 2 tokens
WORLD = WorldConfig(
    num_people=80,
    num_bios=2,
    first_names=12,
    last_names=12,
    place_words=12,
    org_words=16,
    common_words=10,
    unique_values=False,  # small word pools; the policy never sees a value's owner anyway
    split_fractions=(0.5, 0.25, 0.25),
)
CFG = SupervisedConfig(
    steps=150,
    batch_size=16,
    learning_rate=3e-3,
    max_length=L,
    eval_every=25,
    eval_batch_size=32,
    patience=0,
)
BUDGET = {"mask_rate": RATE}


def train_policy(net, init, train, dev, cfg, directory, *, seed=0, budget=BUDGET):
    """Train through the one loop; returns (the best evaluated params, the history)."""
    learner, options = sup.supervised_learner(
        net, init, train, dev, cfg, special=SPECIAL, budget=budget, seed=seed
    )
    trained = loop.train(learner, directory, options)
    return trained.state.params, {**learner.metadata, **trained.history()}


def best_span_f1(history):
    return next(e["span_f1"] for e in history["evals"] if e["step"] == history["best_step"])


def make_net(vocab_size: int, max_length: int = L) -> PolicyNet:
    return PolicyNet(
        vocab_size=vocab_size,
        pad_id=SPECIAL.pad,
        d_model=32,
        num_layers=1,
        num_heads=4,
        ffn_dim=64,
        max_length=max_length,
    )


@pytest.fixture(scope="module")
def world_data():
    world = build_world(WORLD)
    tok = world_tokenizer(world)
    task = world_task(world, "world_qa")
    examples = {
        s: [example_from_dict(r, f"{s}-{i}") for i, r in enumerate(rows)]
        for s, rows in task.items()
    }
    train = sup.prepare_triples(sup.supervised_triples(examples["train"], tok, CFG))
    dev = sup.prepare_triples(sup.supervised_triples(examples["dev"], tok, CFG))
    # The world's gold entities (names and values) on the dev sentences, for salient spans.
    entities = {s["text"]: s["entities"] for s in world.sentences}
    gold = tokenize_sentences(
        [{"text": t["text"], "entities": entities[t["text"]]} for t in dev], tok, max_length=L
    )
    dev_entities = [
        t | {k: g[k] for k in ("entity_spans", "entity_labels", "entity_attributes")}
        for t, g in zip(dev, gold, strict=True)
    ]
    return {"tok": tok, "train": train, "dev": dev, "dev_entities": dev_entities}


@pytest.fixture(scope="module")
def trained(world_data, tmp_path_factory):
    net = make_net(len(world_data["tok"]))
    init = init_policy_params(net, jax.random.key(0))
    params, history = train_policy(
        net, init, world_data["train"], world_data["dev"], CFG, tmp_path_factory.mktemp("sup")
    )
    return net, init, params, history


# ----------------------------------------------------------------------------- data


def test_batches_have_fixed_shapes_answer_labels_and_seeded_order(world_data):
    train = world_data["train"]
    n = len(train)
    assert n >= 60 and len(world_data["dev"]) >= 30
    # n batches of 8 = 8 epochs
    gen = sup.make_policy_batches(train, L, 8, seed=3, num_steps=n, special=SPECIAL)
    batches = list(gen)
    for b in batches[:5]:
        assert b["input_ids"].shape == b["valid"].shape == b["labels"].shape == (8, L)
        assert b["input_ids"].dtype == np.int32 and b["labels"].dtype == np.float32
        assert not np.any((b["labels"] > 0) & ~b["valid"])
    # Labels are exactly the tokens inside the triples' answer token spans.
    idx = sup.step_indices(n, 8, seed=3, step=2)
    for row, i in enumerate(idx):
        want = np.zeros(L)
        for s, e in train[i]["answer_token_spans"]:
            want[s:e] = 1
        np.testing.assert_array_equal(batches[2]["labels"][row], want)
        np.testing.assert_array_equal(
            batches[2]["input_ids"][row, : len(train[i]["input_ids"])], train[i]["input_ids"]
        )
    # A pure function of (seed, step): rebuilt from start_step, same; another seed, different.
    again = next(sup.make_policy_batches(train, L, 8, seed=3, start_step=2, special=SPECIAL))
    np.testing.assert_array_equal(again["input_ids"], batches[2]["input_ids"])
    other = next(sup.make_policy_batches(train, L, 8, seed=4, start_step=2, special=SPECIAL))
    assert not np.array_equal(other["input_ids"], batches[2]["input_ids"])
    # Every epoch is a permutation: each triple appears exactly once per n positions.
    order = np.concatenate([sup.step_indices(n, 8, seed=3, step=s) for s in range(n)])
    for e in range(8):
        assert sorted(order[e * n : (e + 1) * n]) == list(range(n))
    # Word units (the world tokenizer is word-level: one unit per maskable token).
    wb = next(sup.make_policy_batches(train, L, 8, seed=3, units="word", special=SPECIAL))
    np.testing.assert_array_equal(
        wb["unit_ids"], np.where(wb["valid"], np.arange(L), -1).astype(np.int32)
    )


def test_prepare_triples_dedupes_and_caps(world_data):
    train = world_data["train"]
    assert len(sup.prepare_triples(train + train[:5])) == len(train)
    capped = sup.prepare_triples(train, max_triples=10, seed=1)
    assert len(capped) == 10
    assert capped == sup.prepare_triples(train, max_triples=10, seed=1)
    with pytest.raises(ValueError, match="tokenizer"):
        sup.prepare_triples([{"text": "no tokens"}])


# ----------------------------------------------------------------------------- losses, metric


def test_losses_match_hand_formulas():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 6)).astype(np.float32)
    valid = np.array([[0, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0]], bool)
    labels = np.array([[0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], np.float32)
    masked = np.where(valid, logits, -np.inf).astype(np.float32)  # as the net returns them

    def sigmoid(x):
        return 1 / (1 + np.exp(-x))

    w = 2.5
    terms = [
        -(w * y * np.log(sigmoid(x)) + (1 - y) * np.log(1 - sigmoid(x)))
        for x, y, v in zip(logits.ravel(), labels.ravel(), valid.ravel(), strict=True)
        if v
    ]
    got = sup.token_bce_loss(jnp.asarray(masked), labels, valid, w)
    np.testing.assert_allclose(got, np.mean(terms), rtol=1e-5)

    per_sentence = []
    for x, y, v in zip(logits, labels, valid, strict=True):
        if y.sum() == 0:  # no answer: not counted
            continue
        q = np.exp(x[v]) / np.exp(x[v]).sum()
        per_sentence.append(-np.sum(y[v] / y.sum() * np.log(q)))
    got = sup.span_softmax_loss(jnp.asarray(masked), labels, valid)
    np.testing.assert_allclose(got, np.mean(per_sentence), rtol=1e-5)

    # -inf off `valid` (the net's output) gives finite gradients for both objectives.
    for fn in (
        lambda x: sup.token_bce_loss(x, labels, valid, w),
        lambda x: sup.span_softmax_loss(x, labels, valid),
    ):
        g = jax.grad(lambda z, fn=fn: fn(jnp.where(valid, z, -jnp.inf)))(jnp.asarray(logits))
        assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[~valid] == 0)


def test_target_mass_uniform_or_balanced_between_answers_and_question_entities():
    kinds = np.asarray(
        [[0, 2, 2, 2, 2, 1, 1, 0], [0, 1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]], np.int32
    )
    batch = {"label_kinds": kinds, "labels": (kinds > 0).astype(np.int32)}
    np.testing.assert_array_equal(sup.target_mass(batch, balance=False), kinds > 0)
    mass = sup.target_mass(batch, balance=True)
    np.testing.assert_allclose(mass[0], [0, 1 / 8, 1 / 8, 1 / 8, 1 / 8, 1 / 4, 1 / 4, 0])
    np.testing.assert_allclose(mass[1], [0, 1 / 2, 1 / 2, 0, 0, 0, 0, 0])  # answers only
    np.testing.assert_array_equal(mass[2], 0)
    # The span objective reads the mass as its target distribution: on row 0 a policy that
    # puts q = mass scores lower than one uniform over the six targets.
    valid = jnp.asarray(kinds >= 0) & jnp.asarray(np.arange(8) > 0) & jnp.asarray(np.arange(8) < 7)
    on_mass = jnp.log(jnp.asarray(np.where(mass > 0, mass, 1e-9)))
    uniform = jnp.log(jnp.asarray(np.where(kinds > 0, 1 / 6, 1e-9)))
    labels = jnp.asarray(mass[:1])
    assert sup.span_softmax_loss(on_mass[:1], labels, valid[:1]) < sup.span_softmax_loss(
        uniform[:1], labels, valid[:1]
    )


def test_mask_f1_hand_values():
    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]], bool)
    gold = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]])
    # 2tp / (|M| + |G|): 4/4, 0/3, both empty = 1, 2/3.
    np.testing.assert_allclose(sup.mask_f1(mask, gold), [1.0, 0.0, 1.0, 2 / 3])


def test_config_errors_name_the_field_and_choices():
    with pytest.raises(ValueError, match=r"objective='sigmoid'.*token.*span"):
        SupervisedConfig(objective="sigmoid")
    with pytest.raises(ValueError, match="eval_every"):
        SupervisedConfig(eval_every=0)
    with pytest.raises(ValueError, match="balance_targets needs objective='span'"):
        SupervisedConfig(balance_targets=True, targets="answers_and_question_entities")
    SupervisedConfig(
        balance_targets=True, objective="span", targets="answers_and_question_entities"
    )
    with pytest.raises(ValueError, match="log_probability' needs objective='token'"):
        SupervisedConfig(sample_scores="log_probability", objective="span")
    SupervisedConfig(sample_scores="log_probability")


# ----------------------------------------------------------------------------- learning


def scorers(net, params):
    return {
        "random": RandomTokens(),
        "salient": SalientSpans(),
        "supervised": LearnedScorer(net, params),
    }


def test_supervised_policy_beats_random_and_salient_on_dev(world_data, trained):
    net, _, params, history = trained
    batches = sup.eval_batches(world_data["dev_entities"], L, 32, special=SPECIAL)
    # The same budget and the same Gumbel draws for every scorer: what pre-training would mask.
    f1 = {
        name: sup.evaluate_scorer(sc, batches, {"mask_rate": RATE}, draws=8, seed=5)["span_f1"]
        for name, sc in scorers(net, params).items()
    }
    # Random: ~2 of ~8 tokens; salient: the name or the value, about half the time each.
    assert f1["random"] < 0.35
    assert 0.3 < f1["salient"] < 0.65
    assert f1["supervised"] > 0.9
    assert f1["supervised"] > f1["salient"] + 0.3
    assert history["evals"][0]["span_f1"] < 0.5  # untrained, the policy was no better
    assert best_span_f1(history) > 0.9
    # The returned params are the best evaluation's (not simply the last step's).
    best = next(e for e in history["evals"] if e["step"] == history["best_step"])
    again = sup.evaluate_scorer(LearnedScorer(net, params), batches, {"mask_rate": RATE})
    assert again["span_f1"] == best["span_f1"]
    terms = [
        sup.policy_loss_terms(
            net,
            params,
            {k: b[k] for k in ("input_ids", "valid", "labels")},
            objective="token",
            pos_weight=history["pos_weight"],
        )
        for b in sup.eval_batches(world_data["dev"], L, 32, special=SPECIAL)
    ]
    dev_loss = sum(float(t) for t, _ in terms) / sum(float(c) for _, c in terms)
    np.testing.assert_allclose(dev_loss, best["loss"], rtol=1e-5)
    assert all(
        e["span_f1"] < best["span_f1"]
        or (e["span_f1"] == best["span_f1"] and e["loss"] >= best["loss"])
        for e in history["evals"]
    )


@pytest.mark.parametrize("budget", [{"mask_rate": RATE}, {"mask_rate": 0.15}, {"num_units": 1}])
def test_learned_scorer_masks_exactly_under_budget_and_prefers_answers(world_data, trained, budget):
    net, _, params, _ = trained
    batch = sup.eval_batches(
        world_data["dev_entities"], L, len(world_data["dev_entities"]), special=SPECIAL
    )[0]
    answer_share = {}
    for name, sc in scorers(net, params).items():
        hits = total = 0
        for step in range(4):
            rng = BatchRng(seed=1, step=step, example_ids=batch["example_ids"])
            mask = mask_batch_np(sc, batch, rng, **budget)
            assert not np.any(mask & ~batch["valid"])
            if name != "salient":  # single-token units: the budget is met exactly
                counts = mask.sum(1)
                if "num_units" in budget:
                    np.testing.assert_array_equal(counts, budget["num_units"])
                else:
                    want = target_counts_np(batch["valid"].sum(1), budget["mask_rate"])
                    np.testing.assert_array_equal(counts, want)
            hits += int((mask & (batch["labels"] > 0)).sum())
            total += int(mask.sum())
        answer_share[name] = hits / total
    assert answer_share["supervised"] > 0.95
    assert answer_share["supervised"] > answer_share["salient"] + 0.3
    assert answer_share["salient"] > answer_share["random"]


def test_early_stopping_returns_the_best_dev_params(world_data, tmp_path):
    # Dev gold = the person's NAME: the answers the policy learns are exactly what this dev set
    # does not want, so dev span-F1 is best before training and the initial params come back.
    names = []
    for t in world_data["dev_entities"]:
        labels = np.zeros(len(t["input_ids"]), np.int32)
        for (s, e), attr in zip(t["entity_spans"], t["entity_attributes"], strict=True):
            if attr == "name":
                labels[s:e] = 1
        names.append(t | {"answer_labels": labels})
    net = make_net(len(world_data["tok"]))
    init = init_policy_params(net, jax.random.key(1))
    cfg = dataclasses.replace(CFG, steps=200, eval_every=10, patience=3)
    params, history = train_policy(net, init, world_data["train"], names, cfg, tmp_path)
    f1s = [e["span_f1"] for e in history["evals"]]
    assert history["best_step"] == 0 and f1s[0] > 0.2 and max(f1s[1:]) < f1s[0]
    assert history["stopped_early"] and history["last_step"] == 30  # 3 evals without a gain
    assert [e["step"] for e in history["evals"]] == [0, 10, 20, 30]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(init), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_same_seed_same_params_and_span_objective_learns(world_data, tmp_path):
    net = make_net(len(world_data["tok"]))
    init = init_policy_params(net, jax.random.key(2))
    cfg = dataclasses.replace(CFG, steps=40, eval_every=20, objective="span", units="word")

    def run(seed, name):
        return train_policy(
            net, init, world_data["train"], world_data["dev"], cfg, tmp_path / name, seed=seed
        )

    (p1, h1), (p2, _), (p3, _) = run(0, "a"), run(0, "b"), run(1, "c")
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p3), strict=True)
    )
    assert best_span_f1(h1) > h1["evals"][0]["span_f1"] + 0.3
    # The span objective's floor is log(answer length) = log 2: a uniform split over the answer.
    assert h1["evals"][-1]["loss"] < 1.0


def test_policy_params_save_load_round_trip(world_data, trained, tmp_path):
    net, _, params, _ = trained
    save_params(tmp_path / "policy", params)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    loaded = load_params(tmp_path / "policy", target)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    batch = sup.eval_batches(world_data["dev"], L, 8, special=SPECIAL)[0]
    rng = BatchRng(0, 0, batch["example_ids"])
    np.testing.assert_array_equal(
        LearnedScorer(net, loaded)(batch, rng)[0], LearnedScorer(net, params)(batch, rng)[0]
    )


def test_passage_policy_prefers_asked_values_over_names_and_other_values(tmp_path):
    # Whole biographies (world_summary contexts: the answers are the birth city and employer
    # values): every sentence holds the name and most hold another entity value, so only a
    # policy that learned *which* values are asked for can beat salient spans here.
    world = build_world(
        dataclasses.replace(
            WORLD,
            attributes=("birth_city", "employer", "school", "birth_date"),
            distractors=("friend", "visited_city", "club"),
            distractors_per_bio=1,
        )
    )
    tok = world_tokenizer(world)
    task = world_task(world, "world_summary")
    length = 64
    cfg = dataclasses.replace(CFG, steps=100, max_length=length, sentence_level=False)
    examples = {
        s: [example_from_dict(r, f"{s}-{i}") for i, r in enumerate(rows)]
        for s, rows in task.items()
    }
    train = sup.supervised_triples(examples["train"], tok, cfg)
    dev = sup.prepare_triples(sup.supervised_triples(examples["dev"], tok, cfg))
    assert all(len(t["answer_token_spans"]) == 2 for t in dev)  # birth city and employer
    net = make_net(len(tok), max_length=length)
    init = init_policy_params(net, jax.random.key(0))
    params, _ = train_policy(net, init, train, dev, cfg, tmp_path, budget={"mask_rate": 0.1})
    docs = {d["text"]: d["entities"] for d in world.documents}
    gold = tokenize_sentences(
        [{"text": t["text"], "entities": docs[t["text"]]} for t in dev], tok, max_length=length
    )
    dev = [
        t | {"entity_spans": g["entity_spans"], "entity_labels": g["entity_labels"]}
        for t, g in zip(dev, gold, strict=True)
    ]
    batch = sup.eval_batches(dev, length, len(dev), special=SPECIAL)[0]
    entity = np.zeros_like(batch["valid"])
    for i, spans in enumerate(batch["entity_spans"]):
        for s, e in spans[spans[:, 0] >= 0]:
            entity[i, s:e] = True
    answer = batch["labels"] > 0
    share = {}
    for name, sc in scorers(net, params).items():
        masks = [
            mask_batch_np(sc, batch, BatchRng(2, d, batch["example_ids"]), mask_rate=0.1)
            for d in range(4)
        ]
        masked = sum(int(m.sum()) for m in masks)
        share[name] = {
            "answer": sum(int((m & answer).sum()) for m in masks) / masked,
            "other_entity": sum(int((m & entity & ~answer).sum()) for m in masks) / masked,
        }
    # Salient spans spread the budget over every entity (names, dates, schools, clubs, ...).
    assert share["salient"]["answer"] < 0.3 and share["salient"]["other_entity"] > 0.6
    assert share["supervised"]["answer"] > 0.55
    assert share["supervised"]["answer"] > share["salient"]["answer"] + 0.3
    assert share["supervised"]["other_entity"] < share["salient"]["other_entity"] - 0.3
