"""Labelled image grids a person can read: small world images upscaled with nearest neighbour,
one row per model, a label on the left and a caption above each column."""

from __future__ import annotations

from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont

_LABEL_WIDTH = 150
_HEADER = 44
_GAP = 2


def labelled_grid(rows: Sequence[tuple[str, Sequence[Any]]], *, columns: Sequence[str] = (),
                  scale: int = 3) -> Image.Image:
    """A grid with one row per ``(label, images)`` and an optional caption per column; every
    image is upscaled ``scale`` times with nearest neighbour (pixels stay sharp)."""
    if not rows or not rows[0][1]:
        raise ValueError("labelled_grid needs at least one row with images")
    width, height = rows[0][1][0].size
    cell_w, cell_h = width * scale, height * scale
    count = max(len(images) for _, images in rows)
    header = _HEADER if columns else 0
    grid = Image.new("RGB", (_LABEL_WIDTH + count * (cell_w + _GAP), header + len(rows) * (cell_h + _GAP)),
                     (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for column, text in enumerate(columns):
        x = _LABEL_WIDTH + column * (cell_w + _GAP)
        draw.multiline_text((x + 2, 2), _wrap(text, cell_w), fill=(0, 0, 0), font=font, spacing=1)
    for row, (label, images) in enumerate(rows):
        y = header + row * (cell_h + _GAP)
        draw.multiline_text((4, y + cell_h // 2 - 12), _wrap(label, _LABEL_WIDTH - 8), fill=(0, 0, 0), font=font)
        for column, image in enumerate(images):
            x = _LABEL_WIDTH + column * (cell_w + _GAP)
            grid.paste(image.convert("RGB").resize((cell_w, cell_h), Image.Resampling.NEAREST), (x, y))
    return grid


def _wrap(text: str, width: int, char_width: int = 6) -> str:
    """Greedy word wrap for the default bitmap font (about 6 px a character)."""
    limit = max(4, width // char_width)
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= limit:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return "\n".join(lines[:4])
