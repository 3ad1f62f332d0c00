"""The measured tables of README.md, benchmarks/RESULTS.md and docs/ are
what their results files say."""

import json
import os

import pytest

from benchmarks import readme


def _read(path):
    with open(path) as f:
        return f.read()


@pytest.mark.parametrize("path", readme.docs(), ids=lambda p: os.path.relpath(p, readme.ROOT))
def test_generated_blocks_match_their_results_files(path):
    if not os.path.exists(path):
        pytest.skip("no such file")
    text = _read(path)
    assert readme.render(text, path) == text, "run `python -m benchmarks.readme`"


def test_every_block_is_rendered_somewhere_and_only_once():
    found = [name for path in readme.docs() if os.path.exists(path)
             for name in readme.blocks(_read(path))]
    assert sorted(found) == sorted(readme.BLOCKS)
    # The headline stays at the front door.
    assert readme.blocks(_read(readme.README)) == ["device"]


def test_an_edited_figure_is_caught():
    path = os.path.join(readme.ROOT, "benchmarks", "RESULTS.md")
    text = _read(path)
    edited = text.replace("| DS-CNN | 53,936 |", "| DS-CNN | 53,937 |", 1)
    assert edited != text
    assert readme.render(edited, path) == text


def test_links_and_data_paths_are_rendered_for_the_file_that_holds_them(monkeypatch):
    monkeypatch.setitem(readme.BLOCKS, "fake", lambda: [
        "`python -m x --cifar10=../shared/data/c.tgz --models_dir=/work/shared/models`",
        "[`r.md`](benchmarks/results/r.md)"])
    text = "<!-- generated: fake -->\n<!-- end -->"
    at_root = readme.render(text, readme.README)
    assert "--cifar10=PATH --models_dir=PATH`" in at_root
    assert "](benchmarks/results/r.md)" in at_root
    in_benchmarks = readme.render(text, os.path.join(readme.ROOT, "benchmarks", "RESULTS.md"))
    assert "](results/r.md)" in in_benchmarks
    in_docs = readme.render(text, os.path.join(readme.ROOT, "docs", "x.md"))
    assert "](../benchmarks/results/r.md)" in in_docs


def test_links_between_the_markdown_files_resolve():
    """Every relative link of the rendered files names an existing file, and
    every `#anchor` into README.md or RESULTS.md names a heading there."""
    import re

    def anchors(path):
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.*)$", _read(path), re.M)}

    for path in readme.docs():
        if not os.path.exists(path):
            continue
        for target in re.findall(r"\]\(([^)\s]+)\)", _read(path)):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            assert os.path.exists(linked), f"{path}: broken link {target}"
            if anchor and linked.endswith(".md"):
                assert anchor in anchors(linked), f"{path}: no heading for {target}"


def test_recipe_block_gives_each_row_its_options_rate_and_target(monkeypatch, tmp_path):
    runs = [{"key": f"test/{v}/e5/seed{s}", "accuracy": a + 0.001 * s}
            for v, a in (("float", 0.85), ("lutq4", 0.848), ("lutq2", 0.80),
                         ("lutq4-pruned50-erk", 0.847)) for s in range(3)]
    record = {"command": "python -m benchmarks.recipe", "epochs": 5, "schedule": "cosine",
              "dictionary_rate": 1.0, "runs": runs,
              "learning_rates": {"float": 3e-4, "lutq4": 3e-4, "lutq2": 1e-3,
                                 "lutq4-pruned50-erk": 3e-4}}
    lenet = {"command": "lenet cmd", "epochs": 5, "runs": [
        {"key": f"test/{v}/e5/seed0", "accuracy": a} for v, a in (("float", 0.993),
                                                                  ("lutq2", 0.990))],
        "learning_rates": {"float": 3e-5, "lutq2": 1e-4, "lutq4": 1e-4},
        "callbacks": {"lutq2": ["pruning-ramp"]}}
    lenet["runs"][1]["key"] = "test/lutq2+pruning-ramp/e5/seed0"
    for name, content in (("recipe.json", record), ("recipe_lenet.json", lenet)):
        (tmp_path / name).write_text(json.dumps(content))
    monkeypatch.setattr(readme, "RESULTS", str(tmp_path))
    lines = readme.recipe()
    assert any("cosine decay to 0" in line and "`dictionary_rate=1`" in line for line in lines)
    split = lines.index(next(line for line in lines if line.startswith("MNIST LeNet-5")))
    rows = {line.split(" | ")[0]: line for line in lines[:split] if line.startswith("| lutq")}
    assert "`bits=4, per_channel=True` | 0.0003 |" in rows["| lutq4"]
    assert rows["| lutq4"].endswith("| -0.20 pp | <= 0.3 pp: met |")
    assert rows["| lutq2"].endswith("| -5.00 pp | <= 2.5 pp: missed by 2.50 pp |")
    # The ERK row as the user writes it: overrides from erk_prune_overrides.
    assert ("`bits=4, per_channel=True, overrides=erk_prune_overrides(model, 0.5)` | 0.0003 |"
            in rows["| lutq4-pruned50-erk"])
    # LeNet's rows: its own targets, each row under its chosen callbacks, and
    # no row for a variant without test runs.
    assert "`lenet cmd`" in lines[split]
    lenet_rows = [line for line in lines[split:] if line.startswith("| lutq")]
    assert lenet_rows == ["| lutq2 | `bits=2, per_channel=True; callbacks: pruning-ramp` | 0.0001 "
                          "| 99.00 % | 1 | -0.30 pp | <= 0.2 pp: missed by 0.10 pp |"]
