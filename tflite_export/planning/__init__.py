"""Flash planning: bits, dictionary mode or int8 per layer for a byte budget.

`planner.plan_budget` measures each layer's sensitivity and its cost in the
file (and on a device target), then solves a knapsack.
"""
