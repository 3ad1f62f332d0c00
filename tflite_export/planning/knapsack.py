"""Multiple-choice knapsack: one option per group, least cost within a size.

Exact dynamic programming on a byte grid. Each option's bytes are rounded
up to the grid, so a solution found on the grid also fits in real bytes;
with `grid=1` the result is the exact optimum. Options may carry a second
cost that breaks ties of the first (e.g. decode instructions between
choices of equal sensitivity).
"""

import math

import numpy as np


def solve(groups, capacity, grid=None, max_cells=50_000):
    """Picks one option per group: least total cost, total bytes <= capacity.

    Args:
        groups: A list of groups, each a non-empty list of `(bytes, cost)`
            or `(bytes, cost, tie)` options (bytes an int >= 0, cost and
            tie floats): among solutions of equal total cost (to a relative
            1e-9), the least total `tie` (0 where not given).
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
    floors = [min(option[0] for option in g) for g in groups]
    spare = int(capacity) - sum(floors)
    if spare < 0:
        return None
    if grid is None:
        grid = max(1, math.ceil(spare / max_cells))
    cells = spare // grid + 1
    inf = np.inf
    best = np.zeros(cells)  # least cost with extra units <= w (no group yet)
    ties = np.zeros(cells)  # its tie-breaking cost
    picks = []
    for group, floor in zip(groups, floors):
        new = np.full(cells, inf)
        new_ties = np.full(cells, inf)
        pick = np.full(cells, -1, np.int32)
        for index, option in enumerate(group):
            size, cost = option[0], option[1]
            tie = float(option[2]) if len(option) > 2 else 0.0
            units = -(-(int(size) - floor) // grid)  # rounded up: stays feasible
            if units >= cells:
                continue
            candidate = np.full(cells, inf)
            candidate[units:] = best[: cells - units] + float(cost)
            candidate_ties = np.full(cells, inf)
            candidate_ties[units:] = ties[: cells - units] + tie
            with np.errstate(invalid="ignore"):  # inf - inf where neither fits
                close = np.abs(candidate - new) <= 1e-9 * np.maximum(
                    1.0, np.minimum(np.abs(candidate), np.abs(new)))
            better = np.isfinite(candidate) & (
                (candidate < new) & ~close | close & (candidate_ties < new_ties))
            new[better] = candidate[better]
            new_ties[better] = candidate_ties[better]
            pick[better] = index
        best, ties = new, new_ties
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
