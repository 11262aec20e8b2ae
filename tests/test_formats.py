"""File formats: round trips, conversions, metadata, atomic writes, and every bad input's message.

Layer names and shapes come from the tiny pipelines, so the files look like real ones of each
architecture (sd1/sd2: 11 cross-attention layers; sdxl: 17, context 160 = 64 + 96).
"""

from __future__ import annotations

import errno
import functools
import gc
import json
import os
import pickle
import stat
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from mergekit_cd import Concept, ConceptDelta, LayerDelta, LowRank, MergeError
from mergekit_cd import formats
from mergekit_cd.base import open_base
from mergekit_cd.cli import convert as cd_convert
from mergekit_cd.cli import inspect as cd_inspect
from mergekit_cd.delta import LazyLayers
from mergekit_cd import fileio
from mergekit_cd.fileio import atomic_path, load_pickle
from mergekit_cd.formats import _common, authors_bin, compvis, diffusers_layout, native
from mergekit_cd.metadata import provenance_from_metadata, to_metadata
from mergekit_cd.weights import FineTunedWeights

from cli_output import one_error_line

TOKEN_SIZES = {"sd1": (64,), "sd2": (96,), "sdxl": (64, 96)}
FINGERPRINT = "ab" * 32
LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
FILE_NAMES = {"native": "delta.safetensors", "diffusers": "out", "authors-bin": "delta.bin",
              "compvis": "delta_epoch=000001.ckpt"}


@functools.cache
def layer_shapes(architecture: str) -> dict[str, tuple[int, int]]:
    """Cross-attention layer -> (out, context) of the tiny pipeline's UNet."""
    from mergekit_cd.testing import build_tiny_pipeline

    suffix = ".to_k.weight"
    state = build_tiny_pipeline(architecture).unet.state_dict()
    return {key[: -len(suffix)]: tuple(value.shape) for key, value in state.items()
            if key.endswith("attn2" + suffix)}


def make_tokens(architecture: str, generator: torch.Generator,
                names: tuple[str, ...] = ("<new1>", "<new2>")) -> dict[str, tuple[torch.Tensor, ...]]:
    return {name: tuple(torch.randn(size, generator=generator) for size in TOKEN_SIZES[architecture])
            for name in names}


def identity(architecture: str) -> dict:
    return dict(base=f"tiny-{architecture}", base_fingerprint=FINGERPRINT, architecture=architecture,
                concepts=(Concept("<new1>", "cat", ("photo of a <new1> cat",)),
                          Concept("<new2>", None, ("painting in the style of <new2>",), style=True)),
                metadata={"recipe": {"method": "hard", "inputs": [{"path": "a.bin", "sha256": "00"}],
                                     "ridge": 0.0}})


def make_weights(architecture: str, seed: int = 0, **names) -> FineTunedWeights:
    """Full weights with two tokens, shaped like the tiny pipeline's."""
    generator = torch.Generator().manual_seed(seed)
    layers = {name: (torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
              for name, shape in layer_shapes(architecture).items()}
    return FineTunedWeights(layers, make_tokens(architecture, generator, **names), **identity(architecture))


def make_delta(architecture: str, seed: int = 0, rank: int | None = None, **names) -> ConceptDelta:
    """Differences with two tokens; low-rank factors when ``rank`` is given."""
    generator = torch.Generator().manual_seed(seed)

    def difference(shape: tuple[int, int]) -> torch.Tensor | LowRank:
        if rank is None:
            return torch.randn(shape, generator=generator)
        return LowRank(torch.randn(shape[0], rank, generator=generator),
                       torch.randn(rank, shape[1], generator=generator))

    layers = {name: LayerDelta(difference(shape), difference(shape))
              for name, shape in layer_shapes(architecture).items()}
    return ConceptDelta(layers, make_tokens(architecture, generator, **names), **identity(architecture))


def make_object(kind: str, architecture: str, **names) -> FineTunedWeights | ConceptDelta:
    if kind == "weights":
        return make_weights(architecture, **names)
    return make_delta(architecture, rank=3 if kind == "low_rank" else None, **names)


def assert_same_tokens(a, b) -> None:
    assert list(a.tokens) == list(b.tokens)
    for name, embeddings in a.tokens.items():
        assert len(embeddings) == len(b.tokens[name])
        assert all(torch.equal(x, y) for x, y in zip(embeddings, b.tokens[name]))


def assert_same_content(a, b) -> None:
    """Same type, layers (bit for bit; factors stay factors) and tokens."""
    assert type(a) is type(b) and a.layers.keys() == b.layers.keys()
    for name, layer in a.layers.items():
        theirs = b.layers[name]
        pairs = zip(layer, theirs) if isinstance(a, FineTunedWeights) \
            else zip((layer.key, layer.value), (theirs.key, theirs.value))
        for x, y in pairs:
            assert type(x) is type(y)
            if isinstance(x, LowRank):
                assert torch.equal(x.up, y.up) and torch.equal(x.down, y.down)
            else:
                assert torch.equal(x, y)
    assert_same_tokens(a, b)


def assert_same_identity(a, b) -> None:
    assert (a.base, a.base_fingerprint, a.architecture, a.concepts) == \
           (b.base, b.base_fingerprint, b.architecture, b.concepts)
    assert a.metadata["recipe"] == b.metadata["recipe"]


# ---------------------------------------------------------------------------- round trips
def test_every_format_module_offers_the_same_interface():
    from mergekit_cd.formats.protocol import Format

    assert formats.format_names() == ["native", "diffusers", "authors-bin", "compvis", "diffusers-lora", "kohya-lora"]
    for module in formats.FORMATS:
        assert isinstance(module, Format), module.__name__
        assert len(module.__doc__.strip().splitlines()) == 1
        assert isinstance(module.WRITES_FULL_WEIGHTS, bool) and isinstance(module.STORES_FACTORS, bool)
        assert isinstance(module.FACTORS_ONLY, bool) and (module.STORES_FACTORS or not module.FACTORS_ONLY)
        assert module.ARCHITECTURES is None or set(module.ARCHITECTURES) <= {"sd1", "sd2", "sdxl"}
        assert module.OUTPUT_SUFFIX is None or module.OUTPUT_SUFFIX == "" or module.OUTPUT_SUFFIX.startswith(".")
        assert module.foreign_entries is None or callable(module.foreign_entries)
        assert module.STORES_STATISTICS == (module.NAME == "native")
        assert all(callable(getattr(module, verb)) for verb in ("detect", "read", "write"))
    assert formats.OUTPUT_SUFFIXES == {".safetensors": "native", ".bin": "authors-bin", ".ckpt": "compvis"}
    assert formats.FOLDER_FORMAT == "diffusers"
    assert formats.OUTPUT_FORMAT_HELP.startswith("output format; default: from the output name: .safetensors "
                                                 "native, .bin authors-bin, .ckpt compvis, no extension (or an "
                                                 "existing folder) the diffusers folder layout")


ROUND_TRIPS = [
    ("native", "sd1", "delta"), ("native", "sd2", "low_rank"), ("native", "sdxl", "delta"),
    ("native", "sdxl", "low_rank"),
    ("diffusers", "sd1", "weights"), ("diffusers", "sd2", "weights"), ("diffusers", "sdxl", "weights"),
    ("authors-bin", "sd1", "weights"), ("authors-bin", "sdxl", "weights"),
    ("authors-bin", "sd1", "low_rank"), ("authors-bin", "sdxl", "low_rank"),
    ("compvis", "sd1", "weights"), ("compvis", "sd2", "weights"), ("compvis", "sd1", "low_rank"),
]


@pytest.mark.parametrize("format_name, architecture, kind", ROUND_TRIPS)
def test_write_detect_read_gives_the_same_object(tmp_path, format_name, architecture, kind):
    """write -> detect -> read returns every layer and every token (both, for two-token deltas)."""
    original = make_object(kind, architecture)
    path = tmp_path / FILE_NAMES[format_name]
    formats.write(original, path, format_name)
    assert formats.detect_format(path).NAME == format_name
    back = formats.read(path)
    assert_same_content(original, back)
    assert_same_identity(original, back)  # every format keeps the metadata (pickles: one JSON entry)


def test_sdxl_token_files_use_the_clip_l_clip_g_layout(tmp_path):
    formats.write(make_weights("sdxl"), tmp_path / "out", "diffusers")
    state = load_file(tmp_path / "out" / "<new1>.safetensors")
    assert {key: tuple(value.shape) for key, value in state.items()} == \
           {"clip_l": (1, 64), "clip_g": (1, 96)}


def test_diffusers_weights_file_uses_diffusers_key_names(tmp_path):
    formats.write(make_weights("sd1"), tmp_path / "out", "diffusers")
    keys = set(load_file(tmp_path / "out" / "pytorch_custom_diffusion_weights.safetensors"))
    assert f"{LAYER}.processor.to_k_custom_diffusion.weight" in keys
    assert len(keys) == 2 * len(layer_shapes("sd1"))
    assert formats.detect_format(tmp_path / "out" / "pytorch_custom_diffusion_weights.safetensors") \
        is diffusers_layout


def test_compvis_block_names_match_the_reference_mapping():
    """input_blocks.i.1 -> down_blocks.{i//3}.attentions.{0 if i in (1,4,7) else 1}, and back."""
    for i in (1, 2, 4, 5, 7, 8):
        name = compvis.to_diffusers_name(f"input_blocks.{i}.1.transformer_blocks.0.attn2")
        attention = 0 if i in (1, 4, 7) else 1
        assert name == f"down_blocks.{i // 3}.attentions.{attention}.transformer_blocks.0.attn2"
    for i in range(3, 12):
        assert compvis.to_diffusers_name(f"output_blocks.{i}.1.x") == \
            f"up_blocks.{i // 3}.attentions.{i % 3}.x"
    assert compvis.to_diffusers_name("middle_block.1.x") == "mid_block.attentions.0.x"
    for layer in layer_shapes("sd1"):
        assert compvis.to_diffusers_name(compvis.to_compvis_name(layer)) == layer


# ---------------------------------------------------------------------------- conversions
def test_full_weights_convert_between_all_full_weight_formats(tmp_path):
    original = make_weights("sd1")
    current = original
    for index, format_name in enumerate(["diffusers", "authors-bin", "compvis", "diffusers"]):
        path = tmp_path / f"{index}-{FILE_NAMES[format_name]}"
        formats.write(current, path, format_name)
        current = formats.read(path)
    assert_same_content(original, current)


def test_sdxl_full_weights_convert_through_the_authors_bin(tmp_path):
    original = make_weights("sdxl")
    formats.write(original, tmp_path / "delta.bin", "authors-bin")
    formats.write(formats.read(tmp_path / "delta.bin"), tmp_path / "out", "diffusers")
    assert_same_content(original, formats.read(tmp_path / "out"))


def test_low_rank_differences_stay_low_rank_through_every_difference_format(tmp_path):
    original = make_delta("sd1", rank=2)
    current = original
    for index, format_name in enumerate(["authors-bin", "compvis", "native"]):
        path = tmp_path / f"{index}-{FILE_NAMES[format_name]}"
        formats.write(current, path, format_name)
        current = formats.read(path)
    assert_same_content(original, current)
    assert all(isinstance(layer.key, LowRank) for layer in current.layers.values())


def test_compvis_tokens_are_positional_unless_our_metadata_names_them(tmp_path):
    """CompVis stores only rows: the authors' files give <new1>, <new2> in row order; ours
    record the names in their metadata (names outside that pattern are kept; rows go in name
    order, tests/test_peer_files.py has the rest)."""
    original = make_weights("sd1", names=("<dog>", "<cat>"))
    formats.write(original, tmp_path / "delta.ckpt", "compvis")
    assert list(formats.read(tmp_path / "delta.ckpt").tokens) == ["<cat>", "<dog>"]
    contents = torch.load(tmp_path / "delta.ckpt", weights_only=True)
    del contents["mergekit_cd"]
    torch.save(contents, tmp_path / "authors.ckpt")
    back = formats.read(tmp_path / "authors.ckpt")
    assert list(back.tokens) == ["<new1>", "<new2>"]
    assert torch.equal(back.tokens["<new1>"][0], original.tokens["<cat>"][0])
    assert (back.base, back.base_fingerprint, back.concepts) == (None, None, ())


def test_authors_bin_keeps_every_token_and_lists_ignored_weights(tmp_path):
    shape = (32, 32)
    torch.save({"unet": {f"{LAYER}.to_k.weight": torch.ones(shape), f"{LAYER}.to_v.weight": torch.ones(shape),
                         f"{LAYER}.to_q.weight": torch.ones(shape), f"{LAYER}.to_out.0.bias": torch.ones(32)},
                "modifier_token": {"<new1>": torch.ones(32), "<new2>": torch.zeros(32)},
                "text_encoder": {}}, tmp_path / "delta.bin")
    weights = formats.read(tmp_path / "delta.bin")
    assert list(weights.tokens) == ["<new1>", "<new2>"]
    assert set(weights.ignored) == {"text_encoder", f"{LAYER}.to_q.weight", f"{LAYER}.to_out.0.bias"}


def test_diffusers_bin_weights_with_empty_processor_entries_read(tmp_path):
    """The .bin variant diffusers saves holds ``{}`` for every processor without weights."""
    folder = tmp_path / "out"
    folder.mkdir()
    shape = (32, 32)
    torch.save({f"{LAYER}.processor.to_k_custom_diffusion.weight": torch.ones(shape),
                f"{LAYER}.processor.to_v_custom_diffusion.weight": torch.ones(shape),
                f"{LAYER}.processor.to_out_custom_diffusion.0.weight": torch.ones(shape),
                LAYER.replace("attn2", "attn1") + ".processor": {}},
               folder / "pytorch_custom_diffusion_weights.bin")
    torch.save({"<new1>": torch.ones(32)}, folder / "<new1>.bin")
    weights = formats.read(folder)
    assert list(weights.layers) == [LAYER] and list(weights.tokens) == ["<new1>"]
    assert weights.ignored == (f"{LAYER}.processor.to_out_custom_diffusion.0.weight",)
    assert isinstance(weights.layers, LazyLayers)  # a zip pickle: read a layer at a time


# ---------------------------------------------------------------------------- metadata
def test_metadata_document_round_trips():
    delta = make_delta("sdxl")
    document = json.loads(json.dumps(to_metadata(delta)))
    assert document["format_version"] == "1" and document["tool"]["name"] == "mergekit-cd"
    assert document["concepts"][1] == {"token": "<new2>", "class_word": None,
                                       "prompts": ["painting in the style of <new2>"], "style": True}
    provenance = provenance_from_metadata(document)
    assert provenance.concepts == delta.concepts and provenance.base == delta.base
    assert provenance.metadata["recipe"] == delta.metadata["recipe"]
    assert (provenance.architecture, provenance.base_fingerprint) == (delta.architecture, delta.base_fingerprint)


def test_native_header_carries_the_metadata(tmp_path):
    formats.write(make_delta("sd1"), tmp_path / "d.safetensors", "native")
    with safe_open(str(tmp_path / "d.safetensors"), framework="pt") as file:
        header = file.metadata()
    assert header["format"] == "mergekit-cd" and header["format_version"] == "1"
    assert json.loads(header["mergekit_cd"])["base_fingerprint"] == FINGERPRINT


def test_a_native_write_copies_no_layer_whose_key_and_value_share_a_tensor(tmp_path, monkeypatch):
    """A merge's K and V of a layer are the two halves of one tensor: the writer hands safetensors
    those halves as they are (it writes each one's own bytes), where copying them held the whole
    result twice while it was written; a tensor overlapping another (one tensor under two names)
    is still copied, as safetensors refuses overlapping tensors, and the file reads back equal."""
    delta = make_delta("sdxl")
    stacked = {name: torch.cat([layer.key, layer.value]) for name, layer in delta.layers.items()}
    halves = ConceptDelta({name: LayerDelta(*rows.split(rows.shape[0] // 2)) for name, rows in stacked.items()},
                          delta.tokens, base=delta.base, base_fingerprint=FINGERPRINT, architecture="sdxl")
    handed: dict[str, torch.Tensor] = {}

    def spy(tensors, path, metadata=None):
        handed.update(tensors)
        fileio.save_safetensors(tensors, path, metadata)

    monkeypatch.setattr(native, "save_safetensors", spy)
    formats.write(halves, tmp_path / "d.safetensors", "native")
    for name, rows in stacked.items():
        key, value = handed[f"{name}.to_k.diff"], handed[f"{name}.to_v.diff"]
        assert key.data_ptr() == rows.data_ptr() and value.data_ptr() == rows[rows.shape[0] // 2:].data_ptr()
    back = formats.read(tmp_path / "d.safetensors")
    assert all(torch.equal(back.layers[name].key, layer.key) and torch.equal(back.layers[name].value, layer.value)
               for name, layer in halves.layers.items())

    table, other = torch.randn(8, 4), torch.randn(8, 4)
    saved = _common.saveable({"a": table, "b": table, "row": table[2], "top": other[:5], "rest": other[5:]})
    assert saved["a"].data_ptr() == table.data_ptr() and saved["top"].data_ptr() == other.data_ptr()
    assert saved["rest"].data_ptr() == other[5:].data_ptr()
    assert all(not _overlap(saved[name], table) for name in ("b", "row"))
    save_file(saved, tmp_path / "shared.safetensors")
    assert all(torch.equal(load_file(tmp_path / "shared.safetensors")[name], tensor) for name, tensor in saved.items())


def _overlap(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Whether the bytes of two tensors overlap."""
    return first.data_ptr() < second.data_ptr() + second.nbytes and second.data_ptr() < first.data_ptr() + first.nbytes


@pytest.mark.parametrize("document, message", [
    ('{"format_version": "1", "base": "a", "base": "b"}', "gives the key 'base' twice"),
    ('{"format_version": "1", "recipe": ' + "[" * 200_000 + "1" + "]" * 200_000 + "}",
     "nests deeper than 32 levels"),  # 400 KB: under the metadata size bound, so the depth is what is refused
], ids=["duplicate-key", "nested-200000"])
@pytest.mark.parametrize("command", ["cd-inspect", "cd-merge"])
def test_hostile_native_metadata_is_one_error_line(tmp_path, document, message, command, tiny_pipeline_path,
                                                   capsys):
    """Issue 16, item 6: a RecursionError traceback before; the last duplicate silently won.
    cd-merge runs as its own process, as a user runs it (stderr holds only what it prints)."""
    import subprocess

    path = tmp_path / "hostile.safetensors"
    save_file({f"{LAYER}.to_k.diff": torch.ones(4, 3), f"{LAYER}.to_v.diff": torch.ones(4, 3)}, path,
              metadata={"format": "mergekit-cd", "format_version": "1", "mergekit_cd": document})
    if command == "cd-inspect":
        code, err = cd_inspect.main([str(path)]), capsys.readouterr().err
    else:
        other = tmp_path / "other.safetensors"
        other.write_bytes(path.read_bytes())
        run = subprocess.run([sys.executable, "-m", "mergekit_cd.cli.merge", str(path), str(other), "-o",
                              str(tmp_path / "out.safetensors"), "--base", str(tiny_pipeline_path("sd1")), "-q"],
                             capture_output=True, text=True, timeout=300)
        code, err = run.returncode, run.stderr
    ours = [line for line in err.splitlines() if not line.startswith("[transformers]")]
    assert code == 1 and len(ours) == 1, err
    assert ours[0].startswith(f"{command}: error: {path}: the mergekit-cd metadata in the header {message}")
    assert not (tmp_path / "out.safetensors").exists()


def test_files_without_metadata_read_with_unknown_identity(tmp_path):
    save_file({f"{LAYER}.to_k.diff": torch.ones(4, 3), f"{LAYER}.to_v.diff": torch.ones(4, 3)},
              tmp_path / "plain.safetensors")
    delta = formats.read(tmp_path / "plain.safetensors")
    assert (delta.base, delta.base_fingerprint, delta.architecture, delta.concepts) == (None, None, None, ())


def test_newer_metadata_version_is_refused(tmp_path):
    header = {"format": "mergekit-cd", "format_version": "1",
              "mergekit_cd": json.dumps({"format_version": "2", "base": None})}
    save_file({f"{LAYER}.to_k.diff": torch.ones(4, 3), f"{LAYER}.to_v.diff": torch.ones(4, 3)},
              tmp_path / "new.safetensors", metadata=header)
    with pytest.raises(MergeError, match=r"new\.safetensors: metadata format_version '2' is not one "
                                         r"this mergekit-cd reads \('1'\); upgrade mergekit-cd"):
        formats.read(tmp_path / "new.safetensors")


def test_metadata_that_is_not_json_is_refused_before_writing(tmp_path):
    delta = make_delta("sd1")
    delta.metadata["recipe"] = {"weights": torch.ones(2)}
    with pytest.raises(MergeError, match="metadata cannot be stored as JSON"):
        formats.write(delta, tmp_path / "d.safetensors", "native")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- atomic writes
def test_existing_output_is_refused_without_force_and_replaced_with_it(tmp_path):
    path = tmp_path / "d.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(MergeError, match=r"d\.safetensors exists; pass --force to overwrite"):
        formats.write(make_delta("sd1"), path, "native")
    assert path.read_bytes() == b"old"
    formats.write(make_delta("sd1"), path, "native", force=True)
    assert_same_content(make_delta("sd1"), formats.read(path))


def test_forced_write_replaces_an_output_folder(tmp_path):
    formats.write(make_weights("sd1", names=("<a>", "<b>")), tmp_path / "out", "diffusers")
    formats.write(make_weights("sd1", seed=1), tmp_path / "out", "diffusers", force=True)
    assert_same_content(make_weights("sd1", seed=1), formats.read(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("name", ["notes.txt", "model.safetensors"])
def test_forced_write_never_replaces_a_folder_holding_other_things(tmp_path, name):
    """A folder of anything but this layout's files (e.g. someone's model) survives --force."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / name).write_text("keep me")
    with pytest.raises(MergeError, match=rf"out holds other things than a Custom Diffusion output "
                                         rf"\(e\.g\. {name}\); refusing to replace it"):
        formats.write(make_weights("sd1"), tmp_path / "out", "diffusers", force=True)
    assert (tmp_path / "out" / name).read_text() == "keep me"


def _failing_save_file(calls_before_failure: int):
    """A save_file that writes real files, then half a file and fails (like a full disk)."""
    calls = []

    def save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) > calls_before_failure:
            Path(filename).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        save_file(tensors, filename, metadata=metadata)

    return save


def test_a_failed_file_write_leaves_neither_output_nor_leftovers(tmp_path, monkeypatch):
    path = tmp_path / "d.safetensors"
    formats.write(make_delta("sd1"), path, "native")
    before = path.read_bytes()
    monkeypatch.setattr(fileio, "save_file", _failing_save_file(0))
    with pytest.raises(MergeError, match=r"Cannot write .*d\.safetensors: No space left on device"):
        formats.write(make_delta("sd1", seed=1), path, "native", force=True)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]
    with pytest.raises(MergeError, match="No space left on device"):
        formats.write(make_delta("sd1"), tmp_path / "new.safetensors", "native")
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]


def test_a_failed_folder_write_leaves_neither_output_nor_leftovers(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "save_file", _failing_save_file(2))  # fails on a token file
    with pytest.raises(MergeError, match=r"Cannot write .*out: No space left on device"):
        formats.write(make_weights("sd1"), tmp_path / "out", "diffusers")
    assert list(tmp_path.iterdir()) == []


def test_write_failures_of_either_library_become_one_clear_error(tmp_path, monkeypatch):
    """safetensors reports I/O failures as SafetensorError, torch.save as RuntimeError."""
    def safetensors_fails(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def torch_fails(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(fileio, "save_file", safetensors_fails)
    monkeypatch.setattr(torch, "save", torch_fails)
    with pytest.raises(MergeError, match=r"Cannot write .*d\.safetensors: .*No space left on device"):
        formats.write(make_delta("sd1"), tmp_path / "d.safetensors", "native")
    with pytest.raises(MergeError, match=r"Cannot write .*delta\.bin: \[enforce fail"):
        formats.write(make_weights("sd1"), tmp_path / "delta.bin", "authors-bin")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_under_a_pickle_says_so(tmp_path, monkeypatch):
    """torch.save says only ``[enforce fail at inline_container.cc:672] ... file write failed`` on a
    full disk; the space left tells it apart from other I/O errors (issue 16, item 5)."""
    import shutil
    from collections import namedtuple

    def torch_fails(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                           "file data/0: file write failed")

    monkeypatch.setattr(torch, "save", torch_fails)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 4096, 4096))
    with pytest.raises(MergeError, match=r"^Cannot write .*delta\.bin: No space left on device\.$"):
        formats.write(make_weights("sd1"), tmp_path / "delta.bin", "authors-bin")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["fifo.safetensors", "fifo.bin", "fifo"])
def test_a_fifo_or_a_device_is_not_a_regular_file(tmp_path, name, capsys):
    """Both report size 0: they were called "the file is empty" (issue 16, item 9)."""
    from mergekit_cd.cli import inspect as cd_inspect

    fifo = tmp_path / name
    os.mkfifo(fifo)
    with pytest.raises(MergeError, match=r"fifo.*: not a regular file \(a FIFO \(named pipe\)\)"):
        formats.read(fifo)
    if os.path.exists("/dev/zero"):
        with pytest.raises(MergeError, match=r"^/dev/zero: not a regular file \(a device\)"):
            formats.read("/dev/zero")
    assert cd_inspect.main([str(fifo)]) == 1
    assert "not a regular file" in capsys.readouterr().err


@pytest.mark.parametrize("fmt, name", [("native", "d.safetensors"), ("authors-bin", "d.bin"),
                                       ("compvis", "d.ckpt"), ("diffusers", "d")])
def test_outputs_are_byte_reproducible_and_follow_the_umask(tmp_path, fmt, name):
    """The same content gives the same bytes (safetensors wrote its metadata in hash order, torch
    named the archive after the temporary file and drew a serialization id), and every file's
    mode follows the umask (safetensors created 0600, torch 0644): issue 16, item 9."""
    content = make_delta("sd1") if fmt == "native" else make_weights("sd1")
    files = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        formats.write(content, tmp_path / run / name, fmt)
        path = tmp_path / run / name
        files.append({p.relative_to(path).as_posix() if path.is_dir() else p.name: p
                      for p in (sorted(path.iterdir()) if path.is_dir() else [path])})
    assert files[0].keys() == files[1].keys()
    mask = os.umask(0o022)
    os.umask(mask)
    for key, first in files[0].items():
        assert first.read_bytes() == files[1][key].read_bytes(), key
        assert stat.S_IMODE(first.stat().st_mode) == 0o666 & ~mask, key


def test_a_bug_inside_an_atomic_write_propagates_unchanged_and_cleans_up(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with atomic_path(tmp_path / "x", force=False, folder=True) as folder:
            (folder / "file").write_text("half")
            1 / 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("folder", [False, True, "empty"])
def test_without_force_an_output_that_appears_while_writing_is_never_replaced(tmp_path, folder):
    """Between the existence check and the rename another writer may create the output: without
    --force it is claimed exclusively (a hard link for a file, mkdir for a folder: a rename would
    replace an empty folder), so theirs stays and ours is one error, with no temporary left
    (issue 16, item 8)."""
    if folder == "empty":
        target = tmp_path / "out"
        with pytest.raises(MergeError, match=r"it appeared while the output was written"):
            with atomic_path(target, force=False, folder=True) as temporary:
                (temporary / "ours").write_text("ours")
                target.mkdir()
        assert [p.name for p in tmp_path.iterdir()] == ["out"] and list(target.iterdir()) == []
        return
    target = tmp_path / ("out" if folder else "d.safetensors")
    with pytest.raises(MergeError, match=r"^Cannot write .*: it appeared while the output was written \(another "
                                         r"writer\?\); pass --force to overwrite\.$"):
        with atomic_path(target, force=False, folder=folder) as temporary:
            if folder:
                (temporary / "ours").write_text("ours")
                target.mkdir()
                (target / "theirs").write_text("theirs")
            else:
                temporary.write_text("ours")
                target.write_text("theirs")
    assert (target / "theirs" if folder else target).read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    if folder:
        assert [p.name for p in target.iterdir()] == ["theirs"]
    with atomic_path(target, force=True, folder=folder, foreign_entries=lambda path: []) as temporary:
        (temporary / "ours" if folder else temporary).write_text("ours")
    assert (target / "ours" if folder else target).read_text() == "ours"


def test_a_full_cache_disk_only_warns(tiny_pipeline_path, tmp_path, monkeypatch):
    """safetensors reports a full disk as SafetensorError: the Gram cache write warned only for
    OSError, so a full cache folder crashed the merge with a traceback (issue 16, item 5)."""
    from mergekit_cd import feature_cache

    def full(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(fileio, "save_file", full)
    with pytest.warns(UserWarning, match=r"Could not cache the Gram matrix .*No space left on device"):
        gram, count, from_cache = feature_cache.cached_gram(open_base(tiny_pipeline_path("sd1")), ["a photo of a cat"],
                                                       cache_dir=tmp_path)
    # no Gram file, whole or partial (the memo of the text files' digests is JSON, not a safetensors write)
    assert gram.shape[0] == gram.shape[1] and not from_cache
    assert [path.name for path in tmp_path.iterdir() if path.name != fileio.STAT_MEMO] == []


@pytest.mark.parametrize("destination, message", [
    ("missing/d.safetensors", r"Cannot write .*missing/d\.safetensors: folder .*missing does not exist"),
    ("file.txt/d.safetensors", r"Cannot write .*file\.txt/d\.safetensors: .*file\.txt is not a folder"),
])
def test_unwritable_destinations_are_named(tmp_path, destination, message):
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(MergeError, match=message):
        formats.write(make_delta("sd1"), tmp_path / destination, "native")


# ---------------------------------------------------------------------------- writers refuse
@pytest.mark.parametrize("format_name, obj, message", [
    ("diffusers", lambda: make_delta("sd1"), "the format holds full fine-tuned weights but this is a "
                                             "ConceptDelta"),
    ("native", lambda: make_weights("sd1"), "the format holds differences but this is FineTunedWeights"),
    ("compvis", lambda: make_weights("sdxl"), "CompVis checkpoints exist only for SD1/SD2"),
    ("authors-bin", lambda: make_delta("sd1"), "holds a dense difference; compress the delta first"),
])
def test_writers_refuse_what_their_format_cannot_hold(tmp_path, format_name, obj, message):
    with pytest.raises(MergeError, match=f"Cannot write .* as {format_name}: .*{message}"):
        formats.write(obj(), tmp_path / "out", format_name)
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_name():
    with pytest.raises(MergeError, match="Unknown format 'lora'; expected one of native, diffusers, "
                                         "authors-bin, compvis"):
        formats.get_format("lora")


# ---------------------------------------------------------------------------- bad inputs
class RunsCode:
    """Unpickling this would create ``marker``: the loader must refuse before that happens."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("save", [
    lambda obj, path: torch.save(obj, path),
    lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=2)),
], ids=["torch-zip", "plain-pickle"])
def test_a_pickle_that_would_run_code_is_refused_without_running(tmp_path, save):
    marker = tmp_path / "MARKER"
    path = tmp_path / "delta.bin"
    save({"unet": RunsCode(marker), "modifier_token": {}}, path)
    message = r"delta\.bin: needs more than plain tensors to load \(it would run code: .*open\); refused"
    for reader in (formats.read, authors_bin.read, compvis.read, load_pickle):
        with pytest.raises(MergeError, match=message):
            reader(path)
    assert not marker.exists()


def _truncated(tmp_path: Path, format_name: str) -> Path:
    path = tmp_path / FILE_NAMES[format_name]
    formats.write(make_object("weights" if format_name != "native" else "delta", "sd1"), path, format_name)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


@pytest.mark.parametrize("make, message", [
    (lambda tmp: _truncated(tmp, "authors-bin"),
     r"delta\.bin: truncated or corrupt \(PytorchStreamReader failed reading zip archive"),
    (lambda tmp: _truncated(tmp, "native"), r"delta\.safetensors: truncated or corrupt safetensors file"),
    (lambda tmp: _write(tmp / "x.ckpt", b""), r"x\.ckpt: truncated or corrupt \(the file is empty\)"),
    (lambda tmp: _write(tmp / "x.safetensors", b""),
     r"x\.safetensors: truncated or corrupt \(the file is empty\)"),
    (lambda tmp: _write(tmp / "x.ckpt", bytes(range(256)) * 4),
     r"x\.ckpt: not a plain-tensor torch file \(Unsupported operand .*\); truncated or corrupt"),
    (lambda tmp: _saved(tmp / "x.bin", [1, 2]),
     r"x\.bin: not a Custom Diffusion file mergekit-cd reads; found a torch pickle holding a list of 2 "
     r"items\. Formats: native, diffusers, authors-bin, compvis, diffusers-lora, kohya-lora\.$"),
    # no hint at a --format no command has
    (lambda tmp: _write_safetensors(tmp / "x.safetensors", {"foo": torch.ones(2)}),
     r"found a safetensors file with keys \['foo'\] \(1 keys\)"),
    (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty",
     r"empty: not a Custom Diffusion .*found an empty folder"),
    (lambda tmp: tmp / "absent.bin", r"absent\.bin: no such file or folder"),
], ids=["truncated-pickle", "truncated-safetensors", "empty-pickle", "empty-safetensors", "random-bytes",
        "wrong-container", "foreign-safetensors", "empty-folder", "missing"])
def test_unreadable_files_are_one_clear_error(tmp_path, make, message):
    with pytest.raises(MergeError, match=message):
        formats.read(make(tmp_path))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _saved(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def _write_safetensors(path: Path, tensors: dict) -> Path:
    save_file(tensors, path)
    return path


def _authors(unet: dict, tokens: dict | None = None) -> dict:
    return {"unet": unet, "modifier_token": {"<new1>": torch.ones(32)} if tokens is None else tokens}


K, V = f"{LAYER}.to_k.weight", f"{LAYER}.to_v.weight"
OTHER = "mid_block.attentions.0.transformer_blocks.0.attn2"
NAN = torch.full((64, 32), float("nan"))


@pytest.mark.parametrize("contents, message", [
    (_authors({K: torch.ones(32, 32), V: torch.ones(32, 32), f"{OTHER}.to_k.weight": NAN,
               f"{OTHER}.to_v.weight": NAN}),
     f"{OTHER}.to_k.weight holds NaN or infinite values"),
    (_authors({K: torch.ones(32, 32)}), f"layer {LAYER} has to_k but no to_v"),
    (_authors({K: torch.ones(32, 32), V: torch.ones(32, 32, dtype=torch.int64)}),
     rf"{V} should be a 2-D float weight matrix, found a int64 tensor of shape \(32, 32\)"),
    (_authors({K: torch.ones(32), V: torch.ones(32, 32)}),
     rf"{K} should be a 2-D float weight matrix, found a float32 tensor of shape \(32,\)"),
    (_authors({K: torch.ones(32, 32), V: torch.ones(32, 32), f"{OTHER}.to_k.weight": torch.ones(64, 16),
               f"{OTHER}.to_v.weight": torch.ones(64, 16)}),
     f"{OTHER}.to_k.weight reads 16 features but {K} reads 32"),
    (_authors({K: torch.ones(32, 32), V: torch.ones(32, 32)}, {"<new1>": torch.ones(2, 3)}),
     r"token embedding modifier_token\['<new1>'\] holds 2 vectors; a Custom Diffusion token is one"),
    (_authors({K: torch.ones(32, 32), V: torch.ones(32, 32)}, {"<new1>": torch.tensor([1.0, float("inf")])}),
     r"modifier_token\['<new1>'\] holds NaN or infinite values"),
    (_authors({K: torch.ones(32, 32), V: torch.ones(32, 32), "conv_in.weight": torch.ones(2, 2)}),
     r"unexpected key 'conv_in\.weight'; expected '<layer>\.to_k\.weight'"),
    (_authors({}), "holds no cross-attention to_k/to_v weights"),
    (_authors({K: torch.ones(32, 32), V: {"u": torch.ones(32, 1), "v": torch.ones(1, 32)}}),
     "mixes full weight matrices and compressed differences"),
    (_authors({K: {"u": torch.ones(32, 2), "v": torch.ones(1, 32)}, V: torch.ones(32, 32)}),
     r"factors do not fit: u is \(32, 2\), v is \(1, 32\)"),
    (_authors({K: torch.ones(32, 32), V: torch.ones(32, 32)}, [torch.ones(32)]),
     "modifier_token should be a dict token -> embedding, found a list of 1 items"),
], ids=["nan", "missing-to_v", "integer", "one-dimensional", "context-mismatch", "token-matrix",
        "token-inf", "unknown-key", "no-layers", "mixed", "factors", "token-container"])
def test_bad_authors_bin_contents_are_named(tmp_path, contents, message):
    path = _saved(tmp_path / "delta.bin", contents)
    with pytest.raises(MergeError, match=rf"delta\.bin: .*{message}"):
        formats.read(path)


@pytest.mark.parametrize("contents, message", [
    ({"state_dict": {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
                     torch.ones(4, 4), "embed": torch.ones(2, 4, dtype=torch.int32)}},
     r"embed should be float token rows \[n, d\], found a int32 tensor"),
    ({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.ones(4, 4)}},
     r"unexpected key 'model\.diffusion_model\.input_blocks\.0\.0\.weight'"),
    ({"state_dict": {"model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight":
                     torch.ones(4, 4)}},
     "layer mid_block.attentions.0.transformer_blocks.0.attn2 has to_k but no to_v"),
], ids=["embed-type", "unknown-key", "missing-to_v"])
def test_bad_compvis_contents_are_named(tmp_path, contents, message):
    path = _saved(tmp_path / "delta.ckpt", contents)
    with pytest.raises(MergeError, match=rf"delta\.ckpt: .*{message}"):
        formats.read(path)


def test_wrong_containers_are_named_by_each_reader(tmp_path):
    path = _saved(tmp_path / "x.bin", {"weights": torch.ones(2)})
    with pytest.raises(MergeError, match=r"x\.bin: expected the authors' delta layout .*found a dict with "
                                         r"keys \['weights'\]"):
        authors_bin.read(path)
    with pytest.raises(MergeError, match=r"x\.bin: expected the authors' CompVis layout"):
        compvis.read(path)


def test_bad_native_contents_are_named(tmp_path):
    path = _write_safetensors(tmp_path / "d.safetensors", {f"{LAYER}.to_k.up": torch.ones(4, 1),
                                                           f"{LAYER}.to_v.diff": torch.ones(4, 3)})
    with pytest.raises(MergeError, match=rf"d\.safetensors: {LAYER}\.to_k\.up has no matching "
                                         rf"{LAYER}\.to_k\.down"):
        formats.read(path)
    path = _write_safetensors(tmp_path / "e.safetensors", {f"{LAYER}.to_k.diff": torch.ones(4, 3),
                                                           f"{LAYER}.to_v.diff": torch.ones(4, 3),
                                                           "token.<new1>.1": torch.ones(3)})
    with pytest.raises(MergeError, match=r"token <new1> has embeddings for encoders \[1\]; expected 0 to 0"):
        native.read(path)


def test_a_stray_file_beside_diffusers_weights_is_named(tmp_path):
    formats.write(make_weights("sd1"), tmp_path / "out", "diffusers")
    save_file({"a": torch.ones(2), "b": torch.ones(2)}, tmp_path / "out" / "extra.safetensors")
    with pytest.raises(MergeError, match=r"extra\.safetensors: expected a token embedding file beside the "
                                         r"Custom Diffusion weights .* found keys \['a', 'b'\]"):
        formats.read(tmp_path / "out")


# ---------------------------------------------------------------------------- diffusers itself
def test_diffusers_loads_the_written_token_file_and_parses_the_weights(tmp_path):
    from mergekit_cd.testing import build_tiny_pipeline

    weights = make_weights("sd1")
    formats.write(weights, tmp_path / "out", "diffusers")
    pipe = build_tiny_pipeline("sd1")
    pipe.load_textual_inversion(tmp_path / "out", weight_name="<new1>.safetensors")
    token_id = pipe.tokenizer.convert_tokens_to_ids("<new1>")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id].detach(),
                       weights.tokens["<new1>"][0])
    # diffusers' own parser of Custom Diffusion weight files (load_attn_procs installs nothing
    # in diffusers 0.29-0.42, see REFERENCE section 4, so its parser is checked directly).
    state = load_file(tmp_path / "out" / "pytorch_custom_diffusion_weights.safetensors")
    processors = pipe.unet._process_custom_diffusion(state_dict=state)
    for layer, (key, value) in weights.layers.items():
        processor = processors[f"{layer}.processor"]
        assert torch.equal(processor.to_k_custom_diffusion.weight.detach(), key)
        assert torch.equal(processor.to_v_custom_diffusion.weight.detach(), value)


def test_diffusers_loads_the_sdxl_token_file_into_both_encoders(tmp_path):
    """The documented SDXL recipe: clip_l into text_encoder, clip_g into text_encoder_2."""
    from mergekit_cd.testing import build_tiny_pipeline

    weights = make_weights("sdxl")
    formats.write(weights, tmp_path / "out", "diffusers")
    state = load_file(tmp_path / "out" / "<new1>.safetensors")
    pipe = build_tiny_pipeline("sdxl")
    pipe.load_textual_inversion(state["clip_l"], token="<new1>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="<new1>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    for index, (tokenizer, encoder) in enumerate([(pipe.tokenizer, pipe.text_encoder),
                                                  (pipe.tokenizer_2, pipe.text_encoder_2)]):
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("<new1>")]
        assert torch.equal(row.detach(), weights.tokens["<new1>"][index])


def test_truncated_and_random_pickles_are_one_error_never_a_traceback(tmp_path):
    """Corrupt pickle bytes fail in many places inside pickle; every one is a MergeError."""
    import io
    import random

    from mergekit_cd.fileio import load_pickle

    buffer = io.BytesIO()
    torch.save({"unet": {"a": torch.ones(3)}}, buffer, _use_new_zipfile_serialization=False)
    legacy = buffer.getvalue()
    rng = random.Random(0)
    samples = [legacy[:n] for n in range(1, len(legacy), max(1, len(legacy) // 60))]
    samples += [bytes(rng.randrange(256) for _ in range(rng.randrange(2, 200))) for _ in range(60)]
    for index, data in enumerate(samples):
        path = tmp_path / f"bad{index}.bin"
        path.write_bytes(data)
        try:
            load_pickle(path)
        except MergeError as error:
            assert str(path) in str(error)


def test_a_zip_pickle_cut_anywhere_is_called_truncated(tmp_path):
    """torch's zip reader fails on an archive cut short with a bare OSError ("Invalid argument")."""
    import io

    buffer = io.BytesIO()
    torch.save({"unet": {"a": torch.ones(64, 64)}}, buffer)
    data = buffer.getvalue()
    for size in range(1, len(data), max(1, len(data) // 40)):
        path = tmp_path / f"cut{size}.bin"
        path.write_bytes(data[:size])
        with pytest.raises(MergeError) as caught:
            load_pickle(path)
        message = str(caught.value)
        assert message.startswith(f"{path}: ") and "truncated" in message, message
        assert "Invalid argument" not in message, message


def test_native_layers_stream_from_the_file_and_notice_a_replaced_file(tiny_delta_files, tmp_path):
    """Native deltas are validated on load, then read layer by layer when used (LazyLayers)."""
    import os
    import shutil

    from mergekit_cd.delta import LazyLayers
    from mergekit_cd.formats import native

    files = tiny_delta_files("sd1")
    path = tmp_path / "lazy.safetensors"
    shutil.copy(files["native"], path)
    delta = native.read(path)
    assert isinstance(delta.layers, LazyLayers)
    assert delta.allclose(files["object"], rtol=0, atol=0)
    name = next(iter(delta.layers))
    assert delta.layers.shapes()[name][0] == files["object"].layers[name].key.shape
    copy = delta.dense()  # an in-memory copy outlives the file
    replacement = files["object"] * 2.0
    native.write(replacement, path, force=True)
    os.utime(path, ns=(1, 1))  # a different modification time even on coarse clocks
    with pytest.raises(MergeError, match="changed after it was read"):
        delta.layers[name]
    assert copy.allclose(files["object"], rtol=0, atol=0)


# ---------------------------------------------------------------------------- non-native layers stream
STREAMED = [("authors-bin", "weights"), ("authors-bin", "low_rank"), ("compvis", "weights"),
            ("compvis", "low_rank"), ("diffusers", "weights")]


@pytest.mark.parametrize("format_name, kind", STREAMED)
def test_non_native_layers_stream_from_their_file_and_notice_a_replaced_file(tmp_path, format_name, kind):
    """Validated on read holding one tensor at a time, then read again per layer when used."""
    original = make_object(kind, "sd1")
    path = tmp_path / FILE_NAMES[format_name]
    formats.write(original, path, format_name)
    back = formats.read(path)
    assert isinstance(back.layers, LazyLayers)
    assert back.layers.shapes()[LAYER][0] == layer_shapes("sd1")[LAYER]
    assert_same_content(original, back)
    replacement = make_weights("sd1", seed=1) if kind == "weights" else make_delta("sd1", seed=1, rank=3)
    formats.write(replacement, path, format_name, force=True)
    os.utime(path, ns=(1, 1))  # a different modification time even on coarse clocks
    with pytest.raises(MergeError, match="changed after it was read; load it again"):
        back.layers[LAYER]


def test_an_old_non_zip_pickle_is_read_whole_and_checked_alike(tmp_path):
    """torch cannot memory-map pickles from before its zip format: those are kept in memory."""
    original = make_weights("sd1")
    formats.write(original, tmp_path / "delta.bin", "authors-bin")
    contents = torch.load(tmp_path / "delta.bin", weights_only=True)
    torch.save(contents, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    back = formats.read(tmp_path / "old.bin")
    assert isinstance(back.layers, dict)
    assert_same_content(original, back)
    assert_same_identity(original, back)
    contents["unet"][f"{LAYER}.to_v.weight"][0, 0] = float("inf")
    torch.save(contents, tmp_path / "bad.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(MergeError, match=rf"bad\.bin: {LAYER}\.to_v\.weight holds NaN or infinite values"):
        formats.read(tmp_path / "bad.bin")


@pytest.mark.parametrize("format_name, kind", [("diffusers", "weights"), ("compvis", "low_rank")])
def test_a_non_finite_value_is_named_by_file_and_key(tmp_path, format_name, kind):
    path = tmp_path / FILE_NAMES[format_name]
    formats.write(make_object(kind, "sd1"), path, format_name)
    if format_name == "diffusers":
        weights_file = path / "pytorch_custom_diffusion_weights.safetensors"
        with safe_open(str(weights_file), "pt") as handle:
            header = handle.metadata()
        tensors = load_file(weights_file)
        key = f"{LAYER}.processor.to_k_custom_diffusion.weight"
        tensors[key][1, 2] = float("nan")
        save_file(tensors, weights_file, metadata=header)
        expected = rf"{weights_file.name}: {key} holds NaN"
    else:
        contents = torch.load(path, weights_only=True)
        key = f"model.diffusion_model.{compvis.to_compvis_name(LAYER)}.to_v.weight"
        contents["state_dict"][key]["v"][0, 0] = float("-inf")
        torch.save(contents, path)
        expected = rf"{path.name}: {key}\['v'\] holds NaN or infinite values"
    with pytest.raises(MergeError, match=expected):
        formats.read(path)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_read_pickle_keeps_no_view_into_its_file(tmp_path):
    """The authors save a token as a row of the whole embedding table (a view: torch.save stores
    all of the table); what is read keeps no view into the table, its layers are copies, and once
    the delta is dropped no mapping of the file is left (while it is used, its layers are read
    from one mapping)."""
    table = torch.randn(4000, 32)
    path = _saved(tmp_path / "delta.bin", {"unet": {K: torch.ones(32, 32), V: torch.zeros(32, 32)},
                                           "modifier_token": {"<new1>": table[7]}})
    weights = formats.read(path)
    embedding = weights.tokens["<new1>"][0]
    assert torch.equal(embedding, table[7]) and embedding.untyped_storage().nbytes() == 32 * 4
    key, _ = weights.layers[LAYER]
    assert torch.equal(key, torch.ones(32, 32)) and key.untyped_storage().nbytes() == 32 * 32 * 4
    del weights
    gc.collect()
    with open("/proc/self/maps") as maps:
        assert str(path) not in maps.read()


def test_full_weights_become_differences_per_layer_only_against_a_base_model(tiny_pipeline_path, tmp_path):
    """Against a BaseModel (its files do not change) each difference is made when its layer is
    read; against any other source of base weights (a live pipeline that apply() is about to
    change) all of them are made at once."""
    base = open_base(tiny_pipeline_path("sd1"))
    names = base.layer_names()
    weights = FineTunedWeights({name: tuple(w + 1 for w in base.kv(name)) for name in names})
    formats.write(weights, tmp_path / "delta.bin", "authors-bin")
    stored = formats.read(tmp_path / "delta.bin")
    assert stored.shapes() == base.kv_shapes()
    streamed = stored.to_delta(base.kv)
    assert isinstance(streamed.layers, LazyLayers)
    assert all(torch.allclose(streamed.layers[name].value, torch.ones(shape)) for name, (_, shape)
               in base.kv_shapes().items())
    live = {name: base.kv(name) for name in names}
    made_now = stored.to_delta(lambda name: live[name])
    for key, value in live.values():
        key += 5
    assert isinstance(made_now.layers, dict)
    assert torch.allclose(made_now.layers[names[0]].key, torch.ones(base.kv_shapes()[names[0]][0]))


# ---------------------------------------------------------------------------- our metadata in .bin / .ckpt
@pytest.mark.parametrize("format_name, kind", [("authors-bin", "weights"), ("authors-bin", "low_rank"),
                                               ("compvis", "weights"), ("compvis", "low_rank")])
def test_pickles_hold_our_metadata_as_one_json_string_beside_the_authors_keys(tmp_path, format_name, kind):
    original = make_object(kind, "sd1")
    path = tmp_path / FILE_NAMES[format_name]
    formats.write(original, path, format_name)
    contents = torch.load(path, weights_only=True)
    authors_keys = {"authors-bin": {"unet", "modifier_token"}, "compvis": {"state_dict"}}[format_name]
    assert set(contents) == authors_keys | {"mergekit_cd"} and isinstance(contents["mergekit_cd"], str)
    document = json.loads(contents["mergekit_cd"])
    assert (document["base"], document["base_fingerprint"], document["architecture"]) == \
           ("tiny-sd1", FINGERPRINT, "sd1")
    assert document["concepts"][0] == {"token": "<new1>", "class_word": "cat",
                                       "prompts": ["photo of a <new1> cat"], "style": False}
    back = formats.read(path)
    assert_same_identity(original, back)
    assert back.concepts[1].style and back.concepts[1].prompts == ("painting in the style of <new2>",)


@pytest.mark.parametrize("entry, message", [
    (3, r"'mergekit_cd' should hold mergekit-cd's metadata as a JSON string, found a int"),
    ("{not json", r"the mergekit-cd metadata in 'mergekit_cd' is not valid JSON"),
    (json.dumps({"format_version": "2"}), r"metadata format_version '2' is not one this mergekit-cd reads"),
    (json.dumps({"format_version": "1", "architecture": 3}), r"metadata field 'architecture' must be a string"),
    (json.dumps({"format_version": "1", "concepts": 5}), r"metadata field 'concepts' must be a list"),
    ('{"format_version": "1", "base": "a", "base": "b"}', r"the mergekit-cd metadata in 'mergekit_cd' gives the key 'base' twice"),
    ('{"format_version": "1", "recipe": ' + "[" * 200_000 + "]" * 200_000 + "}",
     r"the mergekit-cd metadata in 'mergekit_cd' nests deeper than 32 levels"),
    ('{"format_version": "1", "recipe": ' + "[" * 40 + "]" * 40 + "}",
     r"the mergekit-cd metadata in 'mergekit_cd' nests deeper than 32 levels"),
], ids=["not-a-string", "not-json", "newer-version", "bad-field", "concepts-not-a-list", "duplicate-key",
        "nested-200000", "nested-40"])
def test_bad_metadata_in_a_pickle_is_named(tmp_path, entry, message):
    path = _saved(tmp_path / "delta.bin", {**_authors({K: torch.ones(32, 32), V: torch.ones(32, 32)}),
                                           "mergekit_cd": entry})
    with pytest.raises(MergeError, match=rf"delta\.bin: {message}"):
        formats.read(path)


def test_compvis_token_names_must_fit_the_rows(tmp_path):
    path = tmp_path / "delta.ckpt"
    formats.write(make_weights("sd1"), path, "compvis")
    contents = torch.load(path, weights_only=True)
    contents["mergekit_cd"] = json.dumps({**json.loads(contents["mergekit_cd"]), "tokens": ["<a>"]})
    torch.save(contents, path)
    with pytest.raises(MergeError, match=r"delta\.ckpt: the metadata names tokens \['<a>'\] for the 2 rows "
                                         r"of embed; expected one distinct name per row"):
        formats.read(path)


@pytest.mark.parametrize("format_name", ["authors-bin", "compvis"])
def test_pickle_metadata_that_is_not_json_is_refused_before_writing(tmp_path, format_name):
    weights = make_weights("sd1")
    weights.metadata["recipe"] = {"weights": torch.ones(2)}
    with pytest.raises(MergeError, match="metadata cannot be stored as JSON"):
        formats.write(weights, tmp_path / FILE_NAMES[format_name], format_name)
    assert list(tmp_path.iterdir()) == []


def test_cd_inspect_shows_the_base_a_converted_bin_records(tiny_pipeline_path, tiny_delta_files, tmp_path,
                                                           capsys):
    files = tiny_delta_files("sd1")
    output = tmp_path / "cat.bin"
    assert cd_convert.main([str(files["native"]), "-o", str(output), "--base",
                            str(tiny_pipeline_path("sd1"))]) == 0
    assert cd_inspect.main([str(output)]) == 0
    out = capsys.readouterr().out
    delta = files["object"]
    for text in ("format:       authors-bin (full fine-tuned weights)", "architecture: sd1, text features: 64",
                 f"base:         {delta.base} (fingerprint {delta.base_fingerprint[:16]})",
                 "concepts:     <new1> = cat"):
        assert text in out, text


HOSTILE_NAMES = ["<new\x1b[2J1>", "<a\nb>", "../../escape", "", "<" + "x" * 200 + ">"]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=["ansi", "newline", "traversal", "empty", "long"])
@pytest.mark.parametrize("layout", ["native", "authors-bin", "diffusers-bin"])
def test_hostile_token_names_are_refused_when_read_and_shown_escaped(tmp_path, name, layout, capsys):
    """Issue 16, item 7: one token-name rule for every reader; cd-inspect printed such names raw."""
    if layout == "native":
        path = _write_safetensors(tmp_path / "d.safetensors", {f"{LAYER}.to_k.diff": torch.ones(32, 32),
                                                                f"{LAYER}.to_v.diff": torch.ones(32, 32),
                                                                f"token.{name}.0": torch.ones(32)})
    elif layout == "authors-bin":
        path = _saved(tmp_path / "delta.bin", _authors({K: torch.ones(32, 32), V: torch.ones(32, 32)},
                                                       {name: torch.ones(32)}))
    else:
        path = tmp_path / "out"
        path.mkdir()
        torch.save({f"{LAYER}.processor.to_k_custom_diffusion.weight": torch.ones(32, 32),
                    f"{LAYER}.processor.to_v_custom_diffusion.weight": torch.ones(32, 32)},
                   path / "pytorch_custom_diffusion_weights.bin")
        torch.save({name: torch.ones(32)}, path / "new.bin")
    with pytest.raises(MergeError, match=r"token .*(holds whitespace|cannot name a file|must be a non-empty|is 202)|key .token\.\.0"):
        formats.read(path)
    assert cd_inspect.main([str(path)]) == 1
    assert "\x1b" not in one_error_line(capsys, "cd-inspect")


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=["ansi", "newline", "traversal", "empty", "long"])
@pytest.mark.parametrize("format_name", ["native", "diffusers", "authors-bin", "compvis"])
def test_hostile_token_names_are_never_written(tmp_path, name, format_name):
    with pytest.raises(MergeError, match="Token "):
        make_delta("sd1", names=(name,))
    weights = make_weights("sd1", names=(name,))  # full weights are not checked on creation ...
    target = tmp_path / FILE_NAMES[format_name]
    with pytest.raises(MergeError, match=r"Cannot write .*: token "):
        formats.write(weights, target, format_name)  # ... but never written
    assert list(tmp_path.iterdir()) == []
