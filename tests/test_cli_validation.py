"""Bad command lines are refused up front: one line ``cd-<command>: error: ...`` naming the
option or file and the problem, exit status 1, nothing written, and no work done first (the
steps that would do the work are replaced by ones that fail the test if they run).
"""

from __future__ import annotations

import importlib
import math
import re

import pytest
import torch

from mergekit_cd import MergeError, evaluate, formats
from mergekit_cd.cli import _common
from mergekit_cd.cli import convert as cd_convert
from mergekit_cd.cli import eval as cd_eval
from mergekit_cd.cli import merge as cd_merge
from mergekit_cd.cli import sample as cd_sample
from mergekit_cd.fileio import check_destination

from cli_output import one_error_line


pytestmark = pytest.mark.usefixtures("tiny_models")  # built before any test captures output


@pytest.fixture
def no_work(monkeypatch):
    """cd-merge fails the test if it gets as far as reading its inputs."""
    def refuse(*args, **kwargs):
        raise AssertionError("the inputs were read before the command line was checked")

    monkeypatch.setattr(importlib.import_module("mergekit_cd.merge"), "plan_merge", refuse)


def merge_args(tiny_pipeline_path, tiny_delta_files, architecture: str = "sd1") -> list[str]:
    files = tiny_delta_files(architecture)
    return [str(files["native"]), str(files["other-native"]), "--base", str(tiny_pipeline_path(architecture)),
            "--num-reg-captions", "30", "-q"]


def test_the_same_input_twice_is_one_error_before_any_input_is_read(tiny_pipeline_path, tiny_delta_files,
                                                                    tmp_path, capsys, monkeypatch):
    native = str(tiny_delta_files("sd1")["native"])

    def refuse(*args, **kwargs):
        raise AssertionError("an input was read before the repeat was refused")

    monkeypatch.setattr(importlib.import_module("mergekit_cd.merge_plan"), "load_source", refuse)
    assert cd_merge.main([native, native, "--base", str(tiny_pipeline_path("sd1")),
                          "-o", str(tmp_path / "merged.safetensors"), "-q"]) == 1
    message = one_error_line(capsys, "cd-merge")
    assert re.match(r"^Input 2 \(.*delta\.safetensors\) is the same file as input 1 \(.*delta\.safetensors\): "
                    r"a concept can be merged only once; leave out the repeat\.$", message), message
    assert not (tmp_path / "merged.safetensors").exists()


# ---------------------------------------------------------------- warnings
def test_every_command_prints_warnings_as_one_line_with_its_name(capsys):
    import argparse
    import warnings

    def main(args):
        warnings.warn("something is odd\n  about this input")
        warnings.warn("and something else", RuntimeWarning)

    assert _common.run(main, argparse.ArgumentParser(prog="cd-anything"), []) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == ["cd-anything: warning: something is odd about this input",
                                         "cd-anything: warning: and something else"]


def test_cd_merge_warns_about_an_unwritable_cache_in_one_line(tiny_pipeline_path, tiny_delta_files, tmp_path,
                                                              capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    for cache in ("/proc/nope", str(a_file)):  # the second crashed while cleaning up its temporary file
        output = tmp_path / "merged.safetensors"
        assert cd_merge.main([*merge_args(tiny_pipeline_path, tiny_delta_files), "-o", str(output), "--force",
                              "--cache-dir", cache]) == 0
        lines = capsys.readouterr().err.splitlines()
        assert lines and all(re.match(rf"cd-merge: warning: Could not cache .* in {re.escape(cache)}: ", line)
                             for line in lines), lines
        assert output.is_file()


# ---------------------------------------------------------------- cd-merge options
@pytest.mark.parametrize(("arguments", "message"), [
    (["--method", "soft", "--mu", "-1"], r"^--mu -1: must be a finite number >= 0\.$"),
    (["--method", "soft", "--mu", "0"], r"^--mu 0 with no --ridge / --relative-ridge leaves the soft merge "
                                        r"without a unique solution"),
    (["--method", "soft", "--weights", "1", "0"], r"^--weights: every weight must be a finite number > 0, "
                                                  r"got 0\.$"),
    (["--method", "soft", "--weights", "5"], r"^--weights: got 1 weight\(s\) for 2 inputs, which hold at least 2 "
                                             r"concepts; give one per concept, in input order\.$"),
    (["--weights", "1", "2"], r"^--weights only applies to --method soft or hybrid, not to --method constrained; "),
    (["--method", "hybrid", "--mu", "2", "--rows", "pipeline"], r"^--mu only applies to --method soft, not to --method "
                                                               r"hybrid; add --method soft or leave them out\.$"),
    (["--method", "hybrid"], r"^--method hybrid needs --rows pipeline: its soft terms are the start and padding rows "
                             r"of the target prompts, which only the pipeline rule reads; add --rows pipeline\.$"),
    (["--method", "sum", "--mu", "2"], r"^--mu only applies to --method soft, not to --method sum; "),
    (["--method", "average", "--weights", "1", "2", "--mu", "2"], r"^--weights and --mu only apply to "),
    (["--num-reg-captions", "0"], r"^--num-reg-captions 0: must be at least 1\.$"),
    (["--ridge", "-1"], r"^--ridge -1: must be a finite number >= 0\.$"),
    (["--relative-ridge", "nan"], r"^--relative-ridge nan: must be a finite number >= 0\.$"),
    (["--batch-size", "0"], r"^--batch-size 0: must be at least 1\.$"),
    (["--device", "meta"], r"^--device meta: this command runs on cpu or cuda\[:N\], not meta; this machine "
                           r"has cpu"),
    (["--device", "mps"], r"^--device mps: this command runs on cpu or cuda\[:N\], not mps; "),
    (["--device", "gpu"], r"^--device gpu: not a device name; this machine has cpu"),
    (["-o", "{tmp}/merged.weird"], r"^Cannot tell which format to write \S+merged\.weird in: \.weird is none "
                                   r"of \.safetensors \(native\), \.bin \(authors-bin\), \.ckpt \(compvis\), "
                                   r"nor a folder name without extension \(diffusers\)\. .*--format"),
])
def test_bad_cd_merge_options_are_refused_before_any_input_is_read(tiny_pipeline_path, tiny_delta_files,
                                                                   tmp_path, capsys, no_work, arguments,
                                                                   message):
    arguments = [argument.format(tmp=tmp_path) for argument in arguments]
    output = ["-o", str(tmp_path / "merged.safetensors")] if "-o" not in arguments else []
    assert cd_merge.main([*merge_args(tiny_pipeline_path, tiny_delta_files), *output, *arguments]) == 1
    assert re.search(message, one_error_line(capsys, "cd-merge")), message
    assert list(tmp_path.iterdir()) == []


def test_a_wrong_weight_count_is_refused_before_any_text_is_encoded(tiny_pipeline_path, tiny_delta_files,
                                                                    tmp_path, capsys, monkeypatch):
    """The number of concepts is known once the inputs' tokens are: before the solve."""
    def refuse(*args, **kwargs):
        raise AssertionError("the merge ran before the weights were counted")

    monkeypatch.setattr(importlib.import_module("mergekit_cd.merge"), "execute", refuse)
    output = tmp_path / "merged.safetensors"
    args = [*merge_args(tiny_pipeline_path, tiny_delta_files), "-o", str(output), "--method", "soft"]
    assert cd_merge.main([*args, "--weights", "1", "2", "3"]) == 1
    assert one_error_line(capsys, "cd-merge") == ("--weights: got 3 weight(s) for 2 concepts (<new1>, <new2>); "
                                                  "give one per concept, in input order.")
    assert not output.exists()


def test_soft_weights_and_mu_still_reach_the_merge(tiny_pipeline_path, tiny_delta_files, tmp_path, capsys):
    output = tmp_path / "merged.safetensors"
    args = [*merge_args(tiny_pipeline_path, tiny_delta_files), "-o", str(output), "--method", "soft",
            "--weights", "100", "10", "--mu", "0.5"]
    assert cd_merge.main(args) == 0, capsys.readouterr().err
    recipe = formats.read(output).metadata["recipe"]
    assert recipe["weights"] == [100.0, 10.0] and recipe["mu"] == 0.5


# ---------------------------------------------------------------- devices
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_an_error_not_a_silent_cpu_run(tiny_pipeline_path, tiny_delta_files, tmp_path,
                                                             capsys, no_work):
    output = tmp_path / "merged.safetensors"
    assert cd_merge.main([*merge_args(tiny_pipeline_path, tiny_delta_files), "-o", str(output),
                          "--device", "cuda"]) == 1
    assert re.fullmatch(r"--device cuda: no CUDA device is available \(.*\); this machine has cpu\.",
                        one_error_line(capsys, "cd-merge"))
    assert cd_sample.main(["--base", str(tiny_pipeline_path("sd1")), "a cat", "-o", str(tmp_path / "g.png"),
                           "--device", "cuda:0"]) == 1
    assert one_error_line(capsys, "cd-sample").startswith("--device cuda:0: no CUDA device is available")
    assert list(tmp_path.iterdir()) == []


SEED_RANGE = "a seed is a whole number from 0 to 2**64 - 1 (18446744073709551615)"


@pytest.mark.parametrize("command", [cd_sample, cd_eval])
@pytest.mark.parametrize(("option", "value", "message"), [
    ("--seed", str(2**70), f"{2**70} is out of range: {SEED_RANGE}"),
    ("--seed", "-1", f"-1 is out of range: {SEED_RANGE}"),
    ("--seed", "1.5", "'1.5' is not a whole number"),
    ("--guidance-scale", "nan", "'nan' is not a finite number >= 0"),
    ("--guidance-scale", "-inf", "'-inf' is not a finite number >= 0"),
    ("--guidance-scale", "-0.5", "'-0.5' is not a finite number >= 0"),
    ("--guidance-scale", "six", "'six' is not a finite number >= 0"),
])
def test_seeds_and_guidance_scales_are_checked_as_the_command_line_is_read(command, option, value, message,
                                                                           capsys):
    """A seed torch cannot take (a traceback deep in torch before) and a guidance scale that is
    not a finite number >= 0 (nan: diffusers silently sampled without guidance) are argparse errors."""
    required = ["a cat"] if command is cd_sample else ["--concepts", "cat.safetensors"]
    with pytest.raises(SystemExit) as exit_info:
        command.main(["--base", "base", *required, f"{option}={value}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"{command.build_parser().prog}: error: argument {option}: {message}"
    parsed = command.build_parser().parse_args(["--base", "base", *required, "--seed", str(2**64 - 1),
                                                "--guidance-scale", "0"])
    assert (parsed.seed, parsed.guidance_scale) == (2**64 - 1, 0.0)


def test_the_seeds_of_every_image_must_fit_torch(capsys, monkeypatch):
    """Image j uses seed + j: the last seeds are refused in one line, before any pipeline loads."""
    def no_work(*args, **kwargs):
        raise AssertionError("the work started before the seed was checked")

    monkeypatch.setattr(cd_sample, "sample_grid", no_work)
    assert cd_sample.main(["--base", "base", "a cat", "--seed", str(2**64 - 1), "-n", "3"]) == 1
    assert one_error_line(capsys, "cd-sample") == (
        "--seed must be a whole number from 0 to 18446744073709551613 (image j is sampled with seed + j, and "
        "torch's seeds end at 2**64 - 1), got 18446744073709551615.")
    assert cd_eval.main(["--base", "base", "--concepts", "cat.safetensors", "--seed", str(2**64 - 1)]) == 1
    assert one_error_line(capsys, "cd-eval") == (  # two sampled images per prompt by default
        "seed must be a whole number from 0 to 18446744073709551614 (image j is sampled with seed + j, and "
        "torch's seeds end at 2**64 - 1), got 18446744073709551615.")
    with pytest.raises(MergeError, match=r"^guidance scale must be a finite number >= 0, got nan\.$"):
        evaluate(["cat.safetensors"], base="base", guidance_scale=math.nan)


def test_devices_name_what_this_machine_has(monkeypatch):
    """With two GPUs (simulated): cuda and cuda:1 are accepted, cuda:2 names the ones there are."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert _common.device("cuda") == torch.device("cuda")
    assert _common.device("cuda:1") == torch.device("cuda:1")
    assert _common.device("cpu") == torch.device("cpu")
    with pytest.raises(MergeError, match=r"^--device cuda:2: there is no such GPU; this machine has cpu, "
                                         r"cuda:0, cuda:1\.$"):
        _common.device("cuda:2")
    with pytest.raises(MergeError, match=r"^--device mps: MPS \(Apple GPU\) is not available here; this "
                                         r"machine has cpu, cuda:0, cuda:1\.$"):
        _common.device("mps", types=cd_sample.DEVICE_TYPES)
    with pytest.raises(MergeError, match=r"^--device xla: this command runs on cpu or cuda\[:N\] or mps, "
                                         r"not xla"):
        _common.device("xla", types=cd_sample.DEVICE_TYPES)


# ---------------------------------------------------------------- outputs
@pytest.mark.parametrize(("name", "expected"), [
    ("merged.safetensors", "native"), ("delta.bin", "authors-bin"), ("delta_epoch=000001.ckpt", "compvis"),
    ("merged", "diffusers"), ("merged.SAFETENSORS", "native"),
])
def test_the_output_name_tells_the_format(tmp_path, name, expected):
    assert formats.output_format(tmp_path / name) == expected
    assert formats.output_format(tmp_path / name, "native") == "native"  # the option wins


def test_an_existing_folder_is_the_diffusers_layout_whatever_its_name(tmp_path):
    (tmp_path / "merged.v2").mkdir()
    assert formats.output_format(tmp_path / "merged.v2") == "diffusers"
    with pytest.raises(MergeError, match=r"\.v3 is none of .safetensors"):
        formats.output_format(tmp_path / "merged.v3")


def test_cd_merge_writes_the_format_the_name_tells(tiny_pipeline_path, tiny_delta_files, tmp_path, capsys):
    """``-o weird.bin`` used to write a diffusers folder named weird.bin."""
    output = tmp_path / "weird.bin"
    assert cd_merge.main([*merge_args(tiny_pipeline_path, tiny_delta_files), "-o", str(output)]) == 0
    capsys.readouterr()
    assert output.is_file() and formats.detect_format(output).NAME == "authors-bin"


def test_sdxl_as_compvis_is_refused_before_any_input_is_read(tiny_pipeline_path, tiny_delta_files, tmp_path,
                                                             capsys, no_work):
    for extra in ([], ["--dry-run"]):
        output = tmp_path / "merged.ckpt"
        assert cd_merge.main([*merge_args(tiny_pipeline_path, tiny_delta_files, "sdxl"), "-o", str(output),
                              *extra]) == 1
        assert one_error_line(capsys, "cd-merge") == (
            f"Cannot write {output} as compvis: the format holds only sd1 and sd2 models, and this is an sdxl "
            f"delta; choose native, diffusers, authors-bin, diffusers-lora or kohya-lora instead.")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("format_options", [[], ["--format", "diffusers"]])
def test_force_never_replaces_a_foreign_folder_and_says_so_before_any_work(tiny_pipeline_path, tiny_delta_files,
                                                                           tmp_path, capsys, no_work,
                                                                           format_options):
    folder = tmp_path / "model.v1"  # an existing folder: the diffusers layout, whatever its name
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    assert cd_merge.main([*merge_args(tiny_pipeline_path, tiny_delta_files), "-o", str(folder), "--force",
                          *format_options]) == 1
    assert one_error_line(capsys, "cd-merge") == (
        f"{folder} holds other things than a Custom Diffusion output (e.g. notes.txt); refusing to replace "
        f"it, even with --force. Choose another output name.")
    assert (folder / "notes.txt").read_text() == "keep me"


def test_force_never_replaces_a_folder_with_a_file(tiny_pipeline_path, tiny_delta_files, tmp_path, capsys,
                                                   no_work):
    folder = tmp_path / "merged.safetensors"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    assert cd_merge.main([*merge_args(tiny_pipeline_path, tiny_delta_files), "-o", str(folder), "--force",
                          "--format", "native"]) == 1
    assert one_error_line(capsys, "cd-merge") == (
        f"{folder} is a folder (holding e.g. notes.txt); refusing to replace it with a file, even with --force. "
        f"Choose another output name.")
    assert (folder / "notes.txt").read_text() == "keep me"


def test_force_replaces_an_earlier_output_folder(tiny_pipeline_path, tiny_delta_files, tmp_path, capsys):
    output = tmp_path / "merged"
    args = [*merge_args(tiny_pipeline_path, tiny_delta_files), "-o", str(output)]
    assert cd_merge.main(args) == 0
    assert cd_merge.main([*args, "--force"]) == 0
    capsys.readouterr()
    assert formats.detect_format(output).NAME == "diffusers"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged"]


@pytest.mark.parametrize("force", [False, True])
def test_a_file_output_never_replaces_a_non_empty_folder(tmp_path, force):
    """Said the same with or without --force: advising --force would not help."""
    (tmp_path / "grid.png").mkdir()
    (tmp_path / "grid.png" / "a.png").write_bytes(b"keep")
    with pytest.raises(MergeError, match=r"grid\.png is a folder \(holding e\.g\. a\.png\); refusing to replace "
                                         r"it with a file, even with --force\. Choose another output name\.$"):
        check_destination(tmp_path / "grid.png", force=force)
    (tmp_path / "empty").mkdir()
    check_destination(tmp_path / "empty", force=True)  # nothing to lose
    with pytest.raises(MergeError, match=r"empty exists; pass --force to overwrite\.$"):
        check_destination(tmp_path / "empty", force=False)


def test_an_unreadable_folder_is_refused_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()

    def unreadable(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(tmp_path), "iterdir", unreadable)
    with pytest.raises(MergeError, match=r"out is a folder that cannot be read \(Permission denied\); refusing to "
                                         r"replace it, even with --force\."):
        check_destination(tmp_path / "out", force=False)


def test_cd_convert_tells_the_format_from_the_output_name(tiny_delta_files, tiny_pipeline_path, tmp_path,
                                                          capsys):
    files = tiny_delta_files("sd1")
    output = tmp_path / "cat.bin"
    assert cd_convert.main([str(files["native"]), "-o", str(output), "--base",
                            str(tiny_pipeline_path("sd1"))]) == 0
    assert capsys.readouterr().out == f"wrote {output} (authors-bin)\n"
    assert cd_convert.main([str(files["native"]), "-o", str(tmp_path / "cat.pt")]) == 1
    assert re.search(r"^Cannot tell which format to write \S+cat\.pt in", one_error_line(capsys, "cd-convert"))
    assert cd_convert.main([str(files["native"]), "-o", str(tmp_path / "small.safetensors"),
                            "--compress", "1.5"]) == 1
    assert one_error_line(capsys, "cd-convert") == "--compress 1.5: the relative error bound must be in [0, 1)."
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cat.bin"]


@pytest.mark.parametrize("command", [cd_merge, cd_convert])
def test_format_help_describes_the_inference(command, capsys):
    with pytest.raises(SystemExit):
        command.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert (".safetensors native, .bin authors-bin, .ckpt compvis, no extension (or an existing folder) the "
            "diffusers folder layout") in help_text


# ---------------------------------------------------------------- delta references on the hub
@pytest.fixture
def multi_delta_repo(tiny_delta_files, tmp_path, monkeypatch):
    """An offline hub cache with ``someone/concepts``: one delta at the top, two in subfolders."""
    import shutil

    from hubcache import add_to_hub_cache, use_hub_cache

    files = tiny_delta_files("sd1")
    source = tmp_path / "repo"
    (source / "cats" / "old").mkdir(parents=True)
    (source / "dogs").mkdir()
    shutil.copy(files["native"], source / "top.safetensors")
    shutil.copy(files["native"], source / "cats" / "cat.safetensors")
    shutil.copy(files["authors-bin"], source / "cats" / "old" / "delta.bin")
    shutil.copytree(files["diffusers"], source / "dogs" / "dog")
    (source / "README.md").write_text("three concepts")
    cache = tmp_path / "hf-cache"
    add_to_hub_cache(cache, "someone/concepts", source)
    use_hub_cache(monkeypatch, cache, offline=True)
    return sorted(file.relative_to(source).as_posix() for file in source.rglob("*") if file.is_file())


@pytest.fixture
def fetched(monkeypatch, multi_delta_repo):
    """The repo files each snapshot_download call would fetch, by its own pattern filter."""
    from huggingface_hub.utils import filter_repo_objects

    from mergekit_cd import hub

    calls: list[set[str]] = []
    real_download = hub.snapshot_download

    def recording(repo_id, **kwargs):
        calls.append(set(filter_repo_objects(multi_delta_repo, allow_patterns=kwargs.get("allow_patterns"),
                                             ignore_patterns=kwargs.get("ignore_patterns"))))
        return real_download(repo_id, **kwargs)

    monkeypatch.setattr(hub, "snapshot_download", recording)
    return calls


def test_a_delta_repo_is_fetched_from_its_top_level_only(fetched, tiny_delta_files):
    from mergekit_cd.loading import load

    delta = load("someone/concepts")
    assert fetched == [{"top.safetensors"}]  # not cats/cat.safetensors, cats/old/delta.bin, dogs/dog/...
    assert delta.allclose(tiny_delta_files("sd1")["object"], rtol=0, atol=0)


@pytest.mark.parametrize(("reference", "wanted"), [
    ("someone/concepts:cats/cat.safetensors", {"cats/cat.safetensors"}),
    ("someone/concepts@main:cats/cat.safetensors", {"cats/cat.safetensors"}),
    ("someone/concepts:cats", {"cats/cat.safetensors"}),  # a folder: its own delta files, not cats/old/
    ("someone/concepts:dogs/dog/", {"dogs/dog/<new1>.safetensors",
                                    "dogs/dog/pytorch_custom_diffusion_weights.safetensors"}),
])
def test_repo_colon_path_names_one_delta_of_a_repo_and_fetches_only_it(fetched, tiny_delta_files,
                                                                       tiny_pipeline_path, reference, wanted):
    from mergekit_cd.loading import load

    delta = load(reference, base=tiny_pipeline_path("sd1"))
    assert fetched == [wanted]
    assert delta.allclose(tiny_delta_files("sd1")["object"], rtol=0, atol=1e-6)


def test_a_path_missing_from_a_repo_is_named(fetched, capsys):
    from mergekit_cd.cli import inspect as cd_inspect

    assert cd_inspect.main(["someone/concepts:cats/dog.safetensors"]) == 1
    message = one_error_line(capsys, "cd-inspect")
    assert message.startswith("The Hugging Face repo someone/concepts (snapshot ")
    assert "is not a complete delta repo: it lacks cats/dog.safetensors." in message
    assert cd_inspect.main(["someone/concepts:../x"]) == 1
    assert one_error_line(capsys, "cd-inspect") == ("someone/concepts:../x: '../x' after ':' is not a path inside "
                                                    "the repo (expected org/name:folder/file.safetensors).")


@pytest.mark.parametrize("reference", ["missing.safetensors", "./missing", "../missing", "~/missing",
                                       "/abs/missing", "folder/sub/missing", "org/missing.bin",
                                       "./missing:cats"])
def test_a_missing_local_path_is_file_not_found_not_a_repo_id(reference, capsys, monkeypatch):
    from mergekit_cd import hub
    from mergekit_cd.cli import inspect as cd_inspect

    def no_hub(*args, **kwargs):
        raise AssertionError(f"{reference} was looked up on the hub")

    monkeypatch.setattr(hub, "snapshot_download", no_hub)
    assert cd_inspect.main([reference]) == 1
    assert one_error_line(capsys, "cd-inspect") == f"{reference}: no such file or folder."


def test_style_flags_name_inputs_by_position_or_name():
    from mergekit_cd.cli._common import style_flags

    assert style_flags(["a.safetensors", "b/"], ["2"]) == [False, True]
    assert style_flags(["a.safetensors", "b/"], ["a.safetensors"]) == [True, False]
    assert style_flags(["a"], []) is None
    with pytest.raises(MergeError, match=r"--style 3: not an input position \(1-1\) or an input name"):
        style_flags(["a"], ["3"], what="an input")


def _copy_inputs(tiny_delta_files, tmp_path) -> tuple:
    """Private copies of a native file and a diffusers folder (the tests try to overwrite them)."""
    import shutil

    files = tiny_delta_files("sd1")
    native = tmp_path / "inputs" / "cat.safetensors"
    native.parent.mkdir()
    shutil.copy(files["native"], native)
    folder = tmp_path / "inputs" / "dog"
    shutil.copytree(files["diffusers"], folder)
    return native, folder


def _snapshot(*paths) -> dict:
    return {str(file): file.read_bytes() for path in paths
            for file in ([path] if path.is_file() else sorted(path.rglob("*")))}


@pytest.mark.parametrize("case", ["the file", "the folder", "inside the folder", "a link to the file",
                                  "the folder holding an input"])
@pytest.mark.parametrize("command", ["cd-merge", "cd-convert"])
def test_an_output_is_never_an_input_even_with_force(case, command, tiny_pipeline_path, tiny_delta_files, tmp_path,
                                                     capsys):
    native, folder = _copy_inputs(tiny_delta_files, tmp_path)
    output = {"the file": native, "the folder": folder, "inside the folder": folder / "merged.safetensors",
              "a link to the file": tmp_path / "link.safetensors",
              "the folder holding an input": tmp_path / "inputs"}[case]
    if case == "a link to the file":
        output.symlink_to(native)
    before = _snapshot(native, folder)
    base = ["--base", str(tiny_pipeline_path("sd1"))]
    source = folder if case in ("the folder", "inside the folder") else native
    if command == "cd-merge":
        code = cd_merge.main([str(native), str(folder), "--class", "cat", "--class", "dog", "-o", str(output),
                              "--force", "--num-reg-captions", "20", "-q", *base])
    else:
        code = cd_convert.main([str(source), "-o", str(output), "--force", *base])
    message = one_error_line(capsys, command)
    harm = "change" if case == "inside the folder" else "destroy"  # a new file inside a folder input changes it
    assert code == 1 and f"Cannot write {output}: it " in message and f"{harm} (even with --force)" in message
    assert _snapshot(native, folder) == before
    assert case != "a link to the file" or output.is_symlink()
