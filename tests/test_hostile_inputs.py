"""Hostile and unlucky inputs beyond single files (issue 16): what a merge may ask for as a whole,
outputs that would land inside the base, text from files reaching the terminal, odd entries in a
diffusers folder. Each case is one error line naming the problem, before any work."""

from __future__ import annotations

import importlib
import os
import shutil
import sys

import pytest
import torch

from mergekit_cd import MergeError, formats, merge
from mergekit_cd.base import open_base
from mergekit_cd.cli import convert as cd_convert
from mergekit_cd.cli import inspect as cd_inspect
from mergekit_cd.cli import merge as cd_merge
from mergekit_cd.cli import train as cd_train
from mergekit_cd.delta import Concept, ConceptDelta
from mergekit_cd.limits import MAX_MERGE_PROMPTS, MAX_PROMPTS, OVERRIDE
from mergekit_cd.metadata import parse_document, provenance_from_metadata
from mergekit_cd.testing import random_concept_delta

from cli_output import one_error_line

#: The module (the package's ``merge`` attribute is the function).
MERGE_MODULE = importlib.import_module("mergekit_cd.merge")


pytestmark = pytest.mark.usefixtures("tiny_models")  # built before any test captures output


def _crowded_file(base_path, folder) -> str:
    """256 tokens of 100 target prompts each: every per-file bound met, 25,600 prompts together
    (before the merge-wide bounds, cd-merge died in a 182 GB SVD)."""
    base = open_base(base_path)
    one = random_concept_delta(base, "<t0>", "cat", seed=3)
    names = [f"<t{index}>" for index in range(256)]
    concepts = tuple(Concept(name, "cat", tuple(f"photo {i} of a {name} cat" for i in range(MAX_PROMPTS)))
                     for name in names)
    crowded = ConceptDelta(dict(one.layers), {name: one.tokens["<t0>"] for name in names}, base=one.base,
                           base_fingerprint=one.base_fingerprint, architecture=one.architecture, concepts=concepts)
    path = folder / "crowded.safetensors"
    formats.write(crowded, path, "native")
    return str(path)


def test_a_merge_asking_for_too_many_prompts_is_one_error_before_any_encoding(tiny_pipeline_path, tmp_path,
                                                                             capsys, monkeypatch):
    base = tiny_pipeline_path("sd1")
    path = _crowded_file(base, tmp_path)
    capsys.readouterr()  # the text encoder's loading messages
    monkeypatch.setattr(MERGE_MODULE, "cached_sets", lambda *a, **k: pytest.fail("encoded target prompts"))
    code = cd_merge.main([path, "--base", str(base), "-o", str(tmp_path / "out.safetensors"), "-q"])
    assert code == 1
    assert one_error_line(capsys, "cd-merge") == (
        f"The merge: its concepts have 25,600 target prompts, more than the {MAX_MERGE_PROMPTS:,} any real merge "
        f"needs; refused (set {OVERRIDE}=1 if you mean it).")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_concept_given_too_many_templates_is_refused_as_its_file_would_be(tiny_pipeline_path, tiny_delta_files):
    templates = [f"photo {i} of a {{token}} {{class_word}}" for i in range(MAX_PROMPTS + 1)]
    with pytest.raises(MergeError, match=rf"^The merge: the concept '<new1>' would have {MAX_PROMPTS + 1} target "
                                         rf"prompts, more than the {MAX_PROMPTS}"):
        merge([tiny_delta_files("sd1")["native"]], ["a photo"], base=tiny_pipeline_path("sd1"),
              target_templates=templates)


def _prompts_only(cached_sets):
    """``cached_sets`` that encodes target prompts and fails the test when asked for a Gram matrix."""
    def encode(base, sets, **options):
        if any(text_set.gram for text_set in sets):
            pytest.fail("encoded captions")
        return cached_sets(base, sets, **options)
    return encode


def test_the_constraint_rows_of_a_merge_are_bounded(tiny_pipeline_path, tiny_delta_files, monkeypatch):
    """The solve's factorisation and dependence report grow with the square of the rows; the bound
    is checked as soon as the target prompts are encoded, before anything is solved."""
    files = tiny_delta_files("sd1")
    monkeypatch.setattr(MERGE_MODULE, "MAX_CONSTRAINT_ROWS", 5)
    monkeypatch.setattr(MERGE_MODULE, "cached_sets", _prompts_only(MERGE_MODULE.cached_sets))
    with pytest.raises(MergeError, match=r"^The merge: its target prompts give \d\d+ constraint rows to solve \(each "
                                         r"concept's at most the feature width, 64\), more than the 5 any real merge "
                                         r"needs"):
        merge([files["native"], files["other-native"]], ["a photo"], base=tiny_pipeline_path("sd1"))


#: Six concepts of ten prompts each: under the pipeline rule 77 rows a prompt, 4,620 in all.
MANY_PROMPTS = dict(class_words=["cat", "pot", "dog", "cup", "car", "hat"],
                    target_templates=[f"photo {i} of a {{token}} {{class_word}}" for i in range(10)])


@pytest.fixture(scope="module")
def six_concepts(tiny_pipeline_path):
    base = open_base(tiny_pipeline_path("sd1"))
    return base, [random_concept_delta(base, "<new1>", word, seed=40 + i)
                  for i, word in enumerate(MANY_PROMPTS["class_words"])]


@pytest.mark.parametrize("method", ["constrained", "soft", "hybrid"])
def test_a_merge_of_many_padded_prompts_is_bounded_by_the_rows_it_solves(six_concepts, method, monkeypatch):
    """Each concept's 770 rows span at most the feature width (64 on the tiny base), and the solve
    takes that many: the bound counts those, so 4,620 rows of 6 x 10 prompts pass even the 4,096 the
    bound was before it counted them (at SD1.5's width they solve 4,608, within today's 8,192)."""
    base, deltas = six_concepts
    monkeypatch.setattr(MERGE_MODULE, "MAX_CONSTRAINT_ROWS", 4_096)
    merged, report = merge(deltas, ["a photo of a cat", "a red pot"], base=base, method=method, rows="pipeline",
                           return_report=True, **MANY_PROMPTS)
    assert len(merged.concepts) == 6 and all(len(concept.prompts) == 10 for concept in merged.concepts)
    assert report.solve_info.n_constraints == 6 * 64
    if method == "hybrid":  # its token rows (7 a prompt here) and its context rows are reduced alike
        assert all(record.context_features.shape[0] == 64 for record in merged.statistics.concepts)
    else:
        assert any("its 770 target rows span at most 64 feature directions" in note for note in report.notes)


@pytest.mark.parametrize(("method", "kind", "bound", "solved"), [
    ("constrained", "constraint", "MAX_CONSTRAINT_ROWS", 6 * 64),
    ("hybrid", "constraint and context", "MAX_SOLVED_ROWS", 6 * (64 + 64))])
def test_a_merge_of_more_rows_to_solve_than_the_bound_is_refused_before_any_caption_is_encoded(
        six_concepts, method, kind, bound, solved, monkeypatch):
    """Counted as the solve takes them (6 x 64 constraint rows here, not 4,620; the hybrid's 70 token
    and 700 context rows a concept are 64 each), and refused before the captions' Gram matrix or
    anything solved."""
    base, deltas = six_concepts
    monkeypatch.setattr(MERGE_MODULE, bound, solved - 1)
    monkeypatch.setattr(MERGE_MODULE, "cached_sets", _prompts_only(MERGE_MODULE.cached_sets))
    with pytest.raises(MergeError, match=rf"^The merge: its target prompts give {solved} {kind} rows to solve \(each "
                                         rf"concept's at most the feature width, 64\), more than the {solved - 1} any "
                                         rf"real merge needs; refused \(set {OVERRIDE}=1 if you mean it\)\.$"):
        merge(deltas, ["a photo"], base=base, method=method, rows="pipeline", **MANY_PROMPTS)


@pytest.mark.parametrize("command", ["cd-merge", "cd-convert", "cd-train"])
def test_an_output_inside_the_base_is_refused_even_with_force(command, tiny_pipeline_path, tiny_delta_files,
                                                              tmp_path, capsys):
    """``-o BASE/unet --force`` replaced the base's UNet with the merged delta's folder."""
    base = tmp_path / "base"
    shutil.copytree(tiny_pipeline_path("sd1"), base)
    before = {str(file): file.read_bytes() for file in sorted(base.rglob("*")) if file.is_file()}
    output = base / "unet"
    native = str(tiny_delta_files("sd1")["native"])
    if command == "cd-merge":
        code = cd_merge.main([native, "--base", str(base), "-o", str(output), "--force", "-q"])
    elif command == "cd-convert":
        code = cd_convert.main([native, "--base", str(base), "-o", str(output), "--force"])
    else:
        images = tmp_path / "cat"
        images.mkdir()
        code = cd_train.main(["--base", str(base), "--instance-dir", str(images), "--class-word", "cat",
                              "-o", str(output), "--force"])
    message = one_error_line(capsys, command)
    assert code == 1 and f"it lies inside the input {base}" in message and "(even with --force)" in message
    assert {str(file): file.read_bytes() for file in sorted(base.rglob("*")) if file.is_file()} == before


def test_text_from_a_file_reaches_the_terminal_escaped(tiny_pipeline_path, tmp_path, capsys):
    """cd-inspect printed the base name, class words, prompts and keys a file records as they were:
    an ANSI escape there could rewrite the user's terminal."""
    base = open_base(tiny_pipeline_path("sd1"))
    delta = random_concept_delta(base, "<new1>", "cat", seed=4)
    evil = "\x1b]0;pwned\x07\x1b[2J"
    hostile = ConceptDelta(dict(delta.layers), dict(delta.tokens), base=f"base{evil}",
                           base_fingerprint=delta.base_fingerprint, architecture=delta.architecture,
                           concepts=(Concept("<new1>", f"cat{evil}", (f"photo of a <new1> cat{evil}",)),),
                           metadata={"notes": evil})
    path = tmp_path / "evil.safetensors"
    formats.write(hostile, path, "native")
    assert cd_inspect.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert r"base\x1b]0;pwned\x07\x1b[2J" in out and r"<new1> = cat\x1b]0;pwned" in out
    # every command's stdout: cd-merge's report names each concept's class word
    assert cd_merge.main([str(path), "--base", str(tiny_pipeline_path("sd1")), "-o", str(tmp_path / "o.safetensors"),
                          "--num-reg-captions", "20", "-q"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and r"cat\x1b]0;pwned" in out


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_a_fifo_among_a_diffusers_folders_token_files_is_an_error_not_skipped(tiny_delta_files, tmp_path):
    folder = tmp_path / "delta"
    shutil.copytree(tiny_delta_files("sd1")["diffusers"], folder)
    os.mkfifo(folder / "<new2>.bin")
    with pytest.raises(MergeError, match=r"<new2>\.bin: not a regular file \(a FIFO \(named pipe\)\)"):
        formats.read(folder)
    (folder / "<new2>.bin").unlink()
    (folder / "<new2>.bin").symlink_to(tmp_path / "gone.bin")
    with pytest.raises(MergeError, match=r"Cannot read .*<new2>\.bin: No such file or directory"):
        formats.read(folder)


def test_a_null_metadata_document_is_not_called_nested():
    with pytest.raises(MergeError, match=r"^x: mergekit-cd metadata must be a JSON object, got NoneType\.$"):
        provenance_from_metadata(parse_document("null", source="x", where="the header"), source="x")


if sys.platform == "win32":  # pragma: no cover - FIFOs, symlinks
    pytestmark = [pytestmark, pytest.mark.skip("POSIX file semantics")]


GROWTH_SCRIPT = """
import resource, sys
from mergekit_cd import load
from mergekit_cd.errors import MergeError
normal, hostile, base = sys.argv[1:4]
load(normal, base=base)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
try:
    load(hostile, base=base)
    print("accepted")
except MergeError as error:
    print(error)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
"""


def test_a_file_read_for_a_base_is_bounded_by_that_base_before_its_tensors_are_read(tiny_pipeline_path,
                                                                                     tiny_delta_files, tmp_path):
    """Within the fixed bounds (4M values a tensor) a sparse 4 KB file still claimed 16 MB per
    tensor; read for a base, no tensor may declare more than the base's largest K/V weight."""
    import subprocess

    from hostile import LAYER, _raw_safetensors

    values = 32 * 2**17  # 4M: exactly the fixed bound, far past the tiny base's 32 x 32
    size = values * 4
    path = _raw_safetensors(tmp_path / "big.safetensors", {
        "__metadata__": {"format": "mergekit-cd"},
        f"{LAYER}.to_k.diff": {"dtype": "F32", "shape": [32, 2**17], "data_offsets": [0, size]},
        f"{LAYER}.to_v.diff": {"dtype": "F32", "shape": [32, 2**17], "data_offsets": [size, 2 * size]}}, 2 * size)
    result = subprocess.run([sys.executable, "-c", GROWTH_SCRIPT, str(tiny_delta_files("sd1")["native"]), str(path),
                             str(tiny_pipeline_path("sd1"))], capture_output=True, text=True, timeout=120)
    message, growth = result.stdout.splitlines()[-2:]
    assert message.startswith(f"{path}: {LAYER}.to_k.diff declares shape (32, 131072): 4,194,304 values, more than "
                              f"any cross-attention weight of "), message
    assert message.endswith(" holds (4,096); not a delta for this base."), message
    assert int(growth) < 4 * 2**20, f"{int(growth) / 2**20:.1f} MB"


def test_an_output_onto_a_caption_file_is_refused_even_with_force(tiny_delta_files, tiny_pipeline_path, tmp_path,
                                                                   capsys):
    """--reg-captions caps -o caps --force replaced the captions file with the merged folder."""
    captions = tmp_path / "caps"
    captions.write_text("a photo of a dog\na red car\n")
    code = cd_merge.main([str(tiny_delta_files("sd1")["native"]), "--base", str(tiny_pipeline_path("sd1")),
                          "--reg-captions", str(captions), "-o", str(captions), "--force", "-q"])
    message = one_error_line(capsys, "cd-merge")
    assert code == 1 and f"Cannot write {captions}: it is the input {captions}" in message
    assert captions.read_text() == "a photo of a dog\na red car\n"


@pytest.mark.parametrize("kind", ["native", "pickle"])
def test_many_tensors_read_for_a_base_are_refused_by_their_total(kind, tiny_pipeline_path, tmp_path):
    """80 tensors of 4M values each, within every per-tensor bound, in a sparse file of a few KB:
    validating them cost 1.6 GB; read for a base, their total is refused first."""
    from hostile import LAYER, _sparse_layers, _sparse_pickle

    from mergekit_cd import load

    values = 32 * 2**17
    if kind == "native":
        path = _sparse_layers(tmp_path / "many.safetensors", 40)
    else:
        path = _sparse_pickle(tmp_path / "many.bin", tmp_path, 80 * values, lambda storage: {"unet": {
            f"{LAYER[:-1]}{index}.{part}.weight": storage[offset * values:(offset + 1) * values].view(32, 2**17)
            for index in range(40) for part, offset in (("to_k", 2 * index), ("to_v", 2 * index + 1))}})
    with pytest.raises(MergeError, match=r"its tensors declare 335,544,320 values in all, more than any delta file "
                                         r"\(four times its K/V weights\) of .* holds"):
        load(path, base=tiny_pipeline_path("sd1"))


def test_one_tensor_past_the_bases_largest_weight_is_refused_before_it_is_read(tiny_pipeline_path, tmp_path):
    from hostile import LAYER, _raw_safetensors

    from mergekit_cd import load

    path = _raw_safetensors(tmp_path / "wide.safetensors", {
        "__metadata__": {"format": "mergekit-cd"},
        f"{LAYER}.to_k.diff": {"dtype": "F32", "shape": [32, 2048], "data_offsets": [0, 32 * 2048 * 4]}},
        32 * 2048 * 4)
    with pytest.raises(MergeError, match=rf"{LAYER}\.to_k\.diff declares shape \(32, 2048\): 65,536 values, more "
                                         r"than any cross-attention weight of .* holds \(\d[\d,]*\); not a delta"):
        load(path, base=tiny_pipeline_path("sd1"))


INSPECT_GROWTH_SCRIPT = """
import contextlib, io, resource, sys
from mergekit_cd.cli import inspect
normal, hostile = sys.argv[1:3]
with contextlib.redirect_stdout(io.StringIO()) as shown:
    inspect.main([normal])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    shown.truncate(0)
    inspect.main([hostile])
print(shown.getvalue().count("[32, 131072]"))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
"""


def test_a_sparse_native_file_is_inspected_one_tensor_at_a_time_without_a_base(tiny_delta_files, tmp_path):
    """Without a base only the fixed bounds apply: 20 tensors of 4M values in a 12 KB sparse file are
    all read, but one at a time, in a few times the memory of one (safe_open's map kept every page
    read resident, 400 MB here, and glibc's heaps kept freed tensors: 80 of them held up to 800 MB)."""
    import subprocess

    from hostile import _sparse_layers

    size = 32 * 2**17 * 4
    path = _sparse_layers(tmp_path / "many.safetensors", 10)
    result = subprocess.run([sys.executable, "-c", INSPECT_GROWTH_SCRIPT, str(tiny_delta_files("sd1")["native"]),
                             str(path)], capture_output=True, text=True, timeout=120)
    layers, growth = result.stdout.splitlines()[-2:]
    assert layers == "10", result.stderr
    assert int(growth) < 5 * size, f"{int(growth) / 2**20:.1f} MB"


def test_a_native_file_header_is_parsed_once_for_every_layer_read(tiny_delta_files, monkeypatch):
    """Each layer read parsed the whole header again: a file of 10,000 layers took 95 s to inspect."""
    from mergekit_cd import fileio, load

    parsed = []
    original = fileio.SafetensorsFile.__init__
    monkeypatch.setattr(fileio.SafetensorsFile, "__init__",
                        lambda self, path: (parsed.append(path), original(self, path))[1])
    delta = load(tiny_delta_files("sd1")["native"])
    parsed.clear()
    layers = [delta.layers[name] for name in delta.layers] * 3
    assert len(layers) > 3 and parsed == []



def test_token_files_that_differ_only_in_case_are_refused_before_writing(tiny_pipeline_path, tmp_path):
    """<Cat> and <cat> are two tokens, but on macOS and Windows one file: one embedding silently
    replaced the other in the diffusers layout."""
    from mergekit_cd.loading import save
    from mergekit_cd.testing import random_concept_deltas

    base = open_base(tiny_pipeline_path("sd1"))
    first, second = random_concept_deltas(base, [("<Cat>", "cat"), ("<cat>", "cat")], seed=2)
    both = ConceptDelta(dict(first.layers), {**first.tokens, **second.tokens}, base=first.base,
                        base_fingerprint=first.base_fingerprint, architecture=first.architecture)
    output = tmp_path / "both"
    with pytest.raises(MergeError, match=rf"^Cannot write {output} as diffusers: tokens '<Cat>' and '<cat>' differ "
                                         r"only in case, and their files would be one on a case-insensitive file "
                                         r"system; rename one, or write the native format \(one file\)\.$"):
        save(both, output, format="diffusers", base=base)
    assert not output.exists() and list(tmp_path.iterdir()) == []
    formats.write(both, tmp_path / "both.safetensors", "native")  # one file: both kept
    assert set(formats.read(tmp_path / "both.safetensors").tokens) == {"<Cat>", "<cat>"}


def test_metadata_is_bounded_in_bytes_not_characters():
    """600,000 euro signs are 1.8 MB of UTF-8: counted as characters, they passed the 1 MB bound."""
    text = '{"notes": "' + "\u20ac" * 600_000 + '"}'
    with pytest.raises(MergeError, match=r"^x: the mergekit-cd metadata in the header is 1,800,013 bytes, more than "
                                         r"the 1,048,576 any real file needs"):
        parse_document(text, source="x", where="the header")


def test_a_layer_of_no_rows_is_refused(tmp_path):
    from hostile import LAYER
    from safetensors.torch import save_file

    path = tmp_path / "empty-layer.safetensors"
    save_file({f"{LAYER}.to_k.diff": torch.zeros(0, 32), f"{LAYER}.to_v.diff": torch.zeros(0, 32)}, str(path),
              metadata={"format": "mergekit-cd"})
    with pytest.raises(MergeError, match=rf"{LAYER}\.to_k\.diff should be a 2-D float weight matrix, found a "
                                         r"float32 tensor of shape \(0, 32\)"):
        formats.read(path)


@pytest.mark.parametrize("fmt", ["native", "authors-bin"])
def test_a_compressed_all_zero_difference_of_rank_zero_reads_back(tiny_pipeline_path, tmp_path, fmt):
    """A layer of no rows is refused, but a rank-0 factor pair is what compress() makes of an
    all-zero difference, and must read back."""
    import dataclasses

    from mergekit_cd.delta import LayerDelta, LowRank, compress
    from mergekit_cd.loading import load, save

    base = open_base(tiny_pipeline_path("sd1"))
    delta = random_concept_delta(base, "<new1>", "cat", seed=5)
    first = next(iter(delta.layers))
    layers = {name: (LayerDelta(torch.zeros_like(layer.key), layer.value) if name == first else layer)
              for name, layer in delta.layers.items()}
    small, _ = compress(dataclasses.replace(delta, layers=layers), 0.01, dense_fallback=False)
    assert isinstance(small.layers[first].key, LowRank) and small.layers[first].key.rank == 0
    path = save(small, tmp_path / ("zero.safetensors" if fmt == "native" else "zero.bin"), format=fmt, base=base)
    read = load(path, base=base)
    assert torch.equal(read.layers[first].key.dense() if isinstance(read.layers[first].key, LowRank)
                       else read.layers[first].key, torch.zeros_like(delta.layers[first].key))


@pytest.mark.parametrize("reader", ["authors-bin", "compvis"])
def test_a_safetensors_file_given_to_a_pickle_reader_is_refused_before_torch_reads_it(reader, tmp_path):
    """torch.load reads any path ending in .safetensors whole, through safetensors: a sparse 4 GB
    file given to a pickle reader cost seconds and its size in reads before the layout was refused."""
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"unet.x": torch.zeros(2, 2)}, str(path))
    with pytest.raises(MergeError) as error:
        formats.get_format(reader).read(path)
    assert str(error.value) == f"{path}: a .safetensors file is not a torch pickle (.bin, .ckpt, .pt); refused."
