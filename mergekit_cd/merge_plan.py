"""Planning a merge: the inputs loaded and checked, their tokens named, each concept's class word
and target prompts decided; nothing encoded or solved yet (``cd-merge --dry-run`` stops here)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .base import BaseModel
from .captions import default_reg_captions
from .delta import Concept, ConceptDelta, LazyLayers, LowRank, TokenRename, merge_tokens
from .errors import MergeError
from .features import DEFAULT_ROWS, ROW_RULES, RowRule, TextFeatures, TextSet
from .fileio import Observed, StatMemo, parse_once
from .formats import values_checked_on_read
from .limits import MAX_MERGE_PROMPTS, MAX_PROMPTS, check_limit
from .loading import EmbeddingFile, PathLike, as_base, load_source, resolve_delta
from .prompts import target_prompts
from .solvers._common import default_rtol


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
    #: what became of the LoRA inputs' parts beyond the cross-attention K/V, one line per input holding any
    other_layers: tuple[str, ...] = ()
    #: each input read from one file: the file (resolved) and its stat as found before it was read
    #: (:meth:`~.fileio.StatMemo.observe`), for the memo of its digests; None for a folder or a delta in memory
    files: tuple[tuple[str, Observed] | None, ...] = ()

    @property
    def concept_labels(self) -> list[str]:
        """Each concept's name in messages: its token, or its input's for a tokenless concept."""
        return [concept.token or self.sources[owner] for concept, owner in zip(self.concepts, self.owners)]

    @property
    def num_weight_rows(self) -> int:
        return sum(k[0] + v[0] for k, v in self.base.kv_shapes().values())

    def estimated_memory_bytes(self, num_constraint_rows: int, text_dtype: torch.dtype = torch.float32) -> int:
        """Peak memory of :func:`execute` beyond the interpreter, on the CPU.

        The inputs stay loaded throughout; on top come either the largest text encoder (they are
        loaded one at a time and released first) or the result (float32) plus one layer's float64
        working rows and the d x d matrices of the factorisation.
        """
        d = self.base.context_dim
        inputs = sum(_delta_bytes(delta) for delta in self.deltas)
        text = max(self.base.text_encoder_parameters()) * torch.finfo(text_dtype).bits // 8
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
                   text_dtype: torch.dtype = torch.float32, batch_size: int = 64,
                   rule: RowRule = ROW_RULES[DEFAULT_ROWS], token_rows_only: bool = False) -> PlanSummary:
    """Encode the target prompts (not the captions) to count constraint rows and their rank: the
    rows ``rule`` keeps, or (``token_rows_only``, a method with context rows) their token rows."""
    encoder = TextFeatures(plan.base, plan.tokens, device=device, dtype=text_dtype)
    encoded = encoder.encode([TextSet(tuple(c.prompts)) for c in plan.concepts], rule=rule, batch_size=batch_size)
    features = [torch.cat([prompt.token_rows if token_rows_only else prompt.rows for prompt in prompts]).double()
                for prompts in encoded]
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
               style_templates: Sequence[str] | None = None, check_base: bool = True,
               other_layers: str = "refuse", embeddings: Sequence[Sequence[EmbeddingFile]] | None = None) -> MergePlan:
    """Load and validate the inputs, name their tokens, attach class words and target prompts.

    The inputs' layers are checked from their headers here (layers, shapes, dtypes) and their
    values (finiteness) when :func:`~mergekit_cd.merge.execute` reads them, once
    (:func:`~mergekit_cd.formats.values_checked_on_read`): a NaN is refused while merging, before
    anything is written, and ``--dry-run`` does not look for one.

    ``other_layers`` and ``embeddings`` (per input, the token embedding files paired with it)
    are :func:`~mergekit_cd.loading.load`'s, for every input.

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
    # each input file is parsed once (resolving, detecting, reading, comparing) and its layers' bytes read
    # once, when the merge uses them: their values are checked then, their structure now
    with parse_once(), values_checked_on_read():
        paths = [None if isinstance(d, ConceptDelta) else resolve_delta(d) for d in deltas]
        observed = [_observed(path) for path in paths]  # before any is read
        _refuse_repeated_files(paths, sources)
        if embeddings is not None and len(embeddings) != len(deltas):
            raise MergeError(f"Got embedding files for {len(embeddings)} inputs, but {len(deltas)} inputs.")
        paired = embeddings if embeddings is not None else [()] * len(deltas)
        _refuse_repeated_embeddings(paths, sources, paired)
        inputs = [load_source(d if path is None else path, base=base, check_base=check_base, source=source,
                              other_layers=other_layers, embeddings=files, use="merge")
                  for d, path, source, files in zip(deltas, paths, sources, paired)]
        loaded = [entry.delta for entry in inputs]
        _refuse_repeated_content(loaded, sources)
    read_as = tuple(entry.format for entry in inputs)
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
            warnings.warn(f"{sources[index]} has no modifier token: its target prompts hold only ordinary words "
                          f"(its class word); the merge keeps its outputs on them, so every prompt with those "
                          f"words changes with it.", stacklevel=2)
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
            check_limit(len(prompts), MAX_PROMPTS, f"the concept {new_token!r} would have {{count}} target prompts",
                        "The merge")
            concepts.append(Concept(new_token, word, tuple(prompts), style))
            owners.append(index)
    check_limit(sum(len(concept.prompts) for concept in concepts), MAX_MERGE_PROMPTS,
                "its concepts have {count} target prompts", "The merge", needs="any real merge")
    captions = tuple(reg_captions) if reg_captions is not None else tuple(default_reg_captions())
    if not captions:
        raise MergeError("The regularisation caption set is empty.")
    return MergePlan(base, tuple(loaded), sources, read_as, tuple(concepts), tuple(owners), tokens,
                     renames, captions, tuple(f"{entry.source}: {entry.other_layers}" for entry in inputs
                                              if entry.other_layers), tuple(observed))


def _observed(path: Path | None) -> tuple[str, Observed] | None:
    """An input file (resolved) and its stat before it is read (:meth:`StatMemo.observe`); None for
    no path, a folder, or one that cannot be read (the loader then says what is wrong with it)."""
    if path is None:
        return None
    try:
        file = os.path.realpath(path)
        return (file, StatMemo.observe(file)) if Path(file).is_file() else None
    except OSError:
        return None


def _identity(path: Path | None) -> tuple[int, int] | None:
    """What makes two paths one file or folder (device, inode); None for no path or one that cannot
    be read (the loader then says what is wrong with it)."""
    if path is None:
        return None
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_dev, status.st_ino


def _refuse_repeated_files(paths: Sequence[Path | None], sources: Sequence[str]) -> None:
    """The same file or folder given twice, by any path (a link, a hub cache entry), is refused.

    It would be the same concept twice under two token names with one embedding.
    """
    seen: dict[tuple[int, int], int] = {}
    for index, path in enumerate(paths):
        identity = _identity(path)
        if identity is None:
            continue
        if identity in seen:
            what = "folder" if path.is_dir() else "file"
            raise MergeError(_repeated_message(index, seen[identity], sources, f"the same {what}"))
        seen[identity] = index


def _refuse_repeated_embeddings(paths: Sequence[Path | None], sources: Sequence[str],
                                paired: Sequence[Sequence[EmbeddingFile]]) -> None:
    """The same embedding file used twice, by any path (paired with two inputs, twice with one, or
    given as an input and paired too), is refused naming both uses: its token would be the trigger
    of two concepts, whose constraints conflict."""
    uses = [(path, f"as input {index + 1} ({sources[index]})") for index, path in enumerate(paths) if path is not None]
    uses += [(Path(entry[0] if isinstance(entry, tuple) else entry), f"paired with input {index + 1} ({sources[index]})")
             for index, files in enumerate(paired) for entry in files]
    seen: dict[tuple[int, int], str] = {}
    for path, use in uses:
        identity = _identity(path)
        if identity is None:
            continue
        if identity in seen:
            raise MergeError(f"The embedding file {path} is given twice, {seen[identity]} and {use}: its token would "
                             f"be the trigger of two concepts, whose constraints conflict; give it once.")
        seen[identity] = use


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
    """True when ``a`` is ``b`` (or a copy sharing its layers, as loading one delta object twice
    gives), or both have the same tokens with equal embeddings and equal layers."""
    if a is b or (a.layers is b.layers and a.tokens.keys() == b.tokens.keys()):
        return True
    if not a.tokens or a.tokens.keys() != b.tokens.keys() or a.layers.keys() != b.layers.keys():
        return False
    if not all(len(a.tokens[name]) == len(b.tokens[name])
               and all(torch.equal(x, y) for x, y in zip(a.tokens[name], b.tokens[name])) for name in a.tokens):
        return False
    return all(torch.equal(a.layers[name].rows(), b.layers[name].rows()) for name in a.layers)


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
