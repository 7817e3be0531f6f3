"""One user-error path (issue 25, part 4): a problem the user can fix is one line on stderr and exit
status 2, naming the file, folder or setting; a bug keeps its traceback."""
from __future__ import annotations

import errno
import importlib
import inspect
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import facepipe
import facepipe.cli as cli
from conftest import tiny_config
from facepipe.cli import EXIT_CLOSED_PIPE, main
from facepipe.errors import USER_ERRORS, FacepipeUserError, UsageError, user_error_message

# Error classes of facepipe that are bugs when they reach the user, not input problems.
INTERNAL_ERRORS = {"UnknownParameterError"}  # a head keyword the config models do not allow


def write_config(config, path: Path) -> str:
    path.write_text(config.to_yaml())
    return str(path)


def deny_new_entries_in(monkeypatch, folder: Path) -> None:
    """Make ``folder`` behave like a read-only folder for new subfolders (tests run as root,
    for whom permission bits deny nothing)."""
    real_mkdir = os.mkdir

    def mkdir(path, mode=0o777, *args, **kwargs):
        if Path(path).parent == folder:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)


@pytest.fixture(scope="module")
def trained_run(tiny_dataset, tmp_path_factory):
    """One short finished run (one stage, two steps): its config and folder."""
    from facepipe.train.trainer import Trainer

    root = tmp_path_factory.mktemp("user_errors")
    config = tiny_config(tiny_dataset, root / "run", train={"stages": [{"epochs": 1, "head": {"type": "softmax"}}],
                                                            "max_steps_per_epoch": 2})
    Trainer(config, progress=False).fit()
    return config, root / "run"


@pytest.fixture
def run_copy(trained_run, tmp_path):
    config, run = trained_run
    shutil.copytree(run, tmp_path / "run")
    config = config.model_copy(update={"output_dir": str(tmp_path / "run")})
    return config, tmp_path / "run"


# ----------------------------------------------------------------------------- the hierarchy
def test_the_errors_module_imports_nothing_of_facepipe_or_torch():
    code = ("import sys, facepipe.errors; "
            "print(sorted(m for m in sys.modules if m.startswith(('facepipe.', 'torch', 'numpy'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['facepipe.errors']"


def test_every_error_class_of_facepipe_is_a_user_error_and_keeps_its_builtin_base():
    classes = {}
    for module in pkgutil.walk_packages(facepipe.__path__, "facepipe."):
        if module.name == "facepipe.__main__":  # runs the CLI when imported
            continue
        for name, value in vars(importlib.import_module(module.name)).items():
            if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__.startswith("facepipe"):
                classes[f"{value.__module__}.{value.__qualname__}"] = value
    assert len(classes) >= 20  # the walk found the package's classes
    outside = sorted(name for name, cls in classes.items()
                     if not issubclass(cls, FacepipeUserError) and cls.__name__ not in INTERNAL_ERRORS)
    assert outside == []
    # Their old bases stay: existing `except ValueError` / `except RuntimeError` code still sees them.
    from facepipe.config import ConfigError
    from facepipe.data.dataset import DatasetError, UnreadableImageError
    from facepipe.eval.verification import EvalInputError
    from facepipe.index.store import ClusterIndexError, UnknownIdentityError
    from facepipe.runtime.checkpoint import CheckpointError
    from facepipe.runtime.io import OutputError, UnwritableOutputError
    from facepipe.train.trainer import TrainingError

    for cls, builtin in ((ConfigError, ValueError), (DatasetError, ValueError), (EvalInputError, ValueError),
                         (ClusterIndexError, ValueError), (UnknownIdentityError, KeyError),
                         (OutputError, ValueError), (UnwritableOutputError, PermissionError),
                         (UnreadableImageError, OSError), (CheckpointError, RuntimeError),
                         (TrainingError, RuntimeError), (UsageError, ValueError)):
        assert issubclass(cls, builtin) and issubclass(cls, FacepipeUserError)


def test_user_error_messages_and_what_is_not_one():
    assert user_error_message(UsageError("give DATA_ROOT")) == "give DATA_ROOT"
    missing = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "/data/pairs.txt")
    assert user_error_message(missing).startswith("/data/pairs.txt: No such file or directory")
    # No path named: nothing the user can act on; a bug keeps its traceback.
    assert user_error_message(FileNotFoundError("somewhere")) is None
    assert user_error_message(ValueError("bad")) is None
    assert user_error_message(KeyError("k")) is None
    assert not issubclass(ValueError, USER_ERRORS) and not issubclass(RuntimeError, USER_ERRORS)


# ----------------------------------------------------------------------------- the CLI's two paths
def test_a_user_error_is_one_line_with_exit_status_2(monkeypatch, capsys):
    def fails(args):
        raise UsageError("--labels names 3 rows for 4 embeddings; give one label per row")

    monkeypatch.setattr(cli, "cmd_synth", fails)
    assert main(["synth", "--out", "x", "--identities", "1"]) == 2
    err = capsys.readouterr().err
    assert err == "facepipe synth: error: --labels names 3 rows for 4 embeddings; give one label per row\n"


@pytest.mark.parametrize("bug", [ValueError("shapes (3,) and (4,) not aligned"), KeyError("row"),
                                 FileNotFoundError("no path named"), RuntimeError("CUDA error")])
def test_an_internal_error_keeps_its_traceback(monkeypatch, bug):
    def fails(args):
        raise bug

    monkeypatch.setattr(cli, "cmd_synth", fails)
    with pytest.raises(type(bug)):
        main(["synth", "--out", "x", "--identities", "1"])


def test_an_internal_error_exits_with_a_traceback_and_not_status_2(tmp_path):
    # A plain ValueError from deep inside is a bug: Python's traceback and status 1, not the
    # one-line path (status 2 would tell a script that its input was wrong).
    script = ("import sys, facepipe.cli as cli\n"
              "def bug(args):\n    raise ValueError('internal')\n"
              "cli.cmd_synth = bug\nsys.exit(cli.main(['synth', '--out', 'x', '--identities', '1']))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ValueError: internal" in result.stderr


def test_a_missing_input_path_is_one_line_naming_it(tmp_path, capsys):
    assert main(["eval", "lfw", "--pairs", str(tmp_path / "pairs.txt"), "--embeddings", str(tmp_path / "e"),
                 "--missing-list", str(tmp_path / "absent.txt"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"facepipe eval: error: {tmp_path / 'absent.txt'}: No such file or directory")
    assert len(err.splitlines()) == 1


def test_plain_value_errors_of_user_input_became_user_errors(tmp_path, capsys):
    # Each of these used to be a plain ValueError (one line only because every ValueError was).
    assert main(["index", "margins"]) == 2
    assert "DATA_ROOT" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "s"), "--identities", "3", "--max-images", "2",
                 "--min-images", "5"]) == 2
    assert "min_images (5) must not exceed max_images (2)" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["synth", "--out", str(tmp_path / "file"), "--identities", "1"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "photos").mkdir()
    assert main(["align", str(tmp_path / "photos"), str(tmp_path / "aligned"), "--root", str(tmp_path / "other"),
                 "--workers", "0", "--quiet"]) == 2
    assert "is not inside --root" in capsys.readouterr().err

    from facepipe.eval.verification import EvalInputError, read_pairs_csv
    from facepipe.index.jobs import read_labels
    from facepipe.index.store import ClusterIndexError

    (tmp_path / "pairs.csv").write_text("path_a,path_b,is_same\na.png,b.png,2\n")
    with pytest.raises(EvalInputError, match="line 2: is_same must be 0 or 1"):
        read_pairs_csv(tmp_path / "pairs.csv")
    (tmp_path / "latin1.csv").write_bytes(b"path_a,path_b,is_same\n\xe9.png,b.png,1\n")
    with pytest.raises(EvalInputError, match="not UTF-8"):
        read_pairs_csv(tmp_path / "latin1.csv")
    (tmp_path / "labels.txt").write_bytes(b"Jos\xe9\n")
    with pytest.raises(ClusterIndexError, match="labels.txt is not UTF-8"):
        read_labels(tmp_path / "labels.txt")


@pytest.mark.parametrize("command", [
    ["synth", "--out", "x", "--identities", "0"],
    ["synth", "--out", "x", "--identities", "2", "--seed", "-1"],
    ["embed", "--checkpoint", "c", "--images", "i", "--out", "o", "--batch-size", "0"],
    ["embed", "--checkpoint", "c", "--images", "i", "--out", "o", "--workers", "-1"],
    ["search", "--index", "i", "--top-k", "0", "q.npy"],
    ["index", "build", "i", "--embeddings", "e.npy", "--cluster-size", "0"],
    ["index", "calibrate", "i", "--embeddings", "e.npy", "--target-far", "1.5"],
    ["index", "build", "i", "--embeddings", "e.npy", "--threshold", "nan"],
    ["eval", "megaface", "--out", "o", "--impostor-top-k", "-5"],
])
def test_numeric_options_out_of_range_are_usage_errors_before_any_work(command, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(command)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: argument --" in err.splitlines()[-1]


@pytest.mark.parametrize("device", ["bogus", "cuda:99"])
def test_a_device_this_machine_lacks_is_a_user_error(device, tmp_path, capsys):
    assert main(["embed", "--checkpoint", str(tmp_path / "c.pt"), "--images", str(tmp_path), "--out",
                 str(tmp_path / "o"), "--device", device]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"device '{device}'" in err


# ----------------------------------------------------------------------------- resume and checkpoints
@pytest.mark.parametrize("override, key", [("data.image_size=[48,48]", "data.image_size"),
                                           ("model.embedding_size=16", "model.embedding_size")])
def test_resuming_with_a_changed_size_names_the_key(run_copy, tmp_path, capsys, override, key):
    config, run = run_copy
    before = (run / "latest.pt").read_bytes()
    path = write_config(config, tmp_path / "run.yaml")
    assert main(["train", "--config", path, "--resume", "--quiet", override]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{key}:" in err and "no longer fits the config" in err and "--overwrite" in err
    assert (run / "latest.pt").read_bytes() == before  # nothing of the run was touched


def test_resuming_a_checkpoint_whose_weights_disagree_with_its_config_is_one_line(run_copy, tmp_path, capsys):
    from facepipe.runtime.checkpoint import load_checkpoint, save_checkpoint

    config, run = run_copy
    state = load_checkpoint(run / "latest.pt")
    state["config"]["model"]["embedding_size"] = 16  # the config says 16, the weights hold 32
    save_checkpoint(run / "latest.pt", state)
    path = write_config(config, tmp_path / "run.yaml")
    assert main(["train", "--config", path, "--resume", "--quiet", "model.embedding_size=16"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "no longer fits the config" in err and "size mismatch" in err


def test_embedding_with_a_checkpoint_whose_config_disagrees_with_its_weights(run_copy, tiny_dataset, tmp_path,
                                                                           capsys):
    from facepipe.runtime.checkpoint import load_checkpoint, save_checkpoint

    _, run = run_copy
    state = load_checkpoint(run / "latest.pt")
    state["config"]["model"]["embedding_size"] = 16
    save_checkpoint(tmp_path / "mixed.pt", state)
    state["config"]["model"]["depth"] = 7
    save_checkpoint(tmp_path / "invalid.pt", state)
    embed = ["embed", "--images", str(tiny_dataset), "--out", str(tmp_path / "emb"), "--workers", "0", "--quiet"]

    assert main([*embed, "--checkpoint", str(tmp_path / "mixed.pt")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "mixed.pt" in err and "weights do not fit" in err
    assert main([*embed, "--checkpoint", str(tmp_path / "invalid.pt")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "invalid.pt" in err and "model.depth" in err
    assert not (tmp_path / "emb").exists()


# ----------------------------------------------------------------------------- unwritable outputs
def test_an_unwritable_output_folder_is_named(run_copy, tiny_dataset, tmp_path, monkeypatch, capsys):
    config, run = run_copy
    denied = tmp_path / "denied"
    denied.mkdir()
    deny_new_entries_in(monkeypatch, denied)

    assert main(["embed", "--checkpoint", str(run / "latest.pt"), "--images", str(tiny_dataset),
                 "--out", str(denied / "emb"), "--workers", "0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "permission denied" in err
    assert f"cannot write {denied / 'emb'}" in err and f"in the folder {denied};" in err

    path = write_config(config.model_copy(update={"output_dir": str(denied / "run")}), tmp_path / "run.yaml")
    assert main(["train", "--config", path, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"cannot write {denied / 'run'}" in err and "permission denied" in err


def test_atomic_writes_name_the_folder_that_refused(tmp_path, monkeypatch):
    from facepipe.runtime.io import UnwritableOutputError, atomic_folder, exclusive_lock, write_text_atomic

    denied = tmp_path / "denied"
    denied.mkdir()
    deny_new_entries_in(monkeypatch, denied)
    with pytest.raises(UnwritableOutputError, match=f"in the folder {denied}"):
        with atomic_folder(denied / "out"):
            pass
    with pytest.raises(UnwritableOutputError, match=f"cannot write {denied / 'a' / 'b.txt'}"):
        write_text_atomic(denied / "a" / "b.txt", "x")
    with pytest.raises(PermissionError):  # still what it was, for code that catches that
        with exclusive_lock(denied / "idx" / ".lock", "the index"):
            pass
    assert list(denied.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="permission bits deny nothing to root")
def test_a_read_only_output_folder_is_named(tmp_path, capsys):
    denied = tmp_path / "read_only"
    denied.mkdir()
    denied.chmod(0o555)
    try:
        assert main(["synth", "--out", str(denied / "s"), "--identities", "2", "--size", "16", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and str(denied) in err and "ermission denied" in err
    finally:
        denied.chmod(0o755)


# ----------------------------------------------------------------------------- .bin announced sizes
BIN_HEADERS = {
    "bytes8": b"\x80\x04\x8e" + (2**40).to_bytes(8, "little"),  # BINBYTES8: a terabyte of bytes
    "bytes4": b"\x80\x02B" + (2**31).to_bytes(4, "little"),  # BINBYTES: 2 GB
    "string4": b"\x80\x02T" + (2**31 - 1).to_bytes(4, "little"),  # BINSTRING (Python 2 files; signed)
    "unicode8": b"\x80\x04\x8d" + (2**40).to_bytes(8, "little"),  # BINUNICODE8
    "frame": b"\x80\x04\x95" + (2**40).to_bytes(8, "little"),  # FRAME
    "memo": b"\x80\x02Nr" + (2**31).to_bytes(4, "little") + b".",  # LONG_BINPUT at index 2**31
}


@pytest.mark.parametrize("kind", sorted(BIN_HEADERS))
def test_a_tiny_bin_announcing_a_huge_size_is_refused_before_allocating(kind, tmp_path):
    from facepipe.eval.insightface_bin import load_bin
    from facepipe.eval.verification import EvalInputError

    path = tmp_path / f"{kind}.bin"
    path.write_bytes(BIN_HEADERS[kind])
    with pytest.raises(EvalInputError, match=f"{kind}.bin: not a readable pickle: at byte "):
        load_bin(path)


def test_a_tiny_bin_announcing_a_huge_size_is_one_line_in_the_cli(tmp_path, capsys):
    (tmp_path / "huge.bin").write_bytes(BIN_HEADERS["bytes8"])
    np.save(tmp_path / "e.npy", np.ones((2, 4), dtype=np.float32))
    assert main(["eval", "bin", "--bin", str(tmp_path / "huge.bin"), "--embeddings", str(tmp_path / "e.npy"),
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "announces 1099511627776 bytes, but only 0 follow" in err


def test_embeddings_without_a_direction_are_a_user_error(tmp_path, capsys):
    import pickle

    png = b"\x89PNG\r\n\x1a\n" + bytes(40)
    (tmp_path / "set.bin").write_bytes(pickle.dumps(([png] * 20, [True, False] * 5), protocol=2))
    vectors = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    vectors[3] = np.nan  # a damaged .npy, or the output of a diverged model
    np.save(tmp_path / "e.npy", vectors)
    assert main(["eval", "bin", "--bin", str(tmp_path / "set.bin"), "--embeddings", str(tmp_path / "e.npy"),
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "zero norm or non-finite values" in err


def test_an_ordinary_bin_still_loads_at_every_protocol(tmp_path):
    import pickle

    from facepipe.eval.insightface_bin import load_bin

    png = b"\x89PNG\r\n\x1a\n" + bytes(range(40))
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"p{protocol}.bin"
        path.write_bytes(pickle.dumps(([png, b"\xff\xd8" + png], [True]), protocol=protocol))
        loaded = load_bin(path)
        assert loaded.images == [png, b"\xff\xd8" + png] and loaded.is_same.tolist() == [True]


# ----------------------------------------------------------------------------- a closed output pipe
@pytest.fixture
def gallery_index(tmp_path):
    """An index of many identities, so that `index info` prints more than a pipe buffer holds."""
    from facepipe.index.jobs import build_index_from_embeddings

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(400, 8)).astype(np.float32)
    names = [f"identity_with_a_long_name_{i:04d}" for i in range(400)]
    build_index_from_embeddings(tmp_path / "idx", vectors, names, cluster_size=20, tune=False)
    return tmp_path / "idx"


def test_a_closed_pipe_ends_quietly_in_process(gallery_index, monkeypatch):
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head` that has already gone
    stream = open(write_end, "w", encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", stream)
    try:
        assert main(["index", "info", str(gallery_index)]) == EXIT_CLOSED_PIPE == 141
    finally:
        stream.close()  # its fd now points at /dev/null: the left-over buffer goes there


def info_into_a_closed_pipe(index_dir) -> None:
    """``facepipe index info`` in a child process whose stdout is a pipe nobody reads: it exits
    with 141 and prints no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "facepipe", "index", "info", str(index_dir)],
                                stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert result.returncode == 141
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    assert "BrokenPipe" not in result.stderr


def test_a_closed_pipe_ends_quietly_without_a_traceback(gallery_index):
    info_into_a_closed_pipe(gallery_index)


def test_a_broken_pipe_that_is_not_the_output_keeps_its_traceback(monkeypatch):
    def fails(args):
        raise BrokenPipeError(errno.EPIPE, "a decoding worker died")

    monkeypatch.setattr(cli, "cmd_synth", fails)
    with pytest.raises(BrokenPipeError):  # stdout is fine: this is a crash to report
        main(["synth", "--out", "x", "--identities", "1"])


def test_the_small_output_of_a_command_into_a_closed_pipe(tmp_path):
    # Output smaller than the buffer is written only when flushed: the CLI flushes before it
    # returns, so the closed pipe is met in its handler, not in Python's exit.
    from facepipe.index.jobs import build_index_from_embeddings

    rng = np.random.default_rng(0)
    build_index_from_embeddings(tmp_path / "idx", rng.normal(size=(6, 8)).astype(np.float32),
                                ["a", "a", "b", "b", "c", "c"], cluster_size=2, tune=False)
    info_into_a_closed_pipe(tmp_path / "idx")
