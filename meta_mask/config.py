"""Typed configuration for every part of meta_mask.

Plain frozen dataclasses: no jax import and no I/O here, so any module (and the tests)
can build a config cheaply. The CLI (train.py) is the only place that turns flags into
these objects; every other module receives them as arguments.

Every field is declared with `option(default, help, choices=...)`: the help is its flag's help,
and the choices (a module constant: the one list of its valid values) are checked both when flags
are parsed and by the dataclass itself (`check_choices`, for configs built in code).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def option(default: Any, help: str, *, choices: tuple | None = None) -> Any:
    """A config field with its one-line help and, optionally, its valid values."""
    metadata = {"help": help} if choices is None else {"help": help, "choices": choices}
    return field(default=default, metadata=metadata)


def check_choices(cfg) -> None:
    """ValueError naming the valid values when a field declared with `choices` (or an item of a
    tuple field) is not one of them."""
    for f in dataclasses.fields(cfg):
        valid = f.metadata.get("choices")
        if valid is None:
            continue
        value = getattr(cfg, f.name)
        bad = [v for v in (value if isinstance(value, tuple) else (value,)) if v not in valid]
        if bad:
            raise ValueError(
                f"{type(cfg).__name__}.{f.name}={value!r}: {bad[0]!r} is not valid; valid: "
                + ", ".join(map(str, valid))
            )


ACTIVATIONS = ("gelu", "gelu_new", "gelu_python", "relu", "silu", "swish", "tanh", "quick_gelu")
DTYPES = ("float32", "bfloat16", "float64")
# ModelConfig fields that say how to compute, not what the architecture is: the only ones that
# apply together with --init (the checkpoint's config.json gives the architecture).
MODEL_COMPUTE_FIELDS = ("dtype", "remat")


@dataclass(frozen=True)
class ModelConfig:
    """The BART architecture. Field names follow `transformers.BartConfig` exactly."""

    vocab_size: int = option(
        50265, "Token embedding rows; 0 (or fewer than the tokenizer has) = the tokenizer's size."
    )
    d_model: int = option(768, "Hidden size of every layer (and of the token embeddings).")
    encoder_layers: int = option(6, "Number of encoder layers.")
    decoder_layers: int = option(6, "Number of decoder layers.")
    encoder_attention_heads: int = option(12, "Attention heads per encoder layer.")
    decoder_attention_heads: int = option(12, "Attention heads per decoder layer.")
    encoder_ffn_dim: int = option(3072, "Inner size of the encoder's feed-forward blocks.")
    decoder_ffn_dim: int = option(3072, "Inner size of the decoder's feed-forward blocks.")
    activation_function: str = option(
        "gelu", "Activation of the feed-forward blocks.", choices=ACTIVATIONS
    )
    max_position_embeddings: int = option(
        1024, "Learned positions: the longest encoder or decoder sequence the model takes."
    )
    scale_embedding: bool = option(False, "Multiply token embeddings by sqrt(d_model).")
    dropout: float = option(0.1, "Dropout on embeddings and residual branches while training.")
    attention_dropout: float = option(0.0, "Dropout on the attention probabilities.")
    activation_dropout: float = option(0.0, "Dropout after the feed-forward activation.")
    init_std: float = option(0.02, "Standard deviation of the random weight initialization.")
    pad_token_id: int = option(1, "Padding token id (must match the tokenizer's).")
    bos_token_id: int = option(0, "Beginning-of-sequence token id (must match the tokenizer's).")
    eos_token_id: int = option(2, "End-of-sequence token id (must match the tokenizer's).")
    decoder_start_token_id: int = option(2, "The token every decoder input starts with.")
    forced_bos_token_id: int | None = option(
        None, "Token forced as the first generated token; none = not forced."
    )
    forced_eos_token_id: int | None = option(
        2, "Token forced when generation reaches its maximum length; none = not forced."
    )
    # Not BartConfig fields: how we compute (MODEL_COMPUTE_FIELDS).
    dtype: str = option(
        "float32",
        "Compute dtype (params stay float32); also applies with --init.",
        choices=DTYPES,
    )
    remat: bool = option(
        False,
        "Rematerialize each layer in the backward pass (less memory, more compute); also "
        "applies with --init.",
    )

    def __post_init__(self) -> None:
        check_choices(self)
        for side in ("encoder", "decoder"):
            heads = getattr(self, f"{side}_attention_heads")
            if self.d_model % heads:
                raise ValueError(
                    f"d_model={self.d_model} is not divisible by {side}_attention_heads={heads}"
                )

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)


def tiny_model_config(vocab_size: int = 128, **kw) -> ModelConfig:
    """A few-thousand-parameter BART for tests and the CPU smoke run."""
    base = dict(
        vocab_size=vocab_size,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        dropout=0.0,
    )
    base.update(kw)
    return ModelConfig(**base)


SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup then constant / linear / cosine decay, and global-norm clipping."""

    learning_rate: float = option(1e-4, "Peak learning rate (reached at the end of warmup).")
    warmup_steps: int = option(0, "Steps of linear warmup from 0 to learning_rate.")
    schedule: str = option("linear", "Learning rate after warmup.", choices=SCHEDULES)
    total_steps: int = option(0, "Step at which the decay ends; 0 = the stage's number of steps.")
    end_lr_fraction: float = option(0.0, "The decay ends at learning_rate * end_lr_fraction.")
    weight_decay: float = option(0.01, "AdamW's decoupled weight decay.")
    b1: float = option(0.9, "Adam's decay rate of the first moment.")
    b2: float = option(0.999, "Adam's decay rate of the second moment.")
    eps: float = option(1e-8, "Adam's epsilon (added to the second moment's square root).")
    clip_norm: float = option(1.0, "Clip gradients to this global norm; <= 0 disables clipping.")
    label_smoothing: float = option(0.0, "Label smoothing of the cross-entropy loss.")

    def __post_init__(self) -> None:
        check_choices(self)


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh: `data` x `fsdp` devices; -1 on `data` takes all remaining devices."""

    data: int = option(-1, "Devices on the data-parallel mesh axis; -1 = all the others.")
    fsdp: int = option(1, "Devices on the FSDP mesh axis (params and optimizer state sharded).")


SALIENT_LABELS = (
    "PERSON",
    "NORP",
    "FAC",
    "ORG",
    "GPE",
    "LOC",
    "PRODUCT",
    "EVENT",
    "WORK_OF_ART",
    "LAW",
    "LANGUAGE",
    "DATE",
    "TIME",
)
HEURISTIC_POLICIES = (
    "none",
    "random_tokens",
    "random_spans",
    "whole_words",
    "salient_spans",
    "pmi",
)
LEARNED_POLICIES = ("supervised", "meta")
# Analysis policies are reported as ceilings, never as baselines: "oracle" masks exactly the
# values the task asks about (the synthetic world's typed gold entities).
ANALYSIS_POLICIES = ("oracle",)
POLICIES = HEURISTIC_POLICIES + LEARNED_POLICIES + ANALYSIS_POLICIES
OUTPUT_FORMATS = ("masked_spans", "full_sentence")
SPAN_DISTRIBUTIONS = ("geometric", "poisson")
SPAN_ATOMS = ("word", "token")
INFILLS = ("span", "token")


@dataclass(frozen=True)
class PolicyConfig:
    """A heuristic masking policy (scorer), its budget and the output format of the examples.

    Budget: `spans_per_sentence > 0` masks that many units (spans, entities, words) per
    sentence; otherwise `mask_rate` of the maskable tokens (see policies/sampler.py).
    """

    name: str = option(
        "random_tokens",
        "Masking policy of the intermediate stage (none = no intermediate stage).",
        choices=POLICIES,
    )
    mask_rate: float = option(
        0.15, "Budget: the fraction of maskable tokens masked (when spans_per_sentence is 0)."
    )
    spans_per_sentence: int = option(
        0,
        "Budget: units (spans, entities, words) masked per sentence; > 0 overrides mask_rate "
        "(REALM salient spans: 1).",
    )
    truncate_last_unit: bool = option(
        False, "Rate budget: cut the last unit to hit the rate exactly."
    )
    # random_spans: span lengths in words (or tokens) drawn as in SpanBERT (geometric p, clipped
    # at span_max_length) or BART (Poisson with mean span_poisson_lambda, lengths >= 1).
    span_distribution: str = option(
        "geometric",
        "random_spans: span lengths as in SpanBERT (geometric) or BART (poisson).",
        choices=SPAN_DISTRIBUTIONS,
    )
    span_geometric_p: float = option(0.2, "random_spans: p of the geometric span length.")
    span_max_length: int = option(
        10, "random_spans: longest geometric span (Poisson is unclipped, as in BART)."
    )
    span_poisson_lambda: float = option(3.0, "random_spans: the mean span length under poisson.")
    span_over: str = option(
        "word", "random_spans: the atom that span lengths count.", choices=SPAN_ATOMS
    )
    salient_labels: tuple[str, ...] = option(
        SALIENT_LABELS, "salient_spans: the named-entity labels that count as salient."
    )
    salient_fill_with_words: bool = option(
        False,
        "salient_spans: when entities run out, whole words fill the budget (else a sentence "
        "without entities gets no mask).",
    )
    pmi_max_n: int = option(5, "pmi: the longest n-gram (in words) considered; the shortest is 2.")
    pmi_min_count: int = option(10, "pmi: n-grams seen fewer times in the corpus are ignored.")
    pmi_top_k: int = option(100_000, "pmi: the number of highest-PMI n-grams masked as units.")
    output_format: str = option(
        "masked_spans",
        "masked_spans (T5: sentinels in, the masked spans out) or full_sentence (BART: the whole "
        "sentence out).",
        choices=OUTPUT_FORMATS,
    )
    infill: str = option(
        "span", "One mask/sentinel per masked span or per masked token.", choices=INFILLS
    )
    replace_80_10_10: bool = option(
        False,
        "full_sentence only: masked units as in BERT, 80% <mask> / 10% random / 10% unchanged.",
    )
    checkpoint: str = option(
        "",
        "Learned policies: the learn_policy/ folder of another run to use instead of learning "
        "one here (e.g. transfer across tasks); '' = learn it.",
    )
    oracle_types: tuple[str, ...] = option(
        (),
        "oracle: the entity types it masks (world attributes, 'name' for the people's names); "
        "empty = the attributes the task asks about.",
    )

    def __post_init__(self) -> None:
        check_choices(self)
        if not 0.0 <= self.mask_rate <= 1.0:
            raise ValueError(f"PolicyConfig.mask_rate={self.mask_rate!r} must lie in [0, 1]")
        if self.spans_per_sentence < 0:
            raise ValueError(f"PolicyConfig.spans_per_sentence={self.spans_per_sentence} < 0")
        if not 0.0 < self.span_geometric_p <= 1.0 or self.span_max_length < 1:
            raise ValueError(
                "PolicyConfig.span_geometric_p must lie in (0, 1] and span_max_length >= 1; got "
                f"{self.span_geometric_p!r}, {self.span_max_length!r}"
            )
        if self.replace_80_10_10 and self.output_format != "full_sentence":
            raise ValueError(
                "PolicyConfig.replace_80_10_10 applies to output_format='full_sentence' only "
                f"(got {self.output_format!r}): with masked_spans the target is the masked text"
            )

    def budget(self) -> dict:
        """Keyword arguments for the sampler: {"num_units": k} or {"mask_rate": r, ...}."""
        if self.spans_per_sentence > 0:
            return {"num_units": self.spans_per_sentence}
        return {"mask_rate": self.mask_rate, "truncate_last_unit": self.truncate_last_unit}


WORLD_UNITS = ("sentence", "passage")


@dataclass(frozen=True)
class WorldConfig:
    """The synthetic knowledge world (meta_mask/data/world.py): its size knobs and seed.

    `attributes` appear in every biography and are what the QA variants ask about;
    `distractors` are entity attributes no question ever asks (each biography states
    `distractors_per_bio` of them). The word-pool sizes bound the vocabulary.
    """

    seed: int = option(0, "Seed of the world (people, facts, templates); not the run's seed.")
    # 200 people with 1 distractor per bio: salient-span masking stores the facts in ~2-3k
    # steps of a d_model-128 BART (held-out world_qa EM ~0.4; none: 0). 300 people with 2
    # distractors took far longer (EM 0 after 1.5k steps).
    num_people: int = option(
        200, "People in the world: the generic population, then train / dev / test people."
    )
    generic_people: int = option(
        0,
        "People of a generic population: never in the task's corpus and never asked by its "
        "tasks. The generic stage (the world's stand-in for pre-trained BART) learns their "
        "biographies; the meta-learned policy's LM is QA-fine-tuned on their questions.",
    )
    corpus_unit: str = option(
        "sentence",
        "What one corpus row (and one masking budget) is: a biography sentence, or a whole "
        "biography (passage), where a policy chooses which facts to mask.",
        choices=WORLD_UNITS,
    )
    num_bios: int = option(4, "Paraphrased biographies per person.")
    templates_per_attribute: int = option(3, "Bio sentence templates used per attribute (max 4).")
    question_templates: int = option(2, "Question templates used per asked attribute (max 3).")
    attributes: tuple[str, ...] = option(
        ("birth_city", "employer", "birth_date", "school", "spouse", "hobby"),
        "Attributes every biography states; the QA variants ask about them.",
    )
    distractors: tuple[str, ...] = option(
        ("friend", "visited_city", "club", "move_date"),
        "Entity attributes that biographies state but no question asks.",
    )
    distractors_per_bio: int = option(1, "Distractor attributes stated in each biography.")
    summary_attributes: tuple[str, ...] = option(
        ("birth_city", "employer"), "Attributes the one-line summaries (world_summary) state."
    )
    unique_values: bool = option(
        True,
        "Every value of an attribute belongs to one person only, so no test answer is a train "
        "answer (closed-book QA cannot be solved from the answer prior).",
    )
    split_fractions: tuple[float, float, float] = option(
        (0.5, 0.1, 0.4), "Fractions of the (non-generic) people in train / dev / test."
    )
    first_names: int = option(80, "Pool size of first names.")
    last_names: int = option(80, "Pool size of last names.")
    place_words: int = option(60, "Pool size of words that make place names.")
    org_words: int = option(80, "Pool size of words that make organization names.")
    common_words: int = option(50, "Pool size of common words (hobbies and the like).")

    def __post_init__(self) -> None:
        check_choices(self)
        for name in (
            "num_people",
            "num_bios",
            "templates_per_attribute",
            "question_templates",
            "first_names",
            "last_names",
            "place_words",
            "org_words",
            "common_words",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"WorldConfig.{name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.distractors_per_bio <= len(self.distractors):
            raise ValueError(
                f"WorldConfig.distractors_per_bio={self.distractors_per_bio} must lie in "
                f"[0, len(distractors)={len(self.distractors)}]"
            )
        if not 0 <= self.generic_people < self.num_people:
            raise ValueError(
                f"WorldConfig.generic_people={self.generic_people} must lie in "
                f"[0, num_people={self.num_people})"
            )
        fr = self.split_fractions
        if len(fr) != 3 or min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
            raise ValueError(
                f"WorldConfig.split_fractions={fr} must be three non-negative fractions "
                "(train, dev, test) summing to 1"
            )


@dataclass(frozen=True)
class DataConfig:
    """Which task and corpus, and the fixed sequence lengths every jitted step is compiled for."""

    task: str = option("world_qa", "The downstream task: a name from data/tasks.py.")
    data_dir: str = option("", "Local copies of the task's files (offline); '' = the hub.")
    corpus: str = option(
        "world",
        "Intermediate corpus: world | wikipedia[:CONFIG] | task (the task's own inputs) | a "
        ".txt/.jsonl/.parquet path.",
    )
    tokenizer: str = option(
        "", "HF tokenizer dir or hub id; '' = the --init checkpoint's, or the world's own."
    )
    max_corpus_sentences: int = option(0, "Cap on corpus sentences read; 0 = all.")
    mlm_length: int = option(32, "Encoder length of intermediate (MLM) examples, in tokens.")
    mlm_target_length: int = option(16, "Decoder length of intermediate (MLM) targets, in tokens.")
    source_length: int = option(32, "Encoder length of downstream examples, in tokens.")
    target_length: int = option(16, "Decoder length of downstream targets, in tokens.")
    max_train_examples: int = option(0, "Cap on downstream training examples; 0 = all.")


@dataclass(frozen=True)
class StageConfig:
    """One training stage (intermediate pre-training or fine-tuning)."""

    steps: int = option(1000, "Optimizer steps of the stage.")
    batch_size: int = option(64, "Examples per step (global, over all devices).")
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint_every: int = option(200, "Save a resumable checkpoint every this many steps.")
    log_every: int = option(25, "Log the training metrics every this many steps.")
    eval_every: int = option(
        0,
        "Fine-tuning: score the task's dev split (by generation, the task's metric) every this "
        "many steps and keep the best step; 0 = no dev evaluation, keep the last step.",
    )
    patience: int = option(
        0, "Dev evaluations without a gain before the stage stops early; 0 = never stop early."
    )

    def __post_init__(self) -> None:
        for name in ("batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"StageConfig.{name}={getattr(self, name)} must be >= 1")
        for name in ("steps", "eval_every", "patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"StageConfig.{name}={getattr(self, name)} must be >= 0")
        decay_steps = self.optim.total_steps or self.steps
        if self.steps and self.optim.warmup_steps > decay_steps:
            raise ValueError(
                f"optim.warmup_steps={self.optim.warmup_steps} exceeds the schedule's "
                f"{decay_steps} steps (optim.total_steps, 0 = the stage's steps={self.steps})"
            )


@dataclass(frozen=True)
class GenericConfig:
    """The generic stage: MLM on the synthetic world's generic population (WorldConfig.
    generic_people), the world's stand-in for a pre-trained BART (with --init, the loaded
    checkpoint plays that part and this stage does not run). Every run of a seed starts its
    intermediate stage (or, for policy "none", its fine-tuning) from it; it is trained once per
    seed and shared by every policy's run of a sweep. `qa` then fine-tunes it on the generic
    population's questions: the LM the meta-learned policy is learned against (it answers
    questions, but knows nothing of the task's people)."""

    train: StageConfig = field(default_factory=lambda: StageConfig(steps=0, batch_size=16))
    policy: PolicyConfig = field(
        default_factory=lambda: PolicyConfig(name="salient_spans", mask_rate=0.3)
    )
    qa: StageConfig = field(default_factory=lambda: StageConfig(steps=0, batch_size=32))
    qa_every: int = option(
        0,
        "Mixed training: every this many generic-stage steps, one step is on the generic "
        "population's questions (a QA batch of generic.train.batch_size, padded to the MLM "
        "batch's shape) instead of their biographies; 0 = MLM only.",
    )
    intermediate_qa_every: int = option(
        0,
        "Mixed intermediate stage: every this many intermediate steps, one step is on the "
        "generic population's questions (intermediate.batch_size rows) instead of the task's "
        "corpus, the same steps for every policy; 0 = MLM only.",
    )

    intermediate_replay_every: int = option(
        0,
        "Replay: every this many intermediate steps, one step is MLM on the generic "
        "population's biographies, masked as the generic stage masks them (generic.policy), "
        "the same steps for every policy; 0 = none.",
    )

    def __post_init__(self) -> None:
        for name in ("qa_every", "intermediate_qa_every", "intermediate_replay_every"):
            every = getattr(self, name)
            if every < 0 or every == 1:
                raise ValueError(
                    f"GenericConfig.{name}={every}: 0 (MLM only) or >= 2 (one QA step in every "
                    f"{name} steps)"
                )


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation by generation on a split, scored with the task's metric."""

    split: str = option("test", "The task split evaluated (one the task has).")
    num_beams: int = option(1, "Beam size of generation; 1 = greedy.")
    length_penalty: float = option(1.0, "Beam search's length penalty (> 1 favours longer).")
    min_length: int = option(
        0, "Generated tokens before EOS is allowed (counting the start token)."
    )
    batch_size: int = option(128, "Examples per generation batch.")
    max_examples: int = option(0, "Cap on evaluated examples; 0 = all.")
    num_samples: int = option(20, "Sample predictions written to the workdir.")


META_ESTIMATORS = ("second_order", "first_order")
META_SELECTIONS = ("dev_objective", "last")
INNER_OPTIMIZERS = ("sgd", "adam")
POLICY_UNITS = ("token", "word", "entity")


@dataclass(frozen=True)
class MetaConfig:
    """The meta-learned masking policy: its scorer network (policies/net.py) and the
    meta-learning of its parameters phi against a downstream loss (policies/meta.py).

    Inner loop: `inner_steps` (K) differentiable updates of the LM on the task's contexts,
    masked by the policy at `mask_rate` and corrupted exactly as the intermediate stage
    corrupts its corpus, with `inner_optimizer` at `inner_learning_rate` (`downstream_steps`
    = N adds N QA steps on other training questions). Outer: the loss of the contexts' own
    questions under the updated LM, minus (`contrastive`) that of questions about other
    contexts; the policy's Adam at `learning_rate` descends its `estimator` gradient
    (second_order: exact, through the unroll; first_order: the alignment of the MLM gradient
    with the downstream gradient, for models too large to unroll). The policy kept is the one
    with the best dev meta-objective (the same loss on the dev split's contexts and questions).
    """

    inner_steps: int = option(1, "K: differentiable LM updates on policy-masked MLM batches.")
    inner_repeat: bool = option(
        False,
        "The K inner steps train on the same contexts, each step with its own mask draw (a "
        "lookahead over repeated exposure, as the intermediate stage revisits every passage); "
        "False: K different batches of contexts, the first batch's questions scored.",
    )
    inner_learning_rate: float = option(1e-2, "Learning rate of the inner LM updates.")
    inner_optimizer: str = option(
        "sgd", "Optimizer of the inner LM updates.", choices=INNER_OPTIMIZERS
    )
    inner_frozen: tuple[str, ...] = option(
        (),
        "Top-level LM parameter groups the unrolled updates leave unchanged, e.g. 'shared' (the "
        "token embedding, tied to the output layer); the first-order estimator's alignment "
        "then leaves them out too. Empty = every parameter is updated, as in the intermediate "
        "stage.",
    )
    estimator: str = option(
        "second_order",
        "Policy gradient: second_order (exact, through the unroll) or first_order (MLM and "
        "downstream gradient alignment, for models too large to unroll).",
        choices=META_ESTIMATORS,
    )
    learning_rate: float = option(1e-3, "Learning rate of the policy's own (outer) Adam.")
    clip_norm: float = option(1.0, "Policy gradient global-norm clip; <= 0 disables.")
    entropy_weight: float = option(
        0.01, "Reward for the entropy of the policy's per-sentence softmax."
    )
    clip_weights: bool = option(
        True,
        "Credit a masked unit through log min(1, T * its probability): no credit past "
        "'always masked' (else log q: the policy can collapse onto one unit per sentence).",
    )
    mask_credit: float = option(
        0.0,
        "alpha in [0, 1]: each masked token's credit = (1 - alpha) * its own loss's effect on the "
        "downstream objective + alpha * the mean effect of its context's masked tokens. 0: "
        "per-token credit (the exact gradient); 1: the score-function estimator of the whole "
        "mask, which also credits a token with its effect on the other masked tokens' predictions.",
    )
    select: str = option(
        "dev_objective",
        "Which meta step's policy is kept: the best dev meta-objective (the outer loss on the dev "
        "split's contexts and questions), or the last step. Never gold answer spans: those are "
        "reported as a diagnostic only.",
        choices=META_SELECTIONS,
    )
    contrastive: bool = option(
        True,
        "Outer loss = the contexts' own questions' loss minus other contexts' questions' loss "
        "(cancels what an MLM step does for every question alike).",
    )
    budget_weight: float = option(
        1.0, "Penalty weight of (mean clipped probability - target rate)^2."
    )
    mask_rate: float = option(
        0.0,
        "The exploration rate: the sampler's mask rate during meta-learning (masking more than "
        "the deployment budget shows the policy more units per step); 0 = the intermediate "
        "stage's --policy.mask_rate. Deployment always uses the policy's own budget.",
    )
    meta_steps: int = option(1000, "Outer (policy) updates.")
    inner_batch_size: int = option(8, "Contexts (sentences or passages) per inner MLM step.")
    # Gradient accumulation, one optimizer update: same result, memory ~ one microbatch.
    inner_microbatches: int = option(
        1, "Microbatches per inner step whose gradients are summed (must divide the batch)."
    )
    outer_batch_size: int = option(8, "Downstream examples per outer loss.")
    remat: bool = option(
        True, "Recompute each inner step in the backward pass (memory ~ one step, not K)."
    )
    # Nested checkpointing: about (K - 1) / S + S copies of theta live instead of K, for one more
    # forward pass of every inner step; sqrt(K) minimizes the copies.
    remat_segment: int = option(
        0,
        "With remat: keep theta only every this many inner steps, recomputing the steps "
        "between in the backward pass (~sqrt(K) for the least memory); 0 = off.",
    )
    downstream_steps: int = option(
        0,
        "N > 0: after the MLM steps, N steps on other training questions, each on its own batch "
        "(the in-loop QA step of the paper's figure, N = 1: the LM learns to answer before its "
        "questions are scored); 0: none.",
    )
    # The LM theta the inner loop starts from is the caller's, fixed for all meta steps
    # (policies/meta_train.py uses the run's initial LM).
    # The policy network (PolicyNet): a small transformer encoder -> one logit per token.
    policy_layers: int = option(2, "Policy network: transformer encoder layers.")
    policy_d_model: int = option(128, "Policy network: hidden size.")
    policy_heads: int = option(4, "Policy network: attention heads.")
    policy_ffn_dim: int = option(512, "Policy network: feed-forward inner size.")
    policy_max_length: int = option(1024, "Policy network: learned positions (longest input).")
    policy_units: str = option(
        "token",
        "Policy network: one logit per token, per word, or per entity (gold entity spans on the "
        "world, NER spans on real text; other words alone), logits mean-pooled over a unit.",
        choices=POLICY_UNITS,
    )
    policy_repeat_buckets: int = option(
        0,
        "Policy network: > 0 adds a learned vector for how often each token recurs in its "
        "context (0, 1, ..., buckets - 1 other occurrences), so the net can tell the entity a "
        "passage is about from one-off mentions; 0: none.",
    )
    use_lm_embeddings: bool = option(
        True, "Policy network: initialize its token table from the LM's shared embedding."
    )
    freeze_embeddings: bool = option(
        True, "Policy network: keep the token table fixed (needs use_lm_embeddings)."
    )

    def __post_init__(self) -> None:
        check_choices(self)
        for name in (
            "inner_steps",
            "meta_steps",
            "inner_batch_size",
            "outer_batch_size",
            "inner_microbatches",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"MetaConfig.{name}={getattr(self, name)} must be >= 1")
        if self.inner_batch_size % self.inner_microbatches:
            raise ValueError(
                f"MetaConfig.inner_microbatches={self.inner_microbatches} must divide "
                f"inner_batch_size={self.inner_batch_size}"
            )
        if not 0.0 <= self.mask_rate <= 1.0:
            raise ValueError(f"MetaConfig.mask_rate={self.mask_rate!r} must lie in [0, 1]")
        if not 0.0 <= self.mask_credit <= 1.0:
            raise ValueError(f"MetaConfig.mask_credit={self.mask_credit!r} must lie in [0, 1]")
        for name in ("remat_segment", "downstream_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"MetaConfig.{name}={getattr(self, name)} must be >= 0")
        if self.policy_repeat_buckets < 0:
            raise ValueError(
                f"MetaConfig.policy_repeat_buckets={self.policy_repeat_buckets} must be >= 0"
            )
        if self.remat_segment and not self.remat:
            raise ValueError(
                f"MetaConfig.remat_segment={self.remat_segment} needs remat=True (it nests the "
                "per-step recomputation)"
            )
        if self.policy_d_model % self.policy_heads:
            raise ValueError(
                f"MetaConfig.policy_d_model={self.policy_d_model} is not divisible by "
                f"policy_heads={self.policy_heads}"
            )
        if self.freeze_embeddings and not self.use_lm_embeddings:
            raise ValueError(
                "MetaConfig.freeze_embeddings=True needs use_lm_embeddings=True (a frozen "
                "random table would never learn)"
            )


SUPERVISED_OBJECTIVES = ("token", "span")
SUPERVISED_TARGETS = ("answers", "answers_and_question_entities")
SAMPLE_SCORES = ("logits", "log_probability")


@dataclass(frozen=True)
class SupervisedConfig:
    """The supervised masking policy (policies/supervised.py): a PolicyNet trained to score the
    answer tokens of (context sentence, answer) triples highest.

    objective: "token" = per-token binary cross-entropy on maskable tokens, answers weighted by
    `pos_weight` (<= 0: n_negative / n_positive of the training triples); "span" = softmax over
    the sentence's maskable tokens with the answer tokens as the (uniform) target, the
    distribution the shared sampler draws from. Dev span-F1 is measured every `eval_every` steps
    under the intermediate stage's budget (PolicyConfig.budget()); training stops after
    `patience` evaluations without improvement and the best-dev parameters are kept.
    """

    steps: int = option(2000, "Training steps (at most: early stopping may end sooner).")
    batch_size: int = option(64, "Sentences per training step.")
    learning_rate: float = option(1e-3, "Learning rate of the policy network's Adam.")
    clip_norm: float = option(1.0, "Global-norm gradient clip; <= 0 disables.")
    max_length: int = option(
        64, "Tokens per sentence (the fixed batch length; longer ones are cut)."
    )
    objective: str = option(
        "token",
        "token: per-token binary cross-entropy; span: softmax over the sentence's maskable "
        "tokens with the answer tokens as target.",
        choices=SUPERVISED_OBJECTIVES,
    )
    pos_weight: float = option(
        0.0, "token objective: weight of answer tokens; <= 0 = n_negative / n_positive."
    )
    units: str = option(
        "token",
        "One logit per token, per word, or per entity (entity spans; other words alone), logits "
        "mean-pooled over a unit, as LearnedScorer pools them.",
        choices=POLICY_UNITS,
    )
    eval_every: int = option(100, "Measure dev span-F1 every this many steps.")
    eval_batch_size: int = option(256, "Sentences per dev evaluation batch.")
    patience: int = option(
        5, "Evaluations without a dev span-F1 gain before stopping; 0 = never stop early."
    )
    sentence_level: bool = option(
        True, "Cut contexts into answer sentences; False: train on whole passages."
    )
    max_triples: int = option(0, "Cap on training triples (a seeded subset); 0 = all.")
    max_dev_triples: int = option(2000, "Cap on dev triples; 0 = all.")
    targets: str = option(
        "answers",
        "What the policy learns to mask: answers = the answer spans (the paper); "
        "answers_and_question_entities = also the context's entities named in the question "
        "(e.g. the person asked about).",
        choices=SUPERVISED_TARGETS,
    )
    balance_targets: bool = option(
        False,
        "span objective with answers_and_question_entities: half of each example's target "
        "distribution on the answer tokens, half on the question's entities (else uniform over "
        "all target tokens, so an entity mentioned seven times outweighs the answer).",
    )
    merge_contexts: bool = option(
        False,
        "One training example per context text, labelled with the targets of every question "
        "about it (else one per question: a context asked two questions labels each answer in "
        "one example and counts it as a negative in the other).",
    )

    sample_scores: str = option(
        "logits",
        "What the sampler ranks the policy's units by. logits: a unit is drawn in proportion "
        "to exp(logit) (the span objective's softmax; for the token objective, the odds of "
        "being a target, so the surest targets crowd out the rest); log_probability: in "
        "proportion to sigmoid(logit), the token objective's probability of being a target "
        "(every unit the policy is sure of is equally likely, as the oracle masks them).",
        choices=SAMPLE_SCORES,
    )

    def __post_init__(self) -> None:
        check_choices(self)
        for name in ("steps", "batch_size", "max_length", "eval_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"SupervisedConfig.{name}={getattr(self, name)} must be >= 1")
        for name in ("patience", "max_triples", "max_dev_triples"):
            if getattr(self, name) < 0:
                raise ValueError(f"SupervisedConfig.{name}={getattr(self, name)} must be >= 0")
        if self.balance_targets and (
            self.objective != "span" or self.targets != "answers_and_question_entities"
        ):
            raise ValueError(
                "SupervisedConfig.balance_targets needs objective='span' and "
                "targets='answers_and_question_entities' (it splits the span objective's target "
                "distribution between the answers and the question's entities)"
            )
        if self.sample_scores == "log_probability" and self.objective != "token":
            raise ValueError(
                "SupervisedConfig.sample_scores='log_probability' needs objective='token' (only "
                "the per-token objective's sigmoid is a probability of being a target)"
            )


STAGES = ("generic", "learn_policy", "intermediate", "finetune", "evaluate")


@dataclass(frozen=True)
class Config:
    """Everything one run needs; the CLI builds it from flags, every module reads only its part."""

    model: ModelConfig = field(default_factory=ModelConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generic: GenericConfig = field(default_factory=GenericConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    intermediate: StageConfig = field(default_factory=StageConfig)
    finetune: StageConfig = field(default_factory=StageConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    supervised: SupervisedConfig = field(default_factory=SupervisedConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    init: str = option(
        "",
        "A Hugging Face BART (local dir or hub id) to start from; its config.json gives the "
        "architecture, so no --model.* flag may be set with it except "
        + ", ".join(f"--model.{n}" for n in MODEL_COMPUTE_FIELDS)
        + ". '' = random init from --model.*.",
    )
    stages: tuple[str, ...] = option(
        STAGES, "The stages this command runs (finished ones are skipped).", choices=STAGES
    )
    seed: int = option(0, "The run's seed: model init, data order, masks and policy learning.")

    def __post_init__(self) -> None:
        check_choices(self)
        if self.generic.train.steps and (self.init or not self.world.generic_people):
            raise ValueError(
                "generic.train.steps > 0 trains the generic stage on the world's generic "
                "population: it needs --world.generic_people > 0 and no --init (a loaded "
                "checkpoint is the generic LM)"
            )
        if self.generic.train.eval_every or self.generic.qa.eval_every:
            raise ValueError("generic.*.eval_every: the generic stages train their steps")
        g = self.generic
        mixed = g.qa_every or g.intermediate_qa_every or g.intermediate_replay_every
        if mixed and (self.data.corpus != "world" or not self.world.generic_people):
            raise ValueError(
                "generic.qa_every / generic.intermediate_qa_every / "
                "generic.intermediate_replay_every mix in the synthetic world's generic "
                "population's questions or biographies: they need --data.corpus=world and "
                "--world.generic_people > 0"
            )
        if self.intermediate.eval_every or self.intermediate.patience:
            raise ValueError(
                "intermediate.eval_every / intermediate.patience: dev selection applies to "
                "fine-tuning only (the intermediate stage trains its steps)"
            )


@dataclass(frozen=True)
class SweepConfig:
    """A grid of runs (meta_mask/sweep.py): one Config per (task, policy, seed) cell.

    Not part of Config: a run's config (and its config.json) is the cell's, whatever grid it
    belongs to. An empty axis keeps the base config's value; a grid with no axes is one run.
    """

    policies: tuple[str, ...] = option(
        (), "One run per policy (overrides policy.name).", choices=POLICIES
    )
    seeds: tuple[int, ...] = option((), "One run per seed (overrides seed).")
    tasks: tuple[str, ...] = option((), "One run per task (overrides data.task).")
    transfer: bool = option(
        False,
        "With a learned policy and several tasks: also run every task with the policy learned "
        "on every other task, and print the transfer matrix.",
    )
    print_commands: bool = option(
        False, "Print one command per run (for a cluster scheduler) and exit."
    )
    aggregate_only: bool = option(
        False, "Only aggregate the finished runs below the workdir into one table."
    )
    reference: str = option(
        "salient_spans",
        "The policy that sweep tables report paired differences against.",
        choices=POLICIES,
    )
    workers: int = option(
        1,
        "Run up to this many of the grid's runs at once, each in its own process with its log "
        "in <workdir>/logs (the same commands as --sweep.print_commands, so the same results). "
        "On a CPU host 2 uses the cores one run leaves idle; on one accelerator keep 1.",
    )

    def __post_init__(self) -> None:
        check_choices(self)
        if self.workers < 1:
            raise ValueError(f"SweepConfig.workers={self.workers}: must be >= 1")

    def is_single(self) -> bool:
        return not (self.policies or self.seeds or self.tasks)


def to_dict(cfg) -> dict:
    """A nested plain dict of a config (for JSON)."""
    return dataclasses.asdict(cfg)


def from_dict(cls, values: dict, *, where: str = ""):
    """Build dataclass `cls` from a nested dict, rejecting unknown keys by name."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {[where + k for k in unknown]}; valid: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in values.items():
        default = (
            fields[name].default_factory()
            if callable(fields[name].default_factory)
            else fields[name].default
        )
        if dataclasses.is_dataclass(default):
            value = from_dict(type(default), value, where=f"{where}{name}.")
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)
