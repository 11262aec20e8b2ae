"""Merges that grow and shrink without their inputs (issue 15, section 4): a merged native file keeps
its statistics, and cd-merge solves it again from them, equal to a merge of the concepts' own files."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergekit_cd import formats
from mergekit_cd.base import open_base
from mergekit_cd.cli.merge import main as cd_merge
from mergekit_cd.delta import Concept, ConceptDelta
from mergekit_cd.errors import MergeError
from mergekit_cd.loading import load, save
from mergekit_cd.merge import merge
from mergekit_cd.merge_statistics import ConceptStatistics
from mergekit_cd.testing import random_concept_delta

from cli_output import one_error_line

CAPTIONS = ["a red bicycle leaning on a brick wall", "two boats on a calm lake at dawn", "a bowl of oranges",
            "an old man reading a newspaper in a park", "a watercolor of a lighthouse", "a dog running on the beach",
            "a city street at night with neon signs", "a plate of pasta with basil", "a child flying a kite",
            "snow on a pine forest", "a cup of coffee on a wooden desk", "a sailboat in the harbour"] * 10
NUM_REG = 300  # of the shipped captions, for the command-line runs
WORDS = ("cat", "pot", "dog")


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MERGEKIT_CD_CACHE", str(tmp_path_factory.getbasetemp() / "incremental-cache"))


@pytest.fixture(scope="module")
def bases(tiny_pipeline_path):
    return {arch: open_base(tiny_pipeline_path(arch)) for arch in ("sd1", "sdxl")}


@pytest.fixture(scope="module")
def concepts(bases, tmp_path_factory):
    """Three concepts per architecture, each trained alone (so all named <new1>), saved as native files."""
    folder = tmp_path_factory.mktemp("concepts")
    files = {}
    for arch, base in bases.items():
        files[arch] = [save(random_concept_delta(base, "<new1>", word, seed=20 + i), folder / f"{arch}-{word}.safetensors")
                       for i, word in enumerate(WORDS)]
    return files


def relative_difference(a: ConceptDelta, b: ConceptDelta) -> float:
    """||a - b|| / ||b|| over every layer's K and V differences, in float64."""
    assert a.layers.keys() == b.layers.keys()
    error = sum(float((a.layers[n].rows().double() - b.layers[n].rows().double()).square().sum()) for n in b.layers)
    norm = sum(float(b.layers[n].rows().double().square().sum()) for n in b.layers)
    return (error / norm) ** 0.5


def run_merge(*arguments: str, base) -> int:
    return cd_merge([*arguments, "--base", str(base.path), "--num-reg-captions", str(NUM_REG), "-q"])


# ----------------------------------------------------------------------------- the two equalities


def test_a_merge_grown_by_a_concept_equals_the_merge_of_all_inputs_from_scratch(bases, concepts, tmp_path, capsys):
    """cd-merge ab.safetensors c -o abc.safetensors: ab contributes its two stored concepts, not itself."""
    base, (a, b, c) = bases["sd1"], concepts["sd1"]
    assert run_merge(str(a), str(b), "-o", str(tmp_path / "ab.safetensors"), base=base) == 0
    assert "merge statistics: 2 concepts" in capsys.readouterr().out
    assert run_merge(str(tmp_path / "ab.safetensors"), str(c), "-o", str(tmp_path / "abc.safetensors"), base=base) == 0
    printed = capsys.readouterr().out
    assert "2 concepts, their targets and the regularisation Gram matrix from the merge statistics" in printed
    assert "note: the naive sum's figures add each input as it is: a merged input counts as one delta" in printed
    assert "merge statistics: 3 concepts" in printed and "x): cd-merge can add concepts" in printed
    assert run_merge(str(a), str(b), str(c), "-o", str(tmp_path / "full.safetensors"), base=base) == 0
    grown, full = load(tmp_path / "abc.safetensors"), load(tmp_path / "full.safetensors")
    assert relative_difference(grown, full) < 1e-10
    assert list(grown.tokens) == list(full.tokens) == ["<new1>", "<new2>", "<new3>"]
    assert grown.statistics.tokens == ["<new1>", "<new2>", "<new3>"]


@pytest.mark.parametrize("architecture", ["sd1", "sdxl"])
def test_a_soft_merge_grown_keeps_the_recorded_weights_and_equals_the_merge_from_scratch(bases, concepts,
                                                                                        architecture, tmp_path):
    """The stored concepts keep their recorded weights; the new one takes the default (1000)."""
    base, (a, b, c) = bases[architecture], concepts[architecture]
    two = merge([a, b], CAPTIONS, base=base, method="soft", weights=[100, 10], mu=0.5)
    save(two, tmp_path / "ab.safetensors")
    grown = merge([tmp_path / "ab.safetensors", c], CAPTIONS, base=base, method="soft", mu=0.5)
    full = merge([a, b, c], CAPTIONS, base=base, method="soft", weights=[100, 10, 1000], mu=0.5)
    assert relative_difference(grown, full) < 1e-10
    assert [record.weight for record in grown.statistics.concepts] == [100, 10, 1000]
    assert grown.metadata["recipe"]["weights"] == [100, 10, 1000]


def test_a_merge_shrunk_by_one_concept_equals_the_merge_of_the_others_from_scratch(bases, concepts, tmp_path,
                                                                                    capsys):
    """cd-merge abc.safetensors --drop <new2>: no input file, no text encoder (the Gram matrix is stored)."""
    base, (a, b, c) = bases["sd1"], concepts["sd1"]
    assert run_merge(str(a), str(b), str(c), "-o", str(tmp_path / "abc.safetensors"), base=base) == 0
    assert run_merge(str(tmp_path / "abc.safetensors"), "--drop", "<new2>", "-o", str(tmp_path / "ac.safetensors"),
                     base=base) == 0
    assert run_merge(str(a), str(c), "-o", str(tmp_path / "scratch.safetensors"), base=base) == 0
    capsys.readouterr()
    shrunk, scratch = load(tmp_path / "ac.safetensors"), load(tmp_path / "scratch.safetensors")
    assert relative_difference(shrunk, scratch) < 1e-10
    assert list(shrunk.tokens) == ["<new1>", "<new3>"] and [c.class_word for c in shrunk.concepts] == ["cat", "dog"]
    # and it grows again: b's concept back in, from its own file
    regrown = merge([tmp_path / "ac.safetensors", b], _shipped(NUM_REG), base=base)
    assert relative_difference(regrown, merge([a, c, b], _shipped(NUM_REG), base=base)) < 1e-10


def _shipped(count: int) -> list[str]:
    from mergekit_cd.captions import default_reg_captions

    return default_reg_captions()[:count]


# ----------------------------------------------------------------------------- the statistics in the file


def test_the_statistics_round_trip_through_the_native_file(bases, concepts, tmp_path):
    """Every stored tensor comes back bit for bit, with the regulariser's identity and the options;
    the statistics are float64 under their own prefix, apart from the differences and tokens."""
    base, (a, b, _) = bases["sd1"], concepts["sd1"]
    merged = merge([a, b], CAPTIONS, base=base, method="soft", weights=[50, 5], mu=2.0, relative_ridge=1e-3)
    path = save(merged, tmp_path / "ab.safetensors")
    back = load(path, base=base)
    written, read = merged.statistics, back.statistics
    assert torch.equal(read.regulariser.gram, written.regulariser.gram)
    assert read.regulariser.captions == written.regulariser.captions
    assert read.regulariser.num_rows == written.regulariser.num_rows > len(CAPTIONS)
    assert read.regulariser.feature_rule == written.regulariser.feature_rule == "authors-v1"
    assert read.regulariser.text_fingerprint == base.text_fingerprint
    assert read.regulariser.base_fingerprint == base.fingerprint
    assert read.regulariser.captions.count == len(CAPTIONS) and read.regulariser.captions.shipped is None
    assert read.options == written.options == {"method": "soft", "mu": 2.0, "ridge": 0.0, "relative_ridge": 1e-3,
                                               "text_dtype": "float32", "rows": "authors"}
    for mine, theirs in zip(written.concepts, read.concepts):
        assert theirs.concept == mine.concept and theirs.weight == mine.weight
        assert theirs.features.dtype == torch.float64 and torch.equal(theirs.features, mine.features)
        assert set(theirs.changes) == set(base.layer_names())
        for layer in base.layer_names():
            assert all(torch.equal(x, y) for x, y in zip(theirs.changes[layer], mine.changes[layer]))
    with safe_open(str(path), framework="pt") as handle:
        statistics = [key for key in handle.keys() if key.startswith("statistics.")]
        document = json.loads(handle.metadata()["mergekit_cd_statistics"])
    assert document["format_version"] == "1" and len(statistics) == 1 + 2 * (1 + 2 * len(base.layer_names()))
    assert read.num_bytes() == sum(load_file(path)[key].numel() * 8 for key in statistics)
    assert (2 * back).statistics is None and (back - back).statistics is None  # they describe this merge only


def test_context_rows_of_a_concept_round_trip_too(bases, concepts, tmp_path):
    """A concept's record holds soft context rows P_i and their changes D_i P_i^T when a method has them."""
    base = bases["sd1"]
    merged = merge(concepts["sd1"][:1], CAPTIONS, base=base)
    record = merged.statistics.concepts[0]
    generator = torch.Generator().manual_seed(0)
    context = torch.randn(3, base.context_dim, generator=generator, dtype=torch.float64)
    changes = {name: tuple(torch.randn(part.shape[0], 3, generator=generator, dtype=torch.float64) for part in pair)
               for name, pair in record.changes.items()}
    with_context = ConceptStatistics(record.concept, record.features, record.changes, None, context, changes)
    merged.statistics = type(merged.statistics)(merged.statistics.regulariser, merged.statistics.options,
                                                (with_context,))
    read = load(save(merged, tmp_path / "one.safetensors")).statistics.concepts[0]
    assert torch.equal(read.context_features, context)
    assert all(torch.equal(x, y) for name in changes for x, y in zip(read.context_changes[name], changes[name]))


def test_files_without_statistics_read_as_before(tiny_delta_files):
    assert load(tiny_delta_files("sd1")["native"]).statistics is None


def test_a_newer_statistics_format_is_refused(bases, concepts, tmp_path):
    path = save(merge(concepts["sd1"][:1], CAPTIONS, base=bases["sd1"]), tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    document = json.loads(header["mergekit_cd_statistics"])
    save_file(load_file(path), tmp_path / "newer.safetensors",
              metadata={**header, "mergekit_cd_statistics": json.dumps({**document, "format_version": "2"})})
    with pytest.raises(MergeError, match=r"newer.safetensors: merge statistics format_version '2' is not one this "
                                         r"mergekit-cd reads \('1'\); upgrade mergekit-cd"):
        load(tmp_path / "newer.safetensors")


# ----------------------------------------------------------------------------- what is refused, and how


@pytest.fixture(scope="module")
def merged_ab(bases, concepts, tmp_path_factory):
    """The constrained merge of the first two sd1 concepts on the first 300 shipped captions."""
    path = tmp_path_factory.mktemp("ab") / "ab.safetensors"
    save(merge(concepts["sd1"][:2], _shipped(NUM_REG), base=bases["sd1"]), path)
    return path


def test_a_merged_file_without_statistics_is_refused_naming_it_and_the_fix(bases, concepts, merged_ab, tmp_path,
                                                                           capsys):
    """An old native merge (no statistics) and a merge in another format: one message each, naming the file."""
    base = bases["sd1"]
    old = load(merged_ab)
    old.statistics = None  # as an older mergekit-cd wrote it: the recipe, no statistics
    save(old, tmp_path / "old.safetensors")
    folder = tmp_path / "ab-diffusers"
    assert run_merge(*map(str, concepts["sd1"][:2]), "-o", str(folder), base=base) == 0
    assert "merge statistics: not stored (the diffusers format does not carry them" in capsys.readouterr().out
    for merged in (tmp_path / "old.safetensors", folder):
        assert run_merge(str(merged), str(concepts["sd1"][2]), "-o", str(tmp_path / "out.safetensors"),
                         base=base) == 1
        assert one_error_line(capsys, "cd-merge") == (
            f"{merged} is a constrained merge but stores no merge statistics (it was written by an older "
            f"mergekit-cd, or in a format that does not carry them: only native .safetensors outputs do), so it "
            f"cannot be grown or shrunk exactly. Merge the concepts' own files (<new1>, <new2>) instead, or "
            f"merge them once into a .safetensors file that can be.")
    assert run_merge(str(folder), "--drop", "<new2>", "-o", str(tmp_path / "out.safetensors"), base=base) == 1
    assert one_error_line(capsys, "cd-merge").startswith(f"{folder} is a constrained merge but stores no merge "
                                                         f"statistics")


def test_dropping_a_token_not_there_names_the_tokens_that_are(bases, concepts, merged_ab, tmp_path, capsys):
    base = bases["sd1"]
    output = str(tmp_path / "out.safetensors")
    assert run_merge(str(merged_ab), "--drop", "<new7>", "-o", output, base=base) == 1
    assert one_error_line(capsys, "cd-merge") == ("--drop <new7>: no concept of the inputs has that token; they "
                                                  "have <new1>, <new2>.")
    assert run_merge(str(merged_ab), str(concepts["sd1"][2]), "--drop", "<new3>", "-o", output, base=base) == 1
    assert one_error_line(capsys, "cd-merge") == (f"--drop <new3>: {concepts['sd1'][2]} holds that concept as a "
                                                  f"delta of its own, not in a merge; leave the input out instead.")
    assert run_merge(str(merged_ab), "--drop", "<new1>", "--drop", "<new2>", "-o", output, base=base) == 1
    assert one_error_line(capsys, "cd-merge") == "--drop <new1>, <new2> leaves no concept to merge."
    assert run_merge(str(merged_ab), "--drop", "<new1>", "--method", "sum", "-o", output, base=base) == 1
    assert one_error_line(capsys, "cd-merge") == ("--drop solves the merge again from its statistics; it needs "
                                                  "--method constrained, soft or hybrid (the merge's own), not --method sum.")


def test_the_recorded_regulariser_and_options_are_checked(bases, concepts, merged_ab, tmp_path, capsys, monkeypatch):
    """Other captions, options, text precision, text encoder or row rule than the stored ones: refused, saying
    what to give (in cd-merge's flags)."""
    base, new = bases["sd1"], str(concepts["sd1"][2])
    output = str(tmp_path / "out.safetensors")
    arguments = [str(merged_ab), new, "-o", output, "--base", str(base.path), "-q"]
    assert cd_merge([*arguments, "--num-reg-captions", "200"]) == 1
    assert one_error_line(capsys, "cd-merge") == (
        f"{merged_ab} was merged with other regularisation captions (the first 300 captions of the shipped "
        f"reg_captions.txt) than this merge (the first 200 captions of the shipped reg_captions.txt); its stored "
        f"Gram matrix belongs to those. To grow or shrink it, leave out --reg-captions and give "
        f"--num-reg-captions 300.")
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS))
    assert cd_merge([*arguments, "--reg-captions", str(captions)]) == 1
    assert "than this merge (120 captions of your own (sha256 " in one_error_line(capsys, "cd-merge")
    assert cd_merge([*arguments, "--num-reg-captions", "300", "--relative-ridge", "1e-3", "--dtype", "float16"]) == 1
    assert one_error_line(capsys, "cd-merge") == (
        f"{merged_ab} was merged with --relative-ridge 0, --dtype float32 and this merge has --relative-ridge 0.001, "
        f"--dtype float16; a merge that grows or shrinks it solves the same problem, so give --relative-ridge 0, "
        f"--dtype float32.")
    assert cd_merge([*arguments, "--num-reg-captions", "300", "--method", "soft"]) == 1
    assert one_error_line(capsys, "cd-merge").startswith(f"{merged_ab} was merged with --method constrained and "
                                                         f"this merge has --method soft, --mu 1;")
    assert cd_merge([*arguments, "--num-reg-captions", "300", "--rows", "pipeline"]) == 1
    assert one_error_line(capsys, "cd-merge") == (f"{merged_ab} was merged with --rows authors and this merge has "
                                                  f"--rows pipeline; a merge that grows or shrinks it solves the "
                                                  f"same problem, so give --rows authors.")


def test_statistics_of_another_text_encoder_are_refused(bases, merged_ab, tiny_pipeline_path, tmp_path, capsys):
    other = tiny_pipeline_path("sd1", seed=1)
    capsys.readouterr()  # building that base prints progress
    assert cd_merge([str(merged_ab), "--drop", "<new2>", "-o", str(tmp_path / "out.safetensors"), "--base",
                     str(other), "--no-base-check", "--num-reg-captions", "300", "-q"]) == 1
    assert one_error_line(capsys, "cd-merge") == (
        f"{merged_ab} stores text features of another text encoder (fingerprint "
        f"{bases['sd1'].text_fingerprint[:12]}) than {open_base(other).name}'s "
        f"({open_base(other).text_fingerprint[:12]}); grow or shrink it on the base it was merged on.")


def test_a_naive_merge_keeps_a_merged_input_as_one_delta(bases, concepts, merged_ab):
    """sum and average solve nothing: a merged input is then one delta, its statistics unused."""
    base = bases["sd1"]
    summed = merge([merged_ab, concepts["sd1"][2]], _shipped(NUM_REG), base=base, method="sum")
    assert summed.statistics is None
    plain = load(merged_ab).dense() + load(concepts["sd1"][2])
    assert relative_difference(summed, plain) < 1e-6


# ----------------------------------------------------------------------------- the hybrid merge


@pytest.mark.parametrize("architecture", ["sd1", "sdxl"])
def test_a_hybrid_merge_grows_and_shrinks_to_the_hybrid_merge_from_scratch(bases, concepts, architecture,
                                                                          tmp_path):
    """The hybrid's statistics also hold each concept's context rows P_i, its changes D_i P_i^T and its
    weight: grown by a concept, or shrunk by one, it equals the hybrid merge of the concepts' own files."""
    base, (a, b, c) = bases[architecture], concepts[architecture]
    hybrid = dict(method="hybrid", rows="pipeline")
    save(merge([a, b], CAPTIONS, base=base, weights=[100, 10], **hybrid), tmp_path / "ab.safetensors")
    grown = merge([tmp_path / "ab.safetensors", c], CAPTIONS, base=base, **hybrid)
    full = merge([a, b, c], CAPTIONS, base=base, weights=[100, 10, 1000], **hybrid)
    assert relative_difference(grown, full) < 1e-10
    assert [record.weight for record in grown.statistics.concepts] == [100, 10, 1000]
    with pytest.raises(MergeError, match=r"ab\.safetensors was merged with method hybrid, rows pipeline and this "
                                         r"merge has method constrained, rows authors; .* so give method "
                                         r"hybrid, rows pipeline\.$"):
        merge([tmp_path / "ab.safetensors", c], CAPTIONS, base=base)  # the flags left out: the message names them
    d = base.context_dim
    for record in full.statistics.concepts:  # two padded prompts' start and padding rows, at most d of them
        assert record.context_features.shape == (min(2 * 77 - record.features.shape[0], d), d)
    save(full, tmp_path / "abc.safetensors")
    shrunk = merge([tmp_path / "abc.safetensors"], CAPTIONS, base=base, drop=["<new2>"], **hybrid)
    assert relative_difference(shrunk, merge([a, c], CAPTIONS, base=base, weights=[100, 1000], **hybrid)) < 1e-10


def test_a_hybrid_merge_without_its_context_statistics_is_refused(bases, concepts, tmp_path, capsys):
    """A hybrid file whose statistics lack the context rows (damaged), and a hybrid in a format that
    stores none: one message each, naming the file."""
    base, (a, b, c) = bases["sd1"], concepts["sd1"]
    hybrid = dict(method="hybrid", rows="pipeline")
    merged = merge([a, b], _shipped(NUM_REG), base=base, **hybrid)
    statistics = merged.statistics
    merged.statistics = replace(statistics, concepts=tuple(replace(record, context_features=None,
                                                                   context_changes=None)
                                                           for record in statistics.concepts))
    save(merged, tmp_path / "damaged.safetensors")
    with pytest.raises(MergeError, match=r"damaged.safetensors: its merge statistics are of a hybrid merge but lack "
                                         r"context rows; the file is damaged\. Merge the concepts' own files again\.$"):
        merge([tmp_path / "damaged.safetensors", c], _shipped(NUM_REG), base=base, **hybrid)
    folder = tmp_path / "ab-diffusers"
    assert run_merge(str(a), str(b), "-o", str(folder), "--method", "hybrid", "--rows", "pipeline", base=base) == 0
    capsys.readouterr()
    assert run_merge(str(folder), "--drop", "<new2>", "-o", str(tmp_path / "out.safetensors"), "--method", "hybrid",
                     "--rows", "pipeline", base=base) == 1
    assert one_error_line(capsys, "cd-merge").startswith(
        f"{folder} is a hybrid merge but stores no merge statistics (it was written by an older mergekit-cd, or in a "
        f"format that does not carry them: only native .safetensors outputs do)")
