"""A run folder's config record: a finished run is found again, another config is refused, and
a folder written before an option existed still matches while that option is at its default."""

import json

import pytest

from meta_mask import config as config_lib
from meta_mask import workdir


def _finished_run(folder, cfg):
    workdir.record_run(cfg, folder, ["train"])
    workdir.write_json_atomic(folder / "results.json", {"metrics": {"em": 0.5}})


def test_a_finished_run_is_returned_and_another_config_refused(tmp_path):
    cfg = config_lib.Config()
    _finished_run(tmp_path, cfg)
    assert workdir.stored_results(cfg, tmp_path) == {"metrics": {"em": 0.5}}
    other = config_lib.Config(seed=3)
    with pytest.raises(workdir.RunConflict, match=r"seed: 0 \(stored\) vs 3 \(now\)"):
        workdir.stored_results(other, tmp_path)


def test_a_folder_from_before_an_option_existed_holds_its_default(tmp_path):
    cfg = config_lib.Config()
    _finished_run(tmp_path, cfg)
    stored = json.loads((tmp_path / "config.json").read_text())
    del stored["meta"]["inner_frozen"]  # as written by a version without the option
    (tmp_path / "config.json").write_text(json.dumps(stored))
    assert workdir.stored_results(cfg, tmp_path) == {"metrics": {"em": 0.5}}
    changed = config_lib.Config(meta=config_lib.MetaConfig(inner_frozen=("shared",)))
    with pytest.raises(workdir.RunConflict, match=r"meta.inner_frozen: \[\] \(stored\)"):
        workdir.stored_results(changed, tmp_path)
