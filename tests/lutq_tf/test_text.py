"""The one table renderer (`lutq_tf.text`)."""

from lutq_tf import text


def test_grid_pads_columns_and_aligns_numbers_right():
    table = text.grid(("layer", "bytes"), [("conv", "1,024"), ("dense_long", "8")], right={1})
    assert table.splitlines() == [
        "layer       bytes",
        "----------  -----",
        "conv        1,024",
        "dense_long      8",
    ]


def test_markdown_rules_align_all_but_the_first_column_right():
    table = text.markdown(("variant", "acc"), [("float", "87.9")])
    assert table.splitlines() == ["| variant | acc |", "| --- | ---: |", "| float | 87.9 |"]
