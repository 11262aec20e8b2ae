"""One file per token, as diffusers' training scripts and ``load_textual_inversion`` know them:
``{"<token>": vector}``, or ``{"clip_l": [1, d], "clip_g": [1, d]}`` for SDXL, named
``<token>.safetensors`` (the LoRA layouts: a portable name, ``new1.safetensors``, with the token
in the file's metadata); shared by every layout that writes token files beside its weights."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ..delta import check_token_name
from ..errors import MergeError
from ..fileio import load_pickle, load_safetensors
from ._common import check_token_count, check_vector, natural_order, safetensors_header

SDXL_TOKEN_KEYS = ("clip_l", "clip_g")  # the community SDXL embedding layout, one row per encoder
#: The suffixes of token files: safetensors, and pickles (diffusers' ``.bin``, A1111's ``.pt``).
TOKEN_SUFFIXES = (".safetensors", ".bin", ".pt")
#: kohya's embedding key, and AUTOMATIC1111's (``{"string_to_param": {"*": rows}, "name": ...}``).
EMB_PARAMS, STRING_TO_PARAM = "emb_params", "string_to_param"
#: The safetensors metadata entry holding the token of a file we write under a portable name.
TOKEN_METADATA_KEY = "mergekit_cd_token"
#: Characters Windows forbids in file names (``<new1>`` is no file name there); check_token_name
#: already refuses path separators, whitespace and control characters.
_NOT_PORTABLE = '<>:"|?*'
#: Names Windows reserves for devices, whatever the extension.
_RESERVED_STEMS = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def load_token_state(file: Path) -> tuple[dict[Any, Any], dict[str, str]]:
    """A token file's flat dict, from safetensors or a pickle (mapped: a diffusers ``.bin``
    token file stores the whole embedding table its row is a view of), and its safetensors
    header metadata (none for a pickle)."""
    if file.suffix == ".safetensors":
        tensors, metadata = load_safetensors(file)
        return tensors, metadata or {}
    state = load_pickle(file, mmap=True)
    if not isinstance(state, dict):
        raise MergeError(f"{file}: expected a dict of tensors, found a {type(state).__name__}.")
    return state, {}


def is_token_file(path: Path) -> bool:
    """Whether ``path`` looks like a token embedding file by its keys (one of the layouts
    :func:`read_token_file` reads, or a single entry: diffusers' ``{"<token>": vector}``); the
    reader then checks it whole, with a message naming the file."""
    if not path.is_file() or path.suffix not in TOKEN_SUFFIXES:
        return False
    if path.suffix == ".safetensors":
        header = safetensors_header(path)
        keys = set(header[0]) if header is not None else set()
    else:
        state = load_pickle(path, mmap=True)
        keys = set(state) if isinstance(state, dict) else set()
    return bool(keys & {*SDXL_TOKEN_KEYS, EMB_PARAMS, STRING_TO_PARAM}) or (
        len(keys) == 1 and all(isinstance(key, str) for key in keys))


@dataclass(frozen=True)
class TokenFile:
    """What a token embedding file holds: its token's name, one vector per text encoder, and the
    layout it was found in, in words (``cd-inspect`` shows it)."""

    name: str
    embeddings: tuple[Tensor, ...]
    layout: str


def read_token_file(file: Path, where: str) -> tuple[str, tuple[Tensor, ...]]:
    """The token's name and embeddings of :func:`token_file`."""
    found = token_file(file, where)
    return found.name, found.embeddings


def token_file(file: Path, where: str) -> TokenFile:
    """One token's embeddings from the files the ecosystem shares: diffusers' ``{"<token>": vector}``
    (named by its key), and, named by the file as AUTOMATIC1111 names them, SDXL's
    ``{"clip_l", "clip_g"}``, kohya's ``{"emb_params"}`` and A1111's ``.pt`` (``string_to_param``
    ``{"*": rows}``, read with ``weights_only=True`` like every pickle); ``where`` says what the
    file is for the message (``"beside the LoRA"``). A token is one vector per text encoder.

    A file named by the portable name of the token its metadata records (:func:`portable_name`:
    ``new1.safetensors`` holding ``<new1>``, as the LoRA layouts write them) is that token; a
    renamed file is named by its file, as A1111 would name it.

    Copies: diffusers' training script saves a row of the whole embedding table, so a view
    would keep the table's storage.
    """
    state, metadata = load_token_state(file)
    source = str(file)
    recorded = metadata.get(TOKEN_METADATA_KEY)
    named = recorded if isinstance(recorded, str) and _portable(recorded) == file.stem else file.stem
    if set(state) == set(SDXL_TOKEN_KEYS):
        return TokenFile(named, tuple(check_vector(state[key], key, source) for key in SDXL_TOKEN_KEYS),
                         "SDXL clip_l / clip_g, named by its file")
    if set(state) == {EMB_PARAMS}:
        return TokenFile(named, (check_vector(state[EMB_PARAMS], EMB_PARAMS, source),),
                         f"kohya {EMB_PARAMS}, named by its file")
    if STRING_TO_PARAM in state:
        params = state[STRING_TO_PARAM]
        if not isinstance(params, dict) or set(params) != {"*"}:
            raise MergeError(f"{source}: {STRING_TO_PARAM} should be {{'*': rows}}, as AUTOMATIC1111 saves it.")
        return TokenFile(named, (check_vector(params["*"], f"{STRING_TO_PARAM}['*']", source),),
                         f"AUTOMATIC1111 {STRING_TO_PARAM}, named by its file")
    if len(state) == 1:
        name, value = next(iter(state.items()))
        return TokenFile(str(name), (check_vector(value, str(name), source),),
                         "diffusers {token: vector} (learned_embeds), named by its key")
    raise MergeError(f"{source}: expected a token embedding file {where} "
                     f"({{'<token>': vector}}, {{'clip_l', 'clip_g'}} for SDXL, {{'{EMB_PARAMS}'}} or A1111's "
                     f"{STRING_TO_PARAM}), found keys {natural_order(map(str, state))[:6]}.")


def read_token_folder(folder: Path, where: str, *, skip: Iterable[str] = (),
                      suffixes: tuple[str, ...] = TOKEN_SUFFIXES) -> dict[str, tuple[Tensor, ...]]:
    """Every token file in ``folder`` (entries with one of ``suffixes``, but the ``skip`` names),
    in natural name order; a token in two files is refused."""
    skipped = set(skip)
    # every entry with a token file's suffix is one (a FIFO or a dangling link is an error, not skipped)
    files = [file for file in sorted(folder.iterdir()) if file.name not in skipped and file.suffix in suffixes]
    check_token_count(len(files), str(folder))
    tokens: dict[str, tuple[Tensor, ...]] = {}
    origins: dict[str, Path] = {}
    for file in files:
        name, embeddings = read_token_file(file, where)
        if name in tokens:
            raise MergeError(f"{folder}: token {name} is in both {origins[name].name} and {file.name}.")
        tokens[name], origins[name] = embeddings, file
    return {name: tokens[name] for name in natural_order(tokens)}


def token_file_names(tokens: Iterable[str], target: Path, format_name: str,
                     reserved: Iterable[str] = (), *, portable: bool = False) -> dict[str, str]:
    """Token -> ``<token>.safetensors`` (``portable``: :func:`portable_name` ``.safetensors``, a
    name every file system holds), refusing a token that cannot be a file name (the one name
    rule, or one of the ``reserved`` names of the layout's own files) and tokens whose files
    would be one on a case-insensitive file system (one embedding silently replacing the
    other's on macOS and Windows) or under one portable name."""
    reserved_folded = {name.casefold() for name in reserved}
    names: dict[str, str] = {}
    seen: dict[str, str] = {}
    for token in tokens:
        check_token_name(token, f"Cannot write {target} as {format_name}")
        name = f"{portable_name(token, target, format_name) if portable else token}.safetensors"
        if name.casefold() in reserved_folded:
            raise MergeError(f"Cannot write {target} as {format_name}: token {token!r} cannot be a file name.")
        other = seen.setdefault(name.casefold(), token)
        if other != token:
            why = ("differ only in case, and their files would be one on a case-insensitive file system"
                   if other.casefold() == token.casefold() else
                   f"would have one file, {name}, once the characters Windows forbids are left out")
            raise MergeError(f"Cannot write {target} as {format_name}: tokens {other!r} and {token!r} {why}; "
                             f"rename one, or write the native format (one file).")
        names[token] = name
    return names


def portable_name(token: str, target: Path, format_name: str) -> str:
    """The token as a file stem every file system takes: Windows' forbidden characters left out
    (``<new1>`` -> ``new1``), refused when nothing or a device name (``CON``) would be left."""
    stem = _portable(token)
    if not stem or stem.casefold().split(".")[0] in _RESERVED_STEMS or stem.endswith("."):
        raise MergeError(f"Cannot write {target} as {format_name}: token {token!r} has no portable file name "
                         f"({stem!r} once the characters Windows forbids are left out); rename it.")
    return stem


def _portable(token: str) -> str:
    return "".join(char for char in token if char not in _NOT_PORTABLE)


def token_metadata(token: str) -> dict[str, str]:
    """The metadata that keeps a token in a file named by its portable name (:func:`read_token_file`)."""
    return {TOKEN_METADATA_KEY: token}


def token_state(token: str, embeddings: tuple[Tensor, ...], target: Path, format_name: str) -> dict[str, Tensor]:
    """``{token: vector}`` for one text encoder; ``{"clip_l": [1, d], "clip_g": [1, d]}`` for SDXL."""
    if len(embeddings) == 1:
        return {token: embeddings[0]}
    if len(embeddings) == 2:
        return {key: embedding[None] for key, embedding in zip(SDXL_TOKEN_KEYS, embeddings)}
    raise MergeError(f"Cannot write {target} as {format_name}: token {token} has {len(embeddings)} "
                     f"embeddings; the layout stores one (SD1/SD2) or two (SDXL).")


def token_folder_entries(folder: Path) -> list[str]:
    """What in a folder of token files is not one (``--force`` replaces only such a folder)."""
    return sorted(entry.name for entry in folder.iterdir()
                  if not (entry.is_file() and not entry.is_symlink() and entry.suffix == ".safetensors"))


def token_folder(path: str | os.PathLike[str], suffix: str) -> Path:
    """The folder of token files named ``<stem><suffix>`` beside the file ``path``."""
    path = Path(path)
    return path.with_name(path.stem + suffix)
