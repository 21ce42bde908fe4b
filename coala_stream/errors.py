"""One error family for everything a user can cause or fix.

The CLI prints these as one line (exit 1) without a traceback; anything else
is a bug and keeps its traceback.
"""


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
