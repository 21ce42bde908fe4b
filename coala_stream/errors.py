"""One error family for everything a user can cause or fix.

The CLI prints these as one line (exit 1) without a traceback; anything else
is a bug and keeps its traceback, except the file system's own errors (a full
disk, a read-only mount, no permission): `os_error_line` says those in one line.
"""

import errno

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


class CoalaError(Exception):
    """Base of every error coala-stream raises on purpose."""

    exit_code = 1


class UsageError(CoalaError, ValueError):
    """A bad argument or setting: says what was expected, what was found, how to fix it."""

    exit_code = 2


class StoreError(CoalaError):
    """The activation store is missing, incompatible or inconsistent."""


class DataError(CoalaError):
    """Stored data is corrupt or not finite (checksum mismatch, NaN/Inf); names input and chunk."""


class CheckpointMismatch(CoalaError):
    """A checkpoint or result was made from other data or settings than the current run."""


class LockedError(CoalaError):
    """Another live process holds the lock on this store."""


class Interrupted(CoalaError):
    """Stopped by SIGINT/SIGTERM after saving progress; rerun the same command to resume."""

    exit_code = 75  # EX_TEMPFAIL: schedulers and wrappers treat it as "retry"


class WriteError(CoalaError, OSError):
    """A file could not be written (full disk, read-only location, no permission); still an
    OSError for code that handles those, with a message that says what to do."""


def disk_full(exc: BaseException) -> bool:
    """An ENOSPC/EDQUOT error, also as h5py reports it (errno only in the message)."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return True
    text = str(exc)
    return isinstance(exc, (OSError, RuntimeError)) and (
        "errno = 28" in text or "No space left on device" in text)


def os_error_line(exc: OSError, path=None) -> str:
    """One line for a file system error: the path, what is wrong, what to do."""
    where = path or exc.filename or "a file"
    if disk_full(exc):
        what, fix = "the disk is full", "free some space and rerun the same command to resume"
    elif exc.errno == errno.EROFS:
        what, fix = ("the file system is read-only", "choose a writable location (another "
                     "--out, or a copy of the store where you may write)")
    elif exc.errno in READ_ONLY:
        what, fix = ("permission denied", "choose a location you may write, or fix its "
                     "permissions")
    else:
        return f"{where}: {exc.strerror or exc}; fix that and rerun the same command"
    return f"cannot write {where}: {what}; nothing saved before is lost: {fix}"


def write_error(exc: OSError, path) -> WriteError:
    """`WriteError` for writing ``path`` (errno kept), to raise ``from exc``."""
    err = WriteError(os_error_line(exc, path))
    err.errno = errno.ENOSPC if disk_full(exc) else exc.errno
    return err
