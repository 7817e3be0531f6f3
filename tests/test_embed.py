import csv
import json

import numpy as np
import pytest
import torch

from conftest import tiny_config
from facepipe.data.dataset import DatasetError
from facepipe.embed import embed_folder, list_images
from facepipe.embed.extract import embed_paths
from facepipe.models import IRSEBackbone
from facepipe.models.loaded import extract_embeddings, load_model
from facepipe.train import Trainer


@pytest.fixture(scope="module")
def checkpoint(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("embed_run")
    Trainer(tiny_config(tiny_dataset, out, train={"stages": [{"epochs": 1, "head": {"type": "softmax"}}]}),
            progress=False).fit()
    return out / "latest.pt"


def test_flip_fusion_modes_against_direct_computation(tiny_dataset):
    torch.manual_seed(0)
    model = IRSEBackbone(18, 0.125, 16, 0.0, (32, 32)).eval()
    paths = [p for p, _ in list_images(tiny_dataset)][:5]
    from facepipe.data.dataset import decode_image
    from facepipe.data.transforms import build_eval_transform

    images = torch.stack([build_eval_transform((32, 32))(decode_image(p)) for p in paths])
    with torch.no_grad():
        plain, mirrored = model(images), model(images.flip(-1))
    device = torch.device("cpu")
    none = extract_embeddings(model, paths, (32, 32), device, batch_size=2, flip="none")
    summed = extract_embeddings(model, paths, (32, 32), device, batch_size=3, flip="sum")
    concat = extract_embeddings(model, paths, (32, 32), device, batch_size=4, flip="concat")
    normalise = torch.nn.functional.normalize
    assert np.allclose(none, normalise(plain, dim=1).numpy(), atol=1e-5)
    assert np.allclose(summed, normalise(plain + mirrored, dim=1).numpy(), atol=1e-5)
    assert concat.shape == (5, 32) and np.allclose(concat, normalise(torch.cat([plain, mirrored], 1), dim=1).numpy(),
                                                   atol=1e-5)
    assert summed.dtype == np.float32 and np.allclose(np.linalg.norm(summed, axis=1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="flip"):
        extract_embeddings(model, paths, (32, 32), device, flip="mirror")


def test_embed_folder_writes_ordered_embeddings_and_manifest(checkpoint, tiny_dataset, tmp_path):
    summary = embed_folder(checkpoint, tiny_dataset, tmp_path / "out", num_workers=0, progress=False)
    embeddings = np.load(tmp_path / "out" / "embeddings.npy")
    rows = list(csv.DictReader(open(tmp_path / "out" / "manifest.csv")))
    assert embeddings.shape == (summary["num_images"], 32) and len(rows) == summary["num_images"]
    assert [int(r["row"]) for r in rows] == list(range(len(rows)))
    assert rows[0]["identity"] == sorted(p.name for p in tiny_dataset.iterdir() if p.is_dir())[0]
    info = json.loads((tmp_path / "out" / "embed.json").read_text())
    assert info["flip"] == "sum" and len(info["model_fingerprint"]) == 16
    # The same image gives the same embedding in a second, differently batched run.
    again = embed_folder(checkpoint, tiny_dataset, tmp_path / "again", batch_size=5, num_workers=0, progress=False)
    assert again["model_fingerprint"] == summary["model_fingerprint"]
    assert np.allclose(np.load(tmp_path / "again" / "embeddings.npy"), embeddings, atol=1e-5)


def test_loaded_model_knows_its_input_size_flip_and_precision(checkpoint, tiny_dataset):
    loaded = load_model(checkpoint)
    assert loaded.input_size == loaded.config.data.image_size == (32, 32)
    assert loaded.flip == loaded.config.embed.flip == "sum"
    assert loaded.amp_dtype is None  # AMP runs on CUDA only
    paths = [p for p, _ in list_images(tiny_dataset)][:5]
    # embed_paths is LoadedModel.embed with the checkpoint's record.
    embedded, info = embed_paths(loaded, paths)
    assert info == {"checkpoint": str(checkpoint), "model_fingerprint": loaded.fingerprint, "flip": "sum"}
    assert np.array_equal(loaded.embed(paths), embedded)
    assert np.allclose(loaded.embed(paths, flip="none", batch_size=2),
                       extract_embeddings(loaded.model, paths, (32, 32), torch.device("cpu"), flip="none"), atol=1e-6)
    # Already-preprocessed images give the embeddings of their files.
    from facepipe.data.dataset import decode_image
    from facepipe.data.transforms import build_eval_transform

    images = torch.stack([build_eval_transform((32, 32))(decode_image(p)) for p in paths])
    assert np.allclose(loaded.embed(images.numpy()), embedded, atol=1e-5)
    assert np.allclose(loaded.embed(images, flip="concat", batch_size=3), loaded.embed(paths, flip="concat"),
                       atol=1e-5)
    with pytest.raises(ValueError, match=r"\[N, C, 32, 32\]"):
        loaded.embed(images[:, :, :16])
    with pytest.raises(ValueError, match="float array"):
        loaded.embed(np.zeros((2, 3, 32, 32), dtype=np.uint8))


def test_embed_errors(checkpoint, tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        embed_folder(checkpoint, tmp_path / "absent", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        embed_folder(checkpoint, tmp_path / "empty", tmp_path / "out", progress=False)
