"""diffusers' LoRA folder: ``pytorch_lora_weights.safetensors`` (peft keys) and a textual-inversion file per token."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from ..delta import ConceptDelta
from ..errors import MergeError
from ..fileio import atomic_path, open_safetensors, save_safetensors
from ..metadata import from_header, to_header
from ._common import (Delta, check_token_shapes, safetensors_header, saveable)
from ._lora import check_lora_keys, lora_factors, peft_scale, read_lora
from .token_files import read_token_folder, token_file_names, token_folder_entries, token_metadata, token_state

NAME = "diffusers-lora"
HOLDS_OTHER_MODULES = True  # a LoRA's modules beyond cross-attention K/V, under their own keys
WRITES_FULL_WEIGHTS = False  # writes ConceptDelta differences, every one as factors
STORES_FACTORS = True
FACTORS_ONLY = True
STORES_STATISTICS = False
TOKEN_FOLDER_SUFFIX = None
ARCHITECTURES = None
OUTPUT_SUFFIX = None  # a folder like the diffusers layout's: chosen with --format only
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
#: The safetensors metadata entry holding peft's LoraConfig, as ``save_lora_weights`` writes it.
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
PREFIX = "unet."
#: peft's own prefix, in an adapter saved with ``save_pretrained`` from a peft-wrapped UNet.
PEFT_PREFIX = "base_model.model."
# peft's factor names, and those of diffusers' older attention-processor LoRAs (``to_k_lora.down``)
_PARTS = {".lora_A.weight": "down", ".lora_B.weight": "up", ".down.weight": "down", ".up.weight": "up"}
_OLD_PROJECTIONS = {".processor.to_k_lora": ".to_k", ".processor.to_v_lora": ".to_v"}


def detect(path: str | os.PathLike[str]) -> bool:
    """A folder (or the weights file itself) whose LoRA keys are peft's (``*.lora_A/B.weight``)
    or diffusers' older ``*_lora.down/up.weight``."""
    file = _weights_file(Path(path))
    header = safetensors_header(file) if file.is_file() else None
    return header is not None and any(key.endswith((".lora_A.weight", ".lora_B.weight", "_lora.down.weight",
                                                    "_lora.up.weight")) for key in header[0])


def _module_of(name: str) -> str | None:
    """The UNet module path of a key's name (``unet.<module>``, peft's ``base_model.model.<module>``,
    diffusers' older ``<layer>.processor.to_k_lora``); None for other models' (``text_encoder.*``)."""
    for prefix in (PREFIX, PEFT_PREFIX):
        if name.startswith(prefix):
            name = name.removeprefix(prefix)
            break
    else:
        if name.split(".", 1)[0] not in ("down_blocks", "mid_block", "up_blocks"):
            return None
    for old, new in _OLD_PROJECTIONS.items():
        if name.endswith(old):
            return name.removesuffix(old) + new
    return name


def _weights_file(path: Path) -> Path:
    return path / WEIGHTS_NAME if path.is_dir() else path


def read(path: str | os.PathLike[str]) -> ConceptDelta:
    """The UNet's cross-attention K/V parts as low-rank differences ``scale * B A`` (peft's
    scale: ``lora_alpha / r``, ``/ sqrt(r)`` with rsLoRA; 1 without adapter metadata, the
    diffusers convention), its other UNet modules alike (``other_modules``), the token files
    beside it as tokens; text-encoder parts are named in ``unread_parts``, for the load boundary."""
    file = _weights_file(Path(path))
    source = str(file)
    with open_safetensors(file) as handle:
        metadata = handle.metadata()
        keys = check_lora_keys(list(handle.keys()), source, module_of=_module_of, parts=_PARTS)
        config = _adapter_config(metadata, source)
        layers, modules, unread = read_lora(handle, keys, lambda module, rank: peft_scale(config, module, rank, source),
                                            source)
        provenance = from_header(metadata, source=source)
    folder = Path(path)
    tokens = read_token_folder(folder, "beside the LoRA weights", skip=(WEIGHTS_NAME,)) if folder.is_dir() else {}
    check_token_shapes(tokens, str(path))
    return ConceptDelta.with_provenance(layers, tokens, provenance, other_modules=modules, unread_parts=unread)


def _adapter_config(metadata: dict[str, str], source: str) -> dict[str, Any]:
    """peft's LoraConfig fields for the UNet (``unet.`` prefix removed), ``{}`` when absent."""
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if raw is None:
        return {}
    try:
        config = json.loads(raw)
    except ValueError:
        raise MergeError(f"{source}: its {ADAPTER_METADATA_KEY} is not valid JSON.") from None
    if not isinstance(config, dict):
        raise MergeError(f"{source}: its {ADAPTER_METADATA_KEY} is not a JSON object.")
    return {key.removeprefix(PREFIX): value for key, value in config.items() if key.startswith(PREFIX)}


def write(obj: Delta, path: str | os.PathLike[str], *, force: bool = False) -> None:
    """The folder ``path``: the UNet LoRA at scale 1 (``lora_alpha`` = rank for every module, in
    peft's adapter metadata) and a textual-inversion file for each token, under the token's
    portable name (``new1.safetensors`` holding ``{"<new1>": vector}``: ``load_textual_inversion``
    reads the token from the key; SDXL's ``clip_l``/``clip_g`` file keeps it in its metadata)."""
    target = Path(path)
    factors = lora_factors(obj, target, NAME)
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    for module, factor in factors.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = factor.down
        tensors[f"{PREFIX}{module}.lora_B.weight"] = factor.up
        ranks[module] = factor.rank
    names = token_file_names(obj.tokens, target, NAME, reserved=(WEIGHTS_NAME,), portable=True)
    token_files = {names[token]: (token_state(token, embeddings, target, NAME), token_metadata(token))
                   for token, embeddings in obj.tokens.items()}
    header = {**to_header(obj), ADAPTER_METADATA_KEY: json.dumps(_adapter_metadata(ranks), sort_keys=True)}
    with atomic_path(target, force=force, folder=True, foreign_entries=foreign_entries) as folder:
        save_safetensors(saveable(tensors), folder / WEIGHTS_NAME, metadata=header)
        for file_name, (state, metadata) in token_files.items():
            save_safetensors(saveable(state), folder / file_name, metadata=metadata)


def _adapter_metadata(ranks: dict[str, int]) -> dict[str, Any]:
    """peft's LoraConfig with every module at scale 1: the most common rank as ``r`` and
    ``lora_alpha``, the others in ``rank_pattern`` and ``alpha_pattern`` alike."""
    common = max(set(ranks.values()), key=list(ranks.values()).count) if ranks else 1
    pattern = {module: rank for module, rank in ranks.items() if rank != common}
    config = {"r": common, "lora_alpha": common, "rank_pattern": pattern, "alpha_pattern": pattern,
              "target_modules": sorted(ranks), "use_rslora": False, "use_dora": False, "lora_dropout": 0.0,
              "init_lora_weights": True, "bias": "none"}
    return {f"{PREFIX}{key}": value for key, value in config.items()}


def foreign_entries(folder: Path) -> list[str]:
    """What in ``folder`` is not part of an output of this layout (the weights file and token files)."""
    if not detect(folder):
        return sorted(entry.name for entry in folder.iterdir())
    return token_folder_entries(folder)

