import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from conftest import tiny_config
from facepipe.cli import main
from facepipe.data.dataset import IdentityFolderDataset
from facepipe.eval.verification import make_pairs, write_pairs_csv

COMMANDS = ("demo", "synth", "train", "embed", "eval")


def test_console_entry_point_lists_the_commands():
    facepipe = Path(sys.executable).parent / "facepipe"
    result = subprocess.run([str(facepipe), "--help"], capture_output=True, text=True, check=True)
    for command in COMMANDS:
        assert command in result.stdout
    module = subprocess.run([sys.executable, "-m", "facepipe", "--help"], capture_output=True, text=True, check=True)
    assert module.stdout == result.stdout


def test_synth_command_writes_long_tailed_identities(tmp_path, capsys):
    out = tmp_path / "synth"
    code = main(["synth", "--out", str(out), "--identities", "4", "--max-images", "6", "--min-images", "2",
                 "--size", "32", "--quiet"])
    assert code == 0
    counts = [len(list((out / d).glob("*.png"))) for d in sorted(p.name for p in out.iterdir() if p.is_dir())]
    assert counts[0] == 6 and counts == sorted(counts, reverse=True) and min(counts) >= 2
    assert "wrote" in capsys.readouterr().out


def test_train_embed_and_eval_pairs_through_the_cli(tiny_dataset, tmp_path, capsys):
    config = tiny_config(tiny_dataset, tmp_path / "run", train={"stages": [{"epochs": 1, "head": {"type": "arcface",
                                                                                                     "s": 16.0, "m": 0.2}}]})
    config_path = tmp_path / "c.yaml"
    config_path.write_text(config.to_yaml())
    assert main(["train", "--config", str(config_path), "--quiet", "optim.lr=0.01"]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.01
    checkpoint = tmp_path / "run" / "latest.pt"
    assert main(["embed", "--checkpoint", str(checkpoint), "--images", str(tiny_dataset),
                 "--out", str(tmp_path / "emb"), "--workers", "0", "--quiet"]) == 0
    assert np.load(tmp_path / "emb" / "embeddings.npy").shape[1] == 32

    dataset = IdentityFolderDataset(tiny_dataset)
    idx_a, idx_b, is_same = make_pairs(dataset.labels, 40, seed=0)
    rel = [Path(s.path).relative_to(tiny_dataset).as_posix() for s in dataset.samples]
    pairs = tmp_path / "pairs.csv"
    write_pairs_csv(pairs, [rel[i] for i in idx_a], [rel[i] for i in idx_b], is_same)
    assert main(["eval", "pairs", "--checkpoint", str(checkpoint), "--pairs", str(pairs), "--root", str(tiny_dataset),
                 "--out", str(tmp_path / "report"), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["num_pairs"] == 40 and 0.0 <= metrics["auc"] <= 1.0
    assert (tmp_path / "report" / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((tmp_path / "report" / "scores.csv").read_text().splitlines()) == 41


def test_user_errors_are_one_line_with_exit_status_2(tiny_dataset, tmp_path, capsys):
    assert main(["train", "--config", "demo", "data.batchsize=4"]) == 2
    err = capsys.readouterr().err
    assert "batchsize" in err and "batch_size" in err and "Traceback" not in err
    assert main(["train", "--config", "demo", f"data.root={tmp_path / 'absent'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["embed", "--checkpoint", str(tmp_path / "none.pt"), "--images", str(tiny_dataset),
                 "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_resume_flag_continues_a_run(tiny_dataset, tmp_path):
    config = tiny_config(tiny_dataset, tmp_path / "run")
    config_path = tmp_path / "c.yaml"
    config_path.write_text(config.to_yaml())
    assert main(["train", "--config", str(config_path), "--quiet", "train.stages=[{epochs: 1, head: {type: softmax}}]"]) == 0
    assert main(["train", "--config", str(config_path), "--quiet", "--resume",
                 "train.stages=[{epochs: 2, head: {type: softmax}}]"]) == 0
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [1, 2]
    shutil.rmtree(tmp_path / "run")


def test_python_api_mirrors_the_commands():
    import facepipe
    from facepipe.train.trainer import train

    assert facepipe.train_model is train
    for name in ("run_demo", "generate_dataset", "embed_folder", "evaluate_pairs_file", "load_config"):
        assert callable(getattr(facepipe, name))
