import json
import re
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
    # The summary describes the whole run; without validation there is no best.pt (issue 26).
    printed = capsys.readouterr().out.strip().splitlines()
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["event"] == "epoch"][-1]
    assert printed[0] == f"training finished: trained 1 stage (arcface 1 epoch): 1/1 epochs, {last['step']} steps"
    assert re.fullmatch(r"  wall time \d+\.\d s", printed[1])
    assert printed[2] == f"  final loss {last['loss']:.4f} (epoch 1, training accuracy {last['accuracy']:.4f})"
    assert printed[3:] == ["  no validation set: only latest.pt written", f"  checkpoints in {tmp_path / 'run'}: latest.pt"]
    assert not (tmp_path / "run" / "best.pt").exists()
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


def test_train_summary_names_the_best_epoch_with_validation(tiny_dataset, tmp_path, capsys):
    dataset = IdentityFolderDataset(tiny_dataset)
    idx_a, idx_b, is_same = make_pairs(dataset.labels, 40, seed=1)
    rel = [Path(s.path).relative_to(tiny_dataset).as_posix() for s in dataset.samples]
    pairs = tmp_path / "val.csv"
    write_pairs_csv(pairs, [rel[i] for i in idx_a], [rel[i] for i in idx_b], is_same)
    config = tiny_config(tiny_dataset, tmp_path / "run",
                         train={"validation": {"pairs": str(pairs), "root": str(tiny_dataset)}})
    config_path = tmp_path / "c.yaml"
    config_path.write_text(config.to_yaml())
    assert main(["train", "--config", str(config_path), "--quiet"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    epochs = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if r["event"] == "epoch"]
    accuracies = [r["val_accuracy"] for r in epochs]
    best_epoch = 1 + accuracies.index(max(accuracies))
    assert printed[0] == ("training finished: trained 2 stages (softmax 1 epoch, cosface 1 epoch): 2/2 epochs, "
                          f"{epochs[-1]['step']} steps")
    assert printed[-2:] == [f"  best.pt: epoch {best_epoch}, val_accuracy {max(accuracies):.4f} "
                            "(the highest of the validated epochs)",
                            f"  checkpoints in {tmp_path / 'run'}: latest.pt, best.pt"]
    assert (tmp_path / "run" / "best.pt").is_file()


def test_user_errors_are_one_line_with_exit_status_2(tiny_dataset, tmp_path, capsys):
    assert main(["train", "--config", "demo", "data.batchsize=4"]) == 2
    err = capsys.readouterr().err
    assert "batchsize" in err and "batch_size" in err and "Traceback" not in err
    # output_dir in tmp_path: the demo config's own run folder may hold a user's `make demo` run.
    assert main(["train", "--config", "demo", f"data.root={tmp_path / 'absent'}", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["embed", "--checkpoint", str(tmp_path / "none.pt"), "--images", str(tiny_dataset),
                 "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_resume_flag_continues_a_run(tiny_dataset, tmp_path, capsys):
    config = tiny_config(tiny_dataset, tmp_path / "run")
    config_path = tmp_path / "c.yaml"
    config_path.write_text(config.to_yaml())
    assert main(["train", "--config", str(config_path), "--quiet", "train.stages=[{epochs: 1, head: {type: softmax}}]"]) == 0
    assert "resumed" not in capsys.readouterr().out
    assert main(["train", "--config", str(config_path), "--quiet", "--resume",
                 "train.stages=[{epochs: 2, head: {type: softmax}}]"]) == 0
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [1, 2]
    # The summary counts the whole run and says this session resumed it (and what it trained).
    steps = records[-1]["step"]
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0] == f"training finished: trained 1 stage (softmax 2 epochs): 2/2 epochs, {steps} steps"
    assert re.fullmatch(rf"  resumed at epoch 1: this session trained 1 epoch \({steps // 2} steps\) in \d+\.\d s",
                        printed[1])
    assert printed[-2:] == ["  no validation set: only latest.pt written",
                            f"  checkpoints in {tmp_path / 'run'}: latest.pt"]
    shutil.rmtree(tmp_path / "run")


def test_python_api_mirrors_the_commands():
    import facepipe
    from facepipe.train.trainer import train

    assert facepipe.train_model is train
    for name in ("run_demo", "generate_dataset", "embed_folder", "evaluate_pairs_file", "load_config"):
        assert callable(getattr(facepipe, name))


def _commands(parser, words=()):
    """(command words, one-line help, parser) of every subcommand below ``parser``, depth first."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                yield (*words, choice.dest), choice.help, action.choices[choice.dest]
                yield from _commands(action.choices[choice.dest], (*words, choice.dest))


def _flat(text: str) -> str:
    return " ".join(text.split())  # help wraps at the terminal width


def test_help_describes_every_option_and_shows_its_default_once(monkeypatch):
    import argparse

    from facepipe.cli import build_parser

    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping, so no word is broken at a hyphen
    parser = build_parser()
    commands = list(_commands(parser))
    assert {words[0] for words, _, _ in commands} >= {
        "demo", "synth", "align", "subset", "pack", "train", "classify", "embed", "eval", "index", "search"}
    assert {" ".join(words) for words, _, _ in commands} >= {
        "eval pairs", "eval lfw", "eval ytf", "eval megaface", "eval bin",
        "index build", "index add", "index remove", "index info", "index calibrate", "index margins"}
    top = _flat(parser.format_help())
    checked = 0
    for words, description, command in [((), "", parser), *commands]:
        name = " ".join(("facepipe", *words))
        text = _flat(command.format_help())
        if words:
            # One line on the level above, and the same line heads the command's own help.
            assert description and description.strip(), f"{name} has no one-line help"
            assert _flat(description) in text, name
            # The top level names every command, those inside the groups too, with its line.
            assert _flat(f"{' '.join(words)} {description}") in top, name
        for child, child_help, _ in _commands(command):
            if len(child) == 1:
                assert _flat(f"{child[0]} {child_help}") in text, f"{name} --help does not list {child[0]}"
        for action in command._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            label = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help.strip(), f"{label} has no help"
            expanded = _flat(action.help % {**vars(action), "prog": command.prog})
            assert expanded in text, label
            default = action.default
            meaningful = not (default is None or default is False or default is argparse.SUPPRESS
                              or (isinstance(default, (list, tuple)) and not default))
            if "default" in expanded.lower():
                # Written into the help by hand: the formatter adds no second one.
                assert f"{expanded} (default:" not in text, f"{label} prints its default twice"
                if meaningful:
                    assert str(default) in expanded, f"{label}: its help speaks of a default but not of {default!r}"
            elif meaningful:
                assert f"{expanded} (default: {default})" in text, f"{label} does not show its default {default!r}"
                checked += 1
            else:
                assert f"{expanded} (default:" not in text, f"{label} shows a default it does not have"
    assert checked > 20  # the formatter, not only hand-written texts, shows the defaults
