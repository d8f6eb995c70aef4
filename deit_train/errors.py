"""The errors a user can cause or meet, and the one boundary every console script ends them at.

Each is one line on stderr, `<prog>: error: <what, the problem, the fix>`, with its own exit status; the traceback
only with DEIT_TRAIN_DEBUG=1 (or HYDRA_FULL_ERROR=1, Hydra's own switch).

    2  bad input: a value, an argument, a file or a folder the user gave (refused before any work where possible)
    3  bad data met during the run (an image that cannot be decoded, mid-epoch)
    4  storage: a checkpoint, log or result that cannot be written (disk full, no permission)
    5  training diverged (NaN or inf); the last good checkpoint is kept
    6  the run directory is in use by another run
    1  anything else: a bug, reported in one line with how to see the traceback
"""

import errno
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class DeitTrainError(Exception):
    """A problem with the user's config, data or files. The message names the problem and the fix."""

    exit_code = 2


class DataError(DeitTrainError):
    """Data that cannot be read, found while training."""

    exit_code = 3


class StorageError(DeitTrainError):
    """Something the run must write could not be written."""

    exit_code = 4


class TrainingDiverged(DeitTrainError):
    exit_code = 5


class RunDirectoryBusy(DeitTrainError):
    exit_code = 6


STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS}


def debugging() -> bool:
    return any(os.environ.get(name, "") not in ("", "0") for name in ("DEIT_TRAIN_DEBUG", "HYDRA_FULL_ERROR"))


def as_user_error(error: BaseException, prog: str = "deit-train") -> DeitTrainError | None:
    """The user-facing form of `error`, following its causes (Lightning and data-loader workers wrap ours), or
    None when it is not one the user can act on."""
    seen = error
    while seen is not None:
        if isinstance(seen, DeitTrainError):
            return unwrap_worker_message(seen)
        if isinstance(seen, PermissionError) and seen.filename and os.path.exists(seen.filename):
            return StorageError(
                f"no permission to access {seen.filename}: fix its permissions (e.g. chmod u+rw), then run again"
            )
        if isinstance(seen, OSError) and seen.errno in STORAGE_ERRNOS:
            where = f" ({seen.filename})" if seen.filename else ""
            then = " (earlier checkpoints are intact), then resume=true" if prog == "deit-train" else ", then run again"
            return StorageError(f"could not write{where}: {seen.strerror}. Free space or fix the permissions{then}")
        seen = seen.__cause__ or seen.__context__
    return worker_error(error)


def unwrap_worker_message(error: DeitTrainError) -> DeitTrainError:
    """An error raised in a data-loader worker is raised again in the main process with the worker's traceback
    folded into its message: the message alone."""
    text, marker = str(error), f"{type(error).__name__}: "
    if "Original Traceback" in text and marker in text:
        return type(error)(text.rsplit(marker, 1)[-1].strip())
    return error


def worker_error(error: BaseException) -> DeitTrainError | None:
    """A DeitTrainError raised in a data-loader worker can also arrive as another exception type, its class name
    and message folded into a traceback text."""
    text = str(error)
    for kind in (DataError, DeitTrainError):
        marker = f"{kind.__name__}: "
        if "Original Traceback" in text and marker in text:
            return kind(text.rsplit(marker, 1)[-1].strip())
    return None


def fail(prog: str, message: str, code: int) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    end_child_processes()
    sys.exit(code)


def end_child_processes() -> None:
    """Data-loader workers leave SIGTERM to the main process (cluster.py), so the exit handler of multiprocessing,
    which terminates them with it, would wait for them forever after a failure that left their loader open."""
    children = multiprocessing.active_children()
    if children and threading.current_thread() is threading.main_thread():
        # torch's DataLoader handler would raise "worker killed by signal" for the workers this kills
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        try:
            child.kill()
        except AttributeError:  # loky's processes (joblib's launcher, the sweep's workers) can only terminate()
            child.terminate()
        child.join(timeout=5)


@contextmanager
def error_boundary(prog: str) -> Iterator[None]:
    """Every failure of a console script as one line and an exit status (the module docstring)."""
    try:
        yield
    except KeyboardInterrupt:
        fail(prog, "interrupted", 130)
    except SystemExit as exit:
        if exit.code not in (0, None):
            end_child_processes()
        raise
    except BaseException as error:
        if debugging():
            raise
        fail(prog, *describe_failure(error, prog))


def describe_failure(error: BaseException, prog: str = "deit-train") -> tuple[str, int]:
    """The one line (without `<prog>: error: `) and the exit status that `error` ends a command with."""
    user_error = as_user_error(error, prog)
    if user_error is not None:
        return str(user_error).strip(), user_error.exit_code
    detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return (
        f"unexpected {type(error).__name__}: {detail} (a bug in deit-train; DEIT_TRAIN_DEBUG=1 shows the "
        f"traceback to report)",
        1,
    )
