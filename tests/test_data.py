import logging

import cv2
import numpy as np
import pytest
import torch

from facepipe.config import AugmentConfig
from facepipe.data.dataset import DatasetError, IdentityFolderDataset, UnreadableImageError, decode_image
from facepipe.data.transforms import build_eval_transform, build_train_transform, to_tensor


def make_tree(root, counts, size=16):
    for identity, count in counts.items():
        folder = root / identity
        folder.mkdir(parents=True)
        for n in range(count):
            image = np.full((size, size, 3), (10 * n) % 255, np.uint8)
            cv2.imwrite(str(folder / f"{n}.png"), image)
    return root


def test_labels_follow_sorted_identity_folders(tmp_path):
    root = make_tree(tmp_path / "d", {"bob": 2, "alice": 3})
    dataset = IdentityFolderDataset(root)
    assert dataset.identities == ["alice", "bob"]
    assert dataset.labels.tolist() == [0, 0, 0, 1, 1]
    image, label, index = dataset[3]
    assert label == 1 and index == 3 and image.dtype == torch.uint8


def test_missing_root_empty_root_and_empty_identity_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        IdentityFolderDataset(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no identity folders"):
        IdentityFolderDataset(tmp_path / "empty")
    root = make_tree(tmp_path / "d", {"alice": 2})
    (root / "carol").mkdir()
    (root / "carol" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="carol"):
        IdentityFolderDataset(root)


def test_corrupt_images_are_replaced_by_the_same_identity(tmp_path, caplog):
    root = make_tree(tmp_path / "d", {"alice": 3, "bob": 2})
    (root / "alice" / "0.png").write_bytes(b"")  # zero bytes
    (root / "alice" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # truncated
    dataset = IdentityFolderDataset(root)
    with caplog.at_level(logging.WARNING):
        for index in range(3):
            image, label, _ = dataset[index]
            assert label == 0
            # Only alice/2.png is readable: its pixel value is 20.
            assert int(image[0, 0, 0]) == 20
    assert "unreadable" in caplog.text and len(dataset.bad_files) == 2


def test_identity_without_any_readable_image_is_an_error(tmp_path):
    root = make_tree(tmp_path / "d", {"alice": 1, "bob": 1})
    (root / "bob" / "0.png").write_bytes(b"not an image")
    dataset = IdentityFolderDataset(root)
    with pytest.raises(DatasetError, match="bob"):
        dataset[1]


def test_decode_handles_grey_alpha_and_16_bit(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    cv2.imwrite(str(tmp_path / "g.png"), grey)
    out = decode_image(tmp_path / "g.png")
    assert out.shape == (8, 8, 3) and (out[..., 0] == grey).all() and (out[..., 2] == grey).all()
    bgra = np.zeros((4, 4, 4), np.uint8)
    bgra[..., 0], bgra[..., 2], bgra[..., 3] = 255, 7, 128  # blue, red, alpha
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    out = decode_image(tmp_path / "a.png")
    assert out.shape == (4, 4, 3) and out[0, 0].tolist() == [7, 0, 255]  # RGB order
    deep = np.full((4, 4, 3), 65535, np.uint16)
    cv2.imwrite(str(tmp_path / "d.png"), deep)
    assert decode_image(tmp_path / "d.png").max() == 255
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(UnreadableImageError):
        decode_image(tmp_path / "bad.jpg")


def test_normalisation_is_x_minus_127_5_over_128():
    image = np.array([[[0, 127, 255]]], np.uint8)
    tensor = to_tensor(image)
    assert tensor.shape == (3, 1, 1)
    assert torch.allclose(tensor.flatten(), torch.tensor([-127.5 / 128, -0.5 / 128, 127.5 / 128]))


def test_seeded_train_transform_is_repeatable_and_flips():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    augment = AugmentConfig(hflip=0.5, color_jitter=0.5, blur=0.5, random_resized_crop=0.5, coarse_dropout=0.5)
    transform = build_train_transform((32, 32), augment)
    assert torch.equal(transform(image, seed=11), transform(image, seed=11))
    outputs = {transform(image, seed=s).sum().item() for s in range(8)}
    assert len(outputs) > 1
    flip_only = build_train_transform((32, 32), AugmentConfig(hflip=1.0))
    assert torch.equal(flip_only(image, seed=0), to_tensor(image[:, ::-1]))


def test_eval_transform_resizes():
    image = np.zeros((112, 96, 3), np.uint8)
    assert build_eval_transform((64, 48))(image).shape == (3, 64, 48)


def test_fixed_identity_order_maps_names_to_given_labels(tmp_path):
    root = make_tree(tmp_path / "d", {"alice": 1, "bob": 2})
    dataset = IdentityFolderDataset(root, identities=["zed", "bob", "alice"])
    assert dataset.num_classes == 3 and dataset.labels.tolist() == [2, 1, 1]
    with pytest.raises(DatasetError, match="alice"):
        IdentityFolderDataset(root, identities=["bob"])
