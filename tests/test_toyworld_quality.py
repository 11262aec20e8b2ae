"""The benchmark's scoring: intervals, prompt sets and the detector-based rates (no sampling)."""

from __future__ import annotations

import math

import pytest

from mergekit_cd.toyworld.concepts import concept
from mergekit_cd.toyworld.detector import Detection
from mergekit_cd.toyworld.quality import (ModelScores, Sampled, detector_counts, mean, ordinary_correct, pair_prompts,
                                          prompt_set, rate)


def test_wilson_interval_matches_a_hand_computation():
    """7 of 10: the Wilson 95% interval is [0.397, 0.892] (Newcombe 1998's table)."""
    estimate = rate(7, 10)
    assert estimate.value == 0.7
    assert estimate.low == pytest.approx(0.3968, abs=1e-3) and estimate.high == pytest.approx(0.8922, abs=1e-3)
    assert rate(0, 20).low == 0.0 and rate(20, 20).high == 1.0
    assert math.isnan(rate(0, 0).value)


def test_mean_interval_is_normal():
    estimate = mean([1.0, 2.0, 3.0, 4.0])
    assert estimate.value == 2.5
    assert estimate.high - estimate.value == pytest.approx(1.96 * 1.2909944 / 2, rel=1e-6)


def test_prompt_set_names_tokens_scenes_and_ordinary_prompts():
    items = [concept("twotone-star"), concept("dotted-ring")]
    prompts, kinds, _ = prompt_set(["<new1>", "<new2>"], items)
    assert "photo of a <new1> star" in prompts and "a <new2> ring on the beach" in prompts
    assert pair_prompts(["<new1>", "<new2>"], items)[0][0] == "a <new1> star next to a <new2> ring"
    assert kinds.count("pair") == 3 and kinds.count("ordinary") == 8
    # the base sees the same prompts without tokens, spaces collapsed
    plain, _, _ = prompt_set(["", ""], items)
    assert "photo of a star" in plain and all("  " not in prompt for prompt in plain)


def _detection(objects=(), background="white", concepts=()):
    return Detection(tuple(objects), background, frozenset(concepts))


def test_detector_counts_score_presence_both_background_and_ordinary():
    items = [concept("twotone-star"), concept("dotted-ring")]
    sampled = Sampled(
        prompts=["p"] * 5, kinds=["concept0", "concept1", "pair", "pair", "ordinary"],
        expected=[None, "beach", "night", None, ((("star", "red"),), "grass")],
        images=[None] * 5,
        detections=[_detection(concepts=["twotone-star"]), _detection(background="white"),
                    _detection(background="night", concepts=["twotone-star", "dotted-ring"]),
                    _detection(concepts=["dotted-ring"]),
                    _detection(objects=[("star", "red", "solid")], background="grass")])
    counts = detector_counts(sampled, items)
    assert counts["presence0"] == (1, 1) and counts["presence1"] == (0, 1)
    assert counts["both"] == (1, 2) and counts["background"] == (1, 2) and counts["ordinary"] == (1, 1)
    estimates = ModelScores(counts, [], []).estimates(base_ordinary=(1, 2))
    assert estimates["presence"].value == 0.5 and estimates["preservation"].value == 2.0
    assert not ordinary_correct(_detection(objects=[("star", "blue", "solid")], background="grass"),
                                ((("star", "red"),), "grass"))


def test_every_benchmark_merge_has_its_cd_eval_row_under_its_own_row_rule():
    """Each merge the benchmark runs is asked of cd-eval once, in the cd-eval run of its row rule,
    and cd-eval's label for it maps back to exactly that merge (fidelity lands on the right row)."""
    from mergekit_cd.merge_options import MergeOptions
    from mergekit_cd.toyworld.benchmark import METHODS, QUICK_METHODS, cd_eval_label, compare_items

    labels = [label for label, _, _ in METHODS]
    grouped = compare_items(labels)
    assert sorted(grouped) == ["authors", "pipeline"]
    assert sorted(label for group in grouped.values() for label in group) == sorted(labels)
    for rule, items in grouped.items():
        assert len({cd_eval_label(item) for item in items.values()}) == len(items), rule
        for label, item in items.items():
            options = next(options for name, options, _ in METHODS if name == label)
            assert MergeOptions(**options).rows == rule
    assert grouped["pipeline"]["hybrid lambda=1000"] == "hybrid=1000"
    assert set(QUICK_METHODS) <= set(labels)
    assert compare_items(QUICK_METHODS) == {"authors": {"constrained": "constrained", "sum": "sum",
                                                        "average": "average"},
                                            "pipeline": {"hybrid lambda=1000": "hybrid=1000"}}
