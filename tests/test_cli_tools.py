"""cd-sample, cd-inspect and cd-convert, run through ``main([...])`` as the console scripts run
them: exit status, what they print, what they write. A user error is one line
``cd-<command>: error: ...`` on stderr and status 1. One test runs the commands in a fresh
interpreter to check that no third-party logs, warnings or progress bars get through.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mergekit_cd import load
from mergekit_cd.cli import convert as cd_convert
from mergekit_cd.cli import inspect as cd_inspect
from mergekit_cd.cli import merge as cd_merge
from mergekit_cd.cli import sample as cd_sample
from mergekit_cd.delta import LowRank, dense

from cli_output import one_error_line

SIZE = 16  # the tiny pipelines' default image size


pytestmark = pytest.mark.usefixtures("tiny_models")  # built before any test captures output


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def cell(grid: np.ndarray, row: int, column: int) -> np.ndarray:
    return grid[row * SIZE:(row + 1) * SIZE, column * SIZE:(column + 1) * SIZE]


# ---------------------------------------------------------------- cd-sample
def test_cd_sample_writes_a_seeded_grid(tiny_pipeline_path, tiny_delta_files, tmp_path, capfd):
    """One row per prompt, n images per row; the same seed gives the same bytes; image j of a
    row uses seed + j, so seed 1's first column is seed 0's second. Without -q, the only thing
    on stderr is cd-sample's own progress bar (captured at the file descriptors, so loggers and
    progress bars of diffusers / transformers would show)."""
    base = str(tiny_pipeline_path("sd1"))
    delta = str(tiny_delta_files("sd1")["native"])
    prompts = ["photo of a <new1> cat", "a <new1> cat in the snow"]
    common = ["--base", base, "--delta", delta, *prompts, "-n", "3", "--steps", "2"]

    assert cd_sample.main([*common, "-o", str(tmp_path / "a.png")]) == 0
    captured = capfd.readouterr()
    assert captured.out == f"wrote {tmp_path / 'a.png'} (2 prompt(s) x 3 image(s))\n"
    assert_only_our_progress_bar(captured.err, "sampling:")
    common.append("-q")
    grid = pixels(tmp_path / "a.png")
    assert grid.shape == (2 * SIZE, 3 * SIZE, 3)
    assert not np.array_equal(cell(grid, 0, 0), cell(grid, 0, 1))  # different seeds
    assert not np.array_equal(cell(grid, 0, 0), cell(grid, 1, 0))  # different prompts

    assert cd_sample.main([*common, "-o", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()

    assert cd_sample.main([*common, "--seed", "1", "-o", str(tmp_path / "c.png")]) == 0
    np.testing.assert_array_equal(cell(pixels(tmp_path / "c.png"), 1, 0), cell(grid, 1, 1))

    base_only = ["--base", base, *prompts, "-n", "3", "--steps", "2", "-q", "-o", str(tmp_path / "d.png")]
    assert cd_sample.main(base_only) == 0
    assert not np.array_equal(pixels(tmp_path / "d.png"), grid)  # the delta changes the images


def test_cd_sample_refuses_to_overwrite(tiny_pipeline_path, tmp_path, capsys):
    output = tmp_path / "grid.png"
    output.write_bytes(b"not replaced")
    args = ["--base", str(tiny_pipeline_path("sdxl")), "a cat", "-n", "2", "--steps", "2", "-q",
            "-o", str(output)]
    assert cd_sample.main(args) == 1
    assert one_error_line(capsys, "cd-sample") == f"{output} exists; pass --force to overwrite."
    assert output.read_bytes() == b"not replaced"
    assert cd_sample.main([*args, "--force"]) == 0
    assert Image.open(output).size == (2 * SIZE, SIZE)


@pytest.mark.parametrize(("arguments", "message"), [
    (["--delta", "{sdxl_delta}"],
     r"^\S*delta is an sdxl delta but this pipeline is sd1 .*wrong architecture\.$"),
    (["--base", "{sdxl_delta}"], r"^\S+ is not a diffusers pipeline folder: it has no model_index\.json\.$"),
    (["-o", "{tmp}/grid.gif.unknown"],
     r"^Cannot write \S+grid\.gif\.unknown: \.unknown is not an image format"),
    (["-o", "{tmp}/missing/grid.png"], r"^Cannot write \S+grid\.png: folder \S+missing does not exist\.$"),
    (["-n", "0"], r"^The number of images per prompt must be at least 1, got 0\.$"),
    (["--height", "12"], r"^Cannot sample 'a cat': `height` and `width` have to be divisible by 8 "
                         r"but are 12 and 16\.$"),
])
def test_cd_sample_user_errors_are_one_line(tiny_pipeline_path, tiny_delta_files, tmp_path, capsys,
                                            arguments, message):
    values = {"sdxl_delta": str(tiny_delta_files("sdxl")["diffusers"]), "tmp": str(tmp_path)}
    arguments = [argument.format(**values) for argument in arguments]
    args = ["--base", str(tiny_pipeline_path("sd1")), "a cat", "--steps", "1", "-q",
            "-o", str(tmp_path / "grid.png"), *arguments]
    assert cd_sample.main(args) == 1
    assert re.search(message, one_error_line(capsys, "cd-sample")), message
    assert not (tmp_path / "grid.png").exists()


@pytest.mark.parametrize(("missing", "message"), [
    ("vae", "lacks the vae component that its model_index.json lists (no vae/ folder, or an empty one)."),
    ("unet", "lacks the unet component that its model_index.json lists (no unet/ folder, or an empty one)."),
    ("tokenizer", "lacks the tokenizer component that its model_index.json lists (no tokenizer/ folder, or an "
                  "empty one)."),
    ("vae/diffusion_pytorch_model.safetensors", "the vae component has a config.json but no weights "
                                                "(.safetensors or .bin) in {base}/vae."),
])
def test_cd_sample_names_a_missing_pipeline_component(tiny_pipeline_path, tmp_path, capsys, missing, message):
    """diffusers itself says a file is missing from the pipeline folder, or fails in a tokenizer."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_pipeline_path("sd1"), base)
    victim = base / missing
    shutil.rmtree(victim) if victim.is_dir() else victim.unlink()
    assert cd_sample.main(["--base", str(base), "a cat", "--steps", "1", "-q", "-o", str(tmp_path / "g.png")]) == 1
    error = one_error_line(capsys, "cd-sample")
    assert error.startswith(str(base)) and error.endswith(message.format(base=base)), error
    assert not (tmp_path / "g.png").exists()


def test_only_cd_merge_has_a_text_encoder_dtype(capsys):
    """cd-sample has --device alone; cd-merge keeps --device and --dtype."""
    with pytest.raises(SystemExit) as exit_info:
        cd_sample.build_parser().parse_args(["--base", "x", "p", "--dtype", "float16"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --dtype float16" in capsys.readouterr().err
    assert cd_sample.build_parser().parse_args(["--base", "x", "p", "--device", "cuda:1"]).device == "cuda:1"
    merge_args = cd_merge.build_parser().parse_args(["a", "-o", "o", "--base", "b", "--dtype", "float16",
                                                     "--device", "cuda"])
    assert (merge_args.dtype, merge_args.device) == ("float16", "cuda")


# ---------------------------------------------------------------- cd-inspect
@pytest.mark.parametrize(("architecture", "source", "expected"), [
    ("sd1", "native", ["format:       native (differences)", "architecture: sd1, text features: 64",
                       "tokens:       <new1> [64]", "concepts:     <new1> = cat",
                       "layers:       11 cross-attention layers (difference norms: K, V)",
                       "metadata:", '"tool": {']),
    ("sdxl", "diffusers", ["format:       diffusers (full fine-tuned weights)",
                           "architecture: sdxl, text features: 160", "tokens:       <new1> [64, 96]",
                           "layers:       17 cross-attention layers (weight norms: K, V)",
                           "  mid_block.attentions.0.transformer_blocks.1.attn2 "]),
    ("sd1", "authors-bin", ["format:       authors-bin (full fine-tuned weights)",
                            "architecture: sd1, text features: 64", "concepts:     <new1> = cat",
                            "tokens:       <new1> [64]", "(weight norms: K, V)"]),
    ("sd1", "authors-own", ["format:       authors-bin (full fine-tuned weights)",
                            "architecture: unknown, text features: 64", "base:         not recorded",
                            "tokens:       <new1> [64]", "(weight norms: K, V)"]),
])
def test_cd_inspect_describes_each_format(tiny_pipeline_path, tiny_delta_files, capsys, authors_own, architecture,
                                          source, expected):
    files = tiny_delta_files(architecture)
    path = authors_own(files["authors-bin"]) if source == "authors-own" else files[source]
    assert cd_inspect.main([str(path)]) == 0
    out = capsys.readouterr().out
    for text in expected:
        assert text in out, text
    delta = files["object"]
    if delta.base_fingerprint and source != "authors-own":
        assert f"base:         {delta.base} (fingerprint {delta.base_fingerprint[:16]})" in out
    first = next(iter(delta.layers))
    line = next(line for line in out.splitlines() if line.strip().startswith(first + " "))
    assert re.search(r"\[\d+, \d+\]\s+[\d.e+-]+\s+[\d.e+-]+\s+full$", line), line


def test_cd_inspect_with_base_shows_differences(tiny_pipeline_path, tiny_delta_files, capsys, authors_own):
    files = tiny_delta_files("sd1")
    base = tiny_pipeline_path("sd1")
    assert cd_inspect.main([str(authors_own(files["authors-bin"])), "--base", str(base),
                            "--all-layers"]) == 0
    out = capsys.readouterr().out
    assert "(difference norms: K, V)" in out
    assert "architecture: sd1 (from the base)" in out
    assert re.search(r"compared to:  \S+ \(fingerprint [0-9a-f]{16}; the file records no base "
                     r"fingerprint\)", out)
    delta = files["object"]
    for name, layer in delta.layers.items():
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        key_norm, value_norm = map(float, line.split()[-3:-1])
        assert key_norm == pytest.approx(float(dense(layer.key).norm()), rel=1e-3)
        assert value_norm == pytest.approx(float(dense(layer.value).norm()), rel=1e-3)

    assert cd_inspect.main([str(files["native"]), "--base", str(base)]) == 0
    assert "; matches the file's base)" in capsys.readouterr().out


def test_cd_inspect_errors_are_one_line(tiny_pipeline_path, tiny_delta_files, tmp_path, capsys):
    garbage = tmp_path / "delta.bin"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    assert cd_inspect.main([str(garbage)]) == 1
    assert one_error_line(capsys, "cd-inspect").startswith(f"{garbage}: ")

    assert cd_inspect.main([str(tiny_delta_files("sdxl")["diffusers"]), "--base",
                            str(tiny_pipeline_path("sd1"))]) == 1
    assert one_error_line(capsys, "cd-inspect").endswith("wrong architecture.")


# ---------------------------------------------------------------- cd-convert
def test_cd_convert_round_trip_through_every_format_preserves_the_delta(tiny_pipeline_path, tiny_delta_files,
                                                                        tmp_path, capsys):
    base = str(tiny_pipeline_path("sd1"))
    delta = tiny_delta_files("sd1")["object"]
    chain = [(tiny_delta_files("sd1")["native"], None),
             (tmp_path / "delta", "diffusers"), (tmp_path / "delta.bin", "authors-bin"),
             (tmp_path / "delta_epoch=000001.ckpt", "compvis"), (tmp_path / "back.safetensors", "native")]
    for (source, _), (target, to) in zip(chain, chain[1:]):
        assert cd_convert.main([str(source), "-o", str(target), "--to", to, "--base", base]) == 0
        assert capsys.readouterr().out == f"wrote {target} ({to})\n"
    back = load(chain[-1][0])
    assert set(back.layers) == set(delta.layers)
    for name, layer in delta.layers.items():
        torch.testing.assert_close(dense(back.layers[name].key), layer.key, rtol=0, atol=1e-5)
        torch.testing.assert_close(dense(back.layers[name].value), layer.value, rtol=0, atol=1e-5)
    assert back.tokens.keys() == delta.tokens.keys()
    torch.testing.assert_close(back.tokens["<new1>"][0], delta.tokens["<new1>"][0])


@pytest.mark.parametrize(("to", "file_name"), [("native", "small.safetensors"),
                                               ("authors-bin", "compressed_delta.bin")])
def test_cd_convert_compress_reports_the_error(tiny_pipeline_path, tiny_delta_files, tmp_path, capsys,
                                               to, file_name):
    files = tiny_delta_files("sd1")
    output = tmp_path / file_name
    assert cd_convert.main([str(files["native"]), "-o", str(output), "--to", to, "--compress", "0.1"]) == 0
    out = capsys.readouterr().out
    match = re.match(r"compressed: relative error (\S+) \(bound 0\.1\), (\d+) -> (\d+) numbers\n", out)
    assert match, out
    reported, before, after = float(match[1]), int(match[2]), int(match[3])
    assert 0 < reported <= 0.1 and after < before
    assert out.endswith(f"wrote {output} ({to})\n")
    stored = load(output)
    assert all(isinstance(part, LowRank) for layer in stored.layers.values()
               for part in (layer.key, layer.value))
    delta = files["object"]
    error = sum(float((dense(stored.layers[name].key) - layer.key).norm() ** 2
                      + (dense(stored.layers[name].value) - layer.value).norm() ** 2)
                for name, layer in delta.layers.items())
    total = sum(float(layer.key.norm() ** 2 + layer.value.norm() ** 2) for layer in delta.layers.values())
    assert (error / total) ** 0.5 <= 0.1 + 1e-6


def test_cd_convert_keeps_a_full_rank_difference_dense_rather_than_grow_it(tiny_delta_files, tmp_path, capsys):
    from dataclasses import replace

    from mergekit_cd.loading import save

    delta = tiny_delta_files("sd1")["object"]
    generator = torch.Generator().manual_seed(0)
    noisy = replace(delta, layers={name: layer.map(lambda x: x + 0.01 * torch.randn(x.shape, generator=generator))
                                   for name, layer in delta.layers.items()})
    source = save(noisy, tmp_path / "full-rank.safetensors")
    output = tmp_path / "small.safetensors"
    assert cd_convert.main([str(source), "-o", str(output), "--compress", "1e-4"]) == 0
    out = capsys.readouterr().out
    assert f"kept dense: {2 * len(delta.layers)} of {2 * len(delta.layers)} matrices (their low-rank factors " \
           f"would be larger)" in out, out
    assert output.stat().st_size <= source.stat().st_size + 1024  # the header's recipe may grow a little
    stored = load(output)
    assert stored.allclose(noisy, rtol=0, atol=0)
    assert not any(isinstance(layer.key, LowRank) for layer in stored.layers.values())


def test_cd_convert_refuses_to_compress_to_the_diffusers_layout(tiny_pipeline_path, tiny_delta_files,
                                                                tmp_path, capsys):
    assert cd_convert.main([str(tiny_delta_files("sd1")["native"]), "-o", str(tmp_path / "out"), "--to",
                            "diffusers", "--base", str(tiny_pipeline_path("sd1")), "--compress", "0.1"]) == 1
    assert one_error_line(capsys, "cd-convert").startswith("--compress: the diffusers layout stores full "
                                                          "weights, so it has no compressed variant")
    assert not (tmp_path / "out").exists()


def test_cd_convert_sdxl_to_compvis_is_a_clear_error(tiny_pipeline_path, tiny_delta_files, tmp_path, capsys):
    output = tmp_path / "sdxl.ckpt"
    assert cd_convert.main([str(tiny_delta_files("sdxl")["native"]), "-o", str(output), "--to", "compvis",
                            "--base", str(tiny_pipeline_path("sdxl"))]) == 1
    message = one_error_line(capsys, "cd-convert")
    assert message == (f"Cannot write {output} as compvis: the format holds only sd1 and sd2 models, and this "
                       f"is an sdxl delta; choose native, diffusers, authors-bin, diffusers-lora or kohya-lora "
                       "instead.")
    assert not output.exists()


# ---------------------------------------------------------------- quiet commands
NOISE = ("Loading weights", "Writing model shards", "Loading pipeline components", "torchvision",
         "warn", "Traceback", "it/s]")


def assert_only_our_progress_bar(err: str, bar: str) -> None:
    fragments = [part for part in re.split(r"[\r\n]", err) if part.strip()]
    assert fragments and all(part.startswith(bar) for part in fragments), err


def test_cd_inspect_prints_no_third_party_logs_warnings_or_progress_bars(tiny_pipeline_path,
                                                                        tiny_delta_files):
    """In a fresh interpreter, so that messages printed once per process (e.g. transformers'
    torchvision notice) count too: stdout holds the summary alone and stderr nothing."""
    files = tiny_delta_files("sdxl")
    result = subprocess.run([sys.executable, "-m", "mergekit_cd.cli.inspect", str(files["authors-bin"]),
                             "--base", str(tiny_pipeline_path("sdxl"))],
                            capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith(f"file:         {files['authors-bin']}\n")
    for text in NOISE:
        assert text.lower() not in result.stdout.lower(), text


def test_run_silences_reported_warnings_and_library_noise_then_restores_them(capfd):
    """Inside a command: our TokenRenameWarning / IllConditionedWarning (the commands report
    those facts themselves), the libraries' deprecation notices and info logs print nothing;
    outside, the process's warning filters and log levels are as they were."""
    import argparse
    import logging
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from mergekit_cd.cli._common import run
    from mergekit_cd.errors import TokenRenameWarning
    from mergekit_cd.solvers import IllConditionedWarning

    import huggingface_hub.utils as hub_utils

    def library_state():
        return (transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled(),
                diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled(),
                hub_utils.are_progress_bars_disabled())

    outside = library_state()
    inside = []

    def noisy(args: argparse.Namespace) -> int:
        warnings.warn("token <new1> renamed", TokenRenameWarning)
        warnings.warn("cond(G) is large", IllConditionedWarning)
        warnings.warn_explicit("`x` is deprecated", FutureWarning, "deprecation_utils.py", 1,
                               module="diffusers.utils.deprecation_utils")
        inside.append(library_state())
        print("the command's own output")
        return 0

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run(noisy, argparse.ArgumentParser(prog="cd-test"), []) == 0
        assert caught == []
        warnings.warn("outside a command", TokenRenameWarning)
        assert [w.category for w in caught] == [TokenRenameWarning]
    assert capfd.readouterr() == ("the command's own output\n", "")
    assert inside == [(logging.ERROR, False, logging.ERROR, False, True)]
    assert library_state() == outside


QUIET_ON_IMPORT = """
import argparse, json, sys
from mergekit_cd.cli._common import run
assert "diffusers.utils.logging" not in sys.modules
inside = []

def command(args):
    imported_by_run = "diffusers" in sys.modules
    from diffusers.utils import logging
    inside.append([imported_by_run, logging.get_verbosity(), logging.is_progress_bar_enabled()])

run(command, argparse.ArgumentParser(prog="cd-test"), [])
from diffusers.utils import logging
print(json.dumps([inside[0], [logging.get_verbosity(), logging.is_progress_bar_enabled()]]))
"""


def test_run_quiets_a_library_imported_during_the_command_and_restores_it():
    """run imports no library to quiet it (diffusers takes 3 s to import): one the command imports
    itself is quieted as soon as it is loaded, and left as it would have been afterwards. A fresh
    interpreter, where diffusers is not imported yet."""
    result = subprocess.run([sys.executable, "-c", QUIET_ON_IMPORT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[[false, 40, false], [30, true]]"  # logging.ERROR inside, WARNING after


def test_run_turns_user_errors_and_a_closed_pipe_into_exit_codes(capsys):
    import argparse

    from mergekit_cd.cli._common import device, run
    from mergekit_cd.errors import MergeError

    def failing(args):
        raise MergeError("x.safetensors is not a delta; use a .safetensors made by cd-merge.")

    assert run(failing, argparse.ArgumentParser(prog="cd-test"), []) == 1
    assert capsys.readouterr().err == ("cd-test: error: x.safetensors is not a delta; use a .safetensors "
                                       "made by cd-merge.\n")

    def reader_left(args):
        raise BrokenPipeError

    assert run(reader_left, argparse.ArgumentParser(prog="cd-test"), []) == 141
    with pytest.raises(MergeError, match=r"^--device gpu0: not a device name; this machine has cpu"):
        device("gpu0")
