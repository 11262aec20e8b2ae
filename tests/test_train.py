"""cd-train on the tiny SD1 and SDXL models: the recipe, its outputs, resume, merging, bad inputs.

Every run is a few steps at 16 x 16 pixels on synthetic instance images (a yellow disc on blue
for the cat, a red square on white for the pot) with two generated class images, shared
through one class-image cache. Torch runs single-threaded here: on a busy 2-core machine the
tiny models' many small kernels are several times faster that way.
"""

from __future__ import annotations

import json
import math
import os
import re
import runpy
import shutil
import signal
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

import mergekit_cd
from mergekit_cd import MergeError, load
from mergekit_cd.base import open_base
from mergekit_cd.cli import merge as cd_merge
from mergekit_cd.cli import train as cd_train
from mergekit_cd.prompts import target_prompts
from mergekit_cd.sampling import load_pipeline
from mergekit_cd.testing import random_concept_delta
from mergekit_cd.train import TrainingInterrupted, train
from mergekit_cd.train import data as train_data
from mergekit_cd.train import loop as train_loop
from mergekit_cd.train import setup as train_setup
from mergekit_cd.train import step as train_step
from mergekit_cd.train.attention import DetachStartTokenAttnProcessor
from mergekit_cd.train.config import ConceptSpec, TrainingConfig, check_config
from mergekit_cd.train.embeddings import NewTokenEmbedding
from mergekit_cd.train.state import Progress

from cli_output import one_error_line

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


def draw_images(folder: Path, background, shape: str, colour, count: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = Image.new("RGB", (24 + 4 * index, 24), background)  # not square: cropped to square
        box = (4 + index, 4, 18 + index, 18)
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "disc" else draw.rectangle)(box, fill=colour)
        image.save(folder / f"{index}.{'png' if index % 2 else 'jpg'}")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("instance-images")
    return {"cat": draw_images(root / "cat", (20, 30, 200), "disc", (240, 200, 10)),
            "pot": draw_images(root / "pot", (250, 250, 250), "square", (200, 20, 20))}


@pytest.fixture(scope="module")
def fast(tmp_path_factory) -> dict:
    """Options that keep a run to about a second: tiny batches, two class images, one sampling step."""
    return dict(steps=4, batch_size=2, num_class_images=2, class_sampling_steps=1, progress=False,
                class_cache_dir=tmp_path_factory.mktemp("class-cache"), device="cpu")


def embedding_row(pipe, word: str, encoder: int = 0) -> torch.Tensor:
    tokenizer = [pipe.tokenizer, getattr(pipe, "tokenizer_2", None)][encoder]
    text_encoder = [pipe.text_encoder, getattr(pipe, "text_encoder_2", None)][encoder]
    (row,) = tokenizer(word, add_special_tokens=False)["input_ids"]
    return text_encoder.get_input_embeddings().weight[row].detach().clone()


def cli_options(fast: dict) -> list[str]:
    """The ``fast`` options as cd-train arguments."""
    return ["--steps", str(fast["steps"]), "--batch-size", str(fast["batch_size"]), "--num-class-images",
            str(fast["num_class_images"]), "--class-sampling-steps", str(fast["class_sampling_steps"]),
            "--class-cache-dir", str(fast["class_cache_dir"]), "--device", fast["device"], "-q"]


def cli_error(capsys, arguments: list[str]) -> str:
    """Run cd-train expecting a user error: exit status 1, nothing on stdout, one line on stderr
    (no traceback); returns the message."""
    capsys.readouterr()
    assert cd_train.main(arguments) == 1
    return one_error_line(capsys, "cd-train")


# ----------------------------------------------------------------------------- one run, many checks


@pytest.fixture(scope="module")
def trained(tiny_pipeline_path, images, fast, tmp_path_factory):
    """A 16-step SD1 run driven through its state, with the instance loss on fixed evaluation
    draws (steps 1000-1015: the same images, augmentation, noise and timesteps) before and after.
    The learning rate is high (2e-3 x batch 2) so that 16 steps visibly fit the instance images."""
    base = tiny_pipeline_path("sd1")
    output = tmp_path_factory.mktemp("run") / "cat"
    config = TrainingConfig(base=str(base), concepts=(ConceptSpec(images["cat"], "cat"),), output=output,
                            **{**fast, "steps": 16}, learning_rate=2e-3, checkpoint_every=5,
                            validation_prompts=("<new1> cat",), validation_every=8,
                            num_validation_images=1, validation_sampling_steps=1)
    state = train_setup.setup(check_config(config))

    def evaluation_loss() -> float:
        with torch.no_grad():
            return sum(float(train_step.loss_terms(state, step)[0]) for step in range(1000, 1016)) / 16

    global_rng = torch.get_rng_state()
    before = evaluation_loss()  # the UNet is in training mode here, as in a step
    global_rng_untouched = torch.equal(torch.get_rng_state(), global_rng)
    processors = {name: type(p).__name__ for name, p in state.models.pipe.unet.attn_processors.items()}
    result = train_loop.train(state, return_pipeline=True)
    return {"base": base, "output": output, "result": result, "state": state, "processors": processors,
            "before": before, "after": evaluation_loss(), "global_rng_untouched": global_rng_untouched}


@pytest.mark.slow
def test_training_lowers_the_loss_on_the_instance_images(trained):
    assert trained["after"] < 0.99 * trained["before"], (trained["before"], trained["after"])
    assert len(trained["result"].losses) == 16 and all(np.isfinite(trained["result"].losses))


def test_a_step_draws_nothing_from_torchs_global_generators(trained):
    """Why checkpoints hold no generator state and a resumed run still repeats an uninterrupted
    one: every draw of a step comes from its own (seed, process, step) generators."""
    assert trained["global_rng_untouched"]


def test_cross_attention_detaches_the_start_token_while_training_only(trained):
    during = trained["processors"]
    assert {during[n] for n in during if ".attn2." in n} == {"DetachStartTokenAttnProcessor"}
    assert "DetachStartTokenAttnProcessor" not in {during[n] for n in during if ".attn1." in n}
    after = {type(p).__name__ for p in trained["result"].pipeline.unet.attn_processors.values()}
    assert "DetachStartTokenAttnProcessor" not in after


def test_frozen_weights_and_old_embedding_rows_stay_bit_identical(trained):
    trained_pipe = trained["result"].pipeline
    base_pipe = load_pipeline(trained["base"])
    trainable = {name for name, _ in trained["state"].weights.named}
    changed = []
    for component in ("unet", "vae", "text_encoder"):
        theirs = dict(getattr(base_pipe, component).named_parameters())
        for name, parameter in getattr(trained_pipe, component).named_parameters():
            if component == "text_encoder" and parameter.shape[0] == theirs[name].shape[0] + 1:
                old_rows = theirs[name].shape[0]  # the embedding table, one new row at the end
                assert torch.equal(parameter[:old_rows], theirs[name]), "an old embedding row moved"
                assert not torch.equal(parameter[old_rows], embedding_row(base_pipe, "ktn")), "the new row did not train"
                continue
            if not torch.equal(parameter.detach(), theirs[name].detach()):
                changed.append(f"{component}.{name}" if component != "unet" else name)
    expected = {name for name in trainable if name.startswith(("down_", "mid_", "up_"))}
    assert set(changed) == expected  # every K/V weight moved, nothing else did
    assert all(name.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for name in expected)
    assert len(expected) == 2 * 11


def text_features(pipe, prompt):
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_token_free_prompts_keep_bit_identical_text_features_and_the_token_row_is_the_only_text_change(trained):
    """The text encoder is frozen and only the new row trains, so a prompt without the token has
    exactly the base's text features, and the token's new embedding is the only text-side
    change: the written delta's token reproduces the trained pipeline's features, the token at
    its initial embedding does not. (This is the text encoder only; the K/V change moves the
    UNet's output for every prompt, see the next test.)"""
    trained_pipe, base_pipe = trained["result"].pipeline, load_pipeline(trained["base"])
    for prompt in ("photo of a cat", "a red car in the snow"):
        assert torch.equal(text_features(trained_pipe, prompt), text_features(base_pipe, prompt))
    mergekit_cd.apply(base_pipe, trained["result"].delta)  # the delta as written reproduces the trained model
    assert torch.equal(text_features(base_pipe, "photo of a <new1> cat"),
                       text_features(trained_pipe, "photo of a <new1> cat"))
    mergekit_cd.remove(base_pipe)
    initial = trained["result"].delta * 0.0  # the token at its initial embedding, no K/V change
    initial.tokens = {"<new1>": (embedding_row(base_pipe, "ktn"),)}
    mergekit_cd.apply(base_pipe, initial)
    assert not torch.allclose(text_features(base_pipe, "photo of a <new1> cat"),
                              text_features(trained_pipe, "photo of a <new1> cat"))


def test_only_the_token_part_of_the_delta_is_confined_to_prompts_with_the_token(trained):
    """What "changes the output only for prompts with the token" can honestly mean for Custom
    Diffusion, on the UNet's noise prediction for one fixed noisy latent and timestep.

    (a) The trained token alone (the delta's embedding, its K/V change left out) leaves prompts
    without the token bit-identical to the base and moves those with it: by 3.0% and 3.5%
    (relative L2) here, against the token at its initial embedding.
    (b) The K/V change moves every prompt, not only those with the token: here (16 steps at lr
    4e-3, high so that the test fits quickly) by 41% and 39% for the two token-free prompts and
    41% and 40% for the token prompts. These sizes are of this tiny random-weight model and run
    only; the test asserts that the token moves its prompts by over 1% and that the whole delta
    moves token-free prompts at least half as much as token prompts. So the claim holds for
    the token, not for a raw delta as a whole; bounding the change on ordinary captions is what
    cd-merge's constrained solve does (see the merge tests).
    """
    from diffusers import DDPMScheduler

    trained_pipe, delta = trained["result"].pipeline, trained["result"].delta
    size = trained_pipe.unet.config.sample_size
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, trained_pipe.unet.config.in_channels, size, size, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    timestep = torch.tensor([500])
    noisy = DDPMScheduler.from_config(trained_pipe.scheduler.config).add_noise(latents, noise, timestep)

    def prediction(pipe, prompt):
        with torch.no_grad():
            return pipe.unet(noisy, timestep, text_features(pipe, prompt)).sample

    def change(a, b):
        return float((a - b).norm() / b.norm())

    plain, with_token = ("photo of a cat", "a red car in the snow"), ("photo of a <new1> cat", "<new1> cat on a beach")
    pipe = load_pipeline(trained["base"])
    base = {prompt: prediction(pipe, prompt) for prompt in plain}
    token_only, initial = delta * 0.0, delta * 0.0  # no K/V change
    token_only.tokens = dict(delta.tokens)
    initial.tokens = {"<new1>": (embedding_row(pipe, "ktn"),)}
    mergekit_cd.apply(pipe, initial)
    untrained_token = {prompt: prediction(pipe, prompt) for prompt in with_token}
    mergekit_cd.remove(pipe)
    mergekit_cd.apply(pipe, token_only)
    for prompt in plain:  # (a)
        assert torch.equal(prediction(pipe, prompt), base[prompt])
    token_change = [change(prediction(pipe, p), untrained_token[p]) for p in with_token]
    assert min(token_change) > 0.01, token_change
    # (b): the whole delta moves token-free prompts about as much as token prompts
    plain_change = [change(prediction(trained_pipe, p), base[p]) for p in plain]
    full_token_change = [change(prediction(trained_pipe, p), untrained_token[p]) for p in with_token]
    assert min(plain_change) > 0.5 * max(full_token_change), (plain_change, full_token_change)


def test_output_folder_holds_native_and_diffusers_files_with_metadata(trained):
    output, base = trained["output"], open_base(trained["base"])
    result = trained["result"]
    assert result.native == output / "delta.safetensors" and result.diffusers == output / "diffusers"
    assert (output / "diffusers" / "pytorch_custom_diffusion_weights.safetensors").is_file()
    assert (output / "diffusers" / "<new1>.safetensors").is_file()
    native = load(output, base=base)  # the folder stands for its one delta file
    assert native.concepts[0].class_word == "cat"
    assert native.concepts[0].prompts == tuple(target_prompts("<new1>", "cat"))
    assert native.base_fingerprint == base.fingerprint and native.architecture == "sd1"
    recipe = native.metadata["recipe"]
    assert recipe["trainer"] == "cd-train" and recipe["steps"] == 16 and recipe["batch_size"] == 2
    assert recipe["learning_rate"] == pytest.approx(4e-3) and recipe["train"] == ["k", "v"]
    assert recipe["concepts"][0]["init_token"] == "ktn" and recipe["detach_start_token"] is True
    assert native.allclose(result.delta, atol=0)
    from_diffusers = load(output / "diffusers", base=base)  # full weights -> differences again
    assert from_diffusers.concepts == native.concepts
    assert from_diffusers.allclose(native, rtol=0, atol=1e-6)
    # checkpoints (only the newest kept) and validation samples
    assert [p.name for p in (output / "checkpoints").iterdir()] == ["step-000015"]
    assert sorted(p.name for p in (output / "validation").iterdir()) == ["step-000008.png", "step-000016.png"]


def test_the_run_refuses_to_reuse_its_output_folder_without_force_or_resume(trained, images, fast):
    with pytest.raises(MergeError, match=r"holds a finished run \(delta.safetensors\); .* --force"):
        train(trained["base"], images["cat"], "cat", trained["output"], **fast)
    interrupted = trained["output"].parent / "interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    with pytest.raises(MergeError, match=r"not empty \(an interrupted run\?\); pass --resume .* or --force"):
        train(trained["base"], images["cat"], "cat", interrupted, **fast)


# ----------------------------------------------------------------------------- merging what was trained


def test_two_concepts_trained_separately_then_cd_merged_keep_both_constraints(
        tiny_pipeline_path, images, fast, tmp_path, capsys):
    base = tiny_pipeline_path("sd1")
    cat = train(base, images["cat"], "cat", tmp_path / "cat", **fast).output
    pot = train(base, images["pot"], "pot", tmp_path / "pot", train="q,k,v,out", init_token="pll", **fast).output
    with safe_open(str(pot / "diffusers" / "pytorch_custom_diffusion_weights.safetensors"), "pt") as file:
        keys = list(file.keys())
    assert any(k.endswith("to_q_custom_diffusion.weight") for k in keys)
    assert any(k.endswith("to_out_custom_diffusion.0.bias") for k in keys)
    merged = tmp_path / "merged.safetensors"
    capsys.readouterr()
    assert cd_merge.main([str(cat), str(pot), "-o", str(merged), "--base", str(base), "-q", "--sum-drift"]) == 0
    printed = capsys.readouterr().out
    assert "renamed to <new2>" in printed  # both were <new1>
    assert re.search(r"held-out drift: \S+ \(naive sum: \S+\)", printed)
    result = load(merged)
    assert sorted(result.tokens) == ["<new1>", "<new2>"]
    assert {c.class_word for c in result.concepts} == {"cat", "pot"}
    _, report = mergekit_cd.merge([cat, pot], base=base, return_report=True, sum_drift=True)
    assert all(concept.residual < 1e-4 for concept in report.concepts), [c.residual for c in report.concepts]
    assert report.drift < report.sum_drift


def test_sdxl_trains_both_token_embeddings_and_merges(tiny_pipeline_path, images, fast, tmp_path):
    base_path = tiny_pipeline_path("sdxl")
    result = train(base_path, images["cat"], "cat", tmp_path / "cat", **{**fast, "steps": 3})
    base = open_base(base_path)
    embeddings = result.delta.tokens["<new1>"]
    assert [e.shape[0] for e in embeddings] == [64, 96]
    pipe = load_pipeline(base_path)
    for index, embedding in enumerate(embeddings):
        assert not torch.equal(embedding, embedding_row(pipe, "ktn", index))
    assert len(result.delta.layers) == 17 and result.delta.context_dim == 160
    other = random_concept_delta(base, "<new2>", "dog", seed=3)
    _, report = mergekit_cd.merge([result.output, other], base=base, return_report=True)
    assert all(concept.residual < 1e-4 for concept in report.concepts)


# ----------------------------------------------------------------------------- resume, joint, precision


def test_resume_after_ctrl_c_reproduces_the_uninterrupted_run(tiny_pipeline_path, images, fast, tmp_path):
    """Interrupted at step 2 of a 3-step run, then resumed with --steps raised to 5: the same
    losses and delta as 5 steps in one go."""
    base = tiny_pipeline_path("sd1")
    options = {**fast, "steps": 5, "seed": 7, "learning_rate": 1e-4}
    whole = train(base, images["cat"], "cat", tmp_path / "whole", **options)

    def press_ctrl_c(step, loss):
        if step == 2:
            signal.raise_signal(signal.SIGINT)  # the first Ctrl-C: finish the step, save, stop

    with pytest.raises(TrainingInterrupted, match="interrupted after step 2") as interrupted:
        train(base, images["cat"], "cat", tmp_path / "parts", on_step=press_ctrl_c, **{**options, "steps": 3})
    assert interrupted.value.checkpoint == tmp_path / "parts" / "checkpoints" / "step-000002"
    assert not (tmp_path / "parts" / "delta.safetensors").exists()
    resumed = train(base, images["cat"], "cat", tmp_path / "parts", resume=tmp_path / "parts", **options)
    assert resumed.resumed_from == interrupted.value.checkpoint and resumed.steps_this_session == 3
    assert resumed.losses == pytest.approx(whole.losses, rel=0, abs=1e-6)
    assert resumed.delta.allclose(whole.delta, rtol=0, atol=1e-7)


def test_resume_refuses_a_checkpoint_of_other_options(tiny_pipeline_path, images, fast, tmp_path, capsys):
    """The optimizer state restores the checkpoint's learning rate, so resuming with another --lr
    would train with the old one while the metadata records the new; another token would train
    a row the checkpoint never saw. Such a resume is one error naming every option that differs."""
    base = tiny_pipeline_path("sd1")
    with pytest.raises(TrainingInterrupted):
        train(base, images["cat"], "cat", tmp_path / "run", on_step=lambda step, loss: True, **fast)
    message = cli_error(capsys, ["--base", str(base), "--instance-dir", str(images["cat"]), "--class-word", "cat",
                                 "-o", str(tmp_path / "run"), "--lr", "2e-5", "--token", "<cat>", "--resume",
                                 "latest", *cli_options(fast)])
    assert "belongs to a run with other options" in message
    assert "--lr 2e-05 (the checkpoint's: 1e-05)" in message
    assert "--token '<cat>' (the checkpoint's: '<new1>')" in message
    assert "--batch-size" not in message and "--seed" not in message  # only what differs


def test_joint_training_from_a_concepts_file_trains_every_token(tiny_pipeline_path, images, fast, tmp_path):
    """Through the command line: two concepts, one with real class images and sidecar captions."""
    base = tiny_pipeline_path("sd1")
    reg = draw_images(tmp_path / "reg-pot", (128, 128, 128), "square", (10, 10, 10), count=2)
    (reg / "0.txt").write_text("a photo of a clay pot on a table")
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps([
        {"instance_dir": str(images["cat"]), "class_word": "cat"},
        {"instance_data_dir": str(images["pot"]), "class_word": "pot", "class_data_dir": "reg-pot"}]))
    out = tmp_path / "joint"
    assert cd_train.main(["--base", str(base), "--concepts", str(concepts), "-o", str(out), "--steps", "3",
                          "--batch-size", "2", "--num-class-images", "2", "--class-sampling-steps", "1",
                          "--class-cache-dir", str(fast["class_cache_dir"]), "--device", "cpu", "--hflip",
                          "--no-aug", "-q"]) == 0
    delta = load(out)
    assert list(delta.tokens) == ["<new1>", "<new2>"]
    pipe = load_pipeline(base)
    for token, init in (("<new1>", "ktn"), ("<new2>", "pll")):
        assert not torch.equal(delta.tokens[token][0], embedding_row(pipe, init))
    recipe = delta.metadata["recipe"]
    assert recipe["concepts"][1]["class_images"] == str(reg) and recipe["num_class_images"] == [2, 2]
    assert recipe["hflip"] is True and recipe["augment"] is False and recipe["steps"] == 3


def test_bf16_mixed_precision_keeps_trainable_weights_in_float32(tiny_pipeline_path, images, fast, tmp_path):
    result = train(tiny_pipeline_path("sd1"), images["cat"], "cat", tmp_path / "bf16", mixed_precision="bf16",
                   gradient_checkpointing=True, return_pipeline=True, **{**fast, "steps": 2})
    assert all(np.isfinite(result.losses)) and result.delta.metadata["recipe"]["mixed_precision"] == "bf16"
    unet = result.pipeline.unet
    assert unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2.to_k").weight.dtype == torch.float32
    assert unet.conv_in.weight.dtype == torch.bfloat16


def test_caching_class_latents_shows_a_progress_bar(tiny_pipeline_path, images, fast, tmp_path, capsys):
    config = TrainingConfig(base=str(tiny_pipeline_path("sd1")), concepts=(ConceptSpec(images["cat"], "cat"),),
                            output=tmp_path / "out", **{**fast, "progress": True})
    capsys.readouterr()
    train_setup.setup(check_config(config))
    assert re.search(r"class latents: 100%.*\| 1/1 ", capsys.readouterr().err)  # 2 images, batch 2


def test_caching_gives_the_same_steps_as_the_plain_way(tiny_pipeline_path, images, fast, tmp_path):
    """Class latents and class-prompt features computed once give the losses that encoding
    them every step gives (the benchmark's baseline). On SD2 with v-prediction, as SD2-768 is."""
    base = tmp_path / "sd2-v"
    shutil.copytree(tiny_pipeline_path("sd2"), base)
    scheduler = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps({**scheduler, "prediction_type": "v_prediction"}))
    cached = train(base, images["cat"], "cat", tmp_path / "cached", **{**fast, "steps": 3})
    plain = train(base, images["cat"], "cat", tmp_path / "plain", cache=False, **{**fast, "steps": 3})
    assert plain.losses == pytest.approx(cached.losses, rel=1e-5)
    recipe = cached.delta.metadata["recipe"]
    assert recipe["prediction_type"] == "v_prediction" and cached.delta.architecture == "sd2"


# ----------------------------------------------------------------------------- bad inputs


def no_base_model(monkeypatch) -> None:
    """Make opening the base model an error: what is refused before it is refused before any work."""
    def refuse(*args, **kwargs):
        raise AssertionError("the base model was opened")

    monkeypatch.setattr(train_setup, "open_base", refuse)


def test_a_token_that_cannot_be_a_file_name_is_refused_before_any_work(
        tiny_pipeline_path, images, fast, tmp_path, capsys, monkeypatch):
    """The token names a file in OUT/diffusers/; one that cannot was found only after training,
    leaving OUT with delta.safetensors alone, which a re-run took for a finished run."""
    no_base_model(monkeypatch)
    out = tmp_path / "slash"
    message = cli_error(capsys, ["--base", str(tiny_pipeline_path("sd1")), "--instance-dir", str(images["cat"]),
                                 "--class-word", "cat", "-o", str(out), "--token", "<a/b>", *cli_options(fast)])
    assert "token '<a/b>' cannot name a file" in message.lower()
    assert not out.exists()


def test_force_keeps_a_diffusers_folder_holding_other_things_and_says_so_before_any_work(
        tiny_pipeline_path, images, fast, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    (out / "diffusers").mkdir(parents=True)
    (out / "delta.safetensors").write_bytes(b"an earlier run")
    (out / "diffusers" / "pytorch_custom_diffusion_weights.safetensors").write_bytes(b"its weights")
    (out / "diffusers" / "notes.txt").write_text("mine")
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    no_base_model(monkeypatch)
    message = cli_error(capsys, ["--base", str(tiny_pipeline_path("sd1")), "--instance-dir", str(images["pot"]),
                                 "--class-word", "pot", "-o", str(out), "--force", *cli_options(fast)])
    assert re.fullmatch(r"\S+diffusers holds other things than a Custom Diffusion output \(e\.g\. notes\.txt\); "
                        r"refusing to replace it, even with --force\..*", message), message
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


def test_a_failed_write_leaves_the_earlier_run_as_it_was_and_the_native_file_comes_last(
        tiny_pipeline_path, images, fast, tmp_path, monkeypatch):
    """delta.safetensors marks a finished run. A --force run over an earlier one that fails while
    writing (here: the diffusers layout, then the native file) leaves the earlier run's files as
    they were, never a new native file beside the old layout; a write that succeeds puts the
    native file in place last."""
    from mergekit_cd.train import output

    out = tmp_path / "out"
    (out / "diffusers").mkdir(parents=True)
    (out / "delta.safetensors").write_bytes(b"an earlier run")
    (out / "diffusers" / "pytorch_custom_diffusion_weights.safetensors").write_bytes(b"its weights")
    earlier = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    config = TrainingConfig(base=str(tiny_pipeline_path("sd1")), concepts=(ConceptSpec(images["cat"], "cat"),),
                            output=out, force=True, **{**fast, "steps": 1})
    state = train_setup.setup(check_config(config))  # no step is needed: the write of the untrained delta is tested
    delta = output.build_delta(state, Progress())
    real_save, real_rename = output.save, os.rename
    for failing in ("diffusers", "native"):
        def save(delta, path, *, format, failing=failing, **options):
            if format == failing:
                raise MergeError("the disk is full")
            return real_save(delta, path, format=format, **options)

        monkeypatch.setattr(output, "save", save)
        with pytest.raises(MergeError, match="the disk is full"):
            output.write(out, delta, base=state.base, trainables=state.weights.named)
        assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == earlier, failing
    monkeypatch.setattr(output, "save", real_save)
    placed = []

    def rename(source, target):  # os.rename: every output put in place, the native file among them
        if Path(target) == out / "delta.safetensors":
            placed.append(sorted(p.name for p in (out / "diffusers").iterdir()))
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    native, folder = output.write(out, delta, base=state.base, trainables=state.weights.named)
    assert placed == [["<new1>.safetensors", "pytorch_custom_diffusion_weights.safetensors"]]  # layout first
    assert sorted(p.name for p in out.iterdir()) == ["delta.safetensors", "diffusers"]
    assert load(native).allclose(load(folder, base=config.base), rtol=0, atol=1e-6)


def test_instance_folder_errors(tiny_pipeline_path, fast, tmp_path):
    base = tiny_pipeline_path("sd1")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MergeError, match=r"Instance image folder .*empty holds no images \(\.png"):
        train(base, empty, "cat", tmp_path / "out", **fast)
    with pytest.raises(MergeError, match=r"Instance image folder .*missing does not exist"):
        train(base, tmp_path / "missing", "cat", tmp_path / "out", **fast)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not an image")
    with pytest.raises(MergeError, match=r"Cannot read image .*a\.png: .*Remove it or replace it"):
        train(base, broken, "cat", tmp_path / "out", **fast)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def broken_reg_dir(tmp_path: Path) -> dict:
    (tmp_path / "reg").mkdir()
    (tmp_path / "reg" / "a.png").write_bytes(b"not an image")
    return {"reg_dir": tmp_path / "reg"}


@pytest.mark.parametrize("make_options, message", [
    (lambda tmp: {"reg_dir": tmp}, r"Class image folder \S+ holds no images"),
    (broken_reg_dir, r"Cannot read image \S+a\.png: .*Remove it or replace it"),
    (lambda tmp: {"num_class_images": 0}, r"Concept <new1> has no --reg-dir and --num-class-images is 0"),
], ids=["empty", "not an image", "none to generate"])
def test_class_image_errors_come_before_the_model_loads_and_leave_no_output(
        tiny_pipeline_path, images, fast, tmp_path, monkeypatch, make_options, message):
    """They came after the model loaded and after OUT was created, leaving an empty OUT."""
    no_base_model(monkeypatch)
    (tmp_path / "in").mkdir()
    options = {**fast, **make_options(tmp_path / "in")}
    with pytest.raises(MergeError, match=message):
        train(tiny_pipeline_path("sd1"), images["cat"], "cat", tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, message", [
    ({"token": "cat"}, r"Token cat is already in the base model's vocabulary; .* choose another --token"),
    ({"init_token": "zqxj"}, r"initializer token 'zqxj' is not a single token .* \(it splits into \d+ pieces"),
    ({"resolution": 18}, r"--resolution 18 does not fit .* must be a multiple of 4 .* e\.g\. 16 or 20"),
    ({"train": "q,v"}, r"k and v always train"),
    ({"mixed_precision": "fp16"}, r"fp16 needs a GPU; on the CPU use bf16 or no"),
    ({"batch_size": 0}, r"--batch-size must be a positive whole number"),
])
def test_option_errors_name_the_fix(tiny_pipeline_path, images, fast, tmp_path, options, message):
    with pytest.raises(MergeError, match=message):
        train(tiny_pipeline_path("sd1"), images["cat"], "cat", tmp_path / "out", **{**fast, **options})


def test_out_of_memory_suggests_what_to_change(tiny_pipeline_path, images, fast, tmp_path, monkeypatch):
    def no_memory(state, step):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_loop, "loss", no_memory)
    with pytest.raises(MergeError) as error:
        train(tiny_pipeline_path("sd1"), images["cat"], "cat", tmp_path / "out", **fast)
    message = str(error.value)
    assert message.startswith("Out of memory at step 1 (batch size 2, resolution 16).")
    for hint in ("--batch-size", "--gradient-checkpointing", "--mixed-precision fp16", "--resolution"):
        assert hint in message


def concepts_file(tmp_path: Path, entries) -> list[str]:
    path = tmp_path / "concepts.json"
    path.write_text(json.dumps(entries))
    return ["--concepts", str(path)]


def huge_image(tmp_path: Path, monkeypatch) -> list[str]:
    """A folder whose image is past PIL's decompression-bomb limit (lowered for the test)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 24 x 24 is over twice that: an error, not a warning
    draw_images(tmp_path / "huge", (0, 0, 0), "disc", (255, 255, 255), count=1)
    return ["--instance-dir", str(tmp_path / "huge"), "--class-word", "cat"]


NO_GPU = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
CAT = ["--instance-dir", "{cat}", "--class-word", "cat"]


@pytest.mark.parametrize("make_arguments, message", [
    (lambda tmp, mp: ["--instance-dir", str(tmp / "none"), "--class-word", "cat"],
     r"Instance image folder \S+ does not exist\."),
    (huge_image, r"Cannot read image \S+0\.jpg: Image size \(576 pixels\) exceeds limit .* Shrink it or remove it"),
    (lambda tmp, mp: CAT + ["--lr", "nan"], r"--lr must be a finite number, positive; got nan\."),
    (lambda tmp, mp: CAT + ["--lr", "inf"], r"--lr must be a finite number, positive; got inf\."),
    (lambda tmp, mp: CAT + ["--lr=-1e-5"], r"--lr must be a finite number, positive; got -1e-05\."),
    (lambda tmp, mp: CAT + ["--prior-loss-weight=-1"], r"--prior-loss-weight must be a finite number, zero "
                                                           r"or more; got -1\.0\."),
    (lambda tmp, mp: CAT + ["--prior-loss-weight", "nan"], r"--prior-loss-weight must be a finite number"),
    (lambda tmp, mp: CAT + ["--snr-gamma", "0"], r"--snr-gamma must be a finite number, positive; got 0\.0\."),
    (lambda tmp, mp: concepts_file(tmp, {"instance_dir": "cat", "class_word": "cat"}),
     r"\S+concepts\.json must hold a non-empty JSON list of concept objects"),
    (lambda tmp, mp: concepts_file(tmp, ["cat"]), r"\S+concepts\.json must be a non-empty list of concepts"),
    (lambda tmp, mp: concepts_file(tmp, [{"instance_dir": "cat", "class_word": "cat", "colour": "red"}]),
     r"\S+concepts\.json: concept 1 has unknown field 'colour'; known fields: class_prompt, class_word, "),
    (lambda tmp, mp: concepts_file(tmp, [{"instance_dir": "cat", "class_word": ["cat"]}]),
     r"\S+concepts\.json: concept 1: class_word must be a string, got \['cat'\]\."),
    (lambda tmp, mp: concepts_file(tmp, [{"instance_dir": 3, "class_word": "cat"}]),
     r"\S+concepts\.json: concept 1: instance_dir must be a folder path, got 3\."),
    (lambda tmp, mp: concepts_file(tmp, [{"class_word": "cat"}]), r"\S+concepts\.json: concept 1 lacks 'instance_dir'"),
    (lambda tmp, mp: concepts_file(tmp, [{"instance_dir": "cat", "class_word": "cat"}]) + ["--token", "<cat>",
                                                                                             "--reg-dir", "reg"],
     r"--token, --reg-dir: with --concepts every concept's settings go in its entry of the concepts JSON "
     r"\(fields token, reg_dir\), not on the command line"),
    (lambda tmp, mp: CAT + ["--seed", str(2**64 - 1), "--validation-prompt", "a <new1> cat"],
     r"--seed must be a whole number from 0 to 18446744073709551614 \(image j is sampled with seed \+ j"),
    (lambda tmp, mp: CAT + ["--device", NO_GPU], rf"--device {NO_GPU}: (no CUDA device is available|there is "
                                                  rf"no such GPU).*; this machine has cpu"),
    (lambda tmp, mp: CAT + ["--device", "meta"], r"--device meta: this command runs on cpu or cuda\[:N\], not meta"),
], ids=["missing folder", "decompression bomb", "lr nan", "lr inf", "lr negative", "prior weight negative",
        "prior weight nan", "snr gamma zero", "concepts not a list", "concept not an object", "concept unknown field",
        "concept wrong type", "concept folder wrong type", "concept missing field", "concepts and --token",
        "seed too large to validate", "cuda missing", "device meta"])
def test_command_line_errors_are_one_line(tiny_pipeline_path, images, fast, tmp_path, capsys, monkeypatch,
                                          make_arguments, message):
    arguments = [a.format(cat=images["cat"]) for a in make_arguments(tmp_path, monkeypatch)]
    text = cli_error(capsys, ["--base", str(tiny_pipeline_path("sd1")), "-o", str(tmp_path / "out"),
                              *cli_options(fast), *arguments])  # the case's --device wins over fast's
    assert re.fullmatch(message + ".*", text), text
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize(("value", "message"), [(str(2**70), f"{2**70} is out of range"),
                                               ("-1", "-1 is out of range"), ("1.5", "'1.5' is not a whole number")])
def test_a_seed_torch_cannot_take_is_an_argparse_error(capsys, value, message):
    """It trained with 2**70 and ended in a numpy traceback with -1."""
    with pytest.raises(SystemExit) as exit_info:
        cd_train.main(["--base", "base", "--instance-dir", "cat", "--class-word", "cat", "-o", "out", f"--seed={value}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"cd-train: error: argument --seed: {message}")


@pytest.mark.parametrize("option", ["token", "init_token", "instance_prompt", "reg_dir", "class_prompt",
                                    "instance_dir", "class_word"])
def test_one_concept_arguments_are_refused_with_a_concepts_list(images, tmp_path, option):
    """They were silently ignored: --concepts --token <cat> trained <new1>."""
    with pytest.raises(MergeError, match=rf"^--{option.replace('_', '-')}: with --concepts every concept's "
                                         rf"settings go in its entry of the concepts JSON \(fields {option}\)"):
        train("unused-base", output=tmp_path / "out", concepts=[{"instance_dir": images["cat"], "class_word": "cat"}],
              **{option: "x"})


def test_transparent_images_are_composited_on_white(tmp_path):
    """RGBA, LA and palette images with transparency: transparent pixels become white, not the
    colour hidden under them (black, for most files)."""
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.putpixel((0, 0), 1)
    palette.info["transparency"] = 0
    for name, image in (("rgba.png", rgba), ("la.png", rgba.convert("LA")), ("p.png", palette)):
        image.save(tmp_path / name)
        loaded = train_data.load_image(tmp_path / name)
        assert loaded.mode == "RGB" and loaded.getpixel((3, 3)) == (255, 255, 255), name
        assert loaded.getpixel((0, 0)) != (255, 255, 255), name


def test_python_dash_m_shows_the_help_with_examples(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["mergekit_cd.train", "--help"])
    with pytest.raises(SystemExit) as exit_status:
        runpy.run_module("mergekit_cd.train", run_name="__main__", alter_sys=False)
    assert exit_status.value.code == 0
    text = capsys.readouterr().out
    assert "accelerate launch -m mergekit_cd.train" in text and "--reg-dir" in text and "examples:" in text


# ----------------------------------------------------------------------------- the pieces


@pytest.mark.parametrize("size, factor, draws", [(16, 2, 300), (32, 8, 300), (64, 8, 300), (512, 8, 60)])
def test_loss_mask_is_never_empty_and_matches_the_prompt_prefix(size, factor, draws):
    image = Image.new("RGB", (size, size), (200, 10, 10))
    seen = set()
    for draw in range(draws):
        example = train_data.augment(image, "photo of a <new1> cat", size, factor, np.random.default_rng(draw))
        mask = example.mask[0]
        assert mask.shape == (size // factor, size // factor) and mask.sum() > 0
        assert example.pixels.shape == (3, size, size)
        prefix = example.prompt[: -len("photo of a <new1> cat")]
        seen.add(prefix)
        if prefix in train_data.LARGE_PREFIXES:
            assert bool(mask.all())
        else:
            assert prefix in ("", *train_data.SMALL_PREFIXES)
    assert seen == {"", *train_data.SMALL_PREFIXES, *train_data.LARGE_PREFIXES}


def test_loss_mask_drops_one_latent_pixel_around_the_pasted_image():
    assert train_data._box(16, 160, 8, 64) == slice(3, 21)  # pixels 16..176 -> latents 2..22, less borders
    assert train_data._box(5, 5, 8, 2) == slice(0, 2)  # nothing inside after the border: what it touches


def test_without_augmentation_the_whole_image_counts():
    example = train_data.augment(Image.new("RGB", (16, 16)), "p", 16, 2, np.random.default_rng(0), enabled=False)
    assert bool(example.mask.all()) and example.prompt == "p"


def test_start_token_key_and_value_are_detached_without_changing_the_output():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attention = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4)
    hidden = torch.randn(2, 5, 8)
    context = torch.randn(2, 7, 6, requires_grad=True)
    attention.set_processor(AttnProcessor2_0())
    expected = attention(hidden, encoder_hidden_states=context)
    attention.set_processor(DetachStartTokenAttnProcessor())
    output = attention(hidden, encoder_hidden_states=context)
    assert torch.allclose(output, expected, atol=1e-6)
    output.square().sum().backward()
    assert torch.count_nonzero(context.grad[:, 0]) == 0 and torch.count_nonzero(context.grad[:, 1:]) > 0


def test_only_the_new_rows_of_the_embedding_get_gradients():
    table = torch.nn.Embedding(11, 4)  # row 10 added for a new token, as tokens.install does
    before = table.weight.detach().clone()
    layer = NewTokenEmbedding(table, [10, 3], torch.ones(2, 4))
    ids = torch.tensor([[0, 10, 3, 9]])
    out = layer(ids)
    assert torch.equal(out[0, 0], before[0]) and torch.equal(out[0, 1], torch.ones(4))
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    out.sum().backward()
    optimizer.step()
    assert [name for name, p in layer.named_parameters() if p.requires_grad] == ["rows"]
    assert torch.equal(table.weight, before)
    full = layer.full_table().weight
    assert full.shape == (11, 4) and torch.equal(full[[0, 1, 2, 4, 9]], before[[0, 1, 2, 4, 9]])
    assert torch.equal(full[[10, 3]], layer.rows.detach())


def test_class_captions_from_the_authors_retrieval_layout(tmp_path):
    from mergekit_cd.train.priors import read_reg_dir

    draw_images(tmp_path / "images", (0, 0, 0), "disc", (255, 255, 255), count=3)
    (tmp_path / "images.txt").write_text("\n".join(str(tmp_path / "images" / n) for n in ("0.jpg", "1.png", "2.jpg")))
    (tmp_path / "caption.txt").write_text("a black cat\na cat on a sofa\na sleeping cat\n")
    found = read_reg_dir(tmp_path, "photo of a cat", limit=2)
    assert [p.name for p in found.paths] == ["0.jpg", "1.png"] and found.captions == ["a black cat", "a cat on a sofa"]


def test_config_defaults_are_the_papers():
    config = check_config(TrainingConfig(base="b", concepts=(ConceptSpec(Path("x"), "cat"),), output=Path("o")))
    assert (config.total_steps, config.batch_size, config.learning_rate, config.scale_lr) == (250, 8, 1e-5, True)
    assert (config.weight_decay, config.max_grad_norm, config.num_class_images, config.train) == \
        (1e-2, 1.0, 200, ("k", "v"))
    joint = replace(config, concepts=(ConceptSpec(Path("x"), "cat"), ConceptSpec(Path("y"), "pot", "<new2>")))
    assert joint.total_steps == 500 and joint.init_token(1) == "pll"
    assert config.snr_gamma is None and config.recipe()["snr_gamma"] is None


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_are_diffusers_formula(prediction_type):
    """--snr-gamma weighs a timestep by min(SNR, gamma) / SNR (/ (SNR + 1) for v-prediction), as
    diffusers' training scripts do; without it every timestep weighs 1."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type)
    timesteps = torch.tensor([0, 10, 100, 500, 999])
    alpha_bar = scheduler.alphas_cumprod[timesteps].double()
    snr = alpha_bar / (1 - alpha_bar)
    expected = torch.clamp(snr, max=5.0) / (snr + 1 if prediction_type == "v_prediction" else snr)
    got = train_step.timestep_weights(scheduler, timesteps, 5.0)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)
    if prediction_type == "epsilon":  # the nearly clean timestep weighs least, the noisiest (SNR < 5) fully
        assert got[0] < 0.01 and got[-1] == 1
    assert torch.equal(train_step.timestep_weights(scheduler, timesteps, None), torch.ones(5))


@pytest.mark.slow
def test_min_snr_run_trains_and_records_its_gamma(tiny_pipeline_path, images, fast, tmp_path):
    result = train(str(tiny_pipeline_path("sd1")), images["cat"], "cat", tmp_path / "cat", **fast, snr_gamma=5.0)
    assert len(result.losses) == fast["steps"] and all(np.isfinite(result.losses))
    assert load(tmp_path / "cat" / "delta.safetensors").metadata["recipe"]["snr_gamma"] == 5.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_runs_on_cuda(tiny_pipeline_path, images, fast, tmp_path):
    result = train(tiny_pipeline_path("sd1"), images["cat"], "cat", tmp_path / "cuda",
                   **{**fast, "device": "cuda", "steps": 3})
    assert (tmp_path / "cuda" / "delta.safetensors").is_file()
    assert all(math.isfinite(loss) for loss in result.losses)
