"""facepipe.study.mechanisms: the mechanism summary of a finished run folder, from its files alone,
on tiny runs the trainer really trained (UMM, CLMLE, ARConvL, softmax)."""
from __future__ import annotations

import json
import math

import pytest

from conftest import tiny_config
from facepipe.errors import FacepipeUserError
from facepipe.study.mechanisms import MechanismSummaryError, mechanism_markdown, mechanism_summary
from facepipe.train import Trainer

SUMMARY_KEYS = {"schema", "run", "stages", "steps", "records", "log_every_steps", "loss", "accuracy",
                "margin_product", "umm", "clmle", "arconvl", "clip"}
STEPS = 3  # per epoch: the runs only need a few logged steps


def train(root, out, stages, model=None, **train_section):
    sections = {"train": {"stages": stages, "log_every_steps": 1, "max_steps_per_epoch": STEPS, **train_section}}
    if model is not None:
        sections["model"] = model
    config = tiny_config(root, out, optim={"lr": 0.05, "clip_grad_norm": 1.0}, **sections)
    Trainer(config, progress=False).fit()
    return out


@pytest.fixture(scope="module")
def umm_run(tiny_dataset, tmp_path_factory):
    """Softmax, then two epochs of L-Softmax with UMM margins (a refresh at the start of each)."""
    stages = [{"epochs": 1, "head": {"type": "softmax"}},
              {"epochs": 2, "head": {"type": "lsoftmax", "m": 3, "margin_source": "uncertainty",
                                     "lambda_base": 5.0, "lambda_min": 1.0}}]
    return train(tiny_dataset, tmp_path_factory.mktemp("umm") / "run", stages,
                 model={"depth": 18, "width": 0.125, "embedding_size": 32, "dropout": 0.5},
                 uncertainty={"passes": 4, "max_per_class": 3, "batch_size": 32, "refresh_every_epochs": 1})


@pytest.fixture(scope="module")
def clmle_run(tiny_dataset, tmp_path_factory):
    stages = [{"epochs": 1, "head": {"type": "softmax"}},
              {"epochs": 1, "head": {"type": "cosface", "s": 16.0, "m": 0.2},
               "loss": {"type": "clmle", "inter_margin": 0.3, "intra_margin": 0.1}}]
    return train(tiny_dataset, tmp_path_factory.mktemp("clmle") / "run", stages,
                 clusters={"cluster_size": 3, "refresh_every_steps": 2, "clusters_per_batch": 4,
                           "images_per_cluster": 3, "batch_size": 16})


@pytest.fixture(scope="module")
def arconvl_run(tiny_dataset, tmp_path_factory):
    return train(tiny_dataset, tmp_path_factory.mktemp("arconvl") / "run", [{"epochs": 1, "head": {"type": "arconvl"}}])


@pytest.fixture(scope="module")
def softmax_run(tiny_dataset, tmp_path_factory):
    return train(tiny_dataset, tmp_path_factory.mktemp("softmax") / "run", [{"epochs": 1, "head": {"type": "softmax"}}])


def check_common(summary, steps):
    assert set(summary) == SUMMARY_KEYS
    json.dumps(summary, allow_nan=False)  # plain JSON
    assert summary["schema"] == 1 and summary["steps"] == steps and summary["records"] == steps
    assert summary["log_every_steps"] == 1
    for key in ("loss", "accuracy"):
        assert set(summary[key]) == {"start", "end"} and all(math.isfinite(v) for v in summary[key].values())
    main = summary["clip"]["main"]
    assert main["records"] == steps and main["max_norm"] == 1.0
    factor = main["clip_factor"]
    assert set(factor) == {"start", "end", "min", "mean"}
    assert all(0 < value <= 1 for value in factor.values())
    assert factor["min"] <= factor["mean"] <= 1
    assert 0 <= main["clipped_fraction"] <= 1
    assert (main["clipped_fraction"] > 0) == (factor["min"] < 1)
    assert main["grad_norm"]["max"] >= main["grad_norm"]["mean"] > 0


def test_umm_run_shows_margins_spread_over_classes(umm_run):
    summary = mechanism_summary(umm_run)
    check_common(summary, 3 * STEPS)
    assert [s["head"] for s in summary["stages"]] == ["softmax", "lsoftmax"]
    assert summary["stages"][1]["margin_source"] == "uncertainty"
    margin = summary["margin_product"]
    assert margin["records"] == 2 * STEPS  # the L-Softmax stage only
    assert margin["lambda"]["start"] > margin["lambda"]["end"] >= 1.0  # annealing
    assert margin["margin_weight"]["start"] == pytest.approx(1 / (1 + margin["lambda"]["start"]))
    umm = summary["umm"]
    assert len(umm["refreshes"]) == 2 and [r["step"] for r in umm["refreshes"]] == [STEPS, 2 * STEPS]
    for refresh in umm["refreshes"]:
        assert sum(refresh["margins"].values()) == 12  # every class has a margin
        assert refresh["distinct_margins"] > 1  # the classes do not all share one margin
        assert refresh["views"] == "clean" and refresh["margin_map"] == "rank"
        assert -1 <= refresh["spearman"] <= 1
    assert umm["distinct_margins_max"] == 3
    assert umm["spearman"] == {"start": umm["refreshes"][0]["spearman"], "end": umm["refreshes"][1]["spearman"]}
    by_size = umm["last_refresh_by_class_size"]
    assert by_size["classes"] == 12 and by_size["images_max_rarer_half"] <= by_size["images_min_frequent_half"]
    assert 1 <= by_size["margin_mean_rarer_half"] <= 3
    assert summary["clmle"] is None and summary["arconvl"] is None


def test_clmle_run_shows_its_batch_mechanism(clmle_run):
    summary = mechanism_summary(clmle_run)
    check_common(summary, 2 * STEPS)
    assert summary["stages"][1]["loss"] == "clmle"
    clmle = summary["clmle"]
    assert clmle["records"] == STEPS  # the CLMLE stage only
    zero = clmle["zero_loss_fraction"]
    assert set(zero) == {"start", "end", "mean"} and all(0 <= v <= 1 for v in zero.values())
    assert all(0 <= v <= 1 for v in clmle["alone_fraction"].values())
    for key in ("own_cos_with", "own_cos_without"):
        assert all(v is None or -1 <= v <= 1 for v in clmle[key].values())
    assert clmle["distinct_images"]["end"] == 12  # 4 clusters x 3 images, drawn without replacement
    assert 1 <= clmle["clusters_per_batch"]["end"] <= 4
    assert clmle["cluster_refreshes"] >= 2  # on entering the stage, then every 2 steps
    # every tiny-set person has several images: no single-image share, and most images have a positive
    assert clmle["single_image_fraction"]["mean"] == 0.0
    assert 0.5 < clmle["positive_fraction"]["mean"] <= 1.0
    assert summary["margin_product"] is None and summary["umm"] is None and summary["arconvl"] is None


def test_arconvl_run_shows_radii_and_their_own_clip_group(arconvl_run):
    summary = mechanism_summary(arconvl_run)
    check_common(summary, STEPS)
    arconvl = summary["arconvl"]
    assert arconvl["radius_mean"]["start"] > 0 and arconvl["r_ben"]["start"] > 0
    assert arconvl["radius_over_r_ben"]["end"] == pytest.approx(arconvl["radius_mean"]["end"] / arconvl["r_ben"]["end"])
    radius = summary["clip"]["radius"]
    assert radius["max_norm"] is None and radius["clipped_fraction"] == 0  # radii unclipped by default
    assert list(summary["clip"]) == ["main", "radius"]


def test_softmax_run_gives_just_the_clip_part(softmax_run):
    summary = mechanism_summary(softmax_run)
    check_common(summary, STEPS)
    assert list(summary["clip"]) == ["main"]
    assert all(summary[key] is None for key in ("margin_product", "umm", "clmle", "arconvl"))


def test_markdown_is_one_table_with_a_row_per_run(umm_run, clmle_run, arconvl_run, softmax_run):
    rows = [(name, mechanism_summary(run)) for name, run in
            (("umm", umm_run), ("clmle", clmle_run), ("arconvl", arconvl_run), ("a|b", softmax_run))]
    text = mechanism_markdown(rows)
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows)
    assert all(line.count(" | ") == 3 for line in table[2:])  # four cells; the label's | is escaped
    umm, clmle, arconvl, softmax = table[2:]
    assert umm.startswith("| umm |") and "UMM margins m1:" in umm and "Spearman" in umm and "1/(1+λ)" in umm
    assert "zero-loss fraction" in clmle and "own-centroid" in clmle
    assert "% of images with another of their identity in the batch, 0 % from single-image people" in clmle
    assert "mean radius" in arconvl and "R_ben" in arconvl and "radius " in arconvl
    assert softmax.startswith("| a\\|b |") and "no mechanism of its own" in softmax and "main " in softmax
    for column in ("**run**", "**stages**", "**mechanism**", "**clip factor**"):
        assert column in text  # a sentence on how to read each column


def test_folder_without_metrics_is_a_user_error(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(MechanismSummaryError, match="no metrics.jsonl") as caught:
        mechanism_summary(tmp_path)
    assert isinstance(caught.value, FacepipeUserError)
    with pytest.raises(MechanismSummaryError, match="no such folder"):
        mechanism_summary(tmp_path / "missing")


def test_log_without_training_steps_is_a_user_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"event": "start", "step": 0}) + "\n")
    with pytest.raises(MechanismSummaryError, match="no training step"):
        mechanism_summary(tmp_path)


def test_resumed_steps_count_once_and_nan_becomes_none(tmp_path):
    def step(number, loss, norm, factor):
        return {"event": "train", "step": number, "loss": loss, "accuracy": 0.1, "grad_norm_main": norm,
                "clip_factor_main": factor}

    records = [step(1, 2.0, 2.0, 0.5), step(2, 1.5, 1.0, 1.0),
               step(2, 1.4, 0.5, 1.0),  # resumed from the checkpoint of step 1: step 2 again, then 3
               {"event": "uncertainty", "step": 3, "spearman_uncertainty_vs_count": float("nan"),
                "margins": {"1": 12}},
               step(3, 1.0, 0.8, 1.0)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"event": "tr')
    summary = mechanism_summary(tmp_path)
    json.dumps(summary, allow_nan=False)
    assert summary["steps"] == 3 and summary["records"] == 3
    assert summary["loss"] == {"start": 2.0, "end": 1.0}
    assert summary["clip"]["main"]["clipped_fraction"] == pytest.approx(1 / 3)
    assert summary["clip"]["main"]["grad_norm"]["mean"] == pytest.approx((2.0 + 0.5 + 0.8) / 3)
    assert summary["stages"] is None and summary["clip"]["main"]["max_norm"] is None  # no config.yaml
    (refresh,) = summary["umm"]["refreshes"]
    assert refresh["spearman"] is None and refresh["distinct_margins"] == 1
    assert "(1 refresh)" in mechanism_markdown([("run", summary)])
