"""`benchmarks.export_benchmark` end to end on a tiny configuration."""

import json

import pytest

from benchmarks import export_benchmark


def _table(text, heading):
    """The markdown table under `heading`: header cells and body rows."""
    section = text[text.index(heading):]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in lines[2:]]
    return header, rows


def _number(cell):
    return int(cell.replace(",", ""))


@pytest.mark.slow
def test_quick_digits_run_writes_plausible_markdown_and_json(tmp_path):
    out_dir = tmp_path / "results"
    path = export_benchmark.run_benchmark(
        str(out_dir), str(tmp_path / "work"), quick=True,
        model_names=("digits",), bits=(1,), epochs=1, float_epochs=5,
        latency_runs=10)
    text = open(path).read()

    header, rows = _table(text, "## scikit-learn digits")
    assert header == [name for name, _ in export_benchmark.COLUMNS]
    assert [r[0] for r in rows] == ["float32", "LUT-Q 1-bit / tensor"]
    row = dict(zip(header, rows[1]))
    flash, int8 = _number(row["flash bytes"]), _number(row["int8 bytes"])
    limit, float32 = _number(row["limit bytes"]), _number(row["float32 bytes"])
    # The information limit bounds the file; LUT-Q beats int8, which beats
    # float32.
    assert limit <= flash < int8 < float32
    assert row["over limit"] == (
        f"+{flash - limit:,} ({100 * (flash - limit) / limit:.1f}%)")
    assert _number(row["arena"]) > _number(row["int8 arena"]) > 0
    main, alt = (_number(n) for n in row["arena + alt memory"].split(" + "))
    assert _number(row["int8 arena"]) <= main < _number(row["arena"])
    assert alt == 64 * 288  # the largest kernel, fc1, decoded (int8)
    for column in ("ms/inference", "int8 ms/inference"):
        assert 0.0 < float(row[column]) < 100.0
    for column in ("Keras acc", "TFLM acc"):
        assert 10.0 < float(row[column].rstrip("%")) <= 100.0
    assert row["TFLM n"] == "450"
    # ResNet-8 was not asked for, so it is not listed as skipped either.
    assert "## Skipped" not in text
    assert "alt_decompression_memory_size" in text

    data = json.load(open(out_dir / "export.json"))
    (model,) = data["models"]
    lutq = model["rows"][1]
    assert lutq["over_limit"] == flash - limit
    assert lutq["index_bytes"] + lutq["table_bytes"] < int8
    assert any(t["compressed"] for t in lutq["tensors"])


def test_missing_resnet8_inputs_are_reported_not_fatal(tmp_path):
    reason = export_benchmark.missing_inputs(
        "resnet8", str(tmp_path / "cifar.tgz"), str(tmp_path / "r.h5"))
    assert reason.startswith("CIFAR-10 data not found")
    assert "--cifar10" in reason
    assert export_benchmark.missing_inputs("resnet8", None, None) == (
        "no CIFAR-10 data given (--cifar10)")
    assert export_benchmark.missing_inputs("digits", None, None) is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(model_names=("lenet",), bits=(1,)), "--models"),
    (dict(model_names=("digits",), bits=(0,)), "--bits"),
    (dict(model_names=("digits",), bits=(2,), latency_runs=0),
     "--latency_runs"),
])
def test_bad_arguments_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        export_benchmark.check_args(**kwargs)
