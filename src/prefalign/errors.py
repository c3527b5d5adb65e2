"""The one exception type for mistakes a user can fix (bad data, bad config, missing file).

The CLI prints its message on one line and exits with status 2, never a traceback.
Everything else is a bug and keeps its traceback.
"""

import contextlib
import os
import re


class UserError(Exception):
    """A problem with the user's input, named with its place (file, row, field, flag)."""


def os_error_line(e: OSError) -> str:
    """`PATH: reason` for an OS error on a user's path ("no space left on device", "permission
    denied", "read-only file system", "not a directory"...)."""
    reason = (os.strerror(e.errno) if e.errno else (e.strerror or str(e) or type(e).__name__)).lower()
    return f"{e.filename}: {reason}" if e.filename else reason


@contextlib.contextmanager
def os_errors_name(path: str):
    """OS errors raised inside that name no file (a write that fails at flush or close) name
    `path`, so the CLI's one line says where the disk was full."""
    try:
        yield
    except OSError as e:
        if not e.filename:
            e.filename = path
        raise


_OS_ERROR = re.compile(r"\(os error (\d+)\)(?: at path \"([^\"]*)\")?")


def os_error_from(e: BaseException, path: str | None = None) -> OSError | None:
    """The OS error in `e`, or None when it is something else (a bug, which keeps its traceback).
    safetensors reports a failed write as SafetensorError('... No space left on device (os error
    28) at path "DIR/.tmpXYZ"'); `path` names the file when the error does not."""
    if isinstance(e, OSError):
        return e
    m = _OS_ERROR.search(str(e)) if type(e).__name__ == "SafetensorError" else None
    if not m:
        return None
    code = int(m.group(1))
    return OSError(code, os.strerror(code), path or (os.path.dirname(m.group(2)) if m.group(2) else None))
