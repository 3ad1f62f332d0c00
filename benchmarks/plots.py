"""The benchmark plots (matplotlib, Agg backend: no display needed).

- `accuracy_vs_bytes`: one panel per suite, accuracy against .tflite size
  for every variant, the Pareto front drawn and its points labelled.
- `weight_histogram`: a LUT-Q layer's float weights W with its dictionary
  entries d marked.

`python -m benchmarks.run_all --report_only` redraws them with results.md.
"""

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless machines, CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.pipeline import pareto_front  # noqa: E402


def _accuracy(row):
    """TFLM accuracy (what the device gets), else the Keras one."""
    return row.tflm_accuracy if row.tflm_accuracy is not None else row.keras_accuracy


def accuracy_vs_bytes(panels, path):
    """Accuracy vs flash bytes, one panel per suite.

    Args:
        panels: list of `(title, rows)`, rows being `pipeline.ResultRow`s;
            rows without size or accuracy (failed variants) are left out.
        path: the .png to write.

    Returns:
        `path`.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5),
                             squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels):
        rows = [r for r in rows
                if r.flash_bytes is not None and _accuracy(r) is not None]
        points = [(r.flash_bytes, 100 * _accuracy(r)) for r in rows]
        front = pareto_front(points)
        for i, (row, (x, y)) in enumerate(zip(rows, points)):
            marker = ("s" if row.bits is None else
                      "^" if row.per_channel else "o")
            ax.scatter(x, y, marker=marker, s=40, zorder=3,
                       color="tab:red" if i in front else "tab:gray")
            if i in front:
                # Right-align the rightmost labels so they stay inside.
                right = x >= max(p[0] for p in points)
                ax.annotate(row.variant, (x, y), textcoords="offset points",
                            xytext=(-5 if right else 5, -10), fontsize=7,
                            ha="right" if right else "left")
        if front:
            xs, ys = zip(*(points[i] for i in front))
            ax.step(xs, ys, where="post", color="tab:red", lw=1, zorder=2,
                    label="Pareto front")
        ax.set_xscale("log")
        ax.margins(x=0.08, y=0.08)
        ax.set_xlabel("flash bytes (.tflite size, log scale)")
        ax.set_ylabel("test accuracy on TFLM (%)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        # Legend for the marker shapes (proxy artists).
        for marker, label in (("s", "float / int8 baseline"),
                              ("o", "LUT-Q per tensor"),
                              ("^", "LUT-Q per channel")):
            ax.scatter([], [], marker=marker, color="tab:gray", label=label)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def weight_histogram(weights, dictionary, path, title):
    """Histogram of a layer's float weights with its dictionary marked.

    Args:
        weights: the float weights W (any shape; flattened).
        dictionary: the LUT-Q dictionary `[K, C]` (C = 1 per tensor; per
            channel only the first channel's entries are drawn).
        path: the .png to write.
        title: the plot title.

    Returns:
        `path`.
    """
    weights = np.ravel(weights)
    entries = np.asarray(dictionary)[:, 0]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(weights, bins=200, color="tab:blue", alpha=0.8, log=True)
    for value in entries:
        ax.axvline(value, color="tab:red", lw=1)
    ax.plot([], [], color="tab:red", label=f"dictionary (K={len(entries)})")
    ax.set_xlabel("weight value W (float, before d[A])")
    ax.set_ylabel("count (log)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
