"""Tables, plots and the README section of a study, from its kept runs alone.

Everything here reads ``<results>/runs/...`` (the small files every finished run keeps in git)
and ``<results>/data/`` (the training pool's record), so ``facepipe study report SPEC`` gives the
same output in a fresh checkout as on the machine that trained. Numbers:

- a method's value is the mean over its seeds (its chosen sweep setting), ``± s`` the standard
  deviation over seeds when it has two or more;
- ``[lo, hi]`` is the 95 % bootstrap interval of that seed mean over the test items
  (:mod:`facepipe.eval.bootstrap`: pairs for verification, probe identities for the MegaFace-style
  protocol, probes for closed-set identification), ``reps`` resamples shared by every method;
- a paired comparison gives the difference of the seed means on the same resamples, its interval
  and its two-sided bootstrap p-value.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from facepipe.eval.bootstrap import bootstrap_weights, paired_difference, summarise, weighted_tar_at_far
from facepipe.runtime.io import write_bytes_atomic, write_json_atomic, write_text_atomic
from facepipe.study.spec import PRETRAIN, StudySpec, slug

log = logging.getLogger(__name__)

__all__ = ["write_report", "collect_runs", "sync_readme"]

PRETRAIN_KEY = PRETRAIN
MEGAFACE_TAR_FAR = 1e-5


@dataclass
class KeptRun:
    method: str
    setting: str
    seed: int
    folder: Path
    result: dict
    readouts: dict
    arrays: dict[str, np.ndarray] = field(repr=False)
    mechanisms: dict | None = None


def _read(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _load(folder: Path, method: str, setting: str, seed: int) -> KeptRun | None:
    """A kept run; one without readouts (a sweep setting the validation people did not choose)
    has empty ``readouts`` and ``arrays``: it appears in the sweep and mechanism tables only."""
    if not (folder / "study_result.json").is_file():
        return None
    readouts, arrays = {}, {}
    if (folder / "readouts.json").is_file():
        readouts = _read(folder / "readouts.json")
        with np.load(folder / "readouts.npz") as data:
            arrays = {key: data[key] for key in data.files}
    mech = folder / "mechanisms.json"
    return KeptRun(method, setting, seed, folder, _read(folder / "study_result.json"), readouts,
                   arrays, _read(mech) if mech.is_file() else None)


def collect_runs(spec: StudySpec) -> dict[str, list[KeptRun]]:
    """Kept runs per method key (``pretrain`` included), every sweep setting, sorted by seed."""
    base = Path(spec.results) / "runs"
    runs: dict[str, list[KeptRun]] = {PRETRAIN_KEY: []}
    for seed in spec.pretrain.seeds:
        kept = _load(base / PRETRAIN / f"seed{seed}", PRETRAIN_KEY, "", seed)
        if kept:
            runs[PRETRAIN_KEY].append(kept)
    for key, method in spec.methods.items():
        runs[key] = []
        settings = list(method.sweep) if method.sweep else [""]
        for setting in settings:
            folder = base / key / slug(setting) if setting else base / key
            for seed in method.seeds:
                kept = _load(folder / f"seed{seed}", key, setting, seed)
                if kept:
                    runs[key].append(kept)
    return runs


def chosen_setting(spec: StudySpec, key: str, runs: list[KeptRun]) -> str | None:
    method = spec.methods.get(key)
    if method is None or method.sweep is None:
        return ""
    seed0 = {r.setting: r.result.get("validation_best") for r in runs if r.seed == 0}
    if set(seed0) != set(method.sweep):
        return None
    best = max(seed0.values())
    return next(s for s in method.sweep if seed0[s] == best)


# ---------------------------------------------------------------------------------------------
# Statistics with bootstrap weights
# ---------------------------------------------------------------------------------------------
class Metric:
    """A readout: its value on a run's arrays for item weights (None: all ones), the items it
    resamples ("pairs", "mf_identities", "probes") and how to print it."""

    def __init__(self, key: str, label: str, unit: str, fn: Callable[[dict, np.ndarray | None], float],
                 percent: bool = True) -> None:
        self.key, self.label, self.unit, self.fn, self.percent = key, label, unit, fn, percent


def _weighted_mean(values: np.ndarray, w: np.ndarray | None) -> float:
    values = np.asarray(values, dtype=np.float64)
    if w is None:
        return float(values.mean())
    return float((values * w).sum() / w.sum()) if w.sum() > 0 else float("nan")


def _auc(a: dict, w: np.ndarray | None) -> float:
    from sklearn.metrics import roc_auc_score

    y = a["devtest_is_same"].astype(bool)
    if w is not None and (w[y].sum() == 0 or w[~y].sum() == 0):
        return float("nan")
    return float(roc_auc_score(y, a["devtest_scores"], sample_weight=w))


def _devtest_tar(a: dict, w: np.ndarray | None, far: float = 1e-3) -> float:
    y = a["devtest_is_same"].astype(bool)
    s = a["devtest_scores"].astype(np.float64)
    w = np.ones(len(s)) if w is None else w.astype(np.float64)
    imp, imp_w = s[~y], w[~y]
    order = np.argsort(-imp, kind="stable")
    return weighted_tar_at_far(s[y], w[y], imp[order], imp_w[order], imp_w.sum(), far)


def _exponent(value: float) -> str:
    return f"{value:.0e}".replace("e-0", "e-")  # 1e-3, not 1e-03


def _devtest_tar_note(sample: KeptRun, far: float = 1e-3) -> str:
    """How far to trust DevTest's TAR at ``far``: with few impostor pairs it rests on the highest one."""
    impostors = int((~sample.arrays["devtest_is_same"].astype(bool)).sum())
    allowed = far * impostors
    if allowed >= 1:
        return (f"TAR @ FAR {_exponent(far)}: {impostors:,} impostor pairs, {allowed:.0f} of them may score above "
                "the threshold.")
    return (f"TAR @ FAR {_exponent(far)} on DevTest rests on {impostors:,} impostor pairs: fewer than one may be "
            "accepted, so it is the share of genuine pairs above the single highest impostor score (the smallest "
            f"FAR these pairs can measure is 1/{impostors:,} = {_exponent(1 / impostors)}). A bootstrap resample "
            "that leaves that one pair out lowers the threshold, which is why the upper ends of these intervals "
            "are so high; the MegaFace-style TAR below rests on far more impostors.")


def _mf_weights(a: dict, w: np.ndarray | None, key: str) -> np.ndarray:
    ident = a[key]
    return np.ones(len(ident)) if w is None else w[ident].astype(np.float64)


def _mf_rank1(level_index: int) -> Callable[[dict, np.ndarray | None], float]:
    def fn(a: dict, w: np.ndarray | None) -> float:
        return _weighted_mean(a["mf_rank1"][level_index], None if w is None else _mf_weights(a, w, "mf_trial_ident"))
    return fn


def _mf_tar(far: float) -> Callable[[dict, np.ndarray | None], float]:
    def fn(a: dict, w: np.ndarray | None) -> float:
        probe_w = _mf_weights(a, w, "mf_probe_ident")
        total = probe_w.sum() * float(a["mf_num_distractors"])
        return weighted_tar_at_far(a["mf_gen_score"].astype(np.float64), _mf_weights(a, w, "mf_gen_ident"),
                                   a["mf_imp_score"].astype(np.float64), _mf_weights(a, w, "mf_imp_ident"), total, far)
    return fn


def _closed(rule: str, group: str) -> Callable[[dict, np.ndarray | None], float]:
    from facepipe.eval.closed_set import group_recall

    def fn(a: dict, w: np.ndarray | None) -> float:
        value = group_recall(a["cs_truth"], a[f"_cs_rule_{rule}"], a["_cs_group"], w)[group]
        return float("nan") if value is None else value
    return fn


def metrics_for(spec: StudySpec, sample: KeptRun) -> list[tuple[Metric, str]]:
    """Every readout of the study and its resampling unit."""
    out: list[tuple[Metric, str]] = []
    if "devtest_scores" in sample.arrays:
        out += [
            (Metric("cv10", "LFW DevTest 10-fold accuracy", "%",
                    lambda a, w: _weighted_mean(a["devtest_cv_correct"], w)), "pairs"),
            (Metric("acc_val_thr", "DevTest accuracy at the validation threshold", "%",
                    lambda a, w: _weighted_mean(a["devtest_val_correct"], w)), "pairs"),
            (Metric("auc", "DevTest AUC", "", _auc, percent=False), "pairs"),
            (Metric("tar_1e-3", "DevTest TAR at FAR 1e-3", "%", _devtest_tar), "pairs"),
        ]
    levels = [int(x) for x in sample.arrays["mf_levels"]] if "mf_levels" in sample.arrays else []
    for i, level in enumerate(levels):
        out.append((Metric(f"mf_rank1_{level}", f"MegaFace-style rank-1 @ {level:,} distractors", "%", _mf_rank1(i)),
                    "mf_identities"))
    for far in ((1e-4, 1e-5) if levels else ()):
        out.append((Metric(f"mf_tar_{far:g}", f"MegaFace-style TAR at FAR {far:g}", "%", _mf_tar(far)), "mf_identities"))
    if "closed_set" not in sample.readouts:
        return out
    for rule, name in (("1-NN", "nn"), ("k-NC N=1", "knc1"), ("k-NC tuned N", "knc")):
        for group in ("all", "head", "middle", "tail"):
            out.append((Metric(f"cs_{name}_{group}", f"closed set {rule} {group}", "%", _closed(rule, group)), "probes"))
    return out


def _prepare(spec: StudySpec, run: KeptRun) -> None:
    from facepipe.eval.closed_set import group_of_counts

    if "cs_train_count" not in run.arrays:
        return
    # Rules by name; readouts written before the fixed rule names held "k-NC N=<n>" for the tuned
    # N, and only one k-NC rule when the tuning chose N = 1.
    order = run.readouts["closed_set"]["rule_order"]
    by_name = {rule: run.arrays[f"cs_pred_{i}"] for i, rule in enumerate(order)}
    if "k-NC tuned N" not in by_name:
        n = run.readouts["closed_set"]["knc_choice"]["num_neighbours"]
        by_name["k-NC tuned N"] = by_name[f"k-NC N={n}"]
    for rule, predicted in by_name.items():
        run.arrays[f"_cs_rule_{rule}"] = predicted
    groups = spec.readouts.groups
    run.arrays["_cs_group"] = group_of_counts(run.arrays["cs_train_count"], groups["head"], groups["middle"])


def _unit_size(sample: KeptRun, unit: str) -> int:
    a = sample.arrays
    if unit == "pairs" and "devtest_scores" not in a:
        return 1
    if unit == "probes" and "cs_truth" not in a:
        return 1
    if unit == "mf_identities" and "mf_trial_ident" not in a:
        return 1
    if unit == "pairs":
        return len(a["devtest_scores"])
    if unit == "probes":
        return len(a["cs_truth"])
    return int(max(a["mf_trial_ident"].max(), a["mf_probe_ident"].max())) + 1


@dataclass
class MethodStats:
    key: str
    label: str
    seeds: list[int]
    setting: str
    values: dict[str, list[float]]  # metric -> per-seed values
    replicates: dict[str, np.ndarray]  # metric -> [reps] seed-mean replicates
    summary: dict[str, Any]


def method_stats(spec: StudySpec, key: str, label: str, runs: list[KeptRun], metrics, weights: dict[str, np.ndarray]
                 ) -> MethodStats:
    values: dict[str, list[float]] = {}
    replicates: dict[str, np.ndarray] = {}
    summary: dict[str, Any] = {}
    for metric, unit in metrics:
        per_seed = [metric.fn(r.arrays, None) for r in runs]
        reps = np.mean([[metric.fn(r.arrays, w) for w in weights[unit]] for r in runs], axis=0)
        values[metric.key] = per_seed
        replicates[metric.key] = reps
        s = summarise(float(np.mean(per_seed)), reps)
        summary[metric.key] = {"mean": s.value, "ci95": [s.low, s.high], "per_seed": per_seed,
                               "seed_std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else None}
    return MethodStats(key, label, [r.seed for r in runs], runs[0].setting if runs else "", values, replicates, summary)


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------
def _fmt(value: float | None, percent: bool, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{100 * value:.{digits}f}" if percent else f"{value:.4f}"


def _cell(stats: MethodStats, metric: Metric, with_ci: bool = True) -> str:
    s = stats.summary[metric.key]
    text = _fmt(s["mean"], metric.percent)
    if s["seed_std"] is not None:
        text += f" ± {_fmt(s['seed_std'], metric.percent)}"
    if with_ci:
        text += f" [{_fmt(s['ci95'][0], metric.percent)}, {_fmt(s['ci95'][1], metric.percent)}]"
    return text


def _p(p: float) -> str:
    return "—" if not math.isfinite(p) else (f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(spec: StudySpec, readme: str | Path | None = None) -> str:
    """Write ``<results>/report.md``, ``report.json`` and the plots; rewrite the README section
    when ``readme`` is given. Returns a one-line summary."""
    results = Path(spec.results)
    runs = collect_runs(spec)
    finished = {k: v for k, v in runs.items() if v}
    if not finished:
        return f"study {spec.name}: no finished run in {results}/runs yet; nothing to report"
    read_out = [r for v in finished.values() for r in v if r.readouts]
    if not read_out:
        return f"study {spec.name}: no run in {results}/runs has its readouts yet; nothing to report"
    sample = read_out[0]
    for run in read_out:
        _prepare(spec, run)
    metrics = metrics_for(spec, sample)
    reps = spec.readouts.bootstrap
    weights = {unit: bootstrap_weights(_unit_size(sample, unit), reps, seed=i)
               for i, unit in enumerate(("pairs", "mf_identities", "probes"))}
    stats: dict[str, MethodStats] = {}
    sweep_rows = []
    for key, group in finished.items():
        label = "Pre-training only (softmax)" if key == PRETRAIN_KEY else spec.methods[key].label
        setting = "" if key == PRETRAIN_KEY else chosen_setting(spec, key, group)
        if key != PRETRAIN_KEY and spec.methods[key].sweep:
            for run in sorted((r for r in group if r.seed == 0), key=lambda r: list(spec.methods[key].sweep).index(r.setting)):
                sweep_rows.append([label, run.setting, _fmt(run.result.get("validation_best"), True),
                                   str(run.result.get("best_epoch")), "chosen" if run.setting == setting else ""])
        if setting is None:  # sweep not finished: seed-0 runs of each setting only, reported in the sweep table
            continue
        chosen = [r for r in group if r.setting == setting and r.readouts]
        if chosen:  # else the chosen setting's readouts are still to do
            stats[key] = method_stats(spec, key, label, chosen, metrics, weights)

    by_key = {m.key: m for m, _ in metrics}
    sections = [f"Generated by `facepipe study report {spec.name}` from {sum(len(s.seeds) for s in stats.values())} "
                f"kept runs; values are means over seeds (± standard deviation over seeds) with the 95 % bootstrap "
                f"interval of the mean over test items ({reps} resamples) in brackets."]
    # Headline table.
    head_keys = [k for k in ("cv10", "acc_val_thr", "auc", "tar_1e-3") if k in by_key]
    rows = [[s.label + (f" [{s.setting}]" if s.setting else ""), ", ".join(map(str, s.seeds))]
            + [_cell(s, by_key[k]) for k in head_keys] for s in stats.values()]
    if head_keys:
        sections.append("### LFW DevTest (people never trained on)\n\n" + _table(
        ["Method", "Seeds", "10-fold accuracy %", "Accuracy at validation threshold %", "AUC", "TAR @ FAR 1e-3 %"], rows))
        if "tar_1e-3" in head_keys:
            sections.append(_devtest_tar_note(sample))
    mf_keys = [m.key for m, _ in metrics if m.key.startswith("mf_")]
    rows = [[s.label] + [_cell(s, by_key[k]) for k in mf_keys] for s in stats.values()]
    if mf_keys:
        sections.append("### MegaFace-style identification (DevTest people among every other LFW person)\n\n"
                    + _table(["Method"] + [by_key[k].label.replace("MegaFace-style ", "") + " %" for k in mf_keys], rows))
    cs_keys = [m.key for m, _ in metrics if m.key.startswith("cs_")]
    rows = [[s.label] + [_cell(s, by_key[k], with_ci=False) for k in cs_keys] for s in stats.values()]
    if cs_keys:
        sections.append("### Closed-set identification of held-out images of training people (recall %)\n\n"
                    + _table(["Method"] + [by_key[k].label.replace("closed set ", "") for k in cs_keys], rows))
    # Paired tests.
    top_level = f"mf_rank1_{levels[-1]}" if (levels := [m.key for m, _ in metrics if m.key.startswith("mf_rank1_")]) \
        else None
    compare_keys = ["cv10", "tar_1e-3", top_level, f"mf_tar_{MEGAFACE_TAR_FAR:g}", "cs_nn_tail", "cs_knc_all"]
    compare_keys = [k for k in compare_keys if k in by_key]
    paired: dict[str, dict] = {}
    for reference in spec.readouts.compare_to:
        if reference not in stats:
            continue
        ref = stats[reference]
        rows = []
        for s in stats.values():
            if s.key == reference:
                continue
            cells = []
            for k in compare_keys:
                d = paired_difference(s.summary[k]["mean"], s.replicates[k], ref.summary[k]["mean"], ref.replicates[k])
                paired.setdefault(reference, {}).setdefault(s.key, {})[k] = d
                pct = by_key[k].percent
                sign = "+" if d["difference"] >= 0 else ""
                cells.append(f"{sign}{_fmt(d['difference'], pct)} [{_fmt(d['ci95'][0], pct)}, {_fmt(d['ci95'][1], pct)}] "
                             f"p {_p(d['p'])}")
            rows.append([s.label] + cells)
        sections.append(f"### Paired differences against {ref.label}\n\n"
                        + _table(["Method"] + [by_key[k].label for k in compare_keys], rows))
    if sweep_rows:
        sections.append("### Sweeps (seed 0; chosen by the validation people's best accuracy)\n\n"
                        + _table(["Method", "Setting", "Validation accuracy %", "Best epoch", ""], sweep_rows))
    from facepipe.study.mechanisms import mechanism_markdown

    mech_rows = []
    for key, group in finished.items():
        label = "Pre-training only (softmax)" if key == PRETRAIN_KEY else spec.methods[key].label
        for r in group:
            if r.mechanisms:
                mech_rows.append((f"{label}{f' [{r.setting}]' if r.setting else ''} seed {r.seed}", r.mechanisms))
    if mech_rows:
        sections.append("### Mechanisms (every run)\n\n" + mechanism_markdown(mech_rows))
    # Budget.
    total_train = sum(r.result.get("train_seconds") or 0.0 for v in finished.values() for r in v)
    total_readout = sum(r.result.get("readout_seconds") or 0.0 for v in finished.values() for r in v)
    sections.append(f"Compute: {sum(len(v) for v in finished.values())} runs, training {total_train / 3600:.2f} h, "
                    f"readouts {total_readout / 3600:.2f} h (wall time on this machine).")
    markdown = "\n\n".join(sections) + "\n"
    results.mkdir(parents=True, exist_ok=True)
    write_text_atomic(results / "report.md", markdown)
    write_json_atomic(results / "report.json", {
        "methods": {k: {"label": s.label, "setting": s.setting, "seeds": s.seeds, "metrics": s.summary}
                    for k, s in stats.items()},
        "paired": paired, "bootstrap": reps})
    plots = _plots(spec, stats, finished)
    if readme is not None and spec.readme_section:
        sync_readme(Path(readme), spec.readme_section, markdown)
    return (f"study {spec.name}: {len(stats)} methods in {results / 'report.md'}"
            + (f", plots {', '.join(plots)}" if plots else "") + (f"; README section updated in {readme}" if readme else ""))


def _plots(spec: StudySpec, stats: dict[str, MethodStats], finished: dict[str, list[KeptRun]]) -> list[str]:
    """Class-size histogram of the training pool and per-identity recall against training images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = Path(spec.results)
    written = []
    counts_file = results / "data" / "train_counts.json"
    if counts_file.is_file():
        counts = np.array(list(_read(counts_file).values()))
        fig, ax = plt.subplots(figsize=(6, 3.5))
        bins = np.unique(np.round(np.logspace(0, np.log10(counts.max() + 1), 30)).astype(int))
        ax.hist(counts, bins=bins, color="#4477aa")
        ax.set_xscale("log"); ax.set_yscale("log")
        ax.set_xlabel("training images per identity"); ax.set_ylabel("identities")
        ax.set_title(f"Training pool: {len(counts):,} identities, {counts.sum():,} images")
        fig.tight_layout()
        _save(fig, results / "class_sizes.png"); written.append("class_sizes.png")
    # Recall per identity against its training images: softmax, CosFace and the best other method.
    candidates = [k for k in stats if k not in (PRETRAIN_KEY, "softmax", "cosface")]
    best = max(candidates, key=lambda k: stats[k].summary.get("cs_nn_all", {}).get("mean", -1), default=None)
    shown = [k for k in ("softmax", "cosface", best) if k in stats and k is not None]
    if shown:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        edges = np.array([2, 3, 5, 10, 20, 50, 101])
        for key in shown:
            recalls, sizes = [], []
            for run in (r for r in finished[key] if r.setting == stats[key].setting and r.readouts):
                a = run.arrays
                rule = a["_cs_rule_1-NN"]
                for ident in np.unique(a["cs_truth"]):
                    mask = a["cs_truth"] == ident
                    recalls.append(float((rule[mask] == ident).mean()))
                    sizes.append(int(a["cs_train_count"][mask][0]))
            recalls, sizes = np.array(recalls), np.array(sizes)
            centres, means = [], []
            for lo, hi in zip(edges[:-1], edges[1:]):
                mask = (sizes >= lo) & (sizes < hi)
                if mask.any():
                    centres.append(math.sqrt(lo * (hi - 1))); means.append(recalls[mask].mean())
            ax.plot(centres, means, marker="o", label=stats[key].label)
        ax.set_xscale("log")
        ax.set_xlabel("training images of the identity"); ax.set_ylabel("1-NN recall of its held-out images")
        ax.set_ylim(0, 1); ax.legend(fontsize=8); ax.grid(alpha=0.3)
        fig.tight_layout()
        _save(fig, results / "recall_by_class_size.png"); written.append("recall_by_class_size.png")
    return written


def _save(fig, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())


def sync_readme(path: Path, section: str, markdown: str) -> None:
    """Replace the text between ``<!-- SECTION:start -->`` and ``<!-- SECTION:end -->`` in ``path``."""
    from facepipe.study.runner import StudyError

    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    text = path.read_text(encoding="utf-8")
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise StudyError(f"{path} needs exactly one '{start}' ... '{end}' pair to hold the study's section")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    write_text_atomic(path, f"{head}{start}\n{markdown}{end}{tail}")
