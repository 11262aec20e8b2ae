"""A small labelled scatter plot drawn with PIL (no plotting library needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

WIDTH, HEIGHT = 720, 480
LEFT, RIGHT, TOP, BOTTOM = 80, 40, 40, 60  # margins around the plotting area
#: Colour of each kind of row.
COLOURS = {"constrained": (31, 119, 180), "soft": (44, 160, 44), "sum": (214, 39, 40),
           "average": (255, 127, 14), "base": (90, 90, 90), "plain-base": (150, 150, 150),
           "delta": (148, 103, 189)}


def draw_scatter(points: Sequence[tuple[float, float, str, str]], curve: Sequence[tuple[float, float]], *,
                 title: str, x_label: str, y_label: str) -> Any:
    """A PIL image: ``points`` as (x, y, label, kind) dots with labels, ``curve`` as a line."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    xs = [p[0] for p in points] + [0.0]
    ys = [p[1] for p in points] + [0.0, 1.0]
    x_low, x_high = _range(min(xs), max(xs))
    y_low, y_high = _range(min(ys), max(ys))
    right, bottom = WIDTH - RIGHT, HEIGHT - BOTTOM

    def at(x: float, y: float) -> tuple[float, float]:
        return (LEFT + (x - x_low) / (x_high - x_low) * (right - LEFT),
                bottom - (y - y_low) / (y_high - y_low) * (bottom - TOP))

    for tick in _ticks(x_low, x_high):
        px, _ = at(tick, y_low)
        draw.line([(px, TOP), (px, bottom)], fill=(235, 235, 235))
        draw.text((px, bottom + 6), f"{tick:g}", fill="black", font=font, anchor="mt")
    for tick in _ticks(y_low, y_high):
        _, py = at(x_low, tick)
        draw.line([(LEFT, py), (right, py)], fill=(235, 235, 235))
        draw.text((LEFT - 6, py), f"{tick:g}", fill="black", font=font, anchor="rm")
    draw.rectangle([(LEFT, TOP), (right, bottom)], outline="black")
    draw.text((WIDTH / 2, 14), title, fill="black", font=font, anchor="mt")
    draw.text(((LEFT + right) / 2, HEIGHT - 18), x_label, fill="black", font=font, anchor="mm")
    label = Image.new("RGB", (int(draw.textlength(y_label, font=font)) + 4, 14), "white")
    ImageDraw.Draw(label).text((2, 1), y_label, fill="black", font=font)
    rotated = label.rotate(90, expand=True)
    image.paste(rotated, (12, int((TOP + bottom - rotated.height) / 2)))

    if len(curve) > 1:
        draw.line([at(x, y) for x, y in curve], fill=COLOURS["soft"], width=2)
    taken: list[tuple[float, float, float, float]] = []  # label boxes drawn so far
    for (px, py), names, kind in _group([(at(x, y), name, kind) for x, y, name, kind in points]):
        colour = COLOURS.get(kind, (0, 0, 0))
        draw.ellipse([(px - 4, py - 4), (px + 4, py + 4)], fill=colour)
        text = " = ".join(names)
        width = draw.textlength(text, font=font)
        top = py - 7
        while any(_overlap((px + 7, top, px + 7 + width, top + 12), box) for box in taken):
            top += 12  # step down until the label is clear of the others
        taken.append((px + 7, top, px + 7 + width, top + 12))
        draw.text((px + 7, top), text, fill=colour, font=font)
    return image


def _group(points: Sequence[tuple[tuple[float, float], str, str]]) -> list[tuple[tuple[float, float], list[str], str]]:
    """Points that land on the same spot (within 2 pixels) become one dot with all their names."""
    groups: list[tuple[tuple[float, float], list[str], str]] = []
    for position, name, kind in points:
        for spot, names, _ in groups:
            if abs(spot[0] - position[0]) <= 2 and abs(spot[1] - position[1]) <= 2:
                names.append(name)
                break
        else:
            groups.append((position, [name], kind))
    return groups


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _range(low: float, high: float) -> tuple[float, float]:
    """Padded axis limits; a single value gets a unit-wide window."""
    if high - low < 1e-12:
        return low - 0.5, high + 0.5
    pad = 0.08 * (high - low)
    return low - pad, high + pad


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick positions (1, 2 or 5 times a power of ten apart) inside [low, high]."""
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step) * step
    return [round(first + i * step, 12) for i in range(int((high - first) / step) + 1)]
