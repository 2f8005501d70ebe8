"""The errors a user can cause, in one place, so every layer imports them downward.

Each is a :class:`Cda2Error`; the ``cda2`` command prints any of them as one line
(``cda2: error: ...``) with exit status 2, and library callers can catch the base class. Each also
derives from the built-in exception a Python caller would expect (``ValueError`` for a bad option,
``RuntimeError`` for unusable files), so ``except ValueError`` keeps working.
"""
from __future__ import annotations

__all__ = ["Cda2Error", "ConfigError", "ArchitectureError", "DataError", "CheckpointError",
           "CLIError", "NonFiniteLossError", "LostPeerError", "one_line", "os_reason"]


class Cda2Error(Exception):
    """Base class of the user-facing errors of cda2_ext: the message is one line."""


class ConfigError(Cda2Error, ValueError):
    """An option has an unusable value; the message names the option."""


class ArchitectureError(ConfigError):
    """A model config names a user's own architecture (``package.module:function``) whose
    constructor the caller did not name (a checkpoint never imports code by itself), or names
    another one than the constructor given; the message says how to name it."""


class DataError(Cda2Error, RuntimeError):
    """A data folder or file is missing, unreadable or not in the expected format."""


class CheckpointError(Cda2Error, RuntimeError):
    """A checkpoint is missing, unreadable or not a cda2 checkpoint."""


class CLIError(Cda2Error):
    """A command-line usage error that no lower layer checks (e.g. two options that conflict)."""


class NonFiniteLossError(Cda2Error, FloatingPointError):
    """Training met a non-finite loss (or parameters) and stopped before saving anything from it."""


class LostPeerError(Cda2Error, RuntimeError):
    """Another process of a multi-process (``torchrun``) job ended or stopped answering."""


def one_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, shortened: error messages here are one line
    (used where a lower library's multi-line message is wrapped into one of ours)."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def os_reason(err: OSError) -> str:
    """An ``OSError`` as one line naming the path(s) it concerns and the system's reason
    (``"x/y: File name too long"``); the reason alone when it names no path."""
    why = err.strerror or one_line(err)
    paths = [str(f) for f in (err.filename, err.filename2) if f is not None]
    return f"{' -> '.join(paths)}: {why}" if paths else why
