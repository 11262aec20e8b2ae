"""What a personalised or merged model shows, judged by the world's detector and CLIP.

For a pair of concepts and a set of models (the base, each concept alone, joint training, and
the merges), :func:`score_model` samples a fixed, seeded set of prompts and measures:

- ``presence_<i>``: the share of concept i's own prompts whose image shows concept i;
- ``both``: the share of two-concept prompts whose image shows both;
- ``background`` / ``companion``: whether the rest of the prompt was followed (the named scene,
  an ordinary object named beside the concept);
- ``ordinary``: the share of ordinary prompts (no token) whose image shows what they name, and
  ``preservation``, its ratio to the unmerged base's (1: the base's own prompt following);
- ``text_alignment`` / ``image_alignment``: the paper's CLIPScore (tokens removed) and the
  image-image cosine to the instance images, with the world's CLIP.

Every rate comes with a 95% Wilson interval, every mean with a normal interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .concepts import Concept
from .detector import Detection, Detector
from .scenes import BACKGROUNDS

#: Scene phrases used in concept prompts (keys of BACKGROUNDS), besides the plain "photo of a".
PROMPT_SCENES: tuple[str, ...] = ("beach", "night")
#: Ordinary prompts: text, then the objects (class, colour) and the background they name.
ORDINARY_PROMPTS: tuple[tuple[str, tuple[tuple[str, str], ...], str | None], ...] = (
    ("a red star", (("star", "red"),), None),
    ("a blue ring on grass", (("ring", "blue"),), "grass"),
    ("photo of a yellow heart at night", (("heart", "yellow"),), "night"),
    ("a green square on the beach", (("square", "green"),), "beach"),
    ("a purple cross in snow", (("cross", "purple"),), "snow"),
    ("an orange diamond on a white background", (("diamond", "orange"),), "white"),
    ("a pink circle on a black background", (("circle", "pink"),), "black"),
    ("a teal triangle on a gray background", (("triangle", "teal"),), "gray"),
)
#: The ordinary object named beside a concept in its companion prompt (never the concept's class).
COMPANIONS: tuple[tuple[str, str], ...] = (("cross", "green"), ("triangle", "red"))


def concept_prompts(token: str, item: Concept) -> list[tuple[str, str | None]]:
    """(prompt, background it names) for one concept: the training prompt and two scenes."""
    noun = f"{token} {item.class_word}".strip()
    return [(f"photo of a {noun}", None),
            *((f"a {noun} {BACKGROUNDS[scene]}", scene) for scene in PROMPT_SCENES)]


def companion_prompt(token: str, item: Concept) -> tuple[str, tuple[str, str]]:
    """A prompt naming the concept next to an ordinary object, and that object (class, colour)."""
    cls, colour = next((c, k) for c, k in COMPANIONS if c != item.class_word)
    article = "an" if colour[0] in "aeiou" else "a"
    return " ".join(f"a {token} {item.class_word} next to {article} {colour} {cls}".split()), (cls, colour)


def pair_prompts(tokens: Sequence[str], items: Sequence[Concept]) -> list[tuple[str, str | None]]:
    """(prompt, background) for the two-concept prompts: plain, on the beach, at night."""
    subject = " ".join(f"a {tokens[0]} {items[0].class_word} next to a {tokens[1]} {items[1].class_word}".split())
    return [(subject, None), *((f"{subject} {BACKGROUNDS[scene]}", scene) for scene in PROMPT_SCENES)]


@dataclass(frozen=True)
class Estimate:
    """A measured value with its 95% interval and the number of samples behind it."""

    value: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}

    def __str__(self) -> str:
        return f"{self.value:.2f} [{self.low:.2f}, {self.high:.2f}]"


def rate(successes: int, n: int) -> Estimate:
    """A proportion with its 95% Wilson score interval."""
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    z, p = 1.959963984540054, successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # the interval holds p (exactly, also where rounding would put a bound a hair past it)
    return Estimate(p, max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)), n)


def mean(values: Sequence[float]) -> Estimate:
    """A mean with its 95% normal interval."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    half = 1.96 * float(values.std(ddof=1)) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    centre = float(values.mean())
    return Estimate(centre, centre - half, centre + half, len(values))


def sample_batch(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance_scale: float,
                 batch_size: int = 16) -> list[Any]:
    """One PIL image per (prompt, seed), batched through the pipeline; the noise of seed s is
    the same for every model and prompt, so models are compared on the same starting noise.
    Batches of 16 sample the 32 px world faster on a CPU than batches of 64 (the full benchmark's
    sampling 156 to 175 s a pair against 172 to 190), whose activations are page-faulted afresh."""
    images: list[Any] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds[start:start + batch_size]]
        result = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators,
                      output_type="pil")
        images.extend(result.images)
    return images


@dataclass
class Sampled:
    """A model's images of every prompt of a pair, with their detections."""

    prompts: list[str]
    kinds: list[str]  # "concept0", "concept1", "companion0", "companion1", "pair", "ordinary"
    expected: list[Any]
    images: list[Any]
    detections: list[Detection] = field(default_factory=list)


def prompt_set(tokens: Sequence[str], items: Sequence[Concept], *, with_concepts: Sequence[int] = (0, 1),
               with_pair: bool = True) -> tuple[list[str], list[str], list[Any]]:
    """The prompts a model is sampled on: each concept's own, its companion prompt, the pair's
    and the ordinary ones, with what each names."""
    prompts, kinds, expected = [], [], []
    for index in with_concepts:
        for prompt, background in concept_prompts(tokens[index], items[index]):
            prompts.append(prompt), kinds.append(f"concept{index}"), expected.append(background)
        prompt, companion = companion_prompt(tokens[index], items[index])
        prompts.append(prompt), kinds.append(f"companion{index}"), expected.append(companion)
    if with_pair:
        for prompt, background in pair_prompts(tokens, items):
            prompts.append(prompt), kinds.append("pair"), expected.append(background)
    for prompt, objects, background in ORDINARY_PROMPTS:
        prompts.append(prompt), kinds.append("ordinary"), expected.append((objects, background))
    return prompts, kinds, expected


def sample_model(pipe: Any, detector: Detector, tokens: Sequence[str], items: Sequence[Concept], *,
                 images_per_prompt: int, seed: int, steps: int, guidance_scale: float,
                 with_concepts: Sequence[int] = (0, 1), with_pair: bool = True) -> Sampled:
    """Sample every prompt ``images_per_prompt`` times (seeds ``seed .. seed + n - 1``) and detect."""
    prompts, kinds, expected = prompt_set(tokens, items, with_concepts=with_concepts, with_pair=with_pair)
    rows = [(p, k, e, seed + j) for p, k, e in zip(prompts, kinds, expected) for j in range(images_per_prompt)]
    images = sample_batch(pipe, [r[0] for r in rows], [r[3] for r in rows], steps=steps,
                          guidance_scale=guidance_scale)
    sampled = Sampled([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], images)
    sampled.detections = detector.detect(images)
    return sampled


def ordinary_correct(detection: Detection, expected: Any) -> bool:
    """Whether an image of an ordinary prompt shows each named object in its colour and the
    named background."""
    objects, background = expected
    return all(detection.has(cls, colour=colour) for cls, colour in objects) and (
        background is None or detection.background == background)


def detector_counts(sampled: Sampled, items: Sequence[Concept]) -> dict[str, tuple[int, int]]:
    """(successes, trials) of every detector-based rate of one model's samples."""
    counts: dict[str, list[int]] = {}

    def add(name: str, ok: bool) -> None:
        entry = counts.setdefault(name, [0, 0])
        entry[0] += int(ok)
        entry[1] += 1

    for kind, expected, detection in zip(sampled.kinds, sampled.expected, sampled.detections):
        if kind.startswith("concept"):
            index = int(kind[-1])
            add(f"presence{index}", items[index].name in detection.concepts)
            if expected is not None:
                add("background", detection.background == expected)
        elif kind.startswith("companion"):
            index = int(kind[-1])
            add(f"presence{index}", items[index].name in detection.concepts)
            add("companion", detection.has(expected[0], colour=expected[1]))
        elif kind == "pair":
            add("both", all(item.name in detection.concepts for item in items))
            if expected is not None:
                add("background", detection.background == expected)
        else:
            add("ordinary", ordinary_correct(detection, expected))
    return {name: (value[0], value[1]) for name, value in counts.items()}


def clip_scores(clip: Any, sampled: Sampled, tokens: Sequence[str], references: Sequence[Any],
                kinds: Callable[[str], bool]) -> tuple[list[float], list[float]]:
    """Per image (of the kinds selected): CLIPScore with the token-free prompt, and the mean
    cosine to the reference (instance) images."""
    from ..evaluation.clip_metrics import clip_score, strip_tokens

    chosen = [i for i, kind in enumerate(sampled.kinds) if kinds(kind)]
    if not chosen:
        return [], []
    images = [sampled.images[i] for i in chosen]
    texts = clip.embed_texts([strip_tokens(sampled.prompts[i], tokens) for i in chosen])
    image_embeddings = clip.embed_images(images)
    reference = torch.nn.functional.normalize(clip.embed_images(list(references)).double(), dim=-1)
    image_alignment = (torch.nn.functional.normalize(image_embeddings.double(), dim=-1) @ reference.T).mean(1)
    return clip_score(texts, image_embeddings).tolist(), image_alignment.tolist()


@dataclass
class ModelScores:
    """One model's raw counts and per-image scores on one pair (pooled over pairs by adding)."""

    counts: dict[str, tuple[int, int]]
    text_alignment: list[float]
    image_alignment: list[float]

    def merged_with(self, other: "ModelScores") -> "ModelScores":
        counts = dict(self.counts)
        for name, (ok, n) in other.counts.items():
            mine = counts.get(name, (0, 0))
            counts[name] = (mine[0] + ok, mine[1] + n)
        return ModelScores(counts, self.text_alignment + other.text_alignment,
                           self.image_alignment + other.image_alignment)

    def estimates(self, base_ordinary: tuple[int, int] | None = None) -> dict[str, Estimate]:
        """Every rate and mean with its interval; ``preservation`` = ordinary rate / the base's."""
        result = {name: rate(*value) for name, value in sorted(self.counts.items())}
        presences = [value for name, value in self.counts.items() if name.startswith("presence")]
        if presences:
            result["presence"] = rate(sum(v[0] for v in presences), sum(v[1] for v in presences))
        if base_ordinary and "ordinary" in self.counts and base_ordinary[0]:
            ours, base = rate(*self.counts["ordinary"]), base_ordinary[0] / base_ordinary[1]
            result["preservation"] = Estimate(ours.value / base, ours.low / base, ours.high / base, ours.n)
        if self.text_alignment:
            result["text_alignment"] = mean(self.text_alignment)
            result["image_alignment"] = mean(self.image_alignment)
        return result


def score_model(pipe: Any, detector: Detector, tokens: Sequence[str], items: Sequence[Concept], *,
                clip: Any = None, references: Sequence[Sequence[Any]] = (), images_per_prompt: int = 4,
                seed: int = 0, steps: int = 25, guidance_scale: float = 6.0,
                with_concepts: Sequence[int] = (0, 1), with_pair: bool = True) -> tuple[ModelScores, Sampled]:
    """Sample one model (``pipe`` with its delta installed) on a pair's prompts and score it.
    CLIP alignment covers the concept, companion and pair prompts (the references of the
    concepts they name: for a pair prompt, both concepts' instance images)."""
    sampled = sample_model(pipe, detector, tokens, items, images_per_prompt=images_per_prompt, seed=seed,
                           steps=steps, guidance_scale=guidance_scale, with_concepts=with_concepts,
                           with_pair=with_pair)
    text, image = [], []
    if clip is not None and references:
        for index in with_concepts:
            t, i = clip_scores(clip, sampled, tokens, references[index],
                               lambda kind, index=index: kind in (f"concept{index}", f"companion{index}"))
            text, image = text + t, image + i
        if with_pair:
            t, i = clip_scores(clip, sampled, tokens, [*references[0], *references[1]], lambda kind: kind == "pair")
            text, image = text + t, image + i
    return ModelScores(detector_counts(sampled, items), text, image), sampled


class WorldJudge:
    """The detector's view of each cd-eval row (``cd-eval --world``): for one or two world
    concepts, the presence, both-present, background, companion and ordinary-prompt rates of a
    model's samples, the ordinary rate also relative to the plain base's (``preservation``)."""

    def __init__(self, names: Sequence[str], *, images_per_prompt: int = 4, steps: int = 25,
                 guidance_scale: float = 6.0, seed: int = 0) -> None:
        from ..errors import MergeError
        from .concepts import concept

        if not 1 <= len(names) <= 2:
            raise MergeError(f"--world: name the toy-world concept of each of one or two concept inputs, "
                             f"got {len(names)} names.")
        try:
            self.items = [concept(name) for name in names]
        except ValueError as error:
            raise MergeError(f"--world: {error}") from None
        self.detector = Detector.load()
        self.options = dict(images_per_prompt=images_per_prompt, steps=steps, guidance_scale=guidance_scale,
                            seed=seed)
        self.base_ordinary: tuple[int, int] | None = None

    def measure_base(self, pipe: Any) -> None:
        """The plain base's ordinary-prompt counts (``pipe`` with nothing installed)."""
        tokens = [""] * len(self.items)
        scores, _ = score_model(pipe, self.detector, tokens, self.items, with_concepts=(), with_pair=False,
                                **self.options)
        self.base_ordinary = scores.counts["ordinary"]

    def score(self, pipe: Any, tokens: Sequence[str]) -> dict[str, dict[str, float]]:
        """The estimates of ``pipe`` as installed, its concepts named by ``tokens``."""
        pair = len(self.items) == 2
        scores, _ = score_model(pipe, self.detector, list(tokens), self.items,
                                with_concepts=tuple(range(len(self.items))), with_pair=pair, **self.options)
        return {name: estimate.to_dict() for name, estimate in scores.estimates(self.base_ordinary).items()}
