"""The toy world's judge: a small CNN that reads a 32 px world image back into labels.

For each class of :data:`~.scenes.CLASSES` it says whether an object of that class is present
and, if so, its colour and pattern; it also names the background and says which personal
concepts (:data:`~.concepts.CONCEPTS`) are present. Because a scene never holds two objects of
one class, per-class heads bind attributes to objects exactly: "a red striped star and a blue
dotted ring" is checkable, not only "red, blue, star, ring somewhere".

Binding is done by attention pooling: each class (and each concept) has its own learned query
that picks out where on the 8 x 8 feature map its object is, and its heads read only that
pooled feature. It is trained on freshly generated scenes (stream :data:`TRAIN_SEED`, separate
from the base model's streams 0 and 1) with mild noise, blur and colour jitter, so it also
reads the slightly soft images a diffusion model makes, and measured on stream
:data:`HELDOUT_SEED`. The shipped weights live in ``assets/detector.safetensors``; their
``detector.json`` records the recipe and the held-out accuracy.

CLI: ``python -m mergekit_cd.toyworld.detector train -o PATH`` and
``python -m mergekit_cd.toyworld.detector evaluate [--weights PATH]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from .concepts import CONCEPT_NAMES, CONCEPTS, concept_scene
from .scenes import BACKGROUNDS, CLASSES, COLOURS, IMAGE_SIZE, PATTERNS, Scene, render_scene, sample_scene

#: Scene streams of the detector: training and held-out (the base model uses 0 and 1).
TRAIN_SEED, HELDOUT_SEED = 2, 3
#: Share of detector scenes that show a concept (each concept gets an equal part of it).
CONCEPT_FRACTION = 0.3
#: The shipped weights and their record.
ASSETS = Path(__file__).resolve().parent / "assets"
WEIGHTS_PATH = ASSETS / "detector.safetensors"
RECORD_NAME = "detector.json"

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)
#: Outputs of one class query: presence logit, colour logits, pattern logits.
_CLASS_OUT = 1 + len(COLOUR_NAMES) + len(PATTERNS)
#: The attributes :func:`heldout_accuracy` must get right (it also reports ``object`` and ``exact``).
ATTRIBUTES: tuple[str, ...] = ("class", "colour", "pattern", "background", "concept")
DEFAULT_ARCH: dict[str, Any] = dict(widths=(24, 32, 64, 64, 128, 128), strides=(1, 1, 2, 1, 2, 1), hidden=64)


# --- the network ----------------------------------------------------------------------------

class DetectorNet(nn.Module):
    """Conv backbone (32 px -> 8 x 8 features) plus one attention-pooled query per class and
    per concept, each with its own small MLP head; a global-pool head for the background.

    Per-query attention is what binds colour and pattern to the right object: the star
    query's colour head only sees features pooled where the star is.
    """

    def __init__(self, widths: Sequence[int] = DEFAULT_ARCH["widths"],
                 strides: Sequence[int] = DEFAULT_ARCH["strides"], hidden: int = DEFAULT_ARCH["hidden"]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width, stride in zip(widths, strides):
            layers += [nn.Conv2d(channels, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
            channels = width
        self.backbone = nn.Sequential(*layers)
        self.queries = len(CLASSES) + len(CONCEPTS)
        self.attention = nn.Conv2d(channels, self.queries, 1)
        self.norm = nn.LayerNorm(channels)
        # Per-query MLPs as batched weights: (query, in, out).
        self.w1 = nn.Parameter(torch.randn(self.queries, channels, hidden) / channels ** 0.5)
        self.b1 = nn.Parameter(torch.zeros(self.queries, hidden))
        self.class_out = nn.Parameter(torch.randn(len(CLASSES), hidden, _CLASS_OUT) / hidden ** 0.5)
        self.class_bias = nn.Parameter(torch.zeros(len(CLASSES), _CLASS_OUT))
        self.concept_out = nn.Parameter(torch.randn(len(CONCEPTS), hidden) / hidden ** 0.5)
        self.concept_bias = nn.Parameter(torch.zeros(len(CONCEPTS)))
        self.background = nn.Linear(channels, len(BACKGROUND_NAMES))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images``: float (n, 3, 32, 32) in [0, 1]. Returns logits: ``present`` (n, 8),
        ``colour`` (n, 8, 8), ``pattern`` (n, 8, 4), ``background`` (n, 7), ``concept`` (n, 6)."""
        features = self.backbone((images - 0.5) * 4.0)  # (n, c, h, w)
        flat = features.flatten(2)  # (n, c, p)
        scores = self.attention(features).flatten(2)  # (n, q, p)
        # A soft max over positions: it is part of each presence logit, so the attention map
        # is trained directly to light up where its class (or concept) is.
        evidence = scores.logsumexp(-1) - float(np.log(scores.shape[-1]))
        pooled = self.norm(torch.einsum("nqp,ncp->nqc", scores.softmax(-1), flat))
        hidden = F.relu(torch.einsum("nqc,qch->nqh", pooled, self.w1) + self.b1)
        k = len(CLASSES)
        per_class = torch.einsum("nqh,qho->nqo", hidden[:, :k], self.class_out) + self.class_bias
        concept = torch.einsum("nqh,qh->nq", hidden[:, k:], self.concept_out) + self.concept_bias + evidence[:, k:]
        colours = len(COLOUR_NAMES)
        return {"present": per_class[..., 0] + evidence[:, :k], "colour": per_class[..., 1:1 + colours],
                "pattern": per_class[..., 1 + colours:], "background": self.background(flat.mean(-1)),
                "concept": concept}


# --- labels and data ------------------------------------------------------------------------

@dataclass
class Batch:
    """Rendered scenes and their label arrays (ignore index -1 where an attribute does not apply)."""

    scenes: list[Scene]
    images: np.ndarray  # uint8 (n, 32, 32, 3)
    present: np.ndarray  # float32 (n, 8)
    colour: np.ndarray  # int64 (n, 8), -1 unless an ordinary object of that class is present
    pattern: np.ndarray  # int64 (n, 8)
    background: np.ndarray  # int64 (n,)
    concept: np.ndarray  # float32 (n, 6)


def detector_scene(seed: int, index: int) -> tuple[Scene, Image.Image]:
    """Scene ``index`` of detector stream ``seed`` and its image: with probability
    :data:`CONCEPT_FRACTION` a concept scene (0-2 companions), else an ordinary world scene."""
    rng = np.random.default_rng([seed, index, 11])
    if rng.random() < CONCEPT_FRACTION:
        item = CONCEPTS[int(rng.integers(len(CONCEPTS)))]
        scene, painters = concept_scene(item, rng, companions=int(rng.integers(0, 3)))
        return scene, render_scene(scene, seed=index, painters=painters)
    scene = sample_scene(seed, index)
    return scene, render_scene(scene, seed=index)


def label_arrays(scenes: Sequence[Scene]) -> dict[str, np.ndarray]:
    """The label arrays of :class:`Batch` for ``scenes`` (a concept object marks its class
    present and its concept, and has no colour/pattern label)."""
    n = len(scenes)
    present = np.zeros((n, len(CLASSES)), np.float32)
    colour = np.full((n, len(CLASSES)), -1, np.int64)
    pattern = np.full((n, len(CLASSES)), -1, np.int64)
    concept = np.zeros((n, len(CONCEPTS)), np.float32)
    background = np.array([BACKGROUND_NAMES.index(scene.background) for scene in scenes], np.int64)
    for row, scene in enumerate(scenes):
        for obj in scene.objects:
            k = CLASSES.index(obj.cls)
            present[row, k] = 1.0
            if obj.concept is not None:
                concept[row, CONCEPT_NAMES.index(obj.concept)] = 1.0
            else:
                colour[row, k] = COLOUR_NAMES.index(obj.colour)
                pattern[row, k] = PATTERNS.index(obj.pattern)
    return dict(present=present, colour=colour, pattern=pattern, background=background, concept=concept)


def make_batch(seed: int, start: int, count: int) -> Batch:
    """Detector scenes ``start .. start + count`` of stream ``seed``, rendered and labelled."""
    pairs = [detector_scene(seed, index) for index in range(start, start + count)]
    images = np.stack([np.asarray(image) for _, image in pairs])
    scenes = [scene for scene, _ in pairs]
    return Batch(scenes, images, **label_arrays(scenes))


# --- augmentation ---------------------------------------------------------------------------

def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mild corruptions like a diffusion model's output: per-image Gaussian blur (sigma up to
    0.7 px, half the images), colour jitter (gain +-6% per channel, brightness +-4%, contrast
    +-8%) and Gaussian noise (sigma up to 0.05). ``images``: float (n, 3, h, w) in [0, 1]."""
    n = images.shape[0]

    def uniform(*shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator)

    # Blur: a 3x3 separable Gaussian with a per-image sigma (sigma 0 = identity).
    sigma = uniform(n, high=0.7) * (uniform(n) < 0.5)
    taps = torch.exp(-torch.tensor([1.0, 0.0, 1.0])[None] / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    taps = taps / taps.sum(1, keepdim=True)  # (n, 3)
    kernel = (taps[:, :, None] * taps[:, None, :])  # (n, 3, 3)
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    grouped = padded.reshape(1, n * 3, *padded.shape[2:])
    kernel = kernel[:, None].repeat_interleave(3, 0)  # (n * 3, 1, 3, 3)
    images = F.conv2d(grouped, kernel, groups=n * 3).reshape(images.shape)
    # Colour jitter.
    mean = images.mean((1, 2, 3), keepdim=True)
    contrast = uniform(n, 1, 1, 1, low=0.92, high=1.08)
    images = (images - mean) * contrast + mean
    images = images * uniform(n, 3, 1, 1, low=0.94, high=1.06) + uniform(n, 1, 1, 1, low=-0.04, high=0.04)
    # Noise.
    images = images + torch.randn(images.shape, generator=generator) * uniform(n, 1, 1, 1, high=0.05)
    return images.clamp(0.0, 1.0)


# --- training -------------------------------------------------------------------------------

def _to_tensor(images: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return tensor.contiguous(memory_format=torch.channels_last)


def detector_loss(out: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-attribute losses: BCE for presence and concepts (summed over heads, so that each
    weighs per image what one colour or pattern label does), CE for background and, only on
    present ordinary objects, for colour and pattern."""
    bce = F.binary_cross_entropy_with_logits
    return {
        "class": bce(out["present"], labels["present"], reduction="none").sum(1).mean(),
        "colour": F.cross_entropy(out["colour"].flatten(0, 1), labels["colour"].flatten(), ignore_index=-1),
        "pattern": F.cross_entropy(out["pattern"].flatten(0, 1), labels["pattern"].flatten(), ignore_index=-1),
        "background": F.cross_entropy(out["background"], labels["background"]),
        "concept": bce(out["concept"], labels["concept"], reduction="none").sum(1).mean(),
    }


def train(output: str | Path = WEIGHTS_PATH, *, seed: int = TRAIN_SEED, scenes: int = 36000, steps: int = 1100,
          batch_size: int = 128, lr: float = 3e-3, weight_decay: float = 1e-4, heldout: int = 2000,
          arch: dict[str, Any] | None = None, log_every: int = 100, command: str | None = None) -> dict[str, Any]:
    """Train a detector on ``scenes`` scenes of stream ``seed`` (rendered once, augmented
    afresh every step) for ``steps`` AdamW steps with a one-cycle schedule; save the weights
    to ``output`` and the record (architecture, recipe, held-out accuracy on ``heldout``
    scenes of :data:`HELDOUT_SEED`) beside it as ``detector.json``, with ``command`` if given.
    Returns the record (its ``seconds`` include rendering the training scenes).

    Deterministic in its arguments on one CPU thread.
    """
    from ..fileio import save_safetensors

    arch = {**DEFAULT_ARCH, **(arch or {})}
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    data = make_batch(seed, 0, scenes)
    print(f"rendered {scenes} training scenes in {time.time() - start:.0f}s", flush=True)
    images = torch.from_numpy(data.images)
    labels_all = {name: torch.from_numpy(getattr(data, name))
                  for name in ("present", "colour", "pattern", "background", "concept")}
    net = DetectorNet(**arch).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    order = torch.randperm(scenes, generator=generator)
    cursor, running = 0, {}
    net.train()
    for step in range(1, steps + 1):
        if cursor + batch_size > scenes:
            order, cursor = torch.randperm(scenes, generator=generator), 0
        index = order[cursor:cursor + batch_size]
        cursor += batch_size
        batch = images[index].permute(0, 3, 1, 2).float() / 255.0
        batch = augment(batch, generator).contiguous(memory_format=torch.channels_last)
        losses = detector_loss(net(batch), {name: value[index] for name, value in labels_all.items()})
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        for name, value in losses.items():
            running[name] = running.get(name, 0.0) + float(value.detach())
        if step % log_every == 0 or step == steps:
            parts = " ".join(f"{name} {value / log_every:.4f}" for name, value in running.items())
            print(f"step {step}/{steps} {parts} ({time.time() - start:.0f}s)", flush=True)
            running = {}
    seconds = time.time() - start
    net.eval()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    state = {name: value.detach().float().contiguous() for name, value in net.state_dict().items()
             if not name.endswith("num_batches_tracked")}
    save_safetensors(state, output, metadata={"format": "pt"})
    detector = Detector(net)
    accuracy = heldout_accuracy(heldout, HELDOUT_SEED, detector=detector)
    record = {
        "architecture": {"class": "DetectorNet", **{k: list(v) if isinstance(v, tuple) else v
                                                     for k, v in arch.items()}},
        "labels": {"classes": list(CLASSES), "colours": list(COLOUR_NAMES), "patterns": list(PATTERNS),
                   "backgrounds": list(BACKGROUND_NAMES), "concepts": list(CONCEPT_NAMES)},
        "training": {"seed": seed, "scenes": scenes, "concept_fraction": CONCEPT_FRACTION, "steps": steps,
                     "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "optimizer": "AdamW one-cycle",
                     "augment": "blur sigma<=0.7 (p=0.5), channel gain +-6%, brightness +-4%, contrast +-8%, "
                                "noise sigma<=0.05", "seconds": round(seconds, 1),
                     "threads": torch.get_num_threads(), "torch": torch.__version__},
        "heldout": {"seed": HELDOUT_SEED, "count": heldout, "accuracy": accuracy},
    }
    if command:
        record["command"] = command
    (output.parent / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return record


# --- inference ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Detection:
    """What the detector sees in one image: ``(cls, colour, pattern)`` per class predicted
    present (a concept object is listed too, with whatever colour/pattern is predicted), the
    background, and the concepts predicted present."""

    objects: tuple[tuple[str, str, str], ...]
    background: str
    concepts: frozenset[str]

    def has(self, cls: str, colour: str | None = None, pattern: str | None = None) -> bool:
        """Whether an object of ``cls`` (with ``colour`` / ``pattern`` when given) is present."""
        return any(c == cls and (colour is None or co == colour) and (pattern is None or p == pattern)
                   for c, co, p in self.objects)


ImageInput = Image.Image | np.ndarray


def images_to_array(images: Iterable[ImageInput] | np.ndarray) -> np.ndarray:
    """PIL images or uint8 HxWx3 arrays (or one (n, h, w, 3) uint8 array) as a uint8
    (n, 32, 32, 3) array; other sizes are resized with the BOX filter, as the world renders."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise TypeError(f"an image array must be uint8 (n, h, w, 3), got {images.dtype} {images.shape}")
        if images.shape[1:3] == (IMAGE_SIZE, IMAGE_SIZE):
            return images
    out = []
    for item in images:
        if isinstance(item, np.ndarray):
            if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
                raise TypeError(f"image arrays must be uint8 (h, w, 3), got {item.dtype} {item.shape}")
            item = Image.fromarray(item)
        if not isinstance(item, Image.Image):
            raise TypeError(f"expected PIL images or uint8 arrays, got {type(item).__name__}")
        item = item.convert("RGB")
        if item.size != (IMAGE_SIZE, IMAGE_SIZE):
            item = item.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
        out.append(np.asarray(item))
    if not out:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return np.stack(out)


class Detector:
    """The trained judge: :meth:`load` the shipped weights, then :meth:`detect` images."""

    def __init__(self, net: DetectorNet, *, batch_size: int = 256, threshold: float = 0.5) -> None:
        self.net = net.eval()
        self.batch_size = batch_size
        self.threshold = threshold

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Detector":
        """Load weights (safetensors only) from ``path``, by default the shipped ones; the
        architecture comes from the ``detector.json`` beside them, else the default."""
        from safetensors.torch import load_file

        path = Path(path) if path is not None else WEIGHTS_PATH
        arch = dict(DEFAULT_ARCH)
        record = path.parent / RECORD_NAME
        if record.is_file():
            saved = json.loads(record.read_text()).get("architecture", {})
            arch.update({k: saved[k] for k in DEFAULT_ARCH if k in saved})
        net = DetectorNet(**arch)
        state = load_file(str(path))
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [name for name in missing if not name.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not fit the detector (missing {missing}, unexpected {unexpected})")
        return cls(net.to(memory_format=torch.channels_last))

    @torch.no_grad()
    def logits(self, images: Iterable[ImageInput] | np.ndarray) -> dict[str, torch.Tensor]:
        """Raw logits for ``images`` (batched), as :meth:`DetectorNet.forward` names them."""
        array = images_to_array(images)
        parts: list[dict[str, torch.Tensor]] = []
        for begin in range(0, len(array), self.batch_size):
            parts.append(self.net(_to_tensor(array[begin:begin + self.batch_size])))
        if not parts:
            return {k: torch.zeros(0) for k in ("present", "colour", "pattern", "background", "concept")}
        return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}

    def detect(self, images: Iterable[ImageInput] | np.ndarray) -> list[Detection]:
        """One :class:`Detection` per image."""
        out = self.logits(images)
        if out["present"].numel() == 0:
            return []
        cut = float(np.log(self.threshold / (1 - self.threshold)))
        present = (out["present"] > cut).numpy()
        colour = out["colour"].argmax(-1).numpy()
        pattern = out["pattern"].argmax(-1).numpy()
        background = out["background"].argmax(-1).numpy()
        concept = (out["concept"] > cut).numpy()
        return [Detection(tuple((CLASSES[k], COLOUR_NAMES[colour[i, k]], PATTERNS[pattern[i, k]])
                                for k in range(len(CLASSES)) if present[i, k]),
                          BACKGROUND_NAMES[background[i]],
                          frozenset(CONCEPT_NAMES[j] for j in range(len(CONCEPTS)) if concept[i, j]))
                for i in range(len(present))]

    def accuracy(self, scenes: Sequence[Scene], images: Iterable[ImageInput] | np.ndarray) -> dict[str, float]:
        """Per-attribute agreement with the generator's labels: ``class`` (per image x class),
        ``colour`` / ``pattern`` (per present ordinary object, read from its class head),
        ``background`` (per image), ``concept`` (per image x concept); also ``object`` (present
        ordinary objects whose presence, colour and pattern are all right) and ``exact``
        (images read entirely right)."""
        out = self.logits(images)
        labels = label_arrays(scenes)
        cut = float(np.log(self.threshold / (1 - self.threshold)))
        present = (out["present"] > cut).numpy()
        concept = (out["concept"] > cut).numpy()
        colour = out["colour"].argmax(-1).numpy()
        pattern = out["pattern"].argmax(-1).numpy()
        background = out["background"].argmax(-1).numpy()
        ordinary = labels["colour"] >= 0
        class_ok = present == (labels["present"] > 0.5)
        colour_ok = colour == labels["colour"]
        pattern_ok = pattern == labels["pattern"]
        background_ok = background == labels["background"]
        concept_ok = concept == (labels["concept"] > 0.5)
        object_ok = class_ok & colour_ok & pattern_ok
        image_ok = (class_ok.all(1) & background_ok & concept_ok.all(1)
                    & np.where(ordinary, colour_ok & pattern_ok, True).all(1))
        return {"class": float(class_ok.mean()), "colour": float(colour_ok[ordinary].mean()),
                "pattern": float(pattern_ok[ordinary].mean()), "background": float(background_ok.mean()),
                "concept": float(concept_ok.mean()), "object": float(object_ok[ordinary].mean()),
                "exact": float(image_ok.mean())}


def heldout_accuracy(count: int = 2000, seed: int = HELDOUT_SEED, *,
                     detector: Detector | None = None) -> dict[str, float]:
    """:meth:`Detector.accuracy` of ``detector`` (default: the shipped one) on the first
    ``count`` detector scenes of stream ``seed`` (ordinary and concept scenes, see
    :func:`detector_scene`)."""
    detector = detector or Detector.load()
    batch = make_batch(seed, 0, count)
    return detector.accuracy(batch.scenes, batch.images)


# --- CLI ------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """``train -o PATH`` or ``evaluate [--weights PATH] [--count N] [--seed S]``."""
    parser = argparse.ArgumentParser(prog="python -m mergekit_cd.toyworld.detector", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    trainer = commands.add_parser("train", help="train the detector and save weights + detector.json")
    trainer.add_argument("-o", "--output", default=str(WEIGHTS_PATH), help="weights path (.safetensors)")
    trainer.add_argument("--seed", type=int, default=TRAIN_SEED)
    trainer.add_argument("--scenes", type=int, default=36000)
    trainer.add_argument("--steps", type=int, default=1100)
    trainer.add_argument("--batch-size", type=int, default=128)
    trainer.add_argument("--lr", type=float, default=3e-3)
    trainer.add_argument("--heldout", type=int, default=2000)
    trainer.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    evaluator = commands.add_parser("evaluate", help="per-attribute accuracy on held-out generator scenes")
    evaluator.add_argument("--weights", default=None, help="weights path (default: the shipped ones)")
    evaluator.add_argument("--count", type=int, default=2000)
    evaluator.add_argument("--seed", type=int, default=HELDOUT_SEED)
    evaluator.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command == "train":
        record = train(args.output, seed=args.seed, scenes=args.scenes, steps=args.steps, batch_size=args.batch_size,
                       lr=args.lr, heldout=args.heldout,
                       command=" ".join(["python -m mergekit_cd.toyworld.detector", *(argv or sys.argv[1:])]))
        accuracy = record["heldout"]["accuracy"]
    else:
        accuracy = heldout_accuracy(args.count, args.seed, detector=Detector.load(args.weights))
    for name, value in accuracy.items():
        print(f"{name:>10}: {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
