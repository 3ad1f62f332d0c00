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
