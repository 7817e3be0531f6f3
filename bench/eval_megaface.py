#!/usr/bin/env python
"""MegaFace-style identification at scale: wall time and peak memory.

Not a test: timings depend on the machine. The issue's configuration (1,000,000 synthetic 512-d
distractors, 3,000 probes; writes a 2 GB .npy into the temporary folder):

    .venv/bin/python bench/eval_megaface.py --distractors 1000000 --probes 3000

A quick check of the script itself:

    .venv/bin/python bench/eval_megaface.py --distractors 20000 --probes 300

Distractors are random unit vectors written chunk by chunk into a .npy (so generating them needs
no 2 GB array in memory) and then memory-mapped with ``np.load(mmap_mode="r")``, exactly as
``facepipe eval megaface --distractors FILE.npy`` reads them. Probes are ``--identities``
identities (default: probes / 10) with ``--probes / --identities`` noisy images each. Reported: generation time, the
wall time of :func:`facepipe.eval.megaface.megaface_identification` (search of every distractor
level, ranks, CMC, tail ROC), its FAISS search share, and peak resident memory (``ru_maxrss``),
with the anonymous / file-backed split at the end: pages of the memory map count as resident
while mapped, but they are page cache, not memory the process allocated.
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from facepipe.eval.megaface import megaface_identification
from facepipe.runtime.faiss_device import gpu_count


def write_distractors(path: Path, count: int, dim: int, seed: int, chunk: int = 65536) -> None:
    rng = np.random.default_rng(seed)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(count, dim))
    for start in range(0, count, chunk):
        block = rng.standard_normal((min(chunk, count - start), dim), dtype=np.float32)
        array[start:start + block.shape[0]] = block / np.linalg.norm(block, axis=1, keepdims=True)
    array.flush()
    del array


def memory_status() -> dict[str, float]:
    """Current resident memory split from /proc (MiB): anonymous vs file-backed pages."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--distractors", type=int, default=1_000_000)
    parser.add_argument("--probes", type=int, default=3_000)
    parser.add_argument("--identities", type=int, default=None,
                        help="probe identities, the probes split evenly (default: probes / 10)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--noise", type=float, default=2.0,
                        help="probe noise around an identity centre (2.0: genuine cosine about 0.2)")
    parser.add_argument("--impostor-top-k", type=int, default=100)
    parser.add_argument("--chunk", type=int, default=65536, help="distractor rows per FAISS search")
    parser.add_argument("--workdir", default=None, help="folder for the distractor .npy (default: a temp folder)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.identities = args.identities or max(1, args.probes // 10)
    if args.probes < 2 * args.identities:
        parser.error("need at least 2 probes per identity")

    with tempfile.TemporaryDirectory(prefix="facepipe-bench-", dir=args.workdir) as tmp:
        path = Path(tmp) / "distractors.npy"
        started = time.perf_counter()
        write_distractors(path, args.distractors, args.dim, args.seed)
        generate_s = time.perf_counter() - started

        rng = np.random.default_rng(args.seed + 1)
        labels = np.arange(args.probes) % args.identities
        centres = rng.standard_normal((args.identities, args.dim), dtype=np.float32)
        probes = centres[labels] + args.noise * rng.standard_normal((args.probes, args.dim), dtype=np.float32)

        distractors = np.load(path, mmap_mode="r")
        started = time.perf_counter()
        result = megaface_identification(probes, labels, distractors, impostor_top_k=args.impostor_top_k,
                                         chunk_size=args.chunk, seed=args.seed, progress=False)
        wall_s = time.perf_counter() - started
        at_end = memory_status()
        del distractors

    report = {
        "distractors": args.distractors,
        "probes": args.probes,
        "identities": args.identities,
        "dim": args.dim,
        "faiss_gpu": gpu_count() > 0,
        "generate_s": round(generate_s, 2),
        "wall_s": round(wall_s, 2),
        "search_s": round(result.search_seconds, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_at_end_mib": {k: round(v, 1) for k, v in at_end.items()},
        "trials": result.num_trials,
        "rank1": {str(d): round(v, 4) for d, v in result.rank1.items()},
        "tar_at_far": {f"{f:.0e}": (None if t is None else round(t, 4)) for f, t in result.tar_at_far.items()},
        "roc_exact_up_to_far": result.max_exact_far,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
