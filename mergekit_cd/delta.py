"""Concept deltas: per-layer K/V weight differences against a named base, plus modifier tokens.

A :class:`ConceptDelta` is always a *difference*; files that hold full fine-tuned weights are
converted at the format boundary. Deltas support plain algebra (``a + b``, ``a - b``,
``k * a`` and ``a / k`` with a number or a 0-dim tensor ``k``, ``-a``), :func:`interpolate`,
:func:`compress`, and the naive baselines :func:`sum_deltas` and :func:`average_deltas`.

Tokens are not differences: they are new rows of the embedding table. Adding deltas takes the
union of their tokens (a name used by both for different embeddings is renamed, and the
mapping is recorded in ``token_renames`` and warned); scaling keeps them; ``a - b`` removes
``b``'s concept, so it drops ``a``'s tokens whose embeddings equal one of ``b``'s (so
``2 * a - a`` keeps no token, and ``(b + a) - b`` keeps ``a``'s token under the name it got in
``b + a``). ``token_renames`` records the renames of the operation that made the delta only;
:func:`sum_deltas` renames many inputs in one operation and records them all.
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Generic, TypeVar, Union

import torch
from torch import Tensor

from .errors import MergeError, TokenRenameWarning

if TYPE_CHECKING:
    from .merge_statistics import MergeStatistics


@dataclass(frozen=True)
class LowRank:
    """A difference kept as factors ``up @ down`` (the authors' compressed ``u``/``v``)."""

    up: Tensor  # (out, r) = U[:, :r] diag(S[:r])
    down: Tensor  # (r, in) = Vh[:r]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.up.shape[0], self.down.shape[1]))

    @property
    def dtype(self) -> torch.dtype:
        return self.up.dtype

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    def dense(self) -> Tensor:
        return self.up @ self.down


Difference = Union[Tensor, LowRank]


def dense(x: Difference) -> Tensor:
    """The full matrix of a difference, whichever way it is stored."""
    return x.dense() if isinstance(x, LowRank) else x


@dataclass(frozen=True)
class LayerDelta:
    """K and V weight differences of one cross-attention layer (``attn2.to_k``/``attn2.to_v``)."""

    key: Difference
    value: Difference

    def map(self, fn) -> LayerDelta:
        return LayerDelta(fn(self.key), fn(self.value))

    def rows(self) -> Tensor:
        """The K then the V difference rows stacked, dense: the layout the merge solves for."""
        return torch.cat([dense(self.key), dense(self.value)])


Shapes = tuple[torch.Size, torch.Size]


Layer = TypeVar("Layer")


class LazyLayers(Mapping[str, Layer], Generic[Layer]):
    """Layers read from their file when accessed, one layer at a time: differences
    (:class:`LayerDelta`), or the (to_k, to_v) pairs of full fine-tuned weights.

    What lets a merge stream its inputs layer by layer instead of holding every file in memory
    (ten SDXL concepts are 13.6 GB). Shapes are known from the file header without reading.
    The file must stay where it is while the delta is used (as with ``safe_open``);
    ``delta.dense()`` makes an in-memory copy.
    """

    def __init__(self, shapes: dict[str, Shapes], loader: Callable[[str], Layer]) -> None:
        self._shapes = dict(shapes)
        self._loader = loader

    def __getitem__(self, name: str) -> Layer:
        if name not in self._shapes:
            raise KeyError(name)
        return self._loader(name)

    def __contains__(self, name: object) -> bool:
        """From the names alone (``Mapping``'s own reads the layer: comparing two deltas' layer
        names read every layer of one)."""
        return name in self._shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def shapes(self) -> dict[str, Shapes]:
        return dict(self._shapes)


def layer_shapes(layers: Mapping[str, LayerDelta]) -> dict[str, Shapes]:
    """(key shape, value shape) per layer, without reading lazily stored layers."""
    if isinstance(layers, LazyLayers):
        return layers.shapes()
    return {name: (layer.key.shape, layer.value.shape) for name, layer in layers.items()}


@dataclass(frozen=True)
class Concept:
    """What a token stands for: its class word and target prompts, when known."""

    token: str
    class_word: str | None = None
    prompts: tuple[str, ...] = ()
    style: bool = False

    def renamed(self, old: str, new: str) -> Concept:
        return self.with_names({old: new})

    def with_names(self, renames: Mapping[str, str]) -> Concept:
        """Every token name ``renames`` maps replaced at once, in the token and the prompts
        (at once, so ``{"<cat>": "<new1>", "<new1>": "<new2>"}`` swaps nothing twice)."""
        if not renames:
            return self
        pattern = re.compile("|".join(map(re.escape, sorted(renames, key=len, reverse=True))))
        return replace(self, token=renames.get(self.token, self.token),
                       prompts=tuple(pattern.sub(lambda match: renames[match.group(0)], p) for p in self.prompts))


@dataclass(frozen=True)
class Provenance:
    """Where a delta or a file of full weights comes from, as our metadata records it: the base
    model's name and K/V fingerprint, the architecture, what each token stands for, and the
    other recorded fields (``recipe``, ``source``, ...). One record for
    :class:`ConceptDelta` and :class:`~mergekit_cd.weights.FineTunedWeights` alike; a file
    without our metadata gives the empty one."""

    base: str | None = None
    base_fingerprint: str | None = None
    architecture: str | None = None
    concepts: tuple[Concept, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)


_Content = TypeVar("_Content", bound="Provenanced")


class Provenanced:
    """What :class:`ConceptDelta` and :class:`~mergekit_cd.weights.FineTunedWeights` share: their
    :class:`Provenance` fields, made from and read as one record."""

    base: str | None
    base_fingerprint: str | None
    architecture: str | None
    concepts: tuple[Concept, ...]
    metadata: dict[str, Any]

    @property
    def provenance(self) -> Provenance:
        """Its base, fingerprint, architecture, concepts and metadata (a copy) as one record."""
        return Provenance(self.base, self.base_fingerprint, self.architecture, self.concepts, dict(self.metadata))

    @classmethod
    def with_provenance(cls: type[_Content], layers: Mapping[str, Any], tokens: dict[str, tuple[Tensor, ...]],
                        provenance: Provenance, **others: Any) -> _Content:
        """An object of ``layers`` and ``tokens`` whose origin ``provenance`` records (a file's
        metadata, or another object's :attr:`provenance`); its metadata is a copy of the record's."""
        return cls(layers, tokens, base=provenance.base, base_fingerprint=provenance.base_fingerprint,
                   architecture=provenance.architecture, concepts=provenance.concepts,
                   metadata=dict(provenance.metadata), **others)


@dataclass(frozen=True)
class TokenRename:
    """Token ``old`` of operand ``operand`` (0-based) was renamed to ``new``."""

    operand: int
    old: str
    new: str


@dataclass(eq=False)
class ConceptDelta(Provenanced):
    """K/V differences per layer and modifier tokens, made against one base model.

    layers: layer name (diffusers module path up to ``attn2``) -> :class:`LayerDelta`.
    tokens: token string -> one embedding per text encoder (two for SDXL).
    base: the base model's name, path or repo id; base_fingerprint: hash of its K/V weights.
    other_modules: a LoRA's UNet modules beyond the cross-attention K/V (diffusers module path,
    e.g. ``...attn1.to_q``, -> low-rank difference): never solved for; the algebra combines them
    like the layers, a merge carries them only as ``MergeOptions.other_layers`` says, and only
    the LoRA layouts hold them. unread_parts: the names of what a LoRA file holds that its reader
    left unread (text-encoder parts, UNet parts no carrying is built for): the load boundary
    drops or refuses them (:func:`mergekit_cd.loading.load`), so no merged or loaded delta has any.
    statistics: what a solved merge that made this delta needs to be solved again without its
    inputs (:mod:`~mergekit_cd.merge_statistics`); any operation that changes the differences
    drops them, as it drops the metadata.
    """

    layers: Mapping[str, LayerDelta]  # a dict, or LazyLayers read from a file on access
    tokens: dict[str, tuple[Tensor, ...]] = field(default_factory=dict)
    base: str | None = None
    base_fingerprint: str | None = None
    architecture: str | None = None
    concepts: tuple[Concept, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    token_renames: tuple[TokenRename, ...] = ()
    other_modules: dict[str, LowRank] = field(default_factory=dict)
    unread_parts: tuple[str, ...] = ()
    statistics: MergeStatistics | None = None

    def __post_init__(self) -> None:
        self.tokens = {name: tuple(emb) if isinstance(emb, (tuple, list)) else (emb,)
                       for name, emb in self.tokens.items()}
        self.concepts = tuple(self.concepts)
        _check_layers(self.layers)
        _check_tokens(self.tokens)

    # ------------------------------------------------------------------ properties
    @property
    def context_dim(self) -> int | None:
        """Feature dimension the K/V projections read (768 SD1, 1024 SD2, 2048 SDXL)."""
        first = next(iter(layer_shapes(self.layers).values()), None)
        return None if first is None else first[0][1]

    def num_parameters(self) -> int:
        """Numbers stored for the layer differences (factors count as stored)."""
        def count(x: Difference) -> int:
            return x.up.numel() + x.down.numel() if isinstance(x, LowRank) else x.numel()
        return sum(count(layer.key) + count(layer.value) for layer in self.layers.values())

    def concept_for(self, token: str) -> Concept | None:
        return next((c for c in self.concepts if c.token == token), None)

    def dense(self) -> ConceptDelta:
        """A copy with every low-rank difference expanded to a full matrix."""
        return self._with_layers({k: v.map(dense) for k, v in self.layers.items()})

    def allclose(self, other: ConceptDelta, *, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
        """Same layers, tokens, other modules and (within tolerance) values."""
        if (self.layers.keys() != other.layers.keys() or self.tokens.keys() != other.tokens.keys()
                or self.other_modules.keys() != other.other_modules.keys()):
            return False
        if not all(torch.allclose(part.dense().double(), other.other_modules[module].dense().double(), rtol=rtol,
                                  atol=atol) for module, part in self.other_modules.items()):
            return False
        for name, layer in self.layers.items():
            theirs = other.layers[name]
            for a, b in ((layer.key, theirs.key), (layer.value, theirs.value)):
                if not torch.allclose(dense(a).double(), dense(b).double(), rtol=rtol, atol=atol):
                    return False
        return all(len(e) == len(other.tokens[t]) and all(
            torch.allclose(x.double(), y.double(), rtol=rtol, atol=atol)
            for x, y in zip(e, other.tokens[t])) for t, e in self.tokens.items())

    def __repr__(self) -> str:
        return (f"ConceptDelta(architecture={self.architecture!r}, base={self.base!r}, "
                f"layers={len(self.layers)}, context_dim={self.context_dim}, "
                f"tokens={list(self.tokens)})")

    # ------------------------------------------------------------------ algebra
    def __add__(self, other: ConceptDelta) -> ConceptDelta:
        if not isinstance(other, ConceptDelta):
            return NotImplemented
        return _linear_combination([self, other], [1.0, 1.0])

    def __radd__(self, other: Any) -> ConceptDelta:
        if isinstance(other, (int, float)) and other == 0:  # lets builtin sum() work
            return self
        return NotImplemented

    def __sub__(self, other: ConceptDelta) -> ConceptDelta:
        if not isinstance(other, ConceptDelta):
            return NotImplemented
        _check_compatible([self, other])
        removed = [emb for emb in other.tokens.values()]
        modules = combine_modules([self, other], [1.0, -1.0])
        keep = {t: e for t, e in self.tokens.items()
                if not any(_same_embedding(e, r) for r in removed)}
        layers = {name: LayerDelta(dense(a.key) - dense(other.layers[name].key),
                                   dense(a.value) - dense(other.layers[name].value))
                  for name, a in self.layers.items()}
        return replace(self, layers=layers, tokens=keep, other_modules=modules, base=self.base or other.base,
                       base_fingerprint=self.base_fingerprint or other.base_fingerprint,
                       concepts=tuple(c for c in self.concepts if c.token in keep),
                       metadata={}, token_renames=(), statistics=None)

    def __mul__(self, scale: float | Tensor) -> ConceptDelta:
        scale = _as_scale(scale)
        if scale is None:
            return NotImplemented
        return replace(self._with_layers({k: v.map(lambda x: _scaled(x, scale)) for k, v in self.layers.items()}),
                       other_modules=combine_modules([self], [scale]))

    __rmul__ = __mul__

    def __truediv__(self, scale: float | Tensor) -> ConceptDelta:
        scale = _as_scale(scale)
        if scale is None:
            return NotImplemented
        return self * (1.0 / scale)

    def __neg__(self) -> ConceptDelta:
        return self * -1.0

    def _with_layers(self, layers: dict[str, LayerDelta]) -> ConceptDelta:
        return replace(self, layers=layers, metadata={}, token_renames=(), statistics=None)


def _as_scale(value: Any) -> float | None:
    """A real number (Python, NumPy or a 0-dim real tensor) as a float; None for anything else."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            return None
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def _scaled(x: Difference, scale: float) -> Difference:
    return LowRank(x.up * scale, x.down) if isinstance(x, LowRank) else x * scale


def _same_embedding(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def _check_layers(layers: Mapping[str, LayerDelta]) -> None:
    context = None
    for name, shapes in layer_shapes(layers).items():
        for which, shape in zip(("key", "value"), shapes):
            if len(shape) != 2:
                raise MergeError(f"Layer {name} {which}: expected a 2-D weight difference, "
                                 f"got shape {tuple(shape)}.")
            if context is None:
                context = shape[1]
            if shape[1] != context:
                raise MergeError(f"Layer {name} {which} reads {shape[1]} features but other "
                                 f"layers read {context}.")


#: The longest token name accepted (CLIP's tokenizer reads 77 tokens; a name is one of them).
MAX_TOKEN_NAME = 100


def token_name_problem(name: Any) -> str | None:
    """Why ``name`` cannot be a modifier token, or None: the one rule for every format read or
    written. A token is one word of a prompt and, in the diffusers layout, a file name, so it is a
    non-empty string of printable characters (no control characters or ANSI escapes, which would
    reach the terminal), without whitespace or path separators, at most :data:`MAX_TOKEN_NAME` long."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    if len(name) > MAX_TOKEN_NAME:
        return f"is {len(name)} characters long (at most {MAX_TOKEN_NAME})"
    if not name.isprintable() or any(character.isspace() for character in name):
        return "holds whitespace or control characters"
    if "/" in name or "\\" in name or name in (".", ".."):
        return "cannot name a file (it holds a path separator or is . or ..)"
    return None


def check_token_name(name: Any, source: str | None = None) -> None:
    """:func:`token_name_problem` as a MergeError naming ``source`` (the file, when there is one);
    the name is shown escaped, so no control character reaches the terminal."""
    problem = token_name_problem(name)
    if problem is not None:
        shown = repr(name)[:120]
        raise MergeError(f"{source}: token {shown} {problem}." if source else f"Token {shown} {problem}.")


def _check_tokens(tokens: dict[str, tuple[Tensor, ...]]) -> None:
    dims = None
    for name, embeddings in tokens.items():
        check_token_name(name)
        shape = tuple(tuple(e.shape) for e in embeddings)
        if any(len(s) != 1 for s in shape):
            raise MergeError(f"Token {name}: each embedding must be a vector, got shapes {shape}.")
        if dims is None:
            dims = shape
        if shape != dims:
            raise MergeError(f"Token {name} has embedding shapes {shape}, others have {dims}.")


def _check_same_base(first: ConceptDelta, i: int, other: ConceptDelta, j: int) -> None:
    """Two deltas may combine only if nothing they record says their bases differ."""
    if first.base_fingerprint and other.base_fingerprint \
            and first.base_fingerprint != other.base_fingerprint:
        raise MergeError(f"Cannot combine deltas made against different base models: operand {i} "
                         f"({first.base or 'unnamed'}, fingerprint {first.base_fingerprint[:12]}) "
                         f"and operand {j} ({other.base or 'unnamed'}, fingerprint "
                         f"{other.base_fingerprint[:12]}).")
    if (first.base and other.base and first.base != other.base
            and not (first.base_fingerprint and other.base_fingerprint)):
        raise MergeError(f"Cannot tell whether operand {i} (base {first.base}) and operand {j} (base "
                         f"{other.base}) were made against the same model: their base names differ "
                         f"and no fingerprint is recorded. Load both with the same --base.")


def _check_compatible(deltas: Sequence[ConceptDelta]) -> None:
    """Deltas combine only when made against the same base, with the same layers and shapes."""
    for i, one in enumerate(deltas):  # every pair: a delta that records nothing must not bridge two bases
        for j in range(i + 1, len(deltas)):
            _check_same_base(one, i, deltas[j], j)
    first = deltas[0]
    for i, other in enumerate(deltas[1:], start=1):
        if first.architecture and other.architecture and first.architecture != other.architecture:
            raise MergeError(f"Cannot combine deltas for different architectures: operand 0 is "
                             f"{first.architecture}, operand {i} is {other.architecture}.")
        if first.layers.keys() != other.layers.keys():
            missing = sorted(first.layers.keys() ^ other.layers.keys())
            raise MergeError(f"Operands 0 and {i} cover different layers, e.g. {missing[0]} "
                             f"({len(missing)} differ).")
        for name, layer in first.layers.items():
            theirs = other.layers[name]
            for which in ("key", "value"):
                mine, yours = getattr(layer, which).shape, getattr(theirs, which).shape
                if mine != yours:
                    raise MergeError(f"Layer {name} {which} has shape {tuple(mine)} in operand 0 "
                                     f"but {tuple(yours)} in operand {i}.")


_NAME = re.compile(r"^(<?)(.*?)(\d*)(>?)$")


def _fresh_name(name: str, taken: set[str]) -> str:
    """Next free name in the token's own series: ``<new1>`` -> ``<new2>``, ``<cat>`` -> ``<cat2>``."""
    opening, stem, _, closing = _NAME.match(name).groups()
    number = 1
    while f"{opening}{stem}{number}{closing}" in taken:
        number += 1
    return f"{opening}{stem}{number}{closing}"


def merge_tokens(deltas: Sequence[ConceptDelta]) -> tuple[
        dict[str, tuple[Tensor, ...]], tuple[Concept, ...], tuple[TokenRename, ...]]:
    """Union of tokens and concepts; equal embeddings are one token, clashing names renamed."""
    tokens: dict[str, tuple[Tensor, ...]] = {}
    concepts: list[Concept] = []
    renames: list[TokenRename] = []
    every_name = {name for delta in deltas for name in delta.tokens}
    for index, delta in enumerate(deltas):
        own = {c.token: c for c in delta.concepts}
        for name, embedding in delta.tokens.items():
            if name in tokens and _same_embedding(tokens[name], embedding):
                continue
            new = name if name not in tokens else _fresh_name(name, set(tokens) | every_name)
            if new != name:
                renames.append(TokenRename(index, name, new))
            tokens[new] = embedding
            if name in own:
                concepts.append(own[name].renamed(name, new))
    if renames:
        mapping = ", ".join(f"{r.old} of operand {r.operand} -> {r.new}" for r in renames)
        warnings.warn(f"Token names collided and were renamed: {mapping}.", TokenRenameWarning,
                      stacklevel=3)
    return tokens, tuple(concepts), tuple(renames)


def _linear_combination(deltas: Sequence[ConceptDelta], scales: Sequence[float]) -> ConceptDelta:
    """``sum_i scales[i] * deltas[i]`` on the differences; union of the tokens."""
    if not deltas:
        raise MergeError("Nothing to combine: no deltas were given.")
    _check_compatible(deltas)
    first = deltas[0]
    layers = {}
    for name in first.layers:
        parts = [d.layers[name] for d in deltas]
        layers[name] = LayerDelta(
            _weighted([p.key for p in parts], scales), _weighted([p.value for p in parts], scales))
    tokens, concepts, renames = merge_tokens(deltas)
    return ConceptDelta(
        layers=layers, tokens=tokens, other_modules=combine_modules(deltas, scales),
        base=next((d.base for d in deltas if d.base), None),
        base_fingerprint=next((d.base_fingerprint for d in deltas if d.base_fingerprint), None),
        architecture=next((d.architecture for d in deltas if d.architecture), None),
        concepts=concepts, token_renames=renames)


def combine_modules(deltas: Sequence[ConceptDelta], scales: Sequence[float]) -> dict[str, LowRank]:
    """``sum_i scales[i] * deltas[i].other_modules``, exactly: per module the scaled factors side
    by side (``[s1 B1, s2 B2] @ [A1; A2]``), so the rank is the sum of the inputs' ranks; a delta
    without a module adds nothing to it. Parts the readers left unread cannot be combined."""
    unread = next((delta for delta in deltas if delta.unread_parts), None)
    if unread is not None:
        raise MergeError(f"Cannot combine a delta holding unread LoRA parts ({', '.join(unread.unread_parts[:3])}); "
                         f"load it with other_layers='drop' or 'keep' first.")
    combined: dict[str, list[LowRank]] = {}
    for delta, scale in zip(deltas, scales):
        for module, part in delta.other_modules.items():
            combined.setdefault(module, []).append(_scaled(part, scale))
    modules: dict[str, LowRank] = {}
    for module, parts in combined.items():
        if len({part.shape for part in parts}) > 1:
            raise MergeError(f"Cannot combine LoRA module {module}: its inputs have shapes "
                             f"{sorted({tuple(part.shape) for part in parts})}.")
        modules[module] = LowRank(torch.cat([part.up for part in parts], dim=1),
                                  torch.cat([part.down for part in parts], dim=0))
    return modules


def _weighted(parts: Sequence[Difference], scales: Sequence[float]) -> Tensor:
    total = dense(parts[0]) * scales[0]
    for part, scale in zip(parts[1:], scales[1:]):
        total = total + dense(part) * scale
    return total


def sum_deltas(deltas: Iterable[ConceptDelta]) -> ConceptDelta:
    """Naive baseline: add all differences (what "just load them all" amounts to)."""
    deltas = list(deltas)
    return _linear_combination(deltas, [1.0] * len(deltas))


def average_deltas(deltas: Iterable[ConceptDelta]) -> ConceptDelta:
    """Naive baseline: mean of the differences, union of the tokens."""
    deltas = list(deltas)
    return _linear_combination(deltas, [1.0 / max(len(deltas), 1)] * len(deltas))


def interpolate(a: ConceptDelta, b: ConceptDelta, t: float) -> ConceptDelta:
    """``(1 - t) * a + t * b``: t = 0 gives a, t = 1 gives b (tokens of both are kept)."""
    return _linear_combination([a, b], [1.0 - t, t])


@dataclass(frozen=True)
class CompressionReport:
    """Outcome of :func:`compress`: the error actually reached and what it cost."""

    rtol: float
    relative_error: float  # ||D - D_r||_F / ||D||_F over all layers together
    max_layer_error: float  # worst single matrix
    ranks: dict[str, tuple[int, int]]  # layer -> (key rank, value rank) the bound needs
    parameters_before: int
    parameters_after: int
    # "<layer>.to_k" / "<layer>.to_v" stored whole: their factors would have taken more bytes
    kept_dense: tuple[str, ...] = ()
    # matrices factored at their numerical rank (exact to float32 rounding), whatever ``rtol``
    exact: tuple[str, ...] = ()


def compress(delta: ConceptDelta, rtol: float = 0.01, *,
             dense_fallback: bool = True) -> tuple[ConceptDelta, CompressionReport]:
    """Low-rank differences with relative Frobenius error at most ``rtol`` per matrix (so overall).

    Each K and V difference keeps the fewest singular values whose discarded energy stays
    within ``rtol``; factors are stored as the authors' compressed files do (``u = U S``,
    ``v = Vh``), in float32 or better. A matrix whose factors would take more bytes than the
    matrix itself (nearly full rank) stays dense and exact, and is listed in the report's
    ``kept_dense``; ``dense_fallback=False`` factors every matrix anyway (the authors'
    compressed files hold factors only). Returns the compressed delta and a report of the
    error reached, measured on what is stored (an ``rtol`` below float32 rounding, about 1e-7,
    cannot be met; the report then says what was).
    """
    if not (0 <= rtol < 1):
        raise MergeError(f"compress: rtol must be in [0, 1), got {rtol}.")
    layers: dict[str, LayerDelta] = {}
    ranks: dict[str, tuple[int, int]] = {}
    kept_dense: list[str] = []
    lost_sq = total_sq = worst = 0.0
    for name, layer in delta.layers.items():
        stored: list[Difference] = []
        layer_ranks = []
        for projection, matrix in (("to_k", dense(layer.key)), ("to_v", dense(layer.value))):
            low_rank, lost, norm = _truncate(matrix, rtol)
            layer_ranks.append(low_rank.rank)
            if dense_fallback and _nbytes(low_rank.up) + _nbytes(low_rank.down) > _nbytes(matrix):
                kept_dense.append(f"{name}.{projection}")
                stored.append(matrix)
                lost = 0.0
            else:
                stored.append(low_rank)
            lost_sq += lost**2
            total_sq += norm**2
            worst = max(worst, lost / norm if norm > 0 else 0.0)
        layers[name] = LayerDelta(*stored)
        ranks[name] = (layer_ranks[0], layer_ranks[1])
    compressed = delta._with_layers(layers)
    report = CompressionReport(rtol, math.sqrt(lost_sq / total_sq) if total_sq > 0 else 0.0,
                               worst, ranks, delta.num_parameters(), compressed.num_parameters(),
                               tuple(kept_dense))
    return compressed, report


#: The error of factors that reproduce a float32 matrix to its own rounding: the numerical
#: rank's truncation (the dropped singular values are rounding noise) plus the factors' rounding.
EXACT_RTOL = 8 * torch.finfo(torch.float32).eps


#: The default bound of a LoRA's error where the difference is not low rank (``--lora-rtol``).
LORA_RTOL = 0.01


def factorize(delta: ConceptDelta, rtol: float = LORA_RTOL) -> tuple[ConceptDelta, CompressionReport]:
    """Every K/V difference as low-rank factors, as a LoRA stores them.

    A difference that is low rank (the factors at its numerical rank, exact to float32
    rounding, take fewer numbers than the matrix: every constrained or soft merge, whose
    difference ``(V - W0 C^T) Z`` has at most one rank per constraint row) is factored exactly
    and listed in the report's ``exact``; any other (one trained concept, a sum) at the
    smallest rank within ``rtol``, as :func:`compress` does. Factors already stored stay as
    they are, and so does the metadata (a merge's recipe). The report measures what is stored.
    """
    if not (0 <= rtol < 1):
        raise MergeError(f"--lora-rtol {rtol:g}: the relative error bound must be in [0, 1).")
    layers: dict[str, LayerDelta] = {}
    ranks: dict[str, tuple[int, int]] = {}
    exact: list[str] = []
    lost_sq = total_sq = worst = 0.0
    for name, layer in delta.layers.items():
        stored: list[LowRank] = []
        for projection, part in (("to_k", layer.key), ("to_v", layer.value)):
            if isinstance(part, LowRank):
                stored.append(part)
                norm = float(part.dense().double().norm())
                total_sq += norm**2
                exact.append(f"{name}.{projection}")
                continue
            factors, lost, norm = _truncate(part, EXACT_RTOL)
            if factors.rank * sum(part.shape) < part.numel():
                exact.append(f"{name}.{projection}")
            else:
                factors, lost, norm = _truncate(part, rtol)
            stored.append(factors)
            lost_sq += lost**2
            total_sq += norm**2
            worst = max(worst, lost / norm if norm > 0 else 0.0)
        layers[name] = LayerDelta(*stored)
        ranks[name] = (stored[0].rank, stored[1].rank)
    factored = replace(delta, layers=layers, metadata=dict(delta.metadata))  # the same content: its recipe stays
    report = CompressionReport(rtol, math.sqrt(lost_sq / total_sq) if total_sq > 0 else 0.0, worst, ranks,
                               delta.num_parameters(), factored.num_parameters(), exact=tuple(exact))
    return factored, report


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _truncate(matrix: Tensor, rtol: float) -> tuple[LowRank, float, float]:
    """Smallest-rank SVD truncation within ``rtol``, measured on the factors as stored.

    Factors are kept in at least float32 (an fp16 factor pair would add its own rounding error);
    if rounding still pushes the error over ``rtol`` the rank grows until it fits or is full.
    Returns the factors, the error actually reached and the matrix norm.
    """
    original = matrix.double()
    U, S, Vh = torch.linalg.svd(original, full_matrices=False)
    energy = S.flip(0).square().cumsum(0).flip(0)  # energy[r] = sum of S[r:]^2
    total = float(energy[0]) if S.numel() else 0.0
    tail = torch.cat([energy[1:], energy.new_zeros(1)])  # tail[r] = energy lost keeping r+1
    within = (tail <= (rtol**2) * total).nonzero()
    rank = 0 if total == 0 else int(within[0]) + 1
    storage = torch.promote_types(matrix.dtype, torch.float32)
    while True:
        low_rank = LowRank((U[:, :rank] * S[:rank]).to(storage), Vh[:rank].to(storage))
        lost = float((low_rank.dense().double() - original).norm())
        if lost <= rtol * math.sqrt(total) or rank >= S.numel():
            return low_rank, lost, math.sqrt(total)
        rank += 1
