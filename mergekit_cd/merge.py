"""``merge(deltas, reg_captions, base=...)``: files -> deltas -> features -> solver -> delta.

The merge keeps every concept's K/V outputs on its own target prompts and changes the base as
little as possible on the regularisation captions (the paper's constrained least squares, or
its soft/weighted generalisation); ``sum`` and ``average`` are the naive baselines.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .base import BaseModel
from .delta import Concept, ConceptDelta, LayerDelta, TokenRename, dense, merge_tokens
from .errors import MergeError
from .features import FEATURE_RULE, TextFeatures, cached_gram, default_reg_captions, heldout_captions, target_prompts
from .loading import PathLike, as_base, load
from .solvers import SolveInfo, solve_hard, solve_soft
from .solvers._common import default_rtol
from .version import __version__

METHODS = ("constrained", "soft", "sum", "average")


@dataclass(frozen=True)
class ConceptReport:
    """How well the merged model keeps one concept: K/V outputs on its own target prompts."""

    token: str
    class_word: str
    prompts: tuple[str, ...]
    residual: float  # ||W C_i^T - W_i C_i^T|| / ||W_i C_i^T||, 0 = kept exactly
    sum_residual: float  # the same for the naive sum of deltas


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
    concepts: tuple[Concept, ...]  # tokens already renamed to their merged names
    owners: tuple[int, ...]  # index of the input each concept comes from
    tokens: dict[str, tuple[Tensor, ...]]
    token_renames: tuple[TokenRename, ...]
    reg_captions: tuple[str, ...]

    @property
    def num_weight_rows(self) -> int:
        return sum(k[0] + v[0] for k, v in self.base.kv_shapes().values())

    def estimated_memory_bytes(self, num_constraint_rows: int) -> int:
        """Base K/V in float32, result, stacked targets and one d x d float64 Gram matrix."""
        n, d = self.num_weight_rows, self.base.context_dim
        return 4 * n * d * 2 + 4 * n * num_constraint_rows * 2 + 8 * d * d * 3


def plan_merge(deltas: Sequence[PathLike | ConceptDelta], reg_captions: Sequence[str] | None = None, *,
               base: BaseModel | PathLike, class_words: Sequence[str | None] | None = None,
               styles: Sequence[bool] | None = None, target_templates: Sequence[str] | None = None,
               check_base: bool = True) -> MergePlan:
    """Load and validate the inputs, name their tokens, attach class words and target prompts."""
    if not deltas:
        raise MergeError("Nothing to merge: give at least one delta.")
    base = as_base(base)
    loaded = [load(d, base=base, check_base=check_base) for d in deltas]
    sources = tuple(d if isinstance(d, str) else str(d) if not isinstance(d, ConceptDelta)
                    else d.metadata.get("source", f"input {i + 1}") for i, d in enumerate(deltas))
    if class_words is not None and len(class_words) not in (0, len(loaded)):
        raise MergeError(f"Got {len(class_words)} class words for {len(loaded)} inputs; give one --class "
                         f"per input, in order (comma-separated for an input with several tokens).")
    if styles is not None and len(styles) != len(loaded):
        raise MergeError(f"Got {len(styles)} style flags for {len(loaded)} inputs.")
    tokens, _, renames = merge_tokens(loaded)
    concepts: list[Concept] = []
    owners: list[int] = []
    for index, delta in enumerate(loaded):
        renamed = {r.old: r.new for r in renames if r.operand == index}
        own_tokens = list(delta.tokens) or [""]
        words = _class_words_for(delta, own_tokens, class_words[index] if class_words else None,
                                 sources[index])
        for token, word in zip(own_tokens, words):
            known = delta.concept_for(token)
            style = styles[index] if styles is not None else bool(known and known.style)
            new_token = renamed.get(token, token)
            prompts = target_prompts(new_token, word, templates=target_templates, style=style)
            concepts.append(Concept(new_token, word, tuple(prompts), style))
            owners.append(index)
    captions = tuple(reg_captions) if reg_captions is not None else tuple(default_reg_captions())
    if not captions:
        raise MergeError("The regularisation caption set is empty.")
    return MergePlan(base, tuple(loaded), sources, tuple(concepts), tuple(owners), tokens,
                     renames, captions)


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


def merge(deltas: Sequence[PathLike | ConceptDelta], reg_captions: Sequence[str] | None = None, *,
          base: BaseModel | PathLike, method: str = "constrained",
          class_words: Sequence[str | None] | None = None, styles: Sequence[bool] | None = None,
          target_templates: Sequence[str] | None = None, weights: Sequence[float] | None = None,
          mu: float = 1.0, ridge: float = 0.0, relative_ridge: float = 0.0,
          device: str | torch.device = "cpu", text_dtype: torch.dtype = torch.float32,
          batch_size: int = 64, cache_dir: PathLike | None = None,
          held_out: Sequence[str] | None = None, check_base: bool = True, progress: bool = False,
          return_report: bool = False) -> ConceptDelta | tuple[ConceptDelta, MergeReport]:
    """Merge concept deltas into one delta on ``base``.

    method: ``constrained`` (solve_hard: each concept's outputs kept exactly), ``soft``
    (solve_soft with ``weights`` per concept and ``mu``), ``sum`` or ``average`` (naive).
    reg_captions default to the ~1200 captions shipped with the package. ``held_out`` captions
    (default: the shipped held-out set) only feed the report's drift figures. ``ridge`` adds
    ``ridge * ||W - W0||^2``; ``relative_ridge`` adds the same in units of G's mean eigenvalue
    (``trace(G) / d``), which needs no knowledge of the feature scale: 1e-3 typically cuts the
    weight change several-fold while the drift on captions barely moves.
    """
    if method not in METHODS:
        raise MergeError(f"Unknown merge method {method!r}; choose one of {', '.join(METHODS)}.")
    plan = plan_merge(deltas, reg_captions, base=base, class_words=class_words, styles=styles,
                      target_templates=target_templates, check_base=check_base)
    return execute(plan, method=method, weights=weights, mu=mu, ridge=ridge,
                   relative_ridge=relative_ridge, device=device,
                   text_dtype=text_dtype, batch_size=batch_size, cache_dir=cache_dir,
                   held_out=held_out, progress=progress, return_report=return_report)


def execute(plan: MergePlan, *, method: str = "constrained", weights: Sequence[float] | None = None,
            mu: float = 1.0, ridge: float = 0.0, relative_ridge: float = 0.0,
            device: str | torch.device = "cpu",
            text_dtype: torch.dtype = torch.float32, batch_size: int = 64,
            cache_dir: PathLike | None = None, held_out: Sequence[str] | None = None,
            progress: bool = False, return_report: bool = False):
    """Run a planned merge (see :func:`merge`)."""
    device = torch.device(device)
    base = plan.base
    encoder = TextFeatures(base, plan.tokens, device=device, dtype=text_dtype)
    target_features = [torch.cat(encoder.features(list(c.prompts), batch_size=batch_size)).double()
                       for c in plan.concepts]
    layers = base.layer_names()
    W0 = torch.cat([w for name in layers for w in base.kv(name)])
    base_outputs = [rows_times(W0, C) for C in target_features]
    targets = [out + rows_times(_stack(plan.deltas[owner], layers), C)
               for owner, C, out in zip(plan.owners, target_features, base_outputs)]
    naive_sum = _stack(plan.deltas[0], layers)
    for delta in plan.deltas[1:]:
        naive_sum += _stack(delta, layers)

    gram_cached, num_rows, info = False, 0, None
    # features are float64 here but only as exact as the text encoder that made them
    rtol = default_rtol(text_dtype)
    if method in ("constrained", "soft"):
        G, num_rows, gram_cached = cached_gram(base, list(plan.reg_captions), device=device,
                                               dtype=text_dtype, batch_size=batch_size,
                                               cache_dir=cache_dir, progress=progress)
        if ridge < 0 or relative_ridge < 0:
            raise MergeError("ridge and relative ridge must be >= 0.")
        ridge = ridge + relative_ridge * float(torch.diagonal(G).mean())
        W0_device, G = W0.to(device), G.to(device)
        if method == "constrained":
            W, info = solve_hard(W0_device, G, torch.cat(target_features).to(device),
                                 torch.cat(targets, dim=1).to(device), ridge=ridge, rtol=rtol,
                                 return_info=True)
        else:
            weights = list(weights) if weights is not None else [1e3] * len(plan.concepts)
            if len(weights) != len(plan.concepts):
                raise MergeError(f"Got {len(weights)} soft-merge weights for {len(plan.concepts)} concepts.")
            W, info = solve_soft(W0_device, G, [c.to(device) for c in target_features],
                                 [t.to(device) for t in targets], weights, mu, ridge=ridge, rtol=rtol,
                                 return_info=True)
        merged_rows = W.cpu() - W0
    elif method == "sum":
        merged_rows = naive_sum
    else:
        merged_rows = naive_sum / len(plan.deltas)

    result = ConceptDelta(_unstack(merged_rows, layers, base), plan.tokens, base=base.name,
                          base_fingerprint=base.fingerprint, architecture=base.architecture.name,
                          concepts=plan.concepts, token_renames=plan.token_renames)
    result.metadata["recipe"] = _recipe(plan, method, weights, mu, ridge)
    if not return_report:
        return result
    concepts = tuple(
        ConceptReport(c.token, c.class_word or "", c.prompts,
                      _relative(out + rows_times(merged_rows, C), V),
                      _relative(out + rows_times(naive_sum, C), V))
        for c, C, V, out in zip(plan.concepts, target_features, targets, base_outputs))
    captions = list(held_out) if held_out is not None else heldout_captions()
    C_held = torch.cat(encoder.features(captions, batch_size=batch_size)).double()
    base_held = rows_times(W0, C_held)
    report = MergeReport(method, concepts,
                         _relative(base_held + rows_times(merged_rows, C_held), base_held),
                         _relative(base_held + rows_times(naive_sum, C_held), base_held),
                         plan.token_renames, len(plan.reg_captions), num_rows, gram_cached, info,
                         info.notes if info is not None else ())
    return result, report


def rows_times(rows: Tensor, C: Tensor, chunk: int = 8192) -> Tensor:
    """``rows @ C^T`` in float64, streamed over row chunks (rows may be a huge float32 stack)."""
    out = torch.empty(rows.shape[0], C.shape[0], dtype=torch.float64)
    C = C.double().cpu()
    for start in range(0, rows.shape[0], chunk):
        out[start:start + chunk] = rows[start:start + chunk].double() @ C.T
    return out


def _stack(delta: ConceptDelta, layers: list[str]) -> Tensor:
    """All K/V difference rows in base layer order (K then V per layer), float32."""
    return torch.cat([dense(getattr(delta.layers[name], which)).float()
                      for name in layers for which in ("key", "value")])


def _unstack(rows: Tensor, layers: list[str], base: BaseModel) -> dict[str, LayerDelta]:
    shapes = base.kv_shapes()
    out, start = {}, 0
    for name in layers:
        k, v = shapes[name][0][0], shapes[name][1][0]
        out[name] = LayerDelta(rows[start:start + k].float().contiguous(),
                               rows[start + k:start + k + v].float().contiguous())
        start += k + v
    return out


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
        **({"mu": mu, "weights": list(weights)} if method == "soft" else {}),
    }


def _delta_hash(delta: ConceptDelta) -> str:
    """sha256 of a delta's differences and tokens, independent of the file it came in."""
    digest = hashlib.sha256()
    for name in sorted(delta.layers):
        for part in (delta.layers[name].key, delta.layers[name].value):
            digest.update(name.encode())
            digest.update(dense(part).float().contiguous().numpy().tobytes())
    for token in sorted(delta.tokens):
        digest.update(token.encode())
        for embedding in delta.tokens[token]:
            digest.update(embedding.float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _relative(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b||; the absolute difference when b is zero."""
    norm = float(b.norm())
    return float((a - b).norm()) / norm if norm > 0 else float((a - b).norm())
