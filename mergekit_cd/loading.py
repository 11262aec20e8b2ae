"""``load`` and ``save``: files (or hub repos) <-> validated :class:`ConceptDelta` objects.

Formats only parse and serialise; this module turns full fine-tuned weights into differences
against the base, and checks that a delta fits the base it is used with: architecture, base
fingerprint, layer coverage, shapes and token sizes.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

from . import formats, hub
from .base import BaseModel, open_base
from .delta import CompressionReport, ConceptDelta, LowRank, compress, factorize, layer_shapes, LORA_RTOL
from .errors import MergeError
from .fileio import parse_once
from .limits import MAX_CONSTRAINT_ROWS, MAX_TOKENS, BaseBound, BaseBoundError, within_base
from .weights import FineTunedWeights

PathLike = str | os.PathLike[str]

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


#: The format of a delta given in memory rather than as a file.
IN_MEMORY = "object"


def load(reference: PathLike | ConceptDelta, *, base: BaseModel | PathLike | None = None,
         check_base: bool = True) -> ConceptDelta:
    """Read a delta in any supported format (local path or hub repo id) and validate it.

    Files that hold full fine-tuned weights need ``base`` to become differences. With a base,
    the delta is checked against it; ``check_base=False`` accepts a delta whose recorded base
    fingerprint differs (for experts who know the bases are equivalent). A delta given in
    memory is never changed: what the base adds (its fingerprint, name) goes to a copy.
    """
    return load_source(reference, base=base, check_base=check_base).delta


def load_source(reference: PathLike | ConceptDelta, *, base: BaseModel | PathLike | None = None,
                check_base: bool = True, source: str | None = None) -> LoadedDelta:
    """:func:`load`, keeping what it learned on the way: the resolved path and the format (the
    file is resolved, detected and read once, with one parse). ``source`` names the input in
    messages (default: the reference as given)."""
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
                read_as, content = formats.read_detected(path)
        except BaseBoundError:
            _refuse_recorded_architecture(resolve_delta(reference), as_base(base), source)
            raise
        if isinstance(content, FineTunedWeights):
            if base is None:
                raise MergeError(f"{source} holds full fine-tuned weights; give the base model they "
                                 f"were trained from (--base) to turn them into differences.")
            base = as_base(base)
            check_fits(content.layers.keys(), {k: v[0] for k, v in content.shapes().items()},
                       content.tokens, base, source)
            content = _with_base_identity(content, base, source, check_base)
            delta = content.to_delta(base.kv)
        else:
            delta = content
        delta.metadata.setdefault("source", source)
    if base is not None:
        base = as_base(base)
        # full weights were fitted to the base before they became differences
        check_delta(delta, base, source, check_base=check_base, fit=not isinstance(content, FineTunedWeights))
        if delta.base_fingerprint is None:
            delta.base_fingerprint = base.fingerprint
            delta.base = delta.base or base.name
        delta.architecture = delta.architecture or base.architecture.name
    return LoadedDelta(source, path, read_as, delta)


def _refuse_recorded_architecture(path: Path, base: BaseModel, source: str) -> None:
    """A file too big for ``base`` that records another architecture is refused as what it is
    (an SDXL delta given an SD1 base), from its metadata alone: no tensor is read."""
    try:
        recorded = formats.recorded_identity(path).get("architecture")
    except MergeError:
        return
    if recorded and recorded != base.architecture.name:
        raise MergeError(f"{source} is an {recorded} delta but {base.name} is an {base.architecture.name} model "
                         f"({base.architecture.description}).")


def base_bound(base: BaseModel) -> BaseBound:
    """The largest K/V weight (or d x d, a merge's stored Gram matrix) and widest token embedding of
    ``base``, and what one file for it can hold in all: four times its K/V weights (the authors'
    crossattn files add q and out), tokens, and the statistics of a merge of the most constraint
    rows one merge may have."""
    sizes = [math.prod(shape) for pair in base.kv_shapes().values() for shape in pair]
    d = base.context_dim
    rows = sum(shape[0] for pair in base.kv_shapes().values() for shape in pair)
    statistics = d * d + MAX_CONSTRAINT_ROWS * (rows + d)
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
    shapes = {name: key for name, (key, _) in layer_shapes(delta.layers).items()}
    check_fits(delta.layers.keys(), shapes, delta.tokens, base, source)


def check_fits(layer_names, key_shapes: dict, tokens: dict, base: BaseModel, source: str) -> None:
    """Layers, shapes and token sizes of a delta or weight file against the base."""
    expected = base.kv_shapes()
    context = base.context_dim
    widths = {tuple(shape)[1] for shape in key_shapes.values()}
    if widths and widths != {context}:
        raise MergeError(f"{source} was made for a model whose text features have {sorted(widths)[0]} "
                         f"dimensions, but {base.name} ({base.architecture.name}) uses {context}: "
                         f"wrong architecture.")
    missing = sorted(set(expected) - set(layer_names))
    if missing:
        raise MergeError(f"{source} is missing {len(missing)} of {len(expected)} cross-attention "
                         f"layers of {base.name}, e.g. {missing[0]}.")
    extra = sorted(set(layer_names) - set(expected))
    if extra:
        raise MergeError(f"{source} has layers that {base.name} does not have, e.g. {extra[0]}.")
    for name, shape in key_shapes.items():
        if tuple(shape) != tuple(expected[name][0]):
            raise MergeError(f"{source}: layer {name} has shape {tuple(shape)}, but the base's is "
                             f"{tuple(expected[name][0])}.")
    dims = base.token_dims()
    for token, embeddings in tokens.items():
        got = tuple(e.shape[0] for e in embeddings)
        if got != dims:
            raise MergeError(f"{source}: token {token} has embedding sizes {got}, but the text "
                             f"encoder(s) of {base.name} need {dims}.")


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
            force: bool = False, check_base: bool = True,
            lora_rtol: float = LORA_RTOL) -> CompressionReport | None:
    """Read ``source`` in any format and write it as ``to`` (default: told by the output's
    name, as :func:`save` tells it), optionally compressed first; returns the report of the
    compression, or of the factoring a LoRA format needs (``lora_rtol``, see :func:`save`).

    The output is checked (format, destination, architecture) before the input is read.
    """
    to = formats.output_format(output, to)
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
    delta = load(source, base=base, check_base=check_base)
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
