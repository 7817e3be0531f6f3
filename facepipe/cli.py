"""The ``facepipe`` command line: one entry point, one subcommand per job.

Every subcommand calls the same Python function that the API exposes; nothing here holds logic
beyond argument parsing and error reporting.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import subprocess
import sys
from typing import Sequence

log = logging.getLogger("facepipe")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # FAISS logs every SIMD build it tries at INFO; only the outcome matters to users.
    logging.getLogger("faiss.loader").setLevel(logging.DEBUG if verbose else logging.WARNING)


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        values = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"size '{text}' must be N or HxW") from None
    if len(values) == 1:
        return values[0], values[0]
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"size '{text}' must be N or HxW")
    return values  # type: ignore[return-value]


# Bounds of numeric options, checked by argparse: a bad value is its one-line usage error (exit
# 2) before any work, instead of an error from deep inside (a DataLoader, numpy's seeding, FAISS).
def _whole(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum, {minimum}")
        return value

    return parse


def _number(minimum: float | None = None, maximum: float | None = None):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if not math.isfinite(value) or (minimum is not None and value < minimum) or \
                (maximum is not None and value > maximum):
            bounds = {(True, True): f"in [{minimum:g}, {maximum:g}]", (True, False): f">= {minimum:g}",
                      (False, True): f"<= {maximum:g}", (False, False): "finite"}
            raise argparse.ArgumentTypeError(f"{text} must be a number "
                                             f"{bounds[minimum is not None, maximum is not None]}")
        return value

    return parse


# ----------------------------------------------------------------------------- commands
def cmd_synth(args: argparse.Namespace) -> int:
    from facepipe.data.synth import generate_dataset

    info = generate_dataset(
        args.out, num_identities=args.identities, seed=args.seed, distribution=args.distribution,
        max_images=args.max_images, min_images=args.min_images, gamma=args.gamma, size=args.size,
        first_identity=args.first_identity, images_per_identity=args.images_per_identity,
        progress=not args.quiet,
    )
    counts = info["counts"]
    print(f"wrote {info['num_images']} images of {len(counts)} identities to {info['root']} "
          f"(images per identity {min(counts)}..{max(counts)})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from facepipe.config import find_config, load_config
    from facepipe.runtime.distributed import launched_by_torchrun
    from facepipe.train import train
    from facepipe.train.runs import check_run_folder
    from facepipe.train.summary import format_run_summary

    if args.nproc > 1 and not launched_by_torchrun():
        # Checked here too: one line now instead of one per process and torchrun's traceback.
        check_run_folder(load_config(find_config(args.config), args.overrides).output_dir, args.resume,
                         args.overwrite)
        # The same command under torchrun on this machine: one process per GPU (or CPU share).
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   "-m", "facepipe", "train", "--config", args.config, *(["--resume"] if args.resume else []),
                   *(["--overwrite"] if args.overwrite else []), *(["--quiet"] if args.quiet else []),
                   *args.overrides]
        return subprocess.call(command)

    config = load_config(find_config(args.config), args.overrides)
    metrics = train(config, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 speaks for the run
        return 0
    # The whole run (stages, epochs, steps, wall time, final loss, best.pt or why there is none).
    first, *rest = format_run_summary(metrics["run"])
    print("\n".join([f"training finished: {first}", *(f"  {line}" for line in rest)]))
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from facepipe.config import find_config, load_config
    from facepipe.train.classify import run_classification

    config = load_config(find_config(args.config), args.overrides)
    results = run_classification(config, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite)
    per_class = "  ".join(f"{c}:{a:.3f}" for c, a in results["test_class_accuracy"].items())
    print(f"test G-mean {results['test_gmean']:.4f}  accuracy {results['test_accuracy']:.4f}  "
          f"(best epoch {results['best_epoch']}, val G-mean {results['best_val_gmean']:.4f})\n"
          f"per-class accuracy  {per_class}\nresults in {config.output_dir}/results.json")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from facepipe.embed import embed_folder

    summary = embed_folder(args.checkpoint, args.images, args.out, flip=args.flip, batch_size=args.batch_size,
                           device=args.device, num_workers=args.workers, progress=not args.quiet)
    print(f"wrote {summary['num_images']} embeddings (dim {summary['dimension']}, flip {summary['flip']}, "
          f"model {summary['model_fingerprint']}) to {args.out}")
    return 0


def cmd_eval_pairs(args: argparse.Namespace) -> int:
    from facepipe.eval.pairs_job import evaluate_pairs_file

    result = evaluate_pairs_file(args.checkpoint, args.pairs, args.root, args.out, device=args.device,
                                 progress=not args.quiet, allow_outside_root=args.allow_outside_root,
                                 align_check=not args.no_align_check)
    print(result["summary"])
    return 0


def _read_missing_list(path: str | None) -> list[str]:
    # One relative image path per line (e.g. the no-face list of the alignment stage).
    if path is None:
        return []
    from facepipe.eval.verification import EvalInputError

    try:
        with open(path, encoding="utf-8") as handle:
            return [line.split("\t")[0].strip() for line in handle if line.strip()]
    except UnicodeDecodeError as exc:
        raise EvalInputError(f"--missing-list {path} is not UTF-8 text ({exc})") from None


def cmd_eval_lfw(args: argparse.Namespace) -> int:
    from facepipe.eval.lfw import evaluate_lfw

    result = evaluate_lfw(args.pairs, args.out, images=args.images, checkpoint=args.checkpoint,
                          embeddings=args.embeddings, threshold_pairs=args.threshold_pairs,
                          allow_missing=args.allow_missing, missing=_read_missing_list(args.missing_list),
                          align=args.align, flip=args.flip, extension=args.ext, device=args.device, batch_size=args.batch_size,
                          progress=not args.quiet, align_check=not args.no_align_check)
    print(result["summary"])
    return 0


def cmd_eval_ytf(args: argparse.Namespace) -> int:
    from facepipe.eval.ytf import evaluate_ytf

    result = evaluate_ytf(args.splits, args.out, videos=args.videos, checkpoint=args.checkpoint,
                          embeddings=args.embeddings, max_frames=args.max_frames, allow_missing=args.allow_missing,
                          missing=_read_missing_list(args.missing_list), flip=args.flip, device=args.device,
                          batch_size=args.batch_size, progress=not args.quiet)
    print(result["summary"])
    return 0


def cmd_eval_megaface(args: argparse.Namespace) -> int:
    from facepipe.eval.megaface import evaluate_megaface

    result = evaluate_megaface(args.out, probes=args.probes, distractors=args.distractors, checkpoint=args.checkpoint,
                               lfw_images=args.lfw_images, lfw_dev_pairs=args.lfw_dev_pairs,
                               impostor_top_k=args.impostor_top_k, seed=args.seed, flip=args.flip,
                               device=args.device, batch_size=args.batch_size, progress=not args.quiet)
    print(result["summary"])
    return 0


def cmd_eval_bin(args: argparse.Namespace) -> int:
    from facepipe.eval.insightface_bin import evaluate_bin

    result = evaluate_bin(args.bin, args.out, checkpoint=args.checkpoint, embeddings=args.embeddings, flip=args.flip,
                          device=args.device, batch_size=args.batch_size, progress=not args.quiet)
    print(result["summary"])
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from facepipe.errors import UsageError

    if (args.detector is None) == (args.checkpoint is None) or (args.checkpoint is None) != (args.out is None):
        raise UsageError("give --checkpoint CKPT --out MODEL.onnx (an embedding network), or --detector DIR "
                         "(the MTCNN networks)")
    if args.detector is not None:
        from facepipe.align.export import export_detector

        for name, item in export_detector(args.detector, opset=args.opset, overwrite=args.overwrite).items():
            print(f"{item['out']}: {item['bytes'] / 1e3:.0f} kB, outputs {', '.join(item['outputs'])}; ONNX Runtime "
                  f"matches PyTorch (largest difference {item['max_abs_difference']:.1e})")
        return 0
    from facepipe.models.export import export_onnx

    result = export_onnx(args.checkpoint, args.out, opset=args.opset, overwrite=args.overwrite)
    print(f"{result['out']}: {result['bytes'] / 1e6:.1f} MB, opset {result['opset']}, input "
          f"{result['input_size'].replace(',', 'x')} {result['channel_order'].upper()} (x - {result['input_mean']}) / "
          f"{result['input_scale']}, flip {result['flip']}, {result['embedding_size']}-d embeddings, fingerprint "
          f"{result['model_fingerprint']}; ONNX Runtime matches PyTorch (min cosine {result['parity_min_cosine']:.7f})")
    return 0


def _add_model_input_options(parser: argparse.ArgumentParser) -> None:
    """The preprocessing of a foreign ``.onnx`` model, on every command that takes --checkpoint."""
    group = parser.add_argument_group("a foreign .onnx model (facepipe's own exports carry these)")
    group.add_argument("--input-order", choices=["rgb", "bgr"], default=None, help="channel order the model wants")
    group.add_argument("--input-mean", type=float, default=None, help="model input = (pixel - MEAN) / SCALE")
    group.add_argument("--input-scale", type=float, default=None, help="see --input-mean")


def _model_file(args: argparse.Namespace) -> None:
    """Give the --input-* options to the command as part of its --checkpoint (a ModelFile)."""
    stated = [getattr(args, name, None) for name in ("input_order", "input_mean", "input_scale")]
    if all(value is None for value in stated):
        return
    from facepipe.errors import UsageError
    from facepipe.models.onnx_backend import InputContract, ModelFile

    if any(value is None for value in stated):
        raise UsageError("give --input-order, --input-mean and --input-scale together (the whole preprocessing "
                         "of a foreign .onnx model)")
    if getattr(args, "checkpoint", None) is None:
        raise UsageError("the --input-* options describe the model of --checkpoint; give --checkpoint")
    args.checkpoint = ModelFile(args.checkpoint, InputContract(*stated))


def cmd_align(args: argparse.Namespace) -> int:
    from facepipe.align.job import align_images, parse_shard
    from facepipe.config import load_align_config

    config = load_align_config(args.config, args.overrides)
    summary = align_images(args.source, args.destination, config, root=args.root, shard=parse_shard(args.shard),
                           workers=args.workers, restart=args.restart, progress=not args.quiet)
    print(f"align: {summary.line()}")
    return 0


def cmd_subset(args: argparse.Namespace) -> int:
    from facepipe.data.lfw_pairs import parse_lfw_pairs
    from facepipe.data.subset import link_identity_subset

    excluded: set[str] = set()
    for pairs in args.exclude_pairs:
        excluded |= set(parse_lfw_pairs(pairs).persons())
    counts = link_identity_subset(args.source, args.destination, excluded, args.min_images)
    print(f"subset: {counts['identities']} identities, {counts['images']} images linked into {args.destination} "
          f"({counts['excluded']} excluded by pairs files, {counts['too_few_images']} with fewer than "
          f"{args.min_images} images)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from facepipe.data.merge import merge_identity_sources

    record = merge_identity_sources(
        args.sources, args.destination, exclude_pairs=args.exclude_pairs, exclude_names=args.exclude_names,
        ignore_case=args.ignore_case, copy=args.copy, val_fraction=args.val_fraction, seed=args.seed,
        val_pairs=args.val_pairs, val_out=args.val_out, max_images=args.max_images,
        probe_fraction=args.probe_fraction, probe_min_images=args.probe_min_images, probe_out=args.probe_out,
        overwrite=args.overwrite)
    print(record["summary"])
    return 0



def cmd_study_run(args: argparse.Namespace) -> int:
    from facepipe.study.runner import StudyRunner
    from facepipe.study.spec import load_study_spec

    runner = StudyRunner(load_study_spec(args.spec), methods=args.methods, seeds=args.seeds,
                         extra_overrides=args.extra, device=args.device)
    counts = runner.run_all()
    print(f"study {runner.spec.name}: {counts['finished']} runs finished (this invocation or before), "
          f"{counts['claimed_elsewhere']} claimed by another process, {counts['deferred']} waiting for a sweep")
    return 0


def cmd_study_status(args: argparse.Namespace) -> int:
    from facepipe.study.runner import StudyRunner
    from facepipe.study.spec import load_study_spec

    runner = StudyRunner(load_study_spec(args.spec))
    for line in runner.status_lines():
        print(line)
    return 0


def cmd_study_report(args: argparse.Namespace) -> int:
    from facepipe.study.report import write_report
    from facepipe.study.spec import load_study_spec

    summary = write_report(load_study_spec(args.spec), readme=args.readme)
    print(summary)
    return 0

class _MergeSourceAction(argparse.Action):
    """``--source DIR``: a new source; the renaming options after it apply to it."""

    def __call__(self, parser, namespace, values, option_string=None):
        sources = list(getattr(namespace, self.dest, None) or [])
        sources.append({"path": values, "rename_map": None, "rename_pattern": None, "replace": []})
        setattr(namespace, self.dest, sources)


class _MergeRuleAction(argparse.Action):
    """A renaming rule of the ``--source`` given last (``--rename-map``, ``--rename-pattern``, ``--replace``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        sources = getattr(namespace, "sources", None)
        if not sources:
            raise argparse.ArgumentError(self, "must follow the --source it applies to")
        source = sources[-1]
        if self.dest == "replace":
            source["replace"].append(tuple(values))
        elif source[self.dest] is not None:
            raise argparse.ArgumentError(self, f"given twice for --source {source['path']}")
        else:
            source[self.dest] = values


def cmd_import_weights(args: argparse.Namespace) -> int:
    from facepipe.models.foreign import import_arcface_backbone

    info = import_arcface_backbone(args.weights, args.out, args.depth, embedding_size=args.embedding_size,
                                   image_size=tuple(args.image_size), overwrite=args.overwrite)
    print(f"wrote {info['out']}: {args.arch}{args.depth} with the {info['keys']} tensors of {args.weights} "
          f"({info['parameters'] / 1e6:.1f} M parameters, model {info['fingerprint']}); use it as --checkpoint "
          "or train.init_from")
    return 0


def _regex(text: str) -> str:
    import re

    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"'{text}' is not a regular expression: {exc}") from None
    return text


def cmd_pack(args: argparse.Namespace) -> int:
    from facepipe.data.recordio import pack_identity_folder

    info = pack_identity_folder(args.source, args.out_dir, prefix=args.prefix, progress=not args.quiet,
                                overwrite=args.overwrite)
    height, width = info["image_size"]
    print(f"packed {info['num_images']} images of {info['num_classes']} identities ({height}x{width}, "
          f"{info['reencoded']} re-encoded) into {info['rec']} ({info['bytes'] / 2**20:.1f} MiB), "
          f"{info['idx']} and {info['property']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from facepipe.demo import run_demo

    metrics = run_demo(args.out, config=args.config, overrides=args.overrides, progress=not args.quiet)
    print(metrics["summary"])
    return 0


def _index_source(args: argparse.Namespace) -> str:
    # Exactly one gallery source: a checkpoint with an aligned identity-folder tree, or embeddings.
    from facepipe.index.store import ClusterIndexError

    if args.embeddings is not None and (args.images is not None or args.checkpoint is not None):
        raise ClusterIndexError("give --checkpoint with --images, or --embeddings (with --labels), not both")
    if args.embeddings is not None:
        return "embeddings"
    if args.images is None or args.checkpoint is None:
        raise ClusterIndexError("give --checkpoint with --images (aligned identity folders), or --embeddings "
                                "with --labels")
    return "images"


def _index_options(args: argparse.Namespace) -> dict:
    names = ("num_neighbours", "unknown_threshold", "nlist", "nprobe", "hnsw_m", "ef_search")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def cmd_index_build(args: argparse.Namespace) -> int:
    from facepipe.index.store import ClusterIndexError, check_index_destination
    from facepipe.index.jobs import build_index_from_checkpoint, build_index_from_embeddings, load_embedding_source

    options = dict(kind=args.kind, config=_index_options(args), seed=args.seed, overwrite=args.overwrite,
                   progress=not args.quiet)
    source_kind = _index_source(args)
    check_index_destination(args.dir, args.overwrite)  # before loading, embedding or clustering anything
    if source_kind == "images":
        index = build_index_from_checkpoint(args.dir, args.checkpoint, args.images, args.cluster_size,
                                            device=args.device, batch_size=args.batch_size, **options)
    else:
        source = load_embedding_source(args.embeddings, args.labels)
        if source["names"] is None:
            raise ClusterIndexError("--embeddings needs --labels (one identity name per row) unless it is a "
                                    "'facepipe embed' output folder")
        config = {**options.pop("config"), **({"flip": source["flip"]} if source["flip"] else {})}
        index = build_index_from_embeddings(args.dir, source["embeddings"], source["names"], args.cluster_size,
                                            fingerprint=source["fingerprint"], config=config, **options)
    print(f"built index {args.dir}: {index.num_clusters} clusters of {len(index.identities())} identities "
          f"(kind {index.kind}, dim {index.dim}, model {index.fingerprint or 'unrecorded'})")
    print(f"clusters retrieved per query (Eq. 10): {index.describe_num_neighbours()}")
    return 0


def cmd_index_add(args: argparse.Namespace) -> int:
    from facepipe.index.jobs import enrol_images

    if _index_source(args) == "images":
        summary = enrol_images(args.dir, args.checkpoint, args.images, cluster_size=args.cluster_size, seed=args.seed,
                               device=args.device, batch_size=args.batch_size, progress=not args.quiet)
    else:
        summary = enrol_images(args.dir, embeddings=args.embeddings, labels=args.labels,
                               cluster_size=args.cluster_size, seed=args.seed, progress=not args.quiet,
                               allow_unfingerprinted=args.allow_unfingerprinted)
    print(f"added {summary['clusters_added']} clusters of {summary['embeddings']} embeddings to {args.dir}: "
          f"{len(summary['new_identities'])} new identities, {len(summary['extended_identities'])} extended")
    return 0


def cmd_index_remove(args: argparse.Namespace) -> int:
    from facepipe.index.store import ClusterIndex

    summary = ClusterIndex.open(args.dir).remove(args.identities)
    print(f"removed {len(summary['removed_identities'])} identities ({summary['removed_clusters']} clusters) from "
          f"{args.dir}; {summary['remaining_clusters']} clusters left")
    return 0


def cmd_index_info(args: argparse.Namespace) -> int:
    from facepipe.index.store import ClusterIndex

    info = ClusterIndex.open(args.dir).info()
    print(f"index {info['folder']}: kind {info['kind']}, dim {info['dim']}, model "
          f"{info['fingerprint'] or 'unrecorded'}, generation {info['generation']}")
    print(f"{info['num_identities']} identities, {info['num_clusters']} clusters, {info['num_embeddings']} "
          "embeddings enrolled")
    print("config: " + ", ".join(f"{key}={value}" for key, value in sorted(info["config"].items())))
    print(f"clusters retrieved per query (Eq. 10): {info['num_neighbours_description']}")
    calibration = info.get("calibration")
    if calibration:
        stale = "" if calibration["generation"] == info["generation"] else " (gallery changed since: recalibrate)"
        far = f", FAR {calibration['far']:.4g} at target {calibration['target_far']:g}" if "far" in calibration else ""
        print(f"calibrated {calibration['calibrated_at']} at generation {calibration['generation']}{stale}: N "
              f"{calibration['num_neighbours']}, top-1 {calibration['accuracy']:.4f}{far}")
    width = max([len("IDENTITY"), *map(len, info["identities"])])
    print(f"{'IDENTITY':<{width}}  CLUSTERS")
    for name, count in sorted(info["identities"].items()):
        print(f"{name:<{width}}  {count}")
    return 0


def _neighbour_grid(text: str) -> list[int]:
    # START:STOP:STEP, inclusive (Huang et al. write their grid MATLAB-style, 20:10:200), or a list.
    try:
        if ":" in text:
            start, stop, step = (int(part) for part in text.split(":"))
            if step < 1 or start < 1 or stop < start:
                raise ValueError
            return list(range(start, stop + 1, step))
        values = [int(part) for part in text.split(",") if part.strip()]
        if not values or min(values) < 1:
            raise ValueError
        return values
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid '{text}' must be START:STOP:STEP (e.g. 20:200:10) or N,N,...") from None


def cmd_index_calibrate(args: argparse.Namespace) -> int:
    from facepipe.index.jobs import calibrate_index
    from facepipe.runtime.io import write_json_atomic

    # Not _index_source: genuine embeddings may come with a --checkpoint for --impostor-images.
    report = calibrate_index(
        args.dir, args.checkpoint, args.images,
        embeddings=args.embeddings, labels=args.labels, impostor_images=args.impostor_images,
        impostor_embeddings=args.impostor_embeddings, target_far=args.target_far,
        **({"grid": args.grid} if args.grid else {}), device=args.device, batch_size=args.batch_size,
        progress=not args.quiet, allow_unfingerprinted=args.allow_unfingerprinted)
    grid = report["grid"]
    print(f"calibrated {args.dir} on {report['num_genuine']} genuine queries of {report['num_genuine_identities']} "
          f"enrolled identities and {report['num_impostor']} impostor queries")
    print(f"N (clusters retrieved, Eq. 10) = {report['num_neighbours']}: top-1 accuracy {report['accuracy']:.4f} "
          f"(grid {grid[0]}..{grid[-1]}, clipped to {report['num_clusters']} clusters)")
    if report["num_impostor"]:
        threshold = "none (accept all)" if report["threshold"] is None else f"{report['threshold']:.4f}"
        print(f"unknown threshold (log Eq. 10 score) {threshold}: FAR {report['far']:.4f} (target "
              f"{report['target_far']:g}), genuine accept rate {report['genuine_accept_rate']:.4f} of the correctly "
              f"identified, open-set identification rate {report['identification_rate']:.4f}")
    else:
        kept = report["kept_threshold"]
        print("no impostors given: unknown threshold unchanged" + (
            "" if kept is None else f" ({kept:.4f}; it may have been set for another N: recalibrate with impostors)"))
    if args.json:
        write_json_atomic(args.json, report)
    return 0


def cmd_index_margins(args: argparse.Namespace) -> int:
    from collections import Counter

    from facepipe.errors import UsageError
    from facepipe.losses.clmle import format_margin_bounds, suggest_margins

    if (args.data_root is None) == (args.labels is None):
        raise UsageError("give DATA_ROOT (identity folders) or --labels, not both or neither")
    if args.labels is not None:
        from facepipe.index.jobs import read_labels

        counts = list(Counter(read_labels(args.labels)).values())
        what = args.labels
    else:
        from facepipe.data.dataset import scan_identity_folders

        _, samples = scan_identity_folders(args.data_root)
        counts = list(Counter(sample.label for sample in samples).values())
        what = args.data_root
    if not counts:
        raise UsageError(f"{what} holds no labelled sample")
    s = suggest_margins(counts)
    print(f"{what}: {s['num_identities']} identities, {s['num_samples']} images "
          f"(per identity {min(counts)}..{max(counts)})")
    print(format_margin_bounds(counts))
    print("Huang et al. Sec. 3.2 derives a1max = 1 - cos(2 pi / C) and a2max_c = 1 - cos(2 pi L_c / L) on the 2-D unit "
          "circle; on the D-dim hypersphere of real embeddings they are loose (many directions stay far apart)")
    print(f"suggested margins (rule: inter = min(0.5, max(0.3, a1max)), intra = inter / 3; the 2-D bound "
          f"{'binds' if s['a1max_binds'] else 'does not bind'}; {s['tail_below_intra']:.0%} of identities have "
          "a2max_c below intra):")
    print(f"  loss: {{type: clmle, inter_margin: {s['inter_margin']:g}, intra_margin: {s['intra_margin']:g}}}")
    print(f"  overrides: train.stages.1.loss.inter_margin={s['inter_margin']:g} "
          f"train.stages.1.loss.intra_margin={s['intra_margin']:g}  (stage 1 as in configs/clmle.yaml)")
    print("  a starting point: search around it with bench/clmle_margin_sweep.py")
    return 0


# The SCORE column of 'facepipe search' (facepipe.index.knc): the log of Huang et al.'s Eq. 10.
SEARCH_SCORE_EXPLANATION = (
    "SCORE: log of the k-nearest-cluster score of Huang et al. Eq. 10: the identity's lowest cosine similarity "
    "to the query among the retrieved clusters minus the log-sum-exp of the cosine similarities of the other "
    "identities' retrieved clusters (taken as one cluster at -1 when none was retrieved); higher is better, and "
    "it can be negative")


def cmd_search(args: argparse.Namespace) -> int:
    from facepipe.index.jobs import search_images
    from facepipe.runtime.io import write_json_atomic

    results = search_images(args.index, args.checkpoint, args.inputs, top_k=args.top_k, align=args.align,
                            num_neighbours=args.num_neighbours, device=args.device, batch_size=args.batch_size,
                            progress=not args.quiet, allow_unfingerprinted=args.allow_unfingerprinted)
    rows = []
    for result in results:
        if result["status"] != "ok":
            rows.append((result["input"], "-", f"({result['status']})", ""))
            continue
        if result["unknown"]:
            best = result["matches"][0] if result["matches"] else None
            rows.append((result["input"], "-", "unknown", f"{best['score']:.4f} ({best['identity']})" if best else ""))
            continue
        for rank, match in enumerate(result["matches"], 1):
            rows.append((result["input"] if rank == 1 else "", str(rank), match["identity"], f"{match['score']:.4f}"))
    header = ("INPUT", "RANK", "IDENTITY", "SCORE")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    # One index, one N: every searched query carries the same note.
    searched = next((r for r in results if r.get("num_neighbours") is not None), None)
    if searched is not None:
        # Eq. 10 ranks only the identities owning one of the N clusters: explain a short list.
        fewer = ("; a query lists only the identities owning those clusters (--num-neighbours for more)"
                 if searched["num_neighbours"] < args.top_k else "")
        print(f"clusters retrieved per query (Eq. 10): {searched['num_neighbours_source']}{fewer}")
        print(SEARCH_SCORE_EXPLANATION)
    # One index, one threshold (every result carries it, also one without a query).
    threshold = results[0].get("unknown_threshold") if results else None
    if threshold is not None:
        print(f"unknown: the best SCORE of the query is below the index's unknown threshold {threshold:.4f} (the "
              "row shows that score and its identity)")
    else:
        # On stderr: a script reading the table from stdout gets the table only.
        print(f"facepipe search: note: the index {args.index} has no unknown threshold, so every query is given "
              "its best-scoring enrolled identity and none is 'unknown'; set one with 'facepipe index calibrate "
              f"{args.index} --embeddings VAL.npy --labels VAL_NAMES.txt --impostor-embeddings IMPOSTORS.npy' (or "
              "--checkpoint MODEL.pt --images VAL_DIR --impostor-images IMPOSTOR_DIR; validation images of "
              "enrolled identities, impostors of identities not enrolled; --target-far, default 0.01)",
              file=sys.stderr)
    if args.json:
        write_json_atomic(args.json, {"index": args.index, "top_k": args.top_k,
                                      "score": "log of Eq. 10 of Huang et al. (TPAMI 2019)",
                                      "num_neighbours": searched and searched["num_neighbours"],
                                      "num_neighbours_source": searched and searched["num_neighbours_source"],
                                      "unknown_threshold": threshold,
                                      "results": results})
    return 0


# ----------------------------------------------------------------------------- help
def shows_default(action: argparse.Action) -> bool:
    """Whether ``action`` has a default worth printing in its help: not None, False, SUPPRESS or
    an empty list (a flag that is off, an option that is unset, a repeatable one not given)."""
    default = action.default
    return not (default is None or default is False or default is argparse.SUPPRESS
                or (isinstance(default, (list, tuple)) and not default))


class HelpFormatter(argparse.HelpFormatter):
    """The help of every facepipe parser (the top level and each subcommand).

    As ``argparse.ArgumentDefaultsHelpFormatter``, an option's help ends with its default, but
    only where :func:`shows_default` and its text does not already speak of the default (so a
    default is never printed twice). Descriptions and epilogs are filled paragraph by paragraph,
    except paragraphs with indented lines (the command overview), which stay as written.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if shows_default(action) and "default" not in text.lower():
            text += " (default: %(default)s)"
        return text

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = text.split("\n\n")
        return "\n\n".join(
            "\n".join(indent + line for line in paragraph.splitlines())
            if any(line.startswith(" ") for line in paragraph.splitlines())
            else super(HelpFormatter, self)._fill_text(paragraph, width, indent)
            for paragraph in paragraphs)


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of each subcommand of ``parser``, in help order."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found += [(choice.dest, choice.help or "", action.choices[choice.dest])
                      for choice in action._choices_actions]
    return found


def _commands(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()):
    """(command words, one-line help, parser) of every command below ``parser``, depth first."""
    for name, text, child in _subcommands(parser):
        yield (*words, name), text, child
        yield from _commands(child, (*words, name))


def _finish_help(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` and every parser below it :class:`HelpFormatter`, each command its
    one-line help as the description of its own ``--help``, and ``parser`` an overview of the
    commands inside its command groups (``eval lfw``, ``index build``, ...)."""
    parser.formatter_class = HelpFormatter
    for _, text, child in _commands(parser):
        child.formatter_class = HelpFormatter
        child.description = child.description or text
    nested = [(" ".join(words), text) for words, text, _ in _commands(parser) if len(words) > 1]
    if nested:
        parser.epilog = _command_overview(nested)


def _command_overview(commands: list[tuple[str, str]], width: int = 78) -> str:
    import textwrap

    column = max(len(name) for name, _ in commands) + 4
    lines = ["commands in the groups ('facepipe GROUP COMMAND --help' for their options):"]
    for name, text in commands:
        wrapped = textwrap.wrap(text, max(20, width - column), break_on_hyphens=False) or [""]
        lines.append(f"  {name:<{column - 2}}{wrapped[0]}")
        lines += [" " * column + more for more in wrapped[1:]]
    return "\n".join(lines)


# Options that several commands share.
DEVICE_HELP = "torch device of the model: auto (a CUDA GPU when one is visible, else the CPU), cpu, cuda or cuda:N"
BATCH_SIZE_HELP = "images per embedding batch (default: the checkpoint config's embed.batch_size)"
QUIET_HELP = "no progress bars"


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facepipe",
        description="Face-recognition embeddings for long-tailed identity data: synthetic data, "
        "IR-SE training with margin heads, embedding extraction, verification and cluster-index identity search.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="synthetic data -> train -> held-out verification report (the README's first command)")
    p.add_argument("--out", default="runs/demo", help="output folder (data/, run/, report/)")
    p.add_argument("--config", default="demo", help="config name in configs/ or a YAML path (default: demo)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.stages.0.epochs=2")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("synth", help="render a synthetic long-tailed identity dataset")
    p.add_argument("--out", required=True, help="output folder: OUT/<identity>/<n>.png")
    p.add_argument("--identities", type=_whole(1), required=True, help="number of identities")
    p.add_argument("--seed", type=_whole(0), default=0,
                   help="random seed: the same seed (and --first-identity) renders the same images")
    p.add_argument("--distribution", choices=["power", "zipf", "uniform"], default="power",
                   help="images per identity: power law of Huang et al. Sec. 5.5, Zipf, or uniform")
    p.add_argument("--max-images", type=_whole(1), default=60, help="images of the largest identity")
    p.add_argument("--min-images", type=_whole(1), default=2, help="images of the smallest identity")
    p.add_argument("--gamma", type=_number(0), default=1.0, help="power-law exponent (smaller = more balanced)")
    p.add_argument("--size", type=_size, default="112x112", help="image size in pixels, N (square) or HxW")
    p.add_argument("--first-identity", type=_whole(0), default=0, help="global index of the first identity")
    p.add_argument("--images-per-identity", type=_whole(1), default=None, help="same count for every identity")
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("align", help="MTCNN detection and 5-point alignment of an image tree or list file")
    p.add_argument("source", metavar="SRC", help="folder of images (walked recursively) or a text file listing images")
    p.add_argument("destination", metavar="DST", help="output folder: crops at the same relative paths, manifest.jsonl")
    p.add_argument("--config", default=None,
                   help="YAML of align settings (or a training config with an align: section); default: built-in")
    p.add_argument("--root", default=None, help="folder the list file's paths are relative to (default: its folder)")
    p.add_argument("--shard", default="0/1", help="process shard i of n (i/n) of the inputs, for job arrays")
    p.add_argument("--workers", type=_whole(0), default=None,
                   help="processes that decode, detect and write (default: one per two cores; 0: no subprocess)")
    p.add_argument("--restart", action="store_true", help="ignore earlier progress in DST and redo every image")
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="align overrides, e.g. image_size=[112,96] select=central no_face=skip")
    p.set_defaults(func=cmd_align)

    p = sub.add_parser("subset", help="link a subset of identity folders (e.g. the LFW development training split)")
    p.add_argument("source", metavar="SRC", help="identity-folder tree (e.g. aligned LFW)")
    p.add_argument("destination", metavar="DST", help="new folder of links DST/<identity> -> SRC/<identity>")
    p.add_argument("--exclude-pairs", action="append", default=[],
                   help="leave out every person named in this LFW pairs file (repeatable)")
    p.add_argument("--min-images", type=_whole(0), default=1, help="keep identities with at least this many images")
    p.set_defaults(func=cmd_subset)

    p = sub.add_parser("merge", help="merge identity folders of several sources into one tree of links, by name "
                       "(e.g. Pins + LFW), with exclusions and a seeded validation split")
    p.add_argument("destination", metavar="DST", help="new folder: DST/<identity>/<identity>_NNNN.<ext> and merge.json")
    p.add_argument("--source", dest="sources", action=_MergeSourceAction, required=True, metavar="DIR",
                   help="identity-folder tree DIR/<identity>/<image> (repeatable; images are numbered in the order "
                   "the sources are given); the renaming options after it apply to it")
    p.add_argument("--rename-map", dest="rename_map", action=_MergeRuleAction, default=argparse.SUPPRESS,
                   metavar="FILE", help="rename this source's folders by FILE's 'old<TAB>new' lines (further "
                   "columns ignored, e.g. stage_pins.sh's names.tsv); applied first")
    p.add_argument("--rename-pattern", dest="rename_pattern", action=_MergeRuleAction, type=_regex,
                   default=argparse.SUPPRESS, metavar="REGEX",
                   help="a folder name this regular expression matches entirely becomes its first group, e.g. "
                   "'pins_(.*)'; others keep their names")
    p.add_argument("--replace", dest="replace", action=_MergeRuleAction, nargs=2, default=argparse.SUPPRESS,
                   metavar=("OLD", "NEW"), help="replace OLD by NEW in this source's names (repeatable, in "
                   "order); whitespace runs always become '_' last")
    p.add_argument("--ignore-case", action="store_true",
                   help="names equal but for case are one identity (spelled as in the first source)")
    p.add_argument("--exclude-pairs", action="append", default=[], metavar="FILE",
                   help="leave out every person named in this LFW pairs file, from every source (repeatable)")
    p.add_argument("--exclude-names", action="append", default=[], metavar="FILE",
                   help="leave out the identities of this file, one name a line (repeatable)")
    p.add_argument("--copy", action="store_true", help="copy the images instead of linking them")
    p.add_argument("--val-fraction", type=_number(0, 0.99), default=0.0,
                   help="hold out this fraction of the identities with 2+ images as validation people "
                   "(identity-disjoint; 0: none)")
    p.add_argument("--seed", type=_whole(0), default=0, help="seed of the validation people and their pairs")
    p.add_argument("--val-pairs", type=_whole(0), default=500,
                   help="matched and as many mismatched validation pairs to draw, at most (fewer when the "
                   "validation people allow fewer; 0: no pairs file)")
    p.add_argument("--val-out", default=None, metavar="DIR",
                   help="folder of the validation identities and their pairs.txt (default: DST_val)")
    p.add_argument("--max-images", type=_whole(1), default=None, metavar="N",
                   help="keep at most N images of each training identity (a seeded choice; the images left out "
                        "are counted in merge.json), to fit a training budget")
    p.add_argument("--probe-fraction", type=_number(0, 0.99), default=0.0,
                   help="hold out this fraction of the images of every training identity with --probe-min-images "
                   "or more as closed-set probes (at least 1, leaving 2 for training; 0: none)")
    p.add_argument("--probe-min-images", type=_whole(3), default=3, metavar="N",
                   help="only identities with N or more images lend probes (default 3)")
    p.add_argument("--probe-out", default=None, metavar="DIR",
                   help="folder of the closed-set probe images (default: DST_probes)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty DST (and validation and probe folders)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("pack", help="pack identity folders as an insightface RecordIO set (train.rec, train.idx, "
                       "property)")
    p.add_argument("source", metavar="IDENTITY_FOLDER", help="identity-folder tree: IDENTITY_FOLDER/<identity>/<image>")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (outside IDENTITY_FOLDER)")
    p.add_argument("--prefix", default="train", help="name of the .rec and .idx files (default: train)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR/<prefix>.rec and .idx if they exist (refused otherwise)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pack)

    for name, helptext, example, func in (
        ("train", "train an embedding model from a YAML config", "data.root=DIR", cmd_train),
        ("classify", "imbalanced image classification (Li et al.'s MNIST-q protocol)",
         "classify.imbalance_ratio=10", cmd_classify),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--config", required=True, help="config name in configs/ or a YAML path")
        again = p.add_mutually_exclusive_group()
        again.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/latest.pt")
        # Without either flag a run folder holding a checkpoint is refused, never silently replaced.
        again.add_argument("--overwrite", action="store_true",
                           help="delete the run already in OUTPUT_DIR (checkpoints, metrics) and start afresh")
        p.add_argument("--quiet", action="store_true", help=QUIET_HELP)
        p.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {example}")
        p.set_defaults(func=func)
        if name == "train":
            p.add_argument("--nproc", type=_whole(1), default=1,
                           help="processes on this machine (torchrun with DistributedDataParallel; one per GPU)")

    p = sub.add_parser("import-weights", help="make a facepipe checkpoint of an insightface arcface_torch IResNet "
                       "backbone.pth, loaded strictly by its published parameter names")
    p.add_argument("--arch", choices=["iresnet"], default="iresnet",
                   help="architecture of the weights: iresnet (arcface_torch's r18 .. r200)")
    p.add_argument("--depth", type=int, choices=[18, 34, 50, 100, 200], required=True, help="IResNet depth")
    p.add_argument("--weights", required=True,
                   help="the state dict (torch.save(backbone.state_dict()), e.g. arcface_torch's backbone.pth or "
                   "model.pt; also its checkpoint_gpu_N.pt), read with torch.load(weights_only=True)")
    p.add_argument("--out", required=True, help="the facepipe checkpoint to write (.pt)")
    p.add_argument("--embedding-size", type=_whole(2), default=512,
                   help="output dimension of the weights' fc, as published")
    p.add_argument("--image-size", type=_whole(16), nargs=2, default=[112, 112], metavar=("H", "W"),
                   help="crop size the weights take: the published fc reads the 7x7 maps of 112x112 crops")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (refused otherwise)")
    p.set_defaults(func=cmd_import_weights)

    p = sub.add_parser("embed", help="embed every image of a folder with a trained checkpoint")
    p.add_argument("--checkpoint", required=True,
                    help="trained model checkpoint (.pt, e.g. RUN/latest.pt) or .onnx model")
    p.add_argument("--images", required=True, help="folder of images (identity subfolders optional)")
    p.add_argument("--out", required=True, help="folder for embeddings.npy, manifest.csv, embed.json")
    p.add_argument("--flip", choices=["sum", "concat", "none"], default=None, help="flip fusion (default: config)")
    p.add_argument("--batch-size", type=_whole(1), default=None, help=BATCH_SIZE_HELP)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--workers", type=_whole(0), default=2, help="decoding worker processes")
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("export", help="a checkpoint's embedding network (or the MTCNN detector) as ONNX, with its "
                       "preprocessing in the metadata, checked against PyTorch before it is written")
    p.add_argument("--checkpoint", default=None, help="trained model checkpoint (.pt) to export")
    p.add_argument("--out", default=None, help="the .onnx file to write (with --checkpoint)")
    p.add_argument("--detector", default=None, metavar="DIR",
                   help="write the MTCNN networks facepipe aligns with as DIR/pnet.onnx, rnet.onnx, onet.onnx")
    p.add_argument("--opset", type=_whole(14), default=18, help="ONNX opset")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="evaluate a checkpoint")
    eval_sub = p.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)
    q = eval_sub.add_parser("pairs", help="verification on a file of pairs: a CSV (path_a,path_b,is_same) or an "
                            "LFW pairs file (e.g. the pairs.txt of 'facepipe merge --val-pairs')")
    q.add_argument("--checkpoint", required=True,
                    help="model checkpoint (.pt) or .onnx model that embeds the pair images")
    q.add_argument("--pairs", required=True,
                   help="CSV with header path_a,path_b,is_same, or an LFW pairs file (first line N or SETS N; "
                        "images <Name>/<Name>_%%04d.jpg, or another image extension where no .jpg exists), "
                        "told apart by content")
    q.add_argument("--root", default=None,
                   help="folder the pair paths (LFW: the <Name> folders) are relative to (default: the pairs file's)")
    q.add_argument("--allow-outside-root", action="store_true",
                   help="accept pair paths that are absolute or climb out of the root with '..'")
    q.add_argument("--no-align-check", action="store_true",
                   help="evaluate images that are not of the model's input size, outside any 'facepipe align' "
                        "output, as they are (resized whole); refused otherwise as raw photos")
    q.add_argument("--out", required=True, help="report folder")
    q.add_argument("--device", default="auto", help=DEVICE_HELP)
    q.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    q.set_defaults(func=cmd_eval_pairs)

    def model_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--flip", choices=["sum", "concat", "none"], default=None, help="flip fusion (default: config)")
        q.add_argument("--batch-size", type=_whole(1), default=None, help=BATCH_SIZE_HELP)
        q.add_argument("--device", default="auto", help=DEVICE_HELP)
        q.add_argument("--quiet", action="store_true", help="no progress bars")

    q = eval_sub.add_parser("lfw", help="LFW verification on an official pairs file (View 1 or View 2)")
    q.add_argument("--pairs", required=True, help="pairs.txt (View 2) or pairsDevTest.txt / pairsDevTrain.txt (View 1)")
    q.add_argument("--images", default=None,
                   help="folder of name/name_%%04d.jpg images (needs --checkpoint); a 'facepipe align' output "
                        "folder also tells which images had no face")
    q.add_argument("--align", action="store_true",
                   help="--images are raw photos: align them first (into OUT/aligned) as the checkpoint's config says")
    q.add_argument("--no-align-check", action="store_true",
                   help="without --align, evaluate --images that are not of the model's input size, outside any "
                        "'facepipe align' output, as they are (resized whole); refused otherwise as raw photos")
    q.add_argument("--checkpoint", default=None, help="model checkpoint (.pt) or .onnx model that embeds --images")
    q.add_argument("--embeddings", default=None, help="'facepipe embed' output folder of those images instead")
    q.add_argument("--threshold-pairs", default=None,
                   help="separate pairs file to choose the threshold on (View 1: pairsDevTrain.txt)")
    q.add_argument("--allow-missing", action="store_true",
                   help="count pairs with a missing image (or no face) as wrong instead of stopping")
    q.add_argument("--missing-list", default=None, help="file of relative image paths that had no face, one per line")
    q.add_argument("--ext", default=".jpg", help="image file extension (default .jpg)")
    q.add_argument("--out", required=True, help="report folder")
    model_options(q)
    q.set_defaults(func=cmd_eval_lfw)

    q = eval_sub.add_parser("ytf", help="YouTube Faces video verification on a splits file")
    q.add_argument("--splits", required=True, help="splits.txt: split, first video, second video, ..., is same")
    q.add_argument("--videos", default=None, help="folder of person/n/<frames> (needs --checkpoint)")
    q.add_argument("--checkpoint", default=None,
                    help="model checkpoint (.pt) or .onnx model that embeds the frames of --videos")
    q.add_argument("--embeddings", default=None, help="'facepipe embed' output folder of the video frames instead")
    q.add_argument("--max-frames", type=_whole(1), default=None, help="at most F evenly spaced frames per video")
    q.add_argument("--allow-missing", action="store_true", help="count pairs with a missing video as wrong")
    q.add_argument("--missing-list", default=None, help="file of relative frame paths that had no face")
    q.add_argument("--out", required=True, help="report folder")
    model_options(q)
    q.set_defaults(func=cmd_eval_ytf)

    q = eval_sub.add_parser("megaface", help="MegaFace-style identification with distractors")
    q.add_argument("--probes", default=None, help="identity folders of probe images, or an embed output folder")
    q.add_argument("--distractors", default=None,
                   help="folder of distractor images, an embed output folder, or a .npy array (memory-mapped)")
    q.add_argument("--lfw-images", default=None, help="LFW mini protocol: lfw-deepfunneled folder (or its embeddings)")
    q.add_argument("--lfw-dev-pairs", default=None, help="LFW mini protocol: pairsDevTest.txt (the probe people)")
    q.add_argument("--checkpoint", default=None,
                    help="model checkpoint (.pt) or .onnx model; needed when probes or distractors are images")
    q.add_argument("--impostor-top-k", type=_whole(1), default=100,
                   help="distractor scores kept per probe for the verification ROC (default 100)")
    q.add_argument("--seed", type=_whole(0), default=0, help="seed of the distractor order (nested subsets)")
    q.add_argument("--out", required=True, help="report folder")
    model_options(q)
    q.set_defaults(func=cmd_eval_megaface)

    q = eval_sub.add_parser("bin", help="verification on an insightface .bin set (lfw.bin, cfp_fp.bin, agedb_30.bin)")
    q.add_argument("--bin", required=True, help="the .bin file")
    q.add_argument("--checkpoint", default=None,
                    help="model checkpoint (.pt) or .onnx model that embeds the images of the .bin")
    q.add_argument("--embeddings", default=None, help=".npy with one row per image of the .bin, in file order")
    q.add_argument("--out", required=True, help="report folder")
    model_options(q)
    q.set_defaults(func=cmd_eval_bin)

    p = sub.add_parser("index", help="cluster index of a gallery for the k-nearest-cluster rule (Huang et al. Eq. 10)")
    index_sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    def index_source(q: argparse.ArgumentParser) -> None:
        q.add_argument("dir", metavar="DIR", help="index folder")
        q.add_argument("--checkpoint", default=None, help="model checkpoint (.pt) or .onnx model that embeds --images")
        q.add_argument("--images", default=None, help="aligned identity folders: IMAGES/<identity>/<image>")
        q.add_argument("--embeddings", default=None,
                       help="X.npy of embeddings (one row per image), or a 'facepipe embed' output folder")
        q.add_argument("--labels", default=None,
                       help="identity of each row: a text file (one name per line), .npy, or manifest.csv")
        q.add_argument("--seed", type=_whole(0), default=0, help="k-means seed")
        q.add_argument("--batch-size", type=_whole(1), default=None, help=BATCH_SIZE_HELP)
        q.add_argument("--device", default="auto", help=DEVICE_HELP)
        q.add_argument("--quiet", action="store_true", help="no progress bars")

    def allow_unfingerprinted(q: argparse.ArgumentParser) -> None:
        q.add_argument("--allow-unfingerprinted", action="store_true",
                       help="accept embeddings that record no model fingerprint (a bare .npy) into an index that "
                            "records its model: you vouch that its model made them")

    q = index_sub.add_parser("build", help="cluster a gallery's embeddings per identity and index the centroids")
    index_source(q)
    q.add_argument("--cluster-size", type=_whole(1), default=20, help="embeddings per cluster, l (default 20)")
    q.add_argument("--kind", choices=["flat", "hnsw", "ivf"], default="flat",
                   help="FAISS index: exact flat (default), HNSW graph, or IVF lists")
    q.add_argument("--num-neighbours", type=_whole(1), default=None,
                   help="N of Eq. 10: clusters retrieved per query (default: tuned on one held-out image each of "
                        "up to 1,000 identities with 2+ images when 20+ such identities exist, else 1)")
    q.add_argument("--threshold", dest="unknown_threshold", type=_number(), default=None,
                   help="open-set threshold: a best log score below it is 'unknown'")
    q.add_argument("--nlist", type=_whole(1), default=None,
                   help="IVF lists (default sqrt of the number of clusters)")
    q.add_argument("--nprobe", type=_whole(1), default=None, help="IVF lists searched (default a quarter of them)")
    q.add_argument("--overwrite", action="store_true", help="replace the index already in DIR")
    q.set_defaults(func=cmd_index_build)

    q = index_sub.add_parser("add", help="enrol new identities or more images of enrolled ones")
    index_source(q)
    q.add_argument("--cluster-size", type=_whole(1), default=None,
                   help="embeddings per cluster (default: the index's)")
    allow_unfingerprinted(q)
    q.set_defaults(func=cmd_index_add)

    q = index_sub.add_parser("remove", help="remove identities and their clusters")
    q.add_argument("dir", metavar="DIR", help="index folder")
    q.add_argument("identities", nargs="+", metavar="IDENTITY",
                   help="name of an identity to remove with all its clusters")
    q.set_defaults(func=cmd_index_remove)

    q = index_sub.add_parser("info", help="identities, clusters, kind and model of an index")
    q.add_argument("dir", metavar="DIR", help="index folder")
    q.set_defaults(func=cmd_index_info)

    q = index_sub.add_parser("calibrate", help="choose N of Eq. 10 and the open-set unknown threshold on "
                             "validation data, and store them in the index")
    index_source(q)
    q.add_argument("--impostor-images", default=None,
                   help="aligned crops of identities NOT in the index (subfolders optional; needs --checkpoint)")
    q.add_argument("--impostor-embeddings", default=None,
                   help="X.npy or 'facepipe embed' folder of identities NOT in the index")
    q.add_argument("--target-far", type=_number(0, 1), default=0.01,
                   help="false-accept rate of impostors allowed by the threshold (default 0.01)")
    q.add_argument("--grid", type=_neighbour_grid, default=None,
                   help="values of N tried, START:STOP:STEP inclusive or N,N,... (default 1,2,3,5,10 and "
                        "Huang et al.'s 20:200:10)")
    q.add_argument("--json", default=None, metavar="OUT", help="also write the calibration report to this JSON file")
    allow_unfingerprinted(q)
    q.set_defaults(func=cmd_index_calibrate)

    q = index_sub.add_parser("margins", help="Huang et al.'s 2-D CLMLE margin bounds of a dataset and suggested margins")
    q.add_argument("data_root", metavar="DATA_ROOT", nargs="?", default=None,
                   help="identity-folder dataset: DATA_ROOT/<identity>/<image>")
    q.add_argument("--labels", default=None,
                   help="instead: identity of each sample (text file, .npy, or 'facepipe embed' manifest.csv)")
    q.set_defaults(func=cmd_index_margins)

    p = sub.add_parser("search",
                       help="identify faces against a cluster index (k-nearest-cluster rule, Huang et al. Eq. 10)")
    p.add_argument("--index", required=True, help="index folder made by 'facepipe index build'")
    p.add_argument("--checkpoint", default=None, help="model of the index, .pt or .onnx (needed for images)")
    p.add_argument("--top-k", type=_whole(1), default=5, help="identities listed per input (default 5)")
    p.add_argument("--num-neighbours", type=_whole(1), default=None,
                   help="N of Eq. 10 (default: the index's; the output says where it came from)")
    p.add_argument("--align", dest="align", action="store_const", const=True, default="auto",
                   help="inputs are raw photos: detect and align them all first (default: auto, an image at the "
                        "model's input size is taken as a crop and any other aligned)")
    p.add_argument("--no-align", dest="align", action="store_const", const=False,
                   help="inputs are aligned crops: align none of them")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results to this JSON file")
    p.add_argument("--batch-size", type=_whole(1), default=None, help=BATCH_SIZE_HELP)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders of images, or .npy embeddings")
    allow_unfingerprinted(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("study", help="a comparison of methods x seeds from one pre-training, resumable, with "
                       "tables and confidence intervals (specs in configs/studies/)")
    study_sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = study_sub.add_parser("run", help="train and read out every run of the study that has not finished "
                             "(resumes an interrupted run; safe to stop at any time)")
    q.add_argument("spec", metavar="SPEC", help="study spec YAML, e.g. configs/studies/longtail.yaml")
    q.add_argument("--methods", nargs="+", default=None, metavar="METHOD", help="only these methods")
    q.add_argument("--seeds", nargs="+", type=_whole(0), default=None, metavar="SEED", help="only these seeds")
    q.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="override every run's config (e.g. train.max_steps_per_epoch=2 for a smoke run; a "
                   "run resumed with other settings is refused)")
    q.add_argument("--device", default="auto", help="device of the readouts (training follows train.device)")
    q.set_defaults(func=cmd_study_run)
    q = study_sub.add_parser("status", help="which runs have finished, are pending or wait for a sweep")
    q.add_argument("spec", metavar="SPEC", help="study spec YAML")
    q.set_defaults(func=cmd_study_status)
    q = study_sub.add_parser("report", help="every table, plot and the README section from the kept runs")
    q.add_argument("spec", metavar="SPEC", help="study spec YAML")
    q.add_argument("--readme", default=None, metavar="FILE",
                   help="README whose section (spec readme_section) is rewritten (default: none)")
    q.set_defaults(func=cmd_study_report)
    for words, _, child in _commands(parser):
        if words != ("export",) and any("--checkpoint" in action.option_strings for action in child._actions):
            _add_model_input_options(child)
    _finish_help(parser)
    return parser


# What a shell reports for a command ended by SIGPIPE (128 + 13), as `cat`, `grep` or `ls` end
# when the reader of their output goes away (`facepipe index info DIR | head`): quietly, and
# still visible as "not completed" to a script that checks (set -o pipefail).
EXIT_CLOSED_PIPE = 141


def _output_closed() -> bool:
    """Whether standard output is a pipe (or socket) whose reader has gone: poll(2) reports an
    error condition on the writing end then."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no real file descriptor (captured output)
        return False


def _discard_closed_output() -> None:
    # What is still buffered for stdout would fail again when Python flushes it at exit.
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot take positionals after options (``align SRC DST --quiet key=value``): hand
    # leftover key=value words to the command's overrides; anything else is still an error.
    if extra and hasattr(args, "overrides") and all("=" in word and not word.startswith("-") for word in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging(args.verbose)
    from facepipe.errors import USER_ERRORS, user_error_message

    try:
        _model_file(args)
        status = args.func(args)
        # Output is block-buffered into a pipe: flushed here, a closed pipe is met in the
        # handler below instead of in the interpreter's exit, which would print a warning.
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        if not _output_closed():  # a worker's or a socket's pipe: a bug or a crash to report
            raise
        _discard_closed_output()
        return EXIT_CLOSED_PIPE
    except USER_ERRORS as exc:
        message = user_error_message(exc)
        if message is None:  # e.g. a FileNotFoundError naming no path: not the user's to fix
            raise
        # Problems with the user's input: one clear line, no traceback.
        print(f"facepipe {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"facepipe {args.command}: interrupted (checkpoints and finished outputs are kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
