"""`make demo` runs mergekit_cd.cli.demo on the shipped toy world: it must keep working, offline, say
what it did, and its concepts must really be learned (the detector sees them)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from mergekit_cd.cli import demo

#: Long scenarios: ``pytest -m "not slow"`` leaves them out of a quick local run; ``make test`` runs them.
pytestmark = pytest.mark.slow

#: The demo, shortened to keep the suite within its time: its concepts train as in `make demo`, but
#: its scoring and grid use one image per prompt of two denoising steps (no test judges those
#: images: the concept tests sample their own).
FAST = dict(IMAGES_PER_PROMPT=1, SAMPLING_STEPS=2)
#: Denoising steps of the samples the concept tests judge: the demo's own, not FAST's.
CONCEPT_SAMPLING_STEPS = demo.SAMPLING_STEPS


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Run the demo once in a fresh folder; (its output folder, what it printed)."""
    folder = tmp_path_factory.mktemp("demo")
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("MERGEKIT_CD_CACHE", str(folder / "cache"))
        for name, value in FAST.items():
            patch.setattr(demo, name, value)
        with contextlib.redirect_stdout(out):
            demo.main()
    return folder / "demo-output", out.getvalue()


def test_demo_trains_merges_samples_and_judges(demo_run):
    output, printed = demo_run
    for command in ("$ cd-train", "$ cd-merge"):
        assert command in printed
    for name in (f"{demo.PAIR[0]}/delta.safetensors", f"{demo.PAIR[1]}/diffusers", "constrained.safetensors",
                 "sum.safetensors", "average.safetensors", "grid.png"):
        assert (output / name).exists(), name
    for row in ("base", "single", "constrained", "sum", "average"):
        assert f"\n{row} " in printed, row
    from PIL import Image

    grid = Image.open(output / "grid.png")
    assert grid.width > 5 * 32 * 3 and grid.height > 6 * 32 * 3  # 5 columns, 6 rows of 3x upscaled images


def _concept_samples(demo_run):
    """Per demo concept: 12 seeded samples of its prompt with its delta, and of the same prompt
    without the token on the base."""
    from mergekit_cd.apply import apply, remove
    from mergekit_cd.loading import load
    from mergekit_cd.toyworld.benchmark import BASE, sampling_pipeline, token_of
    from mergekit_cd.toyworld.concepts import concept
    from mergekit_cd.toyworld.quality import sample_batch

    output, _ = demo_run
    pipe, seeds, samples = sampling_pipeline(), list(range(12)), {}
    for name in demo.PAIR:
        item = concept(name)
        apply(pipe, load(output / name / "delta.safetensors", base=BASE))
        with_token = sample_batch(pipe, [f"photo of a {token_of(item)} {item.class_word}"] * len(seeds), seeds,
                                  steps=CONCEPT_SAMPLING_STEPS, guidance_scale=6.0)
        remove(pipe)
        without = sample_batch(pipe, [f"photo of a {item.class_word}"] * len(seeds), seeds,
                               steps=CONCEPT_SAMPLING_STEPS, guidance_scale=6.0)
        samples[name] = (with_token, without)
    return samples


@pytest.fixture(scope="module")
def concept_samples(demo_run):
    return _concept_samples(demo_run)


def test_trained_concept_moves_samples_towards_its_instances(concept_samples):
    """With its token, a trained concept's samples are closer to its instance images (the world's
    CLIP, mean image-image cosine) than the base's samples of the same prompt without the token:
    fails if training or installing the delta breaks."""
    from mergekit_cd.evaluation.clip_metrics import ClipEmbedder, mean_pairwise_cosine
    from mergekit_cd.toyworld.benchmark import CLIP, instance_references
    from mergekit_cd.toyworld.concepts import concept

    clip = ClipEmbedder(CLIP)
    for name, (with_token, without) in concept_samples.items():
        reference = clip.embed_images(instance_references(concept(name)))
        closer = mean_pairwise_cosine(clip.embed_images(with_token), reference)
        base = mean_pairwise_cosine(clip.embed_images(without), reference)
        assert closer > base + 0.01, (name, closer, base)


def test_the_merge_keeps_each_concept_closer_to_its_instances_than_the_base(demo_run, concept_samples):
    """The demo's constrained merge, like each concept alone, draws each concept's prompt closer to
    its instance images (the world's CLIP, mean image-image cosine) than the base draws the prompt
    without the token: fails if the merge loses a concept."""
    from mergekit_cd.apply import apply
    from mergekit_cd.evaluation.clip_metrics import ClipEmbedder, mean_pairwise_cosine
    from mergekit_cd.loading import load
    from mergekit_cd.toyworld.benchmark import BASE, CLIP, instance_references, sampling_pipeline, token_of
    from mergekit_cd.toyworld.concepts import concept
    from mergekit_cd.toyworld.quality import sample_batch

    output, _ = demo_run
    pipe, clip, seeds = sampling_pipeline(), ClipEmbedder(CLIP), list(range(12))
    apply(pipe, load(output / "constrained.safetensors", base=BASE))
    for name, (_, without) in concept_samples.items():
        item = concept(name)
        merged = sample_batch(pipe, [f"photo of a {token_of(item)} {item.class_word}"] * len(seeds), seeds,
                              steps=CONCEPT_SAMPLING_STEPS, guidance_scale=6.0)
        reference = clip.embed_images(instance_references(item))
        closer = mean_pairwise_cosine(clip.embed_images(merged), reference)
        base = mean_pairwise_cosine(clip.embed_images(without), reference)
        assert closer > base + 0.01, (name, closer, base)


def test_trained_concept_appears_with_its_token_and_not_without(concept_samples):
    """The demo's first concept shows in most samples of its prompt; the second, learned less
    well, in at least a fifth (README, demo); the base draws neither in more than one sample in
    ten of the same prompt without the token."""
    from mergekit_cd.toyworld.detector import Detector

    detector = Detector.load()
    for least, (name, (with_token, without)) in zip((0.5, 0.2), concept_samples.items()):
        assert sum(name in d.concepts for d in detector.detect(without)) / len(without) <= 0.1, name
        assert sum(name in d.concepts for d in detector.detect(with_token)) / len(with_token) >= least, name


def test_cd_eval_world_reports_the_detector_rates(demo_run, tmp_path):
    """cd-eval --world on the demo's concepts: every row gets the detector's rates with intervals;
    the base row (tokens installed, K/V untouched) draws the ordinary prompts as the plain base does
    (preservation 1 wherever the plain base gets any right). The probes' latents come from the
    concepts' instance images, as in the benchmark (no reference images to sample)."""
    import json

    from mergekit_cd.cli.eval import main as cd_eval
    from mergekit_cd.toyworld import concept_images_path

    output, _ = demo_run
    report = tmp_path / "eval.json"
    deltas = [str(output / name / "delta.safetensors") for name in demo.PAIR]
    instances = [str(concept_images_path(name)) for name in demo.PAIR]
    assert cd_eval(["--base", "builtin:toyworld", "--concepts", *deltas, "--instance-dirs", *instances,
                    "--compare", "constrained,base", "--world", *demo.PAIR, "--num-images", "1", "--steps", "10",
                    "--samples", "4", "--held-out-samples", "4", "--json", str(report), "-q"]) == 0
    rows = {row["label"]: row for row in json.loads(report.read_text())["rows"]}
    for row in rows.values():
        world = row["world"]
        for key in ("presence", "both", "ordinary"):
            assert world[key]["low"] <= world[key]["value"] <= world[key]["high"], (row["label"], key)
            assert world[key]["n"] > 0
    assert rows["base"]["world"].get("preservation", {"value": 1.0})["value"] == 1.0


def test_cd_eval_world_refuses_a_wrong_name(demo_run, capsys):
    from mergekit_cd.cli.eval import main as cd_eval

    output, _ = demo_run
    deltas = [str(output / name / "delta.safetensors") for name in demo.PAIR]
    assert cd_eval(["--base", "builtin:toyworld", "--concepts", *deltas, "--world", "twotone-star", "nothing",
                    "-q"]) != 0
    assert "unknown toy-world concept 'nothing'" in capsys.readouterr().err
