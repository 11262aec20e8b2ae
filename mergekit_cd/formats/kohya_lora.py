"""kohya's LoRA file (``lora_unet_*``, ``.alpha``, ``bundle_emb.*``) with an embedding file per token beside it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import Tensor

from ..delta import ConceptDelta
from ..errors import MergeError
from ..fileio import atomic_outputs, check_destination, open_safetensors, read_tensor, save_safetensors
from ..metadata import from_header, to_header
from ._common import Delta, check_token_shapes, check_vector, natural_order, safetensors_header, saveable
from ._lora import check_lora_keys, lora_factors, lora_layers, positive_number
from .ldm_names import to_compvis_name, to_diffusers_name
from .token_files import (EMB_PARAMS, SDXL_TOKEN_KEYS, STRING_TO_PARAM, read_token_folder, token_file_names,
                          token_folder, token_folder_entries)

NAME = "kohya-lora"
WRITES_FULL_WEIGHTS = False  # writes ConceptDelta differences, every one as factors
STORES_FACTORS = True
FACTORS_ONLY = True
ARCHITECTURES = None
OUTPUT_SUFFIX = None  # a .safetensors file like the native one's: chosen with --format only
foreign_entries = None
#: The embedding files go in ``<stem>_embeddings/`` beside the LoRA: a folder to copy into the
#: ``embeddings`` folder of A1111 or ComfyUI, and no file of the user's beside it replaced.
STORES_STATISTICS = False
TOKEN_FOLDER_SUFFIX = "_embeddings"
PREFIX = "lora_unet_"
BUNDLE = "bundle_emb."
#: An SD1/SD2 embedding's key in a bundle (A1111's ``string_to_param``, flattened).
BUNDLED_PARAM = f"{STRING_TO_PARAM}.*"
_PARTS = {".lora_down.weight": "down", ".lora_up.weight": "up"}
# SD1/SD2: diffusers' module path with "_" for "."; SDXL: the LDM block names (ldm_names)
_DIFFUSERS_NAME = re.compile(r"^(down_blocks|up_blocks)_(\d+)_attentions_(\d+)_transformer_blocks_(\d+)"
                             r"_attn2_(to_[kv])$|^mid_block_attentions_0_transformer_blocks_(\d+)_attn2_(to_[kv])$")
_LDM_NAME = re.compile(r"^(input_blocks_\d+|output_blocks_\d+|middle_block)_1_transformer_blocks_(\d+)"
                       r"_attn2_(to_[kv])$")


def detect(path: str | os.PathLike[str]) -> bool:
    """A safetensors file with kohya's ``lora_unet_`` keys."""
    header = safetensors_header(path) if Path(path).is_file() else None
    return header is not None and any(key.startswith(PREFIX) for key in header[0])


def module_of(name: str) -> str | None:
    """The diffusers module path of a kohya module name (``lora_unet_<module>``): SD1/SD2 names
    are diffusers' own with ``_`` for ``.``; SDXL's are the LDM block names. None when it is no
    cross-attention K/V (the name is kept, as it is, for the refusal)."""
    if not name.startswith(PREFIX):
        return name
    rest = name.removeprefix(PREFIX)
    match = _DIFFUSERS_NAME.match(rest)
    if match:
        kind, block, attention, transformer, projection, mid_transformer, mid_projection = match.groups()
        if kind is None:
            return f"mid_block.attentions.0.transformer_blocks.{mid_transformer}.attn2.{mid_projection}"
        return f"{kind}.{block}.attentions.{attention}.transformer_blocks.{transformer}.attn2.{projection}"
    match = _LDM_NAME.match(rest)
    if match:
        block, transformer, projection = match.groups()
        layer = to_diffusers_name(f"{block.replace('_blocks_', '_blocks.')}.1.transformer_blocks.{transformer}.attn2")
        return f"{layer}.{projection}" if layer else name
    return name


def kohya_name(module: str, architecture: str | None) -> str:
    """The inverse of :func:`module_of`, for ``architecture`` (SDXL: LDM names)."""
    layer, projection = module.rsplit(".", 1)
    if architecture == "sdxl":
        ldm = to_compvis_name(layer)
        if ldm is None:
            raise MergeError(f"Cannot write layer {layer} as {NAME}: kohya's SDXL names have no block for it.")
        layer = ldm
    return PREFIX + f"{layer}.{projection}".replace(".", "_")


def read(path: str | os.PathLike[str]) -> ConceptDelta:
    """The cross-attention K/V parts as low-rank differences ``alpha / rank * up @ down`` (kohya's
    scale; 1 without an alpha); as tokens the bundled embeddings (``bundle_emb.<token>.*``), or
    without any, the embedding files in ``<stem>_embeddings/`` beside it (named by their files,
    as A1111 names them). Anything else in the file is refused with what it holds."""
    source = str(path)
    with open_safetensors(path) as handle:
        metadata = handle.metadata()
        keys = list(handle.keys())
        alphas = [key for key in keys if key.startswith(PREFIX) and key.endswith(".alpha")]
        bundled = [key for key in keys if key.startswith(BUNDLE)]
        modules = check_lora_keys(keys, source, module_of=module_of, parts=_PARTS, extra=[*alphas, *bundled])
        parts = {entry: read_tensor(handle, key, source) for entry, key in modules.items()}
        alpha = {module_of(key.removesuffix(".alpha")): positive_number(read_tensor(handle, key, source), key, source)
                 for key in alphas}
        tokens = _bundled_tokens({key: read_tensor(handle, key, source) for key in bundled}, source)
        identity = from_header(metadata, source=source)
    folder = token_folder(path, TOKEN_FOLDER_SUFFIX)
    if not tokens and folder.is_dir():  # the embedding files beside it, as we write them
        tokens = read_token_folder(folder, "the LoRA")
    layers = lora_layers(parts, lambda module, rank: alpha.get(module, rank) / rank, source)
    check_token_shapes(tokens, source)
    return ConceptDelta(layers, tokens, **identity)


def _bundled_tokens(entries: dict[str, Tensor], source: str) -> dict[str, tuple[Tensor, ...]]:
    """``bundle_emb.<token>.string_to_param.*`` (SD1/SD2) or ``.clip_l`` + ``.clip_g`` (SDXL), one row each."""
    found: dict[str, dict[str, Tensor]] = {}
    for key, value in entries.items():
        rest = key.removeprefix(BUNDLE)
        suffix = next((s for s in (BUNDLED_PARAM, *SDXL_TOKEN_KEYS) if rest.endswith("." + s)), None)
        if suffix is None:
            raise MergeError(f"{source}: {key} is no bundled embedding kohya writes "
                             f"(bundle_emb.<token>.{BUNDLED_PARAM}, or .clip_l and .clip_g for SDXL).")
        found.setdefault(rest[: -len(suffix) - 1], {})[suffix] = value
    tokens: dict[str, tuple[Tensor, ...]] = {}
    for token in natural_order(found):
        parts = found[token]
        order = (BUNDLED_PARAM,) if BUNDLED_PARAM in parts and len(parts) == 1 else SDXL_TOKEN_KEYS
        if set(parts) != set(order):
            raise MergeError(f"{source}: bundled embedding {token} has {sorted(parts)}; expected "
                             f"{BUNDLED_PARAM}, or both of {', '.join(SDXL_TOKEN_KEYS)}.")
        tokens[token] = tuple(check_vector(parts[name], f"{BUNDLE}{token}.{name}", source) for name in order)
    return tokens


def write(obj: Delta, path: str | os.PathLike[str], *, force: bool = False) -> None:
    """``path``: the UNet LoRA at scale 1 (alpha = rank per module) with the embeddings bundled,
    and ``<stem>_embeddings/<token>.safetensors`` per token (kohya's / A1111's embedding file:
    the file name is the trigger word)."""
    target = Path(path)
    if not isinstance(obj, ConceptDelta):
        raise MergeError(f"Cannot write {target} as {NAME}: it stores differences, not full weights.")
    tensors: dict[str, Tensor] = {}
    for module, factor in lora_factors(obj, target, NAME).items():
        name = kohya_name(module, obj.architecture)
        tensors[f"{name}.lora_down.weight"] = factor.down
        tensors[f"{name}.lora_up.weight"] = factor.up
        tensors[f"{name}.alpha"] = torch.tensor(float(factor.rank))
    files: dict[str, dict[str, Tensor]] = {}
    names = token_file_names(obj.tokens, target, NAME)
    for token, embeddings in obj.tokens.items():
        if len(embeddings) == 1:
            tensors[f"{BUNDLE}{token}.{BUNDLED_PARAM}"] = embeddings[0][None]
            files[names[token]] = {EMB_PARAMS: embeddings[0][None]}
        else:
            state = dict(zip(SDXL_TOKEN_KEYS, (embedding[None] for embedding in embeddings)))
            tensors.update({f"{BUNDLE}{token}.{key}": row for key, row in state.items()})
            files[names[token]] = state
    header = to_header(obj)
    # the embeddings first, the LoRA last: the file a user loads appears when everything is in place
    targets = [token_folder(target, TOKEN_FOLDER_SUFFIX), target]
    check_destination(targets[0], force=force, foreign_entries=token_folder_entries)
    check_destination(target, force=force)
    with atomic_outputs(targets, force=force, folder=(True, False), check=False) as (folder, temporary):
        for name, state in files.items():
            save_safetensors(saveable(state), folder / name)
        save_safetensors(saveable(tensors), temporary, metadata=header)

