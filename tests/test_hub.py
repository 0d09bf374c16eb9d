from __future__ import annotations

import json
import logging

import pytest
import yaml
from datasets import Dataset
from huggingface_hub import DatasetCard

from hf_otselect.hub import build_card, check_repo_id, config_from_card, push

FAKE_TOKEN = "hf_FAKEtokenDoNotLeak0123456789abcdef"


def _provenance() -> dict:
    from hf_otselect.config import load_config
    from tests.conftest import REPO

    return {
        "method": "got_d", "params": {"eps": 0.1}, "k": 3, "seed": 0, "model": "m", "model_revision": None,
        "rows": {"pool": 5, "target": 2, "selected": 3, "selected_unique": 3},
        "ot_distance": {"target_pool": 1.5, "target_selection": 0.5},
        "fingerprints": {"pool": "abc", "target": "def"},
        "config": load_config(REPO / "configs" / "demo.yaml").to_dict(),
    }


@pytest.fixture
def finished(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    Dataset.from_dict({"text": ["a", "b", "c"], "score": [3.0, 2.0, 1.0]}).save_to_disk(str(folder / "selected"))
    (folder / "selection.json").write_text(json.dumps(_provenance()))
    return folder


def test_card_yaml_round_trips_the_provenance():
    prov = _provenance()
    card = build_card(prov, [3.0, 2.0, 1.0])
    meta = yaml.safe_load(str(card).split("---")[1])
    assert meta["hf_otselect"] == prov
    assert "GOT-D" in card.text and "0.5" in card.text
    assert config_from_card(DatasetCard(str(card))).to_dict() == prov["config"]


@pytest.mark.parametrize("bad", ["no-slash", "a/b/c", "user/na me", "user/..", "", None, 5])
def test_malformed_repo_id_is_refused(bad):
    with pytest.raises(ValueError, match="The 'repo_id' parameter of push"):
        check_repo_id(bad)


def test_push_goes_through_the_libraries_and_never_shows_the_token(finished, monkeypatch, caplog, capsys):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    calls = []
    monkeypatch.setattr(Dataset, "push_to_hub", lambda self, repo_id, **kw: calls.append(("data", repo_id, kw, len(self))))
    monkeypatch.setattr(DatasetCard, "push_to_hub", lambda self, repo_id, **kw: calls.append(("card", repo_id, kw, self.text)))
    with caplog.at_level(logging.DEBUG):
        assert push(finished, "user/selection", private=True) == "user/selection"
    assert [c[0] for c in calls] == ["data", "card"]
    assert calls[0][1] == "user/selection" and calls[0][2]["private"] is True and calls[0][3] == 3
    shown = caplog.text + "".join(capsys.readouterr()) + "".join(str(c) for c in calls)
    shown += "".join(p.read_text(errors="ignore") for p in finished.rglob("*") if p.is_file() and p.suffix in {".json", ".md"})
    assert FAKE_TOKEN not in shown


def test_push_refuses_an_unfinished_folder(tmp_path):
    with pytest.raises(ValueError, match="'output_dir'.*finished selection"):
        push(tmp_path, "user/selection")
