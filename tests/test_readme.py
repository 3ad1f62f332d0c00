"""The README's measured tables are what their results files say."""

from benchmarks import readme


def test_readme_tables_match_their_results_files():
    with open(readme.README) as f:
        text = f.read()
    names = [m.group(2) for m in readme._BLOCK.finditer(text)]
    assert {"mlperf_flash", "dictionary_modes", "quickstart", "train_speed"} <= set(names)
    assert readme.render(text) == text, "run `python -m benchmarks.readme`"


def test_an_edited_figure_is_caught():
    with open(readme.README) as f:
        text = f.read()
    edited = text.replace("| DS-CNN | 53,936 |", "| DS-CNN | 53,937 |", 1)
    assert edited != text
    assert readme.render(edited) == text


def test_recipe_block_gives_each_row_its_options_rate_and_target(monkeypatch):
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
    monkeypatch.setattr(readme, "_json", {"recipe.json": record, "recipe_lenet.json": lenet}.get)
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
