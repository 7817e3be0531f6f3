"""The one user-error path: problems with the user's input, not bugs in facepipe.

Every error class that describes something the user can fix (a config key, an input file, an
output folder, a checkpoint) derives from :class:`FacepipeUserError`, besides the built-in base
it always had (``ValueError``, ``RuntimeError``, ``OSError``), so existing ``except`` clauses
keep working. The CLI prints a user error as one line and exits with status 2; anything else,
even a plain ``ValueError``, is a bug and keeps its traceback.

This module imports nothing from the rest of facepipe: every module derives its errors from it,
so it must not pull in torch, or the trainer, or anything that imports them back.
"""
from __future__ import annotations


class FacepipeUserError(Exception):
    """Something the user can fix: the message names the file, folder or setting and what to do."""


class UsageError(ValueError, FacepipeUserError):
    """A command-line argument, environment variable or combination of them that cannot work,
    for checks that belong to no more specific class (a ValueError too, as these always were)."""


class EvalInputError(ValueError, FacepipeUserError):
    """Evaluation input that cannot be used: a malformed pairs/splits file, a pair naming a
    missing image, an unsafe or malformed .bin file, embeddings that do not match a manifest.

    Defined here, below every stage, because the LFW pairs-file parser
    (:mod:`facepipe.data.lfw_pairs`, used by data's merge as well as by eval) raises it;
    :mod:`facepipe.eval.verification` exports it as before."""


# Not facepipe's classes, yet still the user's to fix when the operating system names the path:
# an input that is not there, a folder they may not read or write, a file given for a folder.
# Wrapping every open() of a user-given path in a facepipe class would miss some; a bug that
# makes one of these (facepipe opening a path of its own making) still names the path.
PATH_ERRORS: tuple[type[OSError], ...] = (FileNotFoundError, PermissionError, NotADirectoryError,
                                          IsADirectoryError)

USER_ERRORS: tuple[type[BaseException], ...] = (FacepipeUserError, *PATH_ERRORS)

_PATH_ADVICE = {
    FileNotFoundError: "check the path",
    PermissionError: "choose a path you may use, or change its permissions",
    NotADirectoryError: "a folder was expected there",
    IsADirectoryError: "a file was expected there, not a folder",
}


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message for a user error, or None when ``exc`` is a bug (keep the traceback)."""
    if isinstance(exc, FacepipeUserError):
        return str(exc)
    if isinstance(exc, PATH_ERRORS) and getattr(exc, "filename", None) is not None:
        advice = next(text for kind, text in _PATH_ADVICE.items() if isinstance(exc, kind))
        return f"{exc.filename}: {exc.strerror or type(exc).__name__}; {advice}"
    return None
