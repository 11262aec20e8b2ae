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


@pytest.mark.parametrize("option", [["--sampler", "dpm-solver++"], ["--unet", "somewhere"], ["--kinds", "single"]])
def test_the_model_card_is_only_measured_on_the_base_as_it_is(option, capsys, monkeypatch):
    """The card's accuracy is the base's own, with its own (DDIM) sampler and every prompt kind:
    ``--write-card`` with ``--sampler``, ``--unet`` or ``--kinds`` is refused before anything is
    measured or written."""
    from mergekit_cd.toyworld import prompt_following

    monkeypatch.setattr(prompt_following, "measure", lambda *a, **k: pytest.fail("measured"))
    monkeypatch.setattr(prompt_following, "write_card", lambda *a, **k: pytest.fail("wrote the card"))
    with pytest.raises(SystemExit) as stopped:
        prompt_following.main(["--write-card", *option])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "python -m mergekit_cd.toyworld.prompt_following: error: --write-card measures the base as it is, with "
        "its own sampler and every prompt kind: leave out --sampler, --unet and --kinds")


def test_chosen_prompt_kinds_keep_the_full_measurements_prompts_and_seeds(monkeypatch):
    """``--kinds two`` measures the two-object prompts with the seeds they have in the full
    measurement, so a snapshot's figure compares with the card's."""
    from mergekit_cd.toyworld import prompt_following

    seen = {}

    def record(pipe, detector, chosen, *, seeds, steps):
        seen.update(prompts=[probe.prompt for probe in chosen], seeds=list(seeds))
        return {"two_classes": 0.0}
    monkeypatch.setattr(prompt_following, "measure", record)
    assert prompt_following.main(["--images", "3", "--kinds", "two"]) == 0
    full = prompt_following.probes(3)
    assert seen["seeds"] == [6, 7, 8]
    assert seen["prompts"] == [full[i].prompt for i in (6, 7, 8)] and all(" next to " in p for p in seen["prompts"])


def test_a_snapshot_unet_is_measured_in_the_bases_pipeline(tmp_path, capsys):
    """``--unet FOLDER`` puts a saved UNet into the base's pipeline: the shipped UNet saved as
    train_base saves a snapshot gives the base's own figures, an untrained one other figures; a
    folder that holds no UNet is one usage error naming it."""
    import torch
    from diffusers import UNet2DConditionModel

    from mergekit_cd.toyworld import prompt_following

    shipped = UNet2DConditionModel.from_pretrained(toyworld.base_path() / "unet")
    same, untrained = tmp_path / "snapshots" / "unet-1000", tmp_path / "snapshots" / "unet-0"
    shipped.save_pretrained(same)
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(shipped.config).save_pretrained(untrained)
    arguments = ["--images", "4", "--kinds", "single", "--steps", "4"]

    def figures(*extra: str) -> list[str]:
        assert prompt_following.main([*arguments, *extra]) == 0
        return [line for line in capsys.readouterr().out.splitlines() if not line.startswith("measured in")]
    own = figures()
    assert any(line.startswith("class ") for line in own)
    assert not any(line.startswith(("pattern", "background")) for line in own)
    assert figures("--unet", str(same)) == own
    assert figures("--unet", str(untrained)) != own
    for folder, problem in [(tmp_path / "missing", "no saved model there"),
                            (toyworld.base_path() / "vae", "a saved AutoencoderKL, not a UNet2DConditionModel")]:
        with pytest.raises(SystemExit) as stopped:
            prompt_following.main([*arguments, "--unet", str(folder)])
        assert stopped.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1].startswith(
            f"python -m mergekit_cd.toyworld.prompt_following: error: --unet {folder}: {problem}")


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
    met = record | {"accuracy": accuracy, "note": "An earlier recipe, 7000 UNet steps, reached class 0.73."}
    write_card(accuracy, {"class": 1.0}, training, card, steps=20, count=100, default_run=met)
    section = card.read_text()[card.read_text().index("## One run of the script's defaults"):]
    assert "one-object class 0.90, class and colour 0.89" in section and "the floor is met" in section
    assert "trains a base that meets the floor.\nAn earlier recipe, 7000 UNet steps, reached class 0.73.\n" in section
    write_card(accuracy, {"class": 1.0}, training, card, steps=20, count=100)
    assert "One run of the script's defaults" not in card.read_text()
