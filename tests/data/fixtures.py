"""Tiny files in each downstream dataset's real hub schema, for tests and end-to-end runs.

`task_rows(name, split)` gives rows exactly as the hub dataset has them (nq_open's answer list,
TriviaQA's nested answer dict with aliases and the empty entity_pages/search_results of the
"nocontext" configs, KILT records with output/provenance and meta, XSum, CNN/DailyMail, SAMSum).
`write_task_files(name, directory, fmt=...)` writes `<directory>/<split>.<ext>` for each split,
the layout `load_task(name, split, data_dir=directory)` reads; `write_all_tasks(root)` writes
`<root>/<name>/` for all nine tasks. Formats: jsonl, json (array), parquet, csv (flat schemas).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

TASK_NAMES = ("nq", "tqa", "wq", "fever", "zsre", "trex", "xsum", "cnndm", "samsum")
SPLITS = {
    "nq": ("train", "validation"),
    "tqa": ("train", "validation"),
    "wq": ("train", "test"),
    "fever": ("train", "validation"),
    "zsre": ("train", "validation"),
    "trex": ("train", "validation"),
    "xsum": ("train", "validation", "test"),
    "cnndm": ("train", "validation", "test"),
    "samsum": ("train", "validation", "test"),
}

_QA = {
    "train": [
        ("where is the eiffel tower located", ["Paris"]),
        ("who wrote the novel moby dick", ["Herman Melville"]),
        ("when did the first world war start", ["28 July 1914", "1914"]),
        ("what is the largest planet in the solar system", ["Jupiter"]),
    ],
    "validation": [
        ("who wrote moby dick", ["Herman Melville"]),
        ("what is the capital of france", ["Paris"]),
        ("how many legs does a spider have", ["eight", "8"]),
    ],
}
_QA["test"] = _QA["validation"]


def nq_rows(split: str) -> list[dict[str, Any]]:
    """google-research-datasets/nq_open: {question: str, answer: list[str]}."""
    return [{"question": q, "answer": list(a)} for q, a in _QA[split]]


def tqa_rows(split: str) -> list[dict[str, Any]]:
    """mandarjoshi/trivia_qa, config unfiltered.nocontext (entity_pages/search_results empty)."""
    rows = []
    for i, (q, answers) in enumerate(_QA[split]):
        value = answers[0]
        aliases = [value, *answers[1:], value.upper()]
        rows.append(
            {
                "question": q[0].upper() + q[1:] + "?",
                "question_id": f"tc_{split}_{i}",
                "question_source": "http://www.triviacountry.com/",
                "entity_pages": {"doc_source": [], "filename": [], "title": [], "wiki_context": []},
                "search_results": {
                    "description": [],
                    "filename": [],
                    "rank": [],
                    "title": [],
                    "url": [],
                    "search_context": [],
                },
                "answer": {
                    "aliases": aliases,
                    "normalized_aliases": sorted({a.lower() for a in aliases}),
                    "matched_wiki_entity_name": "",
                    "normalized_matched_wiki_entity_name": "",
                    "normalized_value": value.lower(),
                    "type": "WikipediaEntity",
                    "value": value,
                },
            }
        )
    return rows


def wq_rows(split: str) -> list[dict[str, Any]]:
    """stanfordnlp/web_questions: {url: str, question: str, answers: list[str]}."""
    source = _QA["train" if split == "train" else "validation"]
    return [
        {
            "url": "http://www.freebase.com/view/en/" + a[0].lower().replace(" ", "_"),
            "question": q + "?",
            "answers": list(a),
        }
        for q, a in source
    ]


def _provenance(title: str, wikipedia_id: str, start: int, end: int) -> dict[str, Any]:
    return {
        "bleu_score": 1.0,
        "end_character": end,
        "end_paragraph_id": 1,
        "meta": {
            "fever_page_id": "",
            "fever_sentence_id": -1,
            "annotation_id": "-1",
            "yes_no_answer": "",
            "evidence_span": [],
        },
        "section": "Section::::Abstract",
        "start_character": start,
        "start_paragraph_id": 1,
        "title": title,
        "wikipedia_id": wikipedia_id,
    }


def _kilt_meta(**fields: Any) -> dict[str, Any]:
    meta = {
        "left_context": "",
        "mention": "",
        "right_context": "",
        "partial_evidence": [],
        "obj_surface": [],
        "sub_surface": [],
        "subj_aliases": [],
        "template_questions": [],
    }
    meta.update(fields)
    return meta


def _kilt_row(row_id: str, text: str, answers: Sequence[str], title: str) -> dict[str, Any]:
    outputs = [
        {"answer": a, "meta": {"score": 0}, "provenance": [_provenance(title, "1234", 0, 40)]}
        for a in answers
    ]
    # KILT records often add an output entry with provenance only (no answer).
    outputs.append(
        {"answer": "", "meta": {"score": 0}, "provenance": [_provenance(title, "1234", 41, 80)]}
    )
    return {"id": row_id, "input": text, "meta": _kilt_meta(), "output": outputs}


_FEVER = {
    "train": [
        (
            "Nikolaj Coster-Waldau worked with the Fox Broadcasting Company.",
            "SUPPORTS",
            "Nikolaj Coster-Waldau",
        ),
        ("Roman Atwood is a content creator.", "SUPPORTS", "Roman Atwood"),
        ("Adrienne Bailon is an accountant.", "REFUTES", "Adrienne Bailon"),
    ],
    "validation": [
        ("Fox 2000 Pictures released the film Soul Food.", "SUPPORTS", "Soul Food (film)"),
        ("Telemundo is a English-language television network.", "REFUTES", "Telemundo"),
    ],
}
_ZSRE = {
    "train": [
        ("Jean Dieudonné [SEP] place of birth", ["Nice"], "Jean Dieudonné"),
        (
            "Apple Inc. [SEP] headquarters location",
            ["Cupertino", "Cupertino, California"],
            "Apple Inc.",
        ),
    ],
    "validation": [
        ("Herman Melville [SEP] occupation", ["novelist", "writer"], "Herman Melville"),
        ("Eiffel Tower [SEP] country", ["France"], "Eiffel Tower"),
    ],
}
_TREX = {
    "train": [
        ("Gustave Eiffel [SEP] country of citizenship", ["France"], "Gustave Eiffel"),
        ("Moby-Dick [SEP] author", ["Herman Melville"], "Moby-Dick"),
    ],
    "validation": [
        ("Jupiter [SEP] part of", ["Solar System"], "Jupiter"),
        ("Paris [SEP] country", ["France"], "Paris"),
    ],
}


def fever_rows(split: str) -> list[dict[str, Any]]:
    """facebook/kilt_tasks config fever: claims labelled SUPPORTS / REFUTES."""
    return [
        _kilt_row(str(75000 + i), claim, [label], title)
        for i, (claim, label, title) in enumerate(_FEVER[split])
    ]


def zsre_rows(split: str) -> list[dict[str, Any]]:
    """facebook/kilt_tasks config structured_zeroshot (zsRE): "subject [SEP] relation"."""
    rows = []
    for i, (text, answers, title) in enumerate(_ZSRE[split]):
        row = _kilt_row(f"zsre_{split}_{i}", text, answers, title)
        subject, relation = text.split(" [SEP] ")
        row["meta"] = _kilt_meta(template_questions=[f"What is the {relation} of {subject}?"])
        rows.append(row)
    return rows


def trex_rows(split: str) -> list[dict[str, Any]]:
    """facebook/kilt_tasks config trex: "subject [SEP] relation"."""
    return [
        _kilt_row(f"trex_{split}_{i}", text, answers, title)
        for i, (text, answers, title) in enumerate(_TREX[split])
    ]


_NEWS = [
    (
        "The Eiffel Tower was repainted this year. Workers used sixty tonnes of paint. "
        "The work took eighteen months and the tower stayed open to visitors.",
        "The Eiffel Tower has been repainted with sixty tonnes of paint.",
    ),
    (
        "A spider with eight legs was found in a museum in Paris. Scientists say the species "
        "had not been seen in France for a century.",
        "A rare spider has been found in a Paris museum.",
    ),
    (
        "Jupiter's moons were observed by a new telescope. Astronomers counted four large "
        "moons and dozens of small ones.",
        "A new telescope has observed the moons of Jupiter.",
    ),
]


def xsum_rows(split: str) -> list[dict[str, Any]]:
    """EdinburghNLP/xsum: {document, summary, id} (one-sentence summaries)."""
    offset = {"train": 0, "validation": 1, "test": 2}[split]
    return [
        {"document": doc, "summary": summ, "id": str(30000000 + offset * 10 + i)}
        for i, (doc, summ) in enumerate(_NEWS[offset:] + _NEWS[:offset])
    ]


def cnndm_rows(split: str) -> list[dict[str, Any]]:
    """abisee/cnn_dailymail 3.0.0: {article, highlights (newline-separated), id (sha1 hex)}."""
    offset = {"train": 0, "validation": 1, "test": 2}[split]
    rows = []
    for i, (doc, summ) in enumerate(_NEWS[offset:] + _NEWS[:offset]):
        first_sentence = doc.split(". ")[0] + " ."
        rows.append(
            {
                "article": "(CNN) -- " + doc,
                "highlights": summ + "\n" + first_sentence,
                "id": f"{offset:02d}{i:02d}" + "0" * 36,
            }
        )
    return rows


def samsum_rows(split: str) -> list[dict[str, Any]]:
    """Samsung/samsum: {id, dialogue ("Name: utterance" lines, CRLF-separated), summary}."""
    dialogues = [
        (
            "Amanda: I baked cookies. Do you want some?\r\nJerry: Sure!\r\n"
            "Amanda: I'll bring you tomorrow :-)",
            "Amanda baked cookies and will bring Jerry some tomorrow.",
        ),
        (
            "Olivia: Who are you voting for?\r\nOliver: Liberals as always.\r\nOlivia: Me too!!",
            "Olivia and Olivier are voting for liberals in this election.",
        ),
        (
            "Tim: Hi, what's up?\r\nKim: Bad mood tbh, I was going to do lots of stuff but "
            "ended up procrastinating",
            "Kim may try the pomodoro technique recommended by Tim to get more stuff done.",
        ),
    ]
    offset = {"train": 0, "validation": 1, "test": 2}[split]
    return [
        {"id": f"13818{offset}{i:02d}", "dialogue": d, "summary": s}
        for i, (d, s) in enumerate(dialogues[offset:] + dialogues[:offset])
    ]


ROWS = {
    "nq": nq_rows,
    "tqa": tqa_rows,
    "wq": wq_rows,
    "fever": fever_rows,
    "zsre": zsre_rows,
    "trex": trex_rows,
    "xsum": xsum_rows,
    "cnndm": cnndm_rows,
    "samsum": samsum_rows,
}


def task_rows(name: str, split: str) -> list[dict[str, Any]]:
    """Rows of `split` of task `name` in the hub dataset's schema."""
    return ROWS[name](split)


def write_rows(rows: Sequence[dict[str, Any]], path: str | pathlib.Path) -> pathlib.Path:
    """Write rows as .jsonl, .json (array), .parquet or .csv, chosen by the file's extension."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ext = path.suffix.lstrip(".")
    if ext == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    elif ext == "json":
        path.write_text(json.dumps(list(rows), ensure_ascii=False, indent=1), "utf-8")
    elif ext == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(list(rows)), path)
    elif ext == "csv":
        import csv

        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise ValueError(f"{path}: unsupported extension {ext!r}; use jsonl, json, parquet or csv")
    return path


def write_task_files(
    name: str,
    directory: str | pathlib.Path,
    *,
    fmt: str = "jsonl",
    splits: Sequence[str] | None = None,
) -> pathlib.Path:
    """Write `<directory>/<split>.<fmt>` for the task's splits; returns `directory`."""
    directory = pathlib.Path(directory)
    for split in splits or SPLITS[name]:
        write_rows(task_rows(name, split), directory / f"{split}.{fmt}")
    return directory


def write_all_tasks(root: str | pathlib.Path, *, fmt: str = "jsonl") -> dict[str, pathlib.Path]:
    """Write every task under `<root>/<name>/`; returns {name: directory}."""
    root = pathlib.Path(root)
    return {name: write_task_files(name, root / name, fmt=fmt) for name in TASK_NAMES}
