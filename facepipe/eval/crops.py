"""The check that the images an evaluation embeds are aligned crops, not raw photos.

A model sees its input size: any other image is resized whole to it, so a folder of raw photos
(LFW's 250x250 images, with the face in the middle of a larger scene) evaluates without an
error, and far lower than aligned crops (66.8% instead of 83.9% for one model). Crops written by
``facepipe align`` have the model's input size, and their folder holds an align manifest. So
before any embedding, the header of a sample of the images is read (no pixel is decoded): an
image of another size, with no align manifest in its folder or above it up to the image root,
stops the evaluation with a :class:`NotAlignedCropsError` naming the way out (``--align``, an
aligned folder, or the explicit opt-out ``--no-align-check`` for datasets whose crops are
resized on purpose).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence


from facepipe.align.manifest import has_alignment_manifest
from facepipe.data.image_io import read_image_size
from facepipe.data.synth import META_NAME as SYNTH_RECORD
from facepipe.eval.verification import EvalInputError

__all__ = ["NotAlignedCropsError", "SAMPLE_SIZE", "check_aligned_crops", "read_image_size"]

# Headers read per check: the first images, in the order given.
SAMPLE_SIZE = 8


class NotAlignedCropsError(EvalInputError):
    """The images to evaluate are not of the model's input size and come from no ``facepipe
    align`` output: raw photos, which would be resized whole instead of aligned."""


def _made_as_crops(folder: Path) -> bool:
    """Whether ``folder`` is the root of a ``facepipe align`` output (a manifest) or of a
    ``facepipe synth`` set (``synth.json``: faces rendered already aligned, at any size)."""
    return has_alignment_manifest(folder) or (folder / SYNTH_RECORD).is_file()


def _folders_up_to(path: Path, root: Path) -> Iterable[Path]:
    """The image's folder and each one above it, up to and including ``root`` when it lies under it."""
    folder = Path(os.path.normpath(path)).parent
    root = Path(os.path.normpath(root))
    yield folder
    while folder != root and root in folder.parents:
        folder = folder.parent
        yield folder


def check_aligned_crops(root: str | os.PathLike, paths: Sequence[str | os.PathLike], image_size: Sequence[int],
                        advice: str, sample: int = SAMPLE_SIZE) -> None:
    """Raise :class:`NotAlignedCropsError` when one of the first ``sample`` readable images of
    ``paths`` (files under ``root``) is not ``image_size`` (height, width) and neither its
    folder nor one above it up to ``root`` holds an align manifest. ``advice`` ends the message:
    what the user can do (the command's flags). Unreadable or missing files are left to the
    embedding, which reports them."""
    root = Path(root)
    if _made_as_crops(root):
        return
    height, width = (int(v) for v in image_size)
    checked = 0
    for number, path in enumerate(paths):
        if checked >= sample or number >= 4 * sample:
            return
        path = Path(path)
        found = read_image_size(path)
        if found is None:
            continue
        checked += 1
        if found == (height, width) or any(_made_as_crops(folder) for folder in _folders_up_to(path, root)):
            continue
        raise NotAlignedCropsError(
            f"images under {root} are {found[0]}x{found[1]} (e.g. {path}), not the model's {height}x{width} "
            f"input, and {root} holds no align manifest: these look like raw photos, which would be resized "
            f"whole and score far below aligned crops; {advice}")
