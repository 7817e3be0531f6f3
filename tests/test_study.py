"""facepipe.study: the study spec's checks, an end-to-end tiny study (pre-training, softmax over two
seeds, a CosFace sweep, a method taking the sweep's choice, readouts, kept results, fp16
backbones, resume and restore, the report and its README section, the CLI), and the statistics
it rests on (facepipe.eval.bootstrap, facepipe.eval.closed_set)."""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import facepipe.study.readouts as readouts_module
import facepipe.train
from facepipe.config import ConfigError
from facepipe.eval.bootstrap import bootstrap_weights, paired_difference, weighted_tar_at_far
from facepipe.eval.closed_set import closed_set_identify, group_recall
from facepipe.study.runner import StudyError, StudyRunner, config_differences
from facepipe.study.spec import StudyRun, expand_stages, load_method_table, load_study_spec, shorten_stages, slug

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Data: identities as colour patterns (told apart better than chance by any embedding, not
# perfectly: the readouts are not all 0 or 100 %), PNG files
# ---------------------------------------------------------------------------------------------
SHARED_PATTERN = np.random.default_rng(999).integers(0, 256, (4, 4, 3))


def identity_images(folder: Path, pattern_seed: int, count: int, names=None) -> None:
    """``count`` 32x32 PNGs of one identity: a 4x4 colour grid (30 % its own, seeded, 70 % shared by
    every identity), upsampled, with per-image noise."""
    rng = np.random.default_rng(pattern_seed)
    base = np.kron(0.7 * SHARED_PATTERN + 0.3 * rng.integers(0, 256, (4, 4, 3)), np.ones((8, 8, 1)))
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        noise = np.random.default_rng([pattern_seed, k]).normal(0, 40, base.shape)
        name = names[k] if names else f"{k + 1}.png"
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(folder / name)


def lfw_person(root: Path, name: str, pattern_seed: int, count: int) -> None:
    identity_images(root / name, pattern_seed, count, [f"{name}_{k + 1:04d}.png" for k in range(count)])


DEV_PEOPLE = [f"Dev_{chr(ord('A') + k)}" for k in range(10)]  # 10 DevTest people, 3 images each
DISTRACTORS = {f"Other_{k}": 1 + k % 2 for k in range(6)}  # other LFW people (1-2 images)


def dev_test_pairs_text() -> str:
    """LFW View 1: 10 matched pairs (one per DevTest person), then 10 mismatched (each with the next)."""
    lines = ["10"]
    lines += [f"{p}\t1\t{2 + k % 2}" for k, p in enumerate(DEV_PEOPLE)]
    lines += [f"{p}\t{1 + k % 3}\t{DEV_PEOPLE[(k + 1) % 10]}\t{1 + (k + 1) % 3}" for k, p in enumerate(DEV_PEOPLE)]
    return "\n".join(lines) + "\n"


BASE_CONFIG = {
    "seed": 0,
    "output_dir": "unused",
    "data": {"root": "unused", "image_size": [32, 32], "batch_size": 8, "num_workers": 0},
    "model": {"depth": 18, "width": 0.125, "embedding_size": 32, "dropout": 0.0},
    "optim": {"lr": 0.05},
    "scheduler": {"name": "cosine", "warmup_epochs": 0},
    "train": {"stages": [{"epochs": 1, "head": {"type": "softmax"}}], "max_steps_per_epoch": 2,
              "log_every_steps": 1, "device": "cpu"},
    "embed": {"batch_size": 64, "flip": "none"},
}


def method_table() -> dict:
    cosface = {"epochs": 1, "head": {"type": "cosface", "s": 16.0, "m": 0.2}}
    return {
        "softmax": {"label": "Softmax (continued)", "seeds": [0, 1],
                    "stages": [{"epochs": 1, "head": {"type": "softmax"}}]},
        "cosface": {"label": "CosFace tiny", "seeds": [0], "stages": [cosface],
                    # The second setting wins on these data (listed second: a tie would pick the first).
                    "sweep": {"m 0.1": ["train.stages.*.head.m=0.1"],
                              "m 0.4, lr 1": ["train.stages.*.head.m=0.4", "optim.lr=1.0"]}},
        "arcface": {"label": "ArcFace with the CosFace m", "seeds": [0], "sweep_from": "cosface",
                    "stages": [{"epochs": 1, "head": {"type": "arcface", "s": 16.0, "m": 0.3}}]},
    }


def write_spec(folder: Path, base: Path, data: dict, methods: dict | None = None, name: str = "spec.yaml",
               **top) -> Path:
    spec = {"name": "tiny", "title": "Tiny study", "base_config": str(base), "root": str(folder / "study"),
            "results": str(folder / "results"), "readme_section": "study-tiny", "data": data,
            "readouts": {"bootstrap": 100, "knc_cluster_size": 3, "groups": {"head": 8, "middle": 4},
                         "compare_to": ["softmax", "cosface"]},
            "finetune": {"epochs": 1, "overrides": ["optim.lr=0.02"]},
            "methods": methods if methods is not None else method_table(), **top}
    path = folder / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def write_base(folder: Path, validation_pairs: str) -> Path:
    config = json.loads(json.dumps(BASE_CONFIG))
    config["train"]["validation"] = {"pairs": validation_pairs}
    path = folder / "base.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def paper_data(folder: Path) -> dict:
    """Data paths of a spec whose folders need not exist (the spec only loads configs)."""
    return {"train": str(folder / "train"), "val_pairs": str(folder / "val" / "pairs.txt")}


# ---------------------------------------------------------------------------------------------
# 1. Spec checks
# ---------------------------------------------------------------------------------------------
def test_stages_must_add_up_to_finetune_epochs(tmp_path):
    base = write_base(tmp_path, str(tmp_path / "val" / "pairs.txt"))
    methods = method_table()
    methods["cosface"]["stages"] = [dict(methods["cosface"]["stages"][0], epochs=2)]
    with pytest.raises(ConfigError, match=r"method cosface: its stages train 2 epochs, not finetune.epochs = 1"):
        load_study_spec(write_spec(tmp_path, base, paper_data(tmp_path), methods))
    # A stage without epochs counts 0 and is refused the same way.
    methods = method_table()
    methods["softmax"]["stages"] = [{"head": {"type": "softmax"}}]
    with pytest.raises(ConfigError, match=r"method softmax: its stages train 0 epochs"):
        load_study_spec(write_spec(tmp_path, base, paper_data(tmp_path), methods))


def test_sweep_from_must_name_a_method_with_a_sweep(tmp_path):
    base = write_base(tmp_path, str(tmp_path / "val" / "pairs.txt"))
    methods = method_table()
    methods["arcface"]["sweep_from"] = "softmax"
    with pytest.raises(ConfigError, match=r"method arcface: sweep_from 'softmax' is not a method with a sweep"):
        load_study_spec(write_spec(tmp_path, base, paper_data(tmp_path), methods))
    methods["arcface"]["sweep_from"] = "nosuch"
    with pytest.raises(ConfigError, match=r"sweep_from 'nosuch'"):
        load_study_spec(write_spec(tmp_path, base, paper_data(tmp_path), methods))


def write_method_table(folder: Path, base: Path, methods: dict, **top) -> Path:
    path = folder / "methods.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "title": "T", "base_config": str(base), "methods": methods, **top},
                                   sort_keys=False), encoding="utf-8")
    return path


def test_a_method_table_gives_each_method_its_overrides_over_the_base_config(tmp_path):
    base = write_base(tmp_path, str(tmp_path / "val" / "pairs.txt"))
    methods = {
        # no stages: the base config's stage, changed by overrides (the MNIST reproduction's form)
        "la": {"label": "LA", "seeds": [0], "overrides": ["train.stages.0.head={type: cosface, s: 8.0, m: 0.1}"],
               "published": {"MNIST-10": [98.5, 0.1]}},
        "two": {"label": "Two stages", "seeds": [0, 1], "superseded": "ran before a fix",
                "stages": [{"epochs": 2, "head": {"type": "softmax"}}, {"epochs": 2, "head": {"type": "arcface"}}],
                "overrides": ["train.stages.*.bn=frozen"]},
    }
    table = load_method_table(write_method_table(tmp_path, base, methods, epochs=4))
    from facepipe.config import load_config
    la = load_config(table.base(), table.method_overrides("la"))
    assert [stage.epochs for stage in la.train.stages] == [1] and la.train.stages[0].head.type == "cosface"
    assert la.train.stages[0].head.m == pytest.approx(0.1)
    two = load_config(table.base(), table.method_overrides("two"))
    assert [(s.epochs, s.head.type, s.bn) for s in two.train.stages] == [(2, "softmax", "frozen"), (2, "arcface", "frozen")]
    assert table.methods["la"].published == {"MNIST-10": [98.5, 0.1]} and table.methods["two"].superseded
    # shortened, same shape: 2 + 2 -> 1 + 1 over 2 epochs
    short = load_config(table.base(), table.method_overrides("two", epochs=2))
    assert [s.epochs for s in short.train.stages] == [1, 1]
    # the epochs check names the table's key, and a bad override names the method
    methods["two"]["stages"][1]["epochs"] = 3
    with pytest.raises(ConfigError, match=r"method two: its stages train 5 epochs, not epochs = 4"):
        load_method_table(write_method_table(tmp_path, base, methods, epochs=4))
    methods["two"]["stages"][1]["epochs"] = 2
    methods["la"]["overrides"] = ["train.stages.0.head.nosuchkey=1"]
    with pytest.raises(ConfigError, match=r"methods.yaml, method la: "):
        load_method_table(write_method_table(tmp_path, base, methods, epochs=4))


def test_a_study_method_must_give_its_stages(tmp_path):
    base = write_base(tmp_path, str(tmp_path / "val" / "pairs.txt"))
    methods = method_table()
    del methods["softmax"]["stages"]
    with pytest.raises(ConfigError, match=r"method softmax: give its stages"):
        load_study_spec(write_spec(tmp_path, base, paper_data(tmp_path), methods))


def test_shorten_stages_keeps_the_proportions_and_scales_the_drw_start():
    umm_sum = [{"name": "UMM", "epochs": 5}, {"name": "UMM + SUM", "epochs": 5, "sample_uncertainty": True}]
    assert [s["epochs"] for s in shorten_stages(umm_sum, 4)] == [2, 2]
    assert [s["epochs"] for s in shorten_stages(umm_sum, 3)] == [2, 1]  # round half to even: 1.5 -> 2
    assert shorten_stages(umm_sum, 4)[1]["sample_uncertainty"] is True and umm_sum[0]["epochs"] == 5  # a copy
    drw = [{"epochs": 10, "drw": {"start_epoch": 6}}]
    assert shorten_stages(drw, 4) == [{"epochs": 4, "drw": {"start_epoch": 2}}]
    assert shorten_stages(drw, 20) == [{"epochs": 20, "drw": {"start_epoch": 12}}]
    with pytest.raises(ValueError, match="1 epochs cannot hold 2 stages"):
        shorten_stages(umm_sum, 1)


@pytest.mark.parametrize("name", ["lfw_first", "mnist_li"])
def test_the_kept_studies_method_tables_load(name):
    table = load_method_table(REPO / "configs" / "studies" / f"{name}.yaml")
    assert table.name == name and len(table.methods) >= 4


def test_a_sweep_setting_that_does_not_validate_is_refused_naming_it(tmp_path):
    base = write_base(tmp_path, str(tmp_path / "val" / "pairs.txt"))
    methods = method_table()
    methods["cosface"]["sweep"]["m 0.4, lr 1"] = ["train.stages.*.head.nosuchkey=1"]
    with pytest.raises(ConfigError, match=r"method cosface setting 'm 0.4, lr 1'"):
        load_study_spec(write_spec(tmp_path, base, paper_data(tmp_path), methods))


def test_expand_stages_and_slug():
    assert expand_stages(["train.stages.*.head.m=4", "optim.lr=0.1"], 3) == [
        "train.stages.0.head.m=4", "train.stages.1.head.m=4", "train.stages.2.head.m=4", "optim.lr=0.1"]
    assert expand_stages(["train.stages.1.head.m=4"], 3) == ["train.stages.1.head.m=4"]
    assert expand_stages([], 2) == []
    name = slug("l 5, a1 0.3")
    assert name == "l-5_a1-0.3"
    for text in ("l 5, a1 0.3, a2 0.1", "m_max 2", "a/b: c*d", "  ", "../x"):
        s = slug(text)
        assert s and s not in (".", "..") and "/" not in s and "\\" not in s and " " not in s
        assert all(c.isalnum() or c in "._-" for c in s)
    assert slug("l 5, a1 0.3, a2 0.1") != slug("l 5, a1 0.5, a2 0.2")


def test_longtail_spec_validates_and_umm_sum_inherits_the_umm_m(monkeypatch):
    monkeypatch.chdir(REPO)  # the spec's paths are relative to the repository
    spec = load_study_spec(REPO / "configs" / "studies" / "longtail.yaml")
    assert "umm_sum" in spec.methods and spec.methods["umm_sum"].sweep_from == "umm"
    for setting, overrides in spec.methods["umm"].sweep.items():
        config = spec.run_config(StudyRun("umm_sum", "", 0), overrides)
        ms = [stage.head.m for stage in config.train.stages]
        expected = 3 if not overrides else int(overrides[0].rpartition("=")[2])
        assert len(ms) == 2 and ms == [expected, expected], (setting, ms)
        assert config.train.total_epochs == spec.finetune.epochs
        assert config.train.init_from == str(spec.pretrain_dir(0) / "init.pt")
    # Every run of every method validates (seed 0 of each setting, and the other seeds).
    for key, method in spec.methods.items():
        for run in spec.runs(key):
            run = run if run.setting is not None else StudyRun(key, next(iter(method.sweep)), run.seed)
            config = spec.run_config(run)
            assert config.train.total_epochs == spec.finetune.epochs
            assert config.seed == run.seed and str(spec.run_dir(run)) == config.output_dir


# ---------------------------------------------------------------------------------------------
# 3. Resume: a run folder started with another config is refused
# ---------------------------------------------------------------------------------------------
def test_config_differences_ignores_volatile_keys():
    a = {"data": {"num_workers": 2, "batch_size": 8}, "optim": {"lr": 0.1}, "output_dir": "x"}
    b = {"data": {"num_workers": 0, "batch_size": 8}, "optim": {"lr": 0.2}, "output_dir": "y"}
    assert config_differences(a, b) == ["optim.lr"]
    assert config_differences(a, {**a, "extra": {"k": 1}}) == ["extra.k"]
    assert config_differences(a, a) == []


class _Constructed(Exception):
    pass


def test_resume_with_another_config_is_refused_naming_the_key(tmp_path, monkeypatch):
    base = write_base(tmp_path, str(tmp_path / "val" / "pairs.txt"))
    spec = load_study_spec(write_spec(tmp_path, base, paper_data(tmp_path)))
    runner = StudyRunner(spec)
    run = StudyRun("softmax", "", 0)
    config = spec.run_config(run)
    run_dir = spec.run_dir(run)
    run_dir.mkdir(parents=True)
    (run_dir / "latest.pt").write_bytes(b"not read before the check")
    previous = config.to_dict()
    previous["optim"]["lr"] = 0.5
    previous["data"]["num_workers"] = 3
    (run_dir / "config.yaml").write_text(yaml.safe_dump(previous), encoding="utf-8")

    def trainer(*args, **kwargs):
        raise _Constructed(kwargs)

    monkeypatch.setattr(facepipe.train, "Trainer", trainer)
    with pytest.raises(StudyError, match=r"another config \(differs in \['optim.lr'\]\)") as error:
        runner._train(config, run.label())
    assert "num_workers" not in str(error.value)
    # Only a volatile key differs: the run resumes (the trainer is constructed with resume=True).
    previous["optim"]["lr"] = config.optim.lr
    (run_dir / "config.yaml").write_text(yaml.safe_dump(previous), encoding="utf-8")
    with pytest.raises(_Constructed) as constructed:
        runner._train(config, run.label())
    assert constructed.value.args[0] == {"resume": True, "progress": False}


def test_chosen_setting_is_the_best_validation_ties_to_the_first(tmp_path):
    base = write_base(tmp_path, str(tmp_path / "val" / "pairs.txt"))
    spec = load_study_spec(write_spec(tmp_path, base, paper_data(tmp_path)))
    runner = StudyRunner(spec)

    def finish(setting, value):
        folder = spec.run_dir(StudyRun("cosface", setting, 0))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "study_result.json").write_text(json.dumps({"validation_best": value}))

    finish("m 0.1", 0.75)
    assert runner.chosen_setting("cosface") is None  # a setting still pending
    assert runner.resolve(StudyRun("arcface", "", 0)) is None  # sweep_from waits for it
    assert runner.resolve(StudyRun("cosface", None, 1)) is None
    finish("m 0.4, lr 1", 0.8)
    assert runner.chosen_setting("cosface") == "m 0.4, lr 1"
    run, inherited, inherited_setting = runner.resolve(StudyRun("arcface", "", 0))
    assert inherited == ["train.stages.*.head.m=0.4", "optim.lr=1.0"] and inherited_setting == "m 0.4, lr 1"
    assert runner.resolve(StudyRun("cosface", None, 1))[0] == StudyRun("cosface", "m 0.4, lr 1", 1)
    finish("m 0.4, lr 1", 0.75)
    assert runner.chosen_setting("cosface") == "m 0.1"  # a tie: the setting listed first
    assert runner.chosen_setting("softmax") == ""


# ---------------------------------------------------------------------------------------------
# 2. End-to-end tiny study
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    from facepipe.data.merge import merge_identity_sources

    # Sources: a head (4 people, 12 images each) and a tail (12 people, 2-6 images each).
    for k in range(4):
        identity_images(folder / "src_head" / f"Head_{k}", 100 + k, 12)
    for k in range(12):
        identity_images(folder / "src_tail" / f"Tail_{k:02d}", 200 + k, 2 + k % 5)
    data = folder / "data"
    # Relative source paths: merge orders the probe images by a hash of their path as given, so the
    # same split (and so the same numbers) wherever the temporary folder is.
    with contextlib.chdir(folder):
        merge_identity_sources([Path("src_head"), Path("src_tail")], data / "train", val_fraction=0.25, seed=0,
                               val_pairs=12, val_out=data / "val", probe_fraction=0.25, probe_out=data / "probes")
    # LFW-like tree: DevTest people (3 images each) and other people as distractors, .png files.
    lfw = folder / "lfw"
    for k, person in enumerate(DEV_PEOPLE):
        lfw_person(lfw, person, 300 + k, 3)
    for k, (person, count) in enumerate(DISTRACTORS.items()):
        lfw_person(lfw, person, 400 + k, count)
    dev = folder / "pairsDevTest.txt"
    dev.write_text(dev_test_pairs_text(), encoding="utf-8")
    base = write_base(folder, str(data / "val" / "pairs.txt"))
    spec_path = write_spec(folder, base, {
        "train": str(data / "train"), "val_pairs": str(data / "val" / "pairs.txt"), "probes": str(data / "probes"),
        "lfw_images": str(lfw), "dev_test_pairs": str(dev), "head_source": str(folder / "src_head")})
    spec = load_study_spec(spec_path)
    counts = StudyRunner(spec).run_all()
    return {"folder": folder, "spec_path": spec_path, "spec": spec, "counts": counts}


def kept(spec, *parts) -> Path:
    return Path(spec.results).joinpath("runs", *parts)


SETTINGS = ("m 0.1", "m 0.4, lr 1")


def test_study_runs_everything_and_keeps_results(study):
    spec, counts = study["spec"], study["counts"]
    assert counts == {"finished": 5, "deferred": 0, "claimed_elsewhere": 0}
    runner = StudyRunner(spec)
    # The sweep: the setting with the higher validation_best on seed 0.
    scores = {s: json.loads((kept(spec, "cosface", slug(s), "seed0") / "study_result.json").read_text())["validation_best"]
              for s in SETTINGS}
    assert all(isinstance(v, float) and 0 <= v <= 1 for v in scores.values())
    assert scores[SETTINGS[0]] != scores[SETTINGS[1]], scores  # the data make them differ
    chosen = max(SETTINGS, key=scores.get)
    assert runner.chosen_setting("cosface") == chosen
    # sweep_from: ArcFace runs with the chosen CosFace setting's overrides on its stage.
    arc = json.loads((kept(spec, "arcface", "seed0") / "study_result.json").read_text())
    assert arc["inherited_setting"] == chosen and arc["setting"] == ""
    m = float(chosen.split(",")[0].split()[1])
    assert arc["config"]["train"]["stages"][0]["head"]["m"] == m
    assert arc["config"]["optim"]["lr"] == (1.0 if "lr 1" in chosen else 0.02)
    assert arc["config"]["train"]["stages"][0]["head"]["type"] == "arcface"
    cos = json.loads((kept(spec, "cosface", slug(chosen), "seed0") / "study_result.json").read_text())
    assert cos["config"]["train"]["stages"][0]["head"]["m"] == m and cos["validation_best"] == max(scores.values())
    assert arc["config"]["train"]["init_from"] == str(spec.pretrain_dir(0) / "init.pt")
    # Kept files of every run (no checkpoints in the kept results but the pre-training's init.pt).
    # The sweep setting the validation people did not choose is trained and summarised, never read
    # out on the test sets.
    other = next(s for s in SETTINGS if s != chosen)
    folders = [kept(spec, "pretrain", "seed0"), kept(spec, "softmax", "seed0"), kept(spec, "softmax", "seed1"),
               kept(spec, "cosface", slug(chosen), "seed0"), kept(spec, "cosface", slug(other), "seed0"),
               kept(spec, "arcface", "seed0")]
    for f in folders:
        read_out = f != kept(spec, "cosface", slug(other), "seed0")
        for name in ("study_result.json", "train_done.json", "mechanisms.json", "metrics.jsonl", "config.yaml"):
            assert (f / name).is_file(), f / name
        for name in ("readouts.json", "readouts.npz"):
            assert (f / name).is_file() == read_out, f / name
        record = json.loads((f / "study_result.json").read_text())
        assert record.get("readouts", "done") == ("done" if read_out else "pending")
        assert (record["readout_seconds"] is not None) == read_out
        assert [p.name for p in f.glob("*.pt")] == (["init.pt"] if f.parent.name == "pretrain" else [])
    softmax1 = json.loads((kept(spec, "softmax", "seed1") / "study_result.json").read_text())
    assert softmax1["seed"] == 1 and softmax1["config"]["seed"] == 1
    assert softmax1["config"]["optim"]["lr"] == 0.02  # the finetune overrides
    assert (Path(spec.results) / "data" / "train_counts.json").is_file()


def test_readouts_have_every_protocol_in_range(study):
    spec = study["spec"]
    chosen = StudyRunner(spec).chosen_setting("cosface")
    for f in (kept(spec, "softmax", "seed0"), kept(spec, "cosface", slug(chosen), "seed0")):
        record = json.loads((f / "readouts.json").read_text())
        assert {"validation", "devtest", "megaface", "closed_set"} <= set(record)
        assert 0 <= record["validation"]["accuracy"] <= 1 and record["validation"]["pairs"] >= 2
        dev = record["devtest"]
        for key in ("cv10_accuracy", "accuracy_at_val_threshold", "auc", "tar_at_far_0.001"):
            assert 0 <= dev[key] <= 1, key
        mf = record["megaface"]
        assert mf["probe_identities"] == 10 and mf["probe_images"] == 30
        assert mf["distractors"] == sum(DISTRACTORS.values())
        assert all(0 <= v <= 1 for v in mf["rank1"].values()) and mf["rank1"]
        assert all(v is None or 0 <= v <= 1 for v in mf["tar_at_far"].values())
        cs = record["closed_set"]
        assert cs["probes"] > 0 and cs["rule_order"][0] == "1-NN"
        for rule in cs["rules"].values():
            assert all(v is None or 0 <= v <= 1 for v in rule.values())
            assert rule["all"] is not None
        assert cs["head_source_identities_in_head"] >= 1  # the Head_* people (12 images, 9 left for training)
        with np.load(f / "readouts.npz") as arrays:
            assert len(arrays["devtest_scores"]) == 20 and arrays["devtest_is_same"].sum() == 10
        # The colour patterns: the embeddings tell people apart better than chance (12 training people).
        assert dev["auc"] > 0.6 and cs["rules"]["1-NN"]["all"] > 1 / 12


def test_fp16_backbones_load_and_embed_like_best_pt(study):
    from facepipe.embed.extract import embed_paths, list_images
    from facepipe.models.loaded import load_model

    spec = study["spec"]
    chosen = StudyRunner(spec).chosen_setting("cosface")
    paths = [p for p, _ in list_images(spec.data.probes)][:16]
    for method, setting in (("softmax", ""), ("cosface", chosen), ("arcface", "")):
        backbone = Path(spec.results) / "backbones" / f"{method}.pt"
        assert backbone.is_file(), backbone
        best = spec.run_dir(StudyRun(method, setting, 0)) / "best.pt"
        small, _ = embed_paths(load_model(backbone), paths, device="cpu")
        full, _ = embed_paths(load_model(best), paths, device="cpu")
        assert np.abs(small - full).max() < 2e-2
        assert (np.sum(small * full, axis=1) > 0.999).all()
    # The CosFace backbone is the chosen setting's, not the other one's.
    other = next(s for s in SETTINGS if s != chosen)
    small, _ = embed_paths(load_model(Path(spec.results) / "backbones" / "cosface.pt"), paths, device="cpu")
    rest, _ = embed_paths(load_model(spec.run_dir(StudyRun("cosface", other, 0)) / "best.pt"), paths, device="cpu")
    assert np.abs(small - rest).max() > 2e-2


def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a finished study trained again")

    monkeypatch.setattr(facepipe.train, "Trainer", refuse)
    monkeypatch.setattr(readouts_module, "compute_readouts", refuse)


def test_second_run_all_trains_nothing(study, monkeypatch):
    no_training(monkeypatch)
    assert StudyRunner(study["spec"]).run_all() == {"finished": 5, "deferred": 0, "claimed_elsewhere": 0}


def test_chosen_sweep_readouts_left_undone_by_a_stop_run_on_the_next_start(study, monkeypatch):
    """A process stopped after the last sweep setting trained but before the chosen one's readouts:
    the next run_all reads the chosen setting out (same numbers), trains nothing, and leaves the
    losing setting without readouts."""
    spec = study["spec"]
    runner = StudyRunner(spec)
    chosen = runner.chosen_setting("cosface")
    run = StudyRun("cosface", chosen, 0)
    before = json.loads((kept(spec, "cosface", slug(chosen), "seed0") / "readouts.json").read_text())
    for folder in (spec.run_dir(run), kept(spec, "cosface", slug(chosen), "seed0")):
        for name in ("readouts.json", "readouts.npz"):
            (folder / name).unlink()
        record = json.loads((folder / "study_result.json").read_text())
        (folder / "study_result.json").write_text(json.dumps({**record, "readouts": "pending", "readout_seconds": None}))
    backbone = Path(spec.results) / "backbones" / "cosface.pt"
    backbone.unlink()
    monkeypatch.setattr(facepipe.train, "Trainer", lambda *a, **k: pytest.fail("trained again"))
    calls = []
    real = readouts_module.compute_readouts
    monkeypatch.setattr(readouts_module, "compute_readouts", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    assert runner.run_all() == {"finished": 5, "deferred": 0, "claimed_elsewhere": 0}
    assert calls == [spec.run_dir(run)]
    after = json.loads((kept(spec, "cosface", slug(chosen), "seed0") / "readouts.json").read_text())
    timings = ("seconds", "embed_seconds")
    assert {k: v for k, v in after.items() if k not in timings} == {k: v for k, v in before.items() if k not in timings}
    assert json.loads((spec.run_dir(run) / "study_result.json").read_text())["readouts"] == "done"
    assert backbone.is_file()
    other = next(s for s in SETTINGS if s != chosen)
    assert not (kept(spec, "cosface", slug(other), "seed0") / "readouts.json").is_file()


def test_an_interrupted_invocation_counts_until_the_runs_last_write(study, tmp_path):
    """The training time of a run stopped and resumed: the stopped invocation (left open in
    study_timing.json) is closed by the next at the time of the run's last log line or checkpoint."""
    import os
    import time

    from facepipe.config import config_from_dict
    from facepipe.study.runner import train_timed

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    started = time.time() - 100.0
    (run_dir / "study_timing.json").write_text(json.dumps({"invocations": [{"started": started, "open": True}]}))
    (run_dir / "metrics.jsonl").write_text("")
    os.utime(run_dir / "metrics.jsonl", (started + 60.0, started + 60.0))  # its last write: 60 s in
    config = config_from_dict(study["spec"].pretrain_config(0).to_dict(), [f"output_dir={run_dir}"])
    _, timing = train_timed(config, "interrupted")
    invocations = json.loads((run_dir / "study_timing.json").read_text())["invocations"]
    assert [i["open"] for i in invocations] == [False, False] and invocations[0]["interrupted"]
    assert invocations[0]["seconds"] == pytest.approx(60.0, abs=0.01)
    assert timing["train_seconds"] == pytest.approx(60.0 + invocations[1]["seconds"])
    assert timing["invocations"] == 2


def test_fresh_checkout_restores_finished_runs_from_kept_results(study, tmp_path, monkeypatch):
    """The study folder (checkpoints) gone, the kept results there: status and run_all restore every
    run without training."""
    spec = study["spec"]
    results = tmp_path / "results"
    shutil.copytree(spec.results, results)
    fresh = spec.model_copy(update={"root": str(tmp_path / "study"), "results": str(results)})
    no_training(monkeypatch)
    runner = StudyRunner(fresh)
    lines = runner.status_lines()
    assert len(lines) == 6 and lines[0] == "pretrain seed 0: finished"
    assert all(": finished (validation " in line for line in lines[1:]), lines
    assert runner.run_all() == {"finished": 5, "deferred": 0, "claimed_elsewhere": 0}
    for run in (StudyRun("softmax", "", 1), StudyRun("arcface", "", 0)):
        assert (fresh.run_dir(run) / "study_result.json").is_file()
        assert (fresh.run_dir(run) / "readouts.json").is_file()
    # The pre-training's init.pt (best.pt's model and head) is kept and restored: a run that still
    # needs training starts from the very same weights as in the first checkout.
    import torch

    restored = torch.load(fresh.pretrain_dir(0) / "init.pt", map_location="cpu", weights_only=False)
    original = torch.load(spec.pretrain_dir(0) / "best.pt", map_location="cpu", weights_only=False)
    assert all(torch.equal(restored["model"][k], original["model"][k]) for k in original["model"])
    # Without the kept weights, a run that still needs training says so clearly.
    (fresh.pretrain_dir(0) / "init.pt").unlink()
    (results / "runs" / "pretrain" / "seed0" / "init.pt").unlink()
    (results / "runs" / "softmax" / "seed1" / "study_result.json").unlink()
    (fresh.run_dir(StudyRun("softmax", "", 1)) / "study_result.json").unlink()
    with pytest.raises(StudyError, match=r"pretrain seed 0: finished in another checkout, but its weights .*init.pt"):
        runner.run_all()


def test_report_tables_plots_and_readme_section(study, tmp_path):
    from facepipe.study.report import write_report

    spec = study["spec"]
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nintro\n\n<!-- study-tiny:start -->\nold table\n<!-- study-tiny:end -->\n\n"
                      "## After\n\nkept text\n", encoding="utf-8")
    summary = write_report(spec, readme=readme)
    results = Path(spec.results)
    report = (results / "report.md").read_text()
    for label in ("Softmax (continued)", "CosFace tiny", "ArcFace with the CosFace m", "Pre-training only"):
        assert label in report
    assert "### LFW DevTest" in report and "### Paired differences against Softmax (continued)" in report
    # 10 impostor pairs cannot measure FAR 1e-3: the report says what that TAR rests on
    assert "TAR @ FAR 1e-3 on DevTest rests on 10 impostor pairs" in report and "1/10 = 1e-1" in report
    assert "### Sweeps" in report and "chosen" in report
    import re

    assert re.search(r"\d+\.\d\d(?: ± \d+\.\d\d)? \[\d+\.\d\d, \d+\.\d\d\]", report)  # bracketed intervals
    record = json.loads((results / "report.json").read_text())
    assert record["bootstrap"] == 100
    assert set(record["methods"]) == {"pretrain", "softmax", "cosface", "arcface"}
    assert record["methods"]["softmax"]["seeds"] == [0, 1]
    cv = record["methods"]["softmax"]["metrics"]["cv10"]
    assert cv["ci95"][0] <= cv["mean"] <= cv["ci95"][1] and len(cv["per_seed"]) == 2
    assert set(record["paired"]) == {"softmax", "cosface"}
    assert set(record["paired"]["softmax"]) == {"pretrain", "cosface", "arcface"}
    assert set(record["paired"]["cosface"]) == {"pretrain", "softmax", "arcface"}
    d = record["paired"]["softmax"]["cosface"]["cv10"]
    assert d["ci95"][0] <= d["ci95"][1] and 0 < d["p"] <= 1
    # Against itself reversed: the difference changes sign.
    assert record["paired"]["cosface"]["softmax"]["cv10"]["difference"] == pytest.approx(-d["difference"])
    for plot in ("class_sizes.png", "recall_by_class_size.png"):
        assert (results / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "report.md" in summary
    text = readme.read_text()
    assert text.startswith("# Title\n\nintro\n\n<!-- study-tiny:start -->\n")
    assert text.endswith("<!-- study-tiny:end -->\n\n## After\n\nkept text\n")
    assert "old table" not in text and report in text
    # Twice: the same README (the section replaced, not appended).
    write_report(spec, readme=readme)
    assert readme.read_text() == text
    bare = tmp_path / "bare.md"
    bare.write_text("# No markers\n", encoding="utf-8")
    with pytest.raises(StudyError, match=r"needs exactly one '<!-- study-tiny:start -->' \.\.\. "
                                         r"'<!-- study-tiny:end -->' pair"):
        write_report(spec, readme=bare)
    assert bare.read_text() == "# No markers\n"


# ---------------------------------------------------------------------------------------------
# 4. The CLI
# ---------------------------------------------------------------------------------------------
def test_cli_status_and_report(study, capsys, monkeypatch):
    from facepipe.cli import main

    no_training(monkeypatch)
    assert main(["study", "status", str(study["spec_path"])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6 and lines[0] == "pretrain seed 0: finished"
    assert sum("finished (validation" in line for line in lines) == 5
    assert lines[1].startswith("softmax seed 0:")
    assert main(["study", "report", str(study["spec_path"])]) == 0
    assert "study tiny: 4 methods" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# 5. Bootstrap and closed-set statistics
# ---------------------------------------------------------------------------------------------
def test_bootstrap_weights_sum_to_n_and_repeat_by_seed():
    w = bootstrap_weights(7, 50, seed=3)
    assert w.shape == (50, 7) and (w.sum(axis=1) == 7).all() and (w >= 0).all()
    assert np.array_equal(w, bootstrap_weights(7, 50, seed=3))
    assert not np.array_equal(w, bootstrap_weights(7, 50, seed=4))
    assert len({tuple(row) for row in w}) > 1  # resamples differ from one another
    with pytest.raises(ValueError):
        bootstrap_weights(0, 5)


def test_paired_difference_of_identical_replicates():
    reps = np.random.default_rng(0).uniform(0.8, 0.9, 200)
    d = paired_difference(0.85, reps, 0.85, reps.copy())
    assert d["difference"] == 0 and d["ci95"] == [0.0, 0.0] and d["p"] == 1.0
    # A clear, consistent gain: small p, an interval away from 0.
    d = paired_difference(0.9, reps + 0.05, 0.85, reps)
    assert d["difference"] == pytest.approx(0.05) and d["ci95"][0] > 0 and d["p"] == pytest.approx(2 / 201)
    with pytest.raises(ValueError):
        paired_difference(0, reps, 0, reps[:10])


def test_weighted_tar_at_far_by_hand():
    impostors = np.array([0.9, 0.7, 0.5, 0.3, 0.1])  # sorted decreasing
    genuine = np.array([0.95, 0.8, 0.6, 0.4])
    # FAR 0.2 of 5 impostors: 1 may pass; the threshold is the 2nd highest (0.7): genuine above it: 2 of 4.
    assert weighted_tar_at_far(genuine, np.ones(4), impostors, np.ones(5), 5, 0.2) == pytest.approx(0.5)
    # FAR 0.4: 2 may pass, threshold 0.5: 3 of 4.
    assert weighted_tar_at_far(genuine, np.ones(4), impostors, np.ones(5), 5, 0.4) == pytest.approx(0.75)
    # FAR 0: threshold at the highest impostor: 1 of 4.
    assert weighted_tar_at_far(genuine, np.ones(4), impostors, np.ones(5), 5, 0.0) == pytest.approx(0.25)
    # Weights: the 0.95 genuine drawn twice, 0.4 not at all: 2 of 4 at FAR 0.
    assert weighted_tar_at_far(genuine, np.array([2, 1, 1, 0]), impostors, np.ones(5), 5, 0.0) == pytest.approx(0.5)
    # A tail too short to reach the allowed count: not measured.
    assert np.isnan(weighted_tar_at_far(genuine, np.ones(4), impostors[:2], np.ones(2), 1000, 0.01))


def test_group_recall_is_a_mean_over_identities():
    # Identity 0 (head): 4 probes, 4 right; identity 1 (head): 1 probe, wrong; identity 2 (tail): 2 probes, 1 right.
    truth = np.array([0, 0, 0, 0, 1, 2, 2])
    predicted = np.array([0, 0, 0, 0, 0, 2, 1])
    groups = np.array(["head"] * 5 + ["tail"] * 2)
    recall = group_recall(truth, predicted, groups)
    assert recall["head"] == pytest.approx(0.5)  # mean of 1.0 and 0.0, not 4/5 over probes
    assert recall["tail"] == pytest.approx(0.5)
    assert recall["middle"] is None
    assert recall["all"] == pytest.approx(5 / 7)
    # Weights (a resample) that leave identity 1 out: head recall 1.0.
    weights = np.array([1, 1, 1, 1, 0, 1, 1])
    assert group_recall(truth, predicted, groups, weights)["head"] == pytest.approx(1.0)


def test_closed_set_identify_on_separated_clusters():
    rng = np.random.default_rng(0)
    centres = np.linalg.qr(rng.normal(size=(16, 16)))[0][:6]  # 6 orthonormal identity directions
    gallery_counts = [9, 7, 5, 3, 2, 1]
    names = [f"id{k}" for k in range(6)]

    def sample(k, n):
        x = centres[k] + 0.05 * rng.normal(size=(n, 16))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    gallery = np.concatenate([sample(k, n) for k, n in enumerate(gallery_counts)])
    gallery_labels = [names[k] for k, n in enumerate(gallery_counts) for _ in range(n)]
    probes = np.concatenate([sample(k, 3) for k in range(6)])
    probe_labels = [names[k] for k in range(6) for _ in range(3)]
    result = closed_set_identify(gallery, gallery_labels, probes, probe_labels, cluster_size=3, num_neighbours=4)
    assert result.identities == names and list(result.truth) == [k for k in range(6) for _ in range(3)]
    assert set(result.predicted) == {"1-NN", "k-NC N=1", "k-NC tuned N"} and result.num_neighbours == 4
    for rule, predicted in result.predicted.items():
        assert np.array_equal(predicted, result.truth), rule
    assert result.num_clusters >= 6
