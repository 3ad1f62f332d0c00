"""The JSON record of a resumable benchmark: `{"runs": [...], ...}`.

Benchmarks that run for hours (`recipe`, `dictionary_modes`) append each
finished run to their record at once and skip the runs already there, so
they can be stopped and restarted.
"""

import json
import os


def load_record(path):
    """The record at `path`, or an empty one (`{"runs": []}`) if none."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"runs": []}


def save_record(record, path):
    """Writes `record` to `path` atomically (a killed run leaves the old file)."""
    write_text(json.dumps(record, indent=1), path)


def write_text(text, path):
    """Writes `text` to `path` atomically (a killed run leaves the old file)."""
    temp = path + ".tmp"
    with open(temp, "w") as f:
        f.write(text)
    os.replace(temp, path)
