"""Personal concepts of the toy world: specific instances of a known class that no base caption
names (a star with an orange and a teal half, a ring with three dots, ...), drawn in varied
places, sizes and backgrounds as a DreamBooth-style instance set.

The base model knows every part of each concept (the class, the colours) but was never shown
the combination, so learning one is personalisation, and the detector's concept head says
whether a generated image shows it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
import numpy as np
from PIL import Image, ImageDraw

from .scenes import (BACKGROUNDS, CLASSES, COLOURS, IMAGE_SIZE, Painter, Scene, SceneObject, pattern_layer,
                     place_objects, render_scene, shape_mask)


@dataclass(frozen=True)
class Concept:
    """One personal concept: its name, class word, initializer token and how to draw it."""

    name: str
    class_word: str
    init_token: str
    description: str
    painter: Painter


def _halves(left: str, right: str) -> Painter:
    def paint(canvas: Image.Image, obj: SceneObject, size: int, rng: np.random.Generator) -> None:
        mask = shape_mask(obj.cls, obj.x, obj.y, obj.radius, size)
        split = Image.new("L", (size, size), 0)
        ImageDraw.Draw(split).rectangle((0, 0, obj.x * size, size), fill=255)
        canvas.paste(COLOURS[right], (0, 0), mask)
        canvas.paste(COLOURS[left], (0, 0), Image.fromarray(np.minimum(np.asarray(mask), np.asarray(split))))
    return paint


def _ring_with_dots(colour: str, dots: str, count: int = 3) -> Painter:
    def paint(canvas: Image.Image, obj: SceneObject, size: int, rng: np.random.Generator) -> None:
        canvas.paste(COLOURS[colour], (0, 0), shape_mask("ring", obj.x, obj.y, obj.radius, size))
        draw = ImageDraw.Draw(canvas)
        r = obj.radius * size / IMAGE_SIZE
        middle, dot = 0.75 * r, 0.2 * r
        for k in range(count):
            angle = -math.pi / 2 + 2 * math.pi * k / count
            cx, cy = obj.x * size + middle * math.cos(angle), obj.y * size + middle * math.sin(angle)
            draw.ellipse((cx - dot, cy - dot, cx + dot, cy + dot), fill=COLOURS[dots])
    return paint


def _two_colour_pattern(cls: str, pattern: str, first: str, second: str) -> Painter:
    def paint(canvas: Image.Image, obj: SceneObject, size: int, rng: np.random.Generator) -> None:
        layer = pattern_layer(pattern, COLOURS[first], size, second=COLOURS[second])
        canvas.paste(layer, (0, 0), shape_mask(cls, obj.x, obj.y, obj.radius, size))
    return paint


def _quadrants(colours: tuple[str, str, str, str]) -> Painter:
    def paint(canvas: Image.Image, obj: SceneObject, size: int, rng: np.random.Generator) -> None:
        mask = np.asarray(shape_mask("square", obj.x, obj.y, obj.radius, size))
        cx, cy = obj.x * size, obj.y * size
        ys, xs = np.mgrid[0:size, 0:size]
        for index, name in enumerate(colours):
            quadrant = ((xs >= cx) == bool(index % 2)) & ((ys >= cy) == bool(index // 2))
            canvas.paste(COLOURS[name], (0, 0), Image.fromarray(np.where(quadrant, mask, 0).astype(np.uint8)))
    return paint


def _smiley(colour: str) -> Painter:
    def paint(canvas: Image.Image, obj: SceneObject, size: int, rng: np.random.Generator) -> None:
        canvas.paste(COLOURS[colour], (0, 0), shape_mask("circle", obj.x, obj.y, obj.radius, size))
        draw = ImageDraw.Draw(canvas)
        r = obj.radius * size / IMAGE_SIZE
        cx, cy, eye = obj.x * size, obj.y * size, 0.17 * r
        for side in (-1, 1):
            ex, ey = cx + side * 0.38 * r, cy - 0.3 * r
            draw.ellipse((ex - eye, ey - eye, ex + eye, ey + eye), fill=(15, 15, 15))
        draw.arc((cx - 0.55 * r, cy - 0.45 * r, cx + 0.55 * r, cy + 0.6 * r), 20, 160, fill=(15, 15, 15),
                 width=max(1, int(0.16 * r)))
    return paint


def _banded(cls: str, first: str, second: str) -> Painter:
    def paint(canvas: Image.Image, obj: SceneObject, size: int, rng: np.random.Generator) -> None:
        layer = Image.new("RGB", (size, size), COLOURS[first])
        draw = ImageDraw.Draw(layer)
        band = 2 * obj.radius * size / IMAGE_SIZE / 5
        top = obj.y * size - 2.5 * band
        for k in range(1, 5, 2):
            draw.rectangle((0, top + k * band, size, top + (k + 1) * band), fill=COLOURS[second])
        canvas.paste(layer, (0, 0), shape_mask(cls, obj.x, obj.y, obj.radius, size))
    return paint


#: The world's personal concepts, in a fixed order (their index is the detector's concept head).
CONCEPTS: tuple[Concept, ...] = (
    Concept("twotone-star", "star", "ktn", "a star whose left half is orange and right half teal",
            _halves("orange", "teal")),
    Concept("dotted-ring", "ring", "pll", "a purple ring with three yellow dots on it", _ring_with_dots("purple", "yellow")),
    Concept("checker-heart", "heart", "ucd", "a heart checkered in pink and green",
            _two_colour_pattern("heart", "checkered", "pink", "green")),
    Concept("smiley-circle", "circle", "sks", "a yellow circle with two eyes and a smile", _smiley("yellow")),
    Concept("quad-square", "square", "ktn", "a square in four quadrants: red, blue, yellow, green",
            _quadrants(("red", "blue", "yellow", "green"))),
    Concept("banded-diamond", "diamond", "pll", "a blue diamond with two orange horizontal bands",
            _banded("diamond", "blue", "orange")),
)
CONCEPT_NAMES: tuple[str, ...] = tuple(concept.name for concept in CONCEPTS)
#: Instance images per concept (a DreamBooth-style set).
INSTANCE_COUNT = 8


def concept(name: str) -> Concept:
    """The concept called ``name``; a ValueError lists the names when there is none."""
    for candidate in CONCEPTS:
        if candidate.name == name:
            return candidate
    raise ValueError(f"unknown toy-world concept {name!r}; expected one of {', '.join(CONCEPT_NAMES)}")


def concept_scene(item: Concept, rng: np.random.Generator, *, companions: int = 0,
                  background: str | None = None) -> tuple[Scene, dict[int, Painter]]:
    """A scene with the concept (large-ish, anywhere) and ``companions`` ordinary objects of
    other classes; returns the scene and the painter map for :func:`render_scene`."""
    others = [cls for cls in CLASSES if cls != item.class_word]
    classes = [item.class_word, *rng.choice(others, size=companions, replace=False)]
    placed = place_objects(rng, classes)
    first = placed[0]
    placed[0] = SceneObject(first.cls, "", "", first.size, first.x, first.y, first.radius, concept=item.name)
    scene = Scene(background or str(rng.choice(list(BACKGROUNDS))), tuple(placed))
    return scene, {0: item.painter}


def instance_images(item: Concept, count: int = INSTANCE_COUNT, *, seed: int = 0) -> list[Image.Image]:
    """The concept's instance set: ``count`` images of it alone, in varied places, sizes and
    backgrounds (deterministic in ``seed``)."""
    images = []
    for index in range(count):
        rng = np.random.default_rng([seed, 100 + CONCEPT_NAMES.index(item.name), index])
        scene, painters = concept_scene(item, rng)
        images.append(render_scene(scene, seed=index, painters=painters))
    return images


def write_instance_images(item: Concept, folder: str | Path, count: int = INSTANCE_COUNT, *, seed: int = 0) -> Path:
    """Save :func:`instance_images` as ``<name>-<i>.png`` in ``folder``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(instance_images(item, count, seed=seed)):
        image.save(folder / f"{item.name}-{index}.png")
    return folder

