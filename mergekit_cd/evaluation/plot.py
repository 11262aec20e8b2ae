"""The labelled scatter plot of ``cd-eval --plot``, drawn with matplotlib (the ``plot`` extra)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from ..errors import MergeError

#: Size of the plot in pixels (at 100 dpi).
WIDTH, HEIGHT = 720, 480
#: Colour of each kind of row (matplotlib's tab10 colours).
COLOURS = {"constrained": "tab:blue", "soft": "tab:green", "hybrid": "tab:cyan", "sum": "tab:red",
           "average": "tab:orange", "base": "dimgray", "plain-base": "darkgray", "delta": "tab:purple"}


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or one clear error saying how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise MergeError("--plot needs matplotlib, which is not installed: pip install 'mergekit-cd[plot]' "
                         "(or pip install matplotlib).") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def draw_scatter(points: Sequence[tuple[float, float, str, str]], curve: Sequence[tuple[float, float]], *,
                 title: str, x_label: str, y_label: str) -> Any:
    """A PIL image: ``points`` as (x, y, label, kind) dots with labels (points on one spot share a dot
    and a label), ``curve`` as a line through the soft merges."""
    from PIL import Image

    plt = require_matplotlib()
    figure, axes = plt.subplots(figsize=(WIDTH / 100, HEIGHT / 100), dpi=100)
    try:
        if len(curve) > 1:
            axes.plot(*zip(*curve), color=COLOURS["soft"], linewidth=1.5, zorder=1)
        for (x, y), names, kind in _group(points):
            colour = COLOURS.get(kind, "black")
            axes.scatter([x], [y], color=colour, s=30, zorder=2)
            axes.annotate(" = ".join(names), (x, y), xytext=(6, 4), textcoords="offset points", fontsize=8,
                          color=colour)
        axes.axvline(0.0, color="lightgray", linewidth=0.8, zorder=0)
        axes.margins(x=0.15)  # room for the labels right of the rightmost dots
        axes.set_ylim(bottom=min(0.0, *(y for _, y, _, _ in points)) - 0.05,
                      top=max(1.0, *(y for _, y, _, _ in points)) + 0.05)
        axes.grid(True, color="0.92")
        axes.set_title(title, fontsize=10)
        axes.set_xlabel(x_label)
        axes.set_ylabel(y_label)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(figure)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return image.convert("RGB")


def _group(points: Sequence[tuple[float, float, str, str]]) -> list[tuple[tuple[float, float], list[str], str]]:
    """Points within 0.5% of the axis ranges of each other become one dot with all their names
    (the plain sum and the plain average of one concept coincide, for example)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    tolerance_x = 0.005 * max(max(xs, default=0) - min(xs, default=0), 1e-12)
    tolerance_y = 0.005 * max(max(ys, default=0) - min(ys, default=0), 1e-12)
    groups: list[tuple[tuple[float, float], list[str], str]] = []
    for x, y, name, kind in points:
        for spot, names, _ in groups:
            if abs(spot[0] - x) <= tolerance_x and abs(spot[1] - y) <= tolerance_y:
                names.append(name)
                break
        else:
            groups.append(((x, y), [name], kind))
    return groups
