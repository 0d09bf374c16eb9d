"""The life cycle of a job's output folder: checked, locked, written aside, put in place.

A job deletes only what it wrote. :class:`OutputFolder` owns four paths beside each other::

    <parent>/<name>/            the finished output (carries MARKER with the manifest of its files)
    <parent>/<name>.partial/    where the job writes (carries MARKER from its first moment)
    <parent>/<name>.previous/   the old output, moved aside for the instant of the swap
    <parent>/<name>.lock        the lock (and <name>.lock.json: who holds it), both removed when the job ends

Rules, all checked by :meth:`OutputFolder.check` before any data is read:

- ``output_dir`` must be a non-empty path; ``~`` is expanded; the last component is never
  followed if it is a symbolic link (``os.path.abspath``, not ``Path.resolve``).
- Never the working directory, a home or root folder, or any folder above one of them, whatever
  ``overwrite`` says.
- An existing ``output_dir`` (or ``.partial``/``.previous``) that is a symbolic link or not a folder
  is refused: removing it would delete what it points to or a file of the user's.
- With ``overwrite=true`` an existing output is replaced only if it carries our marker and holds
  nothing but what its manifest lists (names, sizes and modification times): a folder with a
  file, folder or link we did not write is left alone and the job refused.
- One writer per output folder: :meth:`OutputFolder.locked` takes ``<name>.lock`` (``filelock``,
  an OS lock released when the process dies, even by ``kill -9``) without waiting; a second job
  fails at once naming the holder (pid, host, start time from ``<name>.lock.json``, a side file
  written atomically, so a contender never reads a half-written record). Both files are
  removed when the job ends, whether it succeeded or failed; only a killed job leaves them, and
  the next job takes them over.

:meth:`OutputFolder.commit` writes the manifest into the partial folder, moves an old output to
``.previous``, renames the partial folder into place (``os.replace``) and only then removes the
old one, so at every instant either the output or the complete partial folder exists.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._checks import param_error

logger = logging.getLogger(__name__)

__all__ = ["MARKER", "OutputFolder", "OutputFolderBusy", "output_path", "record_written"]

#: The file that says "hf_otselect wrote this folder", with the manifest of what it wrote.
MARKER = ".hf_otselect.json"
_SHOWN = 5
# Seconds a refused job waits for the holder's side file (written milliseconds after its lock).
_HOLDER_WAIT = 5.0
_OWN_FOLDER = "a folder of its own: not the working directory, a home or root folder, nor a folder above one"


class OutputFolderBusy(FileExistsError):
    """Another job holds the lock of this output folder."""


def output_path(output_dir: Any, owner: str = "run_job") -> Path:
    """``output_dir`` as an absolute path: ``~`` expanded, the parent resolved, the last part not.

    Raises
    ------
    TypeError, ValueError
        Not a path, or an empty one.
    """
    if not isinstance(output_dir, (str, os.PathLike)):
        raise param_error("output_dir", owner, "a folder path (str)", output_dir, exc=TypeError)
    text = os.fspath(output_dir)
    if not isinstance(text, str) or not text.strip():
        raise param_error("output_dir", owner, "a non-empty folder path", output_dir)
    path = Path(os.path.abspath(os.path.expanduser(text)))
    if path.parent == path:  # the root (or a drive)
        raise param_error("output_dir", owner, _OWN_FOLDER, output_dir)
    return path.parent.resolve() / path.name


def _homes() -> set[Path]:
    """Every home folder this machine knows of: ``~``, ``$HOME`` and each user's (POSIX)."""
    found = {os.path.expanduser("~"), os.environ.get("HOME") or "~"}
    try:
        import pwd

        found.update(entry.pw_dir for entry in pwd.getpwall())
    except (ImportError, OSError):  # not POSIX
        pass
    homes = set()
    for home in found:
        if home and home != "~" and os.path.isabs(home):
            homes.add(Path(home).resolve())
    return homes


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _entries(folder: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(relative POSIX path, lstat) of everything below ``folder``, never following a link."""
    stack = [folder]
    while stack:
        current = stack.pop()
        with os.scandir(current) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                rel = Path(entry.path).relative_to(folder).as_posix()
                yield rel, st
                if stat.S_ISDIR(st.st_mode):
                    stack.append(Path(entry.path))


def _manifest(folder: Path) -> dict[str, Any]:
    files: dict[str, list[int]] = {}
    dirs: list[str] = []
    for rel, st in _entries(folder):
        if rel == MARKER:
            continue
        if stat.S_ISDIR(st.st_mode):
            dirs.append(rel)
        elif stat.S_ISREG(st.st_mode):
            files[rel] = [st.st_size, st.st_mtime_ns]
        else:
            raise RuntimeError(f"{folder / rel} is neither a file nor a folder; the job never writes one")
    return {"files": dict(sorted(files.items())), "dirs": sorted(dirs)}


def _read_marker(folder: Path) -> dict[str, Any] | None:
    path = folder / MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("written_by") == "hf_otselect" else None


def _write_marker(folder: Path, marker: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(marker, fh, indent=1, sort_keys=True)
    os.replace(tmp, folder / MARKER)


def _not_ours(folder: Path, *, complete: bool) -> str | None:
    """Why ``folder`` may not be deleted (None when it is ours to replace).

    ``complete``: a finished output must hold exactly what its manifest lists; a partial folder
    only needs our marker (it was interrupted before the manifest was written).
    """
    if folder.is_symlink():
        return "is a symbolic link (removing it would delete what it points to)"
    if not folder.is_dir():
        return "is not a folder"
    marker = _read_marker(folder)
    if marker is None:
        return f"has no {MARKER} marker, so hf_otselect did not write it"
    if not complete:
        return None
    manifest = marker.get("manifest")
    if not isinstance(manifest, dict):
        return f"has a {MARKER} marker without a manifest, so what it holds is unknown"
    files, dirs = manifest.get("files") or {}, set(manifest.get("dirs") or ())
    foreign = []
    for rel, st in _entries(folder):
        if rel == MARKER:
            continue
        if stat.S_ISDIR(st.st_mode):
            ours = rel in dirs
        else:
            ours = stat.S_ISREG(st.st_mode) and files.get(rel) == [st.st_size, st.st_mtime_ns]
        if not ours:
            foreign.append(rel)
    if foreign:
        shown = sorted(foreign)[:_SHOWN]
        more = f" and {len(foreign) - _SHOWN} more" if len(foreign) > _SHOWN else ""
        return f"holds files hf_otselect did not write (or that changed since): {shown}{more}"
    return None


def record_written(folder: str | os.PathLike, paths: list[str | os.PathLike]) -> None:
    """Add ``paths`` written into a finished output folder since (e.g. a report) to its manifest.

    Each path (a file, or a folder with everything in it) must lie in ``folder``. Only these are
    added, never other files that appeared meanwhile. A folder without our marker is left as is.
    """
    folder = Path(folder)
    marker = _read_marker(folder)
    if marker is None or not isinstance(marker.get("manifest"), dict):
        return
    files = dict(marker["manifest"].get("files") or {})
    dirs = set(marker["manifest"].get("dirs") or ())
    for path in paths:
        path = Path(path)
        rel = path.relative_to(folder).as_posix()
        st = path.lstat()
        if stat.S_ISDIR(st.st_mode):
            dirs.add(rel)
            for sub, sub_st in _entries(path):
                if stat.S_ISDIR(sub_st.st_mode):
                    dirs.add(f"{rel}/{sub}")
                elif stat.S_ISREG(sub_st.st_mode):
                    files[f"{rel}/{sub}"] = [sub_st.st_size, sub_st.st_mtime_ns]
        elif stat.S_ISREG(st.st_mode):
            files[rel] = [st.st_size, st.st_mtime_ns]
    _write_marker(folder, {**marker, "manifest": {"files": dict(sorted(files.items())), "dirs": sorted(dirs)}})


class OutputFolder:
    """One job's output folder, from the checks before any work to the final rename.

    Parameters
    ----------
    output_dir : str or PathLike
        The folder the job delivers (``~`` expanded).
    overwrite : bool
        Replace an existing output folder, if this package wrote it and nothing else is in it.
    owner : str
        Named in error messages.
    """

    def __init__(self, output_dir: Any, *, overwrite: bool, owner: str = "run_job") -> None:
        self.owner = owner
        self.given = output_dir
        self.final = output_path(output_dir, owner)
        self.overwrite = bool(overwrite)
        name = self.final.name
        self.partial = self.final.with_name(name + ".partial")
        self.previous = self.final.with_name(name + ".previous")
        self.lock_path = self.final.with_name(name + ".lock")
        self.holder_path = self.final.with_name(name + ".lock.json")
        self._begun = False

    # -- checks ---------------------------------------------------------------------------
    def check(self, *, leftovers: bool = True) -> None:
        """Refuse every output folder this job may not write or replace (reads only).

        ``leftovers=False`` skips the ``.partial``/``.previous`` folders: for the other processes
        of a distributed job, which never remove them and must not race the one that does.

        Raises
        ------
        ValueError
            A root, home or working folder (or one above them), or a parent that is not a writable
            folder.
        FileExistsError
            An existing ``output_dir`` without ``overwrite``; a symbolic link or a file at one of
            the job's paths; an existing folder this package did not write, or with files it did
            not write.
        """
        final = self.final
        if _is_within(Path.cwd().resolve(), final) or any(_is_within(h, final) for h in _homes()):
            raise param_error("output_dir", self.owner, _OWN_FOLDER, str(self.given))
        ancestor = final.parent
        while not os.path.lexists(ancestor):
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise param_error("output_dir", self.owner, f"a path whose parent can be created and written ({str(ancestor)!r} is a file)",
                              str(self.given))
        if not os.access(ancestor, os.W_OK | os.X_OK):  # an environment failure (exit 1), not bad input
            raise param_error("output_dir", self.owner, f"a path whose parent can be created and written ({str(ancestor)!r} is not "
                              "writable)", str(self.given), exc=PermissionError)
        if os.path.lexists(final):
            if final.is_symlink() or not final.is_dir():
                kind = "a symbolic link" if final.is_symlink() else "not a folder"
                raise FileExistsError(f"The 'output_dir' {str(final)!r} is {kind}; hf_otselect never replaces one. "
                                      "Give a folder path of its own.")
            # What would refuse the replacement is said first, so the advice given is never then refused.
            self._refuse_unless_ours(final, complete=True)
            if not self.overwrite:
                raise FileExistsError(f"The 'output_dir' {str(final)!r} already exists (an earlier selection). "
                                      "Pass overwrite=true to replace it, or choose another output_dir.")
        for path, complete in ((self.partial, False), (self.previous, True)) if leftovers else ():
            if os.path.lexists(path):
                self._refuse_unless_ours(path, complete=complete)

    def _refuse_unless_ours(self, folder: Path, *, complete: bool) -> None:
        why = _not_ours(folder, complete=complete)
        if why is not None:
            raise FileExistsError(f"The 'output_dir' path {str(folder)!r} {why}; it is left alone, even with overwrite=true. "
                                  "Choose another output_dir, or remove or move it yourself.")

    # -- one writer -----------------------------------------------------------------------
    def _holder(self) -> str:
        """Who holds the lock, from the side file the holder writes just after taking it.

        Two jobs started together meet in the moment between the winner's lock and its side file,
        and a killed job leaves a side file naming a dead process; so wait for a record of a live
        process, up to ``_HOLDER_WAIT`` seconds (one on another host is taken as it is).
        """
        import psutil

        deadline = time.monotonic() + _HOLDER_WAIT
        while True:
            try:
                who = json.loads(self.holder_path.read_text(encoding="utf-8"))
                if who["host"] != socket.gethostname() or psutil.pid_exists(int(who["pid"])):
                    return f"pid {who['pid']} on {who['host']}, started {who['started']}"
            except (OSError, ValueError, TypeError, KeyError):
                pass
            if time.monotonic() >= deadline:
                return f"holder unknown, see {str(self.lock_path)!r}"
            time.sleep(0.02)

    @contextlib.contextmanager
    def locked(self) -> Iterator[OutputFolder]:
        """Hold ``<name>.lock`` for the block; fail at once if another job holds it.

        If the block raises an error, the partial folder :meth:`begin` created in it is removed (a
        failed job leaves nothing behind; an interrupted or killed one leaves it for the next run).

        Raises
        ------
        OutputFolderBusy
            (a ``FileExistsError``) naming the holder's pid, host and start time.
        """
        from filelock import FileLock, Timeout

        self.final.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.lock_path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise OutputFolderBusy(f"The 'output_dir' {str(self.final)!r} is being written by another job "
                                   f"({self._holder()}). Wait for it to finish or choose another output_dir.") from None
        try:
            who = {"pid": os.getpid(), "host": socket.gethostname(),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "output_dir": str(self.final)}
            fd, tmp = tempfile.mkstemp(dir=self.final.parent, prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(who, fh)
            os.replace(tmp, self.holder_path)
            try:
                yield self
            except Exception:  # an error; an interruption (Ctrl-C, like kill -9) leaves it for the next run
                if self._begun and _not_ours(self.partial, complete=False) is None:
                    shutil.rmtree(self.partial, ignore_errors=True)
                raise
        finally:
            with contextlib.suppress(OSError):
                self.holder_path.unlink()
            # No lock file outlives the job. It is unlinked while still held: a job that opened it
            # in this instant locks an unlinked file, which filelock (>= 4.3) detects and refuses
            # (st_nlink == 0), so two jobs never hold two different files. Only kill -9 leaves one.
            with contextlib.suppress(OSError):
                self.lock_path.unlink()
            lock.release()

    # -- writing --------------------------------------------------------------------------
    def begin(self) -> Path:
        """Clear an earlier run's partial (and set-aside) folder, if ours; create the partial folder.

        An old output set aside by a job that died between the two moves of :meth:`commit` is put
        back first, so it is replaced only under this job's own ``overwrite``.
        """
        if os.path.lexists(self.previous) and not os.path.lexists(self.final):
            self._refuse_unless_ours(self.previous, complete=True)
            logger.warning("Restoring the output an interrupted job had set aside: %s -> %s", self.previous, self.final)
            os.replace(self.previous, self.final)
        self.check()  # again, under the lock: the folders may have changed since the first check
        for leftover in (self.partial, self.previous):
            if os.path.lexists(leftover):
                logger.info("Removing the leftover of an earlier run: %s", leftover)
                shutil.rmtree(leftover)
        self.partial.mkdir(parents=True)
        self._begun = True
        _write_marker(self.partial, {"written_by": "hf_otselect", "state": "partial", "pid": os.getpid()})
        return self.partial

    def commit(self) -> Path:
        """Record the manifest, then put the partial folder in place of the output (see module doc)."""
        from . import __version__

        _write_marker(self.partial, {"written_by": "hf_otselect", "state": "complete", "version": __version__,
                                     "manifest": _manifest(self.partial)})
        if os.path.lexists(self.final):
            self._refuse_unless_ours(self.final, complete=True)
            if os.path.lexists(self.previous):
                self._refuse_unless_ours(self.previous, complete=True)
                shutil.rmtree(self.previous)
            os.replace(self.final, self.previous)
        try:
            os.replace(self.partial, self.final)
        except BaseException:
            if os.path.lexists(self.previous) and not os.path.lexists(self.final):
                with contextlib.suppress(OSError):  # the old output back in place; begin() retries otherwise
                    os.replace(self.previous, self.final)
            raise
        self._begun = False
        if os.path.lexists(self.previous):
            shutil.rmtree(self.previous)
        return self.final
