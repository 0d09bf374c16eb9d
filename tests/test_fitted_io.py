"""The files of a fitted selector (hf_otselect.fitted_io): where from_pretrained looks, and what save_pretrained writes over.

``from_pretrained`` names its ``source`` when it is no path at all, no folder, a file, or a Hub id that
cannot be read (offline and not cached; online: no such repository, or one without a saved selector),
and still asks the Hub for an id that is no local folder. ``save_pretrained`` writes only into a new or
empty folder or over a saved selector: a folder holding the user's own files is left alone, by the
same rule as ``hf-otselect fit --out``. Tiny data, in tmp_path.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from hf_otselect import FittedSelector, cli, fit_selector
from hf_otselect.fitted_io import CARD_FILE, CONFIG_FILE, STATE_FILE, check_save_folder, holds_saved_selector
from tests.conftest import REPO, cli_error_line
from tests.test_bad_inputs import no_encoder, template  # noqa: F401 - fixtures

OURS = sorted([CARD_FILE, CONFIG_FILE, STATE_FILE])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> FittedSelector:
    """A random-method fit on ten rows (no encoder needed)."""
    pool = Dataset.from_dict({"text": [f"pool row {i}" for i in range(10)]})
    return fit_selector(pool, ["a target row", "another target row"], "random", cache_dir=tmp_path_factory.mktemp("cache"))


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------------------------- from_pretrained: source
@pytest.mark.parametrize("source", [None, 5, 1.5, True, ["a/b"], b"a/b"])
def test_a_source_that_is_no_path_is_a_named_type_error(source):
    with pytest.raises(TypeError, match=template("source") + r"a str or os\.PathLike: an existing folder holding a saved selector, "
                       rf"or a Hub model repository id 'user/name'\. Got {re.escape(repr(source))} instead\."):
        FittedSelector.from_pretrained(source)


def test_an_empty_source_is_named():
    with pytest.raises(ValueError, match=template("source") + r".*Got '' instead\."):
        FittedSelector.from_pretrained("")


@pytest.mark.parametrize("source", ["some/missing/local/folder", "missing_folder", "./x/y", "../x", "~/no_such_selector_here/x",
                                    "a//b", "bad name/x"])
def test_a_missing_local_folder_is_named_with_the_argument_and_the_value(source):
    with pytest.raises(ValueError, match=template("source") + r"an existing folder holding a saved selector, or a Hub model "
                       rf"repository id 'user/name' \({re.escape(repr(source))} is neither: no such folder.*\)\. "
                       rf"Got {re.escape(repr(source))} instead\."):
        FittedSelector.from_pretrained(source)


def test_a_missing_path_object_is_read_as_a_folder_only(tmp_path):
    with pytest.raises(ValueError, match=template("source") + r".*is neither: no such folder; a PosixPath is read as a local "
                       r"folder, never as a Hub id\)"):
        FittedSelector.from_pretrained(Path("user/name"))


def test_a_file_as_source_is_named(tmp_path, fitted):
    fitted.save_pretrained(tmp_path / "sel")
    with pytest.raises(ValueError, match=template("source") + r".*\(the folder that holds fitted_selector\.json, not a file\)\. "
                       r"Got '.*fitted_selector\.json' instead\."):
        FittedSelector.from_pretrained(tmp_path / "sel" / CONFIG_FILE)
    assert FittedSelector.from_pretrained(tmp_path / "sel").fingerprint == fitted.fingerprint


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Offline, with an empty Hub cache: nothing can be found but local folders."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))


def test_a_hub_id_offline_and_not_cached_is_named_not_a_hub_traceback(offline):
    with pytest.raises(ValueError, match=template("source") + r".*\('user/absent' is neither: no such local folder; offline or the "
                       r"Hub unreachable, and no copy in the local Hub cache\)\. Got 'user/absent' instead\.") as info:
        FittedSelector.from_pretrained("user/absent")
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no huggingface_hub chain shown


@pytest.mark.parametrize("selector", ["missing_folder", "some/missing/local/folder", "x/y"])
def test_cli_apply_with_a_selector_that_is_not_there_is_one_line(tmp_path, capsys, offline, no_encoder, selector):
    pool = tmp_path / "data.jsonl"
    pool.write_text('{"text": "a row"}\n', encoding="utf-8")
    assert cli.main(["apply", selector, str(pool), str(tmp_path / "out"), "--fraction", "0.5"]) == 2
    line = cli_error_line(capsys)
    assert re.search(template("source") + rf".*\('{re.escape(selector)}' is neither: .*\)\. Got '{re.escape(selector)}' instead\.", line)
    assert not (tmp_path / "out").exists()


class _NotFoundHub(http.server.ThreadingHTTPServer):
    """A Hub that finds nothing: each file request answered as the Hub answers its error, by X-Error-Code; requests logged."""

    daemon_threads = True
    # repository -> the Hub's error code for any of its files
    CODES = {"user/absent": (404, "RepoNotFound"), "user/cardonly": (404, "EntryNotFound"), "user/gated": (403, "GatedRepo"),
             "user/sel": (404, "RevisionNotFound")}

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _NotFoundHandler)
        self.asked: list[str] = []

    def __enter__(self) -> _NotFoundHub:
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


class _NotFoundHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def _answer(self, body: bool) -> None:
        self.server.asked.append(f"{self.command} {self.path}")
        repo = "/".join(self.path.strip("/").split("/")[:2])
        status, code = _NotFoundHub.CODES.get(repo, (404, "RepoNotFound"))
        payload = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
        self._answer(body=False)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._answer(body=True)


_ONLINE_SCRIPT = textwrap.dedent("""
    import sys
    from hf_otselect import FittedSelector
    for source, revision in (("user/absent", None), ("user/cardonly", None), ("user/gated", None), ("user/sel", "nope")):
        try:
            FittedSelector.from_pretrained(source, revision=revision)
        except ValueError as err:
            print(f"{type(err).__name__}|{err}|{err.__cause__!r}")
""")


def _run_online(tmp_path: Path, endpoint: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5", HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", _ONLINE_SCRIPT], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)


def test_online_an_id_that_is_no_folder_still_goes_to_the_hub_and_each_not_found_is_named(tmp_path):
    with _NotFoundHub() as hub:
        proc = _run_online(tmp_path, f"http://127.0.0.1:{hub.server_address[1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for repo in ("user/absent", "user/cardonly", "user/gated", "user/sel"):
        assert any(f"/{repo}/resolve/" in a for a in hub.asked), hub.asked  # asked the Hub, not only the local disk
    absent, cardonly, gated, revision = proc.stdout.strip().splitlines()
    neither = template("source") + r".*\('{0}' is neither: {1}\)\. Got '{0}' instead\.\|None"
    assert re.fullmatch(r"ValueError\|" + neither.format("user/absent", "no such local folder, and no Hub model repository of "
                                                          "that id, or a private one and no token that may read it"), absent), absent
    assert re.fullmatch(r"ValueError\|" + neither.format("user/cardonly", r"a Hub repository without fitted_selector\.json, so "
                                                          "not a saved selector"), cardonly), cardonly
    assert re.fullmatch(r"ValueError\|" + neither.format("user/gated", "a gated Hub repository: accept its conditions on the Hub "
                                                          "and pass a token"), gated), gated
    assert re.fullmatch(r"ValueError\|" + template("revision") + r"a branch, tag or commit of the Hub repository 'user/sel'\. "
                        r"Got 'nope' instead\.\|None", revision), revision


# ------------------------------------------------------------------------------------- save_pretrained: whose folder
def test_save_pretrained_leaves_a_folder_of_the_users_own_files_alone(tmp_path, fitted):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "README.md").write_text("my own notes\n", encoding="utf-8")
    (folder / "data.csv").write_text("a,b\n", encoding="utf-8")
    before = _contents(folder)
    with pytest.raises(FileExistsError, match=template("save_directory") + r"a new or empty folder, or one holding a saved selector "
                       r".*holds files that are not a saved selector \(README\.md, data\.csv\); it is left alone.*"
                       rf"Got {re.escape(repr(str(folder)))} instead\."):
        fitted.save_pretrained(folder)
    assert _contents(folder) == before  # nothing written, nothing left behind


def test_a_config_file_of_another_format_does_not_make_a_folder_ours(tmp_path, fitted):
    folder = tmp_path / "foreign"
    folder.mkdir()
    (folder / CONFIG_FILE).write_text(json.dumps({"format": "someone.elses"}), encoding="utf-8")
    (folder / "README.md").write_text("theirs\n", encoding="utf-8")
    before = _contents(folder)
    assert not holds_saved_selector(folder)
    with pytest.raises(FileExistsError, match=r"holds files that are not a saved selector \(README\.md, fitted_selector\.json\)"):
        fitted.save_pretrained(folder)
    assert _contents(folder) == before


def test_saving_again_over_a_saved_selector_replaces_its_own_files_only(tmp_path, fitted):
    folder = tmp_path / "sel"
    fitted.save_pretrained(folder)
    assert holds_saved_selector(folder)
    (folder / "README.md").write_text("edited card\n", encoding="utf-8")  # a file of ours: replaced
    (folder / "notes.txt").write_text("kept\n", encoding="utf-8")  # not ours: never touched
    fitted.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*OURS, "notes.txt"])
    assert (folder / "notes.txt").read_text() == "kept\n" and "Calibration" in (folder / "README.md").read_text()
    assert FittedSelector.from_pretrained(folder).fingerprint == fitted.fingerprint


@pytest.mark.parametrize("leftover", [[], [".state.safetensors.tmp"], [".fitted_selector.json.tmp", ".README.md.tmp"]])
def test_an_empty_folder_or_one_with_only_an_interrupted_saves_temporaries_is_written(tmp_path, fitted, leftover):
    folder = tmp_path / "fresh"
    folder.mkdir()
    for name in leftover:
        (folder / name).write_bytes(b"partial")
    fitted.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == OURS


@pytest.mark.parametrize("written", [[STATE_FILE], [STATE_FILE, CARD_FILE], [STATE_FILE, CARD_FILE, ".fitted_selector.json.tmp"]])
def test_what_an_interrupted_save_left_is_written_over(tmp_path, fitted, written):
    # save_pretrained writes the state, the card, then the JSON: a save stopped early leaves a prefix of that.
    fitted.save_pretrained(tmp_path / "whole")
    folder = tmp_path / "partial"
    folder.mkdir()
    for name in written:
        (folder / name).write_bytes((tmp_path / "whole" / name.strip(".").removesuffix(".tmp")).read_bytes())
    fitted.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == OURS
    assert FittedSelector.from_pretrained(folder).fingerprint == fitted.fingerprint


@pytest.mark.parametrize("state", [b"not safetensors", None])
def test_a_state_file_that_is_not_ours_does_not_make_a_folder_ours(tmp_path, fitted, state):
    from safetensors.numpy import save

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / STATE_FILE).write_bytes(state if state is not None else save({"weight": np.zeros(3, dtype=np.float32)}))
    (folder / CARD_FILE).write_text("my model\n", encoding="utf-8")
    before = _contents(folder)
    with pytest.raises(FileExistsError, match=r"holds files that are not a saved selector \(README\.md, state\.safetensors\)"):
        fitted.save_pretrained(folder)
    assert _contents(folder) == before


def test_the_check_names_the_parameter_and_function_it_is_given(tmp_path):
    (tmp_path / "README.md").write_text("mine\n", encoding="utf-8")
    with pytest.raises(FileExistsError, match=template("out") + r".*Got .* instead\.") as info:
        check_save_folder(tmp_path, "out", "hf-otselect fit")
    assert "parameter of hf-otselect fit" in str(info.value)
    assert check_save_folder(tmp_path / "new", "out", "hf-otselect fit") == tmp_path / "new"
    assert not (tmp_path / "new").exists()  # the check creates nothing


def test_cli_fit_into_a_folder_with_a_foreign_config_file_leaves_it_alone(tmp_path, capsys, no_encoder):
    # fit --out's own up-front check sees a fitted_selector.json and lets the fit run; the save refuses.
    folder = tmp_path / "foreign"
    folder.mkdir()
    (folder / CONFIG_FILE).write_text("{}", encoding="utf-8")
    (folder / "README.md").write_text("theirs\n", encoding="utf-8")
    before = _contents(folder)
    pool, target = tmp_path / "pool.jsonl", tmp_path / "target.jsonl"
    pool.write_text("".join(json.dumps({"text": f"pool row {i}"}) + "\n" for i in range(6)), encoding="utf-8")
    target.write_text(json.dumps({"text": "a target row"}) + "\n", encoding="utf-8")
    status = cli.main(["fit", "--out", str(folder), "--overwrite", f"pool.path={pool}", f"target.path={target}", "method=random",
                       f"cache_dir={tmp_path / 'cache'}"])
    assert status == 2
    assert "holds files that are not a saved selector (README.md, fitted_selector.json); it is left alone" in cli_error_line(capsys)
    assert _contents(folder) == before
