"""The merge-quality benchmark on the toy world: train concepts, merge pairs, sample, judge.

For each concept pair: each concept is trained alone with :func:`mergekit_cd.train` (the
paper's recipe, step count scaled to the world) and the pair jointly; the single-concept deltas
are merged with every method in :data:`METHODS`; every model samples the same seeded prompts
(:mod:`.quality`) and the detector and the world's CLIP score them. cd-eval's function-level
fidelity and preservation are measured on the same deltas, to see whether they predict what the
images show. ``benchmarks/bench_quality.py`` and ``make demo`` drive it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import concept_images_path, heldout_captions_path, reg_captions_path
from .concepts import CONCEPTS, Concept, concept
from .quality import ModelScores, score_model

BASE = "builtin:toyworld"
CLIP = "builtin:toyworld-clip"
#: Concept pairs (names), each with distinct initializer tokens.
#: The first (the demo's and the quick run's) is the pair the recipe learns best.
PAIRS: tuple[tuple[str, str], ...] = (
    ("banded-diamond", "smiley-circle"), ("twotone-star", "dotted-ring"), ("checker-heart", "quad-square"),
    ("twotone-star", "checker-heart"), ("dotted-ring", "quad-square"),
)
#: Merges of two single-concept deltas: (row label, mergekit_cd.merge options, the same merge as a
#: cd-eval ``--compare`` item). "pipeline" rows are those of the ``pipeline-v1`` row rule (every row
#: the UNet reads), the others the authors' rule (issue 15 compares the two).
METHODS: tuple[tuple[str, dict[str, Any], str], ...] = (
    ("constrained", {"method": "constrained"}, "constrained"),
    ("constrained relative-ridge=0.001", {"method": "constrained", "relative_ridge": 1e-3}, "relative-ridge=1e-3"),
    ("soft w=10", {"method": "soft", "weights": (10.0, 10.0)}, "soft=10"),
    ("soft w=100", {"method": "soft", "weights": (100.0, 100.0)}, "soft=100"),
    ("constrained, pipeline rows", {"method": "constrained", "rows": "pipeline"}, "constrained"),
    ("soft w=100, pipeline rows", {"method": "soft", "rows": "pipeline", "weights": (100.0, 100.0)}, "soft=100"),
    ("hybrid lambda=10", {"method": "hybrid", "rows": "pipeline", "weights": (10.0, 10.0)}, "hybrid=10"),
    ("hybrid lambda=100", {"method": "hybrid", "rows": "pipeline", "weights": (100.0, 100.0)}, "hybrid=100"),
    ("hybrid lambda=1000", {"method": "hybrid", "rows": "pipeline", "weights": (1000.0, 1000.0)}, "hybrid=1000"),
    ("sum", {"method": "sum"}, "sum"),
    ("average", {"method": "average"}, "average"),
)
#: The ``--quick`` run's merges: the paper's, the sum and the average, and the hybrid.
QUICK_METHODS = ("constrained", "hybrid lambda=1000", "sum", "average")


def token_of(item: Concept) -> str:
    """Each concept's own modifier token (``<new1>`` .. ``<new6>``), so any two combine unrenamed."""
    return f"<new{CONCEPTS.index(item) + 1}>"


@dataclass(frozen=True)
class BenchmarkOptions:
    """What a run trains, merges and samples (the defaults are the full run)."""

    work: Path = Path("benchmarks/work/quality")
    pairs: tuple[tuple[str, str], ...] = PAIRS
    train_steps: int = 150
    batch_size: int = 4
    learning_rate: float = 3e-4
    augment: bool = False
    snr_gamma: float | None = 5.0
    num_class_images: int = 64
    class_sampling_steps: int = 20
    images_per_prompt: int = 4
    #: DPM-Solver++ steps (:func:`sampling_pipeline`)
    sampling_steps: int = 10
    guidance_scale: float = 6.0
    num_reg_captions: int = 1000
    fidelity: bool = True
    seed: int = 0
    methods: tuple[str, ...] = tuple(label for label, _, _ in METHODS)

    def quick(self) -> "BenchmarkOptions":
        """The ``--quick`` run: the first pair, fewer class images, images and merges."""
        return replace(self, pairs=self.pairs[:1], images_per_prompt=2, num_class_images=32, methods=QUICK_METHODS)

    def recipe(self) -> dict[str, Any]:
        """What decides a trained concept (besides its images and the base): :func:`mergekit_cd.train`'s options."""
        return dict(steps=self.train_steps, batch_size=self.batch_size, learning_rate=self.learning_rate,
                    augment=self.augment, snr_gamma=self.snr_gamma, num_class_images=self.num_class_images,
                    class_sampling_steps=self.class_sampling_steps, seed=self.seed)


@dataclass
class PairResult:
    """One pair's deltas, scores per model and cd-eval rows."""

    pair: tuple[str, str]
    scores: dict[str, ModelScores]
    fidelity: dict[str, dict[str, float]] = field(default_factory=dict)
    grid: Any = None


def train_options(options: BenchmarkOptions) -> dict[str, Any]:
    """The recipe passed to :func:`mergekit_cd.train` (scaled: the world's UNet is tiny), but
    the step count, which joint training doubles."""
    recipe = {k: v for k, v in options.recipe().items() if k != "steps"}
    return dict(recipe, class_cache_dir=options.work / "class-images", checkpoint_every=10 ** 6, progress=False,
                force=True)


def recipe_arguments(options: BenchmarkOptions) -> list[str]:
    """The same recipe as cd-train arguments (what ``make demo`` shows and runs)."""
    return ["--steps", str(options.train_steps), "--batch-size", str(options.batch_size),
            "--lr", f"{options.learning_rate:g}", *(() if options.augment else ("--no-aug",)),
            *(("--snr-gamma", f"{options.snr_gamma:g}") if options.snr_gamma is not None else ()),
            "--num-class-images", str(options.num_class_images),
            "--class-sampling-steps", str(options.class_sampling_steps), "--seed", str(options.seed)]


def sampling_pipeline(reference: str = BASE, *, dpm_solver: bool = True) -> Any:
    """A base (the shipped one by default) as a diffusers pipeline that samples with DPM-Solver++
    (2M) where the shipped scheduler is DDIM: its 10 steps follow the world's prompts about as
    well as DDIM's 20 (README, "Benchmark: merge quality on the toy world") in half the time,
    which the full run needs. ``dpm_solver=False`` keeps the base's own scheduler."""
    from diffusers import DPMSolverMultistepScheduler

    from ..sampling import load_pipeline

    pipe = load_pipeline(reference)
    if dpm_solver:
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    return pipe


@functools.cache
def _base_key() -> str:
    """The shipped base's K/V and text-encoder fingerprints, short (hashed once per process)."""
    from ..base import open_base

    base = open_base(BASE)
    return f"{base.fingerprint[:10]}-{base.text_fingerprint[:10]}"


def trained_folder(options: BenchmarkOptions, kind: str, name: str) -> Path:
    """Where a trained delta is kept for reuse: named by the base's fingerprints and the recipe
    too, so a retrained base or a changed recipe never reuses concepts learned before."""
    recipe = hashlib.sha256(json.dumps(options.recipe(), sort_keys=True).encode()).hexdigest()[:10]
    return options.work / kind / _base_key() / f"{name}-{recipe}"


def train_single(item: Concept, options: BenchmarkOptions) -> Path:
    """Train (or reuse) one concept's delta; returns its delta file."""
    from ..train import train

    output = trained_folder(options, "concepts", item.name)
    delta = output / "delta.safetensors"
    if not delta.exists():
        output.parent.mkdir(parents=True, exist_ok=True)
        train(BASE, output=output, instance_dir=concept_images_path(item.name), class_word=item.class_word,
              token=token_of(item), init_token=item.init_token, steps=options.train_steps, **train_options(options))
    return delta


def train_joint(items: Sequence[Concept], options: BenchmarkOptions) -> Path:
    """Train (or reuse) a pair jointly, twice the steps as the paper does; returns its delta file."""
    from ..train import train

    output = trained_folder(options, "joint", "+".join(i.name for i in items))
    delta = output / "delta.safetensors"
    if not delta.exists():
        output.parent.mkdir(parents=True, exist_ok=True)
        specs = [dict(instance_dir=str(concept_images_path(i.name)), class_word=i.class_word, token=token_of(i),
                      init_token=i.init_token) for i in items]
        train(BASE, output=output, concepts=specs, steps=2 * options.train_steps, **train_options(options))
    return delta


def captions(options: BenchmarkOptions) -> tuple[list[str], list[str]]:
    """The shipped world regularisation and held-out captions for merging and cd-eval."""
    from ..captions import read_captions

    return (read_captions(reg_captions_path())[:options.num_reg_captions], read_captions(heldout_captions_path()))


def merge_pair(deltas: Sequence[Path], options: BenchmarkOptions) -> dict[str, Any]:
    """Every method's merge of two single-concept deltas (ConceptDelta objects)."""
    from ..merge import merge

    reg, held = captions(options)
    return {label: merge(list(deltas), reg, base=BASE, held_out=held, cache_dir=options.work / "cache",
                         **method_options) for label, method_options, _ in METHODS if label in options.methods}


def instance_references(item: Concept) -> list[Any]:
    """The concept's shipped instance images (the image-alignment references)."""
    from PIL import Image

    return [Image.open(path).convert("RGB") for path in sorted(concept_images_path(item.name).glob("*.png"))]


def grid_prompts(tokens: Sequence[str], items: Sequence[Concept]) -> list[tuple[str, int]]:
    """(prompt, seed) of the grid's columns: the pair (two seeds, on the beach), then each concept."""
    pair = f"a {tokens[0]} {items[0].class_word} next to a {tokens[1]} {items[1].class_word}"
    shown = [(pair, 0), (pair, 1), (f"{pair} on the beach", 0), (f"photo of a {tokens[0]} {items[0].class_word}", 0),
             (f"photo of a {tokens[1]} {items[1].class_word}", 0)]
    return [(" ".join(prompt.split()), seed) for prompt, seed in shown]


#: One model to score: (table row, grid label, its delta or None, score_model options).
Model = tuple[str, str, Any, dict[str, Any]]


def score_models(pipe: Any, detector: Any, models: Sequence[Model], tokens: Sequence[str], items: Sequence[Concept],
                 *, steps: int, guidance_scale: float = 6.0,
                 **score_options: Any) -> tuple[dict[str, ModelScores], list[tuple[str, list[Any]]]]:
    """Install each model's delta in ``pipe``, score it (:func:`.quality.score_model`, rows of one
    label pooled) and sample its grid row (:func:`grid_prompts`); ``tokens`` in a model's options
    replace the pair's (the base is asked without them)."""
    from ..apply import apply, remove
    from .quality import sample_batch

    scores: dict[str, ModelScores] = {}
    grid_rows = []
    for label, grid_label, delta, extra in models:
        if delta is not None:
            apply(pipe, delta)
        extra = dict(extra)
        model_tokens = extra.pop("tokens", tokens)
        score, _ = score_model(pipe, detector, model_tokens, items, steps=steps, guidance_scale=guidance_scale,
                               **score_options, **extra)
        scores[label] = scores[label].merged_with(score) if label in scores else score
        shown = grid_prompts(model_tokens, items)
        grid_rows.append((grid_label, sample_batch(pipe, [p for p, _ in shown], [seed for _, seed in shown],
                                                   steps=steps, guidance_scale=guidance_scale)))
        if delta is not None:
            remove(pipe)
    return scores, grid_rows


def run(options: BenchmarkOptions, *, log: Callable[[str], None] = print) -> list[PairResult]:
    """Train, merge, sample and score every pair of ``options`` (models reused from ``work``)."""
    from ..evaluation.clip_metrics import ClipEmbedder
    from ..loading import load
    from .detector import Detector
    from .grid import labelled_grid

    detector = Detector.load()
    clip = ClipEmbedder(CLIP)
    pipe = sampling_pipeline()
    results = []
    for names in options.pairs:
        items = [concept(name) for name in names]
        tokens = [token_of(item) for item in items]
        started = time.perf_counter()
        singles = [train_single(item, options) for item in items]
        joint = train_joint(items, options)
        log(f"{' + '.join(names)}: trained in {time.perf_counter() - started:.0f} s")
        merges = merge_pair(singles, options)
        references = [instance_references(item) for item in items]
        models: list[Model] = [
            ("base", "base (no token)", None, dict(tokens=["", ""])),
            ("single", f"single {names[0]}", load(singles[0], base=BASE), dict(with_concepts=(0,), with_pair=False)),
            ("single", f"single {names[1]}", load(singles[1], base=BASE), dict(with_concepts=(1,), with_pair=False)),
            ("joint", "joint training", load(joint, base=BASE), {}),
            *((label, label, delta, {}) for label, delta in merges.items()),
        ]
        started = time.perf_counter()
        scores, grid_rows = score_models(pipe, detector, models, tokens, items, clip=clip, references=references,
                                         images_per_prompt=options.images_per_prompt, seed=options.seed,
                                         steps=options.sampling_steps, guidance_scale=options.guidance_scale)
        log(f"{' + '.join(names)}: sampled and scored {len(models)} models in {time.perf_counter() - started:.0f} s")
        columns = [prompt for prompt, _ in grid_prompts(tokens, items)]
        result = PairResult(tuple(names), scores, grid=labelled_grid(grid_rows, columns=columns))
        if options.fidelity:
            result.fidelity = fidelity_rows(singles, joint, items, options)
        results.append(result)
    return results


def fidelity_rows(singles: Sequence[Path], joint: Path, items: Sequence[Concept],
                  options: BenchmarkOptions) -> dict[str, dict[str, float]]:
    """cd-eval's mean fidelity, preservation and max residual of every method and of joint training
    (one cd-eval run per row rule, since ``--rows`` applies to every merge it runs; joint training
    in the first)."""
    from ..evaluation import evaluate

    reg, held = captions(options)
    rows = {}
    for run, (rule, labels) in enumerate(compare_items(options.methods).items()):
        report = evaluate(list(singles), base=BASE, merged=[joint] if run == 0 else None,
                          compare=list(labels.values()), rows=rule,
                          instance_dirs=[concept_images_path(i.name) for i in items], reg_captions=reg,
                          held_out=held, cache_dir=options.work / "cache", seed=options.seed)
        ours = {cd_eval_label(item): label for label, item in labels.items()}
        for row in report.rows:
            label = "joint" if row.kind == "delta" else ours.get(row.label)
            if label is not None:
                rows.setdefault(label, {"fidelity": row.mean_fidelity, "cd_eval_preservation": row.preservation,
                                        "max_residual": row.max_residual})
    return rows


def compare_items(methods: Sequence[str]) -> dict[str, dict[str, str]]:
    """The cd-eval ``--compare`` item of each of ``methods`` (benchmark labels), by row rule."""
    from ..features import DEFAULT_ROWS

    grouped: dict[str, dict[str, str]] = {}
    for label, merge_options, item in METHODS:
        if label in methods:
            grouped.setdefault(merge_options.get("rows", DEFAULT_ROWS), {})[label] = item
    return grouped


def cd_eval_label(item: str) -> str:
    """The row label cd-eval gives a ``--compare`` item."""
    from ..evaluation.methods import parse_compare

    return parse_compare(item)[0].label


#: Table columns: (heading, metric key).
COLUMNS: tuple[tuple[str, str], ...] = (
    ("presence", "presence"), ("both present", "both"), ("background", "background"),
    ("companion", "companion"), ("ordinary prompts", "ordinary"), ("preservation", "preservation"),
    ("CLIP text", "text_alignment"), ("CLIP image", "image_alignment"),
)
ROW_ORDER = ("base", "single", "joint", *(label for label, _, _ in METHODS))


def pooled(results: Sequence[PairResult]) -> dict[str, dict[str, Any]]:
    """Every model's estimates pooled over the pairs, and cd-eval's figures averaged."""
    table: dict[str, dict[str, Any]] = {}
    base_counts = None
    merged_scores: dict[str, ModelScores] = {}
    for result in results:
        for label, score in result.scores.items():
            merged_scores[label] = merged_scores[label].merged_with(score) if label in merged_scores else score
    if "base" in merged_scores:
        base_counts = merged_scores["base"].counts.get("ordinary")
    for label in ROW_ORDER:
        if label not in merged_scores:
            continue
        row: dict[str, Any] = dict(merged_scores[label].estimates(base_counts))
        figures = [r.fidelity[label] for r in results if label in r.fidelity]
        for key in ("fidelity", "cd_eval_preservation", "max_residual"):
            if figures:
                row[key] = sum(f[key] for f in figures) / len(figures)
        table[label] = row
    return table


def format_table(table: dict[str, dict[str, Any]]) -> str:
    """The pooled table as Markdown (rates with 95% intervals; cd-eval figures as numbers)."""
    headings = ["method", *(h for h, _ in COLUMNS), "fidelity (cd-eval)", "preservation (cd-eval)"]
    lines = ["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]
    for label, row in table.items():
        cells = [label]
        for _, key in COLUMNS:
            cells.append(str(row[key]) if key in row else "n/a")
        cells.append(f"{row['fidelity']:.2f}" if "fidelity" in row else "n/a")
        cells.append(f"{row['cd_eval_preservation']:.3f}" if "cd_eval_preservation" in row else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_json(options: BenchmarkOptions, results: Sequence[PairResult], table: dict[str, dict[str, Any]]) -> str:
    """Everything measured, as JSON (options, per-pair counts, pooled estimates)."""
    def plain(value: Any) -> Any:
        return value.to_dict() if hasattr(value, "to_dict") else value

    record = {
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "pairs": [{"pair": list(r.pair), "counts": {label: s.counts for label, s in r.scores.items()},
                   "fidelity": r.fidelity} for r in results],
        "pooled": {label: {k: plain(v) for k, v in row.items()} for label, row in table.items()},
        "torch": torch.__version__,
    }
    return json.dumps(record, indent=2, default=str)
