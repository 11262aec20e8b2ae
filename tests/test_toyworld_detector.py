"""The shipped toy-world detector agrees with the generator's labels (CPU, a few seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mergekit_cd.toyworld import concepts, detector as det
from mergekit_cd.toyworld.scenes import (BACKGROUNDS, CLASSES, PATTERNS, Scene, place_objects, render_scene,
                                         sample_scene)

SAMPLE = 300
#: The colours each concept is drawn in: ordinary objects of its class in them are look-alikes.
LOOKALIKE_COLOURS = {"twotone-star": ["orange", "teal"], "dotted-ring": ["purple", "yellow"],
                     "checker-heart": ["pink", "green"], "smiley-circle": ["yellow"],
                     "quad-square": ["red", "blue", "yellow", "green"], "banded-diamond": ["blue", "orange"]}


@pytest.fixture(scope="module")
def detector() -> det.Detector:
    return det.Detector.load()


@pytest.fixture(scope="module")
def heldout() -> det.Batch:
    return det.make_batch(det.HELDOUT_SEED, 0, SAMPLE)


def test_shipped_files_are_small_and_recorded() -> None:
    assert det.WEIGHTS_PATH.stat().st_size < 4_000_000
    record = json.loads((det.WEIGHTS_PATH.parent / det.RECORD_NAME).read_text())
    assert record["training"]["seed"] == det.TRAIN_SEED != det.HELDOUT_SEED == record["heldout"]["seed"]
    assert record["heldout"]["count"] >= 2000
    assert all(record["heldout"]["accuracy"][name] >= 0.95 for name in det.ATTRIBUTES)


def test_agrees_with_generator_labels(detector: det.Detector, heldout: det.Batch) -> None:
    assert sum(obj.concept is not None for scene in heldout.scenes for obj in scene.objects) > 30
    accuracy = detector.accuracy(heldout.scenes, heldout.images)
    assert {name: accuracy[name] for name in det.ATTRIBUTES} == pytest.approx(
        {name: 1.0 for name in det.ATTRIBUTES}, abs=0.07), accuracy


def test_detections_read_the_scene(detector: det.Detector, heldout: det.Batch) -> None:
    results = detector.detect(heldout.images[:100])
    exact = 0
    for scene, found in zip(heldout.scenes[:100], results):
        truth = {(o.cls, o.colour, o.pattern) for o in scene.objects if o.concept is None}
        classes = {o.cls for o in scene.objects}
        wanted = {o.concept for o in scene.objects if o.concept is not None}
        exact += (truth <= set(found.objects) and {c for c, _, _ in found.objects} == classes
                  and found.background == scene.background and found.concepts == wanted)
    assert exact >= 85


@pytest.mark.parametrize("item", concepts.CONCEPTS, ids=concepts.CONCEPT_NAMES)
def test_concept_instances_are_detected(detector: det.Detector, item: concepts.Concept) -> None:
    for found in detector.detect(concepts.instance_images(item)):
        assert item.name in found.concepts, found
        assert found.has(item.class_word), found
    # Ordinary objects of the same class are not the concept: held-out scenes with the class,
    # and look-alikes in the concept's own colours with every pattern on every background.
    ordinary = [scene for scene in (sample_scene(det.HELDOUT_SEED, i) for i in range(400))
                if any(obj.cls == item.class_word for obj in scene.objects)][:40]
    images = [render_scene(scene, seed=i) for i, scene in enumerate(ordinary)]
    rng = np.random.default_rng([9, concepts.CONCEPT_NAMES.index(item.name)])
    for i in range(28):
        colour = LOOKALIKE_COLOURS[item.name][i % len(LOOKALIKE_COLOURS[item.name])]
        objects = place_objects(rng, [item.class_word], colours=[colour], patterns=[PATTERNS[i % 4]])
        images.append(render_scene(Scene(list(BACKGROUNDS)[i % 7], tuple(objects)), seed=i))
    found = detector.detect(images)
    assert sum(result.has(item.class_word) for result in found) >= len(images) - 1
    false = [result for result in found if item.name in result.concepts]
    assert len(false) <= 1, false


def test_accepts_pil_arrays_and_any_size(detector: det.Detector, heldout: det.Batch) -> None:
    array = heldout.images[:12]
    expected = detector.detect(array)
    assert len(expected) == 12 and all(isinstance(d, det.Detection) for d in expected)
    assert detector.detect([Image.fromarray(image) for image in array]) == expected
    assert detector.detect(list(array)) == expected
    # A 2x nearest upscale is box-filtered back to the same 32 px image.
    big = [Image.fromarray(image).resize((64, 64), Image.Resampling.NEAREST) for image in array]
    assert detector.detect(big) == expected
    assert detector.detect(np.stack([np.asarray(image) for image in big])) == expected
    assert detector.detect([Image.fromarray(array[0]).convert("RGBA")]) == expected[:1]
    assert detector.detect(np.zeros((0, 32, 32, 3), np.uint8)) == []
    with pytest.raises(TypeError):
        detector.detect(array.astype(np.float32))


def test_has() -> None:
    found = det.Detection((("star", "red", "striped"),), "grass", frozenset({"dotted-ring"}))
    assert found.has("star") and found.has("star", "red") and found.has("star", pattern="striped")
    assert not found.has("star", "blue") and not found.has("ring") and not found.has("star", "red", "solid")
    assert set(CLASSES) >= {cls for cls, _, _ in found.objects}
