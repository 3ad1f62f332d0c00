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
            for v, a in (("float", 0.85), ("lutq4", 0.848), ("lutq2", 0.80)) for s in range(3)]
    record = {"command": "python -m benchmarks.recipe", "epochs": 5, "schedule": "cosine",
              "dictionary_rate": 1.0, "runs": runs,
              "learning_rates": {"float": 3e-4, "lutq4": 3e-4, "lutq2": 1e-3}}
    monkeypatch.setattr(readme, "_json", lambda name: record)
    lines = readme.recipe()
    assert any("cosine decay to 0" in line and "`dictionary_rate=1`" in line for line in lines)
    rows = {line.split(" | ")[0]: line for line in lines if line.startswith("| lutq")}
    assert "`bits=4, per_channel=True` | 0.0003 |" in rows["| lutq4"]
    assert rows["| lutq4"].endswith("| -0.20 pp | <= 0.3 pp: met |")
    assert rows["| lutq2"].endswith("| -5.00 pp | <= 2.5 pp: missed by 2.50 pp |")
