"""Errors that unibcq reports to users.

Every problem a user can fix (bad flag, bad file, unsupported model) is raised as a
`UnibcqError`; the CLI prints its message on one line and exits with code 2, so no Python
traceback reaches the terminal for input mistakes.
"""


class UnibcqError(Exception):
    """A user-facing problem: the message names what is wrong and how to fix it."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message as one line of at most `limit` characters, for quoting a
    library's error (which may span lines or carry a whole file) inside ours."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def not_utf8(path: object, exc: UnicodeDecodeError) -> UnibcqError:
    """The one message for a text file (data, task, MMLU csv) that is not UTF-8, say a Latin-1
    export: without it the decode error surfaces as a traceback naming no file."""
    return UnibcqError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); convert it to UTF-8")


class CheckpointError(UnibcqError):
    """A quantized checkpoint is missing, truncated or inconsistent with its config."""


class UnsupportedModelError(UnibcqError):
    """The model's architecture has no block / linear-layer map in unibcq."""
