"""Did each imbalance method's mechanism act? A summary of a finished run folder, from its files alone.

Every formula of facepipe has a unit test; a run can still train with a mechanism switched off or
too weak to matter (a margin weight of 0.001, a clip factor of 0.01, every UMM class on one margin).
:func:`mechanism_summary` reads what the trainer logged into a run folder (``metrics.jsonl``, and
``config.yaml`` and ``uncertainty.json`` where present) and gives, per method, the quantities that
show the mechanism at work; :func:`mechanism_markdown` puts several runs in one table. Nothing
here loads a model: quantities only a live trainer can measure (how far ARConvL's class centres
moved, whether BatchNorm's running statistics changed) are left to ``bench/mechanisms.py``.

The methods and what is read for each:

- L-Softmax (Liu et al.), and UMM / UMM+SUM (Khan et al., CVPR 2019) built on it: lambda of the
  annealed margin-product target logit and its margin weight 1 / (1 + lambda) (the share of the
  margin-carrying term; near 0 the head is a plain softmax).
- UMM (Khan et al., CVPR 2019): the class-margin histogram of every uncertainty refresh and
  Spearman(class uncertainty, class size) (the paper's premise: negative, rarer classes are more
  uncertain); from ``uncertainty.json``, the mean margin of the rarer and the more frequent half
  of the classes at the last refresh.
- CLMLE (Huang et al., TPAMI 2019): cosine of a sample to its own batch-cluster centroid with and
  without the sample itself, the fraction of samples alone in their cluster and at zero loss, and
  the distinct images and clusters of a batch.
- ARConvL (Li et al., "ARConvL: Adaptive Region-Based Convolutional Learning for Multi-class
  Imbalance Classification"): the mean class radius against the benchmark radius R_ben (half the
  smallest centre distance) and the upper radius R_upp, the region loss L_R (how far features lie
  outside their class radius), beta and sigma^2.
- MM / MM-DRW (Kang, ICIP 2021) and the fixed-margin heads log nothing per step beyond the
  common part; their stages (loss, DRW epoch) are listed from ``config.yaml``.
- Every method: per clipping group (``main``, ARConvL's ``radius``, or ``global`` under
  ``optim.clip_mode: global``) the gradient norm and the clip factor (1 = untouched), with its
  minimum and mean over the run and the fraction of steps clipped.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from facepipe.errors import FacepipeUserError
from facepipe.train.run_log import read_run_log

__all__ = ["MechanismSummaryError", "SCHEMA", "mechanism_summary", "mechanism_markdown", "format_span",
           "format_margins"]

SCHEMA = 1
METRICS = "metrics.jsonl"

# metrics.jsonl keys of the train records, by section of the summary.
_MARGIN_PRODUCT_KEYS = ("lambda", "margin_weight")
_CLMLE_KEYS = {"own_cos_with": "clmle_own_cos_with", "own_cos_without": "clmle_own_cos_without",
               "alone_fraction": "clmle_alone_fraction", "zero_loss_fraction": "clmle_zero_loss_fraction",
               "distinct_images": "clmle_distinct_images", "clusters_per_batch": "clmle_clusters",
               "positive_fraction": "clmle_positive_fraction", "single_image_fraction": "clmle_single_image_fraction"}
_CLMLE_MEANS = ("zero_loss_fraction", "positive_fraction", "single_image_fraction")
_ARCONVL_KEYS = ("radius_mean", "r_ben", "r_upp", "region", "beta", "sigma2")


class MechanismSummaryError(ValueError, FacepipeUserError):
    """The folder is not a facepipe training run that can be summarised (no metrics.jsonl, or no
    training step logged in it)."""


# ============================================================================================
# Reading
# ============================================================================================
def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None (strict JSON has neither), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _by_step(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records in step order, one per step: a resumed run logs again the steps after the checkpoint
    it resumed from, and the later record (the one the run continued from) counts."""
    latest: dict[Any, dict[str, Any]] = {}
    for record in records:
        latest[record.get("step")] = record
    return sorted(latest.values(), key=lambda r: (r.get("step") is None, r.get("step") or 0))


def _numbers(records: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in records if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)]


def _span(values: Sequence[float], *extra: str) -> dict[str, float | None]:
    """``{"start", "end"}`` (first and last value) plus any of ``"min"``, ``"mean"``, ``"max"``;
    None throughout when there are no values."""
    out: dict[str, float | None] = {"start": values[0] if values else None, "end": values[-1] if values else None}
    finite = [v for v in values if math.isfinite(v)]
    for name in extra:
        if not finite:
            out[name] = None
        elif name == "mean":
            out[name] = sum(finite) / len(finite)
        else:
            out[name] = min(finite) if name == "min" else max(finite)
    return out


def _read_yaml(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _stages(config: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """The schedule of ``config.yaml``: one dict per stage with the keys that name its method."""
    stages = ((config or {}).get("train") or {}).get("stages")
    if not isinstance(stages, list):
        return None
    out = []
    for stage in stages:
        head, loss = stage.get("head") or {}, stage.get("loss") or {}
        drw = stage.get("drw")
        out.append({"name": stage.get("name"), "epochs": stage.get("epochs"), "head": head.get("type"),
                    "margin_source": head.get("margin_source", "fixed"),
                    "sample_uncertainty": bool(stage.get("sample_uncertainty", False)),
                    "loss": loss.get("type", "ce"),
                    "drw_start_epoch": drw.get("start_epoch") if isinstance(drw, dict) else None})
    return out


# ============================================================================================
# Sections
# ============================================================================================
def _margin_product(train: list[dict[str, Any]]) -> dict[str, Any] | None:
    with_lambda = [r for r in train if "lambda" in r]
    if not with_lambda:
        return None
    return {"records": len(with_lambda), **{key: _span(_numbers(with_lambda, key)) for key in _MARGIN_PRODUCT_KEYS}}


def _distinct_margins(margins: Any) -> int | None:
    """Margin levels holding at least one class (None when the histogram is given by quantiles)."""
    if not isinstance(margins, dict) or not margins or any(k in margins for k in ("min", "median", "max")):
        return None
    return sum(1 for count in margins.values() if count)


def _umm(records: list[dict[str, Any]], report: dict[str, Any] | None) -> dict[str, Any] | None:
    refreshes = _by_step(r for r in records if r.get("event") == "uncertainty")
    if not refreshes and report is not None and "margins" in report:
        refreshes = [report]  # a log cut before its first refresh record: the report holds the last one
    if not refreshes:
        return None
    rows = [{"step": r.get("step"), "epoch": r.get("epoch"), "stage": r.get("stage"), "views": r.get("views"),
             "margin_map": r.get("margin_map"), "spearman": r.get("spearman_uncertainty_vs_count"),
             "margins": r.get("margins"), "margin_fractions": r.get("margin_fractions"),
             "distinct_margins": _distinct_margins(r.get("margins"))} for r in refreshes]
    spearman = [float(r["spearman"]) if isinstance(r["spearman"], (int, float)) else math.nan for r in rows]
    distinct = [r["distinct_margins"] for r in rows if r["distinct_margins"] is not None]
    return {"refreshes": rows, "spearman": _span(spearman),
            "distinct_margins_max": max(distinct) if distinct else None,
            "last_refresh_by_class_size": _margins_by_size(report)}


def _margins_by_size(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """Mean class margin of the rarer and of the more frequent half of the classes (ranked by
    training images; classes of one size may fall on either side of the cut) at the refresh
    ``uncertainty.json`` holds (the last)."""
    if not report or "class_margin" not in report or "class_images" not in report:
        return None
    margins, counts = report["class_margin"], report["class_images"]
    if len(margins) != len(counts) or len(margins) < 2:
        return None
    order = sorted(range(len(counts)), key=lambda j: counts[j])
    half = len(order) // 2
    rare, frequent = order[:half], order[half:]
    return {"classes": len(margins), "margin_mean_rarer_half": sum(margins[j] for j in rare) / len(rare),
            "margin_mean_frequent_half": sum(margins[j] for j in frequent) / len(frequent),
            "images_max_rarer_half": max(counts[j] for j in rare),
            "images_min_frequent_half": min(counts[j] for j in frequent)}


def _clmle(records: list[dict[str, Any]], train: list[dict[str, Any]]) -> dict[str, Any] | None:
    with_clmle = [r for r in train if any(key.startswith("clmle_") for key in r)]
    if not with_clmle:
        return None
    out: dict[str, Any] = {"records": len(with_clmle)}
    for name, key in _CLMLE_KEYS.items():
        out[name] = _span(_numbers(with_clmle, key), "mean") if name in _CLMLE_MEANS \
            else _span(_numbers(with_clmle, key))
    out["cluster_refreshes"] = sum(1 for r in records if r.get("event") == "clusters")
    return out


def _arconvl(train: list[dict[str, Any]]) -> dict[str, Any] | None:
    with_radii = [r for r in train if "radius_mean" in r]
    if not with_radii:
        return None
    out: dict[str, Any] = {"records": len(with_radii), **{key: _span(_numbers(with_radii, key))
                                                         for key in _ARCONVL_KEYS}}
    ratio = [float(r["radius_mean"]) / float(r["r_ben"]) for r in with_radii
             if isinstance(r.get("r_ben"), (int, float)) and r["r_ben"] > 0]
    out["radius_over_r_ben"] = _span(ratio)
    return out


def _clip_limit(group: str, config: dict[str, Any] | None) -> float | None:
    """The max norm the config gives a clipping group (None: not clipped, or no config.yaml)."""
    if not config:
        return None
    if group in ("main", "global"):
        return (config.get("optim") or {}).get("clip_grad_norm")
    limits = {((stage.get("head") or {}).get(f"{group}_clip_grad_norm"))
              for stage in ((config.get("train") or {}).get("stages") or [])}
    limits.discard(None)
    return limits.pop() if len(limits) == 1 else None


def _clip(train: list[dict[str, Any]], config: dict[str, Any] | None) -> dict[str, Any]:
    groups = sorted({key[len("clip_factor_"):] for r in train for key in r if key.startswith("clip_factor_")},
                    key=lambda name: (name not in ("main", "global"), name))
    out = {}
    for group in groups:
        records = [r for r in train if f"clip_factor_{group}" in r]
        factors = _numbers(records, f"clip_factor_{group}")
        out[group] = {"records": len(records), "max_norm": _clip_limit(group, config),
                      "grad_norm": _span(_numbers(records, f"grad_norm_{group}"), "mean", "max"),
                      "clip_factor": _span(factors, "min", "mean"),
                      "clipped_fraction": sum(1 for f in factors if f < 1.0) / len(factors) if factors else None}
    return out


# ============================================================================================
# The summary
# ============================================================================================
def mechanism_summary(run_dir: str | Path) -> dict[str, Any]:
    """What the imbalance mechanisms of the run in ``run_dir`` did, from the folder's files alone.

    Reads ``metrics.jsonl`` (required; a facepipe training run writes it), ``config.yaml`` and
    ``uncertainty.json`` (each optional). The result is plain JSON (``json.dumps(...,
    allow_nan=False)`` works: NaN and infinities become None). Its keys are always present; a
    section of a method the run did not train is None.

    A *span* below is ``{"start": first, "end": last}`` over the logged training records (the
    trainer logs one step every ``train.log_every_steps`` and the last step of each epoch; a step
    logged twice by a resumed run counts once, with its later record), with ``"min"``, ``"mean"``,
    ``"max"`` where named, None when nothing was logged. Per-step figures (fractions of steps)
    are over those logged steps: exact with ``train.log_every_steps: 1``.

    Keys:

    - ``schema`` (int, 1), ``run`` (the folder, str);
    - ``stages``: from ``config.yaml`` (None without it), one dict per stage: ``name``, ``epochs``,
      ``head`` (type), ``margin_source`` ("fixed" / "uncertainty"), ``sample_uncertainty`` (SUM),
      ``loss`` (type), ``drw_start_epoch`` (None without DRW);
    - ``steps`` (last logged step), ``records`` (training records), ``log_every_steps`` (config);
    - ``loss``, ``accuracy``: spans of the training loss and batch accuracy;
    - ``margin_product`` (L-Softmax, Liu et al.; UMM, Khan et al., CVPR 2019; None without such a
      head): ``records``, ``lambda`` and ``margin_weight`` = 1 / (1 + lambda), spans;
    - ``umm`` (Khan et al., CVPR 2019; None without uncertainty refreshes): ``refreshes``, one dict
      per refresh: ``step``, ``epoch``, ``stage``, ``views``, ``margin_map``, ``spearman``
      (Spearman(class uncertainty, class size)), ``margins`` (margin level -> classes; quantiles
      for additive margins of more than 20 levels), ``margin_fractions``, ``distinct_margins``
      (levels holding a class); ``spearman`` (span over the refreshes), ``distinct_margins_max``,
      ``last_refresh_by_class_size`` (from ``uncertainty.json``, else None): ``classes``,
      ``margin_mean_rarer_half``, ``margin_mean_frequent_half``, ``images_max_rarer_half``,
      ``images_min_frequent_half``;
    - ``clmle`` (Huang et al., TPAMI 2019; None without a CLMLE stage): ``records``,
      ``own_cos_with`` / ``own_cos_without`` (mean cosine of a sample with cluster mates in the
      batch to its own batch-cluster centroid, with / without itself), ``alone_fraction``,
      ``zero_loss_fraction`` (with ``mean``), ``distinct_images`` and ``clusters_per_batch``, spans;
      ``cluster_refreshes`` (clusterings logged, the stage's first included);
    - ``arconvl`` (Li et al., ARConvL; None without an ARConvL stage): ``records``, spans of
      ``radius_mean`` (mean class radius), ``r_ben`` (benchmark radius: half the smallest centre
      distance), ``r_upp`` (upper radius), ``region`` (region loss L_R: features outside their
      class radius), ``beta``, ``sigma2``, and ``radius_over_r_ben``. How far the centres moved is
      not in the run's files (it needs the model before training; ``bench/mechanisms.py``
      measures it live);
    - ``clip``: per clipping group (``main``, ``radius``, ``global``): ``records``, ``max_norm``
      (the config's limit, None if unclipped or unknown), ``grad_norm`` (span with ``mean``,
      ``max``), ``clip_factor`` (span with ``min``, ``mean``; 1 = untouched), ``clipped_fraction``
      (of the logged steps, factor < 1). Every method has this part; for a softmax run it is the
      whole summary beside loss and accuracy. (MM / MM-DRW of Kang, ICIP 2021, log nothing of their
      own per step: see ``stages``.)

    Raises :class:`MechanismSummaryError` when the folder has no ``metrics.jsonl`` or no training
    record in it.
    """
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS
    if not run_dir.is_dir():
        raise MechanismSummaryError(f"{run_dir}: no such folder; give the output_dir of a facepipe training run")
    if not metrics.is_file():
        raise MechanismSummaryError(f"{run_dir}: no {METRICS} in this folder; give the output_dir of a facepipe "
                                    "training run (the trainer writes its log there)")
    records = [r for r in read_run_log(metrics) if isinstance(r, dict)]
    train = _by_step(r for r in records if r.get("event") == "train")
    if not train:
        raise MechanismSummaryError(f"{metrics}: no training step logged yet (no 'train' record); the run has "
                                    "not trained a logged step")
    config = _read_yaml(run_dir / "config.yaml")
    report = _read_json(run_dir / "uncertainty.json")
    summary = {
        "schema": SCHEMA,
        "run": str(run_dir),
        "stages": _stages(config),
        "steps": train[-1].get("step"),
        "records": len(train),
        "log_every_steps": ((config or {}).get("train") or {}).get("log_every_steps"),
        "loss": _span(_numbers(train, "loss")),
        "accuracy": _span(_numbers(train, "accuracy")),
        "margin_product": _margin_product(train),
        "umm": _umm(records, report),
        "clmle": _clmle(records, train),
        "arconvl": _arconvl(train),
        "clip": _clip(train, config),
    }
    return _finite(summary)


# ============================================================================================
# Markdown
# ============================================================================================
def _g(value: Any, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def _positive_text(clmle: dict[str, Any]) -> str:
    """The mean shares of a batch's images with a positive (another image of their identity in
    the batch) and from single-image people; nothing for runs logged before they were."""
    positive, single = clmle.get("positive_fraction") or {}, clmle.get("single_image_fraction") or {}
    if positive.get("mean") is None:
        return ""
    return (f"; {100 * positive['mean']:.0f} % of images with another of their identity in the batch, "
            f"{100 * single['mean']:.0f} % from single-image people")


def format_span(span: dict[str, Any] | None, digits: int = 3) -> str:
    """``start → end`` of a span of :func:`mechanism_summary` (— when absent)."""
    if not span or (span.get("start") is None and span.get("end") is None):
        return "—"
    return f"{_g(span.get('start'), digits)} → {_g(span.get('end'), digits)}"


def format_margins(margins: Any) -> str:
    """A refresh's margin histogram, compact: ``m1:4 m2:4 m3:4`` (quantiles as ``min 0.1 ...``)."""
    if not isinstance(margins, dict) or not margins:
        return "—"
    if _distinct_margins(margins) is None:
        return " ".join(f"{name} {_g(value)}" for name, value in margins.items())
    return " ".join(f"m{level}:{count}" for level, count in margins.items())


def _stage_text(stages: list[dict[str, Any]] | None) -> str:
    if not stages:
        return "—"
    parts = []
    for stage in stages:
        text = stage["head"] or "?"
        if stage.get("margin_source") == "uncertainty":
            text += " UMM"
        if stage.get("sample_uncertainty"):
            text += "+SUM"
        if stage.get("loss") not in (None, "ce"):
            text += f" / {stage['loss']}"
        if stage.get("drw_start_epoch") is not None:
            text += f" DRW@{stage['drw_start_epoch']}"
        parts.append(f"{text} ×{stage.get('epochs')}")
    return " → ".join(parts)


def _mechanism_text(summary: dict[str, Any]) -> str:
    parts = []
    margin = summary.get("margin_product")
    if margin:
        parts.append(f"margin weight 1/(1+λ) {format_span(margin['margin_weight'])}")
    umm = summary.get("umm")
    if umm:
        refreshes = umm["refreshes"]
        shown = refreshes[:1] + refreshes[-1:] if len(refreshes) > 1 else refreshes
        text = (f"UMM margins {' ⇒ '.join(format_margins(r['margins']) for r in shown)} "
                f"({len(refreshes)} refresh{'es' if len(refreshes) != 1 else ''}); "
                f"Spearman(u, class size) {' ⇒ '.join(_signed(r['spearman']) for r in shown)}")
        by_size = umm.get("last_refresh_by_class_size")
        if by_size:
            text += (f"; mean margin rarer / frequent half {by_size['margin_mean_rarer_half']:.2f} / "
                     f"{by_size['margin_mean_frequent_half']:.2f}")
        parts.append(text)
    clmle = summary.get("clmle")
    if clmle:
        with_, without = clmle["own_cos_with"], clmle["own_cos_without"]
        own = (f"{_g(with_['start'], 2)} / {_g(without['start'], 2)} → {_g(with_['end'], 2)} / "
               f"{_g(without['end'], 2)}") if with_["start"] is not None else "—"
        parts.append(f"CLMLE own-centroid cos with / without sample {own}; zero-loss fraction "
                     f"{format_span(clmle['zero_loss_fraction'], 2)}; {_g(clmle['distinct_images']['end'])} images "
                     f"in {_g(clmle['clusters_per_batch']['end'])} clusters per batch"
                     + _positive_text(clmle))
    arconvl = summary.get("arconvl")
    if arconvl:
        parts.append(f"ARConvL mean radius {format_span(arconvl['radius_mean'])} vs R_ben "
                     f"{format_span(arconvl['r_ben'])}; region loss L_R {format_span(arconvl['region'])}")
    if not parts:
        return "— (no mechanism of its own logged)"
    return " · ".join(parts)


def _signed(value: Any) -> str:
    return "—" if value is None else f"{value:+.3f}"


def _clip_text(clip: dict[str, Any]) -> str:
    if not clip:
        return "—"
    return "; ".join(f"{group} {_g(g['clip_factor']['min'])} / {_g(g['clip_factor']['mean'])} "
                     f"({_percent(g['clipped_fraction'])} clipped)" for group, g in clip.items())


def _percent(value: Any) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def mechanism_markdown(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """One markdown table of ``(label, mechanism_summary(...))`` rows, with how to read it.

    Columns: the label; the stages of the run; the method's mechanism, first → last logged step
    (L-Softmax/UMM margin weight, UMM margin histograms and Spearman correlation, CLMLE
    own-centroid cosines and zero-loss fraction, ARConvL radii); gradient clipping per group.
    """
    lines = ["| run | stages | mechanism (first → last logged step) | clip factor min / mean (steps clipped) |",
             "|---|---|---|---|"]
    for label, summary in rows:
        lines.append("| " + " | ".join(_cell(text) for text in (
            label, _stage_text(summary.get("stages")), _mechanism_text(summary), _clip_text(summary.get("clip") or {})
        )) + " |")
    lines += [
        "",
        "- **run**: the label given for the run folder.",
        "- **stages**: each stage's head (UMM: margins from uncertainty; +SUM: each sample's share of its "
        "class margin), its loss where not cross-entropy, DRW@ the run epoch deferred re-weighting starts "
        "(Kang, ICIP 2021), and ×epochs.",
        "- **mechanism**: the margin weight 1/(1+λ) is the share of the margin-carrying target logit of "
        "L-Softmax / UMM (Liu et al.; Khan et al., CVPR 2019): near 0 the head is a plain softmax. UMM margins "
        "count the classes on each margin level at the first ⇒ last uncertainty refresh (all on one level: "
        "no class-dependent margin); Khan et al. expect Spearman(class uncertainty, class size) below 0 and "
        "larger margins for the rarer half. CLMLE (Huang et al., TPAMI 2019): an own-centroid cosine without "
        "the sample far below the one with it means the sample inflated its own similarity; a zero-loss "
        "fraction near 1 means the margins no longer push; an image without another of its identity in the "
        "batch (always so for single-image people) gets no intra-identity pull, only the push from the others. ARConvL (Li et al.): radii far below R_ben (half "
        "the smallest centre distance) leave the features outside their class regions, which the region "
        "loss L_R counts. \"—\": the method logs nothing of its own (softmax, fixed margins, MM).",
        "- **clip factor**: per clipping group, the smallest and the mean factor the gradient was scaled by "
        "over the logged steps (1 = untouched) and the share of those steps clipped; a mean far below 1 "
        "means the clip, not the learning rate, sets the step size.",
    ]
    return "\n".join(lines) + "\n"
