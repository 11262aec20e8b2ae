"""``load`` and ``save``: files (or hub repos) <-> validated :class:`ConceptDelta` objects.

Formats only parse and serialise; this module turns full fine-tuned weights into differences
against the base, and checks that a delta fits the base it is used with: architecture, base
fingerprint, layer coverage, shapes and token sizes.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from . import formats, hub
from .base import BaseModel, open_base
from .delta import (CompressionReport, ConceptDelta, LayerDelta, LowRank, check_token_name, compress, factorize,
                    layer_shapes,
                    LORA_RTOL)
from .errors import MergeError
from .formats._common import check_token_shapes, natural_order
from .formats._lora import TEXT_ENCODER_PREFIXES, counted, describe_parts, part_module
from .formats.token_files import is_token_file, read_token_file
from .fileio import parse_once
from .limits import MAX_SOLVED_ROWS, MAX_TOKENS, BaseBound, BaseBoundError, within_base
from .merge_options import OptionError
from .tokens import check_new
from .weights import FineTunedWeights

PathLike = str | os.PathLike[str]
#: A token embedding file paired with a delta: its path, or ``(path, token)`` to give its token a
#: new name (an A1111 file named by a word the vocabulary has, ``sks.pt``).
EmbeddingFile = PathLike | tuple[PathLike, str]

#: Files a delta repo on the hub may hold; only these are fetched, from the top level (or from
#: the folder ``org/name:folder`` names), never from deeper folders (``*`` also matches ``/``).
DELTA_FILE_PATTERNS = ["*.safetensors", "*.bin", "*.ckpt", "*.json"]
#: Extensions that make a reference a file path, never a repo id.
DELTA_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def as_base(base: BaseModel | PathLike) -> BaseModel:
    """Accept an opened base or anything :func:`open_base` accepts."""
    return base if isinstance(base, BaseModel) else open_base(str(base))


@dataclass(frozen=True)
class LoadedDelta:
    """What loading learned about one input: its name as given, the file or folder it resolved
    to (None for a delta given in memory), the format it was read in, and the checked delta."""

    source: str
    path: Path | None
    format: str
    delta: ConceptDelta
    #: what became of a LoRA's parts beyond the cross-attention K/V (dropped or kept), in words
    other_layers: str | None = None


#: The format of a delta given in memory rather than as a file.
IN_MEMORY = "object"
#: The format of a token embedding file given as an input on its own (no format reads it).
EMBEDDING = "embedding"
#: What :func:`load` may do with a LoRA's parts beyond the cross-attention K/V.
OTHER_LAYERS_ON_LOAD = ("refuse", "drop", "keep")


def load(reference: PathLike | ConceptDelta, *, base: BaseModel | PathLike | None = None,
         check_base: bool = True, other_layers: str = "refuse", embeddings: Sequence[EmbeddingFile] = ()) -> ConceptDelta:
    """Read a delta in any supported format (local path or hub repo id) and validate it.

    Files that hold full fine-tuned weights need ``base`` to become differences. With a base,
    the delta is checked against it; ``check_base=False`` accepts a delta whose recorded base
    fingerprint differs (for experts who know the bases are equivalent). A delta given in
    memory is never changed: what the base adds (its fingerprint, name) goes to a copy.

    A token embedding file (A1111 ``.pt``, kohya ``emb_params``, SDXL ``clip_l``/``clip_g``,
    diffusers' ``learned_embeds``) is a delta of its token on the base's unchanged K/V (it needs
    ``base``). ``embeddings``: such files paired with the delta, their tokens added to its own
    (a ``(file, token)`` pair renames the file's token). With a base, an embedding file's token
    that the base's vocabulary already has is refused, naming the file.
    ``other_layers``: what becomes of a LoRA's parts beyond the cross-attention K/V:
    ``refuse`` (the default), ``drop``, or ``keep`` its UNet modules (``other_modules``, only
    LoRA layouts hold them: what reads back a merge written with ``other_layers="sum"``);
    text-encoder parts are only ever dropped, with a warning.
    """
    return load_source(reference, base=base, check_base=check_base, other_layers=other_layers,
                       embeddings=embeddings).delta


def load_source(reference: PathLike | ConceptDelta, *, base: BaseModel | PathLike | None = None,
                check_base: bool = True, source: str | None = None, other_layers: str = "refuse",
                embeddings: Sequence[EmbeddingFile] = (), use: str = "load") -> LoadedDelta:
    """:func:`load`, keeping what it learned on the way: the resolved path and the format (the
    file is resolved, detected and read once, with one parse), what became of a LoRA's other
    parts. ``source`` names the input in messages (default: the reference as given); ``use``
    what it is loaded for (:data:`OTHER_LAYERS_USES`: a refusal of its other parts names that
    use's choices)."""
    if other_layers not in OTHER_LAYERS_ON_LOAD:
        raise MergeError(f"other_layers {other_layers!r}: choose one of {', '.join(OTHER_LAYERS_ON_LOAD)}.")
    content: ConceptDelta | FineTunedWeights | None = None
    if isinstance(reference, ConceptDelta):
        path, read_as = None, IN_MEMORY
        source = source or reference.metadata.get("source", "delta")
        delta = replace(reference, metadata=dict(reference.metadata))
    else:
        source = source or str(reference)
        try:
            with parse_once(), within_base(base_bound(as_base(base))) if base is not None else nullcontext():
                path = resolve_delta(reference)
                read_as, content = _read(path, base, source)
        except BaseBoundError:
            _refuse_recorded_architecture(resolve_delta(reference), as_base(base), source)
            raise
        if isinstance(content, FineTunedWeights):
            if base is None:
                raise MergeError(f"{source} holds full fine-tuned weights; give the base model they "
                                 f"were trained from (--base) to turn them into differences.")
            base = as_base(base)
            check_fits(content, fit_target(base), source)
            content = _with_base_identity(content, base, source, check_base)
            delta = content.to_delta(base.kv)
        else:
            delta = content
        delta.metadata.setdefault("source", source)
    delta, what = settle_other_layers(delta, other_layers, source, use)
    delta = _paired(delta, embeddings, base, source)
    if base is not None:
        base = as_base(base)
        # full weights were fitted to the base before they became differences
        check_delta(delta, base, source, check_base=check_base, fit=not isinstance(content, FineTunedWeights))
        if delta.base_fingerprint is None:
            delta.base_fingerprint = base.fingerprint
            delta.base = delta.base or base.name
        delta.architecture = delta.architecture or base.architecture.name
    return LoadedDelta(source, path, read_as, delta, what)


def _read(path: Path, base: BaseModel | PathLike | None, source: str) -> tuple[str, ConceptDelta | FineTunedWeights]:
    """``(format, content)`` of a delta file, or of a token embedding file no format reads."""
    if is_embedding_file(path):
        return EMBEDDING, _embedding_delta(path, base, source)
    return formats.read_detected(path)


def is_embedding_file(path: Path) -> bool:
    """Whether ``path`` is read as a token embedding file: no format detects it, and its keys are a
    token file's (:func:`~mergekit_cd.formats.token_files.is_token_file`)."""
    return not any(module.detect(path) for module in formats.FORMATS) and is_token_file(path)


def _embedding_delta(file: Path, base: BaseModel | PathLike | None, source: str) -> ConceptDelta:
    """A token embedding file as a delta: its token, on the base's K/V unchanged (rank-0 differences)."""
    if base is None:
        raise MergeError(f"{source} is a token embedding file: as an input it is its token on the base's unchanged "
                         f"K/V weights; give the base model (--base).")
    base = as_base(base)
    name, embeddings = read_token_file(file, "as an input")
    _check_new_token(name, file, base.load_tokenizers(), "as an input of its own, rename the file to a new word "
                                       f"(e.g. {file.with_stem(f'{name}_emb').name}), or pair it with an input under a "
                                       f"new name (--embedding 'INPUT={file}:<{name}>')")
    layers = {layer: LayerDelta(*(LowRank(torch.zeros(shape[0], 0), torch.zeros(0, shape[1])) for shape in shapes))
              for layer, shapes in base.kv_shapes().items()}
    check_token_shapes({name: embeddings}, source)
    return ConceptDelta(layers, {name: embeddings}, architecture=base.architecture.name)


def _paired(delta: ConceptDelta, embeddings: Sequence[EmbeddingFile], base: BaseModel | PathLike | None,
            source: str) -> ConceptDelta:
    """``delta`` with the tokens of the embedding files paired with it (a LoRA and its trigger
    token: one concept), each renamed when asked and checked against the base's text encoders
    and vocabulary on its own."""
    if not embeddings:
        return delta
    tokens = dict(delta.tokens)
    origins = {name: source for name in tokens}
    opened = as_base(base) if base is not None else None
    tokenizers = opened.load_tokenizers() if opened is not None else None  # once, not per file
    for entry in embeddings:
        file, rename = (Path(entry[0]), entry[1]) if isinstance(entry, tuple) else (Path(entry), None)
        name, vectors = read_token_file(file, f"paired with {source}")
        if rename is not None:
            check_token_name(rename, f"{file}: its new name")
            name = rename
        if name in tokens:
            raise MergeError(f"{file}: token {name} is already in {origins[name]}; a token can be paired once.")
        if opened is not None:
            check_token_sizes({name: vectors}, opened.token_dims(), opened.name, str(file))
            _check_new_token(name, file, tokenizers, f"give it a new name, --embedding 'INPUT={file}:<{name}>' (in Python, "
                                                 f"embeddings=[(\"{file}\", \"<{name}>\")])")
        tokens[name], origins[name] = vectors, str(file)
    check_token_shapes(tokens, source)
    return replace(delta, tokens=tokens)


def _check_new_token(name: str, file: Path, tokenizers: Sequence[Any], rename: str) -> None:
    """An embedding file's token must be new to the base's tokenizers (:func:`~mergekit_cd.tokens.check_new`):
    refused naming the file, why it has that name, and ``rename``: how to give it another."""
    by_file = " (AUTOMATIC1111 and kohya name an embedding's token by its file name)" if name == file.stem else ""
    check_new([name], tokenizers, lambda token, _: (
        f"{file}: its token {token} is already in the base model's vocabulary{by_file}; a modifier token must be new: "
        f"{rename}."))


@dataclass(frozen=True)
class OtherLayersUse:
    """Who meets a LoRA's parts beyond the cross-attention K/V, in its refusal's words: what it
    does with the K/V, the choices it offers for the rest, and why text-encoder parts can only
    be dropped."""

    does: str
    choices: str
    text_encoder: str


#: The uses of :func:`settle_other_layers`: loading (:func:`load`, :func:`convert`), a merge's
#: inputs, :func:`mergekit_cd.apply`.
OTHER_LAYERS_USES = {
    "load": OtherLayersUse("a delta is its attn2.to_k / attn2.to_v differences, and the rest is not dropped "
                           "silently", "drop (read the K/V alone), or keep (its UNet modules too, which only a LoRA "
                           "output holds)", "they change the text features a K/V merge is computed on"),
    "merge": OtherLayersUse("the merge solves for attn2.to_k / attn2.to_v alone, and will not drop the rest silently",
                            "drop (merge the K/V alone), or sum / average (carry the UNet modules into a LoRA output "
                            "as the inputs' sum or average)", "they change the text features the merge is computed on"),
    "apply": OtherLayersUse("apply installs attn2.to_k / attn2.to_v alone, and will not drop the rest silently",
                            "drop (install the K/V alone; diffusers' load_lora_weights installs a LoRA's other "
                            "modules)", "apply installs K/V differences and tokens only"),
}


def settle_other_layers(delta: ConceptDelta, rule: str, source: str, use: str = "load") -> tuple[
        ConceptDelta, str | None]:
    """The delta with a LoRA's parts beyond the cross-attention K/V dealt with by ``rule``, and
    what was done in words: refused (one message listing them and the choices of ``use``, an
    entry of :data:`OTHER_LAYERS_USES`), dropped, or its UNet modules kept. Text-encoder parts
    change the features a merge is computed on, so they can only be dropped (with a warning);
    UNet parts no reader can carry are refused for keep."""
    parts = [*delta.other_modules, *delta.unread_parts]
    if not parts:
        return delta, None
    words = OTHER_LAYERS_USES[use]
    text_encoder = [name for name in delta.unread_parts if name.startswith(TEXT_ENCODER_PREFIXES)]
    uncarried = [name for name in delta.unread_parts if name not in text_encoder]
    kinds = describe_parts([*delta.unread_parts, *delta.other_modules])
    if rule == "refuse":
        raise OptionError("{source}: holds parts beyond the UNet's cross-attention K/V ({kinds}; e.g. {examples}); "
                          "{does}. Choose with {other_layers}: {choices}"
                          + ("; its text-encoder parts can only be dropped, as {text_encoder}" if text_encoder else "")
                          + ".", source=source, kinds=kinds, examples=", ".join(natural_order(parts)[:2]),
                          does=words.does, choices=words.choices, text_encoder=words.text_encoder)
    if text_encoder:
        modules = counted(len({part_module(name) for name in text_encoder}), "module")
        warnings.warn(f"{source}: its text-encoder parts ({modules}) are dropped: they change the text "
                      f"features the merge is computed on, so no merge can keep them (the merged file works with "
                      f"the base's text encoders).", stacklevel=3)
    if rule == "keep" and uncarried:
        raise OptionError("{source}: some of its UNet parts cannot be carried (e.g. {examples}: convolutions, or "
                          "names with no diffusers module known here); choose {other_layers} drop.",
                          source=source, examples=", ".join(uncarried[:2]))
    kept = delta.other_modules if rule == "keep" else {}
    modules = f"{counted(len(delta.other_modules), 'UNet module')} beyond the cross-attention K/V"
    what = ", ".join(part for part in (
        (f"{modules} kept" if kept else f"{modules} dropped") if delta.other_modules else "",
        f"{counted(len({part_module(name) for name in uncarried}), 'more UNet module')} dropped" if uncarried else "",
        f"{counted(len({part_module(name) for name in text_encoder}), 'text-encoder module')} dropped"
        if text_encoder else "") if part)
    return replace(delta, other_modules=kept, unread_parts=()), f"{what} ({kinds})"


def _refuse_recorded_architecture(path: Path, base: BaseModel, source: str) -> None:
    """A file too big for ``base`` that records another architecture is refused as what it is
    (an SDXL delta given an SD1 base), from its metadata alone: no tensor is read."""
    try:
        recorded = formats.recorded_provenance(path).architecture
    except MergeError:
        return
    if recorded and recorded != base.architecture.name:
        raise MergeError(f"{source} is an {recorded} delta but {base.name} is an {base.architecture.name} model "
                         f"({base.architecture.description}).")


def base_bound(base: BaseModel) -> BaseBound:
    """The largest K/V weight (or d x d, a merge's stored Gram matrix) and widest token embedding of
    ``base``, and what one file for it can hold in all: four times its K/V weights (the authors'
    crossattn files add q and out), tokens, and the statistics of a merge of the most rows one
    merge may solve."""
    sizes = [math.prod(shape) for pair in base.kv_shapes().values() for shape in pair]
    d = base.context_dim
    rows = sum(shape[0] for pair in base.kv_shapes().values() for shape in pair)
    statistics = d * d + MAX_SOLVED_ROWS * (rows + d)
    return BaseBound(base.name, max(*sizes, d * d), max(base.token_dims()),
                     4 * sum(sizes) + MAX_TOKENS * sum(base.token_dims()) + statistics)


def resolve_delta(reference: PathLike) -> Path:
    """A local file/folder, or a delta fetched (its files only) from a hub repo through the cache.

    A repo id (``org/name[@revision]``) stands for the delta files at the top of the repo;
    ``org/name[@revision]:path/in/repo`` for the one file or folder it names (a repo holding
    several deltas). A missing path that looks like one (an extension of a delta file, ``./``,
    ``~``, absolute, or more than one ``/``) is "no such file", never taken for a repo id. A
    folder that is not itself a delta (e.g. a repo holding ``concept.safetensors``) stands for
    the one delta file inside it.
    """
    path = Path(reference).expanduser()
    from_hub = not path.exists()
    if from_hub:
        path = _fetch_delta(str(reference))
    if not path.is_dir() or any(module.detect(path) for module in formats.FORMATS):
        return path
    inside = sorted(p for p in path.iterdir() if p.is_file() and any(m.detect(p) for m in formats.FORMATS))
    if len(inside) == 1:
        return inside[0]
    if len(inside) > 1:
        how = f"{hub.split_path(str(reference))[0]}:<file>" if from_hub else "its path"
        raise MergeError(f"{reference} holds several deltas ({', '.join(p.name for p in inside)}); "
                         f"name the one you mean ({how}).")
    if from_hub and hub.split_path(str(reference))[1] is None:
        found = sorted(entry.name for entry in path.iterdir())
        raise MergeError(f"The Hugging Face repo {reference} has no delta at its top level (found "
                         f"{found[:6] if found else 'nothing'}); for a delta in a subfolder, name it: "
                         f"{reference}:path/in/repo.")
    return path  # let the format layer say what it found there


def _fetch_delta(reference: str) -> Path:
    """The delta files of a hub repo (top level), or the file or folder ``org/name:path`` names."""
    repo, inside = hub.split_path(reference)
    if _looks_like_a_path(repo):
        raise MergeError(f"{reference}: no such file or folder.")
    if inside is None:
        return hub.resolve(repo, allow_patterns=DELTA_FILE_PATTERNS, ignore_patterns=["*/*"])
    snapshot = hub.resolve(repo, allow_patterns=[inside, *(f"{inside}/{p}" for p in DELTA_FILE_PATTERNS)],
                           ignore_patterns=[f"{inside}/*/*"])
    if not (snapshot / inside).exists():
        raise hub.missing_files_error(repo, snapshot, [inside], what="delta repo")
    return snapshot / inside


def _looks_like_a_path(reference: str) -> bool:
    """True for what only a file path would be written as, never a repo id (``org/name``)."""
    return (reference.startswith((".", "~", "/", "\\")) or Path(reference).is_absolute()
            or reference.count("/") > 1 or reference.lower().endswith(DELTA_SUFFIXES))


def _with_base_identity(content: FineTunedWeights, base: BaseModel, source: str,
                        check_base: bool) -> FineTunedWeights:
    """Full weights are differences against the base they were trained from: record which."""
    if content.base_fingerprint and content.base_fingerprint != base.fingerprint and check_base:
        raise MergeError(_wrong_base_message(source, content.base, content.base_fingerprint, base))
    content.base = content.base or base.name
    content.base_fingerprint = base.fingerprint
    content.architecture = content.architecture or base.architecture.name
    return content


def _wrong_base_message(source: str, made_for: str | None, fingerprint: str, base: BaseModel) -> str:
    return (f"{source} was made for another base model ({made_for or 'unnamed'}, fingerprint "
            f"{fingerprint[:12]}) than {base.name} (fingerprint {base.fingerprint[:12]}); use that "
            f"base, or pass --no-base-check if you know they are equivalent.")


def check_delta(delta: ConceptDelta, base: BaseModel, source: str, *, check_base: bool = True,
                fit: bool = True) -> None:
    """Refuse a delta that does not fit ``base``: one MergeError naming the source and problem
    (``fit=False``: only its architecture and recorded base, when its layers were fitted already)."""
    if delta.architecture and delta.architecture != base.architecture.name:
        raise MergeError(f"{source} is an {delta.architecture} delta but {base.name} is an "
                         f"{base.architecture.name} model ({base.architecture.description}).")
    if check_base and delta.base_fingerprint and delta.base_fingerprint != base.fingerprint:
        raise MergeError(_wrong_base_message(source, delta.base, delta.base_fingerprint, base))
    if not fit:
        return
    check_fits(delta, fit_target(base), source)


@dataclass(frozen=True)
class FitTarget:
    """What a delta must fit, as data: the ``to_k`` shape of each cross-attention layer, the
    text-feature width and each text encoder's width of a base or a loaded pipeline. ``name``
    and ``owner`` name it in messages (``sd15`` and ``the base``, ``this pipeline`` and ``the
    pipeline``)."""

    name: str
    owner: str
    architecture: str
    key_shapes: Mapping[str, tuple[int, ...]]
    context_dim: int
    token_dims: tuple[int, ...]


def fit_target(base: BaseModel) -> FitTarget:
    """What a delta used with ``base`` must fit (read from its headers and configs, no weights)."""
    return FitTarget(base.name, "the base", base.architecture.name,
                     {name: tuple(key) for name, (key, _) in base.kv_shapes().items()}, base.context_dim,
                     base.token_dims())


def check_fits(content: ConceptDelta | FineTunedWeights, target: FitTarget, source: str) -> None:
    """The one fit rule: layers, shapes and token sizes of a delta or weight file against ``target``
    (:func:`load` checks it against the base, :func:`mergekit_cd.apply` against the pipeline)."""
    key_shapes = {name: tuple(key) for name, (key, _) in
                  (layer_shapes(content.layers) if isinstance(content, ConceptDelta) else content.shapes()).items()}
    expected = target.key_shapes
    widths = {shape[1] for shape in key_shapes.values()}
    if widths and widths != {target.context_dim}:
        raise MergeError(f"{source} was made for a model whose text features have {sorted(widths)[0]} "
                         f"dimensions, but {target.name} ({target.architecture}) uses {target.context_dim}: "
                         f"wrong architecture.")
    missing = sorted(set(expected) - set(key_shapes))
    if missing:
        raise MergeError(f"{source} is missing {len(missing)} of {len(expected)} cross-attention "
                         f"layers of {target.name}, e.g. {missing[0]}.")
    extra = sorted(set(key_shapes) - set(expected))
    if extra:
        raise MergeError(f"{source} has layers that {target.name} does not have, e.g. {extra[0]}.")
    for name, shape in key_shapes.items():
        if shape != tuple(expected[name]):
            raise MergeError(f"{source}: layer {name} has shape {shape}, but {target.owner}'s is "
                             f"{tuple(expected[name])}.")
    check_token_sizes(content.tokens, target.token_dims, target.name, source)


def check_token_sizes(tokens: Mapping, dims: tuple[int, ...], name: str, source: str) -> None:
    """Each token's embedding sizes against the text encoders' widths ``dims`` of ``name``."""
    for token, embeddings in tokens.items():
        got = tuple(e.shape[0] for e in embeddings)
        if got != dims:
            raise MergeError(f"{source}: token {token} has embedding sizes {got}, but the text "
                             f"encoder(s) of {name} need {dims}.")


def save(delta: ConceptDelta, path: PathLike, *, format: str | None = None,
         base: BaseModel | PathLike | None = None, force: bool = False, lora_rtol: float = LORA_RTOL) -> Path:
    """Write ``delta`` in ``format``, or the format the name tells (:func:`formats.output_format`:
    ``.safetensors`` native, ``.bin`` authors-bin, ``.ckpt`` compvis, no extension a diffusers folder).

    Full-weight formats (diffusers, authors' files) need the base to add the differences to;
    a compressed (low-rank) delta goes to the authors' compressed variants as it is. The LoRA
    formats get every difference factored (:func:`~mergekit_cd.delta.factorize`: exactly when it
    is low rank, else within ``lora_rtol``). The write is atomic and refuses to replace an
    existing output unless ``force``.
    """
    path = Path(path)
    name = formats.output_format(path, format)
    module = formats.get_format(name)
    formats.check_can_hold(name, delta.architecture, path)
    formats.check_holds_other_modules(name, list(delta.other_modules), path)
    compressed = any(isinstance(part, LowRank) for layer in delta.layers.values()
                     for part in (layer.key, layer.value))
    if module.FACTORS_ONLY:
        delta = factorize(delta, lora_rtol)[0]
    if module.WRITES_FULL_WEIGHTS and not (compressed and module.STORES_FACTORS):
        if base is None:
            raise MergeError(f"Writing the {name} format stores full weights: give the base model (--base).")
        base = as_base(base)
        check_delta(delta, base, "the delta to write")
        content = FineTunedWeights.from_delta(delta, base.kv)
    else:
        content = delta
    formats.write(content, path, name, force=force)
    return path


def convert(source: PathLike, output: PathLike, to: str | None = None, *,
            base: BaseModel | PathLike | None = None, compress_rtol: float | None = None,
            force: bool = False, check_base: bool = True, lora_rtol: float = LORA_RTOL,
            other_layers: str = "refuse") -> CompressionReport | None:
    """Read ``source`` in any format and write it as ``to`` (default: told by the output's
    name, as :func:`save` tells it), optionally compressed first; returns the report of the
    compression, or of the factoring a LoRA format needs (``lora_rtol``, see :func:`save`).
    ``other_layers``: :func:`load`'s rule for a LoRA's parts beyond the cross-attention K/V;
    ``keep`` only into a LoRA layout, the only ones that hold them.

    The output is checked (format, destination, architecture, the rule) before the input is read.
    """
    to = formats.output_format(output, to)
    if other_layers not in OTHER_LAYERS_ON_LOAD:
        raise MergeError(f"other_layers {other_layers!r}: choose one of {', '.join(OTHER_LAYERS_ON_LOAD)}.")
    if other_layers == "keep" and not formats.get_format(to).HOLDS_OTHER_MODULES:
        holders = " or ".join(module.NAME for module in formats.FORMATS if module.HOLDS_OTHER_MODULES)
        raise OptionError("{other_layers} keep carries a LoRA's UNet modules beyond the cross-attention K/V into the "
                          "output, and {output} is written as {format}, which holds the K/V alone; write a LoRA "
                          "({holders}), or choose {other_layers} drop.", output=output, format=to, holders=holders)
    if compress_rtol is not None and not 0 <= compress_rtol < 1:
        raise MergeError(f"--compress {compress_rtol:g}: the relative error bound must be in [0, 1).")
    if compress_rtol is not None and not formats.get_format(to).STORES_FACTORS:
        others = [module.NAME for module in formats.FORMATS if module.STORES_FACTORS]
        raise MergeError(f"--compress: the {to} layout stores full weights, so it has no compressed "
                         f"variant (nothing would shrink); compress to {', '.join(others[:-1])} or {others[-1]} "
                         "instead.")
    base = as_base(base) if base is not None else None
    formats.check_output(output, to, architecture=base.architecture.name if base else None, force=force,
                         inputs=[source, *([base.path] if base else [])])
    delta = load(source, base=base, check_base=check_base, other_layers=other_layers)
    formats.check_can_hold(to, delta.architecture, output)
    report = None
    if compress_rtol is not None:  # native stores a matrix dense when its factors would be bigger;
        # the authors' compressed variants store factors only
        delta, report = compress(delta, rtol=compress_rtol,
                                 dense_fallback=not formats.get_format(to).WRITES_FULL_WEIGHTS)
    if formats.get_format(to).FACTORS_ONLY:
        delta, report = factorize(delta, lora_rtol)
    save(delta, output, format=to, base=base, force=force)
    return report
