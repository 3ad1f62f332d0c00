"""Temp folders of the exporter, and cleaning what a killed export left.

Every temp folder and temp file of ours carries the id of the process that
made it (`tflite_export_<pid>_<kind>_XXXX`, `.NAME.<pid>.XXXX.tmp`): a
SIGKILL skips every `finally`, so the next export removes those whose
process is gone. Live processes' files, and other users', are never touched.
"""

import contextlib
import os
import re
import shutil
import tempfile

_DIR_PATTERN = re.compile(r"tflite_export_(\d+)_\w+?_[^/]*")


def _alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _ours_and_stale(path, pid):
    try:
        owned = os.lstat(path).st_uid == os.getuid()
    except OSError:
        return False
    return owned and not _alive(pid)


@contextlib.contextmanager
def temp_dir(kind):
    """A temp folder, removed on exit (also on an exception or SIGTERM).

    Args:
        kind: A word for the folder name, e.g. `"saved"`.
    """
    folder = tempfile.mkdtemp(prefix=f"tflite_export_{os.getpid()}_{kind}_")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def temp_file_prefix(path):
    """The prefix of our temp files beside `path`: `.NAME.<pid>.`."""
    return "." + os.path.basename(path) + f".{os.getpid()}."


def clean_stale(paths=()):
    """Removes temp folders and files that killed exports left behind.

    Args:
        paths: Output files about to be written: stale `.NAME.<pid>.*.tmp`
            files beside each are removed too.

    Returns:
        The paths removed.
    """
    removed = []
    root = tempfile.gettempdir()
    try:
        names = os.listdir(root)
    except OSError:
        names = []
    for name in names:
        found = _DIR_PATTERN.fullmatch(name)
        full = os.path.join(root, name)
        if found and os.path.isdir(full) and _ours_and_stale(full, int(found.group(1))):
            shutil.rmtree(full, ignore_errors=True)
            removed.append(full)
    for path in paths:
        directory = os.path.dirname(os.path.abspath(path))
        pattern = re.compile(
            re.escape("." + os.path.basename(path)) + r"\.(\d+)\.[^/]*\.tmp"
        )
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            found = pattern.fullmatch(name)
            full = os.path.join(directory, name)
            if found and os.path.isfile(full) and _ours_and_stale(full, int(found.group(1))):
                with contextlib.suppress(OSError):
                    os.unlink(full)
                    removed.append(full)
    return removed
