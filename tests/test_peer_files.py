"""Files exactly as the peers' tools write them: the authors' ``delta.bin`` and diffusers'
``--no_safe_serialization`` output pickle grad-requiring parameters and token rows that are views
into the whole embedding table (SDXL tokens as lists); the authors' CompVis sampler names the rows
of ``embed`` by position. Every reader, ``cd-merge``, ``cd-inspect``, ``cd-convert`` and ``apply``
must take them as they are.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from mergekit_cd import formats
from mergekit_cd.apply import apply, remove
from mergekit_cd.base import open_base
from mergekit_cd.cli.convert import main as cd_convert
from mergekit_cd.cli.inspect import main as cd_inspect
from mergekit_cd.cli.merge import main as cd_merge
from mergekit_cd.delta import Concept, ConceptDelta, dense
from mergekit_cd.errors import TokenRenameWarning
from mergekit_cd.loading import load
from mergekit_cd.testing import (build_tiny_pipeline, random_concept_deltas, save_like_authors_bin,
                                 save_like_diffusers_bin)
from mergekit_cd.weights import FineTunedWeights

CONCEPTS = [("<new1>", "cat"), ("<new2>", "pot")]


def peer_files(tmp_path, base, writer) -> tuple[list[str], list[ConceptDelta]]:
    """Two concepts on ``base``, each written by ``writer`` as its peer tool does."""
    deltas = random_concept_deltas(base, CONCEPTS, seed=3)
    paths = []
    for index, delta in enumerate(deltas):
        weights = FineTunedWeights.from_delta(delta, base.kv)
        target = tmp_path / f"run{index}" / ("delta.bin" if writer is save_like_authors_bin else "out")
        paths.append(str(writer(weights, target)))
    return paths, deltas


def test_the_fixtures_hold_what_the_peers_pickle(tiny_pipeline_path, tmp_path):
    """The fixture files themselves: grad-requiring tensors, token rows over the whole table."""
    base = open_base(tiny_pipeline_path("sdxl"))
    (path, _), _ = peer_files(tmp_path, base, save_like_authors_bin)
    stored = torch.load(path, weights_only=True)
    assert all(tensor.requires_grad for tensor in stored["unet"].values())
    pair = stored["modifier_token"]["<new1>"]
    assert isinstance(pair, list) and len(pair) == 2
    assert all(row.requires_grad and row.untyped_storage().nbytes() > 10 * row.nbytes for row in pair)


@pytest.mark.parametrize("architecture, writer", [("sd1", save_like_authors_bin), ("sd2", save_like_authors_bin),
                                                  ("sdxl", save_like_authors_bin), ("sd1", save_like_diffusers_bin)])
def test_readers_return_plain_compact_tensors(architecture, writer, tiny_pipeline_path, tmp_path):
    base = open_base(tiny_pipeline_path(architecture))
    paths, deltas = peer_files(tmp_path, base, writer)
    read = formats.read(paths[0])
    layer = base.layer_names()[0]
    assert not any(tensor.requires_grad for tensor in read.layers[layer])
    for embeddings in read.tokens.values():
        assert all(not row.requires_grad and row.untyped_storage().nbytes() == row.nbytes for row in embeddings)
    delta = load(paths[0], base=base)
    assert torch.allclose(dense(delta.layers[layer].key), dense(deltas[0].layers[layer].key), atol=1e-6)


@pytest.mark.parametrize("architecture, writer", [("sd1", save_like_authors_bin), ("sdxl", save_like_authors_bin),
                                                  ("sd1", save_like_diffusers_bin)])
def test_cd_merge_takes_the_peers_files_as_they_are(architecture, writer, tiny_pipeline_path, tmp_path, capsys):
    """The crash of issue 13: the recipe hash called .numpy() on grad-requiring tensors, after the solve."""
    base = open_base(tiny_pipeline_path(architecture))
    paths, _ = peer_files(tmp_path, base, writer)
    classes = [arg for _, word in CONCEPTS for arg in ("--class", word)]  # neither tool records a class word
    output = tmp_path / "merged.safetensors"
    code = cd_merge([*paths, "-o", str(output), "--base", str(base.path), "--num-reg-captions", "40", "-q",
                     *classes])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "Traceback" not in printed.err and output.is_file()
    assert len(formats.read(output).tokens) == 2


def test_cd_inspect_and_cd_convert_take_the_authors_bin(tiny_pipeline_path, tmp_path, capsys):
    base = open_base(tiny_pipeline_path("sd1"))
    (path, _), _ = peer_files(tmp_path, base, save_like_authors_bin)
    assert cd_inspect([path, "--base", str(base.path)]) == 0
    assert "<new1>" in capsys.readouterr().out
    output = tmp_path / "converted.safetensors"
    assert cd_convert([path, "-o", str(output), "--base", str(base.path)]) == 0, capsys.readouterr().err
    assert formats.read(output).tokens.keys() == {"<new1>"}


def test_apply_takes_the_authors_bin(tiny_pipeline_path, tmp_path):
    base = open_base(tiny_pipeline_path("sd1"))
    (path, _), (delta, _) = peer_files(tmp_path, base, save_like_authors_bin)
    pipe = build_tiny_pipeline("sd1")
    layer = base.layer_names()[0]
    before = pipe.unet.get_submodule(layer).to_k.weight.detach().clone()
    apply(pipe, path)
    after = pipe.unet.get_submodule(layer).to_k.weight.detach()
    assert torch.allclose(after - before, dense(delta.layers[layer].key), atol=1e-6)
    remove(pipe)


# ----------------------------------------------------------------------------- CompVis rows by position
def _authors_names(path, tmp_path) -> ConceptDelta:
    """What the authors' CompVis sampler sees: our metadata ignored, rows named <new1>, <new2>, ..."""
    contents = torch.load(path, weights_only=True)
    del contents["mergekit_cd"]
    stripped = tmp_path / "as-the-authors-read-it.ckpt"
    torch.save(contents, stripped)
    return formats.read(stripped)


def _weights(names: list[str]) -> FineTunedWeights:
    generator = torch.Generator().manual_seed(0)
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    tokens = {name: (torch.randn(64, generator=generator),) for name in names}
    concepts = tuple(Concept(name, f"thing{index}", (f"photo of a {name} thing{index}",))
                     for index, name in enumerate(names))
    return FineTunedWeights({layer: (torch.randn(32, 64), torch.randn(32, 64))}, tokens, architecture="sd1",
                            concepts=concepts)


def test_compvis_rows_follow_token_names_so_the_authors_sampler_swaps_nothing(tmp_path):
    """A merge's rename leaves tokens ordered <new1>, <new3>, <new2>: rows go in name order."""
    original = _weights(["<new1>", "<new3>", "<new2>"])
    path = tmp_path / "delta.ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("error", TokenRenameWarning)  # nothing needs renaming
        formats.write(original, path, "compvis")
    ours, theirs = formats.read(path), _authors_names(path, tmp_path)
    assert list(ours.tokens) == list(theirs.tokens) == ["<new1>", "<new2>", "<new3>"]
    for name in original.tokens:
        assert torch.equal(theirs.tokens[name][0], original.tokens[name][0]), name
    assert [concept.token for concept in ours.concepts] == ["<new1>", "<new3>", "<new2>"]


def test_compvis_tokens_that_disagree_with_their_rows_take_the_rows_names(tmp_path):
    """<new1>, <new3> (a gap) and <cat>: the sampler would call them by row, so they are renamed
    at once (no token renamed twice), with a warning; prompts follow."""
    original = _weights(["<new3>", "<cat>", "<new1>"])
    path = tmp_path / "delta.ckpt"
    with pytest.warns(TokenRenameWarning, match=r"<cat> -> <new1>, <new1> -> <new2>"):
        formats.write(original, path, "compvis")
    ours, theirs = formats.read(path), _authors_names(path, tmp_path)
    assert list(ours.tokens) == list(theirs.tokens) == ["<new1>", "<new2>", "<new3>"]
    renamed = {"<cat>": "<new1>", "<new1>": "<new2>", "<new3>": "<new3>"}
    for old, new in renamed.items():
        assert torch.equal(theirs.tokens[new][0], original.tokens[old][0]), old
    by_class = {concept.class_word: concept for concept in ours.concepts}
    assert by_class["thing1"].token == "<new1>" and by_class["thing1"].prompts == ("photo of a <new1> thing1",)
    assert by_class["thing2"].token == "<new2>" and by_class["thing2"].prompts == ("photo of a <new2> thing2",)

