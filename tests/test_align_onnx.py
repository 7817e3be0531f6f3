"""``detector.backend: onnx``: the MTCNN networks in ONNX Runtime give the torch backend's
detections; the networks come from ``detector.onnx_dir`` or a cache folder exported once."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

import facepipe.align.export as export_module
from facepipe.align.detector import MTCNN
from facepipe.align.onnx_networks import OnnxNetwork, cache_dir
from facepipe.cli import main
from facepipe.config import AlignConfig, DetectorConfig
from facepipe.models.onnx_backend import OnnxModelError, OnnxUnavailableError

from conftest import SHARED_DATA
from test_align_detector import box_iou

pytest.importorskip("onnxruntime")

LFW = SHARED_DATA / "lfw" / "lfw-deepfunneled"
EXAMPLES = SHARED_DATA / "photos" / "face_recognition" / "examples"
# Several faces, large images (up to 1280x720): the P-Net pyramid's many scales.
PHOTOS = [EXAMPLES / "obama-720p.jpg", EXAMPLES / "two_people.jpg", EXAMPLES / "knn_examples" / "test" / "obama_and_biden.jpg"]
# Measured on all 137 images (164 faces) of fixtures/mtcnn_reference.json: the same face counts,
# box IoU deficit <= 2.0e-6, landmarks within 1.9e-4 px, scores within 5.4e-7. The bounds leave
# a wide margin for other CPUs' kernels (vectorisation changes the float rounding) while staying
# far below what alignment can see.
MIN_IOU = 0.999
LANDMARK_PX = 0.01
SCORE_ATOL = 1e-4


@pytest.fixture(scope="module")
def onnx_env(tmp_path_factory):
    """XDG_CACHE_HOME in a temporary folder, the exports counted, and one onnx detector built
    (exporting the three networks into the cache: ~15 s)."""
    cache_home = tmp_path_factory.mktemp("xdg-cache")
    calls = []
    real_export = export_module.export_detector

    def counting_export(*args, **kwargs):
        calls.append(args)
        return real_export(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(cache_home))
        patch.setattr(export_module, "export_detector", counting_export)
        detector = MTCNN(DetectorConfig(backend="onnx"), device="cpu")
        yield {"cache_home": cache_home, "calls": calls, "detector": detector}


def photos() -> list[np.ndarray]:
    assert LFW.is_dir(), f"LFW missing: {LFW} (see ../shared/data/README.md)"
    people = sorted(p for p in LFW.iterdir() if p.is_dir())[:5]
    paths = [sorted(p.iterdir())[0] for p in people] + PHOTOS
    for path in paths:
        assert path.is_file(), f"photo missing: {path} (see ../shared/data/README.md)"
    return [np.asarray(Image.open(path).convert("RGB")) for path in paths]


def test_onnx_backend_gives_the_torch_detections(onnx_env):
    images = photos()
    assert all(isinstance(net, OnnxNetwork) for net in (onnx_env["detector"].pnet, onnx_env["detector"].onet))
    want = MTCNN(device="cpu").detect(images)
    got = onnx_env["detector"].detect(images)
    faces = 0
    for index, (a, b) in enumerate(zip(want, got)):
        assert len(a) == len(b), f"image {index}: torch {len(a)} faces, onnx {len(b)}"
        for j in range(len(a)):
            assert box_iou(a.boxes[j], b.boxes[j]) >= MIN_IOU
        np.testing.assert_allclose(b.landmarks, a.landmarks, rtol=0, atol=LANDMARK_PX)
        np.testing.assert_allclose(b.scores, a.scores, rtol=0, atol=SCORE_ATOL)
        faces += len(a)
    assert faces >= 5 + 2 + 2 + 4


def test_the_cache_folder_is_exported_once_and_reused(onnx_env):
    folder = cache_dir()
    assert folder.parent == onnx_env["cache_home"] / "facepipe" / "mtcnn-onnx"
    assert sorted(p.name for p in folder.iterdir()) == ["onet.onnx", "pnet.onnx", "rnet.onnx"]
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging folder left behind
    assert len(onnx_env["calls"]) == 1
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    MTCNN(DetectorConfig(backend="onnx"), device="cpu")
    assert len(onnx_env["calls"]) == 1
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes


def test_onnx_dir_from_facepipe_export_is_used(onnx_env, tmp_path, monkeypatch):
    exported = tmp_path / "detector"
    shutil.copytree(cache_dir(), exported)  # what `facepipe export --detector` writes
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    detector = MTCNN(DetectorConfig(backend="onnx", onnx_dir=str(exported)), device="cpu")
    assert len(onnx_env["calls"]) == 1 and not (tmp_path / "empty-cache").exists()
    image = np.asarray(Image.open(PHOTOS[1]).convert("RGB"))
    assert len(detector.detect_one(image)) == len(onnx_env["detector"].detect_one(image))


def test_a_bad_onnx_dir_is_a_one_line_user_error(onnx_env, tmp_path, capsys):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    with pytest.raises(OnnxModelError, match="facepipe export --detector") as caught:
        MTCNN(DetectorConfig(backend="onnx", onnx_dir=str(empty)), device="cpu")
    assert str(empty) in str(caught.value) and "pnet.onnx" in str(caught.value)
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    for name, source in (("pnet", "rnet"), ("rnet", "pnet"), ("onet", "onet")):
        shutil.copy(cache_dir() / f"{source}.onnx", swapped / f"{name}.onnx")
    with pytest.raises(OnnxModelError, match="not facepipe's pnet export"):
        MTCNN(DetectorConfig(backend="onnx", onnx_dir=str(swapped)), device="cpu")

    source = tmp_path / "src" / "p"
    source.mkdir(parents=True)
    shutil.copy(PHOTOS[1], source / "a.jpg")
    assert main(["align", str(source.parent), str(tmp_path / "out"), "--workers", "0", "--quiet",
                 "detector.backend=onnx", f"detector.onnx_dir={empty}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "facepipe export --detector" in err and len(err.splitlines()) == 1


def test_config_validation():
    with pytest.raises(ValidationError, match="detector.backend=onnx"):
        DetectorConfig(onnx_dir="somewhere")
    with pytest.raises(ValidationError, match="backend"):
        DetectorConfig(backend="tensorflow")
    assert DetectorConfig().backend == "torch" and DetectorConfig().onnx_dir is None
    assert AlignConfig.model_validate({"detector": {"backend": "onnx"}}).detector.backend == "onnx"


def test_cli_align_with_the_onnx_backend(onnx_env, tmp_path, capsys):
    people = sorted(p for p in LFW.iterdir() if p.is_dir())[:3]
    source = tmp_path / "src"
    for person in people:
        (source / person.name).mkdir(parents=True)
        shutil.copy(sorted(person.iterdir())[0], source / person.name)
    out = tmp_path / "out"
    assert main(["align", str(source), str(out), "--workers", "0", "--quiet", "image_size=[64,64]",
                 "detector.backend=onnx"]) == 0
    assert "aligned 3" in capsys.readouterr().out
    assert len(onnx_env["calls"]) == 1  # the cache folder of the fixture
    recorded = json.loads((out / "align.json").read_text())["config"]["detector"]
    assert "backend" not in recorded and "onnx_dir" not in recorded
    # The backend does not change the result: the torch backend resumes the same DST.
    assert main(["align", str(source), str(out), "--workers", "0", "--quiet", "image_size=[64,64]"]) == 0
    assert main(["align", str(source), str(tmp_path / "x"), "--workers", "0", "--quiet",
                 "detector.onnx_dir=/tmp"]) == 2
    assert "detector.backend=onnx" in capsys.readouterr().err


def test_without_onnxruntime_the_error_names_the_extra(onnx_env, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed: importing it fails
    with pytest.raises(OnnxUnavailableError, match=r"pip install 'facepipe\[onnx\]'"):
        MTCNN(DetectorConfig(backend="onnx"), device="cpu")
    assert isinstance(MTCNN(device="cpu").pnet, torch.nn.Module)  # the torch backend needs none of it
