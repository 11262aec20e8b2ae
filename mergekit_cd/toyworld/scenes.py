"""The toy world's scenes: seeded layouts of coloured, patterned shapes on a background,
rendered to small RGB images, with exact labels and captions from varied templates.

Everything is deterministic in ``(seed, index)``: :func:`sample_scene` draws scene ``index`` of
the stream ``seed`` with its own generator, so datasets can be rebuilt, split and extended
without storing them. Objects never overlap and a scene never holds two objects of one class,
so "which (class, colour, pattern) objects are present" has one exact answer per image.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

#: Rendered image side in pixels (measured: at 32 px the eight shapes and four patterns stay
#: distinct to a person and to the detector, at a quarter of the compute of 64 px).
IMAGE_SIZE = 32
#: Supersampling factor: shapes are drawn this much larger, then box-filtered down.
_SUPERSAMPLE = 4

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "ring", "cross", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35), "orange": (250, 135, 20), "yellow": (245, 225, 40), "green": (40, 175, 60),
    "teal": (20, 185, 185), "blue": (40, 75, 235), "purple": (145, 55, 205), "pink": (250, 125, 195),
}
PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted", "checkered")
#: Background name -> caption phrase. Plain colours and four scenes.
BACKGROUNDS: dict[str, str] = {
    "white": "on a white background", "gray": "on a gray background", "black": "on a black background",
    "grass": "on grass", "night": "at night", "beach": "on the beach", "snow": "in snow",
}
#: Radius ranges in px at 32 px; the size word of a drawn object follows its final radius
#: (crowded scenes shrink objects), with ``LARGE_RADIUS`` as the border.
SIZES: dict[str, tuple[float, float]] = {"small": (4.5, 6.5), "large": (8.5, 11.5)}
LARGE_RADIUS = 7.5
#: Radii shrink with the number of objects so that three always fit.
_CROWDING = {1: 1.0, 2: 0.78, 3: 0.62}
POSITIONS: dict[str, tuple[float, float]] = {
    "on the left": (0.28, 0.5), "on the right": (0.72, 0.5), "at the top": (0.5, 0.28),
    "at the bottom": (0.5, 0.72), "in the center": (0.5, 0.5),
}
#: Marks of a pattern are the object's colour darkened to this fraction.
_PATTERN_SHADE = 0.3


@dataclass(frozen=True)
class SceneObject:
    """One object: class, colour and pattern names, size word, centre (0..1) and radius (px)."""

    cls: str
    colour: str
    pattern: str
    size: str
    x: float
    y: float
    radius: float
    concept: str | None = None  # the name of the personal concept drawn here, if any


@dataclass(frozen=True)
class Scene:
    """A background and one to three objects of distinct classes: the labels of one image."""

    background: str
    objects: tuple[SceneObject, ...]
    position: str | None = None  # the position phrase, when a single object was placed by one
    extras: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        """The labels as plain JSON-ready data."""
        return {"background": self.background, "position": self.position,
                "objects": [asdict(obj) for obj in self.objects]}


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of scene ``index`` in stream ``seed`` (independent of every other scene)."""
    return np.random.default_rng([seed, index])


def sample_scene(seed: int, index: int, *, max_objects: int = 3) -> Scene:
    """Scene ``index`` of stream ``seed``: 1 to ``max_objects`` objects, weighted towards fewer."""
    rng = scene_rng(seed, index)
    count = int(rng.choice(np.arange(1, max_objects + 1), p=_count_weights(max_objects)))
    background = str(rng.choice(list(BACKGROUNDS)))
    classes = rng.choice(len(CLASSES), size=count, replace=False)
    position = str(rng.choice(list(POSITIONS))) if count == 1 and rng.random() < 0.35 else None
    objects = place_objects(rng, [CLASSES[i] for i in classes], position=position)
    return Scene(background, tuple(objects), position)


def _count_weights(max_objects: int) -> np.ndarray:
    weights = np.array([0.5, 0.3, 0.2][:max_objects])
    return weights / weights.sum()


def place_objects(rng: np.random.Generator, classes: Sequence[str], *, position: str | None = None,
                  colours: Sequence[str] | None = None, patterns: Sequence[str] | None = None) -> list[SceneObject]:
    """Random colour, pattern, size and a non-overlapping place for each class (sizes shrink
    until everything fits, so placement always succeeds)."""
    objects: list[SceneObject] = []
    for slot, cls in enumerate(classes):
        colour = colours[slot] if colours else str(rng.choice(list(COLOURS)))
        pattern = patterns[slot] if patterns else str(rng.choice(PATTERNS))
        size = str(rng.choice(list(SIZES), p=[0.45, 0.55] if len(classes) == 1 else [0.6, 0.4]))
        radius = float(rng.uniform(*SIZES[size])) * _CROWDING[len(classes)]
        for attempt in range(400):
            r = max(4.0, radius * 0.93 ** (attempt // 25))
            if position is not None:
                cx, cy = POSITIONS[position]
                x, y = cx + rng.uniform(-0.06, 0.06), cy + rng.uniform(-0.06, 0.06)
            else:
                x, y = rng.uniform(0, 1, size=2)
            margin = (r + 1) / IMAGE_SIZE
            x, y = float(np.clip(x, margin, 1 - margin)), float(np.clip(y, margin, 1 - margin))
            if all(math.dist((x, y), (o.x, o.y)) * IMAGE_SIZE > r + o.radius + 1.5 for o in objects):
                objects.append(SceneObject(cls, colour, pattern, "large" if r >= LARGE_RADIUS else "small",
                                           x, y, r))
                break
        else:  # pragma: no cover - the shrinking radius makes this unreachable for <= 3 objects
            raise RuntimeError("could not place the objects")
    return objects


# --- rendering ------------------------------------------------------------------------------

def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    return [((1.0 if i % 2 == 0 else inner) * math.sin(math.pi * i / points),
             -(1.0 if i % 2 == 0 else inner) * math.cos(math.pi * i / points)) for i in range(2 * points)]


def _heart() -> list[tuple[float, float]]:
    points = []
    for i in range(64):
        t = 2 * math.pi * i / 64
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        points.append((x / 17.0, -(y + 2.5) / 17.0))
    return points


_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(0.0, -1.0), (0.92, 0.75), (-0.92, 0.75)],
    "star": _star(),
    "heart": _heart(),
    "cross": [(-0.32, -1), (0.32, -1), (0.32, -0.32), (1, -0.32), (1, 0.32), (0.32, 0.32), (0.32, 1), (-0.32, 1),
              (-0.32, 0.32), (-1, 0.32), (-1, -0.32), (-0.32, -0.32)],
    "diamond": [(0.0, -1.0), (0.72, 0.0), (0.0, 1.0), (-0.72, 0.0)],
}


def shape_mask(cls: str, x: float, y: float, radius: float, size: int) -> Image.Image:
    """An 'L' mask (255 inside) of one shape at centre (x, y) in 0..1 and ``radius`` px of a
    ``size``-px canvas (drawn at the supersampled size the caller gives)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, r = x * size, y * size, radius * size / IMAGE_SIZE
    if cls in ("circle", "ring"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if cls == "ring":
            inner = 0.5 * r
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    else:
        draw.polygon([(cx + r * px, cy + r * py) for px, py in _POLYGONS[cls]], fill=255)
    return mask


def pattern_layer(pattern: str, colour: tuple[int, int, int], size: int, *, phase: int = 0,
                  second: tuple[int, int, int] | None = None) -> Image.Image:
    """A full-canvas RGB fill of ``pattern``: the colour with marks in ``second`` (by default the
    colour darkened), stripes diagonal, dots and checks on a grid (periods in 32-px pixels)."""
    marks = second or tuple(int(c * _PATTERN_SHADE) for c in colour)
    layer = Image.new("RGB", (size, size), colour)
    if pattern == "solid":
        return layer
    scale = size / IMAGE_SIZE
    draw = ImageDraw.Draw(layer)
    if pattern == "striped":
        period = 4.0 * scale
        for k in range(-2 * size, 2 * size, int(period)):
            offset = k + phase
            draw.polygon([(offset, 0), (offset + period / 2, 0), (offset + period / 2 + size, size),
                          (offset + size, size)], fill=marks)
    elif pattern == "dotted":
        period, dot = 4.0 * scale, 1.0 * scale
        for gx in np.arange(phase % period, size, period):
            for gy in np.arange(phase % period, size, period):
                draw.ellipse((gx - dot, gy - dot, gx + dot, gy + dot), fill=marks)
    elif pattern == "checkered":
        cell = 3.0 * scale
        for i in range(int(size / cell) + 1):
            for j in range(int(size / cell) + 1):
                if (i + j) % 2:
                    draw.rectangle((i * cell + phase, j * cell + phase, (i + 1) * cell + phase - 1,
                                    (j + 1) * cell + phase - 1), fill=marks)
    else:
        raise ValueError(f"unknown pattern {pattern!r}; expected one of {', '.join(PATTERNS)}")
    return layer


def background_image(name: str, size: int, rng: np.random.Generator) -> Image.Image:
    """The background canvas: a plain colour, or a simple scene with a little random texture."""
    plain = {"white": (248, 248, 248), "gray": (128, 128, 128), "black": (18, 18, 18)}
    if name in plain:
        return Image.new("RGB", (size, size), plain[name])
    scale = size / IMAGE_SIZE
    if name == "grass":
        image = Image.new("RGB", (size, size), (62, 112, 48))
        draw = ImageDraw.Draw(image)
        for _ in range(60):
            gx, gy = rng.uniform(0, size, size=2)
            draw.line((gx, gy, gx + rng.uniform(-1, 1) * scale, gy - 2 * scale), fill=(88, 140, 60),
                      width=max(1, int(scale / 2)))
    elif name == "night":
        image = Image.new("RGB", (size, size), (14, 16, 44))
        draw = ImageDraw.Draw(image)
        for _ in range(10):
            gx, gy = rng.uniform(0, size, size=2)
            draw.ellipse((gx, gy, gx + 0.6 * scale, gy + 0.6 * scale), fill=(230, 230, 200))
    elif name == "beach":
        image = Image.new("RGB", (size, size), (205, 178, 128))
        draw = ImageDraw.Draw(image)
        horizon = int(rng.uniform(0.3, 0.42) * size)
        draw.rectangle((0, 0, size, horizon), fill=(92, 150, 205))
    elif name == "snow":
        image = Image.new("RGB", (size, size), (226, 232, 240))
        draw = ImageDraw.Draw(image)
        for _ in range(25):
            gx, gy = rng.uniform(0, size, size=2)
            draw.ellipse((gx, gy, gx + 0.7 * scale, gy + 0.7 * scale), fill=(255, 255, 255))
    else:
        raise ValueError(f"unknown background {name!r}; expected one of {', '.join(BACKGROUNDS)}")
    return image


#: A custom painter for one object: (canvas, object, supersampled size, rng) -> None. Concepts
#: use it to draw instances no base caption names.
Painter = Callable[[Image.Image, SceneObject, int, np.random.Generator], None]


def paint_object(canvas: Image.Image, obj: SceneObject, size: int, rng: np.random.Generator) -> None:
    """Draw one ordinary object (its shape filled with its pattern) onto ``canvas``."""
    phase = int(rng.integers(0, int(4 * size / IMAGE_SIZE)))
    fill = pattern_layer(obj.pattern, COLOURS[obj.colour], size, phase=phase)
    canvas.paste(fill, (0, 0), shape_mask(obj.cls, obj.x, obj.y, obj.radius, size))


def render_scene(scene: Scene, *, seed: int = 0, painters: dict[int, Painter] | None = None) -> Image.Image:
    """The scene as an ``IMAGE_SIZE`` RGB image (drawn supersampled, then box-filtered).

    ``painters`` maps object slots to custom painters (concept instances); ``seed`` only moves
    texture (grass blades, pattern phase), never a label.
    """
    size = IMAGE_SIZE * _SUPERSAMPLE
    rng = np.random.default_rng([seed, 7])
    canvas = background_image(scene.background, size, rng)
    for slot, obj in enumerate(scene.objects):
        (painters or {}).get(slot, paint_object)(canvas, obj, size, rng)
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


# --- captions -------------------------------------------------------------------------------

def object_phrase(obj: SceneObject, rng: np.random.Generator, *, full: bool = False, noun: str | None = None) -> str:
    """``[size] [colour] [pattern] class``: each attribute is named with a fixed probability,
    all of them when ``full``; ``noun`` replaces the class word (e.g. ``"<new1> star"``)."""
    words = []
    if full or rng.random() < 0.25:
        words.append(obj.size)
    if full or rng.random() < 0.85:
        words.append(obj.colour)
    if obj.pattern != "solid" and (full or rng.random() < 0.75):
        words.append(obj.pattern)
    elif obj.pattern == "solid" and (full or rng.random() < 0.2):
        words.append("solid")
    words.append(noun or obj.cls)
    return " ".join(words)


def article(phrase: str) -> str:
    """``"a "`` or ``"an "`` for a phrase (for ``orange``)."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption_scene(scene: Scene, rng: np.random.Generator, *, full: bool = False) -> str:
    """One caption of the scene from a template chosen by ``rng`` (the paper's prompt shapes
    among them: "photo of a X", "a X on the beach", "a X next to a Y")."""
    phrases = [article(object_phrase(obj, rng, full=full)) for obj in scene.objects]
    where = BACKGROUNDS[scene.background] if full or rng.random() < 0.75 else ""
    if len(phrases) == 1:
        subject = phrases[0]
        if scene.position and (full or rng.random() < 0.7):
            subject = f"{subject} {scene.position}"
    elif len(phrases) == 2:
        subject = f"{phrases[0]} {'next to' if rng.random() < 0.6 else 'and'} {phrases[1]}"
    else:
        subject = f"{phrases[0]}, {phrases[1]} and {phrases[2]}"
    prefix = str(rng.choice(["", "", "photo of ", "a picture of "]))
    text = f"{prefix}{subject} {where}".strip()
    return text


def scene_captions(scene: Scene, seed: int, index: int, count: int = 3) -> list[str]:
    """``count`` captions of one scene from varied templates (deterministic in seed, index)."""
    rng = np.random.default_rng([seed, index, 1])
    return [caption_scene(scene, rng) for _ in range(count)]


def vocabulary_words() -> list[str]:
    """Every word a world caption can contain (the tokenizer makes each one token)."""
    words = {"a", "an", "of", "photo", "picture", "next", "to", "and", "solid", ",", *CLASSES, *COLOURS, *PATTERNS,
             *SIZES}
    for phrase in [*BACKGROUNDS.values(), *POSITIONS]:
        words.update(phrase.split())
    return sorted(words)


def render_array(scenes: Sequence[Scene], seeds: Sequence[int]) -> np.ndarray:
    """Scenes rendered into one uint8 array (n, IMAGE_SIZE, IMAGE_SIZE, 3)."""
    return np.stack([np.asarray(render_scene(scene, seed=seed)) for scene, seed in zip(scenes, seeds)])


def world_captions(count: int, seed: int) -> list[str]:
    """``count`` captions of fresh scenes of stream ``seed``, one per scene (regularisation and
    held-out caption sets for merging on the world's base)."""
    return [scene_captions(sample_scene(seed, index), seed, index, 1)[0] for index in range(count)]
