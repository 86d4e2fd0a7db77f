"""Typed configuration for every part of meta_mask.

Plain frozen dataclasses: no jax import and no I/O here, so any module (and the tests)
can build a config cheaply. The CLI (train.py) is the only place that turns flags into
these objects; every other module receives them as arguments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ACTIVATIONS = ("gelu", "gelu_new", "gelu_python", "relu", "silu", "swish", "tanh", "quick_gelu")


@dataclass(frozen=True)
class ModelConfig:
    """The BART architecture. Field names follow `transformers.BartConfig` exactly."""

    vocab_size: int = 50265
    d_model: int = 768
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 12
    decoder_attention_heads: int = 12
    encoder_ffn_dim: int = 3072
    decoder_ffn_dim: int = 3072
    activation_function: str = "gelu"
    max_position_embeddings: int = 1024
    scale_embedding: bool = False
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    init_std: float = 0.02
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    decoder_start_token_id: int = 2
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = 2
    # Not BartConfig fields: how we compute.
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    remat: bool = False  # rematerialize each layer in the backward pass

    def __post_init__(self) -> None:
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"activation_function={self.activation_function!r}; valid: {ACTIVATIONS}"
            )
        if self.dtype not in ("float32", "bfloat16", "float64"):
            raise ValueError(f"dtype={self.dtype!r}; valid: float32, bfloat16, float64")
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


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup then constant / linear / cosine decay, and global-norm clipping."""

    learning_rate: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "linear"  # constant | linear | cosine
    total_steps: int = 0  # where the decay ends; 0 = the stage's number of steps
    end_lr_fraction: float = 0.0  # decay ends at learning_rate * end_lr_fraction
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0  # <= 0 disables clipping
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"schedule={self.schedule!r}; valid: constant, linear, cosine")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh: `data` x `fsdp` devices; -1 on `data` takes all remaining devices."""

    data: int = -1
    fsdp: int = 1


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
POLICIES = HEURISTIC_POLICIES + LEARNED_POLICIES
OUTPUT_FORMATS = ("masked_spans", "full_sentence")


@dataclass(frozen=True)
class PolicyConfig:
    """A heuristic masking policy (scorer), its budget and the output format of the examples.

    Budget: `spans_per_sentence > 0` masks that many units (spans, entities, words) per
    sentence; otherwise `mask_rate` of the maskable tokens (see policies/sampler.py).
    """

    name: str = "random_tokens"  # one of POLICIES
    mask_rate: float = 0.15
    spans_per_sentence: int = 0  # > 0 overrides mask_rate (REALM salient spans: 1)
    truncate_last_unit: bool = False  # rate budget: cut the last unit to hit the rate exactly
    # random_spans: span lengths in words (or tokens) drawn as in SpanBERT (geometric p, clipped
    # at span_max_length) or BART (Poisson with mean span_poisson_lambda, lengths >= 1).
    span_distribution: str = "geometric"  # geometric | poisson
    span_geometric_p: float = 0.2
    span_max_length: int = 10  # geometric only; Poisson is unclipped as in BART
    span_poisson_lambda: float = 3.0  # the mean span length under Poisson
    span_over: str = "word"  # word | token: the atom that span lengths count
    # salient_spans: which entity labels count; fill_with_words: when entities run out, whole
    # words fill the budget (else a sentence without entities gets no mask).
    salient_labels: tuple[str, ...] = SALIENT_LABELS
    salient_fill_with_words: bool = False
    # pmi: n-grams (2..pmi_max_n words) seen >= pmi_min_count times; the pmi_top_k highest-PMI ones
    # become units masked whole.
    pmi_max_n: int = 5
    pmi_min_count: int = 10
    pmi_top_k: int = 100_000
    # Output format: masked_spans (T5: sentinels in, spans out) | full_sentence (BART: the whole
    # sentence out). infill: one mask/sentinel per masked span ("span") or per token ("token").
    output_format: str = "masked_spans"
    infill: str = "span"
    replace_80_10_10: bool = False  # BERT: masked units 80% <mask> / 10% random / 10% unchanged
    # Learned policies: a policy learned by another run (its learn_policy/ folder) to use
    # instead of learning one here, e.g. a policy learned on task A for task B (transfer).
    checkpoint: str = ""

    def __post_init__(self) -> None:
        choices = {
            "name": POLICIES,
            "output_format": OUTPUT_FORMATS,
            "span_distribution": ("geometric", "poisson"),
            "span_over": ("word", "token"),
            "infill": ("span", "token"),
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"PolicyConfig.{name}={getattr(self, name)!r}; valid: {valid}")
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


@dataclass(frozen=True)
class WorldConfig:
    """The synthetic knowledge world (meta_mask/data/world.py): its size knobs and seed.

    `attributes` appear in every biography and are what the QA variants ask about;
    `distractors` are entity attributes no question ever asks (each biography states
    `distractors_per_bio` of them). The word-pool sizes bound the vocabulary.
    """

    seed: int = 0
    # 200 people with 1 distractor per bio: salient-span masking stores the facts in ~2-3k
    # steps of a d_model-128 BART (held-out world_qa EM ~0.4; none: 0). 300 people with 2
    # distractors took far longer (EM 0 after 1.5k steps).
    num_people: int = 200
    num_bios: int = 4  # paraphrased biographies per person
    templates_per_attribute: int = 3  # bio sentence templates used per attribute (max 4)
    question_templates: int = 2  # question templates used per asked attribute (max 3)
    attributes: tuple[str, ...] = (
        "birth_city",
        "employer",
        "birth_date",
        "school",
        "spouse",
        "hobby",
    )
    distractors: tuple[str, ...] = ("friend", "visited_city", "club", "move_date")
    distractors_per_bio: int = 1
    summary_attributes: tuple[str, ...] = ("birth_city", "employer")
    # True: every value of an attribute belongs to one person only, so no test answer is
    # ever a train answer (closed-book QA cannot be solved from the answer prior).
    unique_values: bool = True
    split_fractions: tuple[float, float, float] = (0.5, 0.1, 0.4)  # train / dev / test people
    first_names: int = 80
    last_names: int = 80
    place_words: int = 60
    org_words: int = 80
    common_words: int = 50

    def __post_init__(self) -> None:
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
        fr = self.split_fractions
        if len(fr) != 3 or min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
            raise ValueError(
                f"WorldConfig.split_fractions={fr} must be three non-negative fractions "
                "(train, dev, test) summing to 1"
            )


@dataclass(frozen=True)
class DataConfig:
    """Which task and corpus, and the fixed sequence lengths every jitted step is compiled for."""

    task: str = "world_qa"  # a name from data/tasks.py (world tasks: world_qa, ...)
    data_dir: str = ""  # local copies of the task's files (offline); "" = the hub
    corpus: str = "world"  # world | wikipedia | task | a .txt/.jsonl path
    tokenizer: str = ""  # HF dir or hub id; "" = the init checkpoint's, or the world's own
    max_corpus_sentences: int = 0  # 0 = all
    mlm_length: int = 32  # encoder length of intermediate (MLM) examples, in tokens
    mlm_target_length: int = 16  # decoder length of masked_spans targets
    source_length: int = 32  # downstream encoder length
    target_length: int = 16  # downstream decoder length
    max_train_examples: int = 0  # 0 = all


@dataclass(frozen=True)
class StageConfig:
    """One training stage (intermediate pre-training or fine-tuning)."""

    steps: int = 1000
    batch_size: int = 64
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint_every: int = 200
    log_every: int = 25


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation by generation on a split, scored with the task's metric."""

    split: str = "test"
    num_beams: int = 1
    length_penalty: float = 1.0
    min_length: int = 0  # generated tokens before EOS is allowed (counting the start token)
    batch_size: int = 128
    max_examples: int = 0  # 0 = all
    num_samples: int = 20  # sample predictions written to the workdir


@dataclass(frozen=True)
class MetaConfig:
    """The meta-learned masking policy: its scorer network (policies/net.py) and the
    meta-learning of its parameters phi against a downstream loss (policies/meta.py).

    Inner loop: `inner_steps` (K) differentiable updates of the LM on policy-masked MLM batches
    with `inner_optimizer` at `inner_learning_rate` (then `downstream_steps` = 1 adds an MLM
    step on the downstream example's context and a step on its question/answer). Outer: the
    downstream loss of the updated LM; the policy's Adam at `learning_rate` descends its
    `estimator` gradient (second_order: exact, through the unroll; first_order: the alignment of
    the MLM gradient with the downstream gradient, for models too large to unroll).
    """

    inner_steps: int = 1  # K
    inner_learning_rate: float = 1e-2
    inner_optimizer: str = "sgd"  # one of INNER_OPTIMIZERS
    estimator: str = "second_order"  # one of META_ESTIMATORS
    learning_rate: float = 1e-3  # the policy's own (outer) Adam
    clip_norm: float = 1.0  # policy gradient global-norm clip; <= 0 disables
    entropy_weight: float = 0.01  # reward for the entropy of the policy's per-sentence softmax
    budget_weight: float = 1.0  # penalty (mean clipped probability - target rate)^2
    # The sampler's mask rate during meta-learning; 0 = the intermediate stage's
    # (--policy.mask_rate). Deployment always uses the policy's budget.
    mask_rate: float = 0.0
    meta_steps: int = 1000
    inner_batch_size: int = 8  # sentences per inner MLM step
    # Each inner step's batch is split into this many microbatches whose gradients are summed
    # (gradient accumulation, one optimizer update): same result, memory ~ one microbatch.
    inner_microbatches: int = 1
    outer_batch_size: int = 8  # downstream examples per outer loss
    remat: bool = True  # jax.checkpoint each inner step (memory ~ one step, not K)
    downstream_steps: int = 0  # 0 | 1: after the MLM steps, MLM on the context then QA step
    # The LM theta the inner loop starts from is the caller's, fixed for all meta steps
    # (policies/meta_train.py uses the run's initial LM).
    # The policy network (PolicyNet): a small transformer encoder -> one logit per token.
    policy_layers: int = 2
    policy_d_model: int = 128
    policy_heads: int = 4
    policy_ffn_dim: int = 512
    policy_max_length: int = 1024
    policy_units: str = "token"  # token | word (logits mean-pooled over each word)
    use_lm_embeddings: bool = True  # initialize the token table from the LM's shared embedding
    freeze_embeddings: bool = True  # ... and keep it fixed (no gradient)

    def __post_init__(self) -> None:
        choices = {
            "estimator": META_ESTIMATORS,
            "inner_optimizer": INNER_OPTIMIZERS,
            "policy_units": POLICY_UNITS,
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"MetaConfig.{name}={getattr(self, name)!r}; valid: {valid}")
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
        if self.downstream_steps not in (0, 1):
            raise ValueError(f"MetaConfig.downstream_steps={self.downstream_steps}; valid: 0, 1")
        if not 0.0 <= self.mask_rate <= 1.0:
            raise ValueError(f"MetaConfig.mask_rate={self.mask_rate!r} must lie in [0, 1]")
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

    steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 1e-3
    clip_norm: float = 1.0  # global-norm gradient clip; <= 0 disables
    max_length: int = 64  # tokens per sentence (the fixed batch length; longer ones are cut)
    objective: str = "token"  # one of SUPERVISED_OBJECTIVES
    pos_weight: float = 0.0  # token objective: weight of answer tokens; <= 0 = auto-balance
    units: str = "token"  # token | word (logits mean-pooled over each word, as LearnedScorer)
    eval_every: int = 100
    eval_batch_size: int = 256
    patience: int = 5  # evaluations without a dev span-F1 gain before stopping; 0 = never stop
    sentence_level: bool = True  # contexts cut into answer sentences; False: whole passages
    max_triples: int = 0  # cap on training triples (a seeded subset); 0 = all
    max_dev_triples: int = 2000  # cap on dev triples; 0 = all

    def __post_init__(self) -> None:
        choices = {"objective": SUPERVISED_OBJECTIVES, "units": ("token", "word")}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"SupervisedConfig.{name}={getattr(self, name)!r}; valid: {valid}")
        for name in ("steps", "batch_size", "max_length", "eval_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"SupervisedConfig.{name}={getattr(self, name)} must be >= 1")
        for name in ("patience", "max_triples", "max_dev_triples"):
            if getattr(self, name) < 0:
                raise ValueError(f"SupervisedConfig.{name}={getattr(self, name)} must be >= 0")


STAGES = ("learn_policy", "intermediate", "finetune", "evaluate")


@dataclass(frozen=True)
class Config:
    """Everything one run needs; the CLI builds it from flags, every module reads only its part."""

    model: ModelConfig = field(default_factory=ModelConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    data: DataConfig = field(default_factory=DataConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    intermediate: StageConfig = field(default_factory=StageConfig)
    finetune: StageConfig = field(default_factory=StageConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    supervised: SupervisedConfig = field(default_factory=SupervisedConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    init: str = ""  # a Hugging Face BART (local dir or hub id); "" = random init from `model`
    stages: tuple[str, ...] = STAGES
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ValueError(f"Config.stages has {bad}; valid: {STAGES}")


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


META_ESTIMATORS = ("second_order", "first_order")
INNER_OPTIMIZERS = ("sgd", "adam")
POLICY_UNITS = ("token", "word")
