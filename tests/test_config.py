from __future__ import annotations

import pytest

from hf_otselect.config import SelectionConfig, load_config
from tests.conftest import REPO


def _write(tmp_path, text: str):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_shipped_configs_load_and_validate():
    names = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    assert {"demo", "got_d", "tsds", "random", "similarity", "dsir"} <= set(names)
    for name in names:
        config = load_config(REPO / "configs" / f"{name}.yaml")
        assert isinstance(config, SelectionConfig)
        assert config.pool.path and config.target.path


def test_overrides_are_typed_and_dotted():
    config = load_config(REPO / "configs" / "got_d.yaml", ["k=7", "params.eps=0.05", "pool.streaming=true", "overwrite=true"])
    assert config.k == 7 and isinstance(config.k, int)
    assert config.params["eps"] == 0.05
    assert config.pool.streaming is True and config.overwrite is True
    assert config.embedding.model is None  # default kept


def test_unknown_key_is_refused_with_known_keys(tmp_path):
    path = _write(tmp_path, "pool: {path: a.jsonl}\ntarget: {path: b.jsonl}\nbudget: 5\n")
    with pytest.raises(ValueError, match=r"Unknown config key 'budget'.*'k'"):
        load_config(path)
    with pytest.raises(ValueError, match=r"Unknown config key 'pool.colum'"):
        load_config(REPO / "configs" / "demo.yaml", ["pool.colum=text"])


def test_wrong_type_is_refused(tmp_path):
    path = _write(tmp_path, "pool: {path: a.jsonl}\ntarget: {path: b.jsonl}\nk: ten\n")
    with pytest.raises(TypeError, match=r"The 'k' parameter of the job config must be a int. Got 'ten' instead."):
        load_config(path)


def test_missing_target_is_refused(tmp_path):
    path = _write(tmp_path, "pool: {path: a.jsonl}\n")
    with pytest.raises(ValueError, match=r"'target.path'"):
        load_config(path)


def test_malformed_yaml_and_missing_file(tmp_path):
    path = _write(tmp_path, "pool: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_unsafe_yaml_tags_are_not_executed(tmp_path):
    path = _write(tmp_path, "pool: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(path)


def test_bad_values_fail_before_work():
    with pytest.raises(ValueError, match="'method'"):
        load_config(REPO / "configs" / "demo.yaml", ["method=magic"])
    with pytest.raises(ValueError, match="'k'"):
        load_config(REPO / "configs" / "demo.yaml", ["k=0"])
    with pytest.raises(ValueError, match="'hub.repo_id'"):
        load_config(REPO / "configs" / "demo.yaml", ["push_to_hub=true"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(REPO / "configs" / "demo.yaml", ["k"])
