"""The exported files: modes, write order, what a killed export leaves."""

import os
import signal
import subprocess
import sys
import tempfile
import zlib

import paths
import pytest

from tflite_export.pipeline import c_array
from tflite_export.pipeline import tempfiles
from tflite_export.pipeline import writer

ROOT = paths.REPO


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_new_files_get_the_umask_mode_and_existing_ones_keep_theirs(tmp_path, umask_027):
    new, old = tmp_path / "new.tflite", tmp_path / "old.cc"
    old.write_bytes(b"x")
    os.chmod(old, 0o644)
    writer.write_files({old: b"cc", new: b"model"}, last=new)
    assert os.stat(new).st_mode & 0o777 == 0o640  # 0666 & ~027, not 0600
    assert os.stat(old).st_mode & 0o777 == 0o644
    assert new.read_bytes() == b"model" and old.read_bytes() == b"cc"
    assert sorted(os.listdir(tmp_path)) == ["new.tflite", "old.cc"]


def test_the_tflite_is_replaced_last(tmp_path, monkeypatch):
    order = []
    real = os.replace
    monkeypatch.setattr(writer.os, "replace",
                        lambda a, b: (order.append(os.path.basename(b)), real(a, b)))
    files = {tmp_path / "m.tflite": b"t", tmp_path / "m.cc": b"c", tmp_path / "m.h": b"h"}
    writer.write_files(files, last=tmp_path / "m.tflite")
    assert order[-1] == "m.tflite" and sorted(order) == ["m.cc", "m.h", "m.tflite"]


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing(a, b):
        calls.append(b)
        raise OSError(28, "No space left on device", str(b))

    monkeypatch.setattr(writer.os, "replace", failing)
    with pytest.raises(Exception, match="No space left.*nothing was written"):
        writer.write_files({tmp_path / "m.tflite": b"t", tmp_path / "m.h": b"h"},
                           last=tmp_path / "m.tflite")
    assert os.listdir(tmp_path) == []


def test_stale_temp_files_and_folders_of_dead_exports_are_removed(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".m.tflite.{dead}.abcd.tmp"
    live = tmp_path / f".m.tflite.{os.getpid()}.efgh.tmp"  # a running export
    other = tmp_path / ".notes.txt.123.tmp"  # not ours: another name
    for path in (stale, live, other):
        path.write_bytes(b"x" * 100)
    folder = tempfile.mkdtemp(prefix=f"tflite_export_{dead}_saved_")
    mine = tempfile.mkdtemp(prefix=f"tflite_export_{os.getpid()}_saved_")
    try:
        removed = tempfiles.clean_stale([tmp_path / "m.tflite"])
        assert str(stale) in removed and folder in removed
        assert not stale.exists() and not os.path.exists(folder)
        assert live.exists() and other.exists() and os.path.isdir(mine)
    finally:
        os.rmdir(mine)


def test_temp_dir_carries_the_pid_and_is_removed():
    with tempfiles.temp_dir("probe") as folder:
        assert os.path.basename(folder).startswith(f"tflite_export_{os.getpid()}_probe_")
        open(os.path.join(folder, "f"), "w").close()
    assert not os.path.exists(folder)


_CHILD = r"""
import os, sys, time
sys.path.insert(0, sys.argv[2])
from tflite_export.pipeline import writer
real = os.replace
def slow(a, b):
    print("writing", flush=True)
    time.sleep(60)
writer.os.replace = slow
target = os.path.join(sys.argv[1], "m.tflite")
writer.write_files({target + ".cc": b"c" * 10**6, target: b"t" * 10**6}, last=target)
"""


@pytest.mark.slow
def test_sigterm_during_the_write_removes_the_temp_files(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path), ROOT],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert proc.stdout.readline().strip() == "writing"
    assert len(os.listdir(tmp_path)) == 2  # full-size temp files
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    assert "interrupted by signal" in proc.stderr.read()
    assert os.listdir(tmp_path) == []


def test_header_records_length_and_crc32_of_the_model(tmp_path):
    model = bytes(range(256)) * 3
    source, header = c_array.render(model, str(tmp_path / "model_data.cc"))
    (tmp_path / "model_data.h").write_text(header)
    (tmp_path / "model_data.cc").write_text(source)
    (tmp_path / "m.tflite").write_bytes(model)
    assert c_array.header_checksum(tmp_path / "model_data.h") == (
        len(model), zlib.crc32(model)
    )
    assert f"model_data_expected_len = {len(model)}u;" in header
    assert c_array.matches(tmp_path / "m.tflite", tmp_path / "model_data.h")
    # A .tflite replaced by a newer export no longer matches the old header.
    (tmp_path / "m.tflite").write_bytes(model[:-1] + b"\x00")
    assert not c_array.matches(tmp_path / "m.tflite", tmp_path / "model_data.h")
    (tmp_path / "old.h").write_text("// an old header\n")
    with pytest.raises(ValueError, match="records no model length"):
        c_array.header_checksum(tmp_path / "old.h")



def _c_pair(tmp_path, model):
    source, header = c_array.render(model, str(tmp_path / "model_data.cc"))
    (tmp_path / "model_data.h").write_text(header)
    (tmp_path / "model_data.cc").write_text(source)
    (tmp_path / "m.tflite").write_bytes(model)
    return source


def test_matches_reads_the_array_in_the_cc(tmp_path):
    model = bytes(range(256)) * 3
    source = _c_pair(tmp_path, model)
    tflite, h, cc = tmp_path / "m.tflite", tmp_path / "model_data.h", tmp_path / "model_data.cc"
    assert c_array.matches(tflite, h)
    assert c_array.source_array(cc) == ("model_data", model, len(model))
    # One byte of the array flipped (0x11 is the 18th byte): the header and
    # the .tflite still agree, the .cc does not.
    cc.write_text(source.replace("0x11,", "0xee,", 1))
    assert not c_array.matches(tflite, h)
    # A byte dropped, a length changed, a value that is no byte.
    cc.write_text(source.replace("0x11, ", "", 1))
    assert not c_array.matches(tflite, h)
    cc.write_text(source.replace(f"_len = {len(model)};", f"_len = {len(model) - 1};"))
    assert not c_array.matches(tflite, h)
    cc.write_text(source.replace("0x11,", "0x111,", 1))
    assert not c_array.matches(tflite, h)
    # Another header's .cc (another symbol).
    cc.write_text(source.replace("model_data", "other_model"))
    assert not c_array.matches(tflite, h)
    # The .cc named explicitly, wherever it is.
    (tmp_path / "elsewhere.cc").write_text(source)
    assert c_array.matches(tflite, h, source_path=tmp_path / "elsewhere.cc")


def test_matches_without_the_cc_or_with_a_foreign_one_says_so(tmp_path):
    _c_pair(tmp_path, b"\x01\x02\x03")
    (tmp_path / "model_data.cc").unlink()
    with pytest.raises(ValueError, match=r"no C source .*model_data\.cc.*source_path="):
        c_array.matches(tmp_path / "m.tflite", tmp_path / "model_data.h")
    (tmp_path / "model_data.cc").write_text("int main() { return 0; }\n")
    with pytest.raises(ValueError, match="holds no model array"):
        c_array.matches(tmp_path / "m.tflite", tmp_path / "model_data.h")
