"""Atomic file output: every file facepipe writes appears whole or not at all.

A crash (or a kill) mid-write leaves the previous version of the file in place, never a
truncated one, because data goes to a temporary file in the same folder that is renamed over
the target only after it was flushed to disk.

Output folders whose files must agree (an embeddings array and the manifest naming its rows) are
written as a unit with :func:`atomic_folder`, and record what they hold (:func:`describe_parts`)
so that a reader can refuse a folder that mixes two outputs (:func:`check_parts`). Jobs that
grow a folder in place take :func:`exclusive_lock` so that two processes never write it at once.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import secrets
import shutil
import tempfile
import threading
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Sequence

import numpy as np
from filelock import FileLock, Timeout

from facepipe.errors import FacepipeUserError

# ----------------------------------------------------------------------------- permissions
# Outputs get the modes a plain open() or mkdir() would give them: 0666 / 0777 less the umask.
# tempfile's mkstemp and mkdtemp create 0600 / 0700 (private scratch space), which a renamed
# temporary would otherwise pass on to the output, unreadable by the user's group whatever
# their umask says. Every temporary that becomes an output is made by the helpers below.
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it (``/proc/self/status``, Linux 4.7+); else
    by setting and restoring it under a lock (os.umask cannot read without writing)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode open() gives a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode mkdir() gives a new folder: 0777 less the umask."""
    return 0o777 & ~current_umask()


def output_temp_file(folder: str | os.PathLike, prefix: str, suffix: str = ".tmp") -> tuple[int, str]:
    """``tempfile.mkstemp`` in ``folder`` (a unique name, opened exclusively), with the mode a
    new file of the user's gets instead of 0600: for temporaries renamed onto an output."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    try:
        os.fchmod(fd, file_mode())
    except BaseException:
        os.close(fd)
        os.unlink(name)
        raise
    return fd, name


def output_temp_folder(folder: str | os.PathLike, prefix: str, suffix: str = ".tmp") -> Path:
    """``tempfile.mkdtemp`` in ``folder``, with the mode a new folder of the user's gets instead
    of 0700: for staging folders renamed into place as an output."""
    path = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=folder))
    try:
        os.chmod(path, folder_mode())
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", durable: bool = True, **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; rename it onto ``path`` on success.

    ``durable=False`` skips the fsync: still whole-or-nothing if the process dies, but an OS
    crash may leave an empty file; for many small outputs that are cheap to redo (image crops).
    """
    path = Path(path)
    with writing_output(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = output_temp_file(path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        with writing_output(path):
            os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, durable: bool = True) -> None:
    with atomic_write(path, "wb", durable=durable) as handle:
        handle.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_csv_atomic(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_write(path, "wb") as handle:
        np.save(handle, array)


class OutputError(ValueError, FacepipeUserError):
    """An output cannot be written or read as asked (it would replace something else, another
    process is writing it, its parts disagree): a problem for the user to resolve, not a bug."""


class OutputLockedError(OutputError):
    """Another process holds the lock of an output."""


class MixedOutputError(OutputError):
    """An output folder's files are not the ones written together."""


class UnwritableOutputError(OutputError, PermissionError):
    """The operating system refused to write an output (permission denied, read-only folder)."""


@contextlib.contextmanager
def writing_output(output: str | os.PathLike) -> Iterator[None]:
    """Around the steps that create ``output`` (folders, temporary files, renames, locks): the
    operating system's refusal becomes an :class:`UnwritableOutputError` naming the output and
    the folder that refused, not the temporary file that happened to be created first."""
    try:
        yield
    except PermissionError as exc:
        if isinstance(exc, OutputError):
            raise
        output = Path(output)
        raise _unwritable(output, Path(exc.filename).parent if exc.filename else output.parent) from exc


def _unwritable(output: Path, folder: Path) -> UnwritableOutputError:
    return UnwritableOutputError(f"cannot write {output}: permission denied in the folder {folder}; choose an "
                                 f"output you may write to, or change that folder's permissions")


def check_writable_output(output: str | os.PathLike, into: bool = False) -> None:
    """Raise :class:`UnwritableOutputError` (the message :func:`writing_output` gives) now,
    before any work, when the operating system would refuse to create ``output``: the nearest
    existing folder above it must let this process create entries. ``into``: files are written
    into ``output`` itself when it is an existing folder (an index updated in place), so that
    folder must be writable. A cheap early check; the writes themselves still report refusals."""
    output = Path(output)
    folder = output if into and output.is_dir() else output.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        raise _unwritable(output, folder)


def _is_empty_dir(path: Path) -> bool:
    with os.scandir(path) as entries:
        return next(entries, None) is None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Write the folder ``path`` as a unit: yield an empty temporary sibling to fill; on success
    it becomes ``path`` by a rename, on any error it is deleted and ``path`` stays as it was.

    An existing non-empty ``path`` is refused unless ``replace``; then it is renamed aside, the
    new folder renamed in and the old one deleted (were the process killed between the two
    renames, the old folder would survive as a hidden ``.NAME.*.old`` sibling).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path} exists and is not a folder")
    if path.is_dir() and not replace and not _is_empty_dir(path):
        raise OutputError(f"{path} is not empty; choose a new output folder")
    # Not mkdtemp: its mode 0700 would become the output's; mkdir honours the umask.
    staging = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    with writing_output(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    try:
        yield staging
        _fsync_dir(staging)
        if path.is_dir() and not _is_empty_dir(path):
            aside = path.parent / f".{path.name}.{secrets.token_hex(6)}.old"
            os.rename(path, aside)
            try:
                os.rename(staging, path)
            except BaseException:
                os.rename(aside, path)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(staging, path)  # rename(2) may replace an empty folder
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_files(folder: str | os.PathLike, last: str | None = None) -> Iterator[Path]:
    """Write a group of files that must agree into ``folder``, which also holds other things (so
    it cannot be swapped whole like :func:`atomic_folder`): yield a hidden staging folder inside
    it; once the block has written everything, each file is renamed into ``folder`` (``last``
    after the others, e.g. the record that describes them). An error in the block leaves
    ``folder`` as it was; only a kill during the renames (microseconds) can mix old and new."""
    folder = Path(folder)
    staging = folder / f".staging.{secrets.token_hex(6)}.tmp"
    with writing_output(folder):
        folder.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    try:
        yield staging
        names = sorted(entry.name for entry in staging.iterdir())
        if last in names:
            names.remove(last)
            names.append(last)
        for name in names:
            os.replace(staging / name, folder / name)
        _fsync_dir(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_parts(folder: str | os.PathLike, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of each named file of ``folder``: stored beside them (e.g. in a JSON
    record written last) so that :func:`check_parts` can tell they were written together."""
    folder = Path(folder)
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256_of(folder / name)} for name in names}


def check_parts(folder: str | os.PathLike, parts: dict[str, dict[str, Any]], record: str) -> None:
    """Raise :class:`MixedOutputError` unless every file of ``parts`` (from
    :func:`describe_parts`, stored in ``folder/record``) is the one described."""
    folder = Path(folder)
    for name, expected in parts.items():
        path = folder / name
        if not path.is_file():
            raise MixedOutputError(f"{path} is missing, but {folder / record} lists it")
        # The size first: it costs nothing and catches most mixes before a hash of a large file.
        if path.stat().st_size != expected.get("bytes") or _sha256_of(path) != expected.get("sha256"):
            raise MixedOutputError(f"{path} is not the file {folder / record} was written with: the folder "
                                   "mixes two outputs; write it again with the command that made it")


@contextlib.contextmanager
def exclusive_lock(lock_path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created if needed) for the block; raise
    :class:`OutputLockedError` at once when another process holds it. ``what`` names the guarded
    output in the message. The lock is the operating system's, so a killed holder releases it."""
    lock_path = Path(lock_path)
    lock = FileLock(lock_path, timeout=0)
    try:
        with writing_output(lock_path.parent):
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire()
    except Timeout:
        raise OutputLockedError(f"{what} is in use by another process (lock {lock_path}); wait for it to "
                                "finish, or choose another output") from None
    try:
        yield
    finally:
        lock.release()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")
