"""Tests for the task registry: all tasks load from real-schema files; bad input errors clearly."""

from __future__ import annotations

import json
import logging

import pytest

from meta_mask.config import WorldConfig
from meta_mask.data import task_files, task_spec, tasks
from meta_mask.data.task_files import DATA_DIR_FLAG
from meta_mask.data.task_spec import Example, TaskDataError
from meta_mask.data.tasks import TaskOfflineError, UnknownNameError, load_task, read_task
from meta_mask.data.world import build_world, world_task
from meta_mask.errors import UserError
from meta_mask.evaluation import metrics
from tests.data import fixtures


def test_registry_has_the_nine_tasks_with_their_categories_and_metrics():
    expected = {
        "nq": ("closed_book_qa", "em_f1", "google-research-datasets/nq_open"),
        "tqa": ("closed_book_qa", "em_f1", "mandarjoshi/trivia_qa"),
        "wq": ("closed_book_qa", "em_f1", "stanfordnlp/web_questions"),
        "fever": ("knowledge", "accuracy", "facebook/kilt_tasks"),
        "zsre": ("knowledge", "kilt_em", "facebook/kilt_tasks"),
        "trex": ("knowledge", "kilt_em", "facebook/kilt_tasks"),
        "xsum": ("summarization", "rouge", "EdinburghNLP/xsum"),
        "cnndm": ("summarization", "rouge", "abisee/cnn_dailymail"),
        "samsum": ("summarization", "rouge", "Samsung/samsum"),
    }
    for name, (category, metric, hub_id) in expected.items():
        spec = tasks.get_task(name)
        assert (spec.category, spec.metric, spec.hub_id) == (category, metric, hub_id)
    assert tasks.get_task("zsre").hub_config == "structured_zeroshot"
    assert tasks.get_task("tqa").hub_config == "unfiltered.nocontext"
    assert tasks.get_task("cnndm").hub_config == "3.0.0"
    # Script-only main branches are read from the hub's parquet export.
    assert tasks.get_task("xsum").revision == "refs/convert/parquet"
    assert task_spec.METRIC_NAMES == metrics.METRICS


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "json"])
@pytest.mark.parametrize("name", fixtures.TASK_NAMES)
def test_every_task_loads_from_local_files(tmp_path, name, fmt):
    fixtures.write_task_files(name, tmp_path, fmt=fmt)
    for split in fixtures.SPLITS[name]:
        rows = fixtures.task_rows(name, split)
        examples = load_task(name, split, data_dir=tmp_path)
        assert len(examples) == len(rows)
        assert all(isinstance(ex, Example) and ex.source and ex.targets for ex in examples)
        assert len({ex.id for ex in examples}) == len(examples)


def test_column_mappings_follow_each_schema(tmp_path):
    dirs = fixtures.write_all_tasks(tmp_path)
    nq = load_task("nq", "validation", data_dir=dirs["nq"])
    assert nq[2].source == "how many legs does a spider have"
    assert nq[2].targets == ["eight", "8"] and nq[2].id == "validation-2"

    tqa = load_task("tqa", "train", data_dir=dirs["tqa"])[2]
    # value first, then aliases without duplicates; normalized_aliases are not needed.
    assert tqa.targets == ["28 July 1914", "1914", "28 JULY 1914"]
    assert tqa.id == "tc_train_2" and tqa.source.endswith("?")

    wq = load_task("wq", "test", data_dir=dirs["wq"])[0]
    assert wq.targets == ["Herman Melville"] and wq.meta["url"].endswith("herman_melville")

    fever = load_task("fever", "validation", data_dir=dirs["fever"])
    assert [ex.targets for ex in fever] == [["SUPPORTS"], ["REFUTES"]]
    zsre = load_task("zsre", "validation", data_dir=dirs["zsre"])[0]
    # All output answers are golds; the provenance-only output entry adds none.
    assert zsre.source == "Herman Melville [SEP] occupation"
    assert zsre.targets == ["novelist", "writer"]
    assert zsre.meta["provenance"][0]["title"] == "Herman Melville"
    assert len(zsre.meta["provenance"]) == 3

    cnndm = load_task("cnndm", "train", data_dir=dirs["cnndm"])[0]
    assert cnndm.source.startswith("(CNN) -- ") and "\n" in cnndm.targets[0]
    samsum = load_task("samsum", "train", data_dir=dirs["samsum"])[0]
    assert samsum.source.startswith("Amanda:") and samsum.id == "13818000"
    xsum = load_task("xsum", "test", data_dir=dirs["xsum"])[0]
    assert xsum.targets == [fixtures.xsum_rows("test")[0]["summary"]]


def test_hub_and_original_file_names_are_found(tmp_path):
    # Hub shard names, the parquet-export layout, and KILT's / NQ-open's original names.
    fixtures.write_rows(fixtures.nq_rows("train"), tmp_path / "nq" / "train-00000-of-00001.parquet")
    fixtures.write_rows(fixtures.nq_rows("validation"), tmp_path / "nq" / "NQ-open.dev.jsonl")
    fixtures.write_rows(fixtures.xsum_rows("test"), tmp_path / "xsum" / "test" / "0000.parquet")
    fixtures.write_rows(
        fixtures.fever_rows("validation"), tmp_path / "fever" / "fever-dev-kilt.jsonl"
    )
    assert len(load_task("nq", "train", data_dir=tmp_path / "nq")) == 4
    assert len(load_task("nq", "validation", data_dir=tmp_path / "nq")) == 3
    assert len(load_task("xsum", "test", data_dir=tmp_path / "xsum")) == 3
    assert len(load_task("fever", "validation", data_dir=tmp_path / "fever")) == 2


def test_csv_works_for_flat_schemas_and_is_refused_for_lists(tmp_path):
    fixtures.write_task_files("samsum", tmp_path / "samsum", fmt="csv", splits=["validation"])
    ex = load_task("samsum", "validation", data_dir=tmp_path / "samsum")
    assert ex[0].source == fixtures.samsum_rows("validation")[0]["dialogue"]
    fixtures.write_rows(fixtures.nq_rows("train"), tmp_path / "nq" / "train.csv")
    with pytest.raises(TaskDataError, match=r"CSV cannot hold.*train\.jsonl"):
        load_task("nq", "train", data_dir=tmp_path / "nq")


def test_max_examples_counts_usable_examples(tmp_path):
    rows = fixtures.nq_rows("train")
    rows.insert(0, {"question": "no answer here", "answer": []})
    fixtures.write_rows(rows, tmp_path / "train.jsonl")
    examples = load_task("nq", "train", data_dir=tmp_path, max_examples=2)
    assert [ex.targets[0] for ex in examples] == ["Paris", "Herman Melville"]
    with pytest.raises(ValueError, match="max_examples"):
        load_task("nq", "train", data_dir=tmp_path, max_examples=0)


def test_missing_file_names_the_paths_looked_for(tmp_path):
    fixtures.write_task_files("nq", tmp_path, splits=["train"])
    with pytest.raises(FileNotFoundError) as err:
        load_task("nq", "validation", data_dir=tmp_path)
    message = str(err.value)
    for expected in ("validation.jsonl", "validation.parquet", "NQ-open.dev.jsonl", "train.jsonl",
                     str(tmp_path), "question: str, answer: list[str]"):  # fmt: skip
        assert expected in message
    with pytest.raises(FileNotFoundError, match=f"{DATA_DIR_FLAG}=.*not a directory"):
        load_task("nq", "train", data_dir=tmp_path / "nope")


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = fixtures.write_rows(fixtures.nq_rows("train"), tmp_path / "train.jsonl")
    lines = path.read_text().splitlines()
    lines.insert(2, "")  # blank lines are allowed and still counted in line numbers
    lines[3] = lines[3][:-1]  # drop the closing brace of the record on line 4
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TaskDataError, match=rf"{path}:4: malformed JSON"):
        load_task("nq", "train", data_dir=tmp_path)
    path.write_text('{"question": "q", "answer": ["a"]}\n["not", "an", "object"]\n')
    with pytest.raises(TaskDataError, match=rf"{path}:2: expected a JSON object"):
        load_task("nq", "train", data_dir=tmp_path)


def test_non_utf8_byte_names_its_own_line(tmp_path):
    # A text-mode reader decodes ahead in chunks of 8 KiB, so a bad byte on line 2 would be
    # blamed on line 1; the error must name the line that holds it.
    d = tmp_path / "d"
    d.mkdir()
    path = d / "train.jsonl"
    path.write_bytes(
        b'{"question": "q1", "answers": ["a"]}\n{"question": "caf\xe9 \xff", "answers": ["b"]}\n'
    )
    with pytest.raises(TaskDataError) as err:
        load_task("wq", "train", data_dir=d)
    assert str(err.value).startswith(f"{path}:2: not UTF-8 (byte 0xe9 at byte 18 of the line)")
    assert isinstance(err.value, UserError)
    # Far beyond the first 8 KiB: still its own line.
    good = json.dumps({"question": "q" * 100, "answers": ["a"]}).encode() + b"\n"
    lines = [good] * 200 + [b'{"question": "\xff", "answers": ["b"]}\n', good]
    assert sum(map(len, lines[:200])) > 16 * 1024
    path.write_bytes(b"".join(lines))
    with pytest.raises(TaskDataError, match=rf"{path}:201: not UTF-8 \(byte 0xff at byte 15 "):
        load_task("wq", "train", data_dir=d)
    # A JSON array file (read whole) names the line as well.
    path.unlink()
    (d / "train.json").write_bytes(
        b'[\n{"question": "q", "answers": ["a"]},\n{"question": "\xff"}\n]'
    )
    with pytest.raises(
        TaskDataError, match=rf"{d / 'train.json'}:3: not UTF-8 \(byte 0xff at byte 15"
    ):
        load_task("wq", "train", data_dir=d)


def test_data_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="Unknown task 'nope'"):
        tasks.get_task("nope")
    with pytest.raises(UserError, match="not a directory"):
        load_task("nq", "train", data_dir=tmp_path / "nope")
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(UserError, match="no rows"):
        load_task("nq", "train", data_dir=tmp_path)


def test_wrong_column_type_names_the_line(tmp_path):
    rows = fixtures.nq_rows("train")
    path = tmp_path / "train.jsonl"
    # All rows with a string answer: pyarrow reads it, our mapping rejects it on line 1.
    fixtures.write_rows([{**r, "answer": r["answer"][0]} for r in rows], path)
    with pytest.raises(TaskDataError, match=rf"{path}:1: column 'answer' must be a list"):
        load_task("nq", "train", data_dir=tmp_path)
    # One row's type differs from the others: pyarrow fails; the error still names line 3.
    rows[2]["answer"] = "1914"
    fixtures.write_rows(rows, path)
    with pytest.raises(TaskDataError, match=rf"{path}:3: column 'answer' must be a list"):
        load_task("nq", "train", data_dir=tmp_path)
    # A parquet file with the wrong type names the file and row.
    (tmp_path / "train.jsonl").unlink()
    kilt = fixtures.fever_rows("train")
    for row in kilt:
        row["output"] = "SUPPORTS"
    fixtures.write_rows(kilt, tmp_path / "train.parquet")
    with pytest.raises(
        TaskDataError, match=r"train\.parquet row 0: column 'output' must be a list"
    ):
        load_task("fever", "train", data_dir=tmp_path)


def test_missing_column_lists_expected_and_found(tmp_path):
    fixtures.write_rows([{"query": "q", "answer": ["a"]}], tmp_path / "train.jsonl")
    with pytest.raises(TaskDataError, match=r"missing column\(s\) \['question'\].*found \['query'"):
        load_task("nq", "train", data_dir=tmp_path)


def test_rows_without_answers_are_skipped_and_counted(tmp_path, caplog):
    rows = fixtures.tqa_rows("validation")
    rows[0]["answer"]["value"] = ""
    rows[0]["answer"]["aliases"] = ["  ", ""]
    rows[1]["question"] = "   "
    fixtures.write_rows(rows, tmp_path / "validation.jsonl")
    with caplog.at_level(logging.WARNING, logger="meta_mask.data.tasks"):
        data = read_task("tqa", "validation", data_dir=tmp_path)
    assert [ex.id for ex in data.examples] == ["tc_validation_2"]
    assert data.skipped == {"no answer": ["tc_validation_0"], "empty source": ["tc_validation_1"]}
    assert "skipped 1 of 3 rows with no answer" in caplog.text


def test_all_rows_bad_raises_with_the_reason(tmp_path):
    # TriviaQA's test split has "<unk>" placeholders instead of answers.
    rows = fixtures.tqa_rows("validation")
    for row in rows:
        row["answer"] = {**row["answer"], "value": "<unk>", "aliases": [], "normalized_aliases": []}
    fixtures.write_rows(rows, tmp_path / "test.parquet")
    with pytest.raises(TaskDataError, match=r"none of the 3 rows.*3 with no answer.*'validation'"):
        load_task("tqa", "test", data_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train.jsonl").write_text("\n")
    with pytest.raises(TaskDataError, match="no rows"):
        load_task("nq", "train", data_dir=tmp_path / "empty")


def test_several_formats_for_one_split_is_an_error(tmp_path):
    fixtures.write_task_files("nq", tmp_path, fmt="jsonl", splits=["train"])
    fixtures.write_task_files("nq", tmp_path, fmt="parquet", splits=["train"])
    with pytest.raises(TaskDataError, match="several formats"):
        load_task("nq", "train", data_dir=tmp_path)


def test_unknown_task_and_split_list_the_valid_names():
    with pytest.raises(KeyError) as err:
        tasks.get_task("natural_questions")
    for name in fixtures.TASK_NAMES:
        assert name in str(err.value)
    with pytest.raises(KeyError, match="no split 'dev'; valid: train, validation"):
        load_task("nq", "dev")


def test_offline_hub_says_how_to_use_local_files(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(TaskOfflineError) as err:
        load_task("fever", "validation")
    message = str(err.value)
    assert isinstance(err.value, ConnectionError)
    for expected in (DATA_DIR_FLAG, "validation.jsonl", "fever-dev-kilt.jsonl",
                     "facebook/kilt_tasks config fever", "input: str", "output: list"):  # fmt: skip
        assert expected in message


def test_world_tasks_are_ordinary_registry_entries():
    world = build_world(WorldConfig(num_people=20, num_bios=1))
    for name, metric in [("world_qa", "em_f1"), ("world_qa_dates", "em_f1"),
                         ("world_qa_personal", "em_f1"), ("world_summary", "rouge")]:  # fmt: skip
        spec = tasks.get_task(name)
        assert name in tasks.TASKS
        assert (spec.category, spec.metric, spec.world_variant) == ("synthetic", metric, name)
        assert spec.splits == ("train", "dev", "test") and tasks.dev_split(name) == "dev"
        for split in spec.splits:
            rows = world_task(world, name)[split]
            examples = load_task(name, split, world=world)
            # The world's rows in order, with the row index as id and the rest in meta.
            assert examples == [
                tasks.example_from_dict(r, f"{split}-{i}") for i, r in enumerate(rows)
            ]
            assert [(e.source, e.targets, e.id) for e in examples] == [
                (r["source"], r["targets"], f"{split}-{i}") for i, r in enumerate(rows)
            ]
            assert [e.meta for e in examples] == [
                {"person_id": r["person_id"], "attribute": r["attribute"]} for r in rows
            ]
            assert [e.fact_id for e in examples] == [r["fact"] for r in rows]
        head = load_task(name, "train", world=world, max_examples=3)
        assert head == load_task(name, "train", world=world)[:3]
    with pytest.raises(ValueError, match="synthetic world: pass world="):
        load_task("world_qa", "train")
    with pytest.raises(KeyError, match="no split 'validation'; valid: train, dev, test"):
        load_task("world_qa", "validation", world=world)


def test_dev_split_comes_from_the_spec():
    assert tasks.dev_split("nq") == "validation" and tasks.dev_split("fever") == "validation"
    with pytest.raises(UnknownNameError, match="'wq' has no dev split.*train, test"):
        tasks.dev_split("wq")


def test_example_from_dict_keeps_contexts_and_meta_and_checks_spans():
    import numpy as np

    row = {
        "source": "Where was Ada Lovi born?",
        "targets": ["Port Mora", " Port Mora ", ""],
        "contexts": [{"text": "Ada Lovi was born in Port Mora.", "answer_spans": [[21, 30]]}],
        "person_id": 3,
        "attribute": "birth_city",
    }
    ex = tasks.example_from_dict(row, "train-0")
    assert ex.targets == ["Port Mora"] and ex.id == "train-0"
    assert ex.contexts == [{"text": "Ada Lovi was born in Port Mora.", "answer_spans": [(21, 30)]}]
    assert ex.meta == {"person_id": 3, "attribute": "birth_city"}
    assert ex.fact == "" and ex.fact_id == "train-0"  # no fact id: the example is its own fact
    ex = tasks.example_from_dict({**row, "fact": "3:birth_city"}, "train-0")
    assert ex.fact == ex.fact_id == "3:birth_city" and "fact" not in ex.meta
    with pytest.raises(task_spec.RowError, match="'fact' must be a string"):
        tasks.example_from_dict({**row, "fact": 3}, "train-0")
    # numpy integers (e.g. spans from an array) become plain ints.
    row["contexts"] = [{"text": "ab", "answer_spans": [np.array([1, 2])]}]
    ex = tasks.example_from_dict(row, "train-0")
    assert ex.contexts[0]["answer_spans"] == [(1, 2)]
    assert all(type(x) is int for x in ex.contexts[0]["answer_spans"][0])
    row["contexts"] = [{"text": "ab", "answer_spans": [[1, 9]]}]
    with pytest.raises(task_spec.RowError, match="answer span"):
        tasks.example_from_dict(row, "train-0")


def test_world_task_reads_local_files_in_the_example_schema(tmp_path):
    row = {"source": "q?", "targets": ["a"], "contexts": [{"text": "xa", "answer_spans": [[1, 2]]}]}
    (tmp_path / "dev.jsonl").write_text(json.dumps(row) + "\n")
    (ex,) = load_task("world_qa", "dev", data_dir=tmp_path)
    assert ex.contexts[0]["answer_spans"] == [(1, 2)]
    row["contexts"][0]["answer_spans"] = [[1, 9]]
    (tmp_path / "dev.jsonl").write_text("\n" + json.dumps(row) + "\n")
    with pytest.raises(TaskDataError, match=r"dev\.jsonl:2: answer span \[1, 9\] lies outside"):
        load_task("world_qa", "dev", data_dir=tmp_path)


def test_task_spec_validates_its_fields():
    with pytest.raises(ValueError, match="category='qa'; valid: closed_book_qa"):
        tasks.TaskSpec("x", "qa", "em_f1", (), tasks.nq_example, hub_id="a/b")
    with pytest.raises(ValueError, match="metric='bleu'; valid: em_f1, accuracy, kilt_em, rouge"):
        tasks.TaskSpec("x", "closed_book_qa", "bleu", (), tasks.nq_example, hub_id="a/b")
    with pytest.raises(ValueError, match="exactly one of hub_id and world_variant"):
        tasks.TaskSpec("x", "closed_book_qa", "em_f1", (), tasks.nq_example)
    with pytest.raises(ValueError, match="dev_split='dev' is not one of its splits"):
        tasks.TaskSpec("x", "closed_book_qa", "em_f1", (), tasks.nq_example, dev_split="dev",
                       hub_id="a/b")  # fmt: skip


def test_jsonl_with_crlf_and_unicode_line_separator_in_a_string(tmp_path):
    rows = [
        {"question": "who wrote\u2028moby dick", "answer": ["Herman Melville"]},
        {"question": "capital of france", "answer": ["Paris"]},
    ]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows)
    (tmp_path / "train.jsonl").write_bytes(text.encode("utf-8"))
    examples = load_task("nq", "train", data_dir=tmp_path)
    assert [ex.source for ex in examples] == ["who wrote\u2028moby dick", "capital of france"]
    assert task_files.validate_jsonl(tmp_path / "train.jsonl") == [1, 2]
