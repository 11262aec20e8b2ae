"""``merge(deltas, reg_captions, base=...)``: files -> deltas -> features -> solver -> delta.

The merge keeps every concept's K/V outputs on its own target prompts and changes the base as
little as possible on the regularisation captions (the paper's constrained least squares, or
its soft/weighted generalisation); ``sum`` and ``average`` are the naive baselines.
"""

from __future__ import annotations

import gc
import hashlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import formats
from .base import BaseModel
from .delta import Concept, ConceptDelta, LayerDelta, LazyLayers, LowRank, TokenRename, dense, merge_tokens
from .errors import MergeError
from .features import (
    FEATURE_RULE,
    LazyTextFeatures,
    TextFeatures,
    cached_features,
    cached_gram,
    default_reg_captions,
    heldout_captions,
    target_prompts,
)
from .loading import PathLike, as_base, load, resolve_delta
from .merge_methods import get_method, weighted_method_names
from .solvers import SolveInfo
from .solvers._common import default_rtol
from .version import __version__

#: Soft-merge weight of each concept when none is given: its outputs are kept almost exactly.
DEFAULT_SOFT_WEIGHT = 1e3


@dataclass(frozen=True)
class ConceptReport:
    """How well the merged model keeps one concept: K/V outputs on its own target prompts."""

    token: str
    class_word: str
    prompts: tuple[str, ...]
    residual: float  # ||W C_i^T - W_i C_i^T|| / ||W_i C_i^T|| of W = W0 + the float32 difference returned
    sum_residual: float  # the same for the naive sum of deltas
    #: the same for W as full-weight formats write it: W0 + difference, rounded to float32
    full_weights_residual: float = 0.0


@dataclass(frozen=True)
class MergeReport:
    """What a merge did and how it went."""

    method: str
    concepts: tuple[ConceptReport, ...]
    drift: float  # relative change of K/V outputs on held-out captions, merged vs base
    sum_drift: float  # the same for the naive sum of deltas
    token_renames: tuple[TokenRename, ...]
    num_reg_captions: int
    num_reg_rows: int
    gram_from_cache: bool
    solve_info: SolveInfo | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class MergePlan:
    """Everything decided before any solve: inputs, concepts, prompts and sizes."""

    base: BaseModel
    deltas: tuple[ConceptDelta, ...]
    sources: tuple[str, ...]
    formats: tuple[str, ...]  # the format each input was read in ("object" for deltas given in memory)
    concepts: tuple[Concept, ...]  # tokens already renamed to their merged names
    owners: tuple[int, ...]  # index of the input each concept comes from
    tokens: dict[str, tuple[Tensor, ...]]
    token_renames: tuple[TokenRename, ...]
    reg_captions: tuple[str, ...]

    @property
    def num_weight_rows(self) -> int:
        return sum(k[0] + v[0] for k, v in self.base.kv_shapes().values())

    def estimated_memory_bytes(self, num_constraint_rows: int, text_dtype: torch.dtype = torch.float32) -> int:
        """Peak memory of :func:`execute` beyond the interpreter, on the CPU.

        The inputs stay loaded throughout; on top come either the text encoder (released
        first) or the result (float32) plus one layer's float64 working rows and the d x d
        matrices of the factorisation.
        """
        d = self.base.context_dim
        inputs = sum(_delta_bytes(delta) for delta in self.deltas)
        text = self.base.text_encoder_parameters() * torch.finfo(text_dtype).bits // 8
        layer_rows = max((k[0] + v[0] for k, v in self.base.kv_shapes().values()), default=0)
        # base, sum, one input's and merged rows, read one input at a time; D C^T per constraint
        working = 8 * layer_rows * (d * 5 + 2 * num_constraint_rows)
        solver = 8 * (4 * d * d + 3 * num_constraint_rows * d)
        return inputs + max(text, 4 * self.num_weight_rows * d + working + solver)


@dataclass(frozen=True)
class PlanSummary:
    """What a merge would do, for ``--dry-run``: per concept its input, format and constraint rows."""

    concepts: tuple[tuple[str, str, Concept, int], ...]  # (source, format, concept, rows)
    num_constraint_rows: int
    rank: int  # numerical rank of the stacked target-prompt features
    estimated_memory_bytes: int


def summarize_plan(plan: MergePlan, *, device: str | torch.device = "cpu",
                   text_dtype: torch.dtype = torch.float32, batch_size: int = 64) -> PlanSummary:
    """Encode the target prompts (not the captions) to count constraint rows and their rank."""
    encoder = TextFeatures(plan.base, plan.tokens, device=device, dtype=text_dtype)
    features = [torch.cat(encoder.features(list(c.prompts), batch_size=batch_size)).double()
                for c in plan.concepts]
    stacked = torch.cat(features)
    singular_values = torch.linalg.svdvals(stacked)
    top = float(singular_values[0]) if singular_values.numel() else 0.0
    rank = int((singular_values > dependence_rtol(text_dtype) * top).sum()) if top > 0 else 0
    rows = tuple((plan.sources[owner], plan.formats[owner], concept, C.shape[0])
                 for concept, owner, C in zip(plan.concepts, plan.owners, features))
    return PlanSummary(rows, stacked.shape[0], rank, plan.estimated_memory_bytes(stacked.shape[0], text_dtype))


def dependence_rtol(text_dtype: torch.dtype) -> float:
    """Tolerance below which constraint rows count as dependent: float32's sqrt(eps), or finer.

    The targets ``V_i = W_i C_i^T`` are computed from the very feature rows ``C_i`` that the
    constraints use, so a float16 / bfloat16 text encoder's rounding makes no row inconsistent;
    it only moves the rows a little. Basing the tolerance on that rounding (0.031 float16, 0.088
    bfloat16) dropped rows that conflict with nothing (rank 17/18, residuals 1e-2 on the tiny
    model). float32's tolerance still meets near-duplicate rows with conflicting targets in
    least squares, exactly as a float32 merge does; the solve itself is always float64.
    """
    return default_rtol(torch.promote_types(text_dtype, torch.float32))


def plan_merge(deltas: Sequence[PathLike | ConceptDelta], reg_captions: Sequence[str] | None = None, *,
               base: BaseModel | PathLike, class_words: Sequence[str | None] | None = None,
               styles: Sequence[bool] | None = None, target_templates: Sequence[str] | None = None,
               style_templates: Sequence[str] | None = None, check_base: bool = True) -> MergePlan:
    """Load and validate the inputs, name their tokens, attach class words and target prompts.

    A concept is a style when its file records it as one or ``styles`` flags its input (the
    flag adds, it never clears a recorded style). Its target prompts are the ones its file
    records (our native files and cd-train outputs do), unless a class word is given for it,
    the flag makes it a style, or templates of its kind are given: ``target_templates`` for
    object concepts, ``style_templates`` for style concepts; then they are built from those.
    The same input given twice (the same file or folder by any path, or the same delta object)
    is refused.
    """
    if not deltas:
        raise MergeError("Nothing to merge: give at least one delta.")
    base = as_base(base)
    sources = tuple(d if isinstance(d, str) else str(d) if not isinstance(d, ConceptDelta)
                    else d.metadata.get("source", f"input {i + 1}") for i, d in enumerate(deltas))
    paths = [None if isinstance(d, ConceptDelta) else resolve_delta(d) for d in deltas]
    _refuse_repeated_files(paths, sources)
    loaded = [load(d, base=base, check_base=check_base) for d in deltas]
    _refuse_repeated_content(loaded, sources)
    read_as = tuple("object" if path is None else formats.detect_format(path).NAME for path in paths)
    if class_words is not None and len(class_words) not in (0, len(loaded)):
        raise MergeError(f"Got {len(class_words)} class words for {len(loaded)} inputs; give one --class "
                         f"per input, in order (comma-separated for an input with several tokens).")
    if styles is not None and len(styles) != len(loaded):
        raise MergeError(f"Got {len(styles)} style flags for {len(loaded)} inputs.")
    tokens, _, renames = merge_tokens(loaded)
    concepts: list[Concept] = []
    owners: list[int] = []
    for index, delta in enumerate(loaded):
        if not delta.tokens:
            warnings.warn(f"{sources[index]} has no modifier token: its target prompts hold only the class "
                          f"word, so the merge pins the base's outputs on ordinary prompts of that class.",
                          stacklevel=2)
        renamed = {r.old: r.new for r in renames if r.operand == index}
        own_tokens = list(delta.tokens) or [""]
        given_word = class_words[index] if class_words else None
        words = _class_words_for(delta, own_tokens, given_word, sources[index])
        for token, word in zip(own_tokens, words):
            known = delta.concept_for(token)
            recorded_style = bool(known and known.style)
            style = recorded_style or bool(styles and styles[index])
            templates = style_templates if style else target_templates
            new_token = renamed.get(token, token)
            recorded = known.renamed(token, new_token).prompts if known and known.prompts else ()
            if recorded and not (given_word or templates or style != recorded_style):
                prompts = recorded
            else:
                prompts = tuple(target_prompts(new_token, word, style=style, templates=templates))
            concepts.append(Concept(new_token, word, tuple(prompts), style))
            owners.append(index)
    captions = tuple(reg_captions) if reg_captions is not None else tuple(default_reg_captions())
    if not captions:
        raise MergeError("The regularisation caption set is empty.")
    return MergePlan(base, tuple(loaded), sources, read_as, tuple(concepts), tuple(owners), tokens,
                     renames, captions)


def _refuse_repeated_files(paths: Sequence[Path | None], sources: Sequence[str]) -> None:
    """The same file or folder given twice, by any path (a link, a hub cache entry), is refused.

    It would be the same concept twice under two token names with one embedding.
    """
    seen: dict[tuple[int, int], int] = {}
    for index, path in enumerate(paths):
        if path is None:
            continue
        try:
            status = path.stat()
        except OSError:  # the loader says what is wrong with it
            continue
        identity = (status.st_dev, status.st_ino)
        if identity in seen:
            what = "folder" if path.is_dir() else "file"
            raise MergeError(_repeated_message(index, seen[identity], sources, f"the same {what}"))
        seen[identity] = index


def _refuse_repeated_content(loaded: Sequence[ConceptDelta], sources: Sequence[str]) -> None:
    """Two inputs with the same content (same tokens, embeddings and weights) are refused, however
    they were given: the same object, a copied file, a diffusers folder and its own weights file.

    The weights are compared only when every token embedding already matches, which two
    different concepts practically never do, so the check costs nothing for distinct inputs.
    """
    for index in range(len(loaded)):
        for earlier in range(index):
            if _same_delta(loaded[earlier], loaded[index]):
                raise MergeError(_repeated_message(index, earlier, sources, "the same concept"))


def _same_delta(a: ConceptDelta, b: ConceptDelta) -> bool:
    """True when ``a`` is ``b``, or both have the same tokens with equal embeddings and equal layers."""
    if a is b:
        return True
    if not a.tokens or a.tokens.keys() != b.tokens.keys() or a.layers.keys() != b.layers.keys():
        return False
    if not all(len(a.tokens[name]) == len(b.tokens[name])
               and all(torch.equal(x, y) for x, y in zip(a.tokens[name], b.tokens[name])) for name in a.tokens):
        return False
    return all(torch.equal(_layer_rows(a, name), _layer_rows(b, name)) for name in a.layers)


def _repeated_message(index: int, earlier: int, sources: Sequence[str], what: str) -> str:
    """``Input 3 (b.safetensors) is the same file as input 1 (a.safetensors): ...``."""
    def name(i: int) -> str:
        return f"input {i + 1}" if sources[i] == f"input {i + 1}" else f"input {i + 1} ({sources[i]})"

    return (f"I{name(index)[1:]} is {what} as {name(earlier)}: a concept can be merged only once; "
            f"leave out the repeat.")


def _delta_bytes(delta: ConceptDelta) -> int:
    """Memory held by a loaded delta's differences (none for layers read from their file on use)."""
    if isinstance(delta.layers, LazyLayers):
        return 0
    total = 0
    for layer in delta.layers.values():
        for part in (layer.key, layer.value):
            tensors = (part.up, part.down) if isinstance(part, LowRank) else (part,)
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def _class_words_for(delta: ConceptDelta, tokens: list[str], given: str | None, source: str) -> list[str]:
    """Class word per token: from ``given`` (comma-separated), else from the delta's metadata."""
    if given:
        words = [w.strip() for w in given.split(",")]
        if len(words) == 1:
            words = words * len(tokens)
        if len(words) != len(tokens):
            raise MergeError(f"{source} has {len(tokens)} tokens ({', '.join(tokens)}) but "
                             f"{len(words)} class words were given.")
        return words
    words = []
    for token in tokens:
        known = delta.concept_for(token)
        if known is None or not known.class_word:
            raise MergeError(f"No class word for {token or 'the concept'} of {source}: its file does not "
                             f"record one. Pass --class WORD for every input, in order "
                             f"(e.g. --class cat --class dog).")
        words.append(known.class_word)
    return words


def check_options(method: str, *, weights: Sequence[float] | None = None, mu: float = 1.0,
                  ridge: float = 0.0, relative_ridge: float = 0.0, batch_size: int = 64) -> None:
    """Refuse bad merge options before any file is read or text encoded."""
    spec = get_method(method)
    for name, value in (("ridge", ridge), ("relative ridge", relative_ridge), ("mu", mu)):
        if not (math.isfinite(value) and value >= 0):
            raise MergeError(f"The {name} must be a finite number >= 0, got {value}.")
    if weights is not None:
        if not spec.concept_weights:
            raise MergeError(f"Concept weights only apply to the {weighted_method_names()} merge, not to {method!r}.")
        if not weights or not all(math.isfinite(w) and w > 0 for w in weights):
            raise MergeError(f"Soft-merge weights must be finite numbers > 0, got {list(weights)}.")
    if spec.concept_weights and mu == 0 and ridge == 0 and relative_ridge == 0:
        raise MergeError("mu = 0 with no ridge leaves the soft merge without a unique solution; "
                         "give mu > 0, or a small ridge.")
    if batch_size < 1:
        raise MergeError(f"The batch size must be at least 1, got {batch_size}.")


def merge(deltas: Sequence[PathLike | ConceptDelta], reg_captions: Sequence[str] | None = None, *,
          base: BaseModel | PathLike, method: str = "constrained",
          class_words: Sequence[str | None] | None = None, styles: Sequence[bool] | None = None,
          target_templates: Sequence[str] | None = None, style_templates: Sequence[str] | None = None,
          weights: Sequence[float] | None = None, mu: float = 1.0, ridge: float = 0.0,
          relative_ridge: float = 0.0, device: str | torch.device = "cpu",
          text_dtype: torch.dtype = torch.float32, batch_size: int = 64,
          cache_dir: PathLike | None = None, held_out: Sequence[str] | None = None,
          check_base: bool = True, progress: bool = False,
          return_report: bool = False) -> ConceptDelta | tuple[ConceptDelta, MergeReport]:
    """Merge concept deltas into one delta on ``base``.

    method: ``constrained`` (solve_hard: each concept's outputs kept exactly), ``soft``
    (solve_soft with ``weights`` per concept and ``mu``), ``sum`` or ``average`` (naive).
    reg_captions default to the ~1200 captions shipped with the package. ``held_out`` captions
    (default: the shipped held-out set) only feed the report's drift figures. ``ridge`` adds
    ``ridge * ||W - W0||^2``; ``relative_ridge`` adds the same in units of G's mean eigenvalue
    (``trace(G) / d``), which needs no knowledge of the feature scale: 1e-3 typically cuts the
    weight change several-fold while the drift on captions barely moves.

    The work streams layer by layer: one factorisation serves every layer, and besides the
    inputs only the result and one layer's rows are held (the text encoder is released first).
    """
    check_options(method, weights=weights, mu=mu, ridge=ridge, relative_ridge=relative_ridge,
                  batch_size=batch_size)
    plan = plan_merge(deltas, reg_captions, base=base, class_words=class_words, styles=styles,
                      target_templates=target_templates, style_templates=style_templates,
                      check_base=check_base)
    return execute(plan, method=method, weights=weights, mu=mu, ridge=ridge,
                   relative_ridge=relative_ridge, device=device,
                   text_dtype=text_dtype, batch_size=batch_size, cache_dir=cache_dir,
                   held_out=held_out, progress=progress, return_report=return_report)


@dataclass
class _TextPhase:
    """Everything the text encoder contributes, computed before any K/V row is read."""

    targets: list[Tensor]  # per concept, its target-prompt feature rows, float64
    gram: Tensor | None  # C_reg^T C_reg (constrained / soft only)
    num_rows: int
    gram_from_cache: bool
    held_gram: Tensor | None  # C_held^T C_held, for the drift report


def _encode_text(plan: MergePlan, method: str, *, device: torch.device, text_dtype: torch.dtype,
                 batch_size: int, cache_dir: PathLike | None, held_out: Sequence[str] | None,
                 report: bool, progress: bool) -> _TextPhase:
    """Target features, the caption Gram matrix and (for the report) the held-out one.

    All three are cached on disk; the text encoder is loaded only on a miss, once for all three,
    and dropped on return, before the K/V work starts. A repeated merge loads no encoder at all.
    """
    encoder = LazyTextFeatures(plan.base, plan.tokens, device=device, dtype=text_dtype)
    prompts = [prompt for concept in plan.concepts for prompt in concept.prompts]
    rows = cached_features(plan.base, prompts, batch_size=batch_size, cache_dir=cache_dir, encoder=encoder)[0]
    targets, start = [], 0
    for concept in plan.concepts:
        targets.append(torch.cat(rows[start:start + len(concept.prompts)]).double())
        start += len(concept.prompts)
    gram, num_rows, from_cache = None, 0, False
    if get_method(method).solves:
        gram, num_rows, from_cache = cached_gram(plan.base, list(plan.reg_captions), batch_size=batch_size,
                                                 cache_dir=cache_dir, progress=progress, encoder=encoder)
    held_gram = None
    if report:
        captions = list(held_out) if held_out is not None else heldout_captions()
        held_gram = cached_gram(plan.base, captions, batch_size=batch_size, cache_dir=cache_dir,
                                progress=progress, label="held-out features", encoder=encoder)[0]
    return _TextPhase(targets, gram, num_rows, from_cache, held_gram)


class _ReportSums:
    """Squared norms for the report, accumulated layer by layer (no output matrix is kept)."""

    def __init__(self, num_concepts: int) -> None:
        self.residual = [0.0] * num_concepts
        self.full_residual = [0.0] * num_concepts
        self.sum_residual = [0.0] * num_concepts
        self.target = [0.0] * num_concepts
        self.drift = self.sum_drift = self.base = 0.0

    def add(self, features: list[Tensor], W0: Tensor, own: list[Tensor], merged: Tensor, naive_sum: Tensor,
            held_gram: Tensor) -> None:
        """One layer: base rows, each concept's own difference on its features (``own[i]`` =
        D_owner C_i^T), the merged difference as returned (float32, held in float64) and the
        summed one. Residuals are of what is written, not of the float64 solve."""
        full = (W0.float() + merged.float()).double() - W0  # what FineTunedWeights.from_delta writes
        for i, C in enumerate(features):
            self.residual[i] += _squared(merged @ C.T - own[i])
            self.full_residual[i] += _squared(full @ C.T - own[i])
            self.sum_residual[i] += _squared(naive_sum @ C.T - own[i])
            self.target[i] += _squared(W0 @ C.T + own[i])
        self.drift += _quadratic(merged, held_gram)
        self.sum_drift += _quadratic(naive_sum, held_gram)
        self.base += _quadratic(W0, held_gram)


def execute(plan: MergePlan, *, method: str = "constrained", weights: Sequence[float] | None = None,
            mu: float = 1.0, ridge: float = 0.0, relative_ridge: float = 0.0,
            device: str | torch.device = "cpu",
            text_dtype: torch.dtype = torch.float32, batch_size: int = 64,
            cache_dir: PathLike | None = None, held_out: Sequence[str] | None = None,
            progress: bool = False, return_report: bool = False):
    """Run a planned merge (see :func:`merge`)."""
    check_options(method, weights=weights, mu=mu, ridge=ridge, relative_ridge=relative_ridge,
                  batch_size=batch_size)
    if weights is not None and len(weights) != len(plan.concepts):
        raise MergeError(f"Got {len(weights)} soft-merge weights for {len(plan.concepts)} concepts "
                         f"({', '.join(c.token for c in plan.concepts)}); give one per concept.")
    device = torch.device(device)
    # MPS has no float64: encode text there, but solve on the CPU
    solve_device = torch.device("cpu") if device.type == "mps" else device
    text = _encode_text(plan, method, device=device, text_dtype=text_dtype, batch_size=batch_size,
                        cache_dir=cache_dir, held_out=held_out, report=return_report, progress=progress)
    _release_memory(device)
    spec = get_method(method)
    if spec.concept_weights:
        weights = list(weights) if weights is not None else [DEFAULT_SOFT_WEIGHT] * len(plan.concepts)
    operator, total_ridge = None, ridge
    if spec.solves:
        total_ridge = ridge + relative_ridge * float(torch.diagonal(text.gram).mean())
        operator = spec.factor(text.gram.to(solve_device), [C.to(solve_device) for C in text.targets], weights, mu,
                               ridge=total_ridge, rtol=dependence_rtol(text_dtype), diagnostics=return_report)

    features = [C.to(solve_device) for C in text.targets]
    held_gram = text.held_gram.to(solve_device) if text.held_gram is not None else None
    sums = _ReportSums(len(plan.concepts))
    layers: dict[str, LayerDelta] = {}
    for name in tqdm(plan.base.layer_names(), desc="merging layers", unit="layer", disable=not progress):
        W0 = torch.cat(plan.base.kv(name)).to(solve_device, torch.float64)
        # one input's rows at a time: keep only their sum and each concept's D_owner C_i^T
        naive_sum, own = torch.zeros_like(W0), [torch.empty(0)] * len(features)
        for index, delta in enumerate(plan.deltas):
            rows = _layer_rows(delta, name).to(solve_device, torch.float64)
            naive_sum += rows
            for i, owner in enumerate(plan.owners):
                if owner == index:
                    own[i] = rows @ features[i].T
            del rows
        if operator is not None:
            targets = torch.cat([W0 @ C.T + own[i] for i, C in enumerate(features)], dim=1)
            merged = operator.apply(W0, targets) - W0
        else:
            merged = spec.combine(naive_sum, len(plan.deltas))
        merged = merged.float()  # the result's dtype: the report measures this, not the float64 solve
        if return_report:
            sums.add(features, W0, own, merged.double(), naive_sum, held_gram)
        keys = plan.base.kv_shapes()[name][0][0]
        merged = merged.cpu()
        layers[name] = LayerDelta(merged[:keys].contiguous(), merged[keys:].contiguous())

    result = ConceptDelta(layers, plan.tokens, base=plan.base.name,
                          base_fingerprint=plan.base.fingerprint, architecture=plan.base.architecture.name,
                          concepts=plan.concepts, token_renames=plan.token_renames)
    result.metadata["recipe"] = _recipe(plan, method, weights, mu, total_ridge)
    if not return_report:
        return result
    info = operator.info() if operator is not None else None
    concepts = tuple(ConceptReport(c.token, c.class_word or "", c.prompts, _ratio(r, t), _ratio(sr, t), _ratio(fr, t))
                     for c, r, sr, fr, t in zip(plan.concepts, sums.residual, sums.sum_residual, sums.full_residual,
                                                sums.target))
    report = MergeReport(method, concepts, _ratio(sums.drift, sums.base), _ratio(sums.sum_drift, sums.base),
                         plan.token_renames, len(plan.reg_captions), text.num_rows, text.gram_from_cache,
                         info, info.notes if info is not None else ())
    return result, report


def _layer_rows(delta: ConceptDelta, name: str) -> Tensor:
    """One layer's K then V difference rows of ``delta``, dense."""
    layer = delta.layers[name]
    return torch.cat([dense(layer.key), dense(layer.value)])


def _release_memory(device: torch.device) -> None:
    """Give the text encoder's memory back before the K/V work."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _squared(x: Tensor) -> float:
    return float(x.square().sum())


def _quadratic(X: Tensor, gram: Tensor) -> float:
    """``||X C^T||^2 = sum((X G) * X)`` for ``G = C^T C``, without the rows of C."""
    return float(((X @ gram) * X).sum().clamp_min(0))


def _ratio(squared_numerator: float, squared_denominator: float) -> float:
    """sqrt(a / b): a relative norm from squared norms; the absolute one when b is zero."""
    if squared_denominator > 0:
        return math.sqrt(squared_numerator / squared_denominator)
    return math.sqrt(squared_numerator)


def _recipe(plan: MergePlan, method: str, weights, mu: float, ridge: float) -> dict:
    """Provenance: enough to tell how the merged file was made, and from what."""
    captions = "\n".join(plan.reg_captions).encode()
    return {
        "tool": f"mergekit-cd {__version__}",
        "method": method,
        "inputs": [{"source": s, "content_sha256": _delta_hash(d), "tokens": list(d.tokens)}
                   for s, d in zip(plan.sources, plan.deltas)],
        "concepts": [{"token": c.token, "class_word": c.class_word, "prompts": list(c.prompts)}
                     for c in plan.concepts],
        "token_renames": [{"input": r.operand, "old": r.old, "new": r.new} for r in plan.token_renames],
        "reg_captions": {"count": len(plan.reg_captions), "sha256": hashlib.sha256(captions).hexdigest()},
        "feature_rule": FEATURE_RULE,
        "ridge": ridge,
        **({"mu": mu, "weights": list(weights)} if get_method(method).concept_weights else {}),
    }


def _delta_hash(delta: ConceptDelta) -> str:
    """sha256 of a delta's differences and tokens, independent of the file it came in."""
    digest = hashlib.sha256()
    for name in sorted(delta.layers):
        for part in (delta.layers[name].key, delta.layers[name].value):
            digest.update(name.encode())
            digest.update(dense(part).detach().float().contiguous().numpy().tobytes())
    for token in sorted(delta.tokens):
        digest.update(token.encode())
        for embedding in delta.tokens[token]:
            digest.update(embedding.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()
