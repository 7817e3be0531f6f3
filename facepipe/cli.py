"""The ``facepipe`` command line: one entry point, one subcommand per job.

Every subcommand calls the same Python function that the API exposes; nothing here holds logic
beyond argument parsing and error reporting.
"""
from __future__ import annotations

import argparse
import logging
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
    from facepipe.train import train

    config = load_config(find_config(args.config), args.overrides)
    metrics = train(config, resume=args.resume, progress=not args.quiet)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    print(f"training finished: {shown}; checkpoints in {config.output_dir}")
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
                                 progress=not args.quiet)
    print(result["summary"])
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from facepipe.demo import run_demo

    metrics = run_demo(args.out, config=args.config, overrides=args.overrides, progress=not args.quiet)
    print(metrics["summary"])
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facepipe",
        description="Face-recognition embeddings for long-tailed identity data: synthetic data, "
        "IR-SE training with margin heads, embedding extraction and verification.",
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
    p.add_argument("--identities", type=int, required=True, help="number of identities")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distribution", choices=["power", "zipf", "uniform"], default="power",
                   help="images per identity: power law of seed 002 Sec. 5.5, Zipf, or uniform")
    p.add_argument("--max-images", type=int, default=60, help="images of the largest identity")
    p.add_argument("--min-images", type=int, default=2, help="images of the smallest identity")
    p.add_argument("--gamma", type=float, default=1.0, help="power-law exponent (smaller = more balanced)")
    p.add_argument("--size", type=_size, default=(112, 112), help="image size N or HxW (default 112x112)")
    p.add_argument("--first-identity", type=int, default=0, help="global index of the first identity")
    p.add_argument("--images-per-identity", type=int, default=None, help="same count for every identity")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("train", help="train an embedding model from a YAML config")
    p.add_argument("--config", required=True, help="config name in configs/ or a YAML path")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/latest.pt")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.root=DIR")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("embed", help="embed every image of a folder with a trained checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", required=True, help="folder of images (identity subfolders optional)")
    p.add_argument("--out", required=True, help="folder for embeddings.npy, manifest.csv, embed.json")
    p.add_argument("--flip", choices=["sum", "concat", "none"], default=None, help="flip fusion (default: config)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2, help="decoding worker processes")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("eval", help="evaluate a checkpoint")
    eval_sub = p.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)
    q = eval_sub.add_parser("pairs", help="verification on a CSV of pairs (path_a,path_b,is_same)")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--pairs", required=True, help="CSV with header path_a,path_b,is_same")
    q.add_argument("--root", default=None, help="folder the pair paths are relative to (default: the CSV's)")
    q.add_argument("--out", required=True, help="report folder")
    q.add_argument("--device", default="auto")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=cmd_eval_pairs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    from facepipe.errors import USER_ERRORS

    try:
        return args.func(args)
    except USER_ERRORS as exc:
        # Problems with the user's input: one clear line, no traceback.
        print(f"facepipe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"facepipe {args.command}: interrupted (checkpoints and finished outputs are kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
