"""The shipped toy-world base: loads offline as a plain diffusers pipeline, every command takes it
as builtin:toyworld, and it follows prompts as its model card says (on a small seeded sample)."""

from __future__ import annotations

import json

import pytest

from mergekit_cd import toyworld

#: Long scenarios: ``pytest -m "not slow"`` leaves them out of a quick local run; ``make test`` runs them.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        pipeline = StableDiffusionPipeline.from_pretrained(toyworld.base_path())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_base_is_a_stable_diffusion_pipeline(pipe):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    for word in ("ktn", "pll", "ucd", "sks", "star", "beach"):
        assert len(pipe.tokenizer(word, add_special_tokens=False).input_ids) == 1


@pytest.fixture(scope="module")
def accuracy(pipe):
    """Prompt following on a small seeded sample: 24 one-object prompts and 24 prompts naming a
    background, one image each, at the model card's 20 steps (the kinds the tests below judge; the
    pattern and two-object prompts are left out)."""
    from mergekit_cd.toyworld.detector import Detector
    from mergekit_cd.toyworld.prompt_following import measure, probes

    judged = [probe for probe in probes(24, seed=5) if probe.kind in ("single", "background")]
    return measure(pipe, Detector.load(), judged, steps=20)


def test_base_draws_the_named_colour_and_background(accuracy):
    """What the shipped base has learned: the named colour and the named background, far above
    chance (1/8 and 1/7)."""
    assert accuracy["colour_any_class"] >= 0.5, accuracy
    assert accuracy["background"] >= 0.5, accuracy


def test_base_meets_the_prompt_following_floor(accuracy):
    """On single-object prompts the named class and colour each appear in at least 80% of images."""
    assert accuracy["class"] >= 0.8 and accuracy["colour"] >= 0.8, accuracy


def test_every_command_takes_builtin_toyworld(tmp_path):
    """cd-sample reads builtin:toyworld, and so does open_base, behind cd-merge, cd-train, cd-eval and cd-convert."""
    from mergekit_cd.base import open_base
    from mergekit_cd.cli.sample import main as cd_sample

    grid = tmp_path / "grid.png"
    assert cd_sample(["--base", "builtin:toyworld", "a red star", "-n", "1", "--steps", "2", "-o", str(grid),
                      "-q"]) == 0
    assert grid.is_file()
    base = open_base("builtin:toyworld")
    assert base.architecture.name == "sd1" and len(base.layer_names()) > 0


def test_the_model_card_is_never_measured_with_another_sampler(capsys, monkeypatch):
    """The card's accuracy is the base's own (DDIM) sampler's: ``--write-card --sampler`` is refused
    before anything is measured or written."""
    from mergekit_cd.toyworld import prompt_following

    monkeypatch.setattr(prompt_following, "measure", lambda *a, **k: pytest.fail("measured"))
    monkeypatch.setattr(prompt_following, "write_card", lambda *a, **k: pytest.fail("wrote the card"))
    with pytest.raises(SystemExit) as stopped:
        prompt_following.main(["--write-card", "--sampler", "dpm-solver++"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "python -m mergekit_cd.toyworld.prompt_following: error: --write-card measures with the base's own "
        "sampler: leave out --sampler")


def test_the_model_card_reports_one_run_of_the_defaults(tmp_path):
    """The card's section on the from-scratch run of the defaults gives its time per stage, its CPU
    time, its accuracy and whether it meets the floor, from the record ``default_run.json`` holds."""
    from mergekit_cd.toyworld import ASSETS
    from mergekit_cd.toyworld.prompt_following import write_card

    training = json.loads((ASSETS / "training.json").read_text())
    accuracy = {"class": 0.9, "colour": 0.89, "colour_any_class": 0.95, "pattern": 0.72, "two_classes": 0.24,
                "two_colours": 0.07, "background": 0.98}
    run = {"command": "python -m mergekit_cd.toyworld.train_base -o out", "seed": 0,
           "steps": {"clip": 600, "text": 400, "vae": 700, "unet": 7000, "decoder": 1000},
           "seconds": {"clip_s": 360, "text_s": 420, "vae_s": 680, "unet_s": 4800, "decoder_s": 0, "total": 6600}}
    record = {"training": run, "accuracy": accuracy | {"class": 0.79}, "cpu_minutes": 190.4,
              "machine": "a 2-core CPU", "snapshots": {"5000": {"class": 0.7, "colour": 0.6}}}
    card = tmp_path / "card.md"
    write_card(accuracy, {"class": 1.0}, training, card, steps=20, count=100, default_run=record)
    text = card.read_text()
    section = text[text.index("## One run of the script's defaults"):]
    assert "took 110 min (clip 6 min, text 7 min, vae 11 min, unet 80 min) and 190 min of CPU time" in section
    assert "one-object class 0.79, class and colour 0.89" in section and "0.70 at 5000" in section
    assert "the floor is NOT met" in section and "do not reach the floor" in section
    write_card(accuracy, {"class": 1.0}, training, card, steps=20, count=100)
    assert "One run of the script's defaults" not in card.read_text()
