"""Multiple-choice knapsack: one option per group, least cost within a size.

Exact dynamic programming on a byte grid. Each option's bytes are rounded
up to the grid, so a solution found on the grid also fits in real bytes;
with `grid=1` the result is the exact optimum.
"""

import math

import numpy as np


def solve(groups, capacity, grid=None, max_cells=50_000):
    """Picks one option per group: least total cost, total bytes <= capacity.

    Args:
        groups: A list of groups, each a non-empty list of `(bytes, cost)`
            options (bytes an int >= 0, cost a float).
        capacity: Total bytes allowed (an int).
        grid: Bytes per DP cell; default the smallest that keeps the table
            at most `max_cells` wide (1, exact, for small problems).
        max_cells: Width bound used to choose `grid`.

    Returns:
        A list with the chosen option's index per group, or None when even
        the smallest options exceed `capacity`.
    """
    if not groups:
        return []
    if any(not g for g in groups):
        raise ValueError("every group needs at least one option")
    # Work above each group's smallest option: the grid then spans only the
    # bytes the choices can trade.
    floors = [min(b for b, _ in g) for g in groups]
    spare = int(capacity) - sum(floors)
    if spare < 0:
        return None
    if grid is None:
        grid = max(1, math.ceil(spare / max_cells))
    cells = spare // grid + 1
    inf = np.inf
    best = np.zeros(cells)  # least cost with extra units <= w (no group yet)
    picks = []
    for group, floor in zip(groups, floors):
        new = np.full(cells, inf)
        pick = np.full(cells, -1, np.int32)
        for index, (size, cost) in enumerate(group):
            units = -(-(int(size) - floor) // grid)  # rounded up: stays feasible
            if units >= cells:
                continue
            candidate = np.full(cells, inf)
            candidate[units:] = best[: cells - units] + float(cost)
            better = candidate < new
            new[better] = candidate[better]
            pick[better] = index
        best = new
        picks.append(pick)
    if not np.isfinite(best[-1]):
        return None
    choice = []
    w = cells - 1
    for group, floor, pick in zip(reversed(groups), reversed(floors), reversed(picks)):
        index = int(pick[w])
        choice.append(index)
        w -= -(-(int(group[index][0]) - floor) // grid)
    return choice[::-1]
