"""The toy world's generator, tokenizer, shipped files and built-in names, and a few steps of its base trainer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mergekit_cd import toyworld
from mergekit_cd.builtin import builtin_folder
from mergekit_cd.errors import MergeError
from mergekit_cd.toyworld.concepts import CONCEPTS, INSTANCE_COUNT, instance_images
from mergekit_cd.toyworld.scenes import (BACKGROUNDS, CLASSES, COLOURS, IMAGE_SIZE, PATTERNS, render_scene,
                                        sample_scene, scene_captions, world_captions)
from mergekit_cd.toyworld.train_base import build_tokenizer, world_words


def test_scenes_are_deterministic_and_labelled():
    """The same (seed, index) gives the same labels and pixels; objects have distinct classes
    and do not overlap; every label names a known class, colour, pattern and background."""
    for index in range(200):
        scene = sample_scene(0, index)
        assert scene == sample_scene(0, index)
        assert 1 <= len(scene.objects) <= 3
        assert scene.background in BACKGROUNDS
        classes = [obj.cls for obj in scene.objects]
        assert len(set(classes)) == len(classes)
        for obj in scene.objects:
            assert obj.cls in CLASSES and obj.colour in COLOURS and obj.pattern in PATTERNS
        for a in scene.objects:
            for b in scene.objects:
                if a is not b:
                    assert np.hypot(a.x - b.x, a.y - b.y) * IMAGE_SIZE > a.radius + b.radius
    image = np.asarray(render_scene(sample_scene(0, 3), seed=3))
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.array_equal(image, np.asarray(render_scene(sample_scene(0, 3), seed=3)))
    assert sample_scene(0, 3) != sample_scene(1, 3)


def test_captions_name_what_the_scene_holds():
    """Every caption names every object's class, and any colour or background it names is the
    scene's; the paper's prompt shapes occur."""
    captions = []
    for index in range(300):
        scene = sample_scene(0, index)
        for caption in scene_captions(scene, 0, index):
            captions.append(caption)
            words = caption.replace(",", " ").split()
            for obj in scene.objects:
                assert obj.cls in words
            named_colours = {w for w in words if w in COLOURS}
            assert named_colours <= {obj.colour for obj in scene.objects}
            for name, phrase in BACKGROUNDS.items():
                if phrase in caption:
                    assert scene.background == name
    text = "\n".join(captions)
    for shape in ("photo of a ", " on the beach", " next to a", " at night"):
        assert shape in text


def test_tokenizer_has_one_token_per_world_word():
    """A genuine BPE vocabulary: every world word and cd-train's initializer tokens are single
    tokens, and any other text still tokenizes (byte fallback)."""
    tokenizer = build_tokenizer()
    for word in [*world_words(), "ktn", "pll", "ucd", "sks"]:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    assert len(tokenizer("zebra", add_special_tokens=False).input_ids) > 1
    assert tokenizer.model_max_length == 77


def test_concept_instance_sets_vary_and_are_shipped():
    """Six concepts of known classes, each with 5 to 10 instance images that differ, shipped as PNGs
    equal to what the code draws."""
    assert len(CONCEPTS) >= 6
    for item in CONCEPTS:
        assert item.class_word in CLASSES
        images = [np.asarray(image) for image in instance_images(item)]
        assert 5 <= len(images) <= 10
        assert len({image.tobytes() for image in images}) == len(images)
        shipped = sorted(toyworld.concept_images_path(item.name).glob("*.png"))
        assert len(shipped) == INSTANCE_COUNT
        from PIL import Image

        assert np.array_equal(np.asarray(Image.open(shipped[0]).convert("RGB")), images[0])


def test_shipped_captions_are_world_captions():
    """The shipped regularisation and held-out caption files are the generator's, disjoint streams."""
    reg = toyworld.reg_captions_path().read_text().splitlines()
    held = toyworld.heldout_captions_path().read_text().splitlines()
    assert reg == world_captions(1000, 4)
    assert held == world_captions(300, 5)


def test_builtin_names_resolve_to_the_shipped_folders():
    assert builtin_folder("builtin:toyworld") == toyworld.base_path()
    assert builtin_folder("builtin:toyworld-clip") == toyworld.clip_path()
    assert builtin_folder("./some/folder") is None
    with pytest.raises(MergeError, match="no such built-in model.*builtin:toyworld"):
        builtin_folder("builtin:nothing")


def test_shipped_base_is_small_and_carries_its_card():
    """The shipped files fit the 30 MB budget, and the model card records the training run."""
    total = sum(path.stat().st_size for path in toyworld.ASSETS.rglob("*") if path.is_file())
    assert total < 30 * 2 ** 20
    record = json.loads((toyworld.ASSETS / "training.json").read_text())
    assert record["steps"]["unet"] > 0 and record["seconds"]["total"] > 0
    card = (toyworld.ASSETS / "MODEL_CARD.md").read_text()
    assert "prompt" in card.lower()


#: The base trainer's smallest run: 64 scenes, small batches.
SMALL = ["--scenes", "64", "--clip-batch-size", "16", "--vae-batch-size", "8", "--unet-batch-size", "8"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """One run of the base trainer, two steps of each stage, shared by the tests of its output and
    of continuing it; treat the folder as read-only."""
    from mergekit_cd.toyworld.train_base import main

    folder = tmp_path_factory.mktemp("small-run")
    assert main(["-o", str(folder), "--clip-steps", "2", "--text-steps", "2", "--vae-steps", "2", "--unet-steps", "2",
                 "--decoder-steps", "2", "--snapshot-every", "1", *SMALL]) == 0
    return folder


def test_base_trainer_defaults_are_the_two_hour_recipe_from_scratch_and_keep_a_continued_runs_parts():
    """From scratch the defaults are the recipe the model card times (text 400, UNet 11000, decoder
    1000 steps); a continued run fine-tunes neither its text encoder nor its decoder unless asked."""
    from mergekit_cd.toyworld.train_base import parse_args

    fresh = parse_args(["-o", "out"])
    assert (fresh.text_steps, fresh.unet_steps, fresh.decoder_steps) == (400, 11000, 1000)
    assert fresh.unet_lr == 6e-4
    continued = parse_args(["-o", "out2", "--continue-from", "out"])
    assert (continued.text_steps, continued.decoder_steps) == (0, 0)


def test_base_trainer_runs_end_to_end(small_run):
    """The training script (a few steps of each stage) writes a pipeline diffusers loads and the
    CLIP folder cd-eval reads: the recipe cannot rot unnoticed."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from mergekit_cd.evaluation.clip_metrics import ClipEmbedder

    pipe = StableDiffusionPipeline.from_pretrained(small_run / "base")
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red star", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
    clip = ClipEmbedder(small_run / "clip")
    assert clip.embed_texts(["a red star"]).shape[0] == 1
    assert json.loads((small_run / "training.json").read_text())["steps"]["unet"] == 2
    snapshot = UNet2DConditionModel.from_pretrained(small_run / "snapshots" / "unet-1")
    assert sorted(path.name for path in (small_run / "snapshots").iterdir()) == ["unet-1"]
    assert not torch.equal(snapshot.conv_in.weight, pipe.unet.conv_in.weight), "step 1's EMA, not the final one"
    tower = CLIPTextModel.from_pretrained(small_run / "clip").state_dict()
    encoder = pipe.text_encoder.state_dict()
    assert not all(torch.equal(tower[name], encoder[name]) for name in encoder), \
        "the pipeline's text encoder is the CLIP tower fine-tuned on caption attributes"


def test_base_trainer_continues_and_finetunes_only_the_decoder(small_run, tmp_path):
    """--continue-from with --decoder-steps keeps the encoder (so the latents the UNet learned), the
    text encoder (no --text-steps: a continued run keeps it) and the UNet with --unet-steps 0, and
    changes the decoder."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from mergekit_cd.toyworld.train_base import main

    first, second = small_run, tmp_path / "second"
    assert main(["-o", str(second), "--continue-from", str(first), "--unet-steps", "0",
                 "--decoder-steps", "3", *SMALL]) == 0
    encoders = [CLIPTextModel.from_pretrained(folder / "base" / "text_encoder").state_dict()
                for folder in (first, second)]
    assert all(torch.equal(encoders[0][name], encoders[1][name]) for name in encoders[0])
    before, after = (AutoencoderKL.from_pretrained(folder / "base" / "vae") for folder in (first, second))
    for name, tensor in before.encoder.state_dict().items():
        assert torch.equal(tensor, after.encoder.state_dict()[name]), name
    assert not torch.equal(before.decoder.conv_out.weight, after.decoder.conv_out.weight)
    unets = [UNet2DConditionModel.from_pretrained(folder / "base" / "unet") for folder in (first, second)]
    assert all(torch.equal(a, b) for a, b in zip(unets[0].state_dict().values(), unets[1].state_dict().values()))
    record = json.loads((second / "training.json").read_text())
    assert record["steps"]["decoder"] == 3 and record["continues"]["steps"]["unet"] == 2


@pytest.mark.parametrize("device", ["cuda", "cuda:99", "gpu"])
def test_base_trainer_refuses_a_device_it_cannot_use_before_any_work(device, tmp_path, capsys):
    """``--device`` goes through the rule every command follows: a GPU this machine lacks or a name
    torch does not know is one line naming the option and the devices there are, before a scene
    is rendered or the output folder made."""
    import torch

    from mergekit_cd.toyworld.train_base import main

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    output = tmp_path / "out"
    assert main(["-o", str(output), "--device", device, *SMALL]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith(f"train_base: error: --device {device}: ")
    assert "this machine has cpu" in error and not output.exists()


def test_base_trainer_runs_on_cuda(tmp_path):
    """``--device cuda`` trains every stage on the GPU and saves a pipeline the CPU loads."""
    import torch
    from diffusers import StableDiffusionPipeline

    from mergekit_cd.toyworld.train_base import main

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    assert main(["-o", str(tmp_path), "--clip-steps", "2", "--text-steps", "2", "--vae-steps", "2",
                 "--unet-steps", "2", "--decoder-steps", "2", "--device", "cuda", *SMALL]) == 0
    assert json.loads((tmp_path / "training.json").read_text())["device"] == "cuda"
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base")
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red star", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_the_text_probe_measures_how_far_a_word_moves_the_rows():
    """The probe's figures are what the README quotes: BOS and the leading "a" never move (causal
    attention), the varied word's row does; on the shipped encoder the class word moves the rows
    about as far as the colour word (contrastive training alone had left it a third as far, and the
    UNet drew blobs of the right colour)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from mergekit_cd.toyworld import base_path
    from mergekit_cd.toyworld.text_probe import probe

    spreads = probe(CLIPTokenizer.from_pretrained(base_path() / "tokenizer"),
                    CLIPTextModel.from_pretrained(base_path() / "text_encoder").eval())
    assert spreads["class"][:3] == pytest.approx([0, 0, 0], abs=1e-5) and spreads["class"][3] > 0.5
    assert spreads["colour"][:2] == pytest.approx([0, 0], abs=1e-5) and spreads["colour"][2] > 0.5
    assert max(spreads["class"]) > 0.6 * max(spreads["colour"]), spreads


def test_text_supervision_labels_come_from_the_caption_words():
    """Each class-word row is labelled with its class and its own phrase's colour and pattern (none
    named: the extra label), colour and pattern words with themselves, the rows after the caption
    with the caption's sets and background."""
    from mergekit_cd.toyworld.text_supervision import _IGNORE, row_labels

    tokenizer = build_tokenizer()
    captions = ["photo of a pink cross, a dotted triangle and a small green star in snow",
                "a blue ring on a gray background"]
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    labels = row_labels(tokenizer, ids)
    tokens = [token.removesuffix("</w>") for token in tokenizer.convert_ids_to_tokens(ids[0].tolist())]
    cross, triangle, star = tokens.index("cross"), tokens.index("triangle"), tokens.index("star")
    assert labels.cls[0, cross] == CLASSES.index("cross") and labels.cls[0, star] == CLASSES.index("star")
    assert labels.phrase_colour[0, cross] == list(COLOURS).index("pink")
    assert labels.phrase_colour[0, triangle] == len(COLOURS)  # "a dotted triangle": colour not named
    assert labels.phrase_pattern[0, triangle] == PATTERNS.index("dotted")
    assert labels.phrase_pattern[0, star] == len(PATTERNS)
    assert labels.colour[0, tokens.index("green")] == list(COLOURS).index("green")
    assert labels.cls[0, tokens.index("photo")] == _IGNORE and labels.colour[0, cross] == _IGNORE
    assert labels.after[0].tolist() == [index >= tokens.index("<|endoftext|>") for index in range(len(tokens))]
    assert labels.class_set[0].tolist() == [float(c in ("cross", "triangle", "star")) for c in CLASSES]
    assert labels.background.tolist() == [list(BACKGROUNDS).index("snow"), list(BACKGROUNDS).index("gray")]


def test_text_supervision_separates_the_class_words_it_is_trained_on():
    """A few steps of attribute supervision lower its loss and move the rows of "a red X" further
    apart across classes than the untrained encoder's: the stage does what the UNet needs."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from mergekit_cd.toyworld.text_probe import probe
    from mergekit_cd.toyworld.text_supervision import supervise_text_encoder

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                           num_attention_heads=2, num_hidden_layers=1,
                                           max_position_embeddings=tokenizer.model_max_length,
                                           bos_token_id=tokenizer.bos_token_id,
                                           eos_token_id=tokenizer.eos_token_id)).eval()
    before = probe(tokenizer, encoder)["class"][3]
    losses: list[str] = []
    supervise_text_encoder(encoder, tokenizer, world_captions(200, 0), steps=40, batch_size=16,
                           device=torch.device("cpu"), seed=0, lr=3e-3, log=losses.append)
    after = probe(tokenizer, encoder)["class"][3]
    first, last = (float(line.split("loss ")[1].split()[0]) for line in (losses[0], losses[-1]))
    assert last < 0.7 * first, losses
    assert after > 1.4 * before, (before, after)


def test_attribute_loss_uses_every_target():
    """Each target of the labels counts in the loss: ignoring one (the class words' classes, their
    phrases' colours and patterns, the colour and pattern words, the sets and the background after
    the caption) changes it, so none of the supervision can silently drop out."""
    import dataclasses

    import torch

    from mergekit_cd.toyworld.text_supervision import _IGNORE, AttributeHeads, attribute_loss, row_labels

    tokenizer = build_tokenizer()
    captions = world_captions(16, 0)
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    labels = row_labels(tokenizer, ids)
    torch.manual_seed(0)
    heads, rows = AttributeHeads(32), torch.randn(len(captions), ids.shape[1], 32)
    full = attribute_loss(heads, rows, labels)
    for name in ("cls", "phrase_colour", "phrase_pattern", "colour", "pattern"):
        assert (getattr(labels, name) != _IGNORE).any(), name
        ignored = dataclasses.replace(labels, **{name: torch.full_like(getattr(labels, name), _IGNORE)})
        assert not torch.isclose(attribute_loss(heads, rows, ignored), full), name
    for name in ("class_set", "colour_set", "pattern_set", "background"):
        changed = dataclasses.replace(labels, **{name: torch.roll(getattr(labels, name), 1, dims=0)})
        assert not torch.isclose(attribute_loss(heads, rows, changed), full), name
