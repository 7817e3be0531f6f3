"""Nothing a user made is overwritten without being asked (issue 25, part 1): run folders need
--resume or --overwrite, embeddings folders are written as a unit and checked when read, and
align locks its manifest and heals duplicate lines."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import facepipe
from conftest import tiny_config
from facepipe.align.job import align_images, in_shard
from facepipe.align.manifest import read_manifest
from facepipe.cli import main
from facepipe.config import AlignConfig
from facepipe.embed import embed_folder
from facepipe.embed import extract
from facepipe.eval.lfw import load_embeddings_folder
from facepipe.eval.verification import EvalInputError
from facepipe.index.jobs import load_embedding_source
from facepipe.index.store import ClusterIndexError
from facepipe.runtime.io import OutputError, OutputLockedError, atomic_folder, exclusive_lock
from facepipe.train.trainer import Trainer, TrainingError

ONE_EPOCH = {"stages": [{"epochs": 1, "head": {"type": "softmax"}}], "max_steps_per_epoch": 2}


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tiny_dataset, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("safety") / "run"
    Trainer(tiny_config(tiny_dataset, run, train=ONE_EPOCH), progress=False).fit()
    return run


def copied_run(finished_run: Path, tiny_dataset: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the finished run and a config file that trains into it."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    config_path = tmp_path / "c.yaml"
    config_path.write_text(tiny_config(tiny_dataset, run, train=ONE_EPOCH).to_yaml())
    return run, config_path


# ----------------------------------------------------------------------------- train
def test_train_into_a_run_folder_is_refused_without_a_flag(finished_run, tiny_dataset, tmp_path, capsys):
    run, config_path = copied_run(finished_run, tiny_dataset, tmp_path)
    assert not (run / "best.pt").exists()  # trained without validation: latest.pt only (issue 26)
    before = {name: (run / name).read_bytes() for name in ("latest.pt", "metrics.jsonl")}
    assert main(["train", "--config", str(config_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(run) in err and "--resume" in err and "--overwrite" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert {name: (run / name).read_bytes() for name in before} == before
    # --nproc: refused before torchrun starts, in one line.
    assert main(["train", "--config", str(config_path), "--quiet", "--nproc", "2"]) == 2
    assert "already holds a training run" in capsys.readouterr().err
    # The Python API refuses the same way, also when only best.pt is left (of a run with validation).
    config = tiny_config(tiny_dataset, run, train=ONE_EPOCH)
    with pytest.raises(TrainingError, match="already holds a training run"):
        facepipe.train_model(config, progress=False)
    (run / "latest.pt").rename(run / "best.pt")
    with pytest.raises(TrainingError, match=r"best\.pt"):
        Trainer(config, progress=False)
    with pytest.raises(TrainingError, match="contradict"):
        Trainer(config, resume=True, overwrite=True, progress=False)
    with pytest.raises(SystemExit):  # argparse: not both flags
        main(["train", "--config", str(config_path), "--resume", "--overwrite"])


def test_train_resume_continues_the_run(finished_run, tiny_dataset, tmp_path):
    run, config_path = copied_run(finished_run, tiny_dataset, tmp_path)
    assert main(["train", "--config", str(config_path), "--quiet", "--resume",
                 "train.stages=[{epochs: 2, head: {type: softmax}}]"]) == 0
    records = events(run)
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [1, 2]
    assert [r["event"] for r in records].count("start") == 1


def test_train_overwrite_starts_afresh_with_clean_files(finished_run, tiny_dataset, tmp_path):
    run, config_path = copied_run(finished_run, tiny_dataset, tmp_path)
    (run / "clusters.npz").write_bytes(b"from the old run")
    shutil.copyfile(run / "latest.pt", run / "best.pt")  # as a run with validation leaves it
    (run / "notes.txt").write_text("the user's own file")
    old_start = events(run)[0]["time"]
    assert main(["train", "--config", str(config_path), "--quiet", "--overwrite"]) == 0
    records = events(run)
    assert [r["event"] for r in records].count("start") == 1 and records[0]["time"] > old_start
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [1]
    assert not (run / "clusters.npz").exists()  # a file of the old run that this one does not write
    assert (run / "notes.txt").read_text() == "the user's own file"
    # The new run has no validation set: latest.pt only, the old run's best.pt is gone with it.
    assert (run / "latest.pt").is_file() and not (run / "best.pt").exists()


def test_a_fresh_run_does_not_append_to_a_log_left_without_checkpoint(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"event": "start", "step": 0, "time": 1.0}) + "\n")
    Trainer(tiny_config(tiny_dataset, run, train=ONE_EPOCH), progress=False).fit()
    assert [r["time"] for r in events(run) if r["event"] == "start"] != [1.0]
    assert [r["event"] for r in events(run)].count("start") == 1


# ----------------------------------------------------------------------------- embed
def test_embed_whose_manifest_write_fails_keeps_the_previous_output(finished_run, tiny_dataset, tmp_path,
                                                                    monkeypatch):
    images, outputs = tmp_path / "images", tmp_path / "outputs"
    shutil.copytree(tiny_dataset, images)
    out = outputs / "emb"
    embed_folder(finished_run / "latest.pt", images, out, num_workers=0, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"embeddings.npy", "manifest.csv", "embed.json"}

    def failing_writer(*args, **kwargs):  # as a file name that is not valid UTF-8 did
        raise UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed")

    monkeypatch.setattr(extract, "write_csv_atomic", failing_writer)
    (images / "extra_identity").mkdir()
    shutil.copy(next(images.glob("*/*.png")), images / "extra_identity" / "new.png")
    with pytest.raises(UnicodeEncodeError):
        embed_folder(finished_run / "latest.pt", images, out, num_workers=0, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in outputs.iterdir()] == ["emb"]  # no half-written sibling left


def test_embed_refuses_a_folder_that_is_not_an_embeddings_folder(finished_run, tiny_dataset, tmp_path):
    with pytest.raises(OutputError, match="not an embeddings folder"):
        embed_folder(finished_run / "latest.pt", tiny_dataset, finished_run, num_workers=0, progress=False)
    assert (finished_run / "latest.pt").is_file()
    assert main(["embed", "--checkpoint", str(finished_run / "latest.pt"), "--images", str(tiny_dataset),
                 "--out", str(finished_run), "--workers", "0", "--quiet"]) == 2


def write_embeddings(out: Path, rows: int, seed: int) -> None:
    vectors = np.random.default_rng(seed).normal(size=(rows, 4)).astype(np.float32)
    items = [(f"/images/p{i % 2}/{seed}_{i}.png", f"p{i % 2}") for i in range(rows)]
    extract.write_embeddings_folder(out, vectors, items, {"model_fingerprint": "f" * 16, "flip": "sum",
                                                          "num_images": rows})


def test_readers_reject_an_embeddings_folder_whose_parts_disagree(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    write_embeddings(first, 6, seed=0)
    write_embeddings(second, 6, seed=1)  # same count and dimension: only the record tells them apart
    assert len(load_embeddings_folder(first).keys) == 6
    assert load_embedding_source(first)["names"] == ["p0", "p1"] * 3
    shutil.copy(second / "embeddings.npy", first / "embeddings.npy")
    with pytest.raises(EvalInputError, match="mixes two outputs"):
        load_embeddings_folder(first)
    with pytest.raises(ClusterIndexError, match="mixes two outputs"):
        load_embedding_source(first)
    write_embeddings(first, 6, seed=0)  # an embeddings folder is replaced whole
    shutil.copy(second / "manifest.csv", first / "manifest.csv")
    with pytest.raises(EvalInputError, match=r"manifest\.csv is not the file"):
        load_embeddings_folder(first, mmap=True)


def test_atomic_folder_replaces_whole_or_refuses(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    with pytest.raises(OutputError, match="not empty"):
        with atomic_folder(target) as staging:
            (staging / "new.txt").write_text("new")
    with pytest.raises(RuntimeError):
        with atomic_folder(target, replace=True) as staging:
            (staging / "new.txt").write_text("new")
            raise RuntimeError("failed half-way")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in target.iterdir()] == ["mine.txt"]
    with atomic_folder(target, replace=True) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_report_that_fails_half_way_leaves_the_previous_report_whole(tmp_path, monkeypatch):
    from facepipe.eval import report as report_module

    def make(value: float) -> report_module.EvalReport:
        return report_module.EvalReport(
            title="t", metrics={"accuracy": value}, summary_rows=[("accuracy", str(value))],
            tables=[report_module.Table("scores.csv", ["score"], [[value]])],
            roc_curves={"model": (np.array([0.0, 1.0]), np.array([0.0, 1.0]))})

    out = tmp_path / "report"
    (out / "aligned").mkdir(parents=True)  # what a job keeps in its report folder
    report_module.write_report(out, make(0.5))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert set(before) == {"scores.csv", "roc.png", "metrics.json", "report.md"}

    def failing_plot(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(report_module, "plot_roc", failing_plot)
    with pytest.raises(RuntimeError, match="plot failed"):
        report_module.write_report(out, make(0.9))  # its scores.csv was written before the plot
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["aligned"]


# ----------------------------------------------------------------------------- align
@pytest.fixture
def blank_images(tmp_path) -> Path:
    source = tmp_path / "src"
    for name in ("a/1.png", "a/2.png", "b/1.png", "b/2.png"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), (90, 90, 90)).save(source / name)
    return source


def no_face_rows(paths) -> str:
    return "".join(json.dumps({"path": p, "status": "no_face", "output": None, "num_faces": 0, "faces": []}) + "\n"
                   for p in paths)


def test_a_second_align_into_a_locked_folder_fails_clearly(blank_images, tmp_path, capsys):
    dst = tmp_path / "dst"
    with exclusive_lock(dst / ".manifest.jsonl.lock", "test"):
        with pytest.raises(OutputLockedError, match="in use by another process"):
            align_images(blank_images, dst, AlignConfig(), workers=0, progress=False)
        assert main(["align", str(blank_images), str(dst), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert str(dst) in err and "in use by another process" in err and "Traceback" not in err
        # Shards of one DST run side by side: another shard's manifest is not locked.
        shard = [f"{d}/{n}" for d in "ab" for n in ("1.png", "2.png") if in_shard(f"{d}/{n}", (1, 2))]
        (dst / "manifest.shard-1-of-2.jsonl").write_text(no_face_rows(shard))
        summary = align_images(blank_images, dst, AlignConfig(), shard=(1, 2), workers=0, progress=False)
        assert summary.skipped == len(shard)
    assert not (dst / "manifest.jsonl").exists()


def test_resume_removes_duplicate_manifest_lines(blank_images, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    paths = ["a/1.png", "a/2.png", "b/1.png", "b/2.png"]
    # What two runs appending to one manifest at once left: every image twice.
    (dst / "manifest.jsonl").write_text(no_face_rows(paths) + no_face_rows(paths))
    summary = align_images(blank_images, dst, AlignConfig(), workers=0, progress=False)
    assert summary.skipped == 4 and sum(summary.counts.values()) == 0
    rows = read_manifest(dst / "manifest.jsonl")
    assert sorted(row["path"] for row in rows) == paths
    counts = json.loads((dst / "manifest.summary.json").read_text())["status_counts"]
    assert counts == {"no_face": 4}
