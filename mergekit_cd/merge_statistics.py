"""What a solved merge stores so that it can be solved again without its inputs: grown by a
concept, or shrunk by one, exactly as a merge of all the inputs from scratch would be.

A constrained or soft merge sees each concept only through its target feature rows ``C_i`` and
its own change of the outputs on them, ``D_i C_i^T`` per layer (its targets are
``V_i = W0 C_i^T + D_i C_i^T = W_i C_i^T``), and the captions only through their Gram matrix
``G``; the hybrid merge sees each concept's context rows ``P_i`` and ``D_i P_i^T`` too (its soft
targets ``U_i = W0 P_i^T + D_i P_i^T``), and its weight. Those are :class:`MergeStatistics`; a
merge that reads them uses them bit for bit where a merge from scratch would compute them, so the
two agree exactly. Native ``.safetensors`` outputs store them (:mod:`.formats.statistics_layout`);
the other layouts do not.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .captions import default_reg_captions
from .delta import Concept, ConceptDelta
from .errors import MergeError
from .merge_methods import METHOD_TABLE, solved_method_names
from .merge_options import DEFAULT_SOFT_WEIGHT, MergeOptions, OptionError

if TYPE_CHECKING:
    from .merge_plan import MergePlan

#: Version of the statistics a file stores; a newer one is refused rather than half understood.
STATISTICS_VERSION = "1"
#: The shipped caption set's name, as the statistics record it.
SHIPPED_CAPTIONS = "reg_captions.txt"
#: Per layer, the K rows' and the V rows' part of a change ``D_i C_i^T``, each (out, rows), float64.
LayerChanges = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class ConceptStatistics:
    """One concept of a solved merge, as the solve sees it: enough to solve it again.

    ``features``: its target feature rows ``C_i`` (rows, d) after :func:`~.merge.spanning_rows`
    (at most d rows), float64. ``changes``: per layer, its own change of the K and V outputs on
    them, ``D_i C_i^T``, float64 (read from its file on access when the statistics were read).
    ``weight``: its weight in a soft or hybrid merge, ``None`` in a constrained one.
    ``context_features`` and ``context_changes``: the same for the soft context rows ``P_i``
    (``D_i P_i^T``) of a ``context_rows`` method (the hybrid), reduced alike (at most d rows: when
    there are more, the d x d factor of their Gram matrix); ``None`` for the constrained and soft
    merges.
    """

    concept: Concept
    features: Tensor
    changes: Mapping[str, LayerChanges]
    weight: float | None = None
    context_features: Tensor | None = None
    context_changes: Mapping[str, LayerChanges] | None = None


@dataclass(frozen=True)
class CaptionSet:
    """Which regularisation captions a merge used: their count and sha256 (of the captions joined
    by newlines, as the recipe records them), and the shipped set's name when they are it or its
    first ``count`` captions."""

    count: int
    sha256: str
    shipped: str | None

    @classmethod
    def of(cls, captions: Sequence[str]) -> CaptionSet:
        shipped = default_reg_captions()
        is_shipped = list(captions) == shipped[: len(captions)]
        return cls(len(captions), captions_sha256(captions), SHIPPED_CAPTIONS if is_shipped else None)

    def describe(self) -> str:
        """``"the first 300 of the shipped reg_captions.txt"`` or ``"300 captions (sha256 1a2b...)"``."""
        if self.shipped:
            return f"the first {self.count:,} captions of the shipped {self.shipped}"
        return f"{self.count:,} captions of your own (sha256 {self.sha256[:12]})"


def captions_sha256(captions: Sequence[str]) -> str:
    """sha256 of the captions joined by newlines (the recipe's ``reg_captions.sha256``)."""
    return hashlib.sha256("\n".join(captions).encode()).hexdigest()


@dataclass(frozen=True)
class Regulariser:
    """The regularisation term of a merge: its Gram matrix ``G`` (float64, stored: it is what the
    solve used, bit for bit, and shrinking a merge then needs no text encoder) and what decided
    it: the captions, the feature row rule and the base's text encoder and K/V weights (the text
    precision is one of the recorded options)."""

    gram: Tensor
    num_rows: int
    captions: CaptionSet
    feature_rule: str
    text_fingerprint: str
    base_fingerprint: str


@dataclass(frozen=True)
class MergeStatistics:
    """Everything a solved merge needs besides the base: the regulariser, the options that decide
    the result (as :meth:`MergeOptions.to_recipe` records them, without the per-concept weights,
    which each concept holds) and every concept's statistics, in the merge's order."""

    regulariser: Regulariser
    options: dict[str, Any]
    concepts: tuple[ConceptStatistics, ...]

    @property
    def tokens(self) -> list[str]:
        return [record.concept.token for record in self.concepts]

    def without(self, token: str) -> MergeStatistics:
        """The statistics of every concept but ``token``'s."""
        return replace(self, concepts=tuple(c for c in self.concepts if c.concept.token != token))

    def num_bytes(self) -> int:
        """Bytes the statistics take in a file (float64 tensors; the JSON part is a few hundred bytes)."""
        total = self.regulariser.gram.numel()
        for record in self.concepts:
            rows = record.features.shape[0] + (record.context_features.shape[0]
                                               if record.context_features is not None else 0)
            total += rows * record.features.shape[1]
            for changes in (record.changes, record.context_changes or {}):
                total += sum(k.numel() + v.numel() for k, v in changes.values())
        return 8 * total


def is_merged(delta: ConceptDelta) -> str | None:
    """The merge method a delta's recipe records (it is a merge's output), or None."""
    recipe = delta.metadata.get("recipe")
    method = recipe.get("method") if isinstance(recipe, dict) else None
    return method if isinstance(method, str) and method in METHOD_TABLE else None


@dataclass(frozen=True)
class StoredConcepts:
    """What the statistics of a plan's merged inputs give a solved merge: per concept its stored
    record (None for a concept read from its own file), the regulariser they share (None when no
    input stores statistics), and the options with the recorded soft weights filled in."""

    records: tuple[ConceptStatistics | None, ...]
    regulariser: Regulariser | None
    options: MergeOptions
    sources: tuple[str, ...]  # the inputs they came from


def stored_concepts(plan: MergePlan, options: MergeOptions) -> StoredConcepts:
    """Pair every concept of a merged input with its stored statistics, and refuse what would make
    the merge differ from one of all the inputs from scratch: a merged input without statistics,
    statistics of another regulariser (captions, row rule, text encoder, precision) or other
    options. A naive merge (sum, average) uses none: a merged input is then one delta as any other."""
    none = StoredConcepts((None,) * len(plan.concepts), None, options, ())
    if not options.spec.solves:
        return none
    records: list[ConceptStatistics | None] = [None] * len(plan.concepts)
    regulariser, sources = None, []
    for index, delta in enumerate(plan.deltas):
        source, method = plan.sources[index], is_merged(delta)
        if delta.statistics is None:
            if method is not None:
                raise MergeError(_no_statistics_message(source, delta, method))
            continue
        # the options first: they name the flags to give (a hybrid merge's rows among them)
        _check_options(delta.statistics, options, len(plan.concepts), source)
        _check_regulariser(delta.statistics, plan, options.row_rule.name, source)
        if any((record.context_features is None) == options.spec.context_rows
               for record in delta.statistics.concepts):
            raise MergeError(f"{source}: its merge statistics are of a {options.method} merge but "
                             f"{'lack' if options.spec.context_rows else 'hold'} context rows; the file is damaged. "
                             f"Merge the concepts' own files again.")
        by_token = {record.concept.token: record for record in delta.statistics.concepts}
        if len(by_token) != len(delta.statistics.concepts):
            raise MergeError(f"{source}: some of its concepts share a token ({', '.join(delta.statistics.tokens)}), "
                             f"so they cannot be told apart to grow or shrink the merge; merge the concepts' own "
                             f"files instead.")
        renamed = {r.old: r.new for r in plan.token_renames if r.operand == index}
        original = {new: old for old, new in renamed.items()}
        owned = [i for i, owner in enumerate(plan.owners) if owner == index]
        if sorted(original.get(plan.concepts[i].token, plan.concepts[i].token) for i in owned) != sorted(by_token):
            raise MergeError(f"{source}: its statistics are of the concepts {', '.join(by_token) or '(none)'}, but "
                             f"it holds {', '.join(plan.concepts[i].token for i in owned)}; the file is inconsistent. "
                             f"Merge the concepts' own files again.")
        for i in owned:
            record = by_token[original.get(plan.concepts[i].token, plan.concepts[i].token)]
            stored = record.concept.renamed(record.concept.token, plan.concepts[i].token)
            if stored.prompts != plan.concepts[i].prompts:
                raise MergeError(f"{source}: the concept {plan.concepts[i].token} keeps the target prompts its "
                                 f"statistics were made of ({' | '.join(stored.prompts)}), not "
                                 f"{' | '.join(plan.concepts[i].prompts)}; leave out --class, --style and the "
                                 f"templates for it.")
            records[i] = replace(record, concept=plan.concepts[i])
        regulariser = regulariser or delta.statistics.regulariser
        sources.append(source)
    if regulariser is None:
        return none
    if options.spec.concept_weights and options.weights is None:
        weights = tuple(DEFAULT_SOFT_WEIGHT if record is None or record.weight is None else record.weight
                        for record in records)
        options = replace(options, weights=weights)
    return StoredConcepts(tuple(records), regulariser, options, tuple(sources))


def _no_statistics_message(source: str, delta: ConceptDelta, method: str) -> str:
    tokens = ", ".join(delta.tokens) or "its concepts"
    why = ("it was written by an older mergekit-cd, or in a format that does not carry them: only native "
           ".safetensors outputs do" if METHOD_TABLE[method].solves
           else f"a {method} merge stores none: only the {solved_method_names()} merges do")
    return (f"{source} is a {method} merge but stores no merge statistics ({why}), so it cannot be grown or shrunk "
            f"exactly. Merge the concepts' own files ({tokens}) instead, or merge them once into a .safetensors "
            f"file that can be.")


def _check_regulariser(statistics: MergeStatistics, plan: MergePlan, rule: str, source: str) -> None:
    """The regulariser the statistics record is this merge's: same text encoder, rule and captions."""
    recorded = statistics.regulariser
    if recorded.text_fingerprint != plan.base.text_fingerprint:
        raise MergeError(f"{source} stores text features of another text encoder (fingerprint "
                         f"{recorded.text_fingerprint[:12]}) than {plan.base.name}'s "
                         f"({plan.base.text_fingerprint[:12]}); grow or shrink it on the base it was merged on.")
    if recorded.feature_rule != rule:
        raise MergeError(f"{source} stores features of the {recorded.feature_rule!r} row rule, but this merge uses "
                         f"{rule!r}; merge the concepts' own files again.")
    captions = CaptionSet.of(plan.reg_captions)
    if captions.sha256 != recorded.captions.sha256:
        if not recorded.captions.shipped:
            how = "give the same --reg-captions file"
        elif recorded.captions.count == len(default_reg_captions()):
            how = "leave out --reg-captions and --num-reg-captions (the shipped set)"
        else:
            how = f"leave out --reg-captions and give --num-reg-captions {recorded.captions.count}"
        raise MergeError(f"{source} was merged with other regularisation captions ({recorded.captions.describe()}) "
                         f"than this merge ({captions.describe()}); its stored Gram matrix belongs to those. "
                         f"To grow or shrink it, {how}.")


#: Recipe options that do not decide the K/V weights a grown merge must reproduce: the concepts'
#: weights (stored per concept) and what becomes of a LoRA's other layers (never solved for).
_NOT_RECORDED = ("weights", "other_layers")


def _recorded_options(options: MergeOptions, count: int) -> dict[str, Any]:
    """The options of a merge of ``count`` concepts that its statistics record (see :data:`_NOT_RECORDED`)."""
    return {key: value for key, value in options.to_recipe(count).items() if key not in _NOT_RECORDED}


def _check_options(statistics: MergeStatistics, options: MergeOptions, count: int, source: str) -> None:
    """The options that decide the weights are the ones the statistics were solved with."""
    given = _recorded_options(options, count)
    recorded = statistics.options
    differ = [key for key in sorted(set(given) | set(recorded)) if given.get(key) != recorded.get(key)]
    if not differ:
        return
    def spelled(values: dict[str, Any]) -> str:
        return ", ".join(f"{{{key}}} {_shown(values[key])}" for key in differ if key in values)
    raise OptionError("{source} was merged with " + spelled(recorded) + " and this merge has " + spelled(given)
                      + "; a merge that grows or shrinks it solves the same problem, so give "
                      + spelled(recorded) + ".", source=source)


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def drop_concepts(plan: MergePlan, tokens: Sequence[str], options: MergeOptions) -> MergePlan:
    """``plan`` without the concepts named by ``tokens`` (as the merge names them), each taken from
    a merged input's statistics; the token goes with it."""
    if not tokens:
        return plan
    if not options.spec.solves:
        raise OptionError("--drop solves the merge again from its statistics; it needs {method} "
                          + solved_method_names() + " (the merge's own), not {method} {value}.",
                          value=options.method)
    concepts, owners, deltas = list(plan.concepts), list(plan.owners), list(plan.deltas)
    for token in tokens:
        found = [i for i, concept in enumerate(concepts) if concept.token == token]
        if not found:
            there = ", ".join(concept.token for concept in concepts if concept.token) or "none"
            raise MergeError(f"--drop {token}: no concept of the inputs has that token; they have {there}.")
        index = found[0]
        owner = owners[index]
        statistics, method = deltas[owner].statistics, is_merged(deltas[owner])
        if statistics is None and method is None:
            raise MergeError(f"--drop {token}: {plan.sources[owner]} holds that concept as a delta of its own, "
                             f"not in a merge; leave the input out instead.")
        if statistics is None:
            raise MergeError(_no_statistics_message(plan.sources[owner], deltas[owner], method))
        renamed = {r.new: r.old for r in plan.token_renames if r.operand == owner}
        deltas[owner] = replace(deltas[owner], statistics=statistics.without(renamed.get(token, token)))
        del concepts[index], owners[index]
    if not concepts:
        raise MergeError(f"--drop {', '.join(tokens)} leaves no concept to merge.")
    kept = {concept.token for concept in concepts}
    return replace(plan, deltas=tuple(deltas), concepts=tuple(concepts), owners=tuple(owners),
                   tokens={name: embedding for name, embedding in plan.tokens.items() if name in kept})


class StatisticsRecorder:
    """Collects, layer by layer, the changes ``D_i C_i^T`` (and ``D_i P_i^T`` of a ``context_rows``
    method) of every concept of a merge: computed from its own file, or read from the statistics
    that store it, as the merge read them (a stored concept keeps the rest of its record): the
    result's :class:`MergeStatistics` reads no input again to be reported on or written."""

    def __init__(self, stored: Sequence[ConceptStatistics | None]) -> None:
        self.stored = list(stored)
        self.changes: list[dict[str, LayerChanges]] = [{} for _ in stored]
        self.context_changes: list[dict[str, LayerChanges]] = [{} for _ in stored]

    def add(self, layer: str, own: Sequence[Tensor], own_context: Sequence[Tensor], keys: int) -> None:
        """One layer's ``own[i] = D_i C_i^T`` and ``own_context[i] = D_i P_i^T`` (K rows then V rows,
        float64; ``own_context`` empty for a method without context rows) of every concept."""
        for i, change in enumerate(own):
            self.changes[i][layer] = _split(change, keys)
            if own_context:
                self.context_changes[i][layer] = _split(own_context[i], keys)

    def statistics(self, plan: MergePlan, options: MergeOptions, features: Sequence[Tensor],
                   contexts: Sequence[Tensor], regulariser: Regulariser) -> MergeStatistics:
        """The statistics of the merge of ``plan`` with ``options`` (its concepts' ``features`` and,
        for a ``context_rows`` method, ``contexts``; else none)."""
        weights = options.concept_weights(plan.concept_labels) if options.spec.concept_weights \
            else [None] * len(plan.concepts)
        records = tuple(replace(stored, weight=weight, changes=self.changes[i],
                                context_changes=self.context_changes[i] if contexts else stored.context_changes)
                        if stored is not None
                        else ConceptStatistics(concept, C.cpu(), self.changes[i], weight,
                                               contexts[i].cpu() if contexts else None,
                                               self.context_changes[i] if contexts else None)
                        for i, (concept, stored, C, weight) in enumerate(zip(plan.concepts, self.stored,
                                                                                  features, weights)))
        return MergeStatistics(regulariser, _recorded_options(options, len(plan.concepts)), records)


def _split(change: Tensor, keys: int) -> LayerChanges:
    """A layer's change (K rows then V rows) as its K and V parts, on the CPU."""
    change = change.cpu()
    return change[:keys].contiguous(), change[keys:].contiguous()


def fresh_regulariser(plan: MergePlan, gram: Tensor, num_rows: int, rule: str) -> Regulariser:
    """The regulariser of a merge that computed its Gram matrix from ``plan``'s captions under ``rule``."""
    return Regulariser(gram.to("cpu", torch.float64), num_rows, CaptionSet.of(plan.reg_captions), rule,
                       plan.base.text_fingerprint, plan.base.fingerprint)
