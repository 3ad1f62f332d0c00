"""Plain-text and markdown tables: the one renderer every report uses."""


def grid(header, rows, right=()):
    """A fixed-width text table: header, a rule, then one line per row.

    Args:
        header: column names.
        rows: sequences of cell strings, as long as `header`.
        right: indices of the columns to right-align (numbers).

    Returns:
        The table as one string, without trailing spaces.
    """
    rows = [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(r[i]) for r in [tuple(header), *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])]
                     + [line(r) for r in rows])


def markdown(header, rows, right=None):
    """A GitHub markdown table; `right` as in `grid` (default: all but the first)."""
    if right is None:
        right = range(1, len(header))
    rule = ["---:" if i in right else "---" for i in range(len(header))]
    return "\n".join("| " + " | ".join(str(c) for c in cells) + " |"
                     for cells in [header, rule, *rows])
