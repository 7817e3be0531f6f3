"""Outputs get the modes the umask gives a plain open() or mkdir() (issue 26): not the 0600 /
0700 of the temporary files and folders they are written through."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from facepipe.runtime import io as fio


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=lambda mask: f"umask{mask:03o}")
def umask(request):
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_is_read_without_changing_it(umask, monkeypatch):
    assert fio.current_umask() == umask
    assert fio.file_mode() == 0o666 & ~umask and fio.folder_mode() == 0o777 & ~umask
    # Without /proc: set and restored, under a lock.
    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc/self/status")

    monkeypatch.setattr(fio, "open", no_proc, raising=False)
    assert fio.current_umask() == umask
    monkeypatch.undo()
    assert fio.current_umask() == umask


def test_atomic_writers_and_folders_follow_the_umask(umask, tmp_path):
    files, folders = 0o666 & ~umask, 0o777 & ~umask
    out = tmp_path / "out"
    fio.write_bytes_atomic(out / "a.bin", b"x")
    fio.write_bytes_atomic(out / "crop.jpg", b"x", durable=False)
    fio.write_text_atomic(out / "b.txt", "x")
    fio.write_json_atomic(out / "c.json", {"a": 1})
    fio.write_csv_atomic(out / "d.csv", ["h"], [[1]])
    fio.save_npy_atomic(out / "e.npy", np.zeros(3))
    with fio.atomic_write(out / "f.bin", "wb") as handle:
        handle.write(b"x")
    fio.write_text_atomic(out / "f.bin", "replaced")  # replacing a file gives it the same mode
    for name in ("a.bin", "crop.jpg", "b.txt", "c.json", "d.csv", "e.npy", "f.bin"):
        assert mode(out / name) == files, name
    assert mode(out) == folders  # made by the writer's mkdir

    with fio.atomic_folder(tmp_path / "unit") as staging:
        fio.write_text_atomic(staging / "g.txt", "x")
        (staging / "sub").mkdir()
    assert mode(tmp_path / "unit") == folders and mode(tmp_path / "unit" / "sub") == folders
    assert mode(tmp_path / "unit" / "g.txt") == files
    with fio.atomic_folder(tmp_path / "unit", replace=True) as staging:
        fio.write_text_atomic(staging / "h.txt", "x")
    assert mode(tmp_path / "unit") == folders and mode(tmp_path / "unit" / "h.txt") == files

    with fio.staged_files(tmp_path / "report", last="m.json") as staging:
        fio.write_json_atomic(staging / "m.json", {})
    assert mode(tmp_path / "report") == folders and mode(tmp_path / "report" / "m.json") == files

    fd, name = fio.output_temp_file(tmp_path, prefix=".t.")
    os.close(fd)
    assert mode(Path(name)) == files
    assert mode(fio.output_temp_folder(tmp_path, prefix=".s.")) == folders


def test_index_and_checkpoint_follow_the_umask(umask, tmp_path):
    from facepipe.index.store import ClusterIndex
    from facepipe.runtime.checkpoint import save_checkpoint

    files, folders = 0o666 & ~umask, 0o777 & ~umask
    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(4, 8)).astype(np.float32)
    index = ClusterIndex.build(tmp_path / "idx", centroids, [0, 0, 1, 1], ["a", "b"])  # staged with mkdtemp
    assert mode(index.folder) == folders
    assert {p.name: mode(p) for p in index.folder.iterdir()} == {p.name: files for p in index.folder.iterdir()}
    index.remove(["b"])  # a new generation written into the folder
    assert all(mode(p) == files for p in index.folder.iterdir())
    save_checkpoint(tmp_path / "run" / "latest.pt", {"epoch": 0})
    assert mode(tmp_path / "run" / "latest.pt") == files and mode(tmp_path / "run") == folders
