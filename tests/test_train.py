"""cd-train on the tiny SD1 and SDXL models: the recipe, its outputs, resume, merging, bad inputs.

Every run is a few steps at 16 x 16 pixels on synthetic instance images (a yellow disc on blue
for the cat, a red square on white for the pot) with two generated class images, shared
through one class-image cache. Torch runs single-threaded here: on a busy 2-core machine the
tiny models' many small kernels are several times faster that way.
"""

from __future__ import annotations

import json
import math
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
from mergekit_cd.features import target_prompts
from mergekit_cd.sampling import load_pipeline
from mergekit_cd.testing import random_concept_delta
from mergekit_cd.train import TrainingInterrupted, train
from mergekit_cd.train import data as train_data
from mergekit_cd.train import loop as train_loop
from mergekit_cd.train.attention import DetachStartTokenAttnProcessor
from mergekit_cd.train.config import ConceptSpec, TrainingConfig, check_config
from mergekit_cd.train.embeddings import NewTokenEmbedding

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Gram matrices (cd-merge) and class images away from the user's cache."""
    monkeypatch.setenv("MERGEKIT_CD_CACHE", str(tmp_path_factory.getbasetemp() / "train-cache"))


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


# ----------------------------------------------------------------------------- one run, many checks


@pytest.fixture(scope="module")
def trained(tiny_pipeline_path, images, fast, tmp_path_factory):
    """A 16-step SD1 run driven through its Session, with the instance loss on fixed evaluation
    draws (steps 1000-1015: the same images, augmentation, noise and timesteps) before and after.
    The learning rate is high (2e-3 x batch 2) so that 16 steps visibly fit the instance images."""
    base = tiny_pipeline_path("sd1")
    output = tmp_path_factory.mktemp("run") / "cat"
    config = TrainingConfig(base=str(base), concepts=(ConceptSpec(images["cat"], "cat"),), output=output,
                            **{**fast, "steps": 16}, learning_rate=2e-3, checkpoint_every=5,
                            validation_prompts=("<new1> cat",), validation_every=8,
                            num_validation_images=1, validation_sampling_steps=1)
    session = train_loop.Session(check_config(config), None)
    session.setup()

    def evaluation_loss() -> float:
        with torch.no_grad():
            return sum(float(session.loss_terms(step)[0]) for step in range(1000, 1016)) / 16

    before = evaluation_loss()
    processors = {name: type(p).__name__ for name, p in session.pipe.unet.attn_processors.items()}
    result = session.train(return_pipeline=True)
    return {"base": base, "output": output, "result": result, "session": session, "processors": processors,
            "before": before, "after": evaluation_loss()}


def test_training_lowers_the_loss_on_the_instance_images(trained):
    assert trained["after"] < 0.99 * trained["before"], (trained["before"], trained["after"])
    assert len(trained["result"].losses) == 16 and all(np.isfinite(trained["result"].losses))


def test_cross_attention_detaches_the_start_token_while_training_only(trained):
    during = trained["processors"]
    assert {during[n] for n in during if ".attn2." in n} == {"DetachStartTokenAttnProcessor"}
    assert "DetachStartTokenAttnProcessor" not in {during[n] for n in during if ".attn1." in n}
    after = {type(p).__name__ for p in trained["result"].pipeline.unet.attn_processors.values()}
    assert "DetachStartTokenAttnProcessor" not in after


def test_frozen_weights_and_old_embedding_rows_stay_bit_identical(trained):
    trained_pipe = trained["result"].pipeline
    base_pipe = load_pipeline(trained["base"])
    trainable = {name for name, _ in trained["session"].trainables}
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


def test_only_prompts_with_the_token_get_new_text_features(trained):
    """The text encoder is frozen and only the new row trains, so a prompt without the token has
    exactly the base's text features, and one with it has features the trained row decides.
    (The K/V delta moves the keys/values of every prompt a little; bounding that on ordinary
    captions is what cd-merge's constrained solve does, see the merge tests below.)"""
    trained_pipe, base_pipe = trained["result"].pipeline, load_pipeline(trained["base"])

    def features(pipe, prompt):
        ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids)[0]

    for prompt in ("photo of a cat", "a red car in the snow"):
        assert torch.equal(features(trained_pipe, prompt), features(base_pipe, prompt))
    mergekit_cd.apply(base_pipe, trained["result"].delta)  # the delta as written reproduces the trained model
    assert torch.equal(features(base_pipe, "photo of a <new1> cat"), features(trained_pipe, "photo of a <new1> cat"))
    mergekit_cd.remove(base_pipe)
    initial = trained["result"].delta * 0.0  # the token at its initial embedding, no K/V change
    initial.tokens = {"<new1>": (embedding_row(base_pipe, "ktn"),)}
    mergekit_cd.apply(base_pipe, initial)
    assert not torch.allclose(features(base_pipe, "photo of a <new1> cat"),
                              features(trained_pipe, "photo of a <new1> cat"))


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
    assert cd_merge.main([str(cat), str(pot), "-o", str(merged), "--base", str(base), "-q"]) == 0
    assert "renamed to <new2>" in capsys.readouterr().out  # both were <new1>
    result = load(merged)
    assert sorted(result.tokens) == ["<new1>", "<new2>"]
    assert {c.class_word for c in result.concepts} == {"cat", "pot"}
    _, report = mergekit_cd.merge([cat, pot], base=base, return_report=True)
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
    base = tiny_pipeline_path("sd1")
    options = {**fast, "steps": 5, "seed": 7, "learning_rate": 1e-4}
    whole = train(base, images["cat"], "cat", tmp_path / "whole", **options)

    def press_ctrl_c(step, loss):
        if step == 2:
            signal.raise_signal(signal.SIGINT)  # the first Ctrl-C: finish the step, save, stop

    with pytest.raises(TrainingInterrupted, match="interrupted after step 2") as interrupted:
        train(base, images["cat"], "cat", tmp_path / "parts", on_step=press_ctrl_c, **options)
    assert interrupted.value.checkpoint == tmp_path / "parts" / "checkpoints" / "step-000002"
    assert not (tmp_path / "parts" / "delta.safetensors").exists()
    resumed = train(base, images["cat"], "cat", tmp_path / "parts", resume=tmp_path / "parts", **options)
    assert resumed.resumed_from == interrupted.value.checkpoint and resumed.steps_this_session == 3
    assert resumed.losses == pytest.approx(whole.losses, rel=0, abs=1e-6)
    assert resumed.delta.allclose(whole.delta, rtol=0, atol=1e-7)


def test_resume_refuses_a_checkpoint_of_other_tokens(tiny_pipeline_path, images, fast, tmp_path):
    base = tiny_pipeline_path("sd1")
    with pytest.raises(TrainingInterrupted):
        train(base, images["cat"], "cat", tmp_path / "run", on_step=lambda step, loss: True, **fast)
    with pytest.raises(MergeError, match="trained tokens"):
        train(base, images["cat"], "cat", tmp_path / "run", token="<cat>", resume="latest", **fast)


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
    def no_memory(self, step):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_loop.Session, "loss", no_memory)
    with pytest.raises(MergeError) as error:
        train(tiny_pipeline_path("sd1"), images["cat"], "cat", tmp_path / "out", **fast)
    message = str(error.value)
    assert message.startswith("Out of memory at step 1 (batch size 2, resolution 16).")
    for hint in ("--batch-size", "--gradient-checkpointing", "--mixed-precision fp16", "--resolution"):
        assert hint in message


def test_command_line_errors_are_one_line(tiny_pipeline_path, tmp_path, capsys):
    status = cd_train.main(["--base", str(tiny_pipeline_path("sd1")), "--instance-dir", str(tmp_path / "none"),
                            "--class-word", "cat", "-o", str(tmp_path / "out"), "-q"])
    captured = capsys.readouterr()
    assert status == 1 and captured.out == ""
    assert re.fullmatch(r"cd-train: error: Instance image folder \S+ does not exist\.\n", captured.err)


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
    table = torch.nn.Embedding(10, 4)
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_runs_on_cuda(tiny_pipeline_path, images, fast, tmp_path):
    result = train(tiny_pipeline_path("sd1"), images["cat"], "cat", tmp_path / "cuda",
                   **{**fast, "device": "cuda", "steps": 3})
    assert (tmp_path / "cuda" / "delta.safetensors").is_file()
    assert all(math.isfinite(loss) for loss in result.losses)
