"""kohya's LoRA file (``lora_unet_*``, ``.alpha``, ``bundle_emb.*``) with an embedding file per token beside it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import Tensor

from ..architectures import ARCHITECTURES as ARCHITECTURE_TABLE
from ..delta import ConceptDelta
from ..errors import MergeError
from ..fileio import atomic_outputs, check_destination, open_safetensors, read_tensor, save_safetensors
from ..metadata import from_header, to_header
from ._common import Delta, check_token_shapes, check_vector, natural_order, safetensors_header, saveable
from ._lora import check_lora_keys, lora_factors, positive_number, read_lora
from .ldm_names import to_compvis_name, to_diffusers_name
from .token_files import (EMB_PARAMS, SDXL_TOKEN_KEYS, STRING_TO_PARAM, read_token_folder, token_file_names,
                          token_folder, token_folder_entries, token_metadata)

NAME = "kohya-lora"
HOLDS_OTHER_MODULES = True  # a LoRA's modules beyond cross-attention K/V, under kohya's names
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
#: diffusers' module names holding a "_" (kohya writes every "." of a module path as "_"), as
#: diffusers' own kohya conversion joins them back
_JOINED_NAMES = ("down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
                 "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
                 "time_embedding", "add_embedding", "linear_1", "linear_2")
# SDXL: the LDM names of the attention blocks (ldm_names), the rest diffusers' own
_LDM_NAME = re.compile(r"^(input_blocks_\d+|output_blocks_\d+|middle_block)_1_(.+)$")


def detect(path: str | os.PathLike[str]) -> bool:
    """A safetensors file with kohya's ``lora_unet_`` keys."""
    header = safetensors_header(path) if Path(path).is_file() else None
    return header is not None and any(key.startswith(PREFIX) for key in header[0])


def module_of(name: str) -> str | None:
    """The diffusers module path of a kohya module name (``lora_unet_<module>``): SD1/SD2 names
    are diffusers' own with ``_`` for ``.``; SDXL's are the LDM block names, mapped for the
    attention blocks. None when it is no UNet name; an SDXL name outside the attention blocks
    comes back dotted as it is (``input_blocks.1.0...``), which is no diffusers module path."""
    if not name.startswith(PREFIX):
        return None
    rest = name.removeprefix(PREFIX)
    match = _LDM_NAME.match(rest)
    if match:
        block, inner = match.groups()
        return to_diffusers_name(f"{block.replace('_blocks_', '_blocks.')}.1.{_dotted(inner)}") or _dotted(rest)
    return _dotted(rest)


def _dotted(name: str) -> str:
    """``down_blocks_0_attentions_0_proj_in`` -> ``down_blocks.0.attentions.0.proj_in``."""
    dotted = name.replace("_", ".")
    for joined in _JOINED_NAMES:
        dotted = dotted.replace(joined.replace("_", "."), joined)
    return dotted


def kohya_name(module: str, architecture: str | None) -> str:
    """The inverse of :func:`module_of`, for ``architecture`` (LDM names where the architecture
    table says kohya uses them: SDXL)."""
    if architecture in ARCHITECTURE_TABLE and ARCHITECTURE_TABLE[architecture].kohya_ldm_names:
        ldm = to_compvis_name(module)
        if ldm is None:
            raise MergeError(f"Cannot write module {module} as {NAME}: kohya's SDXL names for it (outside the "
                             f"attention blocks) are not built here; write diffusers-lora instead.")
        module = ldm
    return PREFIX + module.replace(".", "_")


def read(path: str | os.PathLike[str]) -> ConceptDelta:
    """The cross-attention K/V parts as low-rank differences ``alpha / rank * up @ down`` (kohya's
    scale; 1 without an alpha), its other UNet modules alike (``other_modules``); as tokens the
    bundled embeddings (``bundle_emb.<token>.*``) and the embedding files in ``<stem>_embeddings/``
    beside it (named by their files, as A1111 names them), which must agree where both exist.
    Text-encoder parts and UNet parts with no diffusers name are named in ``unread_parts``."""
    source = str(path)
    with open_safetensors(path) as handle:
        metadata = handle.metadata()
        keys = list(handle.keys())
        alphas = [key for key in keys if key.startswith(PREFIX) and key.endswith(".alpha")]
        bundled = [key for key in keys if key.startswith(BUNDLE)]
        found = check_lora_keys(keys, source, module_of=module_of, parts=_PARTS, extra=[*alphas, *bundled])
        alpha = {module_of(key.removesuffix(".alpha")): positive_number(read_tensor(handle, key, source), key, source)
                 for key in alphas}
        layers, modules, unread = read_lora(handle, found, lambda module, rank: alpha.get(module, rank) / rank, source)
        tokens = _bundled_tokens({key: read_tensor(handle, key, source) for key in bundled}, source)
        provenance = from_header(metadata, source=source)
    folder = token_folder(path, TOKEN_FOLDER_SUFFIX)
    if folder.is_dir():  # the embedding files beside it, as we write them
        beside = read_token_folder(folder, "beside the LoRA")
        if tokens and not _same_tokens(tokens, beside):
            raise MergeError(f"{source}: its bundled embeddings ({', '.join(tokens)}) differ from the embedding "
                             f"files in {folder} ({', '.join(beside) or 'none'}); a LoRA's tokens must be one set. "
                             f"Remove or replace the stale one.")
        tokens = tokens or beside
    check_token_shapes(tokens, source)
    return ConceptDelta.with_provenance(layers, tokens, provenance, other_modules=modules,
                                    unread_parts=unread)


def _same_tokens(first: dict[str, tuple[Tensor, ...]], second: dict[str, tuple[Tensor, ...]]) -> bool:
    """The same token names with equal embeddings (compared in float32: one may be stored in half)."""
    return first.keys() == second.keys() and all(
        len(first[name]) == len(second[name]) and all(a.shape == b.shape and torch.equal(a.float(), b.float())
                                                     for a, b in zip(first[name], second[name])) for name in first)


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
    and ``<stem>_embeddings/<name>.safetensors`` per token (kohya's / A1111's embedding file, the
    file name its trigger word there): the token's portable name (``<new1>`` -> ``new1``, a name
    Windows takes), with the token in its metadata, so it reads back as the bundled one."""
    target = Path(path)
    if not isinstance(obj, ConceptDelta):
        raise MergeError(f"Cannot write {target} as {NAME}: it stores differences, not full weights.")
    tensors: dict[str, Tensor] = {}
    for module, factor in lora_factors(obj, target, NAME).items():
        name = kohya_name(module, obj.architecture)
        tensors[f"{name}.lora_down.weight"] = factor.down
        tensors[f"{name}.lora_up.weight"] = factor.up
        tensors[f"{name}.alpha"] = torch.tensor(float(factor.rank))
    files: dict[str, dict[str, Tensor]] = {}  # token -> its embedding file's tensors
    names = token_file_names(obj.tokens, target, NAME, portable=True)
    for token, embeddings in obj.tokens.items():
        if len(embeddings) == 1:
            tensors[f"{BUNDLE}{token}.{BUNDLED_PARAM}"] = embeddings[0][None]
            files[token] = {EMB_PARAMS: embeddings[0][None]}
        else:
            state = dict(zip(SDXL_TOKEN_KEYS, (embedding[None] for embedding in embeddings)))
            tensors.update({f"{BUNDLE}{token}.{key}": row for key, row in state.items()})
            files[token] = state
    header = to_header(obj)
    # the embeddings first, the LoRA last: the file a user loads appears when everything is in place
    targets = [token_folder(target, TOKEN_FOLDER_SUFFIX), target]
    check_destination(targets[0], force=force, foreign_entries=token_folder_entries)
    check_destination(target, force=force)
    with atomic_outputs(targets, force=force, folder=(True, False), check=False) as (folder, temporary):
        for token, state in files.items():
            save_safetensors(saveable(state), folder / names[token], metadata=token_metadata(token))
        save_safetensors(saveable(tensors), temporary, metadata=header)

