"""Writes the exported files through temp files, the .tflite last, in the user's file mode.

Each file goes to a temp file beside its target, is synced, then renamed
over it. Three renames cannot be atomic together, so the `.tflite` is
replaced last, and the C header carries the model's length and CRC32
(`c_array`): firmware, or a test, can tell a `.cc`/`.h` pair that does not
match the `.tflite`. SIGTERM and SIGHUP during the write raise, so the temp
files are removed; after a SIGKILL the next export removes them
(`tempfiles.clean_stale`).
"""

import contextlib
import os
import signal
import tempfile
import threading

from tflite_export.errors import ExportError
from tflite_export.pipeline import tempfiles

_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)


class _Interrupted(BaseException):
    """A termination signal arrived while files were being written."""


def _new_file_mode():
    """The mode a new file gets under the process umask (0666 & ~umask)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _mode_for(path, default):
    """An existing file keeps its mode, as when it is opened for writing."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return default


@contextlib.contextmanager
def _signals_raise():
    """Turns SIGTERM/SIGHUP into an exception, so `finally` cleans up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Interrupted(signum)

    previous = {}
    try:
        for signum in _SIGNALS:
            previous[signum] = signal.signal(signum, handler)
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def write_files(files, last):
    """Writes every file through a temp file, replacing the .tflite last.

    A failure while writing the temp files replaces nothing. Renames cannot
    be made atomic together: if one fails after others succeeded, those
    stay replaced and the error names them, but the .tflite, renamed last,
    is never newer than its C array (whose length and CRC-32 tell a
    mismatch).

    Args:
        files: `{path: bytes}`.
        last: The path to replace last (the .tflite).

    Raises:
        ExportError: A file cannot be written (the message says which were
            replaced, if any).
    """
    tempfiles.clean_stale(list(files))
    default_mode = _new_file_mode()
    order = [p for p in files if p != last] + [last]
    temps = {}
    renamed = []
    current = None
    try:
        with _signals_raise():
            for path in order:
                current = path
                directory = os.path.dirname(os.path.abspath(path))
                fd, temp = tempfile.mkstemp(
                    dir=directory, prefix=tempfiles.temp_file_prefix(path),
                    suffix=".tmp",
                )
                temps[path] = temp
                with os.fdopen(fd, "wb") as f:
                    f.write(files[path])
                    f.flush()
                    os.fchmod(f.fileno(), _mode_for(path, default_mode))
                    os.fsync(f.fileno())
            for path in order:
                current = path
                os.replace(temps[path], path)
                del temps[path]
                renamed.append(path)
    except OSError as e:
        raise ExportError(
            f"cannot write {e.filename or current}: {e.strerror or e}; "
            + (f"only {', '.join(renamed)} replaced (the .tflite was not; the "
               "C header's length and CRC32 tell the mismatch)." if renamed
               else "nothing was written.")
        ) from e
    except _Interrupted as e:
        raise KeyboardInterrupt(f"export interrupted by signal {e.args[0]}") from e
    finally:
        for temp in temps.values():
            with contextlib.suppress(OSError):
                os.unlink(temp)
