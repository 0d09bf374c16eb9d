"""Reading a job's inputs (hf_otselect.inputs.load_split): the split a config names, and folders of data files.

Every source honours ``split`` with datasets' syntax (``train[:2]``, ``train[10%:]``, ``a+b``): a data
file (the one split ``train``), a folder of data files (the splits datasets finds in its file names),
a ``save_to_disk`` folder; a split that is not there, and a slice of a stream, are refused naming
``<section>.split`` and the splits there are. A folder of JSON-lines files with a malformed line is
refused naming ``<section>.path``, the file and the line, read whole or streamed. Tiny data, in tmp_path.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict, IterableDataset, load_from_disk

from hf_otselect import cli, fit_selector
from hf_otselect.config import DataConfig
from hf_otselect.inputs import load_split
from tests.conftest import cli_error_line
from tests.test_bad_inputs import no_encoder, template  # noqa: F401 - fixtures

N = 10


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _texts(data: Dataset | IterableDataset) -> list[str]:
    return [row["text"] for row in data]


@pytest.fixture
def pool_file(tmp_path) -> Path:
    return _jsonl(tmp_path / "pool.jsonl", [f"pool row {i}" for i in range(N)])


@pytest.fixture
def split_folder(tmp_path) -> Path:
    """A folder of data files whose names give datasets two splits, train and test."""
    _jsonl(tmp_path / "splits" / "train.jsonl", [f"train row {i}" for i in range(N)])
    _jsonl(tmp_path / "splits" / "test.jsonl", [f"test row {i}" for i in range(4)])
    return tmp_path / "splits"


# ------------------------------------------------------------------------------------- split: data files
@pytest.mark.parametrize(("split", "rows"), [
    ("train", list(range(N))),
    ("train[:2]", [0, 1]),
    ("train[10%:]", list(range(1, N))),
    ("train[-3:]", [7, 8, 9]),
    ("train[20%:40%]", [2, 3]),
    ("train[:1]+train[-1:]", [0, 9]),
])
def test_a_data_file_is_the_split_train_sliced_as_datasets_slices(pool_file, split, rows):
    data = load_split(DataConfig(path=str(pool_file), split=split), "pool")
    assert _texts(data) == [f"pool row {i}" for i in rows]


def test_max_rows_applies_after_the_slice(pool_file):
    data = load_split(DataConfig(path=str(pool_file), split="train[5:]", max_rows=2), "pool")
    assert _texts(data) == ["pool row 5", "pool row 6"]


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("split", ["zzz", "test", "zzz[:2]", "train+zzz"])
def test_a_split_a_data_file_does_not_have_is_named(pool_file, streaming, split):
    with pytest.raises(ValueError, match=template("target.split") + re.escape(f"a split of '{pool_file}': one of ['train']")
                       + rf".* \(no split '(zzz|test)' there\)\. Got '{re.escape(split)}' instead\."):
        load_split(DataConfig(path=str(pool_file), split=split, streaming=streaming), "target")


@pytest.mark.parametrize("split", ["train[:3", "train[a:b]", "train]", "tra in", ""])
def test_a_split_that_is_no_split_syntax_is_named(pool_file, split):
    with pytest.raises(ValueError, match=template("pool.split") + r".*\(not a split name or slice datasets reads\)\. "
                       rf"Got '{re.escape(split)}' instead\."):
        load_split(DataConfig(path=str(pool_file), split=split), "pool")


def test_a_slice_that_datasets_refuses_is_named_with_its_reason(pool_file):
    with pytest.raises(ValueError, match=template("pool.split") + r".*\(Using \"pct1_dropremainder\" rounding on a split with less "
                       r"than 100 elements.*\)\. Got 'train\[:10%\]\(pct1_dropremainder\)' instead\."):
        load_split(DataConfig(path=str(pool_file), split="train[:10%](pct1_dropremainder)"), "pool")


def test_a_streamed_data_file_reads_its_whole_split_and_refuses_a_slice_by_name(pool_file):
    stream = load_split(DataConfig(path=str(pool_file), split="train", streaming=True), "pool")
    assert isinstance(stream, IterableDataset) and len(_texts(stream)) == N
    with pytest.raises(ValueError, match=template("pool.split") + re.escape(f"a whole split of '{pool_file}' when it is streamed: "
                       "one of ['train'] (datasets streams whole splits only; use max_rows") + r".*\)\. Got 'train\[:2\]' instead\."):
        load_split(DataConfig(path=str(pool_file), split="train[:2]", streaming=True), "pool")


def test_a_streamed_hub_id_with_a_slice_is_refused_before_the_hub_is_asked():
    with pytest.raises(ValueError, match=template("pool.split") + r"a whole split of 'user/data' when it is streamed "
                       r"\(datasets streams .*\)\. Got 'train\[:5\]' instead\."):
        load_split(DataConfig(path="user/data", split="train[:5]", streaming=True), "pool")


# ------------------------------------------------------------------------------------- split: folders
@pytest.mark.parametrize("streaming", [False, True])
def test_a_folder_of_files_reads_the_split_its_file_names_give(split_folder, streaming):
    data = load_split(DataConfig(path=str(split_folder), split="test", streaming=streaming), "pool")
    assert _texts(data) == [f"test row {i}" for i in range(4)]


def test_a_folder_of_files_slices_and_adds_splits(split_folder):
    data = load_split(DataConfig(path=str(split_folder), split="train[:2]+test[-1:]"), "pool")
    assert _texts(data) == ["train row 0", "train row 1", "test row 3"]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_split_a_folder_of_files_does_not_have_is_named_with_its_splits(split_folder, streaming):
    with pytest.raises(ValueError, match=template("pool.split") + re.escape(f"a split of '{split_folder}': one of ['train', 'test']")
                       + r".* \(no split 'validation' there\)\. Got 'validation' instead\."):
        load_split(DataConfig(path=str(split_folder), split="validation", streaming=streaming), "pool")


def test_a_folder_without_data_files_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=template("pool.path") + r"a folder holding data files .*Got '.*empty' instead"):
        load_split(DataConfig(path=str(tmp_path / "empty")), "pool")


@pytest.mark.parametrize("streaming", [False, True])
def test_a_save_to_disk_dict_is_sliced_and_a_missing_split_named(tmp_path, streaming):
    whole = Dataset.from_dict({"text": [f"row {i}" for i in range(N)]})
    DatasetDict(a=whole, b=whole.select(range(3))).save_to_disk(tmp_path / "dd")
    data = load_split(DataConfig(path=str(tmp_path / "dd"), split="a[-2:]+b[:1]", streaming=streaming), "pool")
    assert isinstance(data, IterableDataset) == streaming  # a saved folder is in hand: a stream of it can be sliced first
    assert _texts(data) == ["row 8", "row 9", "row 0"]
    with pytest.raises(ValueError, match=template("pool.split") + ".*" + re.escape("one of ['a', 'b']") + ".*Got 'train' instead"):
        load_split(DataConfig(path=str(tmp_path / "dd"), split="train", streaming=streaming), "pool")


def test_a_saved_dataset_is_the_split_train_or_its_own_name(tmp_path, pool_file):
    Dataset.from_dict({"text": [f"row {i}" for i in range(N)]}).save_to_disk(tmp_path / "plain")
    assert _texts(load_split(DataConfig(path=str(tmp_path / "plain"), split="train[50%:]"), "pool")) == [f"row {i}" for i in range(5, N)]
    with pytest.raises(ValueError, match=template("pool.split") + ".*" + re.escape("one of ['train']") + ".*Got 'test' instead"):
        load_split(DataConfig(path=str(tmp_path / "plain"), split="test"), "pool")
    named = load_split(DataConfig(path=str(pool_file), split="train[:4]"), "pool")
    named.save_to_disk(tmp_path / "named")  # remembers the split it was read as
    assert load_from_disk(str(tmp_path / "named")).split == "train"
    assert len(load_split(DataConfig(path=str(tmp_path / "named"), split="train[:1]"), "pool")) == 1


# ------------------------------------------------------------------------------------- split: the CLI
def _config(tmp_path: Path, pool: Path, target: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(f"pool:\n  path: {pool}\ntarget:\n  path: {target}\nmethod: random\nk: 2\nreport: false\n"
                    f"cache_dir: {tmp_path / 'cache'}\n", encoding="utf-8")
    return path


@pytest.fixture
def job(tmp_path, pool_file) -> Path:
    return _config(tmp_path, pool_file, _jsonl(tmp_path / "target.jsonl", ["a target row", "another target row"]))


@pytest.mark.parametrize(("split", "n"), [("train[:2]", 2), ("train[30%:]", 7), ("train", N)])
def test_cli_select_honours_pool_split(tmp_path, job, split, n):
    out = tmp_path / "out"
    assert cli.main(["select", "--config", str(job), f"pool.split={split}", f"output_dir={out}"]) == 0
    assert load_from_disk(str(out))["scored"].num_rows == n


@pytest.mark.parametrize("side", ["pool", "target"])
@pytest.mark.parametrize("streaming", ["false", "true"])
def test_cli_select_names_a_split_that_is_not_there(tmp_path, job, capsys, no_encoder, side, streaming):
    out = tmp_path / "out"
    status = cli.main(["select", "--config", str(job), f"{side}.split=zzz", f"{side}.streaming={streaming}", f"output_dir={out}"])
    assert status == 2
    assert re.search(template(f"{side}.split") + r".*one of \['train'\].*Got 'zzz' instead", cli_error_line(capsys))
    assert not out.exists()


def test_cli_select_names_a_slice_of_a_streamed_pool(tmp_path, job, capsys, no_encoder):
    status = cli.main(["select", "--config", str(job), "pool.split=train[:2]", "pool.streaming=true", f"output_dir={tmp_path / 'out'}"])
    assert status == 2
    assert re.search(template("pool.split") + r"a whole split .* when it is streamed.*Got 'train\[:2\]' instead", cli_error_line(capsys))


@pytest.fixture
def saved_selector(tmp_path, no_encoder) -> Path:
    pool = Dataset.from_dict({"text": [f"pool row {i}" for i in range(N)]})
    fit_selector(pool, ["a target row", "another target row"], "random", cache_dir=tmp_path / "cache").save_pretrained(tmp_path / "sel")
    return tmp_path / "sel"


def test_cli_apply_honours_split_and_names_one_that_is_not_there(tmp_path, split_folder, saved_selector, capsys):
    args = ["apply", str(saved_selector), str(split_folder), "--fraction", "1.0"]
    assert cli.main([*args, str(tmp_path / "o1"), "--split", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["rows_seen"] == 4
    assert cli.main([*args, str(tmp_path / "o2"), "--split", "zzz"]) == 2
    assert re.search(template("pool.split") + ".*" + re.escape("one of ['train', 'test']") + r".*Got 'zzz' instead", cli_error_line(capsys))


# ------------------------------------------------------------------------------------- folder of JSON lines
@pytest.fixture
def broken_folder(tmp_path) -> tuple[Path, Path]:
    """A folder of JSON-lines files: a.jsonl (3 good rows), b.jsonl (a good row, then a malformed line 2)."""
    _jsonl(tmp_path / "broken" / "a.jsonl", ["a 0", "a 1", "a 2"])
    bad = tmp_path / "broken" / "b.jsonl"
    bad.write_text('{"text": "b 0"}\n{bad\n{"text": "b 2"}\n', encoding="utf-8")
    return tmp_path / "broken", bad


@pytest.mark.parametrize("streaming", [False, True])
def test_a_folder_with_a_malformed_json_line_names_the_file_and_line(broken_folder, streaming):
    folder, bad = broken_folder
    with pytest.raises(ValueError, match=re.escape(f"The 'pool.path' file '{bad}' has a malformed JSON line 2: ")):
        load_split(DataConfig(path=str(folder), streaming=streaming), "pool")


def test_a_folder_read_whole_names_a_malformed_line_in_a_split_it_was_not_asked_for(split_folder):
    bad = split_folder / "test.jsonl"  # datasets generates every split of a folder it reads whole
    bad.write_text('{"text": "test row 0"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"The 'pool.path' file '{bad}' has a malformed JSON line 2: ")):
        load_split(DataConfig(path=str(split_folder), split="train"), "pool")
    assert len(load_split(DataConfig(path=str(split_folder), split="train", streaming=True), "pool").take(2).to_list()) == 2


@pytest.mark.parametrize("streaming", [False, True])
def test_a_folder_with_a_json_line_that_is_no_object_names_the_file_and_line(tmp_path, streaming):
    _jsonl(tmp_path / "rows" / "a.jsonl", ["a 0"])
    bad = tmp_path / "rows" / "b.jsonl"
    bad.write_text('{"text": "b 0"}\n["a list"]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"The 'target.path' file '{bad}' has a JSON line 2 that is not an object")):
        load_split(DataConfig(path=str(tmp_path / "rows"), streaming=streaming), "target")


def _rows(n: int, first: int = 0) -> list[str]:
    return [json.dumps({"text": f"row {i:03d}"}) for i in range(first, first + n)]  # 20 bytes a line with its newline


@pytest.mark.parametrize(("max_rows", "refused"), [(2, False), (9, True), (None, True)])
def test_a_streamed_folder_is_checked_as_far_as_the_stream_reads(tmp_path, monkeypatch, max_rows, refused):
    # Tables of 64 bytes: the stream of max_rows rows reads its rows' table and one more (the next
    # file's first, or its own next), 2 x 64 bytes past its last row at most; the check covers that.
    monkeypatch.setattr(sys.modules["hf_otselect.inputs"], "_STREAM_CHUNK_BYTES", 64)
    folder = tmp_path / "long"
    folder.mkdir()
    (folder / "a.jsonl").write_text("\n".join(_rows(3)) + "\n", encoding="utf-8")
    bad = folder / "b.jsonl"
    bad.write_text("\n".join(_rows(10, 3) + ["{bad"] + _rows(5, 13)) + "\n", encoding="utf-8")  # line 11 of b: byte 200
    spec = DataConfig(path=str(folder), streaming=True, max_rows=max_rows)
    if refused:  # max_rows=9 ends in b at byte 120; its next two tables reach line 11, where datasets would fail mid-run
        with pytest.raises(ValueError, match=re.escape(f"The 'pool.path' file '{bad}' has a malformed JSON line 11")):
            load_split(spec, "pool")
    else:  # the stream never reaches line 11 of b: not refused, and it reads
        assert _texts(load_split(spec, "pool")) == ["row 000", "row 001"]


def test_a_streamed_file_with_a_bad_line_just_past_max_rows_is_named_before_the_stream_meets_it(tmp_path):
    path = tmp_path / "tail_broken.jsonl"  # datasets parses the whole (small) file as one table, line 5 included
    path.write_text('{"text": "a"}\n{"text": "b"}\n\n{"text": "c"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"The 'pool.path' file '{path}' has a malformed JSON line 5")):
        load_split(DataConfig(path=str(path), streaming=True, max_rows=3), "pool")


@pytest.mark.parametrize("streaming", ["false", "true"])
def test_cli_select_on_a_folder_with_a_malformed_line_is_one_line_naming_file_and_line(tmp_path, job, broken_folder, capsys,
                                                                                         no_encoder, streaming):
    folder, bad = broken_folder
    status = cli.main(["select", "--config", str(job), f"pool.path={folder}", f"pool.streaming={streaming}",
                       f"output_dir={tmp_path / 'out'}"])
    assert status == 2
    assert f"The 'pool.path' file '{bad}' has a malformed JSON line 2" in cli_error_line(capsys)
