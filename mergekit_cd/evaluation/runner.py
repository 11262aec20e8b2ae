"""``evaluate(concepts, base=..., merged=..., compare=...)``: what each merge keeps and breaks.

The base pipeline is loaded once; each compared model is installed with :func:`apply` in turn
and taken out again with :func:`remove`, so every model runs the same UNet on the same probes.
Everything that can be refused is checked before the pipeline loads: the options, the deltas
against the base, the instance images, the CLIP / DINO folders (loaded and tried on a test
image then, so a wrong or corrupt folder costs seconds, not the whole evaluation), and the
compared merges, which run then too (one that fails, e.g. on non-finite text features, fails
before any UNet work). Each long phase after that has its own labelled progress bar.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..apply import apply, remove
from ..base import BaseModel
from ..captions import heldout_captions
from ..delta import ConceptDelta
from ..devices import float64_device
from ..errors import MergeError, TokenRenameWarning
from ..features import DEFAULT_ROWS, TextFeatures, TextSet
from ..loading import PathLike, as_base, load
from ..merge import MergePlan, merge, plan_merge
from ..merge_report import ConstraintResiduals
from ..sampling import load_pipeline
from .clip_metrics import ClipEmbedder, DinoEmbedder, clip_score, mean_pairwise_cosine, strip_tokens
from .fidelity import NoisePredictor, Probes, draw_probes, fidelity, relative_change, rename_tokens, training_scheduler
from .images import decode_latents, encode_images, read_images, sample_images, sample_latents
from .methods import BASE_KINDS, Method, parse_compare
from .options import EvalOptions
from .report import ConceptInfo, ConceptScores, EvalReport, MethodResult

#: Rows compared when the caller names none: the naive baselines and the paper's merge.
DEFAULT_COMPARE = "sum,average,constrained"
#: Rows compared next to given merged deltas when the caller names none.
DEFAULT_COMPARE_WITH_MERGED = "sum"


@dataclass
class _Concept:
    """One concept under evaluation, with its fixed inputs and reference predictions."""

    index: int  # in the plan
    owner: int  # the input it comes from
    token: str  # as its own delta names it ("" for a tokenless input)
    embeddings: tuple[Tensor, ...] | None
    class_word: str
    prompts: tuple[str, ...]  # in its own delta's token names
    latents_from: str
    clean: Tensor  # clean latents the probes are drawn from
    references: list | None = None  # reference images for the CLIP / DINO image metrics
    probes: Probes | None = None
    plain_base_output: Tensor | None = None  # the plain base: its token is plain text to it
    base_output: Tensor | None = None  # the base UNet with the concept's own token installed
    own_output: Tensor | None = None


def evaluate(concepts: Sequence[PathLike | ConceptDelta], *, base: BaseModel | PathLike,
             merged: Sequence[PathLike | ConceptDelta] | PathLike | ConceptDelta | None = None,
             compare: str | Sequence[str] | None = None, class_words: Sequence[str | None] | None = None,
             styles: Sequence[bool] | None = None, target_templates: Sequence[str] | None = None,
             instance_dirs: Sequence[PathLike] | None = None, held_out: Sequence[str] | None = None,
             reg_captions: Sequence[str] | None = None, clip: PathLike | None = None, dino: PathLike | None = None,
             world: Sequence[str] | None = None, rows: str = DEFAULT_ROWS, check_base: bool = True,
             progress: bool = False, options: EvalOptions | None = None, **option_fields: Any) -> EvalReport:
    """Measure how much of each concept a merge keeps and how much of the base it changes.

    concepts: the single-concept deltas D_1..D_N (files, folders, hub ids or objects), with
    ``class_words`` / ``styles`` / ``target_templates`` as for :func:`mergekit_cd.merge` (a
    concept's prompts are its target prompts). merged: deltas to evaluate (e.g. a cd-merge
    output, or a jointly trained delta), one row each. compare: merges to run and evaluate
    as well, or the ``base`` / ``plain-base`` reference rows (see
    :mod:`mergekit_cd.evaluation.methods`; default ``sum`` next to ``merged``, else
    ``sum,average,constrained``; an empty list is a MergeError); a ``sum`` row is always included.
    ``rows``: the row rule of the merges it runs (:class:`~mergekit_cd.MergeOptions`' ``rows``;
    ``hybrid`` needs ``"pipeline"``, refused before any work without it).

    How it measures is :class:`~mergekit_cd.evaluation.options.EvalOptions` (``options=``, or
    its fields as keywords: ``samples=64, seed=1``), checked before any work.

    Per row and concept, over ``samples`` probes (a clean latent of the concept, a uniform
    timestep, Gaussian noise and one of its prompts): the fidelity ``1 - ||eps_M - eps_i|| /
    ||eps_i - eps_B||`` with B the base UNet with concept i's own token installed (every merge
    keeps the tokens, so this scores the K/V change a merge decides about), the same with B the
    plain base as the issue defines it (``fidelity_plain_base``: the token's own effect counts
    too), and the constraint residual on its target-prompt features. Per row: the
    preservation ``||eps_M - eps_B|| / ||eps_B||`` over ``held_out_samples`` held-out captions
    (default: the shipped held-out set, disjoint from the regularisation captions). Clean
    latents come from ``instance_dirs`` (one folder per concept, encoded by the VAE at the
    model's size) or, without them, from ``sample_images`` images per target prompt sampled
    from the concept's own delta (``sample_steps`` steps; the report says so).

    With ``clip`` / ``dino`` (local transformers folders), each row also samples ``num_images``
    images per target prompt (``steps``, ``guidance_scale``) and gets the paper's text and
    image alignment, against the instance images or else the images sampled from each
    concept's own delta. All randomness comes from ``seed``: every model sees the same inputs.

    ``world``: on the toy world's base, the world concept of each concept input (one or two
    names of :data:`mergekit_cd.toyworld.concepts.CONCEPTS`): each row then also samples the
    benchmark's prompts (``num_images`` each, ``steps``, ``guidance_scale``) and gets the
    detector's rates (:class:`mergekit_cd.toyworld.quality.WorldJudge`) with 95% intervals.

    ``dtype`` is the pipeline's precision. The deltas are checked against the base (unless
    ``check_base`` is False) once, in full precision, as they load; installing them in the
    pipeline, which comes from the same folder, does not check again, so float16 and bfloat16
    pipelines, whose rounded weights have other fingerprints, work too.

    ``progress``: a labelled tqdm bar for each long phase: the merges (and their own bars), the
    reference images sampled without instance images and the CLIP / DINO samples (both by
    denoising step), the reference predictions and the rows.
    """
    options = EvalOptions.from_fields(options, option_fields)
    options.check_images(max(options.sample_images if instance_dirs is None else 1,
                             options.num_images if clip is not None or dino is not None else 1))
    merged_list = [] if merged is None else [merged] if isinstance(merged, (str, os.PathLike, ConceptDelta)) \
        else list(merged)
    methods = _methods(merged_list, compare)
    for method in methods:
        if _runs_a_merge(method):
            method.merge_options(rows)  # refuses what the merge would, now
    base_model = as_base(base)
    plan = plan_merge(concepts, reg_captions, base=base_model, class_words=class_words, styles=styles,
                      target_templates=target_templates, check_base=check_base)
    if instance_dirs is not None and len(instance_dirs) != len(plan.concepts):
        names = ", ".join(f"{c.token or '(no token)'} {c.class_word}" for c in plan.concepts)
        raise MergeError(f"Got {len(instance_dirs)} instance image folder(s) for {len(plan.concepts)} concept(s) "
                         f"({names}); give one folder per concept, in order.")
    instance_images = [read_images(folder) for folder in instance_dirs] if instance_dirs is not None else None
    given = [load(m, base=base_model, check_base=check_base) for m in merged_list]
    judge = _world_judge(world, len(plan.concepts), images_per_prompt=options.num_images, steps=options.steps,
                         guidance_scale=options.guidance_scale, seed=options.seed)
    clip_model = ClipEmbedder(clip, device=options.device) if clip is not None else None
    dino_model = DinoEmbedder(dino, device=options.device) if dino is not None else None
    captions = list(held_out) if held_out is not None else heldout_captions()
    if not captions:
        raise MergeError("The held-out caption set is empty.")

    # the merges run before the pipeline loads: one that fails (non-finite text features, ...) costs no UNet work
    models = _models(methods, plan, given, base_model, class_words=class_words, styles=styles,
                     target_templates=target_templates, reg_captions=reg_captions, rows=rows, device=options.device,
                     cache_dir=options.cache_dir, check_base=check_base, progress=progress)
    residuals = _residuals(plan, base_model,
                           [None if m.kind in BASE_KINDS else model for m, model in zip(methods, models)],
                           device=options.device, batch_size=options.batch_size)

    pipe = load_pipeline(base_model.path, device=options.device, dtype=options.dtype)  # the folder open_base read
    notes: list[str] = []
    image_metrics = clip_model is not None or dino_model is not None
    reference_steps = 0 if instance_images is not None else \
        sum(len(c.prompts) for c in plan.concepts) * options.sample_images * options.sample_steps
    with tqdm(total=reference_steps, desc="reference images", unit="step",
              disable=not progress or not reference_steps) as bar:
        evaluated = _concepts(plan, pipe, instance_images, instance_dirs, sample_images=options.sample_images,
                              sample_steps=options.sample_steps, seed=options.seed,
                              guidance_scale=options.guidance_scale, batch_size=options.batch_size,
                              need_references=image_metrics, notes=notes, bar=bar)
    predictor = NoisePredictor(pipe, batch_size=options.batch_size)
    scheduler = training_scheduler(pipe)
    generator = torch.Generator().manual_seed(options.seed)
    for concept in evaluated:
        concept.probes = draw_probes(concept.clean, concept.prompts, options.samples, scheduler=scheduler,
                                     generator=generator)
    held = _held_out_probes(pipe, captions, options.held_out_samples, scheduler=scheduler, generator=generator)
    notes.append(f"preservation: {options.held_out_samples} held-out captions on standard-normal latents "
                 f"(a stand-in for image latents) at uniform timesteps.")
    shared = set(captions) & set(plan.reg_captions)
    if shared:
        notes.append(f"{len(shared)} of the {len(set(captions))} held-out captions are regularisation captions too, "
                     f"which the merges were fitted to keep: preservation looks better than it is.")

    owners = sorted({c.owner for c in evaluated})
    with tqdm(total=1 + 2 * len(owners), desc="reference predictions", unit="model", disable=not progress) as bar:
        base_held = predictor.predict(held)
        for concept in evaluated:
            concept.plain_base_output = predictor.predict(concept.probes)
        bar.update()
        for owner in owners:
            for scale, attribute in ((0.0, "base_output"), (1.0, "own_output")):
                # scale 0: the base UNet with the concept's own tokens, so only the UNet part counts
                with _installed(pipe, plan.deltas[owner], scale=scale):
                    for concept in (c for c in evaluated if c.owner == owner):
                        setattr(concept, attribute, predictor.predict(concept.probes))
                bar.update()
    for concept in evaluated:
        if torch.equal(concept.own_output, concept.base_output):
            notes.append(f"{concept.token or concept.class_word}: its own delta predicts exactly what the base "
                         f"does on its probes, so its fidelity is undefined (n/a).")

    if judge is not None:
        judge.measure_base(pipe)
    references = _reference_embeddings(evaluated, clip_model, dino_model)
    image_steps = len(methods) * sum(len(c.prompts) for c in evaluated) * options.num_images * options.steps \
        if image_metrics else 0
    with tqdm(total=len(methods), desc="rows", unit="row", disable=not progress) as bar, \
            tqdm(total=image_steps, desc="sampling for CLIP / DINO", unit="step",
                 disable=not progress or not image_steps) as sampling_bar:
        results = []
        for method, model, row_residuals in zip(methods, models, residuals):
            bar.set_postfix_str(method.label)
            results.append(_evaluate_row(method, model, pipe, predictor, evaluated, held, base_held, row_residuals,
                                         clip_model=clip_model, dino_model=dino_model, references=references,
                                         num_images=options.num_images, steps=options.steps,
                                         guidance_scale=options.guidance_scale, seed=options.seed, notes=notes,
                                         bar=sampling_bar, judge=judge))
            bar.update()

    settings = {**options.settings(), "timesteps": f"uniform over [0, {scheduler.config.num_train_timesteps})",
                "prediction_type": scheduler.config.prediction_type,
                "held_out_captions": "given" if held_out is not None else "shipped held-out set", "rows": rows,
                "clip": str(clip) if clip is not None else None, "dino": str(dino) if dino is not None else None}
    infos = tuple(ConceptInfo(c.token, c.class_word, c.prompts, plan.sources[c.owner], c.latents_from)
                  for c in evaluated)
    return EvalReport(base_model.name, base_model.architecture.name, infos, tuple(results), settings,
                      tuple(dict.fromkeys(notes)))


@contextmanager
def _installed(pipe, delta: ConceptDelta | None, *, scale: float = 1.0) -> Iterator[None]:
    """``delta`` (times ``scale``) installed in ``pipe`` for the block, then removed; None: nothing.

    Every delta here was checked against the base as it loaded, in full precision, and the
    pipeline comes from the same folder, so :func:`apply` does not check the fingerprint again:
    a float16 or bfloat16 pipeline's rounded weights would never match it.
    """
    if delta is None:
        yield
        return
    apply(pipe, delta, scale=scale, check_base=False)
    try:
        yield
    finally:
        remove(pipe)


def _count(number: int, noun: str) -> str:
    """``1 image``, ``2 images``."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _methods(merged: list, compare: str | Sequence[str] | None) -> list[Method]:
    """Given deltas first (labelled by name, ``source`` = their index), then the compared merges,
    a sum row always."""
    if compare is None:
        compare = DEFAULT_COMPARE_WITH_MERGED if merged else DEFAULT_COMPARE
    methods: list[Method] = []
    for index, reference in enumerate(merged):
        label = _label(reference, index, len(merged))
        if any(m.label == label for m in methods):
            label = f"{label} ({index + 1})"
        methods.append(Method(label, "delta", source=index))
    compared = parse_compare(compare)
    if not any(m.label == "sum" for m in compared):
        compared.insert(0, Method("sum", "sum"))
    taken = {m.label for m in methods}
    return methods + [m for m in compared if m.label not in taken]


def _label(reference, index: int, count: int) -> str:
    """A given delta's row label: its file name without ``.safetensors``, or ``merged [N]``."""
    if isinstance(reference, ConceptDelta):
        return "merged" if count == 1 else f"merged {index + 1}"
    path = Path(str(reference))
    name = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name
    return name or str(reference)


def _concepts(plan: MergePlan, pipe, instance_images: list | None, instance_dirs, *, sample_images: int,
              sample_steps: int, seed: int, guidance_scale: float, batch_size: int, need_references: bool,
              notes: list[str], bar: tqdm) -> list[_Concept]:
    """Each concept with its own token name, prompts and clean latents (instance, or sampled with
    ``bar`` advancing by one per denoising step)."""
    evaluated = []
    for index, (concept, owner) in enumerate(zip(plan.concepts, plan.owners)):
        back = {r.new: r.old for r in plan.token_renames if r.operand == owner}
        token = back.get(concept.token, concept.token)
        prompts = tuple(_renamed(concept.prompts, concept.token, token))
        delta = plan.deltas[owner]
        embeddings = delta.tokens.get(token) if token else None
        name = f"{token or '(no token)'} {concept.class_word}"
        if instance_images is not None:
            references = instance_images[index]
            clean = encode_images(pipe, references, batch_size=batch_size)
            latents_from = str(instance_dirs[index])
        else:
            with _installed(pipe, delta):
                clean = sample_latents(pipe, prompts, num_images=sample_images, seed=seed, steps=sample_steps,
                                       guidance_scale=guidance_scale, bar=bar)
                references = decode_latents(pipe, clean) if need_references else None
            images, steps = _count(len(clean), "image"), _count(sample_steps, "step")
            latents_from = f"sampled: {images} from its own delta ({steps})"
            notes.append(f"{name}: no instance images; its probes use latents of {images} sampled from its own "
                         f"delta ({steps})"
                         + (", and the image metrics use those images as references." if need_references else "."))
        evaluated.append(_Concept(index, owner, token, embeddings, concept.class_word or "", prompts,
                                  latents_from, clean, references))
    return evaluated


def _held_out_probes(pipe, captions: list[str], count: int, *, scheduler, generator: torch.Generator) -> Probes:
    """``count`` held-out captions (no repeats while they last), each on its own standard-normal
    latent at a uniform timestep with Gaussian noise."""
    order = torch.randperm(len(captions), generator=generator).tolist()
    chosen = tuple(captions[order[i % len(order)]] for i in range(count))
    size = int(pipe.unet.config.sample_size)
    clean = torch.randn((count, int(pipe.unet.config.in_channels), size, size), generator=generator)
    timesteps = torch.randint(int(scheduler.config.num_train_timesteps), (count,), generator=generator)
    noise = torch.randn(clean.shape, generator=generator)
    return Probes(scheduler.add_noise(clean, noise, timesteps), timesteps, chosen)


def _models(methods: list[Method], plan: MergePlan, given: list[ConceptDelta], base: BaseModel, *, class_words,
            styles, target_templates, reg_captions, rows: str, device: torch.device, cache_dir, check_base: bool,
            progress: bool) -> list[ConceptDelta | None]:
    """Each row's delta (see :func:`_model`); the merges run under one bar, each with its own bars."""
    merges = sum(_runs_a_merge(method) for method in methods)
    models = []
    with tqdm(total=merges, desc="merges", unit="merge", disable=not progress or not merges) as bar:
        for method in methods:
            merging = _runs_a_merge(method)
            if merging:
                bar.set_postfix_str(method.label)
            models.append(_model(method, plan, given, base, class_words=class_words, styles=styles,
                                 target_templates=target_templates, reg_captions=reg_captions, rows=rows,
                                 device=device, cache_dir=cache_dir, check_base=check_base, progress=progress))
            if merging:
                bar.update()
    return models


def _runs_a_merge(method: Method) -> bool:
    """Whether the row's delta comes from :func:`mergekit_cd.merge` (not given, not the base)."""
    return method.kind not in (*BASE_KINDS, "delta")


def _model(method: Method, plan: MergePlan, given: list[ConceptDelta], base: BaseModel, *, class_words, styles,
           target_templates, reg_captions, rows: str, device: torch.device, cache_dir, check_base: bool,
           progress: bool) -> ConceptDelta | None:
    """The delta a row evaluates: a given delta, the merge it names, for the base row the
    concepts' tokens (with some layers, installed with scale 0), for the plain base None."""
    if method.kind == "plain-base":
        return None
    if method.kind == "base":
        return ConceptDelta(dict(plan.deltas[0].layers), dict(plan.tokens), base=base.name,
                            base_fingerprint=base.fingerprint, architecture=base.architecture.name,
                            concepts=plan.concepts)
    if method.kind == "delta":
        return given[method.source]
    options = method.merge_options(rows, len(plan.concepts), device=device, cache_dir=cache_dir)
    with warnings.catch_warnings():  # the plan warned once already; tokens are matched by embedding
        warnings.simplefilter("ignore", TokenRenameWarning)
        return merge(list(plan.deltas), reg_captions, base=base, options=options, class_words=class_words,
                     styles=styles, target_templates=target_templates, check_base=check_base, progress=progress)


def _residuals(plan: MergePlan, base: BaseModel, models: list[ConceptDelta | None], *, device: torch.device,
               batch_size: int) -> list[list[float]]:
    """Per row and concept, ``||(M - D_i) C_i^T|| / ||(W0 + D_i) C_i^T||`` over all layers.

    C_i: the features of concept i's target prompts, as the merge computes them (every
    concept's token installed); the merge report's residual, recomputed for any delta.
    """
    text_device = float64_device(device)
    encoder = TextFeatures(base, plan.tokens, device=text_device)
    features = [torch.cat([prompt.rows for prompt in prompts]).double() for prompts in
                encoder.encode([TextSet(tuple(concept.prompts)) for concept in plan.concepts], batch_size=batch_size)]
    del encoder
    residuals = ConstraintResiduals(len(models), features)
    for name in base.layer_names():
        W0 = torch.cat(base.kv(name)).double()
        inputs = {owner: plan.deltas[owner].layers[name].rows().double() for owner in set(plan.owners)}
        rows = [model.layers[name].rows().double() if model is not None else torch.zeros_like(W0)
                for model in models]
        own = torch.cat([inputs[owner] @ C.T for owner, C in zip(plan.owners, features)], dim=1)
        residuals.add(torch.cat([W0 @ C.T for C in features], dim=1) + own, own, rows)
    return residuals.relative()


def _token_for(concept: _Concept, model: ConceptDelta, label: str, notes: list[str]) -> str:
    """The name ``model`` gives concept's token: the token with the same embeddings (a merge
    keeps them, maybe renamed), else the one of a concept with the same class word, else the
    same name. A model without it keeps the name, which its tokenizer splits like any word."""
    token = concept.token
    if not token:
        return token
    same = [name for name, embeddings in model.tokens.items() if _equal(embeddings, concept.embeddings)]
    if same:
        return token if token in same else same[0]
    by_class = [c.token for c in model.concepts if c.class_word == concept.class_word and c.token in model.tokens]
    if len(by_class) == 1:
        notes.append(f"{label}: no token has {token}'s embeddings; the {concept.class_word} concept's token "
                     f"{by_class[0]} stands for it.")
        return by_class[0]
    if token in model.tokens:
        notes.append(f"{label}: its token {token} has other embeddings than {token} {concept.class_word}'s own.")
        return token
    notes.append(f"{label}: has no token for {token} {concept.class_word}; its prompts keep the name {token}, "
                 f"which the model reads as plain text.")
    return token


def _renamed(prompts: Sequence[str], token: str, new: str) -> list[str]:
    """``prompts`` with the whole-word token renamed (tokenless prompts as they are)."""
    return [rename_tokens(prompt, {token: new}) for prompt in prompts] if token else list(prompts)


def _equal(a: tuple[Tensor, ...] | None, b: tuple[Tensor, ...] | None) -> bool:
    """Whether two token embeddings (one per text encoder) are the same numbers."""
    return a is not None and b is not None and len(a) == len(b) and all(
        x.shape == y.shape and torch.equal(x.float(), y.float()) for x, y in zip(a, b))


def _reference_embeddings(evaluated: list[_Concept], clip_model: ClipEmbedder | None,
                          dino_model: DinoEmbedder | None) -> list[dict[str, Tensor]]:
    """Per concept, the CLIP and DINO embeddings of its reference images."""
    embeddings: list[dict[str, Tensor]] = []
    for concept in evaluated:
        found = {}
        if clip_model is not None:
            found["clip"] = clip_model.embed_images(concept.references)
        if dino_model is not None:
            found["dino"] = dino_model.embed_images(concept.references)
        embeddings.append(found)
    return embeddings


def _evaluate_row(method: Method, model: ConceptDelta | None, pipe, predictor: NoisePredictor,
                  evaluated: list[_Concept], held: Probes, base_held: Tensor, residuals: list[float], *,
                  clip_model: ClipEmbedder | None, dino_model: DinoEmbedder | None,
                  references: list[dict[str, Tensor]], num_images: int, steps: int, guidance_scale: float,
                  seed: int, notes: list[str], bar: tqdm, judge: Any = None) -> MethodResult:
    """Install the row's model, predict on every probe set (and sample for CLIP / DINO, ``bar``
    advancing by one per denoising step; for the world judge), remove it."""
    with _installed(pipe, model, scale=0.0 if method.kind == "base" else 1.0):
        scores, tokens = [], []
        for concept, residual, reference in zip(evaluated, residuals, references):
            token = concept.token if model is None else _token_for(concept, model, method.label, notes)
            tokens.append(token)
            prompts = _renamed(concept.prompts, concept.token, token)
            output = predictor.predict(concept.probes.with_prompts(_renamed(concept.probes.prompts, concept.token,
                                                                            token)))
            metrics = {}
            if clip_model is not None or dino_model is not None:
                metrics = _image_metrics(pipe, prompts, {concept.token, token}, reference, clip_model, dino_model,
                                         num_images=num_images, steps=steps, guidance_scale=guidance_scale, seed=seed,
                                         bar=bar)
            scores.append(ConceptScores(
                concept.token, fidelity=fidelity(output, concept.own_output, concept.base_output),
                fidelity_plain_base=fidelity(output, concept.own_output, concept.plain_base_output),
                residual=residual, **metrics))
        preservation = relative_change(predictor.predict(held), base_held)
        world = judge.score(pipe, tokens) if judge is not None else None
    options = dict(method.options)
    if method.kind == "delta":
        options["source"] = str(model.metadata.get("source", method.label))
    return MethodResult(method.label, method.kind, options, tuple(scores), preservation, world)


def _world_judge(names: Sequence[str] | None, count: int, **options: Any) -> Any:
    """The toy world's judge for ``names`` (one per concept input), or None without them."""
    if names is None:
        return None
    if len(names) != count:
        raise MergeError(f"--world names {len(names)} toy-world concept(s) for {count} concept input(s); "
                         f"give one name per input, in order.")
    from ..toyworld.quality import WorldJudge

    return WorldJudge(names, **options)


def _image_metrics(pipe, prompts: list[str], tokens: set[str], reference: dict[str, Tensor],
                   clip_model: ClipEmbedder | None, dino_model: DinoEmbedder | None, *, num_images: int,
                   steps: int, guidance_scale: float, seed: int, bar: tqdm) -> dict[str, float]:
    """Sample ``num_images`` per prompt and score them as the paper did."""
    images = sample_images(pipe, prompts, num_images=num_images, seed=seed, steps=steps,
                           guidance_scale=guidance_scale, bar=bar)
    metrics = {}
    if clip_model is not None:
        texts = [strip_tokens(prompt, tokens) for prompt in prompts for _ in range(num_images)]
        generated = clip_model.embed_images(images)
        metrics["text_alignment"] = float(clip_score(clip_model.embed_texts(texts), generated).mean())
        metrics["image_alignment"] = mean_pairwise_cosine(generated, reference["clip"])
    if dino_model is not None:
        metrics["dino_alignment"] = mean_pairwise_cosine(dino_model.embed_images(images), reference["dino"])
    return metrics
