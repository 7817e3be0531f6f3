#!/usr/bin/env python
"""Resumable grid search of CLMLE's margins (Huang et al. Eq. 8-9): the inter-identity margin a1
(``inter_margin``) and the intra-identity margin a2 (``intra_margin``, a2 < a1).

    .venv/bin/python bench/clmle_margin_sweep.py                                  # configs/clmle.yaml
    .venv/bin/python bench/clmle_margin_sweep.py --inter 0.3 0.4 --intra 0.1 --set train.stages.1.epochs=3
    .venv/bin/python bench/clmle_margin_sweep.py --config my.yaml --pairs-csv heldout.csv --out runs/sweep

Huang et al. derive upper bounds of both margins in 2-D (``facepipe index margins`` prints them) and
notes that they are loose in high dimension; the margins are then chosen on validation data. This
script does that: for every pair (a1, a2) of ``--inter`` x ``--intra`` with a2 < a1 (default
{0.2, 0.3, 0.4} x {0.05, 0.1, 0.15}) it

1. trains the config (default ``configs/clmle.yaml``) with the overrides ``--set`` (e.g. fewer
   epochs), then ``train.stages.<i>.loss.inter_margin=a1`` and ``...intra_margin=a2`` for every
   stage ``i`` whose loss is ``clmle`` (or only ``--stage``), and ``output_dir=OUT/a1_<a1>_a2_<a2>``;
2. evaluates the final checkpoint (``latest.pt``: the margins are selected, not epochs) on
   validation pairs: by default the LFW development protocol's training pairs
   (``--pairs ../shared/data/lfw/pairsDevTrain.txt``, images ``--images runs/lfw112``, 10-fold
   cross-validation on contiguous tenths, :func:`facepipe.eval.lfw.evaluate_lfw`; pairsDevTest.txt
   stays untouched for the final test), or any ``--pairs-csv`` (``path_a,path_b,is_same``,
   :func:`facepipe.eval.pairs_job.evaluate_pairs_file`);
3. writes ``OUT/results.json`` and ``OUT/results.md`` for the pairs of this invocation's grid,
   sorted by verification accuracy (then AUC), after every run, so an interrupted sweep still
   reports what it finished.

Short runs: a margin shifts the hinge of Eq. 9 by scale * a; while a sample's hinge is active its
gradient does not depend on a, so runs of a few steps can give identical scores for different
margins (the loss values still differ). Compare margins on runs long enough for hinges to close.

Resuming: a run folder with ``sweep_result.json`` for the same settings is skipped; one with a
``latest.pt`` continues training from it (``Trainer(config, resume=True)``; a finished schedule
goes straight to evaluation); changing ``--set``, the config or the evaluation data for an
existing run folder is refused (use another ``--out``). Re-running the same command after an
interruption therefore redoes at most the interrupted epoch.

Caveat of the default data: ``runs/lfw_dev_train`` (configs/clmle.yaml) holds every LFW person
outside pairsDevTest.txt with 2+ images, so many pairsDevTrain.txt persons are training
identities and the selection measures them in-sample; the script prints the overlap. For a
selection on unseen identities, train on a subset that also excludes pairsDevTrain.txt persons,
or pass a ``--pairs-csv`` of held-out identities.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from facepipe.config import find_config, load_config
from facepipe.runtime.checkpoint import LATEST
from facepipe.runtime.io import write_json_atomic, write_text_atomic

log = logging.getLogger("clmle_margin_sweep")

RESULT_FILE = "sweep_result.json"
SPEC_FILE = "sweep_spec.json"


def margin_pairs(inter: list[float], intra: list[float]) -> list[tuple[float, float]]:
    # Huang et al. keep identities further apart than clusters of one identity: a2 < a1 (the
    # config refuses anything else), so such pairs are left out rather than failing mid-sweep.
    return [(a1, a2) for a1 in inter for a2 in intra if a2 < a1]


def clmle_stages(config, stage: int | None) -> list[int]:
    stages = [i for i, s in enumerate(config.train.stages) if s.loss.type == "clmle"]
    if stage is not None:
        if stage not in stages:
            raise SystemExit(f"--stage {stage} is not a clmle stage of the config (clmle stages: {stages or 'none'})")
        return [stage]
    if not stages:
        raise SystemExit("the config has no stage with loss type clmle: nothing to sweep")
    return stages


def run_name(a1: float, a2: float) -> str:
    return f"a1_{a1:g}_a2_{a2:g}"


def check_spec(run_dir: Path, spec: dict) -> None:
    """A run folder belongs to one set of settings: resuming it with others would mix two runs."""
    path = run_dir / SPEC_FILE
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved != spec:
            raise SystemExit(f"{run_dir} was made with other settings ({path}: {saved}, now {spec}); use another "
                             "--out or delete the folder")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, spec)


def train_run(config, progress: bool) -> dict:
    from facepipe.train.trainer import Trainer

    run_dir = Path(config.output_dir)
    resume = (run_dir / LATEST).is_file()
    trainer = Trainer(config, resume=resume, progress=progress)
    start = time.perf_counter()
    if trainer.epoch < config.train.total_epochs:
        log.info("%s: training from epoch %d of %d%s", run_dir.name, trainer.epoch, config.train.total_epochs,
                 " (resumed)" if resume else "")
        metrics = trainer.fit()
    else:  # finished before an interruption of the evaluation
        metrics = trainer.last_metrics
    return {"resumed": resume, "train_seconds_this_session": time.perf_counter() - start,
            "final_loss": metrics.get("loss"), "epochs": config.train.total_epochs}


def evaluate_run(run_dir: Path, args: argparse.Namespace) -> dict:
    checkpoint = run_dir / LATEST
    out = run_dir / "eval"
    if args.pairs_csv:
        from facepipe.eval.pairs_job import evaluate_pairs_file

        result = evaluate_pairs_file(checkpoint, args.pairs_csv, args.pairs_root, out, device=args.device,
                                     progress=not args.quiet)
        verification = result["metrics"]
    else:
        from facepipe.eval.lfw import evaluate_lfw

        result = evaluate_lfw(args.pairs, out, images=args.images, checkpoint=checkpoint,
                              allow_missing=args.allow_missing, extension=args.ext, device=args.device,
                              progress=not args.quiet)
        verification = result["metrics"]["verification"]
    log.info("%s: %s", run_dir.name, result["summary"])
    tar = verification.get("tar_at_far") or {}
    return {"accuracy": verification["accuracy_mean"], "accuracy_std": verification["accuracy_std"],
            "auc": verification["auc"], "eer": verification["eer"], "tar_at_far": tar,
            "num_pairs": verification["num_pairs"], "report": str(out)}


def write_table(out: Path, results: list[dict], pending: list[str], header_note: str) -> None:
    ranked = sorted(results, key=lambda r: (-r["accuracy"], -r["auc"], r["inter_margin"], r["intra_margin"]))
    write_json_atomic(out / "results.json", {"note": header_note, "pending": pending, "results": ranked})
    far_keys = sorted({key for r in ranked for key in r["tar_at_far"]}, key=float, reverse=True)
    header = ["rank", "inter a1", "intra a2", "accuracy", "AUC", "EER", *(f"TAR@FAR={k}" for k in far_keys),
              "final loss", "run"]
    lines = ["# CLMLE margin sweep (Huang et al. Eq. 8-9)", "", header_note, "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for rank, r in enumerate(ranked, 1):
        loss = "-" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
        lines.append("| " + " | ".join([
            str(rank), f"{r['inter_margin']:g}", f"{r['intra_margin']:g}",
            f"{r['accuracy']:.4f} ± {r['accuracy_std']:.4f}", f"{r['auc']:.4f}", f"{r['eer']:.4f}",
            *(f"{r['tar_at_far'][k]:.4f}" if k in r["tar_at_far"] else "-" for k in far_keys),
            loss, r["run"]]) + " |")
    if pending:
        lines += ["", f"not finished yet: {', '.join(pending)}"]
    write_text_atomic(out / "results.md", "\n".join(lines) + "\n")


def lfw_overlap_note(config, pairs: str) -> str | None:
    # Persons of the validation pairs that are also training identities make the selection in-sample.
    from facepipe.data.lfw_pairs import parse_lfw_pairs

    root = config.data.root
    if root is None or not Path(root).is_dir():
        return None
    persons = set(parse_lfw_pairs(pairs).persons())
    training = {p.name for p in Path(root).iterdir() if p.is_dir()}
    shared = persons & training
    if not shared:
        return None
    return (f"{len(shared)} of the {len(persons)} persons of {pairs} are training identities of {root}: the "
            "selection is partly in-sample")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="clmle", help="config name in configs/ or a YAML path (default clmle)")
    parser.add_argument("--inter", type=float, nargs="+", default=[0.2, 0.3, 0.4], help="values of inter_margin a1")
    parser.add_argument("--intra", type=float, nargs="+", default=[0.05, 0.1, 0.15],
                        help="values of intra_margin a2 (pairs with a2 >= a1 are skipped)")
    parser.add_argument("--stage", type=int, default=None,
                        help="index of the clmle stage to set (default: every stage whose loss is clmle)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every run (repeatable), e.g. train.stages.1.epochs=2")
    parser.add_argument("--out", default="runs/clmle_margin_sweep", help="sweep folder: one run folder per pair")
    parser.add_argument("--pairs", default="../shared/data/lfw/pairsDevTrain.txt",
                        help="LFW pairs file of the validation pairs (default: the development training pairs)")
    parser.add_argument("--images", default="runs/lfw112", help="aligned LFW folder (name/name_%%04d.jpg)")
    parser.add_argument("--ext", default=".jpg", help="LFW image extension")
    parser.add_argument("--allow-missing", action="store_true", help="LFW: count pairs with a missing face as wrong")
    parser.add_argument("--pairs-csv", default=None,
                        help="instead of LFW: CSV path_a,path_b,is_same of validation pairs")
    parser.add_argument("--pairs-root", default=None, help="folder the --pairs-csv paths are relative to")
    parser.add_argument("--device", default="auto", help="device of the evaluation (training: train.device)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)

    if any(item.split("=", 1)[0].strip() == "output_dir" for item in args.overrides):
        raise SystemExit("--set output_dir=... is not allowed: every pair trains into OUT/<pair>")
    config_path = find_config(args.config)
    base = load_config(config_path, args.overrides)
    stages = clmle_stages(base, args.stage)
    pairs = margin_pairs(args.inter, args.intra)
    if not pairs:
        raise SystemExit("no margin pair with intra < inter in the grid")
    if args.pairs_csv:
        evaluation = {"pairs_csv": str(Path(args.pairs_csv).resolve()),
                      "pairs_root": str(Path(args.pairs_root).resolve()) if args.pairs_root else None}
        note = f"validation: {args.pairs_csv} (10-fold accuracy)"
    else:
        evaluation = {"pairs": str(Path(args.pairs).resolve()), "images": str(Path(args.images).resolve()),
                      "ext": args.ext, "allow_missing": args.allow_missing}
        note = f"validation: LFW {args.pairs} on {args.images} (10-fold accuracy on contiguous tenths)"
        overlap = lfw_overlap_note(base, args.pairs)
        if overlap:
            log.warning("%s", overlap)
            note += f"; {overlap}"
    note += (f"; config {config_path}, stages {stages}, overrides {args.overrides or 'none'}; "
             "checkpoint: latest.pt of each run")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log.info("%d margin pairs, clmle stage(s) %s, into %s", len(pairs), stages, out)

    results: list[dict] = []
    for number, (a1, a2) in enumerate(pairs):
        name = run_name(a1, a2)
        run_dir = out / name
        margin_overrides = [f"train.stages.{i}.loss.{key}={value}"
                            for i in stages for key, value in (("inter_margin", a1), ("intra_margin", a2))]
        overrides = [*args.overrides, *margin_overrides, f"output_dir={run_dir}"]
        spec = {"config": str(config_path.resolve()), "overrides": overrides, "evaluation": evaluation}
        result_path = run_dir / RESULT_FILE
        if result_path.is_file():
            saved = json.loads(result_path.read_text(encoding="utf-8"))
            if saved.get("spec") == spec:
                log.info("%s: done before (accuracy %.4f), skipped", name, saved["accuracy"])
                results.append(saved)
                continue
        check_spec(run_dir, spec)
        config = load_config(config_path, overrides)
        training = train_run(config, progress=not args.quiet)
        scores = evaluate_run(run_dir, args)
        result = {"run": name, "inter_margin": a1, "intra_margin": a2, **training, **scores, "spec": spec}
        write_json_atomic(result_path, result)  # the marker: this pair is finished
        results.append(result)
        write_table(out, results, [run_name(*p) for p in pairs[number + 1:]], note)
    write_table(out, results, [], note)
    best = max(results, key=lambda r: (r["accuracy"], r["auc"]))
    print((out / "results.md").read_text(encoding="utf-8"))
    print(f"best: inter_margin={best['inter_margin']:g} intra_margin={best['intra_margin']:g} "
          f"(accuracy {best['accuracy']:.4f}); results in {out}/results.md and results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
