"""The recipe check on the shipped world: it trains with the recipe it is given, samples, counts,
and reuses a concept trained with the same recipe."""

from __future__ import annotations

import re

import pytest

from mergekit_cd.loading import load


@pytest.fixture(scope="module")
def bench(benchmark_script):
    return benchmark_script("bench_recipe")


@pytest.mark.slow
def test_recipe_check_trains_samples_and_reuses(bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MERGEKIT_CD_CACHE", str(tmp_path / "cache"))
    arguments = ["banded-diamond", "--steps", "2", "--samples", "2", "--num-class-images", "2", "--lr", "2e-4",
                 "--work", str(tmp_path / "work")]
    assert bench.main(arguments) == 0
    row = re.compile(r"^\| banded-diamond( \| \d\.\d\d \[\d\.\d\d, \d\.\d\d\]){3} \|$", re.M)
    assert row.search(capsys.readouterr().out)
    (delta,) = (tmp_path / "work").glob("concepts/*/banded-diamond-*/delta.safetensors")
    recipe = load(delta).metadata["recipe"]
    assert recipe["steps"] == 2
    assert (recipe["base_learning_rate"], recipe["augment"], recipe["snr_gamma"]) == (2e-4, False, 5.0)
    written = delta.stat().st_mtime_ns
    assert bench.main(arguments) == 0  # the same recipe: reused, not trained again
    assert delta.stat().st_mtime_ns == written


def test_a_trained_concept_is_kept_per_recipe():
    """Any recipe change (here the weighting, the augmentation, the rate) gets its own folder."""
    from dataclasses import replace

    from mergekit_cd.toyworld.benchmark import BenchmarkOptions, trained_folder

    options = BenchmarkOptions()
    folders = {trained_folder(variant, "concepts", "banded-diamond")
               for variant in (options, replace(options, snr_gamma=None), replace(options, augment=True),
                               replace(options, learning_rate=1e-4), replace(options, images_per_prompt=2))}
    assert len(folders) == 4  # images_per_prompt is not part of the recipe: the same folder as the default's


def test_an_unknown_concept_is_refused_before_training(bench, tmp_path):
    with pytest.raises(ValueError, match="unknown toy-world concept 'moon'"):
        bench.main(["moon", "--work", str(tmp_path)])


def test_the_demos_cd_train_arguments_are_the_recipe():
    """recipe_arguments (what `make demo` runs) parses, through cd-train's own parser, to every
    field of the recipe train() gets in the benchmark."""
    from mergekit_cd.cli.train import build_parser
    from mergekit_cd.toyworld.benchmark import BenchmarkOptions, recipe_arguments

    options = BenchmarkOptions().quick()
    args = build_parser().parse_args(["--base", "b", "-o", "o", *recipe_arguments(options)])
    parsed = dict(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, augment=args.augment,
                  snr_gamma=args.snr_gamma, num_class_images=args.num_class_images,
                  class_sampling_steps=args.class_sampling_steps, seed=args.seed)
    assert parsed == options.recipe()
