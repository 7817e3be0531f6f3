"""The readouts of one study run: every test set embedded once, then every protocol from those
embeddings. Written as ``readouts.json`` (point values, settings, counts) and ``readouts.npz``
(the per-item outcomes the report bootstraps: per-pair scores and correctness, per-trial ranks,
per-probe predictions), both small enough to keep in git for every run.

Protocols (the study spec's ``data`` names the sets):

- **validation people** (``val_pairs``): pair scores; the best-accuracy threshold on them is the
  threshold every other verification readout applies; the k-NC N is chosen on these people too;
- **LFW DevTest** (``dev_test_pairs`` over ``lfw_images``): 10-fold cross-validated accuracy
  (contiguous folds of the View 1 file, a threshold from the other nine folds), accuracy at the
  validation threshold, AUC and TAR at FAR 1e-3;
- **MegaFace-style identification** (:func:`facepipe.eval.megaface.megaface_identification`):
  the DevTest people with 2+ images as probes among every other LFW person as distractors;
  rank-1 at each distractor level and TAR at low FAR;
- **closed-set identification** (:mod:`facepipe.eval.closed_set`): the held-out probes of
  training people among every training identity, 1-NN and k-NC, recall per head / middle / tail.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from facepipe.runtime.io import write_bytes_atomic, write_json_atomic

log = logging.getLogger(__name__)

READOUTS_JSON = "readouts.json"
READOUTS_NPZ = "readouts.npz"
MEGAFACE_FARS = (1e-4, 1e-5, 1e-6)
DEVTEST_FARS = (1e-3,)
# Impostor scores kept per run for the bootstrap of TAR at FAR: the highest ones overall, this many
# times what the lowest FAR of MEGAFACE_FARS[0] needs (a resample may hold more of them).
IMPOSTOR_MARGIN = 4


class StudySets:
    """Image lists of every readout, read once per study (paths in embedding order)."""

    def __init__(self, spec) -> None:
        from facepipe.data.lfw_pairs import parse_lfw_pairs
        from facepipe.embed.extract import list_images
        from facepipe.eval.megaface import lfw_megaface_sets
        from facepipe.eval.pairs_job import read_lfw_pairs_paths, load_pairs

        data = spec.data
        self.val_pairs = load_pairs(data.val_pairs)
        val_dir = Path(data.val_pairs).parent
        self.val = list_images(val_dir)
        self.train = list_images(data.train)
        self.probes = list_images(data.probes) if data.probes else []
        self.lfw = list_images(data.lfw_images) if data.lfw_images else []
        self.dev_test = parse_lfw_pairs(data.dev_test_pairs) if data.dev_test_pairs else None
        # The DevTest pairs' image names as found under lfw_images (Name/Name_0001.jpg, else the
        # .png etc. that exists), as `facepipe eval pairs` reads an LFW pairs file.
        self.dev_test_names = read_lfw_pairs_paths(Path(data.dev_test_pairs), Path(data.lfw_images))[:2] \
            if data.lfw_images and data.dev_test_pairs else None
        self.megaface = lfw_megaface_sets(data.lfw_images, data.dev_test_pairs) \
            if data.lfw_images and data.dev_test_pairs else None
        # One embedding per image file: the training pool links into the same aligned folders as
        # the LFW readouts (LFW people outside DevTest are training people and distractors), so
        # the sets share files; embedding each file once saves about a third of the readout time.
        self.paths: list[str] = []
        self.rows: dict[str, np.ndarray] = {}
        position: dict[str, int] = {}
        for name, items in (("val", self.val), ("train", self.train), ("probes", self.probes), ("lfw", self.lfw)):
            rows = []
            for path, _ in items:
                real = str(Path(path).resolve())
                if real not in position:
                    position[real] = len(self.paths)
                    self.paths.append(real)
                rows.append(position[real])
            self.rows[name] = np.array(rows, dtype=np.int64)
        self.images_listed = sum(len(r) for r in self.rows.values())
        val_rows = {str(Path(path).resolve()): i for i, (path, _) in enumerate(self.val)}
        self.val_pair_rows = np.array([val_rows[str(Path(p).resolve())] for p in self.val_pairs.paths], dtype=np.int64)
        self.train_counts: dict[str, int] = {}
        for _, identity in self.train:
            self.train_counts[identity] = self.train_counts.get(identity, 0) + 1
        self.head_source_names: set[str] = set()
        if data.head_source:
            from facepipe.data.merge import normalise_identity_name

            self.head_source_names = {normalise_identity_name(p.name) for p in Path(data.head_source).iterdir()
                                      if p.is_dir()}

    def lfw_rows(self, keys: list[str]) -> np.ndarray:
        """Rows in the LFW listing of relative image keys (the map is built once per study)."""
        if not hasattr(self, "_lfw_position"):
            self._lfw_position = {Path(path).relative_to(self.spec_lfw_root).as_posix(): i
                                  for i, (path, _) in enumerate(self.lfw)}
        position = self._lfw_position
        missing = [k for k in keys if k not in position]
        if missing:
            raise FileNotFoundError(f"{len(missing)} LFW images of the readouts are missing, e.g. {missing[0]}")
        return np.array([position[k] for k in keys], dtype=np.int64)

    @property
    def spec_lfw_root(self) -> Path:
        return Path(self.megaface.root)


def _verification(scores: np.ndarray, is_same: np.ndarray, threshold: float, folds: np.ndarray) -> tuple[dict, dict]:
    from facepipe.eval.verification import correct_at_threshold, kfold_accuracy, roc_metrics

    cv = kfold_accuracy(scores, is_same, n_folds=int(folds.max()) + 1, folds=folds)
    cv_correct = (scores >= cv["fold_thresholds"][folds]) == is_same
    at_val = correct_at_threshold(scores, is_same, threshold)
    roc = roc_metrics(scores, is_same, fars=DEVTEST_FARS)
    values = {"cv10_accuracy": float(cv_correct.mean()), "cv10_fold_std": float(cv["std"]),
              "accuracy_at_val_threshold": float(at_val.mean()), "auc": roc["auc"],
              **{f"tar_at_far_{f:g}": roc["tar_at_far"][f] for f in DEVTEST_FARS}}
    arrays = {"devtest_scores": scores.astype(np.float32), "devtest_is_same": is_same,
              "devtest_cv_correct": cv_correct, "devtest_val_correct": at_val, "devtest_folds": folds.astype(np.int8)}
    return values, arrays


def _megaface(sets: StudySets, lfw_x: np.ndarray) -> tuple[dict, dict]:
    from facepipe.eval.megaface import megaface_identification

    mf = sets.megaface
    probe_x = lfw_x[sets.lfw_rows(mf.probe_keys)]
    distractor_x = lfw_x[sets.lfw_rows(mf.distractor_keys)]
    result = megaface_identification(probe_x, mf.probe_labels, distractor_x, fars=MEGAFACE_FARS, progress=False)
    _, probe_ident = np.unique(np.asarray(mf.probe_labels, dtype=object), return_inverse=True)
    probe_ident = probe_ident.astype(np.int32)
    keep = int(math.ceil(IMPOSTOR_MARGIN * MEGAFACE_FARS[0] * result.num_impostor_pairs))
    order = np.argsort(-result.impostor_score, kind="stable")[:keep]
    values = {"rank1": {str(level): float(v) for level, v in result.rank1.items()},
              "tar_at_far": {f"{f:g}": (None if t is None else float(t)) for f, t in result.tar_at_far.items()},
              "probe_images": result.num_probe_images, "probe_identities": result.num_probe_identities,
              "distractors": result.num_distractors, "impostor_pairs": result.num_impostor_pairs,
              "genuine_pairs": result.num_genuine_pairs, "levels": result.levels}
    arrays = {"mf_trial_ident": probe_ident[result.trial_probe],
              "mf_levels": np.asarray(result.levels, dtype=np.int64),
              "mf_rank1": np.stack([result.trial_rank[level] == 1 for level in result.levels]),
              "mf_gen_score": result.genuine_score.astype(np.float32),
              "mf_gen_ident": probe_ident[result.genuine_a],
              "mf_imp_score": result.impostor_score[order].astype(np.float32),
              "mf_imp_ident": probe_ident[result.impostor_probe[order]],
              "mf_probe_ident": probe_ident[result.kept_probes],
              "mf_num_distractors": np.int64(result.num_distractors)}
    return values, arrays


def _closed_set(spec, sets: StudySets, x: np.ndarray, val_x: np.ndarray) -> tuple[dict, dict]:
    from facepipe.eval.closed_set import choose_knc_neighbours, closed_set_identify, group_of_counts, group_recall

    cluster_size = spec.readouts.knc_cluster_size
    choice = choose_knc_neighbours(val_x, [identity for _, identity in sets.val], cluster_size)
    result = closed_set_identify(x[sets.rows["train"]], [identity for _, identity in sets.train],
                                 x[sets.rows["probes"]], [identity for _, identity in sets.probes],
                                 cluster_size=cluster_size, num_neighbours=choice["num_neighbours"])
    counts = np.array([sets.train_counts[name] for name in result.identities], dtype=np.int64)
    groups = spec.readouts.groups
    probe_group = group_of_counts(counts[result.truth], groups["head"], groups["middle"])
    rules = {rule: group_recall(result.truth, predicted, probe_group) for rule, predicted in result.predicted.items()}
    in_head_source = np.array([name in sets.head_source_names for name in result.identities])
    values = {"rules": rules, "knc_choice": choice, "num_clusters": result.num_clusters,
              "probes": int(len(result.truth)), "probe_identities": int(len(np.unique(result.truth))),
              "probes_per_group": {g: int((probe_group == g).sum()) for g in ("head", "middle", "tail")},
              "identities_per_group": {g: int(len(np.unique(result.truth[probe_group == g])))
                                       for g in ("head", "middle", "tail")},
              "head_source_identities_in_head": int(len(np.unique(result.truth[(probe_group == "head")
                                                                               & in_head_source[result.truth]])))}
    arrays = {"cs_truth": result.truth.astype(np.int32), "cs_train_count": counts[result.truth].astype(np.int32),
              "cs_head_source": in_head_source[result.truth],
              **{f"cs_pred_{i}": p.astype(np.int32) for i, p in enumerate(result.predicted.values())}}
    values["rule_order"] = list(result.predicted)
    return values, arrays


def compute_readouts(spec, run_dir: str | Path, checkpoint: str | Path, sets: StudySets | None = None,
                     device: str = "auto") -> dict:
    """Embed every set with ``checkpoint`` and write ``readouts.json`` / ``readouts.npz`` into
    ``run_dir``; returns the JSON record."""
    from facepipe.embed.extract import embed_paths
    from facepipe.eval.verification import best_threshold, cosine_scores
    from facepipe.models.loaded import load_model
    from facepipe.runtime.device import resolve_device

    run_dir = Path(run_dir)
    started = time.perf_counter()
    sets = sets or StudySets(spec)
    model = load_model(checkpoint, resolve_device(device))
    x, info = embed_paths(model, sets.paths, flip=spec.readouts.flip)
    embed_seconds = time.perf_counter() - started
    val_x = x[sets.rows["val"]]
    pairs = sets.val_pairs
    val_scores = cosine_scores(val_x[sets.val_pair_rows], pairs.idx_a, pairs.idx_b)
    threshold, val_accuracy = best_threshold(val_scores, pairs.is_same)
    record: dict[str, Any] = {
        "checkpoint": str(checkpoint), "model_fingerprint": info["model_fingerprint"], "flip": info["flip"],
        "images_embedded": len(sets.paths), "images_in_sets": sets.images_listed, "embed_seconds": embed_seconds,
        "validation": {"threshold": float(threshold), "accuracy": float(val_accuracy), "pairs": int(len(val_scores))},
    }
    arrays: dict[str, np.ndarray] = {"val_scores": val_scores.astype(np.float32), "val_is_same": pairs.is_same}
    if sets.dev_test is not None:
        lfw_x = x[sets.rows["lfw"]]
        a, b = sets.dev_test_names
        rows_a, rows_b = sets.lfw_rows(a), sets.lfw_rows(b)
        scores = np.sum(lfw_x[rows_a].astype(np.float64) * lfw_x[rows_b], axis=1)
        values, more = _verification(scores, sets.dev_test.is_same, threshold, sets.dev_test.contiguous_folds(10))
        record["devtest"] = values
        arrays.update(more)
        values, more = _megaface(sets, lfw_x)
        record["megaface"] = values
        arrays.update(more)
    if sets.probes:
        values, more = _closed_set(spec, sets, x, val_x)
        record["closed_set"] = values
        arrays.update(more)
    record["seconds"] = time.perf_counter() - started
    buffer = _npz_bytes(arrays)
    write_bytes_atomic(run_dir / READOUTS_NPZ, buffer)
    write_json_atomic(run_dir / READOUTS_JSON, record)
    return record


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    import io

    handle = io.BytesIO()
    np.savez_compressed(handle, **arrays)
    return handle.getvalue()


def load_readouts(run_dir: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    run_dir = Path(run_dir)
    record = json.loads((run_dir / READOUTS_JSON).read_text(encoding="utf-8"))
    with np.load(run_dir / READOUTS_NPZ) as data:
        arrays = {key: data[key] for key in data.files}
    return record, arrays
