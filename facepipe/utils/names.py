"""Identity names: the one check every reader of names applies (folder names, label files,
embedding manifests, index galleries).

A name is printed (``index info``, ``search``), written into manifests and label files one per
line, and stored in checkpoints and indexes. A newline in it splits one identity into two lines
of a label file; an escape sequence rewrites the user's terminal when the name is printed. Such
a name is refused where it is read, not escaped: an escaped name would no longer match the
folder or label it came from, and every later stage would have to agree on the escaping.
"""
from __future__ import annotations

import unicodedata

from facepipe.errors import FacepipeUserError

__all__ = ["IdentityNameError", "check_identity_name", "check_identity_names", "escape_controls"]

# Control characters (Cc: C0, DEL, C1; ESC starts terminal sequences), line and paragraph
# separators (str.splitlines breaks on them), and the bidirectional overrides and isolates
# that reorder what a terminal shows.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_REFUSED_CATEGORIES = ("Cc", "Zl", "Zp")


class IdentityNameError(ValueError, FacepipeUserError):
    """An identity name holding characters that would corrupt manifests or printed output."""


def _refused(char: str) -> bool:
    return char in _BIDI_CONTROLS or unicodedata.category(char) in _REFUSED_CATEGORIES


def _bad_character(name: str) -> str | None:
    return next((char for char in name if _refused(char)), None)


def escape_controls(text: str) -> str:
    """``text`` with every refused character written as its Python escape (``\\x1b``): safe to
    print, e.g. a path that holds such a name."""
    return "".join(repr(char)[1:-1] if _refused(char) else char for char in text)


def check_identity_name(name: str, where: str) -> str:
    """``name`` unchanged, or :class:`IdentityNameError` naming ``where`` it was read (a folder,
    a file and line) when it holds a control character. The message shows the name escaped."""
    bad = _bad_character(name)
    if bad is not None:
        raise IdentityNameError(f"{escape_controls(where)}: identity name {name!r} holds the control character {bad!r}; rename it "
                                "(control characters would corrupt manifests and printed output)")
    return name


def check_identity_names(names, where: str) -> list[str]:
    """:func:`check_identity_name` over a sequence, the message naming the first bad entry's
    position (``where``, entry k, 1-based)."""
    names = list(names)
    for position, name in enumerate(names, 1):
        if _bad_character(name) is not None:
            check_identity_name(name, f"{where}, entry {position}")
    return names
