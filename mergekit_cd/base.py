"""The base model of a merge, read lazily from a diffusers Stable Diffusion folder or hub repo.

A merge needs little of a multi-gigabyte pipeline: the configs (to recognise the family), the
UNet's cross-attention ``attn2.to_k`` / ``attn2.to_v`` weights, and the tokenizer(s) and text
encoder(s) that produce the features those layers read. :func:`open_base` reads only that.
The UNet is never instantiated: K/V tensors come straight from its safetensors file(s) with
``safe_open``, one layer at a time, and their shapes from the file headers alone.

Supported UNet weight layouts, in the order diffusers prefers them: the plain
``diffusion_pytorch_model.safetensors``, its sharded form (``...safetensors.index.json``),
then the fp16 variant of either (``diffusion_pytorch_model.fp16.safetensors``,
``...safetensors.index.fp16.json``). Text encoders likewise need ``model.safetensors`` (or
its index), else the fp16 variant; pickled ``.bin`` weights are not read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from . import hub
from .architectures import Architecture, detect_architecture
from .errors import MergeError
from .fileio import STAT_MEMO, StatMemo, remembered_sha256s

#: Mixed into every fingerprint; change it if the recipe below ever changes.
FINGERPRINT_VERSION = "mergekit_cd kv-fingerprint v1 (float16)"

_WHAT = "diffusers Stable Diffusion folder"
_UNET_STEM = "diffusion_pytorch_model"
_TEXT_ENCODER_STEM = "model"
_VARIANTS = (None, "fp16")
_KEY_SUFFIX = ".to_k.weight"
_VALUE_SUFFIX = ".to_v.weight"
# Files any base needs besides weights; ``tokenizer*/*`` are small and their names vary.
_CONFIG_PATTERNS = ["model_index.json", "unet/config.json", "text_encoder*/config.json", "tokenizer*/*"]
_BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
#: What :attr:`BaseModel.fingerprint` remembers of a weights file in a stat memo.
_FINGERPRINT_MEMO = f"K/V layer digests: {FINGERPRINT_VERSION}"


def kv_fingerprint(layers: Iterable[tuple[str, Tensor, Tensor]]) -> str:
    """sha256 hex identifying a set of K/V weights: ``(layer name, to_k, to_v)`` triples.

    Recipe: each layer's digest is sha256 over the shape and the float16 bytes (native byte
    order, row-major) of K, then of V; the fingerprint is sha256 over
    :data:`FINGERPRINT_VERSION` and ``name NUL digest LF`` for every layer in sorted name
    order. Converting to float16 first makes an fp16 variant (``.half()`` of the same
    weights) give the same fingerprint as the fp32 file, and the order the layers come in
    does not matter. Tensors may live on any device and have any float dtype.
    """
    return _combined_fingerprint({name: _layer_fingerprint(key, value) for name, key, value in layers})


def _layer_fingerprint(key: Tensor, value: Tensor) -> str:
    """One layer's digest in :func:`kv_fingerprint`."""
    digest = hashlib.sha256()
    for tensor in (key, value):
        half = tensor.detach().to("cpu", torch.float16).contiguous()
        digest.update(repr(tuple(half.shape)).encode())
        digest.update(memoryview(half.numpy()).cast("B"))
    return digest.hexdigest()


def _combined_fingerprint(digests: dict[str, str]) -> str:
    """:func:`kv_fingerprint` from its layers' digests."""
    total = hashlib.sha256(FINGERPRINT_VERSION.encode())
    for name in sorted(digests):
        total.update(f"{name}\0{digests[name]}\n".encode())
    return total.hexdigest()


def layer_order(name: str) -> tuple[int, list[tuple[int, int, str]]]:
    """Sort key putting layers in the UNet's data-flow order: down, mid, up, numeric indices."""
    parts = name.split(".")
    return (_BLOCK_ORDER.get(parts[0], len(_BLOCK_ORDER)),
            [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in parts])


class BaseModel:
    """A base model opened by :func:`open_base`: configs and lazy access to its K/V weights.

    name: the reference as given (folder, or hub ``org/name[@revision]``); path: the local
    folder read (a hub cache snapshot for a repo id); architecture: the family, detected from
    configs; context_dim: the UNet's ``cross_attention_dim`` (= the width of text features).
    """

    def __init__(self, name: str, path: Path, architecture: Architecture, model_index: dict[str, Any],
                 text_encoder_configs: dict[str, dict[str, Any]],
                 text_encoder_variants: dict[str, str | None],
                 context_dim: int, kv_files: dict[str, Path]) -> None:
        self.name = name
        self.path = path
        self.architecture = architecture
        self.context_dim = context_dim
        self._model_index = model_index
        self._text_encoder_configs = text_encoder_configs
        self._text_encoder_variants = text_encoder_variants
        self._kv_files = kv_files
        self._last_kv: tuple[str, tuple[Tensor, Tensor]] | None = None  # see kv
        self._text_fingerprint: str | None = None  # see remembered_text_fingerprint
        self._memo_folder: Path | None = None  # see remember_in

    def __repr__(self) -> str:
        return f"BaseModel({self.name!r}, architecture={self.architecture.name!r}, path={str(self.path)!r})"

    def layer_names(self) -> list[str]:
        """Cross-attention layers (diffusers module paths ending in ``attn2``), down -> mid -> up."""
        return list(self._layers)

    @cached_property
    def _layers(self) -> tuple[str, ...]:
        return tuple(sorted(_layers_of(self._kv_files, _KEY_SUFFIX), key=layer_order))

    def kv_shapes(self) -> dict[str, tuple[torch.Size, torch.Size]]:
        """(to_k shape, to_v shape) per layer, from the safetensors headers (no tensor data read)."""
        return dict(self._shapes)

    @cached_property
    def _shapes(self) -> dict[str, tuple[torch.Size, torch.Size]]:
        shapes: dict[str, torch.Size] = {}
        for file, keys in _by_file(self._kv_files, self._kv_files).items():
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                shapes.update({key: torch.Size(handle.get_slice(key).get_shape()) for key in keys})
        return {layer: (shapes[layer + _KEY_SUFFIX], shapes[layer + _VALUE_SUFFIX])
                for layer in self.layer_names()}

    def kv(self, layer: str) -> tuple[Tensor, Tensor]:
        """The base's (to_k, to_v) weights of ``layer``, float32 on the CPU, read from disk.

        The last layer read is kept and given again (the same tensors: callers never change them
        in place): a merge of full-weight inputs makes each input's differences as it reads that
        layer, so 100 inputs would otherwise open the base's file and read the layer 100 times."""
        if self._last_kv is not None and self._last_kv[0] == layer:
            return self._last_kv[1]
        keys = (layer + _KEY_SUFFIX, layer + _VALUE_SUFFIX)
        if keys[0] not in self._kv_files:
            raise MergeError(f"{self.name} has no cross-attention layer {layer}.")
        tensors: dict[str, Tensor] = {}
        for file, file_keys in _by_file(keys, self._kv_files).items():
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                tensors.update({key: handle.get_tensor(key).float() for key in file_keys})
        self._last_kv = (layer, (tensors[keys[0]], tensors[keys[1]]))
        return self._last_kv[1]

    def remember_in(self, memo_folder: Path) -> None:
        """Remember the digests behind :attr:`fingerprint` and :attr:`text_fingerprint` in
        ``memo_folder`` (a cache folder) by their files' stat: a repeated merge then reads the base's
        K/V once, to merge, not a second time to fingerprint them (1.4 GB for SDXL), and its text
        files not at all. Call before the first use of either."""
        self._memo_folder = memo_folder

    @cached_property
    def fingerprint(self) -> str:
        """:func:`kv_fingerprint` of all K/V weights: equal for the fp32 and fp16 files of a model.

        Reads every K/V tensor once (1.4 GB for SDXL in fp32), so it is computed on first use;
        with :meth:`remember_in`, each file's layer digests come from the memo while its stat is
        as remembered (a layer whose K and V lie in two files is always read)."""
        memo = StatMemo(self._memo_folder / STAT_MEMO if self._memo_folder is not None else None)
        files: dict[Path | None, list[str]] = {}
        for layer in self.layer_names():
            key_file, value_file = self._kv_files[layer + _KEY_SUFFIX], self._kv_files[layer + _VALUE_SUFFIX]
            files.setdefault(key_file if key_file == value_file else None, []).append(layer)
        digests: dict[str, str] = {}
        for file, layers in files.items():
            real = os.path.realpath(file) if file is not None else None
            remembered = memo.get_digests(real, _FINGERPRINT_MEMO, layers) if real is not None else None
            if remembered is not None:
                digests.update(remembered)
                continue
            self._last_kv = None  # read from the file as observed, not a layer kept from before
            observed = memo.observe(real) if real is not None else None
            fresh = {layer: _layer_fingerprint(*self.kv(layer)) for layer in layers}
            if real is not None:
                memo.put(real, _FINGERPRINT_MEMO, fresh, observed)
            digests.update(fresh)
        memo.save()
        return _combined_fingerprint(digests)

    @property
    def text_fingerprint(self) -> str:
        """sha256 over the tokenizer and text-encoder files: what decides the text features.

        Files in a hub cache are named by their content hash already (``blobs/<sha256>``), so
        only local folders are read through; computed once per base, with the memo of
        :meth:`remember_in` (:meth:`remembered_text_fingerprint`).
        """
        return self.remembered_text_fingerprint(self._memo_folder)

    def remembered_text_fingerprint(self, memo_folder: Path | None) -> str:
        """:attr:`text_fingerprint`, computed on the first call; with ``memo_folder`` (a cache folder)
        each local file's digest is remembered there by the file's stat
        (:func:`~.fileio.remembered_sha256s`), so that a repeated merge does not read the text
        encoder's files again (0.5 GB for SD1.5, 0.4 s of a cached merge), while a changed file
        still changes the fingerprint."""
        if self._text_fingerprint is None:
            components = (*self.architecture.tokenizers, *self.architecture.text_encoders)
            files = [file for component in components  # each component's files in name order, as always
                     for file in sorted(p for p in (self.path / component).rglob("*") if p.is_file())]
            local = [file for file in files if _hub_blob(file) is None]
            digests = dict(zip(local, remembered_sha256s(local, memo_folder)))
            digest = hashlib.sha256()
            for file in files:
                digest.update(str(file.relative_to(self.path)).encode())
                digest.update((_hub_blob(file) or digests[file]).encode())
            self._text_fingerprint = digest.hexdigest()
        return self._text_fingerprint

    def token_dims(self) -> tuple[int, ...]:
        """Hidden size of each text encoder, in feature (concatenation) order."""
        return tuple(int(self._text_encoder_configs[name]["hidden_size"])
                     for name in self.architecture.text_encoders)

    def text_encoder_parameters(self) -> tuple[int, ...]:
        """Number of parameters of each text encoder, in feature order, from their safetensors
        headers (no data read)."""
        counts = []
        for index in range(len(self.architecture.text_encoders)):
            total = 0
            for file in self.text_encoder_files(index):
                with safe_open(str(file), framework="pt", device="cpu") as handle:
                    for key in handle.keys():
                        total += int(torch.Size(handle.get_slice(key).get_shape()).numel())
            counts.append(total)
        return tuple(counts)

    def text_encoder_files(self, index: int) -> list[Path]:
        """The safetensors files holding text encoder ``index``'s weights (one, or its shards), as
        transformers chooses them."""
        found = _weights_file(self.path / self.architecture.text_encoders[index], _TEXT_ENCODER_STEM)
        if found is None:
            return []
        if found[0].suffix == ".json":
            return [found[0].parent / f for f in sorted(set(_read_json(found[0]).get("weight_map", {}).values()))]
        return [found[0]]

    def load_tokenizers(self) -> list[Any]:
        """The tokenizer(s), in the architecture's order, as the classes model_index.json names."""
        return [self._component_class(name).from_pretrained(self.path / name)
                for name in self.architecture.tokenizers]

    def load_text_encoder(self, index: int, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32) -> Any:
        """Text encoder ``index`` (in feature order) in eval mode without gradients (e.g.
        ``CLIPTextModel``, or SDXL's second, ``CLIPTextModelWithProjection``), as the class
        model_index.json names. One at a time: SDXL's two are 3.3 GB in float32 together."""
        name = self.architecture.text_encoders[index]
        model = self._component_class(name).from_pretrained(
            self.path / name, dtype=dtype, variant=self._text_encoder_variants[name])
        return model.to(device).eval().requires_grad_(False)

    def _component_class(self, component: str) -> type:
        """The transformers class model_index.json gives for ``component``."""
        import transformers

        library, class_name = self._model_index[component]
        found = getattr(transformers, class_name, None) if library == "transformers" else None
        if found is None:
            raise MergeError(f"{self.path}/model_index.json says {component} is {library}.{class_name}; "
                             f"only transformers tokenizers and text encoders are supported.")
        return found


def open_base(reference: str | os.PathLike[str], *, revision: str | None = None) -> BaseModel:
    """Open a base model: a local diffusers SD folder or a hub repo id (``org/name[@revision]``).

    For a repo id only the configs, the UNet and text encoder weights and the tokenizers are
    fetched (never the VAE), the plain weights first and the fp16 variant only where plain
    weights are missing; ``revision`` (a branch, tag or commit) applies to repo ids only.
    Anything missing gives one MergeError naming the folder and files.
    """
    name = str(reference)
    folder = _fetch(name, revision)
    if not folder.is_dir():
        raise MergeError(f"{folder} is a file; a base model is a {_WHAT} (with model_index.json).")
    return _open_folder(name, folder)


def _fetch(reference: str, revision: str | None) -> Path:
    """Resolve the reference; for a repo, fetch the fp16 variant only of components that lack
    plain weights (a second pass, so a repo holding both never downloads both)."""
    patterns = _CONFIG_PATTERNS + _weight_patterns("unet", _UNET_STEM, None) \
        + _weight_patterns("text_encoder*", _TEXT_ENCODER_STEM, None)
    folder = hub.resolve(reference, allow_patterns=patterns, revision=revision)
    lacking = _lacking_plain_weights(folder) if folder.is_dir() else []
    if lacking:
        variant_patterns = [pattern for component, stem in lacking
                            for pattern in _weight_patterns(component, stem, "fp16")]
        folder = hub.resolve(reference, allow_patterns=patterns + variant_patterns, revision=revision)
    return folder


def _weight_patterns(component: str, stem: str, variant: str | None) -> list[str]:
    """Hub file patterns of one component's safetensors weights (single, index, shards)."""
    infix = f".{variant}" if variant else ""
    return [f"{component}/{stem}{infix}.safetensors",
            f"{component}/{stem}.safetensors.index{infix}.json",
            f"{component}/{stem}{infix}-*.safetensors"]


def _weights_file(folder: Path, stem: str) -> tuple[Path, str | None] | None:
    """A component's safetensors weights (single file or shard index) and their variant, the
    plain weights before the fp16 variant, as diffusers and transformers choose them."""
    for variant in _VARIANTS:
        infix = f".{variant}" if variant else ""
        for file_name in (f"{stem}{infix}.safetensors", f"{stem}.safetensors.index{infix}.json"):
            if (folder / file_name).is_file():
                return folder / file_name, variant
    return None


def _lacking_plain_weights(folder: Path) -> list[tuple[str, str]]:
    """(component, weights stem) of the UNet and text encoders without non-variant weights."""
    components = [("unet", _UNET_STEM)]
    components += [(config.parent.name, _TEXT_ENCODER_STEM)
                   for config in sorted(folder.glob("text_encoder*/config.json"))]
    lacking = []
    for component, stem in components:
        found = _weights_file(folder / component, stem)
        if found is None or found[1] is not None:
            lacking.append((component, stem))
    return lacking


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise MergeError(f"Cannot read {path}: {error}") from None


def _open_folder(name: str, folder: Path) -> BaseModel:
    """Validate ``folder`` (all problems in one MergeError) and build the :class:`BaseModel`."""
    missing = [file for file in ("model_index.json", "unet/config.json") if not (folder / file).is_file()]
    if missing:
        raise hub.missing_files_error(name, folder, missing, what=_WHAT)
    model_index = _read_json(folder / "model_index.json")
    unet_config = _read_json(folder / "unet/config.json")
    first_encoder = folder / "text_encoder" / "config.json"
    architecture = detect_architecture(model_index, unet_config,
                                       _read_json(first_encoder) if first_encoder.is_file() else {})
    kv_files, missing_weights = _kv_files(folder / "unet")
    missing += _missing_text_files(folder, architecture) + missing_weights
    if missing:
        raise hub.missing_files_error(name, folder, missing, what=_WHAT)
    configs = {encoder: _read_json(folder / encoder / "config.json")
               for encoder in architecture.text_encoders}
    variants = {encoder: _weights_file(folder / encoder, _TEXT_ENCODER_STEM)[1]
                for encoder in architecture.text_encoders}
    base = BaseModel(name, folder, architecture, model_index, configs, variants,
                     _context_dim(folder, unet_config), kv_files)
    _check_widths(base)
    return base


def _missing_text_files(folder: Path, architecture: Architecture) -> list[str]:
    """Config and weights of each text encoder, vocabulary files of each tokenizer."""
    missing = []
    for encoder in architecture.text_encoders:
        if not (folder / encoder / "config.json").is_file():
            missing.append(f"{encoder}/config.json")
        if _weights_file(folder / encoder, _TEXT_ENCODER_STEM) is None:
            missing.append(f"{encoder}/model.safetensors (or model.fp16.safetensors)")
    for tokenizer in architecture.tokenizers:
        directory = folder / tokenizer
        has_vocabulary = (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
        if not has_vocabulary and not (directory / "tokenizer.json").is_file():
            missing.append(f"{tokenizer}/vocab.json and merges.txt (or tokenizer.json)")
    return missing


def _kv_files(unet: Path) -> tuple[dict[str, Path], list[str]]:
    """(K/V tensor name -> the safetensors file holding it, missing UNet weight files)."""
    found = _weights_file(unet, _UNET_STEM)
    if found is None:
        return {}, [f"unet/{_UNET_STEM}.safetensors (or its .fp16 variant or a sharded index)"]
    file, _ = found
    if file.suffix == ".json":
        weight_map = _read_json(file).get("weight_map", {})
        files = {key: unet / shard for key, shard in weight_map.items()}
    else:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            files = {key: file for key in handle.keys()}
    kv_files = {key: path for key, path in files.items()
                if ".attn2." in key and key.endswith((_KEY_SUFFIX, _VALUE_SUFFIX))}
    missing_shards = sorted({f"unet/{path.name}" for path in files.values() if not path.is_file()})
    if missing_shards:
        return kv_files, missing_shards
    if not kv_files:
        raise MergeError(f"{file} holds no cross-attention (attn2.to_k / attn2.to_v) weights; "
                         f"is it a Stable Diffusion UNet?")
    unpaired = sorted(_layers_of(kv_files, _KEY_SUFFIX) ^ _layers_of(kv_files, _VALUE_SUFFIX))
    if unpaired:
        raise MergeError(f"{file}: cross-attention layer {unpaired[0]} lacks its to_k or to_v weight.")
    return kv_files, []


def _context_dim(folder: Path, unet_config: dict[str, Any]) -> int:
    """The UNet's cross_attention_dim (one number; per-block lists must agree)."""
    value = unet_config.get("cross_attention_dim")
    values = set(value) if isinstance(value, (list, tuple)) else {value}
    if len(values) != 1 or not isinstance(next(iter(values)), int):
        raise MergeError(f"{folder}/unet/config.json has cross_attention_dim {value!r}; one number "
                         f"(the width of the text features) is needed.")
    return values.pop()


def _check_widths(base: BaseModel) -> None:
    """The text features must be as wide as the K/V inputs, or no merge can be meaningful."""
    if sum(base.token_dims()) != base.context_dim:
        raise MergeError(f"{base.path}: the text encoder(s) give {'+'.join(map(str, base.token_dims()))} "
                         f"features but the UNet's cross_attention_dim is {base.context_dim}; "
                         f"this is not a {base.architecture.description} model.")


def _layers_of(kv_files: dict[str, Path], suffix: str) -> set[str]:
    return {key[: -len(suffix)] for key in kv_files if key.endswith(suffix)}


def _by_file(keys: Iterable[str], files: dict[str, Path]) -> dict[Path, list[str]]:
    """Group tensor names by the file that holds them, so each file is opened once."""
    grouped: dict[Path, list[str]] = {}
    for key in keys:
        grouped.setdefault(files[key], []).append(key)
    return grouped


def _hub_blob(file: Path) -> str | None:
    """A file's content hash when it is a hub cache's blob (named by it), else None."""
    real = Path(os.path.realpath(file))
    if real.parent.name == "blobs" and real.parent.parent.name.startswith("models--"):
        return real.name
    return None
