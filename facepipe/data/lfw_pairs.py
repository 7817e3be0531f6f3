"""The official LFW pairs files: View 1 (``pairsDevTrain.txt``, ``pairsDevTest.txt``) and View 2
(``pairs.txt``).

Format (Huang et al., "Labeled Faces in the Wild", tech. report 07-49, Sec. "Pairs"):

* First line: ``N`` (View 1: one set of N matched then N mismatched pairs) or ``S N`` (View 2:
  ``10 300``, ten folds, each 300 matched then 300 mismatched pairs).
* Matched pair: ``name<TAB>i<TAB>j``; mismatched pair: ``name1<TAB>i<TAB>name2<TAB>j``.
* Image ``i`` of ``name`` is ``name/name_%04d.jpg`` (1-based).

The parser is tolerant of CRLF line endings, trailing whitespace and trailing blank lines, and
strict about everything else: a wrong field count, a non-positive or non-integer image number, a
matched line in the mismatched block (or the reverse), a blank line inside the file, or a line
count that disagrees with the header raise :class:`EvalInputError` naming the file and line.

A pair listed twice (the same two images, in either order, anywhere in the file) is an error
that counts the repeats and names the first: a repeat would count twice toward the accuracy
(one matched pair repeated 10 times moved 60 % to 70 %), and dropping it instead would leave
a set with fewer pairs than its header announces. The official files never repeat a pair.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facepipe.errors import EvalInputError

__all__ = ["LFWPairs", "lfw_image_name", "parse_lfw_pairs"]


def lfw_image_name(person: str, number: int, extension: str = ".jpg") -> str:
    """Relative path of image ``number`` (1-based) of ``person``: ``name/name_0001.jpg``."""
    return f"{person}/{person}_{number:04d}{extension}"


@dataclass(eq=False)
class LFWPairs:
    """A parsed LFW pairs file; pair k compares ``persons_a[k]`` image ``numbers_a[k]`` with
    ``persons_b[k]`` image ``numbers_b[k]``."""

    path: str
    persons_a: list[str]
    numbers_a: np.ndarray
    persons_b: list[str]
    numbers_b: np.ndarray
    is_same: np.ndarray  # bool, one per pair
    folds: np.ndarray  # official fold (set) of each pair, 0-based; all 0 for View 1
    num_folds: int  # sets in the file: 10 for View 2, 1 for View 1
    pairs_per_class: int  # matched (= mismatched) pairs per set
    line_numbers: np.ndarray  # 1-based line of each pair in the file

    def __len__(self) -> int:
        return int(self.is_same.shape[0])

    @property
    def view(self) -> str:
        if self.num_folds == 1:
            return "View 1 (a single set: threshold from a separate file or cross-validation)"
        return f"View 2 ({self.num_folds} official folds)"

    def names(self, extension: str = ".jpg") -> tuple[list[str], list[str]]:
        """Relative image paths ``name/name_%04d.jpg`` of both sides of every pair."""
        return ([lfw_image_name(p, int(n), extension) for p, n in zip(self.persons_a, self.numbers_a)],
                [lfw_image_name(p, int(n), extension) for p, n in zip(self.persons_b, self.numbers_b)])

    def persons(self) -> list[str]:
        """Every person named by the file, sorted."""
        return sorted(set(self.persons_a) | set(self.persons_b))

    def contiguous_folds(self, n_folds: int = 10) -> np.ndarray:
        """Fold ids for k-fold cross-validation of a single-set file.

        The file lists all matched then all mismatched pairs, so plain contiguous blocks would
        give folds of one class only. Fold k here is the k-th contiguous block of the matched
        pairs plus the k-th contiguous block of the mismatched pairs of each set, which is how
        the View 2 folds themselves are laid out.
        """
        if n_folds < 2:
            raise ValueError(f"n_folds must be >= 2, got {n_folds}")
        if self.pairs_per_class < n_folds:
            raise EvalInputError(
                f"{self.path}: {self.pairs_per_class} pairs per class cannot form {n_folds} folds"
            )
        ids = np.empty(len(self), dtype=np.int64)
        block = np.empty(self.pairs_per_class, dtype=np.int64)
        for k, part in enumerate(np.array_split(np.arange(self.pairs_per_class), n_folds)):
            block[part] = k
        for start in range(0, len(self), self.pairs_per_class):
            ids[start:start + self.pairs_per_class] = block
        return ids


def _parse_number(text: str, path: str, line_no: int, field: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise EvalInputError(f"{path}: line {line_no}: {field} must be a positive integer, got {text!r}")
    return int(text)


def parse_lfw_pairs(path: str | os.PathLike) -> LFWPairs:
    """Parse an official LFW pairs file (View 1 or View 2; see the module docstring).

    Returns an :class:`LFWPairs` whose pairs keep the file's order. Raises
    :class:`EvalInputError` with the line number for any malformed content.
    """
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"LFW pairs file {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise EvalInputError(f"{path}: not a UTF-8 text file ({exc})") from None
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    name = str(path)
    if not lines:
        raise EvalInputError(f"{name}: empty file, expected a header line 'N' or 'SETS N'")

    header = lines[0].split()
    if len(header) not in (1, 2) or not all(h.isdigit() and int(h) > 0 for h in header):
        raise EvalInputError(
            f"{name}: line 1: expected a header 'N' (View 1) or 'SETS N' (View 2, e.g. '10 300'), "
            f"got {lines[0]!r}"
        )
    num_sets, per_class = (1, int(header[0])) if len(header) == 1 else (int(header[0]), int(header[1]))
    expected = num_sets * 2 * per_class
    body = lines[1:]

    persons_a: list[str] = []
    persons_b: list[str] = []
    numbers_a = np.empty(expected, dtype=np.int64)
    numbers_b = np.empty(expected, dtype=np.int64)
    is_same = np.empty(expected, dtype=bool)
    folds = np.empty(expected, dtype=np.int64)
    seen: dict[frozenset, int] = {}  # the two images of a pair -> its first line
    repeats: list[tuple[int, int]] = []  # (line, the line it repeats)
    for k, line in enumerate(body[:expected]):
        line_no = k + 2
        fold, offset = divmod(k, 2 * per_class)
        matched = offset < per_class
        if not line:
            raise EvalInputError(f"{name}: line {line_no}: blank line inside the pairs list")
        # Names never contain whitespace (LFW writes spaces as '_'), so any run of tabs or
        # spaces separates fields.
        fields = line.split()
        if matched:
            if len(fields) != 3:
                raise EvalInputError(
                    f"{name}: line {line_no}: expected a matched pair 'name<TAB>i<TAB>j' (set {fold + 1}, "
                    f"matched pair {offset + 1} of {per_class}), got {len(fields)} field(s): {line!r}"
                )
            pa, i, j = fields
            pb = pa
        else:
            if len(fields) != 4:
                raise EvalInputError(
                    f"{name}: line {line_no}: expected a mismatched pair 'name1<TAB>i<TAB>name2<TAB>j' "
                    f"(set {fold + 1}, mismatched pair {offset - per_class + 1} of {per_class}), "
                    f"got {len(fields)} field(s): {line!r}"
                )
            pa, i, pb, j = fields
        na = _parse_number(i, name, line_no, "image number")
        nb = _parse_number(j, name, line_no, "image number")
        if matched and na == nb:
            raise EvalInputError(f"{name}: line {line_no}: a matched pair names one image twice: {line!r}")
        if not matched and pa == pb:
            raise EvalInputError(f"{name}: line {line_no}: a mismatched pair names one person twice: {line!r}")
        for person in (pa, pb):
            if "/" in person or "\\" in person or person in (".", ".."):
                raise EvalInputError(f"{name}: line {line_no}: invalid person name {person!r}")
        images = frozenset({(pa, na), (pb, nb)})
        if images in seen:
            repeats.append((line_no, seen[images]))
        else:
            seen[images] = line_no
        persons_a.append(pa)
        persons_b.append(pb)
        numbers_a[k], numbers_b[k] = na, nb
        is_same[k] = matched
        folds[k] = fold
    if repeats:
        line_no, original = repeats[0]
        raise EvalInputError(
            f"{name}: {len(repeats)} pair(s) repeat an earlier one (first: line {line_no} repeats line {original}: "
            f"{body[line_no - 2]!r}); a repeated pair would count twice: list each pair once"
        )
    if len(body) != expected:
        where = (f"line {expected + 2} is one more pair line" if len(body) > expected
                 else f"the file ends after line {len(body) + 1}")
        raise EvalInputError(
            f"{name}: header {lines[0].strip()!r} announces {expected} pairs ({num_sets} set(s) of "
            f"{per_class} matched + {per_class} mismatched) but the file has {len(body)}: {where}"
        )
    return LFWPairs(
        path=name, persons_a=persons_a, numbers_a=numbers_a, persons_b=persons_b, numbers_b=numbers_b,
        is_same=is_same, folds=folds, num_folds=num_sets, pairs_per_class=per_class,
        line_numbers=np.arange(2, expected + 2, dtype=np.int64),
    )
