"""insightface / MXNet RecordIO: packing identity folders, reading them back, corruption handling."""
import logging
import pickle
import shutil
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from facepipe.cli import main
from facepipe.data.dataset import IdentityFolderDataset, decode_image, scan_identity_folders
from facepipe.data.recordio import (MAGIC, MAGIC_BYTES, IR_SIZE, RecordDataset, RecordFile, RecordIOError,
                                    frame_record, open_training_dataset, pack_identity_folder, pack_record,
                                    read_index, read_record, unpack_header, write_record_file)
from facepipe.data.synth import generate_dataset
from facepipe.data.transforms import build_eval_transform


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rec") / "folders"
    generate_dataset(root, num_identities=5, seed=0, max_images=6, min_images=2, size=(32, 32), progress=False)
    return root


@pytest.fixture(scope="module")
def packed(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rec") / "packed"
    pack_identity_folder(source, out, progress=False)
    return out


def png(value: int, size: int = 8) -> bytes:
    image = np.full((size, size, 3), value, np.uint8)
    image[0, 0] = (value, 255 - value, 7)  # not uniform, so a channel swap would show
    return cv2.imencode(".png", image)[1].tobytes()


def copy_packed(packed: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in ("train.rec", "train.idx", "property"):
        (dest / name).write_bytes((packed / name).read_bytes())
    return dest


def test_round_trip_keeps_images_labels_and_layout(source, packed):
    identities, samples = scan_identity_folders(source)
    dataset = RecordDataset(packed)
    assert len(dataset) == len(samples) and dataset.num_classes == len(identities) == 5
    assert dataset.identities == ["0", "1", "2", "3", "4"]
    assert dataset.labels.dtype == np.int64
    assert dataset.labels.tolist() == [s.label for s in samples]
    for index, sample in enumerate(samples):
        image, label, position = dataset[index]
        assert label == sample.label and position == index
        # Stored byte for byte: the pixels equal the source file decoded by OpenCV.
        np.testing.assert_array_equal(image.numpy(), decode_image(sample.path))
        assert (packed / "train.rec").read_bytes().count(Path(sample.path).read_bytes()) == 1
    assert (packed / "property").read_text() == "5,32,32\n"
    assert dataset.property == (5, 32, 32)

    # insightface layout: header record 0 [a, b], images 1..a-1, identity records a..b-1.
    records = RecordFile(packed / "train.rec")
    a, b = len(samples) + 1, len(samples) + 6
    flag, label, _, _, image = records.unpack(0)
    assert flag == 2 and label.tolist() == [a, b] and image == b""
    assert records.keys.tolist() == list(range(b))
    for identity in range(5):
        flag, label, id_, _, image = records.unpack(a + identity)
        first, end = (int(v) for v in label)
        assert flag == 2 and image == b"" and id_ == a + identity
        assert [s.label for s in samples[first - 1:end - 1]] == [identity] * (end - first)
        assert end - first == sum(s.label == identity for s in samples)
    flag, label, id_, _, _ = records.unpack(1)
    assert flag == 0 and label == 0.0 and id_ == 1


def test_idx_offsets_point_at_magic_numbers_of_contiguous_padded_records(packed):
    data = (packed / "train.rec").read_bytes()
    keys, offsets = read_index(packed / "train.idx")
    assert keys.tolist() == list(range(len(keys)))
    assert len(data) % 4 == 0
    position = 0
    for offset in offsets.tolist():
        assert offset == position and offset % 4 == 0
        magic, lrec = struct.unpack_from("<II", data, offset)
        assert magic == MAGIC and lrec >> 29 == 0
        length = lrec & ((1 << 29) - 1)
        end = offset + 8 + length
        padded = (end + 3) // 4 * 4
        assert data[end:padded] == bytes(padded - end)
        position = padded
    assert position == len(data)
    lines = (packed / "train.idx").read_text().splitlines()
    assert lines[0] == "0\t0" and all(line.count("\t") == 1 for line in lines)


def test_dataset_with_transform_eval_view_and_dataloader_workers(source, packed):
    samples = scan_identity_folders(source)[1]
    dataset = RecordDataset(packed, transform=build_eval_transform((16, 16)))
    tensor, label, index = dataset[(3, 123)]
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32 and index == 3

    raw = RecordDataset(packed)
    order = np.random.default_rng(0).permutation(len(raw)).tolist()
    loader = DataLoader(raw, batch_size=4, sampler=order, num_workers=2)
    seen = []
    for images, labels, indices in loader:
        for image, label, index in zip(images, labels.tolist(), indices.tolist()):
            assert label == samples[index].label
            np.testing.assert_array_equal(image.numpy(), decode_image(samples[index].path))
            seen.append(index)
    assert seen == order

    # A pickled copy (spawned workers) opens its own file handle.
    raw[0]
    clone = pickle.loads(pickle.dumps(raw))
    assert clone.records._fd is None
    np.testing.assert_array_equal(clone[5][0].numpy(), raw[5][0].numpy())

    view = raw.eval_view([4, 1], (32, 32))
    assert len(view) == 2
    image, position = view[1]
    assert position == 1 and image.shape == (3, 32, 32)
    np.testing.assert_allclose(image.numpy(), build_eval_transform((32, 32))(decode_image(samples[1].path)).numpy())


def test_headerless_record_file_reads_every_key_as_an_image(tmp_path):
    stored = [7.0, 3.0, 7.0, 10.0]
    records = [(key, pack_record(label, png(40 * key), id=key)) for key, label in enumerate(stored)]
    # A fifth image whose identity is labels[0] of a flag > 0 label array.
    records.append((4, pack_record([3.0, 0.5], png(200))))
    assert write_record_file(tmp_path / "faces.rec", records) == 5
    dataset = RecordDataset(tmp_path / "faces.rec")
    assert dataset.identities == ["3", "7", "10"]  # numeric order, not string order
    assert dataset.labels.tolist() == [1, 0, 1, 2, 0]
    assert dataset.keys.tolist() == [0, 1, 2, 3, 4]
    image, label, _ = dataset[4]
    assert label == 0
    expected = cv2.cvtColor(cv2.imdecode(np.frombuffer(png(200), np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(image.numpy(), expected)
    # identities from a checkpoint fix the label order.
    fixed = RecordDataset(tmp_path / "faces.rec", identities=["10", "7", "3", "99"])
    assert fixed.labels.tolist() == [1, 2, 1, 0, 2] and fixed.num_classes == 4


def test_pack_and_unpack_header():
    flag, label, id_, id2, image = unpack_header(pack_record(5, b"jpegbytes", id=9, id2=2))
    assert (flag, label, id_, id2, image) == (0, 5.0, 9, 2, b"jpegbytes")
    payload = pack_record(np.array([1.5, 2.0, 3.0]), b"xy")
    assert len(payload) == IR_SIZE + 12 + 2
    flag, label, _, _, image = unpack_header(payload)
    assert flag == 3 and label.dtype == np.float32 and label.tolist() == [1.5, 2.0, 3.0] and image == b"xy"
    with pytest.raises(RecordIOError, match="bad header at here: the payload has 10 bytes"):
        unpack_header(b"0123456789", " at here")
    with pytest.raises(RecordIOError, match="flag 4 announces 4 float32 labels but only 8 bytes"):
        unpack_header(struct.pack("<IfQQ", 4, 0.0, 0, 0) + b"\0" * 8)


def test_split_records_are_joined_with_the_magic_number(tmp_path):
    # Parts built by hand: cflag 1, 2, 3, with an unpadded last part, followed by a normal record.
    parts = [(1, b"ABCDEFGH"), (2, b"IJKL"), (3, b"MNOPQ")]
    data = b""
    for cflag, part in parts:
        data += struct.pack("<II", MAGIC, (cflag << 29) | len(part)) + part
    data += bytes(3)  # pad the last part
    second = len(data)
    data += frame_record(b"whole")
    path = tmp_path / "split.rec"
    path.write_bytes(data)
    with open(path, "rb") as handle:
        assert read_record(handle, 0) == b"ABCDEFGH" + MAGIC_BYTES + b"IJKL" + MAGIC_BYTES + b"MNOPQ"
        assert read_record(handle, second) == b"whole"

    # The writer splits where the magic number sits at an aligned position, as MXNet does.
    payload = pack_record(1.0, b"abcd" + MAGIC_BYTES + b"efgh" + MAGIC_BYTES + MAGIC_BYTES + b"ij")
    framed = frame_record(payload)
    assert [(framed[i + 7] >> 5) for i in range(0, len(framed), 4) if framed[i:i + 4] == MAGIC_BYTES] == [1, 2, 2, 3]
    unaligned = pack_record(1.0, b"a" + MAGIC_BYTES + b"bc")
    # Unaligned occurrences are left alone: one whole record (cflag 0) holding the full payload.
    assert frame_record(unaligned)[:8] == struct.pack("<II", MAGIC, len(unaligned))
    write_record_file(tmp_path / "w.rec", [(0, payload), (1, unaligned)])
    records = RecordFile(tmp_path / "w.rec")
    assert records.read(0) == payload and records.read(1) == unaligned
    labels, errors = records.read_labels([0, 1])  # the split record goes through the full read
    assert labels.tolist() == [1.0, 1.0] and errors == {}


def test_corrupt_magic_fails_that_record_only(packed, tmp_path):
    folder = copy_packed(packed, tmp_path / "bad")
    offset = RecordFile(folder / "train.rec").offset(3)
    with open(folder / "train.rec", "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\xde\xad\xbe\xef")
    records = RecordFile(folder / "train.rec")
    with pytest.raises(RecordIOError, match=rf"bad magic at offset {offset} in .*train\.rec"):
        records.read(3)
    assert unpack_header(records.read(2))[0] == 0 and unpack_header(records.read(4))[0] == 0
    # The header-only label scan reports it and keeps reading the others.
    labels, errors = records.read_labels([2, 3, 4])
    assert list(errors) == [3] and f"offset {offset}" in errors[3]
    assert not np.isnan(labels[[0, 2]]).any()


def test_truncated_file_gives_offset_and_sizes(packed, tmp_path):
    folder = copy_packed(packed, tmp_path / "cut")
    records = RecordFile(folder / "train.rec")
    last = int(records.keys[-1])
    image_key = 5
    offset = records.offset(image_key)
    cut = offset + 40  # inside record 5's image bytes
    data = (folder / "train.rec").read_bytes()[:cut]
    (folder / "train.rec").write_bytes(data)
    records = RecordFile(folder / "train.rec")
    length = struct.unpack_from("<I", data, offset + 4)[0] & ((1 << 29) - 1)
    with pytest.raises(RecordIOError, match=rf"truncated record at offset {offset} in .*train\.rec "
                                            rf"\(needs {offset + 8 + length} bytes, file has {cut}\)"):
        records.read(image_key)
    with pytest.raises(RecordIOError, match=rf"truncated record at offset {records.offset(last)}"):
        records.read(last)
    assert records.read(image_key - 1)
    # Records 5.. have no readable header any more: too many to leave out silently.
    with pytest.raises(RecordIOError, match="unreadable headers"):
        RecordDataset(folder)


def test_training_substitutes_an_unreadable_record_of_the_same_identity(source, packed, tmp_path, caplog):
    samples = scan_identity_folders(source)[1]
    folder = copy_packed(packed, tmp_path / "sub")
    dataset = RecordDataset(folder)
    index = 0  # identity 0 has the most images
    same = [i for i, s in enumerate(samples) if s.label == samples[index].label and i != index]
    # Corrupt the image bytes (not the header) of the record, after its label was read.
    records = RecordFile(folder / "train.rec")
    offset = records.offset(int(dataset.keys[index]))
    with open(folder / "train.rec", "r+b") as handle:
        handle.seek(offset + 8 + IR_SIZE)
        handle.write(b"\0" * 16)
    with caplog.at_level(logging.WARNING, logger="facepipe.data.recordio"):
        image, label, position = dataset[index]
        dataset[index]
    assert label == samples[index].label and position == index
    assert any(np.array_equal(image.numpy(), decode_image(samples[i].path)) for i in same)
    warnings = [r.getMessage() for r in caplog.records if "unreadable record" in r.getMessage()]
    assert len(warnings) == 1 and f"undecodable image in {folder / 'train.rec'} at offset {offset}" in warnings[0]
    # The feature-extraction passes inside training substitute the same image, without a second warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="facepipe.data.recordio"):
        extracted, where = dataset.eval_view([index], (32, 32))[0]
    assert where == 0 and "unreadable record" not in caplog.text
    np.testing.assert_allclose(extracted.numpy(), build_eval_transform((32, 32))(image.numpy()).numpy())

    # A record whose header is broken at load time is left out with a warning (when rare enough).
    with open(folder / "train.rec", "r+b") as handle:
        handle.seek(records.offset(2))
        handle.write(b"\0\0\0\0")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="facepipe.data.recordio"):
        partial = RecordDataset(folder, max_corrupt_fraction=0.5)
    assert len(partial) == len(samples) - 1 and 2 not in partial.keys.tolist()
    assert "leaving out 1 of" in caplog.text


def test_open_training_dataset_picks_the_format(source, packed):
    assert isinstance(open_training_dataset(packed), RecordDataset)
    assert isinstance(open_training_dataset(packed / "train.rec"), RecordDataset)
    folder = open_training_dataset(source)
    assert isinstance(folder, IdentityFolderDataset) and not isinstance(folder, RecordDataset)


def test_record_file_without_idx_walks_the_file(tmp_path):
    write_record_file(tmp_path / "a.rec", [(0, pack_record(1.0, png(1))), (1, pack_record(2.0, png(2)))])
    (tmp_path / "a.idx").unlink()
    records = RecordFile(tmp_path / "a.rec")
    assert len(records) == 2 and unpack_header(records.read(1))[1] == 2.0


def test_pack_command(source, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["pack", str(source), str(out), "--prefix", "faces", "--quiet"]) == 0
    printed = capsys.readouterr().out
    count = len(scan_identity_folders(source)[1])
    assert f"packed {count} images of 5 identities (32x32" in printed
    assert sorted(p.name for p in out.iterdir()) == ["faces.idx", "faces.rec", "property"]
    assert len(RecordDataset(out / "faces.rec")) == count
    assert main(["pack", str(tmp_path / "absent"), str(out), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err

    # A packed set is never replaced without --overwrite, and the refusal comes before any work.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    grown = tmp_path / "grown"
    shutil.copytree(source, grown)
    (grown / "zz_new").mkdir()
    (grown / "zz_new" / "0.png").write_bytes(png(77))
    assert main(["pack", str(grown), str(out), "--prefix", "faces", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert f"{out / 'faces.rec'}" in error and "--overwrite" in error and len(error.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["pack", str(grown), str(out), "--prefix", "faces", "--quiet", "--overwrite"]) == 0
    assert f"packed {count + 1} images of 6 identities" in capsys.readouterr().out


def test_pack_reencodes_other_formats_and_keeps_unreadable_files(tmp_path, caplog):
    root = tmp_path / "mixed"
    for name in ("ann", "bob"):
        (root / name).mkdir(parents=True)
    # A smooth image: JPEG re-encoding keeps it close.
    yy, xx = np.mgrid[0:20, 0:24]
    image = np.stack([yy * 10, xx * 8, 255 - yy * 5], axis=2).astype(np.uint8)
    cv2.imwrite(str(root / "ann" / "0.bmp"), image)
    (root / "ann" / "1.png").write_bytes(png(9, size=20))
    (root / "bob" / "0.png").write_bytes(b"not an image")
    (root / "bob" / "1.png").write_bytes(png(50, size=20))
    with caplog.at_level(logging.WARNING, logger="facepipe.data.recordio"):
        info = pack_identity_folder(root, tmp_path / "out", progress=False)
    assert info["reencoded"] == 1 and info["num_images"] == 4 and info["image_size"] == (20, 24)
    assert info["identities"] == ["ann", "bob"] and "storing unreadable image" in caplog.text
    dataset = RecordDataset(tmp_path / "out")
    stored = dataset.records.unpack(1)[4]
    assert stored.startswith(b"\xff\xd8\xff")  # BMP -> JPEG at quality 95
    assert np.abs(dataset[0][0].numpy().astype(int) - image[:, :, ::-1]).mean() < 4
    # The unreadable file is substituted by bob's other image during training.
    np.testing.assert_array_equal(dataset[2][0].numpy(), dataset[3][0].numpy())
    with pytest.raises(Exception, match="inside"):
        pack_identity_folder(root, root / "ann" / "out", progress=False)
