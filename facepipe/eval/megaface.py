"""``facepipe eval megaface``: identification among distractors, MegaFace style.

Protocol (Kemelmacher-Shlizerman et al., "The MegaFace Benchmark: 1 Million Faces for
Recognition at Scale", CVPR 2016, challenge 1):

* Probe set: identity folders. Every probe identity with at least 2 images contributes one
  trial per ordered pair of its images (p, g), p != g: p is the probe, and the gallery is g plus
  D distractors, for D in {10, 100, 1k, 10k, 100k, 1M} as far as the distractor set reaches
  (plus the whole set when it holds fewer than 1M). Identities with one image are left out.
* The D distractors of a level are the first D of one seeded random permutation of the
  distractor set, so the levels are nested, as MegaFace's distractor subsets are.
* Identification: the rank of g is 1 + the number of distractors scoring at least as high as g
  against p (ties count against the probe). Reported: rank-1 accuracy at each D and the CMC
  (identification rate at ranks 1..10).
* Verification: genuine pairs are the unordered probe-probe pairs of one identity, impostor
  pairs every probe against every distractor; TAR at FAR = 1e-6 and the ROC. With up to 10^9
  impostor pairs only each probe's top-k distractor scores are kept; the ROC is exact up to
  the FAR that tail covers (:func:`facepipe.eval.verification.tail_roc`), and a FAR beyond it is
  reported as not measured rather than guessed.

Search is the index layer's exact chunked search (:func:`facepipe.index.flat_search.chunked_top_k`,
through :func:`search_distractors`): inner product on L2-normalised embeddings with FAISS
(``IndexFlatIP``; sharded over all GPUs that faiss sees, else on the CPU, as
:func:`facepipe.runtime.faiss_device.search_uses_gpu` decides), over chunks of the distractor set
read from a memory-mapped ``.npy``, so a million 512-d distractors (2 GB) never have to sit in
memory at once; the levels are prefixes of the one search.

A development version on real data (:func:`lfw_megaface_sets`): probes are the LFW View 1
development-test people with 2+ images, distractors the images of every other LFW person.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from facepipe.data.lfw_pairs import parse_lfw_pairs
from facepipe.embed.folder import is_embeddings_folder, load_npy
from facepipe.eval.lfw import EmbeddingTable, embed_files, load_embeddings_folder
from facepipe.eval.report import EvalReport, Table, format_percent, write_report
from facepipe.eval.verification import EvalInputError, format_far, tail_roc
from facepipe.index.flat_search import DEFAULT_CHUNK, chunked_top_k, unit_rows
from facepipe.runtime.faiss_device import search_uses_gpu

__all__ = [
    "DISTRACTOR_LEVELS",
    "MegaFaceResult",
    "MegaFaceSets",
    "distractor_levels",
    "evaluate_megaface",
    "lfw_megaface_sets",
    "megaface_identification",
    "search_distractors",
]

DISTRACTOR_LEVELS = (10, 100, 1_000, 10_000, 100_000, 1_000_000)
SEARCH_PURPOSE = "megaface search"


def distractor_levels(available: int, levels: Sequence[int] = DISTRACTOR_LEVELS) -> list[int]:
    """The distractor counts D to evaluate: the standard levels up to ``available``, plus
    ``available`` itself when it is below the largest standard level (all there is)."""
    if available < 1:
        raise EvalInputError("the distractor set is empty")
    chosen = sorted({int(d) for d in levels if 0 < d <= available})
    if available < max(levels) and available not in chosen:
        chosen.append(int(available))
    return chosen


def search_distractors(probes: np.ndarray, distractors: np.ndarray, levels: Sequence[int], k: int, snapshot_k: int,
                       **options: Any) -> tuple[dict[int, np.ndarray], np.ndarray, np.ndarray]:
    """Top-k search of unit ``probes`` over growing prefixes of ``distractors`` (the levels):
    :func:`facepipe.index.flat_search.chunked_top_k` with the distractors as the gallery, logged
    as the megaface search, and input problems raised as :class:`EvalInputError`. ``options``:
    ``order`` (default: file order), ``chunk_size``, ``use_gpu``, ``progress``, as there.

    Returns ``(top_at_level, top_scores, top_rows)``: for each level D the (P, snapshot_k)
    highest scores among the first D distractors of ``order``, and the final (P, k) top scores
    and their distractor row numbers over all distractors.
    """
    return chunked_top_k(probes, distractors, levels, k, snapshot_k, purpose=SEARCH_PURPOSE, error=EvalInputError,
                         what=("probe embeddings", "distractors"), **options)


@dataclass(eq=False)
class MegaFaceResult:
    """Numbers of one MegaFace-style run (see :func:`megaface_identification`)."""

    levels: list[int]
    rank1: dict[int, float]
    cmc: dict[int, np.ndarray]  # identification rate at ranks 1..max_rank per level
    max_rank: int
    num_trials: int
    num_probe_images: int
    num_probe_identities: int
    num_skipped_probe_images: int  # probes of identities with a single image
    num_distractors: int
    tar_at_far: dict[float, float | None]
    max_exact_far: float
    num_genuine_pairs: int
    num_impostor_pairs: int
    search_seconds: float
    used_gpu: bool
    fpr: np.ndarray = field(repr=False)
    tpr: np.ndarray = field(repr=False)
    # Per-trial data (for the CSV): probe and gallery index into the probe set, score, ranks.
    trial_probe: np.ndarray = field(repr=False)
    trial_gallery: np.ndarray = field(repr=False)
    trial_score: np.ndarray = field(repr=False)
    trial_rank: dict[int, np.ndarray] = field(repr=False)  # max_rank + 1 means "beyond max_rank"
    top_at_level: dict[int, np.ndarray] = field(repr=False)  # (P_kept, max_rank) per level
    kept_probes: np.ndarray = field(repr=False)  # probe-set indices of the probes used
    genuine_a: np.ndarray = field(repr=False)
    genuine_b: np.ndarray = field(repr=False)
    genuine_score: np.ndarray = field(repr=False)
    impostor_probe: np.ndarray = field(repr=False)  # the exact impostor tail
    impostor_row: np.ndarray = field(repr=False)
    impostor_score: np.ndarray = field(repr=False)

    def to_dict(self) -> dict:
        return {
            "levels": self.levels,
            "rank1": {str(d): float(v) for d, v in self.rank1.items()},
            "cmc": {str(d): [float(x) for x in c] for d, c in self.cmc.items()},
            "max_rank": self.max_rank,
            "tar_at_far": {format_far(f): (None if t is None else float(t)) for f, t in self.tar_at_far.items()},
            "tar_at_far_interpolated": True,
            "roc_exact_up_to_far": self.max_exact_far,
            "num_trials": self.num_trials,
            "num_probe_images": self.num_probe_images,
            "num_probe_identities": self.num_probe_identities,
            "num_skipped_probe_images": self.num_skipped_probe_images,
            "num_distractors": self.num_distractors,
            "num_genuine_pairs": self.num_genuine_pairs,
            "num_impostor_pairs": self.num_impostor_pairs,
            "search_seconds": self.search_seconds,
            "faiss_gpu": self.used_gpu,
        }

    def summary(self) -> str:
        parts = [f"rank-1 {format_percent(self.rank1[d])} @ {d:,}" for d in self.levels]
        parts += [f"TAR@FAR={format_far(f, short=True)} {format_percent(t)}" for f, t in self.tar_at_far.items()]
        return "  ".join(parts)


def megaface_identification(
    probe_embeddings: np.ndarray,
    probe_labels: Sequence[Any],
    distractors: np.ndarray,
    *,
    levels: Sequence[int] = DISTRACTOR_LEVELS,
    max_rank: int = 10,
    fars: Sequence[float] = (1e-6, 1e-5, 1e-4),
    impostor_top_k: int = 100,
    seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK,
    use_gpu: bool | None = None,
    progress: bool = True,
) -> MegaFaceResult:
    """MegaFace-style identification and verification metrics (protocol: module docstring).

    ``distractors`` may be a read-only memory map (``np.load(path, mmap_mode="r")``); it is read
    in chunks of ``chunk_size`` rows. ``impostor_top_k`` distractor scores are kept per probe for
    the verification ROC; raise it if TAR at the wanted FAR comes back as not measured.
    """
    emb = np.asarray(probe_embeddings)
    labels = np.asarray(probe_labels)
    if emb.ndim != 2 or labels.shape != (emb.shape[0],):
        raise EvalInputError(f"probe embeddings {emb.shape} and labels {labels.shape} do not match")
    if distractors.ndim != 2:
        raise EvalInputError(f"distractor embeddings must be 2-D, got shape {distractors.shape}")
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    _, ident, counts = np.unique(labels, return_inverse=True, return_counts=True)
    ident = ident.ravel()
    kept = np.flatnonzero(counts[ident] >= 2)
    if kept.size == 0:
        raise EvalInputError("no probe identity has 2 or more images")
    probes = unit_rows(emb[kept], "probes", EvalInputError, row_numbers=kept)
    kept_ident = ident[kept]
    num_distractors = int(distractors.shape[0])
    levels = distractor_levels(num_distractors, levels)
    k = max(max_rank, impostor_top_k)
    order = np.random.default_rng(seed).permutation(num_distractors)

    started = time.perf_counter()
    used_gpu = search_uses_gpu(use_gpu, k, SEARCH_PURPOSE, error=EvalInputError,
                               k_source="max_rank / impostor_top_k")
    snapshots, top_s, top_i = search_distractors(probes, distractors, levels, k, max_rank, order=order,
                                                 chunk_size=chunk_size, use_gpu=use_gpu, progress=progress)
    search_seconds = time.perf_counter() - started

    # Genuine scores within each identity: ordered pairs are identification trials, unordered
    # pairs the genuine side of verification.
    trial_p, trial_g, trial_s, gen_a, gen_b, gen_s = [], [], [], [], [], []
    for group in np.unique(kept_ident):
        members = np.flatnonzero(kept_ident == group)
        sims = probes[members].astype(np.float64) @ probes[members].astype(np.float64).T
        a, b = np.nonzero(~np.eye(members.size, dtype=bool))
        trial_p.append(members[a]); trial_g.append(members[b]); trial_s.append(sims[a, b])
        upper = a < b
        gen_a.append(members[a[upper]]); gen_b.append(members[b[upper]]); gen_s.append(sims[a[upper], b[upper]])
    trial_p, trial_g, trial_s = (np.concatenate(x) for x in (trial_p, trial_g, trial_s))
    gen_a, gen_b, gen_s = (np.concatenate(x) for x in (gen_a, gen_b, gen_s))

    ranks: dict[int, np.ndarray] = {}
    cmc: dict[int, np.ndarray] = {}
    for level in levels:
        above = (snapshots[level][trial_p] >= trial_s[:, None].astype(np.float32)).sum(axis=1)
        ranks[level] = above + 1  # max_rank + 1: beyond max_rank
        cmc[level] = np.array([np.mean(ranks[level] <= r) for r in range(1, max_rank + 1)])

    # Every impostor score above the largest per-probe k-th score is in the kept tails; with
    # fewer than k distractors every score is kept and the whole ROC is exact.
    complete_above = -np.inf if num_distractors <= k else float(top_s[:, -1].max())
    tail_mask = np.isfinite(top_s) & (top_s > complete_above)
    imp_probe, imp_col = np.nonzero(tail_mask)
    roc = tail_roc(gen_s, top_s[tail_mask], probes.shape[0] * num_distractors,
                   complete_above=complete_above, fars=fars)
    return MegaFaceResult(
        levels=levels, rank1={d: float(cmc[d][0]) for d in levels}, cmc=cmc, max_rank=max_rank,
        num_trials=int(trial_s.size), num_probe_images=int(kept.size),
        num_probe_identities=int(np.unique(kept_ident).size), num_skipped_probe_images=int(emb.shape[0] - kept.size),
        num_distractors=num_distractors, tar_at_far=roc["tar_at_far"], max_exact_far=roc["max_exact_far"],
        num_genuine_pairs=int(gen_s.size), num_impostor_pairs=int(probes.shape[0]) * num_distractors,
        search_seconds=search_seconds, used_gpu=used_gpu, fpr=roc["fpr"], tpr=roc["tpr"],
        trial_probe=kept[trial_p], trial_gallery=kept[trial_g], trial_score=trial_s, trial_rank=ranks,
        top_at_level=snapshots, kept_probes=kept, genuine_a=kept[gen_a], genuine_b=kept[gen_b],
        genuine_score=gen_s, impostor_probe=kept[imp_probe], impostor_row=top_i[imp_probe, imp_col],
        impostor_score=top_s[imp_probe, imp_col].astype(np.float64),
    )


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
@dataclass
class MegaFaceSets:
    """Probe images (with identities) and distractor images, as paths relative to ``root``."""

    root: str
    probe_keys: list[str]
    probe_labels: list[str]
    distractor_keys: list[str]
    description: str


def lfw_megaface_sets(lfw_images: str | os.PathLike, dev_test_pairs: str | os.PathLike) -> MegaFaceSets:
    """The mini MegaFace protocol on LFW used for development.

    Probes: every image of each person named in the View 1 development-test pairs
    (``pairsDevTest.txt``) who has 2 or more images; distractors: every image of every other
    LFW person (so no probe identity is among the distractors). ``lfw_images`` is the image
    folder (``name/name_0001.jpg``).
    """
    from facepipe.embed.extract import list_images  # torch only when building sets from images

    root = Path(lfw_images)
    keys = [Path(path).relative_to(root).as_posix() for path, _ in list_images(root)]
    return _split_lfw_keys(keys, dev_test_pairs, str(root))


def _split_lfw_keys(keys: Sequence[str], dev_test_pairs: str | os.PathLike, root: str) -> MegaFaceSets:
    dev_people = set(parse_lfw_pairs(dev_test_pairs).persons())
    by_person: dict[str, list[str]] = {}
    for key in keys:
        by_person.setdefault(_identity_of(key), []).append(key)
    unknown = sorted(dev_people - set(by_person))
    if unknown:
        raise EvalInputError(f"{len(unknown)} people of {dev_test_pairs} have no images under {root}: {unknown[:5]}")
    probe_people = sorted(p for p in dev_people if len(by_person[p]) >= 2)
    probe_keys = [k for p in probe_people for k in by_person[p]]
    probe_labels = [p for p in probe_people for _ in by_person[p]]
    distractor_keys = [k for p in sorted(by_person) if p not in probe_people for k in by_person[p]]
    return MegaFaceSets(
        root=root, probe_keys=probe_keys, probe_labels=probe_labels, distractor_keys=distractor_keys,
        description=(f"LFW mini MegaFace: probes = the {len(probe_people)} people of {Path(dev_test_pairs).name} "
                     f"with 2+ images ({len(probe_keys)} images); distractors = the {len(distractor_keys)} images "
                     "of every other LFW person"),
    )


def _identity_of(key: str) -> str:
    return key.rpartition("/")[0]


def _load_distractors(path: Path) -> tuple[np.ndarray, list[str] | None, EmbeddingTable | None]:
    if path.is_file():
        if path.suffix != ".npy":
            raise EvalInputError(f"distractor file {path}: expected a .npy embeddings array")
        return load_npy(path, mmap=True, error=EvalInputError), None, None
    table = load_embeddings_folder(path, mmap=True)
    return table.vectors, table.keys, table


def evaluate_megaface(
    out: str | os.PathLike,
    *,
    probes: str | os.PathLike | None = None,
    distractors: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    lfw_images: str | os.PathLike | None = None,
    lfw_dev_pairs: str | os.PathLike | None = None,
    levels: Sequence[int] = DISTRACTOR_LEVELS,
    max_rank: int = 10,
    fars: Sequence[float] = (1e-6, 1e-5, 1e-4),
    impostor_top_k: int = 100,
    seed: int = 0,
    flip: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    use_gpu: bool | None = None,
    progress: bool = True,
) -> dict:
    """``facepipe eval megaface``: identification with distractors; writes a report folder ``out``.

    Inputs, either:

    * ``probes``: an identity-folder tree of images (needs ``checkpoint``) or a ``facepipe embed``
      folder of one (identities from its manifest); and ``distractors``: a folder of images
      (needs ``checkpoint``; embedded once into ``out/distractor_embeddings/``), a ``facepipe
      embed`` folder, or a ``.npy`` array (rows = distractors), memory-mapped; or
    * ``lfw_images`` + ``lfw_dev_pairs``: the LFW mini protocol (:func:`lfw_megaface_sets`),
      embedded with ``checkpoint``; ``lfw_images`` may also be a ``facepipe embed`` folder of LFW.

    Writes ``metrics.json``, ``report.md``, ``cmc.png``, ``roc.png``, ``trials.csv`` (probe,
    gallery, score, rank at each D), ``distractor_top.csv`` (each probe's top distractor scores
    at each D) and ``verification_scores.csv`` (genuine pairs and the exact impostor tail).
    """
    out = Path(out)
    fingerprint: str | None = None
    flip_used: str | None = None
    data: dict[str, Any] = {}
    if lfw_images is not None or lfw_dev_pairs is not None:
        if lfw_images is None or lfw_dev_pairs is None or probes is not None or distractors is not None:
            raise EvalInputError("the LFW mini protocol takes lfw_images and lfw_dev_pairs, and no probes/distractors")
        lfw_path = Path(lfw_images)
        if is_embeddings_folder(lfw_path):
            table = load_embeddings_folder(lfw_path)
            sets = _split_lfw_keys(table.keys, lfw_dev_pairs, str(lfw_path))
        else:
            if checkpoint is None:
                raise EvalInputError("the LFW mini protocol on images needs a checkpoint")
            sets = lfw_megaface_sets(lfw_path, lfw_dev_pairs)
            table = embed_files(checkpoint, lfw_path, sets.probe_keys + sets.distractor_keys, flip=flip,
                                device=device, batch_size=batch_size, progress=progress)
        probe_keys, distractor_keys, description = sets.probe_keys, sets.distractor_keys, sets.description
        probe_vectors = np.asarray(table.vectors[table.rows(probe_keys)])
        probe_labels = [_identity_of(k) for k in probe_keys]
        distractor_vectors = np.asarray(table.vectors[table.rows(distractor_keys)])
        fingerprint, flip_used = table.model_fingerprint, table.flip
        data = {"lfw_images": str(lfw_images), "lfw_dev_pairs": str(lfw_dev_pairs), "description": description}
        distractor_names: list[str] | None = distractor_keys
    else:
        if probes is None or distractors is None:
            raise EvalInputError("give probes and distractors (or lfw_images and lfw_dev_pairs)")
        probe_path, distractor_path = Path(probes), Path(distractors)
        for what, path in (("probe", probe_path), ("distractor", distractor_path)):
            if not path.exists():
                raise EvalInputError(f"{what} set {path} does not exist")
        if is_embeddings_folder(probe_path):
            table = load_embeddings_folder(probe_path)
        else:
            if checkpoint is None:
                raise EvalInputError(f"probe folder {probe_path} holds images; embedding them needs a checkpoint")
            from facepipe.embed.extract import list_images

            keys = [Path(p).relative_to(probe_path).as_posix() for p, _ in list_images(probe_path)]
            table = embed_files(checkpoint, probe_path, keys, flip=flip, device=device, batch_size=batch_size,
                                progress=progress)
        probe_keys = table.keys
        probe_vectors = np.asarray(table.vectors)
        probe_labels = [_identity_of(k) for k in probe_keys]
        fingerprint, flip_used = table.model_fingerprint, table.flip
        if distractor_path.is_dir() and not is_embeddings_folder(distractor_path):
            if checkpoint is None:
                raise EvalInputError(f"distractor folder {distractor_path} holds images; embedding them needs a checkpoint")
            from facepipe.embed.extract import list_images

            keys = [Path(p).relative_to(distractor_path).as_posix() for p, _ in list_images(distractor_path)]
            embedded = embed_files(checkpoint, distractor_path, keys, flip=flip, device=device,
                                   batch_size=batch_size, progress=progress)
            # Saved in the `facepipe embed` layout (as one unit, like embed) so that a rerun can
            # pass this folder instead.
            from facepipe.embed.extract import write_embeddings_folder

            cache = out / "distractor_embeddings"
            write_embeddings_folder(cache, embedded.vectors,
                                    [(str(distractor_path / k), _identity_of(k)) for k in keys],
                                    {"checkpoint": str(checkpoint), "images": str(distractor_path),
                                     "model_fingerprint": embedded.model_fingerprint, "flip": embedded.flip,
                                     "num_images": len(keys)})
            distractor_path = cache
        distractor_vectors, distractor_names, distractor_table = _load_distractors(distractor_path)
        if distractor_table is not None and fingerprint and distractor_table.model_fingerprint \
                and distractor_table.model_fingerprint != fingerprint:
            raise EvalInputError(f"probe and distractor embeddings come from different models "
                                 f"({fingerprint} vs {distractor_table.model_fingerprint})")
        data = {"probes": str(probes), "distractors": str(distractors)}
        overlap = {_identity_of(k) for k in (distractor_names or [])} & set(probe_labels) - {""}
        if overlap:
            raise EvalInputError(f"{len(overlap)} probe identities also appear among the distractors "
                                 f"(identity folders {sorted(overlap)[:5]}); distractors must be other people")

    result = megaface_identification(probe_vectors, probe_labels, distractor_vectors, levels=levels,
                                     max_rank=max_rank, fars=fars, impostor_top_k=impostor_top_k, seed=seed,
                                     use_gpu=use_gpu, progress=progress)
    return _write_megaface_report(out, result, probe_keys, distractor_names, fingerprint, flip_used, checkpoint,
                                  data, impostor_top_k, seed)


def _write_megaface_report(out, result: MegaFaceResult, probe_keys, distractor_names, fingerprint, flip,
                           checkpoint, data, impostor_top_k, seed) -> dict:
    def distractor_name(row: int) -> str:
        return distractor_names[row] if distractor_names is not None else str(row)

    levels = result.levels
    trials = ((probe_keys[p], probe_keys[g], f"{s:.6f}", *(int(result.trial_rank[d][t]) for d in levels))
              for t, (p, g, s) in enumerate(zip(result.trial_probe, result.trial_gallery, result.trial_score)))
    top_rows = ((probe_keys[p], d, *(f"{v:.6f}" for v in result.top_at_level[d][i]))
                for i, p in enumerate(result.kept_probes) for d in levels)
    verification_rows = [("genuine", probe_keys[a], probe_keys[b], f"{s:.6f}")
                         for a, b, s in zip(result.genuine_a, result.genuine_b, result.genuine_score)]
    verification_rows += [("impostor", probe_keys[p], distractor_name(int(r)), f"{s:.6f}")
                          for p, r, s in zip(result.impostor_probe, result.impostor_row, result.impostor_score)]

    summary_rows = [(f"rank-1 identification, {d:,} distractors", format_percent(result.rank1[d])) for d in levels]
    for far, tar in result.tar_at_far.items():
        value = format_percent(tar) if tar is not None else (
            f"not measured: the kept impostor tail reaches FAR {result.max_exact_far:.2g} only "
            "(raise impostor_top_k)")
        summary_rows.append((f"TAR @ FAR = {format_far(far, short=True)} (interpolated on the ROC)", value))
    summary_rows.append(("trials (probe, gallery image of the same identity)", f"{result.num_trials:,}"))
    cmc_header = "| distractors | " + " | ".join(f"rank {r}" for r in range(1, result.max_rank + 1)) + " |"
    details = ["## CMC (identification rate at rank r)", "", cmc_header,
               "|---" * (result.max_rank + 1) + "|"]
    details += [f"| {d:,} | " + " | ".join(f"{100 * v:.2f}" for v in result.cmc[d]) + " |" for d in levels]
    metrics = {
        "protocol": {"name": "MegaFace-style identification with distractors (challenge 1 protocol)",
                     "levels": levels, "distractor_subsets": f"nested prefixes of a random permutation (seed {seed})",
                     "rank_ties": "distractors scoring equal to the gallery image rank above it",
                     "tar_at_far": "interpolated linearly on the ROC; exact impostor tail up to roc_exact_up_to_far",
                     "impostor_top_k": impostor_top_k, "score": "cosine similarity (FAISS inner product)"},
        "model_fingerprint": fingerprint,
        "data": data,
        "model": {"checkpoint": str(checkpoint) if checkpoint is not None else None, "flip": flip},
        "counts": {"probe_images": result.num_probe_images, "probe_identities": result.num_probe_identities,
                   "skipped_single_image_probes": result.num_skipped_probe_images,
                   "distractors": result.num_distractors, "trials": result.num_trials,
                   "genuine_pairs": result.num_genuine_pairs, "impostor_pairs": result.num_impostor_pairs},
        "identification": result.to_dict(),
    }
    report = EvalReport(
        title="MegaFace-style identification with distractors",
        metrics=metrics,
        summary_rows=summary_rows,
        protocol_notes=[
            "each probe image in turn is searched against one other image of its identity plus D distractors; "
            "the D distractors are the first D of a seeded random permutation (nested levels)",
            "rank = 1 + number of distractors scoring at least as high as the gallery image (ties count against "
            "the probe)",
            "verification: genuine = probe-probe pairs of one identity, impostor = every probe against every "
            f"distractor; each probe's top {impostor_top_k} distractor scores are kept, which makes the ROC exact "
            f"up to FAR {result.max_exact_far:.3g}; TAR at FAR is interpolated linearly on the ROC (below 1 / "
            f"{result.num_impostor_pairs:,} impostor pairs it is an interpolation, not a measured operating point)",
            f"search: exact inner product on L2-normalised embeddings, FAISS {'GPU' if result.used_gpu else 'CPU'} "
            f"({result.search_seconds:.1f} s)",
            *([data["description"]] if "description" in data else []),
        ],
        details=details,
        tables=[
            Table("trials.csv", ("probe", "gallery", "score", *(f"rank_at_{d}" for d in levels)), trials),
            Table("distractor_top.csv", ("probe", "distractors", *(f"score_{r}" for r in range(1, result.max_rank + 1))),
                  top_rows),
            Table("verification_scores.csv", ("kind", "probe", "other", "score"), verification_rows),
        ],
        roc_curves={"probe-probe vs probe-distractor": (result.fpr, result.tpr)} if result.fpr.size > 1 else None,
        roc_title="MegaFace-style verification (exact part of the ROC)",
        roc_min_far=min(1e-6, 1.0 / max(result.num_impostor_pairs, 1)),
        cmc_curves={f"{d:,} distractors": result.cmc[d] for d in levels},
        cmc_title="CMC with distractors",
    )
    metrics = write_report(out, report)
    return {"metrics": metrics, "summary": f"MegaFace-style, {result.num_probe_images} probes, "
                                           f"{result.num_distractors:,} distractors: {result.summary()} -> {out}"}
