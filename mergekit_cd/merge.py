"""``merge(deltas, reg_captions, base=...)`` and ``merge_to_file``: plan -> features -> solver -> delta.

The merge keeps every concept's K/V outputs on its own target prompts and changes the base as
little as possible on the regularisation captions (the paper's constrained least squares, or
its soft/weighted generalisation); ``sum`` and ``average`` are the naive baselines. Planning lives
in :mod:`.merge_plan`, the options in :mod:`.merge_options`, the report in :mod:`.merge_report`;
this module runs a plan.
"""

from __future__ import annotations

import gc
import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import formats
from .base import BaseModel
from .captions import heldout_captions
from .delta import LORA_RTOL, ConceptDelta, LayerDelta, LowRank, combine_modules, dense, factorize
from .errors import MergeError
from .feature_cache import cache_folder, cached_base_outputs, cached_sets
from .features import LazyTextFeatures, PromptRows, TextSet
from .fileio import STAT_MEMO, Observed, StatMemo, libc_function
from .limits import MAX_CONSTRAINT_ROWS, MAX_SOLVED_ROWS, check_limit
from .loading import EmbeddingFile, PathLike, as_base, save
from .merge_options import MergeOptions
from .merge_plan import MergePlan, dependence_rtol, plan_merge, summarize_plan
from .merge_report import ConceptReport, MergeReport, ReportSums, StatisticsSize
from .merge_statistics import (StatisticsRecorder, StoredConcepts, captions_sha256, drop_concepts,
                               fresh_regulariser, stored_concepts)
from .solvers import chunk_rows, row_slices
from .version import __version__

__all__ = ["FileMerge", "MergeOptions", "MergePlan", "MergeReport", "ConceptReport", "execute", "merge",
           "merge_to_file", "plan_merge", "prepare_merge_to_file", "summarize_plan"]


def merge(deltas: Sequence[PathLike | ConceptDelta], reg_captions: Sequence[str] | None = None, *,
          base: BaseModel | PathLike, options: MergeOptions | None = None,
          class_words: Sequence[str | None] | None = None, styles: Sequence[bool] | None = None,
          target_templates: Sequence[str] | None = None, style_templates: Sequence[str] | None = None,
          check_base: bool = True, embeddings: Sequence[Sequence[EmbeddingFile]] | None = None,
          progress: bool = False, return_report: bool = False, drop: Sequence[str] = (),
          **option_fields: Any) -> ConceptDelta | tuple[ConceptDelta, MergeReport]:
    """Merge concept deltas into one delta on ``base``.

    ``options`` (or its fields as keywords: ``method="soft", weights=[100, 10]``, ...) say how,
    see :class:`MergeOptions`: ``constrained`` (each concept's outputs kept exactly), ``soft``
    (kept in proportion to ``weights``, against ``mu``), ``hybrid`` (with ``rows="pipeline"``:
    exact on the prompts' tokens, in proportion to ``weights`` on their start and padding rows),
    ``sum`` or ``average`` (naive).
    reg_captions default to the ~1200 captions shipped with the package. ``class_words``,
    ``styles`` and the templates decide each concept's target prompts (see :func:`plan_merge`);
    ``embeddings`` pairs token embedding files with inputs (per input, a list of files, or of
    ``(file, token)`` pairs to rename a file's token).

    A solved merge (constrained, soft, hybrid) returns its statistics with the delta (``.statistics``, stored by
    :func:`save` in a native file); a merged delta given as an input then adds its concepts, not
    itself, solved from those statistics, and ``drop`` names concepts (tokens) of such inputs to
    leave out: the result equals the merge of the concepts' own files from scratch.

    The work streams layer by layer: one factorisation serves every layer, and besides the
    inputs only the result and one layer's rows are held (the text encoder is released first).
    """
    options = _options(options, option_fields)
    base = _remembering(as_base(base), options)
    plan = plan_merge(deltas, reg_captions, base=base, class_words=class_words, styles=styles,
                      target_templates=target_templates, style_templates=style_templates,
                      check_base=check_base, other_layers=options.other_layers_on_load, embeddings=embeddings)
    return execute(drop_concepts(plan, drop, options), options, progress=progress, return_report=return_report)


@dataclass(frozen=True)
class FileMerge:
    """A merge planned to a checked output: :meth:`run` solves and writes it (what ``cd-merge`` does
    after printing the plan's renames; ``--dry-run`` stops before :meth:`run`)."""

    plan: MergePlan
    options: MergeOptions
    output: Path
    format: str
    force: bool
    lora_rtol: float = LORA_RTOL

    def run(self, *, progress: bool = False) -> MergeReport:
        """Solve, write the output atomically, and report on the file as written (a LoRA output:
        with its factoring, exact for the constrained and soft merges; a native one: with the size
        of the merge statistics it stores)."""
        layout = formats.get_format(self.format)
        delta, report = execute(self.plan, self.options, progress=progress, return_report=True,
                                statistics=layout.STORES_STATISTICS, full_weights=layout.WRITES_FULL_WEIGHTS)
        if delta.statistics is not None:
            size = StatisticsSize(len(delta.statistics.concepts), delta.statistics.num_bytes(),
                                  4 * delta.num_parameters())  # the merged difference is float32
            report = replace(report, statistics=size)
        if layout.FACTORS_ONLY:
            delta, factors = factorize(delta, self.lora_rtol)
            report = replace(report, factors=factors)
        save(delta, self.output, format=self.format, base=self.plan.base, force=self.force)
        return report


def prepare_merge_to_file(deltas: Sequence[PathLike | ConceptDelta], output: PathLike,
                          reg_captions: Sequence[str] | None = None, *, base: BaseModel | PathLike,
                          format: str | None = None, force: bool = False, options: MergeOptions | None = None,
                          class_words: Sequence[str | None] | None = None, styles: Sequence[bool] | None = None,
                          target_templates: Sequence[str] | None = None,
                          style_templates: Sequence[str] | None = None, check_base: bool = True,
                          embeddings: Sequence[Sequence[EmbeddingFile]] | None = None,
                          dry_run: bool = False, lora_rtol: float = LORA_RTOL, drop: Sequence[str] = (),
                          **option_fields: Any) -> FileMerge:
    """Check the options, then the output (format, destination, never an input; with ``dry_run``
    only whether the format can hold the base's architecture), then plan (``drop``: concepts of
    merged inputs left out, see :func:`merge`): every refusal comes before any text is encoded or
    anything solved."""
    options = _options(options, option_fields)
    options.check_inputs(len(deltas))
    output = Path(output)
    output_format = formats.output_format(output, format)
    options.check_output_format(output_format, output)
    base = _remembering(as_base(base), options)
    if dry_run:
        formats.check_can_hold(output_format, base.architecture.name, output)
    else:
        formats.check_output(output, output_format, architecture=base.architecture.name, force=force,
                             inputs=[base.path, *(d for d in deltas if not isinstance(d, ConceptDelta))])
    plan = plan_merge(deltas, reg_captions, base=base, class_words=class_words, styles=styles,
                      target_templates=target_templates, style_templates=style_templates, check_base=check_base,
                      other_layers=options.other_layers_on_load, embeddings=embeddings)
    plan = drop_concepts(plan, drop, options)
    stored_concepts(plan, options)  # refuses statistics of another regulariser or other options, now
    if options.spec.concept_weights:
        options.concept_weights(plan.concept_labels)
    return FileMerge(plan, options, output, output_format, force, lora_rtol)


def merge_to_file(deltas: Sequence[PathLike | ConceptDelta], output: PathLike,
                  reg_captions: Sequence[str] | None = None, *, progress: bool = False,
                  **arguments: Any) -> MergeReport:
    """What ``cd-merge`` does: merge into ``output`` (format told by its name, or ``format=``),
    with every check made before the work; arguments as :func:`prepare_merge_to_file`."""
    return prepare_merge_to_file(deltas, output, reg_captions, **arguments).run(progress=progress)


def _options(options: MergeOptions | None, fields: dict[str, Any]) -> MergeOptions:
    """``options``, or one built from its fields given as keywords; never both."""
    if options is not None and fields:
        raise MergeError(f"Give either options= or option keywords ({', '.join(fields)}), not both.")
    return options if options is not None else MergeOptions(**fields)


@dataclass
class _TextPhase:
    """Everything the text encoder contributes, computed before any K/V row is read."""

    targets: list[Tensor]  # per concept, its target-prompt feature rows (its constraints), float64
    contexts: list[Tensor]  # per concept, its context rows (context_rows methods; else none), float64
    gram: Tensor | None  # C_reg^T C_reg (constrained / soft only)
    num_rows: int
    gram_from_cache: bool
    held_gram: Tensor | None  # C_held^T C_held, for the drift report
    base_outputs: float  # ||W0 C_held^T||^2 over the base's layers, the drift's denominator (0 without a report)
    encoder_loaded: bool  # whether a text encoder was loaded (a cache miss), to be released
    notes: tuple[str, ...] = ()  # what was done to the targets, for the report


def _encode_text(plan: MergePlan, options: MergeOptions, *, report: bool, progress: bool,
                 stored: StoredConcepts) -> _TextPhase:
    """Target features, the caption Gram matrix and (for the report) the held-out one with the
    base's outputs on it, all under the options' row rule; for a ``context_rows`` method the target
    prompts' token rows are the targets and their other rows the contexts.

    All are cached on disk; the text encoders are loaded only on a miss, one at a time
    (:meth:`TextFeatures.encode`), for the concepts' prompts, whose rows are bounded before any
    caption is encoded, then for the captions, starting with the encoder still held (SDXL's bigG
    loads once, CLIP-L twice); they are dropped on return, before the K/V work starts. A repeated
    merge loads no encoder at all.
    Each concept's prompts are encoded on their own (batches of other prompts change the float32
    rounding), so its features do not depend on the merge it is in: what makes a merge grown from
    ``stored`` statistics (whose features and Gram matrix are taken as they are) equal one from scratch.
    """
    encoder = LazyTextFeatures(plan.base, plan.tokens, device=options.device, dtype=options.text_dtype)
    split = options.spec.context_rows
    # the target prompts first, their rows bounded before any caption is encoded; then the captions:
    # each call runs all its sets through one text encoder at a time
    fresh = [index for index, record in enumerate(stored.records) if record is None]
    solves = stored.regulariser is None and options.spec.solves
    held_out = (options.held_out if options.held_out is not None else heldout_captions()) if report else ()
    encoding = dict(rule=options.row_rule, batch_size=options.batch_size, cache_dir=options.cache_dir, encoder=encoder,
                progress=progress)
    encoded: list[list[PromptRows] | None] = [None] * len(stored.records)
    prompts = cached_sets(plan.base, [TextSet(tuple(plan.concepts[index].prompts)) for index in fresh], **encoding)
    for index, (rows, _) in zip(fresh, prompts):
        encoded[index] = rows
    _check_rows(stored, encoded, split, plan.base.context_dim)
    results = cached_sets(plan.base, [TextSet(tuple(plan.reg_captions), gram=True, label="text features")] * solves
                          + [TextSet(tuple(held_out), gram=True, label="held-out features")] * report, **encoding)
    targets, contexts, notes = [], [], []
    for concept, record, own in zip(plan.concepts, stored.records, encoded):
        if record is not None:  # as the merge that stored it reduced them
            targets.append(record.features)
            if split:
                contexts.append(record.context_features)
            continue
        C = torch.cat([_constraint_rows(prompt, split) for prompt in own]).double()
        targets.append(spanning_rows(C))
        if targets[-1].shape[0] < C.shape[0]:
            notes.append(f"{concept.token}: its {C.shape[0]:,} target rows span at most {C.shape[1]:,} feature "
                         f"directions; the solve constrains {targets[-1].shape[0]:,} rows with the same Gram matrix "
                         f"instead (the same merge, each layer's work bounded by the width; the solve's rank "
                         f"and dependence counts count those rows)")
        if split:  # the solve sees P_i only through P_i^T P_i (and U_i P_i = W_i P_i^T P_i): reduced alike
            contexts.append(spanning_rows(torch.cat([prompt.context_rows for prompt in own]).double()))
    gram, num_rows, from_cache = None, 0, False
    if stored.regulariser is not None:
        gram, num_rows = stored.regulariser.gram, stored.regulariser.num_rows
        stored_count = sum(record is not None for record in stored.records)
        notes.append(f"{stored_count} concept{'s' if stored_count != 1 else ''}, their targets and the "
                     f"regularisation Gram matrix from the merge statistics of {', '.join(stored.sources)}")
        notes.append("the naive sum's figures add each input as it is: a merged input counts as one delta there, "
                     "not as its concepts' own")
    elif solves:
        (gram, num_rows), from_cache = results[0]
    held_gram, base_outputs = None, 0.0
    if report:
        held_gram = results[-1][0][0]
        base_outputs = cached_base_outputs(plan.base, list(held_out), held_gram.to(options.solve_device),
                                           rule=options.row_rule, cache_dir=options.cache_dir, encoder=encoder)
    return _TextPhase(targets, contexts, gram, num_rows, from_cache, held_gram, base_outputs, encoder.loaded,
                      tuple(notes))


def _check_rows(stored: StoredConcepts, encoded: Sequence[list[PromptRows] | None], split: bool, width: int) -> None:
    """Before anything is solved: the constraint rows, and those with the context rows, that the solve
    will take, each concept's reduced to at most ``width`` as :func:`spanning_rows` reduces them, are
    within the bounds."""
    constraint = context = 0
    for record, own in zip(stored.records, encoded):
        if record is not None:  # stored as the solve took them
            constraint += record.features.shape[0]
            context += 0 if record.context_features is None else record.context_features.shape[0]
        else:
            constraint += solved_rows(sum(_constraint_rows(prompt, split).shape[0] for prompt in own), width)
            if split:
                context += solved_rows(sum(prompt.context_rows.shape[0] for prompt in own), width)
    reduced = f"(each concept's at most the feature width, {width:,})"
    check_limit(constraint, MAX_CONSTRAINT_ROWS, f"its target prompts give {{count}} constraint rows to solve "
                                                 f"{reduced}", "The merge", needs="any real merge")
    check_limit(constraint + context, MAX_SOLVED_ROWS, f"its target prompts give {{count}} constraint and context "
                                                       f"rows to solve {reduced}", "The merge", needs="any real merge")


def solved_rows(rows: int, width: int) -> int:
    """How many rows :func:`spanning_rows` leaves of ``rows`` rows ``width`` wide: what the solve takes."""
    return min(rows, width)


def _constraint_rows(prompt: PromptRows, split: bool) -> Tensor:
    """The rows of a target prompt that the solve keeps exactly (a ``context_rows`` method: its
    token rows; else every row the rule keeps)."""
    return prompt.token_rows if split else prompt.rows


def spanning_rows(C: Tensor) -> Tensor:
    """Rows with the Gram matrix of ``C`` (``R^T R = C^T C``: the same row space, and the same
    ``||X C^T||`` for every X), no more of them than C's width. A concept's exact constraints,
    its soft objective and its residuals see C only through that Gram matrix and the solvers
    are spectral, so the merge is unchanged, while a concept of 2,000 prompts no longer costs
    every layer 30 s."""
    if solved_rows(*C.shape) == C.shape[0]:
        return C
    _, sigma, right = torch.linalg.svd(C, full_matrices=False)
    return sigma[:, None] * right


def execute(plan: MergePlan, options: MergeOptions | None = None, *, progress: bool = False,
            return_report: bool = False, statistics: bool = True,
            full_weights: bool = True) -> ConceptDelta | tuple[ConceptDelta, MergeReport]:
    """Run a planned merge (see :func:`merge`); ``statistics``: return those of a solved merge
    with the delta (an output that does not store them need not hold them); ``full_weights``: the
    report measures the residuals of the full weights as written too (an output of differences
    need not: it writes the difference, whose residuals are measured anyway)."""
    stored = stored_concepts(plan, options or MergeOptions())
    options = stored.options  # the recorded soft weights of stored concepts filled in
    spec = options.spec
    weights = options.concept_weights(plan.concept_labels) if spec.concept_weights else None
    other_modules = _carried_modules(plan, options)
    solve_device = options.solve_device
    text = _encode_text(plan, options, report=return_report, progress=progress, stored=stored)
    if text.encoder_loaded:
        _release_memory(options.device)
    operator, total_ridge = None, options.ridge
    if spec.solves:
        total_ridge = options.ridge + options.relative_ridge * float(torch.diagonal(text.gram).mean())
        operator = spec.factor(text.gram.to(solve_device), [C.to(solve_device) for C in text.targets],
                               [P.to(solve_device) for P in text.contexts], weights, options.soft_mu,
                               ridge=total_ridge, rtol=dependence_rtol(options.text_dtype), diagnostics=return_report)

    features = [C.to(solve_device) for C in text.targets]
    contexts = [P.to(solve_device) for P in text.contexts]
    # every concept's rows stacked once: a layer's W0 C^T is one product, not one per concept
    stacked_features, stacked_contexts = torch.cat(features), torch.cat(contexts) if contexts else None
    held_gram = text.held_gram.to(solve_device) if text.held_gram is not None else None
    sums = (ReportSums(features, held_gram, operator.Z if operator is not None else None, text.base_outputs,
                       full_weights=full_weights, sum_drift=options.sum_drift) if return_report else None)
    layers: dict[str, LayerDelta] = {}
    memo = StatMemo(cache_folder(options.cache_dir) / STAT_MEMO)
    remembered = _remembered_inputs(plan, memo)
    layer_digests = [entry.digests if entry is not None and entry.digests else {} for entry in remembered]
    hashed_dense = [True] * len(plan.deltas)  # whether every layer hashed was stored as a full matrix
    recorder = StatisticsRecorder(stored.records) if statistics and spec.solves else None
    for name in tqdm(plan.base.layer_names(), desc="merging layers", unit="layer", disable=not progress):
        W0 = torch.cat(plan.base.kv(name)).to(solve_device, torch.float64)
        # one input's rows at a time, a cache-sized chunk of them at a time: keep only their sum and
        # each concept's D_owner C_i^T (and D_owner P_i^T, for the U_i of a context_rows method)
        naive_sum, own = torch.zeros_like(W0), [torch.empty(0)] * len(features)
        own_context = [torch.empty(0)] * len(contexts)
        keys = plan.base.kv_shapes()[name][0][0]
        block = W0.new_empty((chunk_rows(W0.shape[1]), W0.shape[1]))  # an input's rows in float64, in turn
        for index, delta in enumerate(plan.deltas):
            layer = delta.layers[name]
            parts = (dense(layer.key), dense(layer.value))
            if name not in layer_digests[index]:  # for the recipe: no second read
                layer_digests[index][name] = _layer_digest(name, parts)
                hashed_dense[index] &= isinstance(layer.key, Tensor) and isinstance(layer.value, Tensor)
            del layer
            owned = [i for i, owner in enumerate(plan.owners) if owner == index and stored.records[i] is None]
            for i in owned:
                own[i] = W0.new_empty((W0.shape[0], features[i].shape[0]))
                if contexts:
                    own_context[i] = W0.new_empty((W0.shape[0], contexts[i].shape[0]))
            for offset, part in ((0, parts[0]), (keys, parts[1])):
                for chunk in row_slices(part.shape[0], W0.shape[1]):
                    rows = block[:chunk.stop - chunk.start].copy_(part[chunk])  # converted as copied
                    layer_rows = slice(offset + chunk.start, offset + chunk.stop)
                    naive_sum[layer_rows] += rows
                    for i in owned:
                        torch.mm(rows, features[i].T, out=own[i][layer_rows])
                        if contexts:
                            torch.mm(rows, contexts[i].T, out=own_context[i][layer_rows])
            del parts
        for i, record in enumerate(stored.records):
            if record is not None:  # D_i C_i^T (and D_i P_i^T) as the merge that stored it computed it
                own[i] = torch.cat(record.changes[name]).to(solve_device)
                if contexts:
                    own_context[i] = torch.cat(record.context_changes[name]).to(solve_device)
        if recorder is not None:
            recorder.add(name, own, own_context, keys)
        misfit = None
        if operator is not None or sums is not None:
            own_columns = torch.cat(own, dim=1)
            targets = W0 @ stacked_features.mT + own_columns  # (W0 + D_i) C_i^T
        if operator is not None:
            # V, then (a context_rows method) each U_i = W_i P_i^T, in the order the operator was factored;
            # V - W0 C^T, the misfit the update is applied to, is each concept's own change: given to
            # the operator as it is, not recomputed from V
            misfit = torch.cat([own_columns, *own_context], dim=1)
            V = targets if not contexts else torch.cat(
                [targets, W0 @ stacked_contexts.mT + torch.cat(own_context, dim=1)], dim=1)
            # the result's dtype: the report measures this, not the float64 solve
            merged = operator.apply(W0, V, misfit=misfit, difference=True, dtype=torch.float32)
        else:
            merged = spec.combine(naive_sum, len(plan.deltas)).float()
        if sums is not None:
            sums.add(W0, targets, own_columns, merged, naive_sum, misfit)
        merged = merged.cpu()
        layers[name] = LayerDelta(merged[:keys].contiguous(), merged[keys:].contiguous())

    result = ConceptDelta(layers, plan.tokens, base=plan.base.name,
                          base_fingerprint=plan.base.fingerprint, architecture=plan.base.architecture.name,
                          concepts=plan.concepts, token_renames=plan.token_renames,
                          other_modules=other_modules)
    result.metadata["recipe"] = _recipe(plan, options, total_ridge, layer_digests)
    for entry, digests, whole in zip(remembered, layer_digests, hashed_dense):
        if entry is not None and entry.digests is None and whole:
            memo.put(entry.file, entry.what, {name: digest.hex() for name, digest in digests.items()}, entry.observed)
    memo.save()
    if recorder is not None:
        regulariser = stored.regulariser or fresh_regulariser(plan, text.gram, text.num_rows, options.row_rule.name)
        result.statistics = recorder.statistics(plan, options, text.targets, text.contexts, regulariser)
    if not return_report:
        return result
    info = operator.info() if operator is not None else None
    return result, sums.report(options.method, plan.concepts, plan.token_renames,
                               num_captions=len(plan.reg_captions), num_rows=text.num_rows,
                               gram_from_cache=text.gram_from_cache, info=info,
                               notes=text.notes + _other_layers_notes(plan, options))


def _remembering(base: BaseModel, options: MergeOptions) -> BaseModel:
    """``base``, its K/V fingerprint remembered in the merge's cache folder (as its text files'
    digests are): a repeated merge reads the base's K/V once."""
    base.remember_in(cache_folder(options.cache_dir))
    return base


def _carried_modules(plan: MergePlan, options: MergeOptions) -> dict[str, LowRank]:
    """The LoRA inputs' other UNet modules as the output carries them: their sum or average."""
    if not options.carries_other_layers:
        kept = next((source for source, delta in zip(plan.sources, plan.deltas) if delta.other_modules), None)
        if kept is not None:
            raise MergeError(f"{kept} was planned with its LoRA modules beyond the cross-attention K/V kept, but the "
                             f"merge's other_layers is {options.other_layers}; plan it with that rule.")
        return {}
    scale = options.other_layers_scale(len(plan.deltas))
    return combine_modules(plan.deltas, [scale] * len(plan.deltas))


def _other_layers_notes(plan: MergePlan, options: MergeOptions) -> tuple[str, ...]:
    """What became of the LoRA inputs' parts beyond the cross-attention K/V, for the report."""
    if not plan.other_layers:
        return ()
    count = len(plan.deltas)
    carried = {"sum": f"; the output holds the sum of those modules over the {count} inputs",
               "average": f"; the output holds their average over the {count} inputs (each weighted 1/{count})",
               }.get(options.other_layers, "")
    return (f"other layers {options.other_layers}: " + "; ".join(plan.other_layers) + carried,)


def _release_memory(device: torch.device) -> None:
    """Give the text encoder's memory back before the K/V work: on glibc also the free pages its
    activations left inside malloc's heaps (``malloc_trim``), which it keeps otherwise."""
    gc.collect()
    trim = libc_function("malloc_trim") if sys.platform.startswith("linux") else None
    if trim is not None:  # glibc
        trim(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _recipe(plan: MergePlan, options: MergeOptions, total_ridge: float, layer_digests: list[dict[str, bytes]]) -> dict:
    """Provenance: enough to tell how the merged file was made, and from what."""
    recorded = options.to_recipe(len(plan.concepts))
    return {
        "tool": f"mergekit-cd {__version__}",
        "method": options.method,
        "inputs": [{"source": s, "content_sha256": _delta_hash(d, digests), "tokens": list(d.tokens)}
                   for s, d, digests in zip(plan.sources, plan.deltas, layer_digests)],
        "concepts": [{"token": c.token, "class_word": c.class_word, "prompts": list(c.prompts)}
                     for c in plan.concepts],
        "token_renames": [{"input": r.operand, "old": r.old, "new": r.new} for r in plan.token_renames],
        "reg_captions": {"count": len(plan.reg_captions), "sha256": captions_sha256(plan.reg_captions)},
        "feature_rule": options.row_rule.name,
        "ridge": total_ridge,  # the ridge the solve used: options' ridge plus the relative one, made absolute
        "options": recorded,
        **{key: value for key, value in recorded.items() if key in ("mu", "weights")},
    }


@dataclass(frozen=True)
class _RememberedInput:
    """An input read from one file, as the stat memo knows it: the file (resolved), what its layers'
    digests are remembered as, its stat before the merge read it, and the digests when remembered."""

    file: str
    what: str
    observed: Observed
    digests: dict[str, bytes] | None


def _remembered_inputs(plan: MergePlan, memo: StatMemo) -> list[_RememberedInput | None]:
    """Per input read from one file (None for one given in memory or as a folder), its layers' digests
    for the recipe (:func:`_layer_digest`) as a merge remembered them in the cache folder by the
    file's stat (:class:`~.fileio.StatMemo`), under the format it was read in, the base's K/V
    fingerprint (full weights are made into differences against them) and this version: a repeated
    merge of unchanged files does not hash their differences again (7.1 GB for 100 SD1.5 concepts,
    4 s), while a changed file is hashed anew. Only inputs stored as full matrices are remembered
    (a factored one's differences are the product of its factors)."""
    entries: list[_RememberedInput | None] = []
    for observed, read_as, delta in zip(plan.files or (None,) * len(plan.deltas), plan.formats, plan.deltas):
        if observed is None:
            entries.append(None)
            continue
        file, stat = observed
        what = f"layer digests: mergekit-cd {__version__}, read as {read_as}, base K/V {plan.base.fingerprint}"
        found = memo.get_digests(file, what, delta.layers)  # a damaged entry: hashed again
        digests = {name: bytes.fromhex(value) for name, value in found.items()} if found is not None else None
        entries.append(_RememberedInput(file, what, stat, digests))
    return entries


def _layer_digest(name: str, parts: tuple[Tensor, Tensor]) -> bytes:
    """sha256 of one layer's K and V differences (float32), whatever way they were stored."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(name.encode())
        digest.update(part.detach().float().contiguous().numpy())  # hashed in place, not copied to bytes
    return digest.digest()


def _delta_hash(delta: ConceptDelta, layer_digests: dict[str, bytes]) -> str:
    """sha256 of a delta's differences (from its layers' digests, in name order) and tokens,
    independent of the file it came in and of the order its layers were read."""
    digest = hashlib.sha256()
    for name in sorted(layer_digests):
        digest.update(layer_digests[name])
    for token in sorted(delta.tokens):
        digest.update(token.encode())
        for embedding in delta.tokens[token]:
            digest.update(embedding.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()
