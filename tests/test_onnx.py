"""ONNX out and in (facepipe.models.export, facepipe.models.onnx_backend): the export of a
checkpoint matches PyTorch on real aligned faces, carries its preprocessing contract and a
dynamic batch axis, and runs behind every --checkpoint; a foreign ONNX model with another
preprocessing gives the same embeddings through the --input-* options as through torch."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import SHARED_DATA
from facepipe.cli import main
from facepipe.data.transforms import PIXEL_MEAN, PIXEL_SCALE
from facepipe.embed.extract import list_images
from facepipe.models.export import PARITY_COSINE, export_onnx
from facepipe.models.loaded import load_model
from facepipe.models.onnx_backend import InputContract, ModelFile, OnnxModel, OnnxModelError, load_onnx_model

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "lfw-irse18-64.pt"
LFW = SHARED_DATA / "lfw" / "lfw-deepfunneled"


@pytest.fixture(scope="module")
def aligned_faces(tmp_path_factory) -> Path:
    """Real faces: eight LFW photos of four people, aligned by facepipe."""
    assert LFW.is_dir(), f"LFW missing: {LFW} (see ../shared/data/README.md)"
    people = sorted(p.name for p in LFW.iterdir() if p.is_dir() and len(list(p.iterdir())) >= 2)[:4]
    listing = tmp_path_factory.mktemp("raw") / "images.txt"
    listing.write_text("".join(f"{p}/{f.name}\n" for p in people for f in sorted((LFW / p).iterdir())[:2]))
    out = tmp_path_factory.mktemp("aligned") / "faces"
    # at 112x112 (the IResNet input); the 64x64 shipped model reads them resized, as any larger crop
    assert main(["align", str(listing), str(out), "--root", str(LFW), "image_size=[112,112]", "--quiet",
                 "--workers", "0"]) == 0
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "shipped.onnx"
    assert main(["export", "--checkpoint", str(SHIPPED), "--out", str(out)]) == 0
    return out


def test_export_matches_pytorch_on_real_aligned_faces(exported, aligned_faces):
    paths = [path for path, _ in list_images(aligned_faces)]
    assert len(paths) == 8
    torch_model, onnx_model = load_model(SHIPPED), load_model(exported)
    assert isinstance(onnx_model, OnnxModel)
    for flip in ("none", "sum", "concat"):
        a, b = torch_model.embed(paths, flip=flip), onnx_model.embed(paths, flip=flip)
        assert a.shape == b.shape
        cosine = np.sum(a.astype(np.float64) * b, axis=1)
        assert (cosine >= PARITY_COSINE).all(), (flip, cosine.min())
    # batch sizes other than the export's example (1): the batch axis is dynamic
    single = np.concatenate([onnx_model.embed(paths[i:i + 1], batch_size=1) for i in range(3)])
    np.testing.assert_allclose(single, onnx_model.embed(paths[:3], batch_size=3), atol=1e-5)


@pytest.fixture(scope="module")
def iresnet_checkpoint(tmp_path_factory) -> Path:
    """An insightface-layout IResNet-18 (112x112) with random weights and BatchNorm statistics,
    imported with `facepipe import-weights`."""
    from facepipe.config import ModelConfig
    from facepipe.models import build_backbone

    torch.manual_seed(0)
    network = build_backbone(ModelConfig(arch="iresnet", depth=18, embedding_size=512), (112, 112))
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp("iresnet")
    torch.save(network.state_dict(), folder / "backbone.pth")
    assert main(["import-weights", "--arch", "iresnet", "--depth", "18", "--weights", str(folder / "backbone.pth"),
                 "--out", str(folder / "r18.pt")]) == 0
    return folder / "r18.pt"


def test_an_iresnet_export_matches_pytorch_on_real_aligned_faces(iresnet_checkpoint, aligned_faces, tmp_path):
    out = tmp_path / "r18.onnx"
    assert main(["export", "--checkpoint", str(iresnet_checkpoint), "--out", str(out)]) == 0
    paths = [path for path, _ in list_images(aligned_faces)]
    a, b = load_model(iresnet_checkpoint).embed(paths), load_model(out).embed(paths)
    assert load_model(out).input_size == (112, 112) and a.shape == (8, 512)
    assert (np.sum(a.astype(np.float64) * b, axis=1) >= PARITY_COSINE).all()


def test_the_export_carries_its_contract_and_the_weights_fingerprint(exported):
    meta = {p.key: p.value for p in onnx.load(str(exported)).metadata_props}
    shipped = load_model(SHIPPED)
    assert meta["facepipe_format"] == "facepipe-embedding/1"
    assert meta["input_size"] == "64,64" and meta["channel_order"] == "rgb"
    assert float(meta["input_mean"]) == PIXEL_MEAN and float(meta["input_scale"]) == PIXEL_SCALE
    assert meta["flip"] == shipped.flip and meta["embedding_size"] == "128"
    assert meta["model_fingerprint"] == shipped.fingerprint  # an index of the .pt model takes its queries
    graph_input = onnx.load(str(exported)).graph.input[0].type.tensor_type.shape.dim
    assert not graph_input[0].HasField("dim_value") and [d.dim_value for d in graph_input[1:]] == [3, 64, 64]


def test_every_checkpoint_command_runs_the_onnx_model(exported, aligned_faces, tmp_path, capsys):
    for model, out in ((SHIPPED, tmp_path / "pt"), (exported, tmp_path / "onnx")):
        assert main(["embed", "--checkpoint", str(model), "--images", str(aligned_faces), "--out", str(out),
                     "--quiet"]) == 0
    a, b = np.load(tmp_path / "pt" / "embeddings.npy"), np.load(tmp_path / "onnx" / "embeddings.npy")
    assert (np.sum(a * b, axis=1) >= PARITY_COSINE).all()
    assert json.loads((tmp_path / "onnx" / "embed.json").read_text())["checkpoint"] == str(exported)
    # an index built with the PyTorch model searched with the ONNX one (same fingerprint)
    index = tmp_path / "index"
    assert main(["index", "build", str(index), "--checkpoint", str(SHIPPED), "--images", str(aligned_faces),
                 "--quiet"]) == 0
    query = Path(list_images(aligned_faces)[0][0])
    capsys.readouterr()
    report = tmp_path / "search.json"
    assert main(["search", "--index", str(index), "--checkpoint", str(exported), "--json", str(report), "--quiet",
                 str(query)]) == 0
    found = json.loads(report.read_text())
    assert json.dumps(found).count(query.parent.name) >= 1
    # a raw photo aligned for the ONNX model (its input size, the default template) and searched
    raw = LFW / query.parent.name / sorted(p.name for p in (LFW / query.parent.name).iterdir())[0]
    assert main(["search", "--index", str(index), "--checkpoint", str(exported), "--json", str(report), "--quiet",
                 "--align", str(raw)]) == 0
    assert query.parent.name in report.read_text()
    # verification on a file of pairs: the same decisions from both models
    paths = [Path(path).relative_to(aligned_faces) for path, _ in list_images(aligned_faces)]
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("path_a,path_b,is_same\n" + "".join(
        f"{a},{b},{int(a.parent == b.parent)}\n" for i, a in enumerate(paths) for b in paths[i + 1:]))
    metrics = {}
    for model, out in ((SHIPPED, tmp_path / "eval_pt"), (exported, tmp_path / "eval_onnx")):
        assert main(["eval", "pairs", "--checkpoint", str(model), "--pairs", str(pairs), "--root",
                     str(aligned_faces), "--out", str(out), "--quiet"]) == 0
        metrics[out.name] = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_pt"]["auc"] == pytest.approx(metrics["eval_onnx"]["auc"], abs=1e-6)


def test_export_refuses_to_replace_a_file_and_to_export_an_onnx_model(exported, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep me")
    assert main(["export", "--checkpoint", str(SHIPPED), "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main(["export", "--checkpoint", str(exported), "--out", str(tmp_path / "again.onnx")]) == 2
    assert "already an ONNX model" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(SHIPPED), "--out", str(tmp_path / "m.pt")]) == 2
    assert "ending in .onnx" in capsys.readouterr().err


class ForeignNetwork(torch.nn.Module):
    """A network that wants BGR input as (x - 127.5) / 127.5 (insightface's model-zoo contract):
    the shipped backbone behind a conversion to facepipe's own input."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images * 127.5 + 127.5
        return self.backbone((pixels.flip(1) - PIXEL_MEAN) / PIXEL_SCALE)


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("foreign") / "foreign.onnx"
    network = ForeignNetwork(load_model(SHIPPED).model).eval()
    torch.onnx.export(network, (torch.zeros(1, 3, 64, 64),), str(path), input_names=["data"], dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), external_data=False)
    return path


def test_a_foreign_onnx_model_with_its_contract_stated_embeds_as_torch(foreign, aligned_faces, tmp_path, capsys):
    paths = [path for path, _ in list_images(aligned_faces)]
    reference = load_model(SHIPPED).embed(paths, flip="none")
    import facepipe

    stated = facepipe.InputContract("bgr", 127.5, 127.5)  # the Python API's names
    model = facepipe.load_model(facepipe.ModelFile(foreign, stated))
    assert model.contract == stated and model.flip == "none" and model.input_size == (64, 64)
    assert model.fingerprint.startswith("onnx-")
    assert (np.sum(reference.astype(np.float64) * model.embed(paths), axis=1) >= PARITY_COSINE).all()
    # the wrong contract gives other embeddings: the options are really applied
    wrong = load_model(ModelFile(foreign, InputContract("rgb", 127.5, 127.5))).embed(paths)
    assert np.sum(reference * wrong, axis=1).min() < 0.999
    # through the CLI
    out = tmp_path / "emb"
    assert main(["embed", "--checkpoint", str(foreign), "--images", str(aligned_faces), "--out", str(out), "--quiet",
                 "--flip", "none", "--input-order", "bgr", "--input-mean", "127.5", "--input-scale", "127.5"]) == 0
    assert (np.sum(reference * np.load(out / "embeddings.npy"), axis=1) >= PARITY_COSINE).all()


def test_a_foreign_onnx_model_without_a_contract_is_refused_naming_the_options(foreign, aligned_faces, tmp_path,
                                                                              capsys):
    with pytest.raises(OnnxModelError, match=r"--input-order rgb\|bgr --input-mean M --input-scale S"):
        load_onnx_model(foreign)
    assert main(["embed", "--checkpoint", str(foreign), "--images", str(aligned_faces), "--out",
                 str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "carries no facepipe preprocessing contract" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_without_onnxruntime_the_command_names_the_extra(exported, aligned_faces, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed: importing it fails
    assert main(["embed", "--checkpoint", str(exported), "--images", str(aligned_faces), "--out",
                 str(tmp_path / "x"), "--quiet"]) == 2
    assert "pip install 'facepipe[onnx]'" in capsys.readouterr().err
    # a PyTorch checkpoint needs none of it
    assert main(["embed", "--checkpoint", str(SHIPPED), "--images", str(aligned_faces), "--out",
                 str(tmp_path / "y"), "--quiet"]) == 0


def test_a_broken_onnx_file_is_a_user_error(tmp_path, capsys):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    faces = tmp_path / "faces" / "p"
    faces.mkdir(parents=True)
    shutil.copy(REPO / "examples" / "lfw_gallery.txt", faces / "x.txt")  # any folder; the model fails first
    assert main(["embed", "--checkpoint", str(broken), "--images", str(faces.parent), "--out",
                 str(tmp_path / "out"), "--quiet"]) == 2
    assert "ONNX Runtime cannot load it" in capsys.readouterr().err


def test_the_mtcnn_networks_export_and_match_pytorch_on_a_real_photo(tmp_path, capsys):
    from PIL import Image

    from facepipe.align.export import DETECTOR_PARITY_ATOL
    from facepipe.align.networks import load_networks

    out = tmp_path / "detector"
    assert main(["export", "--detector", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["onet.onnx", "pnet.onnx", "rnet.onnx"]
    photo = next(p for p in sorted(LFW.iterdir()) if p.is_dir())
    image = np.asarray(Image.open(next(iter(sorted(photo.iterdir())))).convert("RGB"), dtype=np.float32)

    def scaled(size: tuple[int, int]) -> torch.Tensor:  # MTCNN input: RGB, (x - 127.5) / 128
        pixels = np.asarray(Image.fromarray(image.astype(np.uint8)).resize(size[::-1]), dtype=np.float32)
        return torch.from_numpy((pixels - 127.5) / 128).permute(2, 0, 1)[None]

    inputs = {"pnet": torch.cat([scaled((125, 125)), scaled((125, 125)).flip(-1)]),  # a pyramid level
              "rnet": torch.cat([scaled((24, 24)), scaled((24, 24)).flip(-1)]),
              "onet": torch.cat([scaled((48, 48)), scaled((48, 48)).flip(-1)])}
    import onnxruntime as ort

    for name, network in zip(("pnet", "rnet", "onet"), load_networks()):
        graph = onnx.load(str(out / f"{name}.onnx"))
        meta = {p.key: p.value for p in graph.metadata_props}
        assert meta["facepipe_format"] == "facepipe-mtcnn/1" and meta["network"] == name
        assert (meta["channel_order"], meta["input_mean"], meta["input_scale"]) == ("rgb", "127.5", "128")
        session = ort.InferenceSession(str(out / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        got = session.run(None, {"images": inputs[name].numpy()})
        with torch.no_grad():
            want = network.eval()(inputs[name])
        assert [o.name for o in session.get_outputs()] == meta["outputs"].split(",")
        for g, w in zip(got, want):
            assert g.shape == tuple(w.shape)
            np.testing.assert_allclose(g, w.numpy(), atol=DETECTOR_PARITY_ATOL)
    capsys.readouterr()
    assert main(["export", "--detector", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
