"""Result tables: mean +- std over seeds, paired differences against a reference policy,
diagnostics."""

from __future__ import annotations

import re

import numpy as np
import pytest

from meta_mask.evaluation import report
from meta_mask.evaluation.stats import PairingError

FACTS = [f"{p}:employer" for p in range(10)]


def _run(policy, seed, scores, *, task="world_qa", fmt="masked_spans", **extra):
    """A results.json of one run: per-fact em scores and their mean as the metric."""
    return {
        "task": task,
        "policy": policy,
        "policy_task": "",
        "output_format": fmt,
        "seed": seed,
        "metrics": {"em": float(np.mean(scores)), "n": 2 * len(scores)},
        "facts": {"metric": "em", "scores": dict(zip(FACTS, map(float, scores), strict=True))},
        "seconds": {"finetune": 60.0},
        **extra,
    }


def _rows(table: str) -> dict[str, list[str]]:
    """{policy: its row's cells} of the first markdown table."""
    rows = {}
    for line in table.split("\n\n")[0].splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[1]] = cells
    return rows


def _grid(shift: float = 0.5) -> list[dict]:
    """Three seeds of salient_spans, of random_tokens (equal to it) and of meta (+shift)."""
    rng = np.random.default_rng(0)
    base = {s: (rng.random(len(FACTS)) < 0.4).astype(float) for s in range(3)}
    runs = []
    for s in range(3):
        runs.append(_run("salient_spans", s, base[s]))
        runs.append(_run("random_tokens", s, base[s]))  # identical to the reference
        runs.append(_run("meta", s, base[s] + shift))  # a constant shift
    return runs


def test_table_shows_paired_differences_against_the_reference():
    table = report.results_table(_grid(), reference="salient_spans")
    header = table.splitlines()[0]
    assert "| seeds | em | minutes | Δ vs salient_spans [95% CI] |" in header
    rows = _rows(table)
    assert rows["salient_spans"][-1] == "(reference)"
    assert rows["random_tokens"][-1] == "+0.000 [+0.000, +0.000]"
    assert rows["meta"][-1] == "+0.500 [+0.500, +0.500] *"
    assert rows["meta"][3] == "3"
    assert "Δ: the difference of the main metric (em) from salient_spans" in table
    assert "10,000 replicates" in table
    # Reproducible: the bootstrap's seed is fixed.
    assert table == report.results_table(_grid(), reference="salient_spans")


def test_a_noisy_difference_gets_an_interval_around_its_mean():
    rng = np.random.default_rng(1)
    runs = []
    for s in range(4):
        ref = rng.random(len(FACTS))
        runs += [_run("salient_spans", s, ref), _run("meta", s, ref + rng.normal(0.1, 0.2, 10))]
    cell = _rows(report.results_table(runs, reference="salient_spans"))["meta"][-1]
    mean, low, high = map(float, re.match(r"(\S+) \[(\S+), (\S+)\]", cell).groups())
    assert low < mean < high
    want = np.mean([r["metrics"]["em"] for r in runs if r["policy"] == "meta"]) - np.mean(
        [r["metrics"]["em"] for r in runs if r["policy"] == "salient_spans"]
    )
    assert mean == pytest.approx(want, abs=5e-4)


def test_without_reference_runs_the_table_says_so_instead_of_the_column():
    runs = [r for r in _grid() if r["policy"] != "salient_spans"]
    table = report.results_table(runs, reference="salient_spans")
    assert "Δ" not in table
    assert "No salient_spans runs among these, so no paired differences" in table
    assert "--sweep.reference" in table
    # No reference asked (one run's results.md): neither the column nor the note.
    plain = report.results_table(runs)
    assert "Δ" not in plain and "No " not in plain
    assert plain == table.split("\n\n")[0]


def test_rows_without_a_pair_say_why():
    runs = _grid()
    runs.append(_run("meta", 0, np.ones(10), task="world_qa_dates"))  # no reference on the task
    runs.append(_run("meta", 0, np.ones(10), fmt="full_sentence"))  # nor in this format
    runs.append(_run("meta", 9, np.ones(10), fmt="full_sentence"))
    runs.append(_run("salient_spans", 1, np.ones(10), fmt="full_sentence"))  # other seed
    old = _run("none", 0, np.ones(10))
    del old["facts"]  # a run from before per-fact scores
    runs.append(old)
    partial = [r for r in _grid() if not (r["policy"] == "meta" and r["seed"] == 2)]
    runs += [_run("supervised", s, np.ones(10)) for s in range(5)]
    lines = report.results_table(runs, reference="salient_spans").split("\n\n")[0].splitlines()
    cells = {(c[0], c[1], c[2]): c[-1] for c in (
        [x.strip() for x in line.strip("|").split("|")] for line in lines[2:])}  # fmt: skip
    assert cells[("world_qa_dates", "meta", "masked_spans")] == "no reference runs"
    assert cells[("world_qa", "meta", "full_sentence")] == "no paired seeds"
    assert cells[("world_qa", "none", "masked_spans")] == "no per-fact scores"
    # 5 supervised seeds, 3 of them paired.
    assert cells[("world_qa", "supervised", "masked_spans")].endswith("* (3 seeds)")
    # Every run of a row paired (2 meta seeds, 3 reference seeds): no note.
    rows = _rows(report.results_table(partial, reference="salient_spans"))
    assert rows["meta"][-1] == "+0.500 [+0.500, +0.500] *"


def test_transfer_runs_are_compared_with_the_reference_on_their_task():
    runs = [r for r in _grid() if r["policy"] == "salient_spans"]
    runs += [{**_run("meta", s, np.ones(10)), "policy_task": "world_qa_dates"} for s in range(3)]
    rows = _rows(report.results_table(runs, reference="salient_spans"))
    assert rows["meta (from world_qa_dates)"][-1].endswith("*")


def test_facts_that_do_not_pair_are_an_error_naming_them():
    runs = _grid()
    meta = next(r for r in runs if r["policy"] == "meta" and r["seed"] == 1)
    del meta["facts"]["scores"]["7:employer"]
    with pytest.raises(
        PairingError, match=r"world_qa / meta / masked_spans's run of seed 1.*'7:employer'"
    ):
        report.results_table(runs, reference="salient_spans")
    runs = _grid() + [_run("meta", 1, np.zeros(10))]
    with pytest.raises(
        PairingError, match="two runs of world_qa / meta / masked_spans with seed 1"
    ):
        report.results_table(runs, reference="salient_spans")
    runs = _grid()
    runs[0]["facts"]["metric"] = "f1"
    with pytest.raises(PairingError, match=r"different metrics \['em', 'f1'\]"):
        report.results_table(runs, reference="salient_spans")


def test_diagnostics_are_averaged_over_seeds_in_a_second_table():
    runs = _grid()
    for r in runs:
        if r["policy"] == "meta":
            r["diagnostics"] = {"mask_asked_values": 0.5 + 0.1 * r["seed"], "mask_names": 0.2}
    runs[0]["diagnostics"] = {"cloze": 0.4}  # salient_spans seed 0 only
    table = report.results_table(runs, reference="salient_spans")
    first, _, diagnostics = table.partition("Diagnostics (mean over seeds):\n\n")
    assert "mask_names" not in first
    lines = diagnostics.strip().splitlines()
    assert lines[0] == "| task | policy | format | seeds | cloze | mask_asked_values | mask_names |"
    assert "| world_qa | salient_spans | masked_spans | 3 | 0.400 |  |  |" in lines
    assert "| world_qa | meta | masked_spans | 3 |  | 0.600 | 0.200 |" in lines
    assert not any("random_tokens" in line for line in lines)  # it has none
    assert report.diagnostics_table(_grid()) == ""
    assert "Diagnostics" not in report.results_table(_grid(), reference="salient_spans")
