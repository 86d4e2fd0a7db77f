"""The synthetic knowledge world: the offline, deterministic default corpus and tasks.

Owns the world's people (unique pseudo-word names with attribute values), their
paraphrased biographies (the pre-training corpus, as documents and as sentences, each
with gold entity spans: the world's "NER"), and the downstream tasks built on them:
closed-book QA variants that ask about disjoint attribute subsets (for transfer) and a
summarization task whose needed facts are in the input.

Questions are split by person: a test person's facts appear only in the corpus, so
held-out exact match measures knowledge stored during intermediate pre-training.
Everything is a pure function of `WorldConfig` (seeded `random.Random`, no global state).
The task registry (data/tasks.py) lists these tasks by their variant names (`TASKS`) and loads
them through `world_task`; this module does not know the registry.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from meta_mask.config import WorldConfig
from meta_mask.errors import UserError


class WorldConfigError(UserError, ValueError):
    """The WorldConfig (--world.* flags) cannot make the world or task asked for."""


@dataclass(frozen=True)
class AttributeSpec:
    """One attribute type: how its values are made, stated in bios, and asked about."""

    kind: str  # value generator: person | city | company | school | club | date | hobby
    label: str | None  # NER label of its values; None: not a named entity (NER never sees it)
    bio_templates: tuple[str, ...]  # each holds "{name}" and "{value}" once
    question_templates: tuple[str, ...] = ()  # empty: a distractor, never asked
    summary_phrase: str = ""  # how a one-line summary states it, e.g. "born in {value}"


ATTRIBUTES: dict[str, AttributeSpec] = {
    "birth_city": AttributeSpec(
        "city",
        "GPE",
        (
            "{name} was born in {value}.",
            "{name} is a native of {value}.",
            "The birthplace of {name} is {value}.",
            "{name} came into the world in {value}.",
        ),
        (
            "Where was {name} born?",
            "In which city was {name} born?",
            "What is the birthplace of {name}?",
        ),
        "born in {value}",
    ),
    "employer": AttributeSpec(
        "company",
        "ORG",
        (
            "{name} works for {value}.",
            "{name} is employed by {value}.",
            "{name} has a job at {value}.",
            "The employer of {name} is {value}.",
        ),
        (
            "Who employs {name}?",
            "Which company does {name} work for?",
            "Where does {name} work?",
        ),
        "works for {value}",
    ),
    "birth_date": AttributeSpec(
        "date",
        "DATE",
        (
            "The birth date of {name} is {value}.",
            "{name} was born during {value}.",
            "{name} arrived in the world in {value}.",
            "{name} has been alive since {value}.",
        ),
        (
            "When was {name} born?",
            "What is the birth date of {name}?",
            "In what month and year was {name} born?",
        ),
        "born {value}",
    ),
    "school": AttributeSpec(
        "school",
        "ORG",
        (
            "{name} studied at {value}.",
            "{name} graduated from {value}.",
            "{name} is an alumnus of {value}.",
            "{name} attended {value}.",
        ),
        (
            "Where did {name} study?",
            "Which school did {name} attend?",
            "Where did {name} graduate from?",
        ),
        "studied at {value}",
    ),
    "spouse": AttributeSpec(
        "person",
        "PERSON",
        (
            "{name} is married to {value}.",
            "The spouse of {name} is {value}.",
            "{name} wed {value}.",
            "{name} shares a home with spouse {value}.",
        ),
        (
            "Who is {name} married to?",
            "Who is the spouse of {name}?",
            "Whom did {name} marry?",
        ),
        "married to {value}",
    ),
    "hobby": AttributeSpec(
        "hobby",
        None,  # not an entity: salient-span masking cannot find it, a learned policy can
        (
            "{name} enjoys {value}.",
            "The favorite hobby of {name} is {value}.",
            "{name} spends weekends on {value}.",
            "In spare time {name} practices {value}.",
        ),
        (
            "What does {name} enjoy?",
            "What is the hobby of {name}?",
            "What does {name} do for fun?",
        ),
        "enjoys {value}",
    ),
    # Distractors: entities of the same types, never asked.
    "friend": AttributeSpec(
        "person",
        "PERSON",
        (
            "{name} is a close friend of {value}.",
            "{name} often visits {value}.",
            "A friend of {name} is {value}.",
            "{name} plays cards with {value}.",
        ),
    ),
    "visited_city": AttributeSpec(
        "city",
        "GPE",
        (
            "{name} once traveled to {value}.",
            "{name} spent a summer in {value}.",
            "{name} has visited {value}.",
            "{name} took a trip to {value}.",
        ),
    ),
    "club": AttributeSpec(
        "club",
        "ORG",
        (
            "{name} is a member of {value}.",
            "{name} joined {value}.",
            "{name} belongs to {value}.",
            "{name} volunteers at {value}.",
        ),
    ),
    "move_date": AttributeSpec(
        "date",
        "DATE",
        (
            "{name} moved house in {value}.",
            "{name} changed address in {value}.",
            "{name} relocated in {value}.",
            "{name} bought a house in {value}.",
        ),
    ),
}

# QA variants ask disjoint attribute subsets, so a policy learned on one can be tested on
# another (transfer). Each mixes entity types differently; "personal" includes a
# non-entity attribute (hobby).
QA_VARIANTS: dict[str, tuple[str, ...]] = {
    "world_qa": ("birth_city", "employer"),
    "world_qa_dates": ("birth_date", "school"),
    "world_qa_personal": ("spouse", "hobby"),
}
SUMMARY_TASK = "world_summary"
# Questions about the generic population, on every attribute that has questions: what the
# meta-learned policy's LM is QA-fine-tuned on (it then answers questions in general, but knows
# nothing of the task's people). One split: the generic population is never evaluated on.
GENERIC_QA_TASK = "world_generic_qa"
TASKS: tuple[str, ...] = (*QA_VARIANTS, SUMMARY_TASK, GENERIC_QA_TASK)
SPLITS: tuple[str, ...] = ("train", "dev", "test")
GENERIC = "generic"  # the split of the generic population

# Fixed second words of multi-word values: the first word is a generated pseudo-word.
_SUFFIXES: dict[str, tuple[str, ...]] = {
    "city": ("Falls", "Harbor", "Springs", "Heights", "Valley", "Bay", "Ridge", "Ford"),
    "company": ("Labs", "Systems", "Motors", "Bank", "Foods", "Media", "Works", "Partners"),
    "school": ("University", "College", "Institute", "Academy"),
    "club": ("Club", "Society", "Guild", "Circle"),
    "hobby": ("carving", "weaving", "singing", "painting", "rowing", "juggling", "baking"),
}
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_YEARS = tuple(str(y) for y in range(1900, 2000))
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr")
_ONSETS += ("kr", "st", "tr", "sh", "th", "ch", "gl", "pl")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "m", "k")


@dataclass(frozen=True)
class Person:
    """One person of the world: a unique full name and one value per attribute."""

    id: int
    name: str
    attributes: Mapping[str, str]


@dataclass(frozen=True)
class World:
    """A built world. `sentences` is the corpus unit; `documents` are whole biographies.

    Sentence record: {"text", "doc_id", "person_id", "sentence_id", "attribute",
    "value_span": (start, end), "entities": [(start, end, label, attribute)]}, spans in
    characters, half-open; `attribute` is "name" for the person's own name. A document
    record has "text", "doc_id", "person_id", "entities" (offsets into the document) and
    "sentence_ids". `splits` maps train/dev/test (the task's people) and "generic" (the
    generic population, WorldConfig.generic_people) to person ids.
    """

    config: WorldConfig
    people: tuple[Person, ...]
    documents: tuple[dict, ...]
    sentences: tuple[dict, ...]
    splits: Mapping[str, tuple[int, ...]]

    def available_tasks(self) -> tuple[str, ...]:
        """The task variants whose attributes this world's biographies state."""
        have = set(self.config.attributes)
        out = [v for v, attrs in QA_VARIANTS.items() if set(attrs) <= have]
        if set(self.config.summary_attributes) <= have:
            out.append(SUMMARY_TASK)
        if self.splits[GENERIC]:
            out.append(GENERIC_QA_TASK)
        return tuple(out)

    def person_rows(self, person_ids: Iterable[int]) -> set[int]:
        """The doc_ids of these people's biographies (what their corpus rows carry)."""
        return {d["doc_id"] for p in person_ids for d in self.bios(p)}

    def bios(self, person_id: int) -> tuple[dict, ...]:
        """The person's biographies (documents), in order."""
        n = self.config.num_bios
        return self.documents[person_id * n : (person_id + 1) * n]

    def corpus_records(self, population: str = "task") -> list[dict]:
        """The corpus rows of the task's people (train + dev + test) or of the generic
        population: their biography sentences, or whole biographies when
        WorldConfig.corpus_unit is "passage". Each row has "text", "doc_id", "person_id" and
        gold "entities" [(start, end, label, attribute)]."""
        if population not in ("task", GENERIC):
            raise ValueError(f"population={population!r}; valid: task, {GENERIC}")
        generic = set(self.splits[GENERIC])
        keep = (lambda p: p in generic) if population == GENERIC else (lambda p: p not in generic)
        unit = self.documents if self.config.corpus_unit == "passage" else self.sentences
        return [dict(r) for r in unit if keep(r["person_id"])]


def _check_config(cfg: WorldConfig) -> None:
    for field_name in ("attributes", "distractors", "summary_attributes"):
        for a in getattr(cfg, field_name):
            if a not in ATTRIBUTES:
                raise WorldConfigError(
                    f"WorldConfig.{field_name} has unknown attribute {a!r}; "
                    f"valid: {sorted(ATTRIBUTES)}"
                )
    overlap = set(cfg.attributes) & set(cfg.distractors)
    if overlap:
        raise WorldConfigError(
            f"WorldConfig: {sorted(overlap)} is in both `attributes` and `distractors`"
        )
    most = min(len(s.bio_templates) for s in ATTRIBUTES.values())
    if cfg.templates_per_attribute > most:
        raise WorldConfigError(
            f"WorldConfig.templates_per_attribute={cfg.templates_per_attribute}; at most {most}"
        )
    most_q = min(
        len(ATTRIBUTES[a].question_templates) for a in itertools.chain(*QA_VARIANTS.values())
    )
    if cfg.question_templates > most_q:
        raise WorldConfigError(
            f"WorldConfig.question_templates={cfg.question_templates}; at most {most_q}"
        )


def _reserved_words() -> set[str]:
    """Lower-cased words of templates and fixed value parts: pseudo-words must avoid them."""
    texts = [t for s in ATTRIBUTES.values() for t in (*s.bio_templates, *s.question_templates)]
    texts += [s.summary_phrase for s in ATTRIBUTES.values()]
    texts += [w for ws in _SUFFIXES.values() for w in ws] + list(_MONTHS)
    words = set()
    for t in texts:
        for w in t.replace("{name}", " ").replace("{value}", " ").split():
            words.add(w.strip(".,?").lower())
    return words


def _pseudo_words(rng: random.Random, counts: Mapping[str, int]) -> dict[str, list[str]]:
    """Distinct pronounceable pseudo-words for each pool, no word in two pools."""
    syllables = [o + v for o in _ONSETS for v in _VOWELS]
    reserved = _reserved_words()
    capacity = len(syllables) ** 2 * len(set(_CODAS)) // 2  # keep rejection sampling quick
    if sum(counts.values()) > capacity:
        raise WorldConfigError(
            f"WorldConfig word pools {dict(counts)} ask for {sum(counts.values())} pseudo-words; "
            f"at most {capacity} in all (first_names, last_names, place_words, org_words, "
            "common_words)"
        )
    seen: set[str] = set()
    pools: dict[str, list[str]] = {}
    for pool, n in counts.items():  # dict order is fixed, so pools are reproducible
        words: list[str] = []
        while len(words) < n:
            w = rng.choice(syllables) + rng.choice(syllables) + rng.choice(_CODAS)
            if w in seen or w in reserved:
                continue
            seen.add(w)
            words.append(w)
        pools[pool] = words
    return pools


def _value_space(kind: str, pools: Mapping[str, list[str]]) -> list[str]:
    """Every possible value of a kind, in a fixed order (the caller samples from it)."""
    if kind == "person":
        first = [w.capitalize() for w in pools["first"]]
        last = [w.capitalize() for w in pools["last"]]
        return [f"{f} {s}" for f in first for s in last]
    if kind == "date":
        return [f"{m} {y}" for y in _YEARS for m in _MONTHS]
    head = {"city": "place", "company": "org", "school": "org", "club": "org", "hobby": "common"}
    words = pools[head[kind]]
    if kind != "hobby":
        words = [w.capitalize() for w in words]
    return [f"{w} {s}" for w in words for s in _SUFFIXES[kind]]


def _sample_values(
    rng: random.Random, space: list[str], n: int, unique: bool, what: str, knob: str | None
) -> list[str]:
    if not unique:
        return [rng.choice(space) for _ in range(n)]
    if n > len(space):
        raise WorldConfigError(
            f"WorldConfig: {what} needs {n} distinct values but only {len(space)} exist; "
            + (f"raise {knob}, " if knob else "")
            + "lower num_people, or set unique_values=False"
        )
    return rng.sample(space, n)


def _render(template: str, name: str, value: str) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """Fill a template; return the text and the character spans of name and value."""
    parts = []
    spans: dict[str, tuple[int, int]] = {}
    pos = 0
    rest = template
    while rest:
        i = rest.find("{")
        if i < 0:
            parts.append(rest)
            break
        j = rest.index("}", i)
        key = rest[i + 1 : j]
        parts.append(rest[:i])
        pos += i
        filler = {"name": name, "value": value}[key]
        spans[key] = (pos, pos + len(filler))
        parts.append(filler)
        pos += len(filler)
        rest = rest[j + 1 :]
    return "".join(parts), spans["name"], spans["value"]


def _make_people(cfg: WorldConfig, rng: random.Random) -> list[Person]:
    pools = _pseudo_words(
        rng,
        {
            "first": cfg.first_names,
            "last": cfg.last_names,
            "place": cfg.place_words,
            "org": cfg.org_words,
            "common": cfg.common_words,
        },
    )
    n = cfg.num_people
    all_attrs = (*cfg.attributes, *cfg.distractors)
    # People, spouses and friends are distinct names: a question's name is unambiguous.
    names_space = _value_space("person", pools)
    name_knob = "first_names/last_names"
    names = _sample_values(rng, names_space, n, True, "people's names", name_knob)
    taken = set(names)
    free_names = [x for x in names_space if x not in taken]
    values: dict[str, list[str]] = {}
    for a in all_attrs:
        kind = ATTRIBUTES[a].kind
        space = free_names if kind == "person" else _value_space(kind, pools)
        knob = {
            "person": name_knob,
            "city": "place_words",
            "date": None,  # a fixed calendar: 1200 month-year dates
            "hobby": "common_words",
        }.get(kind, "org_words")
        values[a] = _sample_values(rng, space, n, cfg.unique_values, f"attribute {a!r}", knob)
        if kind == "person" and cfg.unique_values:
            used = set(values[a])
            free_names = [x for x in free_names if x not in used]
    return [Person(i, names[i], {a: values[a][i] for a in all_attrs}) for i in range(n)]


def _make_bios(
    cfg: WorldConfig, people: list[Person], rng: random.Random
) -> tuple[list[dict], list[dict]]:
    documents: list[dict] = []
    sentences: list[dict] = []
    n_t = cfg.templates_per_attribute
    for p in people:
        # Rotate each attribute's templates across bios so the paraphrases differ.
        start = {a: rng.randrange(n_t) for a in p.attributes}
        for b in range(cfg.num_bios):
            attrs = list(cfg.attributes) + rng.sample(
                list(cfg.distractors), cfg.distractors_per_bio
            )
            rng.shuffle(attrs)
            doc_id = len(documents)
            doc_text, doc_entities, sentence_ids = "", [], []
            for k, a in enumerate(attrs):
                spec = ATTRIBUTES[a]
                template = spec.bio_templates[(start[a] + b) % n_t]
                text, name_span, value_span = _render(template, p.name, p.attributes[a])
                entities = [(*name_span, "PERSON", "name")]
                if spec.label is not None:
                    entities.append((*value_span, spec.label, a))
                entities.sort()
                sentence_ids.append(len(sentences))
                sentences.append(
                    {
                        "text": text,
                        "doc_id": doc_id,
                        "person_id": p.id,
                        "sentence_id": len(sentences),
                        "sentence_index": k,
                        "attribute": a,
                        "value_span": value_span,
                        "entities": entities,
                    }
                )
                if doc_text:
                    doc_text += " "
                off = len(doc_text)
                doc_entities += [(s + off, e + off, lab, att) for s, e, lab, att in entities]
                doc_text += text
            documents.append(
                {
                    "text": doc_text,
                    "doc_id": doc_id,
                    "person_id": p.id,
                    "entities": doc_entities,
                    "sentence_ids": tuple(sentence_ids),
                }
            )
    return documents, sentences


def _split_people(cfg: WorldConfig, rng: random.Random) -> dict[str, tuple[int, ...]]:
    ids = list(range(cfg.num_people))
    rng.shuffle(ids)
    generic, ids = ids[: cfg.generic_people], ids[cfg.generic_people :]
    n_train = round(cfg.split_fractions[0] * len(ids))
    n_dev = round(cfg.split_fractions[1] * len(ids))
    parts = (ids[:n_train], ids[n_train : n_train + n_dev], ids[n_train + n_dev :])
    splits = {name: tuple(sorted(part)) for name, part in zip(SPLITS, parts, strict=True)}
    return {**splits, GENERIC: tuple(sorted(generic))}


def build_world(cfg: WorldConfig | None = None) -> World:
    """Build the world deterministically from `cfg` (default: `WorldConfig()`)."""
    cfg = cfg or WorldConfig()
    _check_config(cfg)
    # Independent streams per part, so changing one knob (e.g. num_bios) leaves the
    # people and the split unchanged.
    people = _make_people(cfg, random.Random(f"{cfg.seed}/people"))
    documents, sentences = _make_bios(cfg, people, random.Random(f"{cfg.seed}/bios"))
    splits = _split_people(cfg, random.Random(f"{cfg.seed}/split"))
    return World(cfg, tuple(people), tuple(documents), tuple(sentences), splits)


def _contexts(world: World, person_id: int, attribute: str) -> list[dict]:
    """The distinct corpus rows that state `attribute` of a person (sentences, or whole
    biographies when WorldConfig.corpus_unit is "passage"), with the answer's spans and the
    row's gold entities [(start, end, label, attribute)]."""
    out, seen = [], set()
    for doc in world.bios(person_id):
        if world.config.corpus_unit == "passage":
            spans = [(s, e) for s, e, _, a in doc["entities"] if a == attribute]
            rows = [(doc, spans)] if spans else []
        else:
            stating = [world.sentences[i] for i in doc["sentence_ids"]]
            rows = [(s, [s["value_span"]]) for s in stating if s["attribute"] == attribute]
        for row, spans in rows:
            if row["text"] not in seen:
                seen.add(row["text"])
                out.append(
                    {"text": row["text"], "answer_spans": spans, "entities": row["entities"]}
                )
    return out


def summary_of(world: World, person: Person) -> str:
    """The one-line summary target: "<name>, born in <city>, works for <employer>."."""
    phrases = [
        ATTRIBUTES[a].summary_phrase.format(value=person.attributes[a])
        for a in world.config.summary_attributes
    ]
    return ", ".join([person.name, *phrases]) + "."


def asked_attributes(world: World, variant: str) -> tuple[str, ...]:
    """The attributes a QA variant asks about (the generic QA: every attribute with questions;
    the summary: the summary's attributes)."""
    if variant == SUMMARY_TASK:
        return tuple(world.config.summary_attributes)
    if variant == GENERIC_QA_TASK:
        attrs = (*world.config.attributes, *world.config.distractors)
        return tuple(a for a in attrs if ATTRIBUTES[a].question_templates)
    return QA_VARIANTS[variant]


def _qa_examples(world: World, variant: str, person_ids: tuple[int, ...]) -> list[dict]:
    examples = []
    for pid in person_ids:
        person = world.people[pid]
        for a in asked_attributes(world, variant):
            spec = ATTRIBUTES[a]
            contexts = _contexts(world, pid, a)
            for template in spec.question_templates[: world.config.question_templates]:
                examples.append(
                    {
                        "source": template.format(name=person.name),
                        "targets": [person.attributes[a]],
                        "person_id": pid,
                        "attribute": a,
                        "fact": f"{pid}:{a}",  # shared by the paraphrased questions
                        "contexts": [dict(c) for c in contexts],
                    }
                )
    return examples


def _summary_examples(world: World, person_ids: tuple[int, ...]) -> list[dict]:
    examples = []
    attrs = world.config.summary_attributes
    for pid in person_ids:
        person = world.people[pid]
        target = summary_of(world, person)
        for doc in world.bios(pid):
            spans = [(s, e) for s, e, _, a in doc["entities"] if a in attrs]
            examples.append(
                {
                    "source": doc["text"],
                    "targets": [target],
                    "person_id": pid,
                    "attribute": "summary",
                    "fact": f"{pid}:summary",  # every bio of a person has the same summary
                    "contexts": [{"text": doc["text"], "answer_spans": spans}],
                }
            )
    return examples


def world_task(world: World, variant: str) -> dict[str, list[dict]]:
    """Examples of one task variant, split by person: {"train"|"dev"|"test": [example]}.

    Example: {"source": str, "targets": [str], "person_id": int, "attribute": str,
    "fact": "<person_id>:<attribute>", "contexts": [{"text": str, "answer_spans": [(start,
    end)], "entities": [...]}]}; QA contexts are the corpus rows stating the answer (what the
    learned policies train on). Examples with one fact id (a QA fact's paraphrased questions; a
    person's bios, which share one summary) are scored as one fact. The generic QA task
    (GENERIC_QA_TASK) has only a "train" split, of the generic population.
    """
    if variant not in TASKS:
        raise ValueError(f"unknown world task {variant!r}; valid: {TASKS}")
    if variant == GENERIC_QA_TASK and not world.splits[GENERIC]:
        raise WorldConfigError(
            f"world task {variant!r} asks about the generic population, but "
            "WorldConfig.generic_people=0: set --world.generic_people"
        )
    if variant not in world.available_tasks():
        need = QA_VARIANTS.get(variant, world.config.summary_attributes)
        raise WorldConfigError(
            f"world task {variant!r} asks {need}, but WorldConfig.attributes="
            f"{world.config.attributes} lacks some; add them or pick one of "
            f"{world.available_tasks()}"
        )
    if variant == SUMMARY_TASK:
        return {s: _summary_examples(world, world.splits[s]) for s in SPLITS}
    if variant == GENERIC_QA_TASK:
        return {"train": _qa_examples(world, variant, world.splits[GENERIC])}
    return {s: _qa_examples(world, variant, world.splits[s]) for s in SPLITS}


def world_texts(world: World) -> Iterator[str]:
    """Every text the world emits: corpus sentences, questions, answers and summaries."""
    for s in world.sentences:
        yield s["text"]
    for variant in world.available_tasks():
        for examples in world_task(world, variant).values():
            for ex in examples:
                if variant != SUMMARY_TASK:  # a summary's source is already corpus text
                    yield ex["source"]
                yield from ex["targets"]


def world_template_texts(world: World) -> Iterator[str]:
    """Every template of the world's attributes with its slots emptied.

    A tokenizer trained on these as well as on `world_texts` has a vocabulary that does
    not depend on how many templates the config happens to use.
    """
    for a in (*world.config.attributes, *world.config.distractors):
        spec = ATTRIBUTES[a]
        for t in (*spec.bio_templates, *spec.question_templates, spec.summary_phrase):
            yield t.replace("{name}", "").replace("{value}", "")
