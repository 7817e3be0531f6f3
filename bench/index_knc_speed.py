#!/usr/bin/env python
"""Speed of the k-nearest-cluster rule (Huang et al. Eq. 10) against instance-wise kNN search
(not a test: machine-dependent).

    .venv/bin/python bench/index_knc_speed.py                                   # 1M x 512-d, 5,000 ids
    .venv/bin/python bench/index_knc_speed.py --num-embeddings 20000 --identities 100

Huang et al. Sec. 4 argues that searching cluster centroids instead of examples makes the search a
function of the cluster count L/l instead of the example count L ("up to three orders of
magnitude speedup"). This bench measures that on synthetic data:

- gallery: ``--identities`` identities with ``--num-embeddings`` 512-d embeddings in all, split
  by ``--distribution``: ``longtail`` (default) draws identity sizes from a Pareto power law
  (exponent ``--alpha``, seeded) scaled to the total with at least 2 per identity, so that the
  head identities get several clusters of l = 200 and most get one (Huang et al.'s point: the
  cluster count grows with the data, not with the identities); ``uniform`` gives every identity
  the same count. Each identity has a random direction, ``--centres`` sub-centres around it (pose-like modes), and
  samples = sub-centre + Gaussian noise of norm ``--noise``, L2-normalised (a vMF-like cloud;
  the noise makes instance-level top-1 far from trivial while identities stay separable);
- clusters: balanced spherical k-means per identity (Huang et al. Eq. 6-7) of size ``--cluster-size``
  (timed: the index build time; peak RSS from resource.getrusage) and a flat ClusterIndex;
- queries: ``--queries`` held-out samples drawn the same way, of identities picked uniformly
  (so a long-tailed gallery is probed as often at its tail as at its head);
- methods: the kNC rule (ClusterIndex.search, N = ``--num-neighbours``), FAISS IndexFlatIP
  exhaustive search over every embedding (1-NN identity, and a k = ``--knn`` vote), and
  scikit-learn NearestNeighbors(algorithm='brute') on a ``--sklearn-subsample`` of the gallery
  with its time scaled linearly to the whole gallery.

Prints a markdown table and writes bench/results/index_knc_speed.json (rewritten after every
stage, so an interrupted run keeps what it measured).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import faiss
import numpy as np

from facepipe.data.clusters import balanced_spherical_kmeans
from facepipe.index.store import ClusterIndex

RESULTS = Path(__file__).resolve().parent / "results" / "index_knc_speed.json"


def peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def identity_sizes(args: argparse.Namespace, rng: np.random.Generator) -> np.ndarray:
    """Embeddings per identity: sum = --num-embeddings, mean = num_embeddings / identities.

    ``uniform``: equal split (+1 for some). ``longtail``: 2 each, and the rest shared in
    proportion to Pareto(alpha) weights (largest-remainder rounding keeps the sum exact);
    sorted so that identity 0 is the largest.
    """
    total, ids = args.num_embeddings, args.identities
    if args.distribution == "uniform":
        counts = np.full(ids, total // ids, dtype=np.int64)
        counts[: total % ids] += 1
        return counts
    minimum = 2  # k-means and a held-out-like spread need two samples; Huang et al. drop singletons
    if total < minimum * ids:
        raise SystemExit(f"--num-embeddings {total} < {minimum} x --identities {ids}: cannot give every identity "
                         f"{minimum} embeddings")
    weights = np.sort(rng.pareto(args.alpha, size=ids) + 1.0)[::-1]
    share = (total - minimum * ids) * weights / weights.sum()
    counts = np.floor(share).astype(np.int64)
    remainder = (total - minimum * ids) - int(counts.sum())
    counts[np.argsort(-(share - counts), kind="stable")[:remainder]] += 1
    return counts + minimum


def make_data(args: argparse.Namespace) -> dict:
    """Gallery and held-out queries; generated per block of identities in float32 so that 1M x
    512 never needs a float64 copy."""
    rng = np.random.default_rng(args.seed)
    dim = args.dim
    bases = rng.standard_normal((args.identities, dim), dtype=np.float32)
    bases /= np.linalg.norm(bases, axis=1, keepdims=True)
    centres = bases[:, None, :] + args.centre_spread * rng.standard_normal(
        (args.identities, args.centres, dim), dtype=np.float32) / np.sqrt(dim)
    centres /= np.linalg.norm(centres, axis=2, keepdims=True)
    counts = identity_sizes(args, rng)
    labels = np.repeat(np.arange(args.identities, dtype=np.int64), counts)

    def draw(identity: np.ndarray) -> np.ndarray:
        which = rng.integers(0, args.centres, size=len(identity))
        x = centres[identity, which] + args.noise * rng.standard_normal((len(identity), dim), dtype=np.float32) \
            / np.float32(np.sqrt(dim))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    gallery = np.empty((len(labels), dim), dtype=np.float32)
    block = 65536
    for start in range(0, len(labels), block):
        gallery[start:start + block] = draw(labels[start:start + block])
    query_labels = rng.integers(0, args.identities, size=args.queries)
    return {"gallery": gallery, "labels": labels, "queries": draw(query_labels), "query_labels": query_labels,
            "counts": counts}


def timed(fn, repeats: int):
    """(best wall time over ``repeats`` runs, last result)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def vote(neighbour_labels: np.ndarray, neighbour_sims: np.ndarray) -> np.ndarray:
    """k-NN majority vote per row; ties go to the larger summed similarity."""
    out = np.empty(len(neighbour_labels), dtype=np.int64)
    for row, (labels, sims) in enumerate(zip(neighbour_labels, neighbour_sims)):
        names, inverse = np.unique(labels, return_inverse=True)
        counts = np.bincount(inverse)
        weight = np.bincount(inverse, weights=sims)
        out[row] = names[np.lexsort((weight, counts))[-1]]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-embeddings", type=int, default=1_000_000)
    parser.add_argument("--identities", type=int, default=5_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--distribution", choices=["longtail", "uniform"], default="longtail",
                        help="embeddings per identity: Pareto power law (default) or equal")
    parser.add_argument("--alpha", type=float, default=1.5,
                        help="Pareto exponent of --distribution longtail (smaller = heavier head)")
    parser.add_argument("--cluster-size", type=int, default=200, help="l of Huang et al. (default 200)")
    parser.add_argument("--centres", type=int, default=3, help="sub-centres (modes) per identity")
    parser.add_argument("--centre-spread", type=float, default=0.6, help="norm of a sub-centre's offset")
    parser.add_argument("--noise", type=float, default=2.75,
                        help="norm of a sample's Gaussian noise (instance 1-NN about 85%% at 100k x 500 ids)")
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--num-neighbours", type=int, default=100, help="N of Eq. 10")
    parser.add_argument("--knn", type=int, default=10, help="k of the instance kNN vote")
    parser.add_argument("--sklearn-subsample", type=int, default=100_000,
                        help="gallery rows for scikit-learn brute force (0: skip it)")
    parser.add_argument("--kmeans-iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="timed searches per method (best is kept)")
    parser.add_argument("--threads", type=int, default=0, help="FAISS threads and scikit-learn jobs (0: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default=None, help="where the ClusterIndex folder goes (default: temporary)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    threads = args.threads or os.cpu_count() or 1
    faiss.omp_set_num_threads(threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {"config": vars(args) | {"threads": threads}, "machine": {
        "python": platform.python_version(), "faiss": faiss.__version__, "cpus": os.cpu_count(),
        "platform": platform.platform()}, "stages": {}}

    def save() -> None:
        out.write_text(json.dumps(report, indent=2) + "\n")

    start = time.perf_counter()
    data = make_data(args)
    gallery, labels, queries, truth = data["gallery"], data["labels"], data["queries"], data["query_labels"]
    counts = data["counts"]
    report["stages"]["data"] = {"seconds": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib(),
                                "gallery_bytes": gallery.nbytes, "distribution": args.distribution,
                                "identity_size_min": int(counts.min()),
                                "identity_size_median": float(np.median(counts)),
                                "identity_size_max": int(counts.max())}
    print(f"data: {len(gallery)} x {args.dim} embeddings of {args.identities} identities ({args.distribution}, "
          f"{counts.min()}..{counts.max()} per identity, median {np.median(counts):g}), {len(queries)} queries "
          f"({report['stages']['data']['seconds']:.1f} s)", flush=True)
    save()

    # -- k-nearest cluster: build (balanced spherical k-means + index) and search
    rss_before = peak_rss_mib()
    start = time.perf_counter()
    assignment = balanced_spherical_kmeans(gallery, labels, args.cluster_size, seed=args.seed,
                                           niter=args.kmeans_iterations, progress=True)
    cluster_seconds = time.perf_counter() - start
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="knc-bench-"))
    start = time.perf_counter()
    index = ClusterIndex.build(work / "index", assignment.centroids, assignment.cluster_identity,
                               [str(i) for i in range(args.identities)], cluster_sizes=assignment.cluster_sizes(),
                               config={"cluster_size": args.cluster_size, "num_neighbours": args.num_neighbours},
                               overwrite=True)
    index_seconds = time.perf_counter() - start
    per_identity = np.bincount(assignment.cluster_identity, minlength=args.identities)
    multi = int((per_identity > 1).sum())
    report["stages"]["knc_build"] = {"cluster_seconds": cluster_seconds, "index_seconds": index_seconds,
                                     "num_clusters": index.num_clusters, "multi_cluster_identities": multi,
                                     "max_clusters_per_identity": int(per_identity.max()),
                                     "peak_rss_mib": peak_rss_mib(), "peak_rss_before_mib": rss_before}
    print(f"clusters: {index.num_clusters} in {cluster_seconds:.1f} s ({multi} identities with several, at most "
          f"{per_identity.max()}), index {index_seconds:.2f} s, peak RSS {peak_rss_mib():.0f} MiB", flush=True)
    save()
    index.search(queries[:10], top_k=1)  # warm-up
    knc_seconds, results = timed(lambda: index.search(queries, top_k=1), args.repeats)
    knc_pred = np.array([int(r.identity) for r in results])
    report["stages"]["knc_search"] = {"seconds": knc_seconds, "queries_per_second": len(queries) / knc_seconds,
                                      "accuracy": float(np.mean(knc_pred == truth)),
                                      "num_neighbours": min(args.num_neighbours, index.num_clusters)}
    save()
    del assignment

    # -- FAISS exhaustive instance search
    start = time.perf_counter()
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(gallery)
    flat_build = time.perf_counter() - start
    flat.search(queries[:10], args.knn)
    flat_seconds, (sims, rows) = timed(partial(flat.search, queries, args.knn), args.repeats)
    nn1 = labels[rows[:, 0]]
    knn = vote(labels[rows], sims)
    report["stages"]["faiss_flat"] = {
        "build_seconds": flat_build, "seconds": flat_seconds, "queries_per_second": len(queries) / flat_seconds,
        "accuracy_1nn": float(np.mean(nn1 == truth)), "accuracy_knn": float(np.mean(knn == truth)),
        "agreement_knc_1nn": float(np.mean(nn1 == knc_pred)), "agreement_knc_knn": float(np.mean(knn == knc_pred)),
        "peak_rss_mib": peak_rss_mib()}
    print(f"faiss flat: {flat_seconds:.2f} s for {len(queries)} queries", flush=True)
    save()
    del flat

    # -- scikit-learn brute force on a subsample, time scaled linearly to the whole gallery
    if args.sklearn_subsample > 0:
        from sklearn.neighbors import NearestNeighbors

        size = min(args.sklearn_subsample, len(gallery))
        picked = np.random.default_rng(args.seed + 1).choice(len(gallery), size=size, replace=False)
        nn = NearestNeighbors(n_neighbors=args.knn, algorithm="brute", metric="euclidean", n_jobs=threads)
        nn.fit(gallery[picked])
        seconds, (_, sub_rows) = timed(lambda: nn.kneighbors(queries, return_distance=True), 1)
        scale = len(gallery) / size
        sub_labels = labels[picked][sub_rows[:, 0]]
        report["stages"]["sklearn_brute"] = {
            "subsample": size, "seconds_subsample": seconds, "seconds_scaled": seconds * scale,
            "queries_per_second_scaled": len(queries) / (seconds * scale),
            "accuracy_1nn_subsample": float(np.mean(sub_labels == truth))}
        print(f"sklearn brute: {seconds:.2f} s on {size} rows (x{scale:.1f})", flush=True)
        save()

    stages = report["stages"]
    knc_qps = stages["knc_search"]["queries_per_second"]
    rows_out = [("kNC rule (Huang et al. Eq. 10), flat ClusterIndex",
                 f"{stages['knc_build']['cluster_seconds'] + stages['knc_build']['index_seconds']:.1f}",
                 f"{knc_qps:,.0f}", "1.0", f"{stages['knc_search']['accuracy']:.4f}", "-")]
    flat_stage = stages["faiss_flat"]
    rows_out.append(("FAISS IndexFlatIP, 1-NN", f"{flat_stage['build_seconds']:.1f}",
                     f"{flat_stage['queries_per_second']:,.0f}", f"{knc_qps / flat_stage['queries_per_second']:.1f}",
                     f"{flat_stage['accuracy_1nn']:.4f}", f"{flat_stage['agreement_knc_1nn']:.4f}"))
    rows_out.append((f"FAISS IndexFlatIP, {args.knn}-NN vote", "(same)", "(same)", "(same)",
                     f"{flat_stage['accuracy_knn']:.4f}", f"{flat_stage['agreement_knc_knn']:.4f}"))
    if "sklearn_brute" in stages:
        sk = stages["sklearn_brute"]
        sk_qps = sk["queries_per_second_scaled"]
        rows_out.append((f"sklearn brute (on {sk['subsample']:,}, scaled)", "-", f"{sk_qps:,.0f}",
                         f"{knc_qps / sk_qps:.1f}", f"{sk['accuracy_1nn_subsample']:.4f}*", "-"))
    header = ("method", "build s", "queries/s", "kNC speedup", "top-1 acc", "agrees with kNC")
    print()
    build = stages["knc_build"]
    print(f"{len(gallery):,} embeddings, {args.identities:,} identities ({args.distribution}), "
          f"{index.num_clusters:,} clusters (l = {args.cluster_size}; {build['multi_cluster_identities']:,} identities "
          f"with several, at most {build['max_clusters_per_identity']}), {len(queries):,} queries, {threads} threads, "
          f"N = {stages['knc_search']['num_neighbours']}")
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows_out:
        print("| " + " | ".join(row) + " |")
    if "sklearn_brute" in stages:
        print("\n* accuracy of the subsample gallery (fewer examples per identity), not of the full one")
    print(f"\npeak RSS {peak_rss_mib():.0f} MiB; results in {out}")
    save()
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
