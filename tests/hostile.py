"""A small corpus of hostile and unlucky input files, each a few KB on disk, built in seconds.

Every reader is run against every file (``test_hostile_corpus.py``): each must give one clear
MergeError naming the file, in bounded time and memory. What each file is:

- ``giant-shape.safetensors``: a native file whose header claims a (32, 16777216) difference,
  sparse on disk (4 KB) but 2 GB of apparent size, so the claim is consistent with the file size;
- ``giant-token.safetensors``: the same for a token row;
- ``wide-tokens.safetensors``: 256 tokens of 4M values each (4 GB if every row were read);
- ``deep-metadata.safetensors``: metadata JSON nested 200,000 levels;
- ``huge-metadata.safetensors``: 2 MB of metadata JSON;
- ``duplicate-keys.safetensors``: metadata JSON giving one key twice;
- ``escape-token.safetensors``: a token named with an ANSI escape;
- ``zip-bomb.bin``: a torch zip whose ``data.pkl`` is deflated from 400 MB of padding;
- ``program-twice.bin``: a torch zip holding two ``data.pkl`` entries, a small one first (the one a
  check would read) and 300,000 ints last (the one torch runs);
- ``code.bin``: a pickle that would run ``os.system`` when loaded;
- ``many-ints.bin`` / ``many-ints-legacy.bin``: a million ints in a torch zip and in torch's old
  non-zip format (30 million took the weights-only unpickler minutes);
- ``truncated.bin`` / ``truncated.safetensors``: files cut short; ``empty.safetensors``: empty;
- ``fifo.bin``: a named pipe (reading it would block forever);
- ``giant-pickle.bin``: the authors' layout whose to_k is a (32, 1048576) tensor, sparse on disk
  (a torch zip, so the tensor is a view of the mapped file until something touches it);
- ``many-tokens.bin``: 300 tokens, each a row view of one embedding table as the authors' script
  saves them;
- ``overlapping-views.bin``: 80 K/V weights, each a 4M-value view of one sparse 16 MB storage, one
  value apart
  (validating and copying them, as readers do, cost 700 MB).
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

#: A real layer name of the tiny SD1 base (the shapes are what is hostile, not the names).
LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


def _raw_safetensors(path: Path, header: dict, data_bytes: int) -> Path:
    """A safetensors file from a hand-made header, its data a hole of ``data_bytes`` (sparse)."""
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        file.truncate(8 + len(encoded) + data_bytes)
    return path


def _sparse_layers(path: Path, layers: int, values: int = 32 * 2**17) -> Path:
    """A native file of ``layers`` layers whose to_k and to_v differences each hold ``values``
    float32 zeros (shape (32, values / 32)), its data a hole (sparse)."""
    size = values * 4
    header: dict = {"__metadata__": {"format": "mergekit-cd"}}
    for index in range(layers):
        for part, offset in (("to_k", 2 * index), ("to_v", 2 * index + 1)):
            header[f"{LAYER[:-1]}{index}.{part}.diff"] = {"dtype": "F32", "shape": [32, values // 32],
                                                         "data_offsets": [offset * size, (offset + 1) * size]}
    return _raw_safetensors(path, header, 2 * layers * size)


def _with_metadata(path: Path, metadata_json: str) -> Path:
    """A valid native file (one small difference) whose ``mergekit_cd`` metadata entry is ``metadata_json``."""
    tensors = {f"{LAYER}.to_k.diff": torch.zeros(32, 32), f"{LAYER}.to_v.diff": torch.zeros(32, 32)}
    save_file(tensors, str(path),
              metadata={"format": "mergekit-cd", "format_version": "1", "mergekit_cd": metadata_json})
    return path


class _Sparse:
    """A file object that seeks over runs of zeros instead of writing them: torch.save through it
    leaves a sparse file (the tensor's claim is consistent with the file, yet costs no disk)."""

    def __init__(self, file) -> None:
        self.file = file

    def write(self, data) -> int:
        data = memoryview(data)
        if len(data) >= 4096 and not np.frombuffer(data, dtype=np.uint8).any():
            self.file.seek(len(data), os.SEEK_CUR)
        else:
            self.file.write(data)
        return len(data)

    def flush(self) -> None:
        self.file.flush()


def _sparse_pickle(path: Path, folder: Path, values: int, build) -> Path:
    """``torch.save(build(storage))`` written sparsely, ``storage`` a float32 tensor of ``values`` zeros
    mapped from a sparse scratch file (so neither building nor saving holds it in memory)."""
    scratch = folder / "scratch"
    with open(scratch, "wb") as file:
        file.truncate(values * 4)
    storage = torch.from_file(str(scratch), shared=True, size=values)
    with open(path, "wb") as file:
        torch.save(build(storage), _Sparse(file))
        file.truncate(file.tell())
    del storage
    scratch.unlink()
    return path


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo hostile",))


def build_corpus(folder: Path) -> dict[str, Path]:
    """name -> path of every hostile file, written into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus: dict[str, Path] = {}
    giant = 32 * 16777216 * 4
    corpus["giant-shape"] = _raw_safetensors(folder / "giant-shape.safetensors", {
        "__metadata__": {"format": "mergekit-cd"},
        f"{LAYER}.to_k.diff": {"dtype": "F32", "shape": [32, 16777216], "data_offsets": [0, giant]},
        f"{LAYER}.to_v.diff": {"dtype": "F32", "shape": [32, 32], "data_offsets": [giant, giant + 4096]}},
        giant + 4096)
    corpus["giant-token"] = _raw_safetensors(folder / "giant-token.safetensors", {
        "__metadata__": {"format": "mergekit-cd"},
        "token.<new1>.0": {"dtype": "F32", "shape": [16777216, 64], "data_offsets": [0, 16777216 * 64 * 4]}},
        16777216 * 64 * 4)
    wide = 2**22 * 4  # each token row 4M values: within the tensor bound, 1,600 times an embedding's width
    corpus["wide-tokens"] = _raw_safetensors(folder / "wide-tokens.safetensors", {
        "__metadata__": {"format": "mergekit-cd"},
        **{f"token.<t{index}>.0": {"dtype": "F32", "shape": [2**22], "data_offsets": [index * wide, (index + 1) * wide]}
           for index in range(256)}}, 256 * wide)
    corpus["deep-metadata"] = _with_metadata(folder / "deep-metadata.safetensors", "[" * 200_000 + "]" * 200_000)
    corpus["huge-metadata"] = _with_metadata(folder / "huge-metadata.safetensors",
                                             json.dumps({"format_version": "1", "notes": "x" * 2**21}))
    corpus["duplicate-keys"] = _with_metadata(folder / "duplicate-keys.safetensors",
                                              '{"base": "a", "base": "b"}')
    escape = folder / "escape-token.safetensors"
    save_file({"token.<\x1b[31mred>.0": torch.zeros(32)}, str(escape), metadata={"format": "mergekit-cd"})
    corpus["escape-token"] = escape
    bomb = folder / "zip-bomb.bin"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("archive/data.pkl", "w") as member:  # streamed: 400 MB never held
            member.write(pickle.dumps({"unet": {}}, protocol=2))
            for _ in range(400):
                member.write(bytes(2**20))
        archive.writestr("archive/version", "3\n")
    corpus["zip-bomb"] = bomb
    twice = folder / "program-twice.bin"  # a small program first (the one checked), a big one last (the one run)
    torch.save({"unet": {}}, twice)
    with zipfile.ZipFile(twice, "a") as archive:
        program = next(name for name in archive.namelist() if name.endswith("/data.pkl"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns of the duplicate name it is asked to write
            archive.writestr(program, pickle.dumps({"unet": list(range(300_000))}, protocol=2))
    corpus["program-twice"] = twice
    code = folder / "code.bin"
    code.write_bytes(pickle.dumps({"unet": _RunsCode()}, protocol=2))
    corpus["code"] = code
    corpus["many-ints"] = folder / "many-ints.bin"
    torch.save({"unet": list(range(1_000_000))}, corpus["many-ints"])
    corpus["many-ints-legacy"] = folder / "many-ints-legacy.bin"
    torch.save({"unet": list(range(1_000_000))}, corpus["many-ints-legacy"], _use_new_zipfile_serialization=False)
    whole = folder / "whole.bin"
    torch.save({"unet": {f"{LAYER}.to_k.weight": torch.zeros(32, 32)}}, whole)
    corpus["truncated-bin"] = folder / "truncated.bin"
    corpus["truncated-bin"].write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    whole.unlink()
    corpus["truncated-safetensors"] = folder / "truncated.safetensors"
    _with_metadata(corpus["truncated-safetensors"], "{}")
    data = corpus["truncated-safetensors"].read_bytes()
    corpus["truncated-safetensors"].write_bytes(data[: len(data) - 100])
    corpus["empty"] = folder / "empty.safetensors"
    corpus["empty"].write_bytes(b"")
    corpus["giant-pickle"] = _sparse_pickle(folder / "giant-pickle.bin", folder, 2**25, lambda storage: {
        "unet": {f"{LAYER}.to_k.weight": storage.view(32, 2**20), f"{LAYER}.to_v.weight": torch.zeros(32, 32)}})
    table = torch.zeros(300, 32, requires_grad=True)
    torch.save({"unet": {f"{LAYER}.to_k.weight": torch.zeros(32, 32), f"{LAYER}.to_v.weight": torch.zeros(32, 32)},
                "modifier_token": {f"<t{index}>": table[index] for index in range(300)}}, folder / "many-tokens.bin")
    corpus["many-tokens"] = folder / "many-tokens.bin"
    corpus["overlapping-views"] = _sparse_pickle(folder / "overlapping-views.bin", folder, 2**22 + 80, lambda storage: {
        "unet": {f"{LAYER[:-1]}{index}.{part}.weight": storage[offset:offset + 2**22].view(32, 2**17)
                 for index in range(40) for part, offset in (("to_k", 2 * index), ("to_v", 2 * index + 1))}})
    if hasattr(os, "mkfifo"):
        corpus["fifo"] = folder / "fifo.bin"
        os.mkfifo(corpus["fifo"])
    return corpus
