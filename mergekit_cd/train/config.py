"""What a training run is asked to do: the concepts and the recipe, checked before any work.

Defaults are the paper's recipe (REFERENCE section 5): K/V of the cross-attention layers and
the new token rows train; 250 steps for one concept and 500 for two or more trained jointly;
batch 8; learning rate 1e-5 scaled by the batch size (8e-5); AdamW with weight decay 1e-2;
gradient clipping at 1.0; prior preservation on 200 class images; the resize augmentation
with its prompt prefixes and loss mask.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..delta import check_token_name
from ..errors import MergeError
from ..sampling import check_seed

#: Rare tokens the new token rows start from, one per concept in order (the authors' choice).
DEFAULT_INIT_TOKENS = ("ktn", "pll", "ucd")
#: Projections of each cross-attention layer that may train; k and v always do.
PROJECTIONS = ("q", "k", "v", "out")
#: diffusers' module name of each projection, inside a cross-attention layer.
PROJECTION_MODULES = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}
MIXED_PRECISIONS = ("no", "fp16", "bf16")
INSTANCE_TEMPLATE = "photo of a {token} {class_word}"
CLASS_TEMPLATE = "photo of a {class_word}"

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class ConceptSpec:
    """One concept to learn: its images, the token that will name it and its class.

    instance_prompt: training caption with ``{token}`` and ``{class_word}`` (default
    ``"photo of a {token} {class_word}"``). reg_dir: real class images (with optional
    captions); without it, class images are generated from ``class_prompt`` (default
    ``"photo of a {class_word}"``). init_token: the existing token whose embedding the new
    token starts from (default ``ktn``, ``pll``, ``ucd`` for the 1st, 2nd, 3rd concept).
    """

    instance_dir: Path
    class_word: str
    token: str = "<new1>"
    init_token: str | None = None
    instance_prompt: str = INSTANCE_TEMPLATE
    reg_dir: Path | None = None
    class_prompt: str = CLASS_TEMPLATE

    def filled_instance_prompt(self) -> str:
        """The training caption with this concept's token and class word filled in."""
        return _fill(self.instance_prompt, self.token, self.class_word, "instance prompt")

    def filled_class_prompt(self) -> str:
        """The class images' caption (and generation prompt) with the class word filled in."""
        return _fill(self.class_prompt, self.token, self.class_word, "class prompt")


def _fill(template: str, token: str, class_word: str, what: str) -> str:
    """``template`` with {token} and {class_word} filled in and spaces collapsed; a malformed one is a MergeError."""
    try:
        return " ".join(template.format(token=token, class_word=class_word).split())
    except (KeyError, IndexError, ValueError) as error:
        raise MergeError(f"The {what} template {template!r} is malformed ({error}); use "
                         f"{{token}} and {{class_word}} only.") from None


@dataclass(frozen=True)
class TrainingConfig:
    """Every option of a run (see :func:`mergekit_cd.train.train` for their meaning)."""

    base: str
    concepts: tuple[ConceptSpec, ...]
    output: Path
    steps: int | None = None
    batch_size: int = 8
    learning_rate: float = 1e-5
    scale_lr: bool = True
    resolution: int | None = None
    train: tuple[str, ...] = ("k", "v")
    augment: bool = True
    hflip: bool = False
    prior: bool = True
    prior_loss_weight: float = 1.0
    snr_gamma: float | None = None
    num_class_images: int = 200
    class_sampling_steps: int = 50
    class_guidance_scale: float = 6.0
    class_cache_dir: Path | None = None
    mixed_precision: str | None = None  # None: accelerate's setting (accelerate launch/config), else "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    resume: Path | None = None
    checkpoint_every: int = 50
    keep_checkpoints: int = 1
    validation_prompts: tuple[str, ...] = ()
    validation_every: int | None = None
    num_validation_images: int = 2
    validation_sampling_steps: int = 50
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    device: str | None = None
    force: bool = False
    progress: bool = True
    cache: bool = True  # False: the plain way (VAE and text encoder every step), for benchmarks

    @property
    def total_steps(self) -> int:
        """The paper's 250 steps for one concept, 500 for several trained jointly."""
        if self.steps is not None:
            return self.steps
        return 250 if len(self.concepts) == 1 else 500

    def init_token(self, index: int) -> str:
        concept = self.concepts[index]
        if concept.init_token:
            return concept.init_token
        return DEFAULT_INIT_TOKENS[index % len(DEFAULT_INIT_TOKENS)]

    def recipe(self) -> dict[str, Any]:
        """The options that decide the result, JSON-ready (recorded in the output's metadata)."""
        return {
            "steps": self.total_steps, "batch_size": self.batch_size, "base_learning_rate": self.learning_rate,
            "scale_lr": self.scale_lr, "resolution": self.resolution, "train": list(self.train),
            "augment": self.augment, "hflip": self.hflip, "prior": self.prior,
            "prior_loss_weight": self.prior_loss_weight if self.prior else None,
            "snr_gamma": self.snr_gamma, "mixed_precision": self.mixed_precision, "seed": self.seed,
            "optimizer": {"name": "AdamW", "weight_decay": self.weight_decay, "betas": list(self.adam_betas),
                          "eps": self.adam_epsilon},
            "max_grad_norm": self.max_grad_norm,
            "concepts": [{"token": c.token, "class_word": c.class_word, "init_token": self.init_token(i),
                          "instance_prompt": c.filled_instance_prompt(),
                          "class_images": (None if not self.prior else
                                           str(c.reg_dir) if c.reg_dir else "generated"),
                          "class_prompt": c.filled_class_prompt() if self.prior else None}
                         for i, c in enumerate(self.concepts)],
        }

    def to_json(self) -> str:
        """The whole configuration as JSON (stored in checkpoints)."""
        return json.dumps(asdict(self), default=str, sort_keys=True)


def resume_fields(config: TrainingConfig, *, resolution: int, mixed_precision: str,
                  processes: int) -> dict[str, Any]:
    """The options that decide what a run trains, as stored in its checkpoints and compared on
    resume: {option as the user writes it: value}, JSON-ready. The step count is not among
    them (a run may be resumed with more steps: the learning rate is constant, so N steps
    then M more are the first N + M of a longer run). ``resolution``, ``mixed_precision`` and
    ``processes`` are the values in effect (the model's own resolution, accelerate's choice).
    """
    several = len(config.concepts) > 1
    fields: dict[str, Any] = {"number of concepts": len(config.concepts)}
    generated = False
    for index, concept in enumerate(config.concepts):
        which = f" (concept {index + 1})" if several else ""
        fields[f"--instance-dir{which}"] = _absolute(concept.instance_dir)
        fields[f"--class-word{which}"] = concept.class_word
        fields[f"--token{which}"] = concept.token
        fields[f"--init-token{which}"] = config.init_token(index)
        fields[f"--instance-prompt{which}"] = concept.filled_instance_prompt()
        if config.prior:
            fields[f"--reg-dir{which}"] = _absolute(concept.reg_dir) if concept.reg_dir else None
            fields[f"--class-prompt{which}"] = concept.filled_class_prompt()
            generated = generated or concept.reg_dir is None
    fields.update({
        "--batch-size": config.batch_size, "--lr": config.learning_rate, "--scale-lr": config.scale_lr,
        "number of processes": processes, "--resolution": resolution, "--train": ",".join(config.train),
        "augmentation (--no-aug)": config.augment, "--hflip": config.hflip, "--seed": config.seed,
        "--snr-gamma": config.snr_gamma,
        "--mixed-precision": mixed_precision, "prior preservation (--no-prior)": config.prior,
        "weight_decay": config.weight_decay, "adam_betas": list(config.adam_betas),
        "adam_epsilon": config.adam_epsilon, "max_grad_norm": config.max_grad_norm})
    if config.prior:
        fields["--prior-loss-weight"] = config.prior_loss_weight
        fields["--num-class-images"] = config.num_class_images
        if generated:
            fields["--class-sampling-steps"] = config.class_sampling_steps
            fields["class_guidance_scale"] = config.class_guidance_scale
    return fields


def _absolute(folder: PathLike) -> str:
    """A folder as an absolute path, so a resume from another working directory compares equal."""
    return str(Path(folder).expanduser().resolve())


def compare_fields(now: dict[str, Any], then: dict[str, Any]) -> list[str]:
    """``option: now (the checkpoint's: then)`` for every field both hold with other values;
    fields only one side holds (e.g. prior settings when one run has no prior) are left to the
    field that explains them."""
    return [f"{name} {now[name]!r} (the checkpoint's: {then[name]!r})"
            for name in now if name in then and now[name] != then[name]]


def check_config(config: TrainingConfig) -> TrainingConfig:
    """Refuse impossible options with one MergeError each; returns the config, normalised."""
    if not config.concepts:
        raise MergeError("Nothing to train: give --instance-dir and --class-word, or --concepts FILE.")
    tokens = [c.token for c in config.concepts]
    duplicates = sorted({t for t in tokens if tokens.count(t) > 1})
    if duplicates:
        raise MergeError(f"Token {duplicates[0]} is used by two concepts; every concept needs its own token.")
    for concept in config.concepts:
        check_token_name(concept.token)
        if not concept.class_word or not concept.class_word.strip():
            raise MergeError(f"Concept {concept.token} needs a class word (e.g. --class-word cat).")
        if concept.token not in concept.filled_instance_prompt():
            raise MergeError(f"The instance prompt {concept.instance_prompt!r} of {concept.token} lacks "
                             f"{{token}}; the token must appear in it to learn anything.")
        concept.filled_class_prompt()
    positive = {"batch_size": config.batch_size, "checkpoint_every": config.checkpoint_every,
                "keep_checkpoints": config.keep_checkpoints, "class_sampling_steps": config.class_sampling_steps,
                "num_validation_images": config.num_validation_images,
                "validation_sampling_steps": config.validation_sampling_steps}
    if config.steps is not None:
        positive["steps"] = config.steps
    if config.validation_every is not None:
        positive["validation_every"] = config.validation_every
    for name, value in positive.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise MergeError(f"--{name.replace('_', '-')} must be a positive whole number, got {value!r}.")
    # `not value > 0` rather than `value <= 0`: NaN fails every comparison and must be refused too
    for option, value, least in (("--lr", config.learning_rate, "positive"),
                                 ("--prior-loss-weight", config.prior_loss_weight, "zero or more"),
                                 ("weight_decay", config.weight_decay, "zero or more"),
                                 ("max_grad_norm", config.max_grad_norm, "zero or more (0: no clipping)"),
                                 ("adam_epsilon", config.adam_epsilon, "positive"),
                                 ("class_guidance_scale", config.class_guidance_scale, "zero or more"),
                                 *((("--snr-gamma", config.snr_gamma, "positive"),) if config.snr_gamma is not None
                                   else ())):
        finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not finite or not (value > 0 if least == "positive" else value >= 0):
            raise MergeError(f"{option} must be a finite number, {least}; got {value!r}.")
    if len(config.adam_betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in config.adam_betas):
        raise MergeError(f"adam_betas must be two numbers in [0, 1), got {config.adam_betas!r}.")
    check_seed(config.seed, config.num_validation_images if config.validation_prompts else 1)
    if config.num_class_images < 0:
        raise MergeError(f"--num-class-images must not be negative, got {config.num_class_images}.")
    generated = [c.token for c in config.concepts if c.reg_dir is None]
    if config.prior and config.num_class_images == 0 and generated:
        raise MergeError(f"Concept {generated[0]} has no --reg-dir and --num-class-images is 0; give "
                         f"class images, a positive count to generate, or --no-prior.")
    if config.resolution is not None and (not isinstance(config.resolution, int) or config.resolution < 1):
        raise MergeError(f"--resolution must be a positive number of pixels, got {config.resolution!r}.")
    if config.mixed_precision is not None and config.mixed_precision not in MIXED_PRECISIONS:
        raise MergeError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISIONS)}, "
                         f"got {config.mixed_precision!r}.")
    train = tuple(dict.fromkeys(part.strip() for part in config.train if part.strip()))
    unknown = [part for part in train if part not in PROJECTIONS]
    if unknown:
        raise MergeError(f"--train {','.join(config.train)}: unknown projection {unknown[0]!r}; choose "
                         f"from q,k,v,out (k and v always train).")
    if not {"k", "v"} <= set(train):
        raise MergeError(f"--train {','.join(config.train)}: k and v always train in Custom Diffusion "
                         f"(add q and/or out to train more), e.g. --train k,v or --train q,k,v,out.")
    if config.validation_prompts and config.validation_every is None:
        config = replace(config, validation_every=config.checkpoint_every)
    return replace(config, train=tuple(p for p in PROJECTIONS if p in train))


def read_concepts_file(path: PathLike) -> list[ConceptSpec]:
    """Concepts for joint training from a JSON list (see :func:`parse_concepts` for the fields).

    Relative folders are read relative to the JSON file.
    """
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise MergeError(f"Cannot read {path}: {error.strerror or error}.") from None
    except ValueError as error:
        raise MergeError(f"{path} is not valid JSON ({error}).") from None
    if not isinstance(entries, list):
        raise MergeError(f"{path} must hold a non-empty JSON list of concept objects, e.g. "
                         f'[{{"instance_dir": "cat/", "class_word": "cat", "token": "<new1>"}}].')
    return parse_concepts(entries, where=str(path), relative_to=path.parent)


#: Other names accepted for concept fields (those of diffusers' concepts_list).
CONCEPT_ALIASES = {"instance_data_dir": "instance_dir", "class_data_dir": "reg_dir"}
CONCEPT_FIELDS = ("instance_dir", "class_word", "token", "init_token", "instance_prompt", "reg_dir", "class_prompt")


def parse_concepts(entries: Iterable[ConceptSpec | Mapping[str, Any]], *, where: str = "concepts",
                   relative_to: Path | None = None) -> list[ConceptSpec]:
    """Concepts from :class:`ConceptSpec` objects or mappings (a concepts file or the API's list).

    A mapping has ``instance_dir`` (or diffusers' ``instance_data_dir``), ``class_word``, and
    optionally ``token`` (default ``<new1>``, ``<new2>``, ... by position), ``init_token``,
    ``instance_prompt``, ``reg_dir`` (or ``class_data_dir``) and ``class_prompt``; an unknown
    or missing field, or a value of the wrong type, is one MergeError naming the concept.
    Relative folders are taken relative to ``relative_to`` when given.
    """
    entries = list(entries) if isinstance(entries, Iterable) and not isinstance(entries, (str, bytes, Mapping)) \
        else None
    if not entries or not all(isinstance(e, (ConceptSpec, Mapping)) for e in entries):
        raise MergeError(f"{where} must be a non-empty list of concepts (objects with instance_dir, class_word "
                         f'and optionally token, ...), e.g. [{{"instance_dir": "cat/", "class_word": "cat"}}].')
    concepts = []
    for index, raw in enumerate(entries):
        if isinstance(raw, ConceptSpec):
            concepts.append(raw)
            continue
        entry = {CONCEPT_ALIASES.get(str(key), key): value for key, value in raw.items()}
        unknown = sorted(str(key) for key in set(entry) - set(CONCEPT_FIELDS))
        if unknown:
            raise MergeError(f"{where}: concept {index + 1} has unknown field {unknown[0]!r}; known fields: "
                             f"{', '.join(sorted(CONCEPT_FIELDS))} (or instance_data_dir, class_data_dir).")
        entry = {key: value for key, value in entry.items() if value is not None}
        missing = [key for key in ("instance_dir", "class_word") if not entry.get(key)]
        if missing:
            raise MergeError(f"{where}: concept {index + 1} lacks {missing[0]!r}.")
        for key, value in entry.items():
            folder = key in ("instance_dir", "reg_dir")
            if not (isinstance(value, str) or (folder and isinstance(value, os.PathLike))):
                kind = "a folder path" if folder else "a string"
                raise MergeError(f"{where}: concept {index + 1}: {key} must be {kind}, got {value!r}.")
        for key in ("instance_dir", "reg_dir"):
            if entry.get(key):
                folder = Path(entry[key]).expanduser()
                entry[key] = folder if folder.is_absolute() or relative_to is None else relative_to / folder
        entry.setdefault("token", f"<new{index + 1}>")
        concepts.append(ConceptSpec(**entry))
    return concepts
