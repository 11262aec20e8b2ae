"""Checks and helpers the format modules share: structure validation with messages that name
the file and the key, reading layers back one at a time, our metadata in pickles, cheap sniffing
for ``detect``, and tensors ready to be saved.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..delta import ConceptDelta, Difference, LayerDelta, LazyLayers, LowRank, Provenance, check_token_name
from ..errors import MergeError
from ..fileio import MappedPages, SafetensorsFile, check_unchanged, file_identity, load_pickle, open_safetensors
from ..limits import MAX_TOKENS, check_embedding_size, check_limit, check_tensor_size
from ..metadata import HEADER_KEY, dump_document, parse_document, provenance_from_metadata
from ..weights import FineTunedWeights

Delta = ConceptDelta | FineTunedWeights
#: A layer's (to_k, to_v) as a file stores them: full matrices, or factors of differences.
Pair = tuple[Difference, Difference]
#: The top-level entry of our ``.bin`` / ``.ckpt`` pickles holding the metadata document as one
#: JSON string (the authors' scripts read only their own keys, so they ignore it).
METADATA_KEY = HEADER_KEY
# Per layer, the weights of the attention projections a K/V merge does not use; kept as names.
IGNORED_SUFFIXES = (".to_q.weight", ".to_out.0.weight", ".to_out.0.bias")


# ---------------------------------------------------------------- describing what was found
def describe(value: Any) -> str:
    """A short description of a value found where a tensor was expected."""
    if isinstance(value, Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def describe_container(value: Any) -> str:
    """A short description of a loaded file's top-level structure."""
    if isinstance(value, dict):
        return f"a dict with keys {natural_order(map(str, value))[:6]}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} items"
    return describe(value)


def natural_order(names: Any) -> list[str]:
    """Names sorted with their numbers compared as numbers: <new2> before <new10>."""
    return sorted(names, key=lambda name: [int(part) if part.isdigit() else part
                                           for part in re.split(r"(\d+)", name)])


# ---------------------------------------------------------------- checking what was found
_VALUES_ON_READ: ContextVar[bool] = ContextVar("mergekit_cd_values_on_read", default=False)


@contextmanager
def values_checked_on_read() -> Iterator[None]:
    """Within, a reader whose layers are read back one at a time checks their structure now (keys,
    shapes, dtypes: from a safetensors header or a pickle's records, no tensor data read) and their
    values (finiteness) as each layer is read: a merge reads every byte of its inputs' tensors
    once, its validation, its solve and its recipe hash sharing that read. A non-finite value is then one
    MergeError naming the file and key while the merge runs, before anything is written.
    Everything a reader keeps (tokens, a merge's statistics but their per-layer changes, the
    layers of a file read whole) is checked now, as outside the scope."""
    token = _VALUES_ON_READ.set(True)
    try:
        yield
    finally:
        _VALUES_ON_READ.reset(token)


def checking_values_on_read() -> bool:
    """Whether a reader starting now leaves value checks to its layer reads (:func:`values_checked_on_read`)."""
    return _VALUES_ON_READ.get()


def check_finite(tensor: Tensor, key: str, source: str) -> None:
    """No NaN or infinity in ``tensor``, its size bounded first: a pickled tensor is a view of a
    mapped file, so this is the first time its data is touched. A NaN or infinity makes the sum
    non-finite, and a sum reads the data without writing a mask of its size (3x faster); only a
    non-finite sum (or one that overflowed) is looked at element by element. Detached first: the
    peers pickle their tensors requiring grad."""
    check_tensor_size(tuple(tensor.shape), key, source)
    tensor = tensor.detach()
    if not math.isfinite(float(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
        raise MergeError(f"{source}: {key} holds NaN or infinite values.")


def check_matrix(value: Any, key: str, source: str, *, factor: bool = False, values: bool = True) -> Tensor:
    """``value`` as a finite 2-D float tensor, or one MergeError naming the file and key. A weight
    or difference has rows and columns; a low-rank ``factor`` may have rank 0 (``compress`` gives
    an all-zero difference factors of shapes (out, 0) and (0, in)). ``values=False``: its
    structure only, its data not touched (finiteness is checked when it is read,
    :func:`check_values`; ``value`` may be a stand-in)."""
    if (not isinstance(value, Tensor) or value.dim() != 2 or not value.is_floating_point()
            or not (value.numel() or factor)):
        raise MergeError(f"{source}: {key} should be a 2-D float weight matrix, found {describe(value)}.")
    check_tensor_size(tuple(value.shape), key, source)
    if values:
        check_finite(value, key, source)
    return value


def check_vector(value: Any, key: str, source: str) -> Tensor:
    """``value`` as a finite 1-D float embedding (a ``[1, d]`` row is accepted and flattened),
    returned as a :func:`plain_copy`: the peers' tools save a row of the whole embedding table
    (a view would keep the table and the mapped file), often with ``requires_grad=True``."""
    if isinstance(value, Tensor) and value.dim() == 2 and value.shape[0] == 1:
        value = value[0]
    if isinstance(value, Tensor) and value.dim() == 2 and value.is_floating_point():
        raise MergeError(f"{source}: token embedding {key} holds {value.shape[0]} vectors; a Custom Diffusion "
                         f"token is one (a multi-vector textual inversion cannot be merged as one token).")
    if not isinstance(value, Tensor) or value.dim() != 1 or not value.is_floating_point():
        raise MergeError(f"{source}: token embedding {key} should be a 1-D float vector, found "
                         f"{describe(value)}.")
    check_embedding_size(value.numel(), key, source)
    copy = plain_copy(value)  # checked in memory: a mapped file's bytes are read once
    check_finite(copy, key, source)
    return copy


def plain(tensor: Tensor) -> Tensor:
    """``tensor`` as data only: detached from autograd. The authors' ``delta.bin`` and diffusers'
    ``--no_safe_serialization`` output pickle tensors with ``requires_grad=True``; every tensor
    that leaves a reader passes here, so nothing downstream meets a grad-requiring tensor."""
    return tensor.detach()


def plain_copy(tensor: Tensor) -> Tensor:
    """A detached copy owning only its own elements (not the storage it was a view into)."""
    return tensor.detach().clone(memory_format=torch.contiguous_format)


def check_factors(factors: Any, key: str, source: str, *, values: bool = True) -> LowRank:
    """A compressed entry ``{"u": U S, "v": Vh}`` as a LowRank difference (``values``: as
    :func:`check_matrix`)."""
    if not isinstance(factors, dict) or set(factors) != {"u", "v"}:
        found = f"keys {sorted(map(str, factors))}" if isinstance(factors, dict) else describe(factors)
        raise MergeError(f"{source}: {key} should be compressed factors {{'u', 'v'}}, found {found}.")
    up = check_matrix(factors["u"], f"{key}['u']", source, factor=True, values=values)
    down = check_matrix(factors["v"], f"{key}['v']", source, factor=True, values=values)
    if up.shape[1] != down.shape[0]:
        raise MergeError(f"{source}: {key} factors do not fit: u is {tuple(up.shape)}, v is "
                         f"{tuple(down.shape)}.")
    return LowRank(up, down)


# ---------------------------------------------------------------- building the result
def check_entry(value: Any, key: str, source: str, *, values: bool = True) -> Difference:
    """A stored to_k/to_v entry: a full matrix, or compressed factors ``{"u", "v"}`` (``values``: as
    :func:`check_matrix`)."""
    return check_factors(value, key, source, values=values) if isinstance(value, dict) \
        else check_matrix(value, key, source, values=values)


def check_values(entry: Difference, key: str, source: str) -> Difference:
    """A to_k/to_v entry, as read, checked finite as :func:`check_entry` checks a stored one
    (factors named ``key['u']`` and ``key['v']``): the check of a layer read after its structure
    was validated (:func:`values_checked_on_read`)."""
    if isinstance(entry, LowRank):
        check_finite(entry.up, f"{key}['u']", source)
        check_finite(entry.down, f"{key}['v']", source)
    else:
        check_finite(entry, key, source)
    return entry


def stand_in(entry: Difference) -> Difference:
    """``entry`` without data (shape and dtype on the meta device): what the validation pass
    keeps, so it holds no view into a memory-mapped file."""
    if isinstance(entry, LowRank):
        return LowRank(stand_in(entry.up), stand_in(entry.down))
    return torch.empty(entry.shape, dtype=entry.dtype, device="meta")


@dataclass
class LayerCollector:
    """Gathers a file's to_k/to_v entries per layer, then checks they form whole layers.

    Only the entries' shapes and dtypes are kept (:func:`stand_in`), with the key each came from.
    """

    source: str
    found: dict[str, dict[str, tuple[str, Difference]]] = field(default_factory=dict)

    def add(self, layer: str, projection: str, key: str, value: Difference) -> None:
        """Record ``value`` (already checked) as ``projection`` ("to_k"/"to_v") of ``layer``."""
        entries = self.found.setdefault(layer, {})
        if projection in entries:
            raise MergeError(f"{self.source}: {key} and {entries[projection][0]} both hold "
                             f"{projection} of layer {layer}.")
        entries[projection] = (key, stand_in(value))

    def layers(self, *, allow_empty: bool = False) -> dict[str, Pair]:
        """layer -> (to_k, to_v) stand-ins; every layer complete, shapes consistent across layers."""
        if not self.found and not allow_empty:
            raise MergeError(f"{self.source}: holds no cross-attention to_k/to_v weights.")
        first_key, context = None, None
        result = {}
        for layer, entries in self.found.items():
            for projection, other in (("to_k", "to_v"), ("to_v", "to_k")):
                if projection not in entries:
                    raise MergeError(f"{self.source}: layer {layer} has {other} but no {projection}.")
            (key_name, key), (value_name, value) = entries["to_k"], entries["to_v"]
            if key.shape != value.shape:
                raise MergeError(f"{self.source}: {key_name} has shape {tuple(key.shape)} but "
                                 f"{value_name} has shape {tuple(value.shape)}.")
            if context is None:
                first_key, context = key_name, key.shape[1]
            if key.shape[1] != context:
                raise MergeError(f"{self.source}: {key_name} reads {key.shape[1]} features but "
                                 f"{first_key} reads {context}.")
            result[layer] = (key, value)
        return result

    def keys(self) -> dict[str, tuple[str, str]]:
        """layer -> (to_k key, to_v key) in the file, once :meth:`layers` found the layers whole."""
        self.layers()
        return {layer: (entries["to_k"][0], entries["to_v"][0]) for layer, entries in self.found.items()}


def check_token_shapes(tokens: dict[str, tuple[Tensor, ...]], source: str) -> None:
    """Every token name follows the one rule (:func:`~mergekit_cd.delta.check_token_name`), and all
    tokens have the same number of embeddings with the same sizes; at most
    :data:`~mergekit_cd.limits.MAX_TOKENS` of them."""
    check_token_count(len(tokens), source)
    for name in tokens:
        check_token_name(name, source)
    shapes = {name: tuple(e.numel() for e in embeddings) for name, embeddings in tokens.items()}
    first = next(iter(shapes.items()), None)
    for name, shape in shapes.items():
        if shape != first[1]:
            raise MergeError(f"{source}: token {name} has embedding sizes {shape} but {first[0]} "
                             f"has {first[1]}.")


def check_token_count(count: int, source: str) -> None:
    """At most :data:`~mergekit_cd.limits.MAX_TOKENS` tokens; readers check before reading any
    (each row is copied out of the file)."""
    check_limit(count, MAX_TOKENS, "it holds {count} tokens", source)


def unexpected_key(key: str, source: str, expected: str) -> MergeError:
    return MergeError(f"{source}: unexpected key {key!r}; expected {expected}.")


def split_layer_key(key: str, suffixes: dict[str, str]) -> tuple[str, str] | None:
    """(layer, projection) when ``key`` ends with one of ``suffixes`` (suffix -> projection)."""
    for suffix, projection in suffixes.items():
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], projection
    return None


def assemble(collector: LayerCollector, read_layer: Callable[[str], Pair], *, lazy: bool,
             tokens: dict[str, tuple[Tensor, ...]], ignored: list[str], source: str,
             provenance: Provenance) -> Delta:
    """FineTunedWeights when the file holds full matrices, ConceptDelta when it holds factors.

    ``collector`` holds what the validation pass found; the layers are read through
    ``read_layer`` when used (``lazy``: :class:`LazyLayers`), or now and kept (a file that
    cannot be read a layer at a time). ``provenance``: what the file's metadata records.
    A ConceptDelta has no ``ignored`` field, so the names of ignored weights go to its
    ``metadata["ignored"]`` (the file's own list, not one its metadata recorded).
    """
    checked = collector.layers()
    check_token_shapes(tokens, source)
    compressed = {isinstance(x, LowRank) for pair in checked.values() for x in pair}
    if compressed == {True, False}:
        raise MergeError(f"{source}: mixes full weight matrices and compressed differences; a file "
                         f"holds one or the other.")
    shapes = {layer: (key.shape, value.shape) for layer, (key, value) in checked.items()}
    metadata = {key: value for key, value in provenance.metadata.items() if key != "ignored"}
    if compressed == {True}:
        layers: Mapping[str, Any] = LazyLayers(shapes, lambda layer: LayerDelta(*read_layer(layer))) if lazy \
            else {layer: LayerDelta(*read_layer(layer)) for layer in shapes}
        return ConceptDelta.with_provenance(layers, tokens, replace(provenance, metadata={
            **metadata, **({"ignored": ignored} if ignored else {})}))
    layers = LazyLayers(shapes, read_layer) if lazy else {layer: read_layer(layer) for layer in shapes}
    return FineTunedWeights.with_provenance(layers, tokens, replace(provenance, metadata=metadata),
                                            ignored=tuple(ignored))


# ---------------------------------------------------------------- reading a layer at a time
class PickleFile:
    """A torch pickle opened once, for validation and for reading its layers.

    Zip-format files (what ``torch.save`` has written since torch 1.6) are memory-mapped, so
    the validation pass holds one tensor at a time, and each layer is copied out of the same
    mapping when used: the file is parsed once, however many layers it holds (parsing it again
    per layer made a 175 KB file of 250 layers take 40 s). Older non-zip pickles cannot be
    mapped; they are read whole. ``values_on_read``: the reader checks each layer's values as it
    copies it (:func:`values_checked_on_read`), and the format's validation pass leaves them alone.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = path
        try:
            self.identity: tuple[int, int, int] | None = file_identity(path)
        except OSError:
            self.identity = None  # load_pickle says what is wrong with the path
        self.contents: Any = load_pickle(path, mmap=True)  # mapped if it is a zip, else read whole
        self.mapped = zipfile.is_zipfile(path)
        self.pages = MappedPages(path) if self.mapped else None
        self.values_on_read = checking_values_on_read()

    def release(self, value: Any) -> None:
        """Hand back the mapped pages of ``value``'s tensors once validated or copied
        (:class:`~mergekit_cd.fileio.MappedPages`): the file is held about a tensor at a time."""
        if self.pages is not None:
            self.pages.release(_tensors(value))

    def reader(self, container: tuple[str, ...], keys: dict[str, tuple[str, str]]) -> Callable[[str], Pair]:
        """layer -> (to_k, to_v) entries found under ``keys`` in ``contents[container...]``, copies
        owning their memory where the file is mapped (checked unchanged before each read), their
        values checked in memory when :attr:`values_on_read`; each layer's mapped pages are handed
        back once copied (:meth:`release`)."""
        held = _inside(self.contents, container)
        source = str(self.path)

        def read(layer: str) -> Pair:
            if self.mapped:
                check_unchanged(self.path, self.identity)
            entries = tuple(_entry(held[key], copy=self.mapped) for key in keys[layer])
            if self.values_on_read:
                for key, entry in zip(keys[layer], entries):
                    check_values(entry, key, source)
            if self.mapped:
                self.release([held[key] for key in keys[layer]])
            return entries
        return read


def _tensors(contents: Any) -> Iterator[Tensor]:
    """Every tensor in nested dicts and lists."""
    if isinstance(contents, Tensor):
        yield contents
    elif isinstance(contents, dict):
        for value in contents.values():
            yield from _tensors(value)
    elif isinstance(contents, (list, tuple)):
        for value in contents:
            yield from _tensors(value)


class SafetensorsLayers:
    """Reads one layer's (to_k, to_v) back from a validated safetensors file (its header parsed
    once, when it was validated; the file checks it is unchanged); ``values_on_read``: their
    values checked as they are read (:func:`values_checked_on_read`)."""

    def __init__(self, handle: SafetensorsFile, keys: dict[str, tuple[str, str]], values_on_read: bool) -> None:
        self.handle, self.keys, self.values_on_read = handle, keys, values_on_read

    def __call__(self, layer: str) -> Pair:
        pair = tuple(self.handle.read(key) for key in self.keys[layer])
        if self.values_on_read:
            for key, tensor in zip(self.keys[layer], pair):
                check_values(tensor, key, str(self.handle.path))
        return pair


def _inside(contents: Any, container: tuple[str, ...]) -> Any:
    for part in container:
        contents = contents[part]
    return contents


def _entry(value: Any, *, copy: bool = False) -> Difference:
    """A stored entry as a tensor or LowRank (checked before), :func:`plain`; ``copy``: owning
    its memory."""
    if isinstance(value, dict):
        return LowRank(_entry(value["u"], copy=copy), _entry(value["v"], copy=copy))
    return plain_copy(value) if copy else plain(value)


# ---------------------------------------------------------------- our metadata in pickles
def metadata_entry(obj: Delta, **extra: Any) -> str:
    """``obj``'s metadata document (and ``extra`` fields) as the JSON string stored under
    :data:`METADATA_KEY`; checked before anything is written."""
    return dump_document(obj, **extra)


def read_metadata(contents: dict[Any, Any], source: str) -> Provenance:
    """The provenance a pickle's :data:`METADATA_KEY` entry records; the empty one for a file
    without one (the authors' own files)."""
    if METADATA_KEY not in contents:
        return Provenance()
    value = contents[METADATA_KEY]
    if not isinstance(value, str):
        raise MergeError(f"{source}: {METADATA_KEY!r} should hold mergekit-cd's metadata as a JSON string, "
                         f"found {describe(value)}.")
    return provenance_from_metadata(parse_document(value, source=source, where=repr(METADATA_KEY)), source=source)


# ---------------------------------------------------------------- writing
def full_weights(obj: Delta, path: str | os.PathLike[str], format_name: str) -> FineTunedWeights:
    """``obj`` when it holds full weights; a ConceptDelta is refused (no base is known here)."""
    if not isinstance(obj, FineTunedWeights):
        raise MergeError(f"Cannot write {path} as {format_name}: the format holds full fine-tuned "
                         f"weights but this is a {type(obj).__name__} (differences); make full "
                         f"weights against the base with FineTunedWeights.from_delta first.")
    return obj


def stored_entries(obj: Delta, path: str | os.PathLike[str],
                   format_name: str) -> dict[str, dict[str, Tensor | dict[str, Tensor]]]:
    """layer -> {"to_k": entry, "to_v": entry} as the authors' pickles store them: full
    matrices for FineTunedWeights, ``{"u": up, "v": down}`` for a compressed ConceptDelta.
    """
    if isinstance(obj, FineTunedWeights):
        return {name: {"to_k": owned(key), "to_v": owned(value)}
                for name, (key, value) in obj.layers.items()}
    entries: dict[str, dict[str, Tensor | dict[str, Tensor]]] = {}
    for name, layer in obj.layers.items():
        for projection, difference in (("to_k", layer.key), ("to_v", layer.value)):
            if not isinstance(difference, LowRank):
                raise MergeError(f"Cannot write {path} as {format_name}: its compressed variant "
                                 f"stores low-rank factors, but layer {name} holds a dense "
                                 f"difference; compress the delta first (mergekit_cd.compress) or "
                                 f"write full weights (FineTunedWeights.from_delta).")
            entries.setdefault(name, {})[projection] = {"u": owned(difference.up),
                                                        "v": owned(difference.down)}
    return entries


def owned(tensor: Tensor) -> Tensor:
    """A contiguous CPU tensor owning exactly its storage (a saved view would store it all)."""
    tensor = tensor.detach().cpu()
    storage = tensor.untyped_storage()
    whole = (tensor.is_contiguous() and tensor.storage_offset() == 0
             and storage.nbytes() == tensor.numel() * tensor.element_size())
    return tensor if whole else tensor.clone(memory_format=torch.contiguous_format)


def saveable(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Tensors safetensors accepts (contiguous CPU tensors, no two overlapping), copying only what
    must be. safetensors writes a tensor's own bytes, not its storage, and accepts disjoint views
    of one storage: a merge's K and V of a layer are the halves of one tensor, and copying them
    (as :func:`owned` does for a pickle, which would store the whole storage) held the result
    twice while it was written (1.27 GiB for SDXL). A tensor overlapping another is copied (one
    table saved under two names)."""
    result = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    reach = 0  # the end of the byte ranges seen so far, in order of their start
    for start, end, name in sorted((tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes, name)
                                   for name, tensor in result.items() if tensor.numel()):
        if start < reach:
            result[name] = result[name].clone()
        reach = max(reach, end)
    return result


# ---------------------------------------------------------------- sniffing, for detect()
def safetensors_header(path: str | os.PathLike[str]) -> tuple[list[str], dict[str, str]] | None:
    """Keys and header metadata without reading tensors; None if not a readable safetensors file."""
    if not Path(path).is_file() or not _starts_like_safetensors(path):
        return None
    try:
        with open_safetensors(path) as file:
            return file.keys(), file.metadata()
    except MergeError:
        return None


def _starts_like_safetensors(path: str | os.PathLike[str]) -> bool:
    """A safetensors file starts with its header's length (8 bytes) and the header's ``{``; a torch
    pickle (zip ``PK``, or protocol ``0x80``) never does, so it is never offered to ``safe_open``."""
    try:
        with open(path, "rb") as file:
            start = file.read(9)
    except OSError:
        return True  # let the reader say what is wrong with it
    return len(start) < 9 or start[8:9] == b"{"


def peek_pickle(path: str | os.PathLike[str]) -> Any | None:
    """A torch pickle's contents with tensor data mapped, not read; None if it does not load."""
    if not Path(path).is_file():  # a .safetensors file load_pickle refuses unread
        return None
    try:
        return load_pickle(path, mmap=True)
    except MergeError:
        return None
