"""The output folder's life cycle (hf_otselect/outdir.py): a job deletes only what it wrote.

Every refusal is checked by seeing the user's files still there, byte for byte, and the encoder
never loaded (the refusals come before any work). The lock is held by a real second process.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_otselect.config import load_config
from hf_otselect.job import output_paths, run_job
from hf_otselect.outdir import MARKER, OutputFolder, OutputFolderBusy, record_written
from tests.conftest import REPO

EMBED = sys.modules["hf_otselect.embed"]


@pytest.fixture
def no_encoder(monkeypatch):
    def tripwire(*args, **kwargs):
        pytest.fail("the encoder was loaded before the output folder was refused")

    monkeypatch.setattr(EMBED, "load_encoder", tripwire)


def _user_files(folder: Path, seed: str) -> dict[str, bytes]:
    """Plant some files of the user's (nested, of several sizes) and return their bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    planted = {"notes.txt": f"mine {seed}".encode(), "data/train.jsonl": b'{"text": "x"}\n' * 7, "data/deep/model.bin": bytes(range(256)) * 3}
    for rel, data in planted.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return planted


def _assert_intact(folder: Path, planted: dict[str, bytes]) -> None:
    for rel, data in planted.items():
        assert (folder / rel).read_bytes() == data, f"{folder / rel} was changed or deleted"


def _config(tmp_path: Path, output_dir: str, *extra: str):
    config = load_config(REPO / "configs/demo.yaml", [
        f"pool.path={REPO / 'data/sample/pool.jsonl'}", f"target.path={REPO / 'data/sample/target.jsonl'}",
        "pool.max_rows=25", "target.max_rows=4", "k=3", "embedding.max_length=32", "report=false",
        f"cache_dir={tmp_path / 'cache'}", "overwrite=true", *extra,
    ])
    config.output_dir = output_dir  # set after parsing: an empty string must reach the job as is
    return config


def _ours(folder: OutputFolder, files: dict[str, str]) -> Path:
    """Write a finished output through the life cycle, as a job does."""
    with folder.locked():
        partial = folder.begin()
        for rel, text in files.items():
            (partial / rel).parent.mkdir(parents=True, exist_ok=True)
            (partial / rel).write_text(text)
        return folder.commit()


# ----------------------------------------------------------------------------------------------
# refusals: nothing deleted that was not ours


@pytest.mark.parametrize("given", ["", "   ", ".", "./", "sub/..", "CWD", "PARENT"])
def test_the_working_directory_and_above_are_never_an_output(tmp_path, monkeypatch, no_encoder, given):
    work = tmp_path / "project" / "work"
    planted = _user_files(work, given)
    monkeypatch.chdir(work)
    (work / "sub").mkdir()
    value = {"CWD": str(work), "PARENT": str(work.parent)}.get(given, given)
    with pytest.raises(ValueError, match=r"The 'output_dir' parameter of run_job must be (a non-empty folder path|a folder of its own)"):
        run_job(_config(tmp_path, value))
    _assert_intact(work, planted)
    assert sorted(p.name for p in work.parent.iterdir()) == ["work"]  # no lock, no partial beside it


@pytest.mark.parametrize("given", ["~", "~/", "HOME", "ABOVE_HOME"])
def test_a_home_folder_or_one_above_it_is_never_an_output(tmp_path, monkeypatch, no_encoder, given):
    home = tmp_path / "users" / "alice"
    planted = _user_files(home, given)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    value = {"HOME": str(home), "ABOVE_HOME": str(home.parent)}.get(given, given)
    with pytest.raises(ValueError, match="not the working directory, a home or root folder"):
        run_job(_config(tmp_path, value))
    _assert_intact(home, planted)


def test_the_root_folder_is_never_an_output(tmp_path, no_encoder):
    with pytest.raises(ValueError, match="a home or root folder"):
        run_job(_config(tmp_path, "/"))


def test_tilde_expands_to_a_subfolder_of_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    out, partial = output_paths("~/runs/sel")
    assert out == (tmp_path / "h").resolve() / "runs" / "sel"
    assert partial.name == "sel.partial"


@pytest.mark.parametrize("ours", [False, True], ids=["user-folder", "our-output"])
def test_a_symlinked_output_dir_is_refused_and_its_target_kept(tmp_path, no_encoder, ours):
    target = tmp_path / "precious"
    if ours:  # even a link to a folder we wrote: the link is not ours to follow
        _ours(OutputFolder(target, overwrite=False), {"selection.json": "{}"})
        planted = {"selection.json": b"{}"}
    else:
        planted = _user_files(target, "link")
    link = tmp_path / "out"
    link.symlink_to(target, target_is_directory=True)
    with pytest.raises(FileExistsError, match="is a symbolic link; hf_otselect never replaces one"):
        run_job(_config(tmp_path, str(link)))
    _assert_intact(target, planted)
    assert link.is_symlink() and os.readlink(link) == str(target)


def test_a_symlinked_partial_folder_is_refused_and_its_target_kept(tmp_path, no_encoder):
    target = tmp_path / "datasets_of_mine"
    planted = _user_files(target, "partial")
    (tmp_path / "sel.partial").symlink_to(target, target_is_directory=True)
    with pytest.raises(FileExistsError, match=r"sel\.partial' is a symbolic link"):
        run_job(_config(tmp_path, str(tmp_path / "sel")))
    _assert_intact(target, planted)
    assert (tmp_path / "sel.partial").is_symlink()


def test_a_dangling_symlink_and_a_file_are_refused(tmp_path, no_encoder):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError, match="symbolic link"):
        run_job(_config(tmp_path, str(tmp_path / "dangling")))
    (tmp_path / "results.csv").write_text("a,b\n1,2\n")
    with pytest.raises(FileExistsError, match="is not a folder"):
        run_job(_config(tmp_path, str(tmp_path / "results.csv")))
    assert (tmp_path / "results.csv").read_text() == "a,b\n1,2\n"


def test_a_folder_without_our_marker_is_refused(tmp_path, no_encoder):
    planted = _user_files(tmp_path / "existing", "nomarker")
    with pytest.raises(FileExistsError, match=f"has no {MARKER} marker"):
        run_job(_config(tmp_path, str(tmp_path / "existing")))
    _assert_intact(tmp_path / "existing", planted)


@pytest.mark.parametrize("change", ["new file", "new folder", "grown file", "link"])
def test_our_output_with_anything_we_did_not_write_is_refused(tmp_path, no_encoder, change):
    out = _ours(OutputFolder(tmp_path / "sel", overwrite=False), {"selection.json": "{}", "selected/data.arrow": "rows"})
    if change == "new file":
        (out / "selected" / "my_labels.csv").write_text("id,label\n")
    elif change == "new folder":
        (out / "checkpoints").mkdir()
    elif change == "grown file":
        with (out / "selected" / "data.arrow").open("a") as fh:
            fh.write(" and the user's edits")
    else:
        (out / "shortcut").symlink_to(tmp_path)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.is_symlink()}
    with pytest.raises(FileExistsError, match="holds files hf_otselect did not write"):
        run_job(_config(tmp_path, str(out)))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.is_symlink()} == before


def test_a_partial_folder_without_our_marker_is_refused(tmp_path, no_encoder):
    planted = _user_files(tmp_path / "sel.partial", "partial-nomarker")
    with pytest.raises(FileExistsError, match=r"sel\.partial' has no"):
        run_job(_config(tmp_path, str(tmp_path / "sel")))
    _assert_intact(tmp_path / "sel.partial", planted)


def test_without_overwrite_even_our_output_is_kept(tmp_path, no_encoder):
    out = _ours(OutputFolder(tmp_path / "sel", overwrite=False), {"selection.json": '{"k": 1}'})
    with pytest.raises(FileExistsError, match=r"already exists \(an earlier selection\)\. Pass overwrite=true"):
        run_job(_config(tmp_path, str(out), "overwrite=false"))
    assert (out / "selection.json").read_text() == '{"k": 1}'


def test_a_parent_that_cannot_be_written_is_refused_before_any_work(tmp_path, no_encoder):
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(ValueError, match="whose parent can be created and written"):
        run_job(_config(tmp_path, str(tmp_path / "afile" / "x" / "sel")))
    assert (tmp_path / "afile").read_text() == "not a folder"
    locked = tmp_path / "readonly"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # (root writes anywhere: the permission case is moot then)
            with pytest.raises(PermissionError, match="whose parent can be created and written"):
                run_job(_config(tmp_path, str(locked / "a" / "b" / "sel")))
    finally:
        locked.chmod(0o700)
    assert list(locked.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# what is ours is replaced, atomically


def test_our_output_is_replaced_and_the_swap_leaves_nothing_behind(tmp_path):
    folder = OutputFolder(tmp_path / "sel", overwrite=True)
    _ours(folder, {"selection.json": "old", "scored/a": "1", "scored/b": "22"})
    marker = json.loads((tmp_path / "sel" / MARKER).read_text())
    assert sorted(marker["manifest"]["files"]) == ["scored/a", "scored/b", "selection.json"]
    assert marker["manifest"]["dirs"] == ["scored"]
    folder.check()  # ours and unchanged: may be replaced
    _ours(folder, {"selection.json": "new", "selected/c": "333"})
    assert (tmp_path / "sel" / "selection.json").read_text() == "new"
    assert not (tmp_path / "sel" / "scored").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["sel"]


def test_at_every_step_of_the_swap_an_output_or_a_complete_partial_exists(tmp_path, monkeypatch):
    """Watch every rename of commit(): before and after each, one complete folder is on disk."""
    folder = OutputFolder(tmp_path / "sel", overwrite=True)
    _ours(folder, {"selection.json": "old"})
    seen = []
    real_replace = os.replace

    def complete_folders() -> list[str]:
        return sorted(p.name for p in (folder.final, folder.partial) if (p / "selection.json").is_file())

    def watched(src, dst):
        seen.append(complete_folders())
        real_replace(src, dst)
        seen.append(complete_folders())

    with folder.locked():
        partial = folder.begin()
        (partial / "selection.json").write_text("new")
        monkeypatch.setattr(os, "replace", watched)
        folder.commit()
    assert seen and all(seen), seen
    assert (folder.final / "selection.json").read_text() == "new"


def test_a_leftover_of_a_crash_mid_swap_is_cleared_by_the_next_run(tmp_path):
    folder = OutputFolder(tmp_path / "sel", overwrite=True)
    _ours(folder, {"selection.json": "first"})
    os.replace(folder.final, folder.previous)  # a job killed between the two renames
    _ours(folder, {"selection.json": "second"})
    assert (folder.final / "selection.json").read_text() == "second"
    assert not folder.previous.exists()


def test_a_report_written_later_stays_replaceable_but_user_files_do_not(tmp_path):
    folder = OutputFolder(tmp_path / "sel", overwrite=True)
    out = _ours(folder, {"selection.json": "{}"})
    (out / "report_files").mkdir()
    (out / "report_files" / "fig.png").write_bytes(b"png")
    (out / "report.html").write_text("<html>")
    (out / "user.txt").write_text("mine")  # appeared meanwhile, not named by the report
    record_written(out, [out / "report.html", out / "report_files"])
    with pytest.raises(FileExistsError, match=r"\['user.txt'\]"):
        folder.check()
    (out / "user.txt").unlink()
    folder.check()


# ----------------------------------------------------------------------------------------------
# one writer per output folder

_HOLDER = """
import sys, time
from pathlib import Path
from hf_otselect.outdir import OutputFolder
folder = OutputFolder(sys.argv[1], overwrite=True)
with folder.locked():
    Path(sys.argv[2]).write_text("held")
    while Path(sys.argv[2]).exists():
        time.sleep(0.05)
"""


def test_a_second_job_fails_at_once_naming_the_holder(tmp_path):
    out, flag = tmp_path / "sel", tmp_path / "holding"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out), str(flag)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert holder.poll() is None and time.monotonic() < deadline, "the holder never took the lock"
            time.sleep(0.05)
        # In this process (a real job) ...
        with pytest.raises(OutputFolderBusy, match=rf"is being written by another job \(pid {holder.pid} on {re.escape(socket.gethostname())}, started 20"):
            run_job(_config(tmp_path, str(out)))
        # ... and through the CLI in a third process: exit 2, one line, while the holder still holds.
        proc = subprocess.run(
            [sys.executable, "-m", "hf_otselect.cli", "select", "--config", str(REPO / "configs/demo.yaml"),
             f"pool.path={REPO / 'data/sample/pool.jsonl'}", f"target.path={REPO / 'data/sample/target.jsonl'}",
             f"cache_dir={tmp_path / 'cache'}", f"output_dir={out}", "overwrite=true"],
            capture_output=True, text=True, timeout=300, env={**env, "HF_HUB_OFFLINE": "1"},
        )
        assert holder.poll() is None, "the holder ended: the second job may have waited for it"
        assert proc.returncode != 0
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("hf-otselect: error: ")]
        assert len(lines) == 1 and f"pid {holder.pid}" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
        assert not out.exists() and not out.with_name("sel.partial").exists()
    finally:
        flag.unlink(missing_ok=True)
        holder.wait(timeout=60)
    # Released: the lock is free again and the holder's side file is gone.
    assert not out.with_name("sel.lock.json").exists()
    with OutputFolder(out, overwrite=True).locked():
        pass


def _side_file(pid: int) -> str:
    return json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00Z", "output_dir": "x"})


@pytest.mark.parametrize("before", ["no side file yet", "a killed job's side file"])
def test_a_job_refused_in_the_holders_first_moment_still_names_it(tmp_path, before):
    """The holder has the lock but has not written its side file yet (two jobs started together),
    and may find a killed job's file there: the refused job names the live holder, not 'unknown'
    nor the dead process."""
    import threading

    from filelock import FileLock

    out = tmp_path / "sel"
    folder = OutputFolder(out, overwrite=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    if before != "no side file yet":
        folder.holder_path.write_text(_side_file(dead.pid), encoding="utf-8")
    lock = FileLock(str(folder.lock_path), timeout=0)
    lock.acquire()  # this process is the holder, in the moment before its side file
    late = threading.Timer(0.5, lambda: folder.holder_path.write_text(_side_file(os.getpid()), encoding="utf-8"))
    late.start()
    try:
        with pytest.raises(OutputFolderBusy) as err:
            with OutputFolder(out, overwrite=True).locked():
                pass
    finally:
        late.join()
        lock.release()
    assert f"(pid {os.getpid()} on " in str(err.value)
    assert f"pid {dead.pid} " not in str(err.value)


def test_a_holder_that_never_writes_its_side_file_is_unknown_after_the_wait(tmp_path, monkeypatch):
    import hf_otselect.outdir as outdir
    from filelock import FileLock

    monkeypatch.setattr(outdir, "_HOLDER_WAIT", 0.2)
    folder = OutputFolder(tmp_path / "sel", overwrite=True)
    lock = FileLock(str(folder.lock_path), timeout=0)
    lock.acquire()
    try:
        with pytest.raises(OutputFolderBusy, match=r"holder unknown, see '.*sel\.lock'"):
            with OutputFolder(tmp_path / "sel", overwrite=True).locked():
                pass
    finally:
        lock.release()


def test_a_job_that_fails_after_starting_leaves_nothing_but_what_was_there(tmp_path):
    folder = OutputFolder(tmp_path / "sel", overwrite=True)
    _ours(folder, {"selection.json": "kept"})
    with pytest.raises(RuntimeError, match="disk full"), folder.locked():
        partial = folder.begin()
        (partial / "scored").mkdir()
        raise RuntimeError("disk full")
    assert not folder.partial.exists()
    assert (folder.final / "selection.json").read_text() == "kept"
    folder.check()  # still ours, still replaceable


def test_an_interrupted_job_leaves_its_partial_folder_for_the_next_run(tmp_path):
    folder = OutputFolder(tmp_path / "sel", overwrite=False)
    with pytest.raises(KeyboardInterrupt), folder.locked():
        (folder.begin() / "scored").mkdir()
        raise KeyboardInterrupt
    assert (folder.partial / MARKER).is_file() and not folder.final.exists()
    _ours(folder, {"selection.json": "rerun"})  # the next run clears it and finishes
    assert not folder.partial.exists() and (folder.final / "selection.json").read_text() == "rerun"


@pytest.mark.parametrize("fails", ["set_aside", "put_in_place"])
def test_a_failed_rename_during_an_overwrite_keeps_the_old_output_whole(tmp_path, monkeypatch, fails):
    """A rename of commit() fails mid-overwrite (disk, permissions, a crash): the old output, every
    file of its manifest with its bytes, is still on disk at the output path or set aside."""
    folder = OutputFolder(tmp_path / "sel", overwrite=True)
    old = {"selection.json": '{"k": 3}', "scored/part-0": "a" * 50, "selected/part-0": "bc"}
    _ours(folder, old)
    real_replace = os.replace
    source = {"set_aside": folder.final, "put_in_place": folder.partial}[fails]

    def failing(src, dst):
        if Path(src) == source:
            raise OSError(f"injected failure moving {src}")
        real_replace(src, dst)

    with pytest.raises(OSError, match="injected failure"), folder.locked():
        partial = folder.begin()
        for rel in ("selection.json", "scored/part-0"):
            (partial / rel).parent.mkdir(parents=True, exist_ok=True)
            (partial / rel).write_text("new")
        monkeypatch.setattr(os, "replace", failing)
        folder.commit()
    monkeypatch.setattr(os, "replace", real_replace)
    whole = [p for p in (folder.final, folder.previous)
             if p.is_dir() and all((p / rel).is_file() and (p / rel).read_text() == text for rel, text in old.items())]
    assert whole, f"the old output was lost: {sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob('*'))}"
    marker = json.loads((whole[0] / MARKER).read_text())
    assert sorted(marker["manifest"]["files"]) == sorted(old)  # whole: its own manifest, not the new one's


def test_a_failed_final_move_puts_the_old_output_back_in_place(tmp_path, monkeypatch):
    """The old output is not left set aside (where the next begin() used to delete it): it is
    moved back to the output path when the new one cannot be put there."""
    folder = OutputFolder(tmp_path / "sel", overwrite=True)
    old = {"selection.json": '{"k": 3}', "scored/part-0": "a" * 50}
    _ours(folder, old)
    real_replace = os.replace

    def failing(src, dst):
        if Path(src) == folder.partial:
            raise OSError("injected failure")
        real_replace(src, dst)

    with pytest.raises(OSError, match="injected failure"), folder.locked():
        (folder.begin() / "selection.json").write_text("new")
        monkeypatch.setattr(os, "replace", failing)
        folder.commit()
    monkeypatch.setattr(os, "replace", real_replace)
    assert not folder.previous.exists()
    assert all((folder.final / rel).read_text() == text for rel, text in old.items())


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_set_aside_by_a_killed_job_is_restored_not_deleted(tmp_path, overwrite):
    """A job killed between commit()'s two moves leaves only ``.previous``: the next job puts it
    back before anything else, and replaces it only under its own overwrite."""
    folder = OutputFolder(tmp_path / "sel", overwrite=overwrite)
    old = {"selection.json": '{"k": 3}', "selected/part-0": "bc"}
    _ours(folder, old)
    os.replace(folder.final, folder.previous)  # the killed job's state
    if overwrite:
        with folder.locked():
            folder.begin()
    else:
        with pytest.raises(FileExistsError, match="already exists"), folder.locked():
            folder.begin()
    assert not folder.previous.exists()
    assert all((folder.final / rel).read_text() == text for rel, text in old.items())
