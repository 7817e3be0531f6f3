"""The one reader of the embeddings folder (facepipe.embed.folder.EmbeddingsFolder) against its writer."""
import json
import shutil

import numpy as np
import pytest

from facepipe.embed.folder import (
    EMBED_RECORD,
    EMBEDDINGS_FILE,
    MANIFEST_FILE,
    EmbeddingsFolder,
    EmbeddingsFolderError,
)
from facepipe.embed.extract import write_embeddings_folder
from facepipe.eval.verification import EvalInputError


def write(out, rows=5, seed=0, fingerprint="f" * 16):
    vectors = np.random.default_rng(seed).normal(size=(rows, 4)).astype(np.float32)
    items = [(f"/images/p{i % 2}/{seed}_{i}.png", f"p{i % 2}" if i else "") for i in range(rows)]
    write_embeddings_folder(out, vectors, items, {"model_fingerprint": fingerprint, "flip": "sum",
                                                  "num_images": rows, "checkpoint": "model.pt"})
    return vectors, items


def test_round_trip_with_the_writer(tmp_path):
    vectors, items = write(tmp_path / "emb")
    opened = EmbeddingsFolder.open(tmp_path / "emb", require_manifest=True)
    np.testing.assert_array_equal(opened.embeddings, vectors)
    assert opened.paths == [path for path, _ in items]
    assert opened.identities == [identity for _, identity in items]
    assert opened.keys() == ["0_0.png", "p1/0_1.png", "p0/0_2.png", "p1/0_3.png", "p0/0_4.png"]
    assert opened.fingerprint == "f" * 16 and opened.flip == "sum" and opened.info["checkpoint"] == "model.pt"
    assert set(opened.info["parts"]) == {EMBEDDINGS_FILE, MANIFEST_FILE}
    assert opened.folder == tmp_path / "emb"
    mapped = EmbeddingsFolder.open(tmp_path / "emb", mmap=True)
    assert isinstance(mapped.embeddings, np.memmap) and not mapped.embeddings.flags.writeable


def test_a_tampered_part_is_refused_with_the_existing_message(tmp_path):
    write(tmp_path / "a", seed=0)
    write(tmp_path / "b", seed=1)  # same shape: only the record tells them apart
    shutil.copy(tmp_path / "b" / EMBEDDINGS_FILE, tmp_path / "a" / EMBEDDINGS_FILE)
    with pytest.raises(EmbeddingsFolderError, match=r"embeddings\.npy is not the file .* mixes two outputs"):
        EmbeddingsFolder.open(tmp_path / "a")
    # The caller's own error class.
    with pytest.raises(EvalInputError, match=f"embeddings folder {tmp_path / 'a'}: .*mixes two outputs"):
        EmbeddingsFolder.open(tmp_path / "a", error=EvalInputError)
    write(tmp_path / "a", seed=0)
    shutil.copy(tmp_path / "b" / MANIFEST_FILE, tmp_path / "a" / MANIFEST_FILE)
    with pytest.raises(EmbeddingsFolderError, match=r"manifest\.csv is not the file"):
        EmbeddingsFolder.open(tmp_path / "a" / EMBEDDINGS_FILE)


def test_a_record_of_another_row_count_is_refused(tmp_path):
    write(tmp_path / "a")
    record = json.loads((tmp_path / "a" / EMBED_RECORD).read_text())
    del record["parts"]
    record["num_images"] = 7
    (tmp_path / "a" / EMBED_RECORD).write_text(json.dumps(record))
    with pytest.raises(EmbeddingsFolderError, match="records 7 images .* mixes two outputs"):
        EmbeddingsFolder.open(tmp_path / "a")


def test_a_npy_inside_a_folder_finds_its_manifest_and_record(tmp_path):
    vectors, items = write(tmp_path / "emb")
    opened = EmbeddingsFolder.open(tmp_path / "emb" / EMBEDDINGS_FILE)
    np.testing.assert_array_equal(opened.embeddings, vectors)
    assert opened.identities == [identity for _, identity in items]
    assert opened.fingerprint == "f" * 16 and opened.folder == tmp_path / "emb"
    # Another .npy beside it takes only the record's model, not the manifest (whose rows are not its).
    np.save(tmp_path / "emb" / "queries.npy", vectors[:2])
    other = EmbeddingsFolder.open(tmp_path / "emb" / "queries.npy")
    assert other.paths is None and other.identities is None and other.fingerprint == "f" * 16


def test_a_bare_npy_has_no_fingerprint(tmp_path):
    np.save(tmp_path / "queries.npy", np.ones(4, dtype=np.float32))  # one query: 1-D is allowed
    opened = EmbeddingsFolder.open(tmp_path / "queries.npy")
    assert opened.embeddings.shape == (4,) and opened.info == {}
    assert opened.fingerprint is None and opened.flip is None and opened.paths is None
    with pytest.raises(ValueError, match="no manifest"):
        opened.keys()


def test_missing_and_malformed_inputs(tmp_path):
    with pytest.raises(EmbeddingsFolderError, match="embeddings file .*absent.npy does not exist"):
        EmbeddingsFolder.open(tmp_path / "absent.npy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmbeddingsFolderError, match=r"embeddings\.npy is missing \(expected the output of"):
        EmbeddingsFolder.open(tmp_path / "empty")
    np.save(tmp_path / "empty" / EMBEDDINGS_FILE, np.ones((2, 3), dtype=np.float32))
    assert EmbeddingsFolder.open(tmp_path / "empty").identities is None  # manifest optional by default
    with pytest.raises(EmbeddingsFolderError, match=r"manifest\.csv is missing"):
        EmbeddingsFolder.open(tmp_path / "empty", require_manifest=True)
    (tmp_path / "empty" / MANIFEST_FILE).write_text("row,path,identity\n0,a.png,p\n2,b.png,p\n")
    with pytest.raises(EmbeddingsFolderError, match="line 3: expected row 1,path,identity"):
        EmbeddingsFolder.open(tmp_path / "empty")
    np.save(tmp_path / "empty" / EMBEDDINGS_FILE, np.array([object()]), allow_pickle=True)
    with pytest.raises(EmbeddingsFolderError, match="not a plain numeric .npy array"):
        EmbeddingsFolder.open(tmp_path / "empty")


@pytest.mark.parametrize("package", ["facepipe", "facepipe.embed", "facepipe.eval", "facepipe.train"])
def test_every_exported_name_resolves(package):
    # The packages load some names on first use; a name mapped to the wrong module only fails then.
    import importlib

    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, f"{package} exports names it cannot load: {missing}"
