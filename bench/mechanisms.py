#!/usr/bin/env python
"""Mechanism report: does each imbalance method actually act on this data?

Every formula of facepipe has a unit test; this report checks that, in a real run, the mechanism
behind each method is switched on and at strength. For each method it prints, at the start and at
the end of fine-tuning:

- L-Softmax / UMM / UMM+SUM (Liu et al.; Khan et al., CVPR 2019): lambda and the margin weight
  1 / (1 + lambda) of the margin-product target logit, and the value the full-length fine-tuning
  would reach;
- UMM (Khan et al.): the class-margin histogram of every uncertainty refresh and Spearman(class
  uncertainty, class size) (the paper's premise is a negative correlation);
- every method: per clipping group gradient norm and clip factor (1 = untouched);
- ARConvL (Li et al.): radii against the feature distances, and how far the class centres moved;
- CLMLE (Huang et al., TPAMI 2019): cosine of a sample to its own batch centroid with and without
  the sample, the fraction of samples at zero loss, distinct images and clusters per batch, and
  whether the BatchNorm running statistics moved.

Two ways to use it:

    # short fine-tunings from the kept LFW-study pre-training, each method as configured now
    # ("fixed") and with the settings of the first study ("legacy"), resumable per run:
    .venv/bin/python bench/mechanisms.py --modes legacy fixed
    # a report of finished run folders (any facepipe run; its files alone, through
    # facepipe.study.mechanisms: metrics.jsonl, config.yaml, uncertainty.json):
    .venv/bin/python bench/mechanisms.py --runs runs/my_run other_run

Data: the training split of ``bench/lfw_study.py`` (``<study>/data/train``; run that script, or
at least its alignment and split, first) and its kept pre-training ``init.pt``.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lfw_study  # noqa: E402  (the study's methods, config and data layout)

from facepipe.config import Config, config_from_dict, find_config, load_config  # noqa: E402
from facepipe.errors import FacepipeUserError  # noqa: E402
from facepipe.study.mechanisms import (  # noqa: E402
    format_margins,
    format_span,
    mechanism_markdown,
    mechanism_summary,
)
from facepipe.runtime.io import write_json_atomic, write_text_atomic  # noqa: E402

log = logging.getLogger("mechanisms")

METHOD_ORDER = list(lfw_study.METHODS)
MARGIN_PRODUCT = ("lsoftmax", "sphereface")
REPORT = "mechanisms.json"


# ============================================================================================
# Settings: the first study's ("legacy") and the corrected ones ("fixed")
# ============================================================================================
def _stage_settings(stage: dict, mode: str) -> None:
    head = stage["head"]
    if head["type"] in MARGIN_PRODUCT:
        if mode == "legacy":
            head["lambda_schedule"] = "restart"
        else:
            # Fine-tuning a pre-trained classifier: the margin at full strength from the first step.
            head["lambda_base"] = head.get("lambda_min", 5.0)
    if stage.get("loss", {}).get("type") == "clmle":
        if "own_centroid" in stage["loss"]:
            stage["loss"]["own_centroid"] = "inclusive" if mode == "legacy" else "leave_one_out"
        if "bn" in stage:
            stage["bn"] = "batch" if mode == "legacy" else "frozen"


def method_config(method: str, mode: str, args: argparse.Namespace) -> Config:
    """The LFW-study config of ``method`` (its METHODS overrides), shortened to ``--epochs`` x
    ``--steps-per-epoch``, in ``mode``: "legacy" reproduces the first study's mechanisms, "fixed"
    uses the corrected defaults."""
    overrides = [f"seed={args.seed}", f"output_dir={Path(args.out_runs) / mode / method}",
                 f"data.root={Path(args.study) / 'data' / 'train'}", f"train.init_from={args.init}",
                 f"train.max_steps_per_epoch={args.steps_per_epoch}", "train.log_every_steps=1",
                 f"data.num_workers={args.workers}",
                 *lfw_study.TABLE.method_overrides(method, epochs=args.epochs)]
    data = load_config(find_config(args.config), overrides).to_dict()
    for stage in data["train"]["stages"]:
        _stage_settings(stage, mode)
    if mode == "legacy":
        data["optim"]["clip_mode"] = "global"
        data["train"]["uncertainty"]["margin_map"] = "max_scaled"
        data["train"]["uncertainty"]["views"] = "clean"
        if "draw" in data["train"]["clusters"]:
            data["train"]["clusters"]["draw"] = "with_replacement"
    # Every refresh of a short run: the first and the last epoch both get one.
    data["train"]["uncertainty"]["refresh_every_epochs"] = max(1, args.epochs - 1)
    return config_from_dict(data)


# ============================================================================================
# Running and measuring
# ============================================================================================
def _bn_running_means(model) -> list:
    import torch

    return [m.running_mean.detach().clone() for m in model.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]


def run_method(config: Config) -> dict[str, Any]:
    """Fine-tune ``config`` (skipped when its report exists) and measure what only the live
    trainer shows: ARConvL centre movement, BatchNorm drift, lambda at the schedule's end."""
    import torch

    from facepipe.train import Trainer

    run_dir = Path(config.output_dir)
    done = run_dir / "live.json"
    if done.is_file():
        return json.loads(done.read_text())
    started = time.perf_counter()
    # The measurement needs the state before training: an interrupted run starts again afresh.
    trainer = Trainer(config, progress=False, overwrite=True)
    centres = trainer.head.centers.detach().clone() if hasattr(trainer.head, "centers") else None
    bn_before = _bn_running_means(trainer.model)
    trainer.fit()
    live: dict[str, Any] = {"seconds": time.perf_counter() - started, "steps": trainer.global_step}
    if centres is not None:
        moved = (trainer.head.centers.detach() - centres).norm(dim=1)
        live["centre_move_mean"] = float(moved.mean())
        live["centre_norm_mean"] = float(centres.norm(dim=1).mean())
    bn_after = _bn_running_means(trainer.model)
    live["bn_running_mean_change"] = float(max((a - b).abs().max() for a, b in zip(bn_after, bn_before)))
    write_json_atomic(done, live)
    return live


def lambda_at(head: dict, step: int) -> float:
    """Liu et al.'s annealed lambda after ``step`` steps (the head's formula, as configured)."""
    lam = head["lambda_base"] * (1.0 + head["lambda_gamma"] * step) ** (-head["lambda_power"])
    return max(head["lambda_min"], lam)


def full_schedule_lambda(config: dict, steps_per_epoch: int, study_epochs: int) -> list[dict]:
    """Per margin-product stage of the full-length method: lambda at its first and last step."""
    stages = config["train"]["stages"]
    total = sum(s["epochs"] for s in stages)
    scale = study_epochs / total  # the short run keeps the stage proportions of the full one
    out, anneal = [], 0
    for stage in stages:
        steps = int(round(stage["epochs"] * scale)) * steps_per_epoch
        head = stage["head"]
        if head["type"] not in MARGIN_PRODUCT:
            continue
        if head.get("lambda_schedule") == "restart":
            anneal = 0
        out.append({"stage": stage.get("name"), "lambda_start": lambda_at(head, anneal),
                    "lambda_end": lambda_at(head, anneal + steps - 1)})
        anneal += steps
    return out


def summarise(run_dir: Path, live: dict | None = None, full: list[dict] | None = None) -> dict[str, Any]:
    """The run folder's mechanism summary (:func:`facepipe.study.mechanisms.mechanism_summary`) with
    what only the live trainer measured (``live``: centre movement, BatchNorm drift; see
    :func:`run_method`) and the full-length lambda schedule (``full``) added."""
    out = mechanism_summary(run_dir)
    out["live"] = dict(live or {})
    out["full_schedule_lambda"] = full
    return out


# ============================================================================================
# Where UMM measures class uncertainty: clean or augmented views (train.uncertainty.views)
# ============================================================================================
VIEW_SETTINGS = {
    "clean": ("clean", {}),
    "augmented (the study's transform: hflip)": ("augmented", {}),
    "augmented (+ random resized crop 0.8-1, colour jitter, blur)": (
        "augmented", {"random_resized_crop": 1.0, "color_jitter": 0.8, "blur": 0.3}),
}


def measure_views(args: argparse.Namespace) -> list[dict]:
    """Spearman(class uncertainty, class size) of the pre-trained model on the study's training
    images, measured on each kind of view (Khan et al. Fig. 3 expect it negative)."""
    from facepipe.train import Trainer
    from facepipe.train.uncertainty_margins import measure_class_uncertainty, spearman_uncertainty_vs_size
    from facepipe.losses.uncertainty import umm_integer_margins

    rows = []
    for label, (views, augment) in VIEW_SETTINGS.items():
        config = method_config("umm", "fixed", args)
        data = config.to_dict()
        data["data"]["augment"].update(augment)
        data["output_dir"] = str(Path(args.out_runs) / "views")
        trainer = Trainer(config_from_dict(data), progress=False)
        started = time.perf_counter()
        measured = measure_class_uncertainty(
            trainer.model, trainer.head, trainer.dataset, trainer.dataset.labels, trainer.dataset.num_classes,
            trainer.device, trainer.config.train.uncertainty, seed=args.seed, views=views,
            image_size=trainer.config.data.image_size)
        counts = np.bincount(trainer.dataset.labels, minlength=trainer.dataset.num_classes)
        u = measured.class_u.numpy()
        tail = counts <= np.median(counts)
        rows.append({"views": label, "spearman": spearman_uncertainty_vs_size(measured.class_u, counts),
                     "mean_u_tail": float(u[tail].mean()), "mean_u_head": float(u[~tail].mean()),
                     "zero_u_classes": int((u <= 1e-6).sum()), "classes": int(len(u)),
                     "max_scaled_m1_classes": int((umm_integer_margins(measured.class_u, 3, "max_scaled") == 1).sum()),
                     "seconds": time.perf_counter() - started})
        log.info("views %s: %s", label, rows[-1])
    return rows


def views_md(rows: list[dict]) -> str:
    header = ["views", "Spearman(u, class size)", "mean u, classes with <= median images", "mean u, larger classes",
              "classes with u ~ 0", "classes at m = 1 under the max-scaled map", "seconds"]
    body = [[r["views"], f"{r['spearman']:+.3f}", f"{r['mean_u_tail']:.4f}", f"{r['mean_u_head']:.4f}",
             f"{r['zero_u_classes']} / {r['classes']}", str(r["max_scaled_m1_classes"]), f"{r['seconds']:.0f}"]
            for r in rows]
    return "\n".join(_table(header, body)) + "\n"


# ============================================================================================
# Report
# ============================================================================================
def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def report_md(rows: list[dict]) -> str:
    """The legacy / fixed comparison: one table per mechanism, each with the methods it concerns,
    first → last value of the run (summaries of :func:`summarise`, live figures included)."""
    def of(methods):
        return [r for r in rows if r["method"] in methods]

    out = ["Values are first → last training record of each short run unless said otherwise.", "",
           "**Margin strength and UMM margins** (L-Softmax, UMM, UMM+SUM)", ""]
    table = []
    for r in of(("lsoftmax", "umm", "umm_sum")):
        s = r["summary"]
        full = "; ".join(f"{1 / (1 + f['lambda_start']):.3f} → {1 / (1 + f['lambda_end']):.3f}"
                         for f in s.get("full_schedule_lambda") or []) or "—"
        refreshes = (s["umm"] or {}).get("refreshes") or []
        shown = refreshes[:1] + refreshes[-1:]
        umm = " ⇒ ".join(format_margins(x["margins"]) for x in shown) if refreshes else "—"
        rho = " ⇒ ".join("—" if x["spearman"] is None else f"{x['spearman']:+.3f}" for x in shown) \
            if refreshes else "—"
        table.append([r["method"], r["mode"], format_span((s["margin_product"] or {}).get("margin_weight")), full,
                      umm, rho])
    out += _table(["method", "mode", "margin weight 1/(1+λ), short run", "margin weight per stage, full "
                   "fine-tuning (first → last step)", "UMM margin histogram, first ⇒ last refresh",
                   "Spearman(u, class size), first ⇒ last refresh"], table)
    out += ["", "**Gradient clipping** (every method; factor 1 = untouched, mean over the run's steps)", ""]
    table = []
    for r in rows:
        clip = r["summary"]["clip"]
        group = "global" if "global" in clip else "main"
        main, radius = clip.get(group), clip.get("radius")
        table.append([r["method"], r["mode"], group, _g(main["clip_factor"]["mean"]) if main else "—",
                      format_span(main["grad_norm"]) if main else "—",
                      _g(radius["clip_factor"]["mean"]) if radius else "—",
                      format_span(radius["grad_norm"]) if radius else "—"])
    out += _table(["method", "mode", "clip group", "clip factor (mean)", "gradient norm", "radius clip factor (mean)",
                   "radius gradient norm"], table)
    out += ["", "**ARConvL** (Li et al.)", ""]
    table = []
    for r in of(("arconvl",)):
        s, live = r["summary"], r["summary"]["live"]
        arconvl = s["arconvl"] or {}
        moved = live.get("centre_move_mean")
        table.append([r["mode"], f"{moved:.3g} (mean centre norm {live['centre_norm_mean']:.3g})"
                      if moved is not None else "—", format_span(arconvl.get("region")),
                      format_span(arconvl.get("radius_mean")), format_span(arconvl.get("r_ben"))])
    out += _table(["mode", "centre movement over the run", "region loss L_R", "mean radius", "R_ben"], table)
    out += ["", "**CLMLE** (Huang et al.)", ""]
    table = []
    for r in of(("clmle",)):
        s, live = r["summary"], r["summary"]["live"]
        clmle = s["clmle"] or {}
        with_, without = clmle.get("own_cos_with") or {}, clmle.get("own_cos_without") or {}
        own = "—"
        if with_.get("start") is not None and without.get("start") is not None:
            own = (f"{with_['start']:.2f} / {without['start']:.2f} → "
                   f"{with_['end']:.2f} / {without['end']:.2f}")
        old = live.get("with_replacement_distinct")
        table.append([r["mode"], own, format_span(clmle.get("zero_loss_fraction"), 2),
                      format_span(clmle.get("distinct_images"), 3)
                      + (f" (with-replacement draws: {old:.1f})" if old is not None else ""),
                      format_span(clmle.get("clusters_per_batch"), 3),
                      f"{live['bn_running_mean_change']:.2g}" if "bn_running_mean_change" in live else "—"])
    out += _table(["mode", "own-centroid cosine with / without the sample", "zero-loss fraction",
                   "distinct images per batch of 120", "clusters per batch", "BN running mean moved (max abs)"],
                  table)
    return "\n".join(out) + "\n"


def _g(value, digits=3) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def with_replacement_distinct(run_dir: Path, config: Config, batches: int = 200) -> float:
    """Mean distinct images per batch had each of the M clusters of a batch given k draws with
    replacement, as facepipe's sampler did before the fix (on the run's last clusters)."""
    from facepipe.data.cluster_sampler import ClusterBatchSampler
    from facepipe.data.clusters import ClusterAssignment

    clusters = config.train.clusters
    assignment = ClusterAssignment.from_npz(run_dir / "clusters.npz")
    sampler = ClusterBatchSampler(assignment.sample_cluster, assignment.centroids, assignment.cluster_identity,
                                  clusters_per_batch=clusters.clusters_per_batch,
                                  images_per_cluster=clusters.images_per_cluster, seed=config.seed,
                                  query="uniform")
    rng = np.random.default_rng(config.seed)
    counts = []
    for _ in range(batches):
        chosen = sampler.make_batch(0, int(rng.integers(2**31))).clusters[:clusters.clusters_per_batch]
        drawn = []
        for cluster in chosen:
            members = np.flatnonzero(assignment.sample_cluster == cluster)
            k = clusters.images_per_cluster
            drawn.append(rng.choice(members, size=k, replace=len(members) < k))
        counts.append(len(np.unique(np.concatenate(drawn))))
    return float(np.mean(counts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=None, metavar="DIR",
                        help="report these finished run folders instead of running anything")
    parser.add_argument("--methods", nargs="+", default=METHOD_ORDER, choices=list(lfw_study.METHODS))
    parser.add_argument("--modes", nargs="+", default=["legacy", "fixed"], choices=["legacy", "fixed"])
    parser.add_argument("--study", default="runs/lfw_study", help="lfw_study folder holding data/train")
    parser.add_argument("--init", default="bench/reports/lfw_study/runs/pretrain/seed0/init.pt",
                        help="the pre-training every method fine-tunes from")
    parser.add_argument("--config", default="lfw_study")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of each short fine-tuning (default 4)")
    parser.add_argument("--steps-per-epoch", type=int, default=15, help="steps per short epoch (default 15)")
    parser.add_argument("--study-epochs", type=int, default=lfw_study.TABLE.epochs,
                        help="epochs of the full fine-tuning, for the projected lambda (default: the method table's, 10)")
    parser.add_argument("--views", action="store_true",
                        help="only measure Spearman(class uncertainty, class size) on clean and augmented views")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: report the short runs already in --out-runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out-runs", default="runs/mechanisms", help="where the short runs go")
    parser.add_argument("--results", default="bench/reports/mechanisms", help="report folder (kept in git)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("facepipe",):
        logging.getLogger(name).setLevel(logging.WARNING)

    if args.views:
        measured = measure_views(args)
        markdown = views_md(measured)
        print(markdown)
        results = Path(args.results)
        results.mkdir(parents=True, exist_ok=True)
        write_json_atomic(results / "uncertainty_views.json", measured)
        write_text_atomic(results / "uncertainty_views.md", markdown)
        return 0
    if args.runs:
        # Finished run folders: their files alone (facepipe.study.mechanisms), one table.
        try:
            summaries = [(folder, mechanism_summary(folder)) for folder in args.runs]
        except FacepipeUserError as exc:
            raise SystemExit(str(exc)) from None
        print(mechanism_markdown(summaries))
        return 0
    if not (Path(args.study) / "data" / "train").is_dir():
        raise SystemExit(f"{args.study}/data/train is missing: run bench/lfw_study.py (alignment and split) first")
    rows = []
    for mode in args.modes:
        for method in args.methods:
            config = method_config(method, mode, args)
            if args.report_only and not (Path(config.output_dir) / "live.json").is_file():
                continue
            log.info("%s / %s: %s", mode, method, config.output_dir)
            live = run_method(config)
            if method == "clmle" and mode == "legacy" and "with_replacement_distinct" not in live:
                live["with_replacement_distinct"] = with_replacement_distinct(Path(config.output_dir), config)
            full_steps = _full_steps_per_epoch(config)
            full = full_schedule_lambda(config.to_dict(), full_steps, args.study_epochs)
            rows.append({"method": method, "mode": mode,
                         "summary": summarise(Path(config.output_dir), live, full)})
            log.info("%s / %s: %s", mode, method, json.dumps(rows[-1]["summary"], default=str)[:600])
    markdown = report_md(rows)
    print(markdown)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results / REPORT, rows)
    write_text_atomic(results / "mechanisms.md", markdown)
    return 0


def _full_steps_per_epoch(config: Config) -> int:
    """Steps of one full epoch of the study (the shuffle sampler: images // batch)."""
    root = Path(config.data.root)
    images = sum(1 for p in root.rglob("*") if p.is_file() or p.is_symlink())
    return images // config.data.batch_size


if __name__ == "__main__":
    sys.exit(main())
