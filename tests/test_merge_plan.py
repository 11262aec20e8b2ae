"""Planning and running a merge: options checked up front, recorded prompts reused, the
layer-by-layer execution matching a one-shot solve, and peak memory near the inputs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mergekit_cd.base import open_base
from mergekit_cd.delta import Concept
from mergekit_cd.errors import MergeError
from mergekit_cd.loading import load, save
from mergekit_cd.merge import MergeOptions, merge, merge_to_file, plan_merge, summarize_plan
from mergekit_cd.solvers import factor_hard, factor_soft, solve_hard, solve_soft
from mergekit_cd.testing import random_concept_delta

NUM_REG = 40


@pytest.fixture(scope="module")
def base(tiny_pipeline_path):
    return open_base(tiny_pipeline_path("sd1"))


@pytest.fixture(scope="module")
def two(base):
    return [random_concept_delta(base, "<new1>", "cat", seed=1), random_concept_delta(base, "<new2>", "pot", seed=2)]


def captions():
    from mergekit_cd.captions import default_reg_captions

    return default_reg_captions()[:NUM_REG]


# ----------------------------------------------------------------------------- factor once, apply per layer


@pytest.mark.parametrize("soft", [False, True])
def test_factor_applied_per_block_equals_the_stacked_solve(soft):
    g = torch.Generator().manual_seed(0)
    d, s, n = 24, 6, 50
    C_reg = torch.randn(80, d, generator=g, dtype=torch.float64)
    G = C_reg.T @ C_reg
    C = torch.randn(s, d, generator=g, dtype=torch.float64)
    W0 = torch.randn(n, d, generator=g, dtype=torch.float64)
    V = torch.randn(n, s, generator=g, dtype=torch.float64)
    if soft:
        C_list, weights = [C[:2], C[2:]], [10.0, 3.0]
        W, info = solve_soft(W0, G, C_list, [V[:, :2], V[:, 2:]], weights, 0.5, return_info=True)
        operator = factor_soft(G, C_list, weights, 0.5, diagnostics=True)
    else:
        W, info = solve_hard(W0, G, C, V, return_info=True)
        operator = factor_hard(G, C, diagnostics=True)
    blocks = [operator.apply(W0[a:b], V[a:b]) for a, b in ((0, 7), (7, 31), (31, n))]
    torch.testing.assert_close(torch.cat(blocks), W, rtol=0, atol=1e-12)
    stacked = operator.info()
    assert stacked.rank == info.rank
    assert stacked.residual == pytest.approx(info.residual, rel=1e-9, abs=1e-15)
    assert stacked.relative_change == pytest.approx(info.relative_change, rel=1e-9)


def test_the_difference_in_float32_is_the_rounded_difference_of_the_float64_rows_with_the_same_diagnostics():
    """``apply(..., difference=True, dtype=float32)``, what a merge stores, is ``(W - W0)`` of the
    float64 rows rounded once, to the bit, with the diagnostics of the rows as ``apply`` returns
    them; ``dtype`` alone rounds W and measures the rounded rows. n spans several chunks."""
    from mergekit_cd.solvers._common import chunk_rows

    g = torch.Generator().manual_seed(2)
    d, s = 24, 6
    n = 2 * chunk_rows(d) + 5
    C_reg = torch.randn(80, d, generator=g, dtype=torch.float64)
    C = torch.randn(s, d, generator=g, dtype=torch.float64)
    W0 = torch.randn(n, d, generator=g, dtype=torch.float64)
    V = torch.randn(n, s, generator=g, dtype=torch.float64)
    whole, streamed, rounded = (factor_hard(C_reg.T @ C_reg, C, diagnostics=True) for _ in range(3))
    W = whole.apply(W0, V)
    difference = streamed.apply(W0, V, difference=True, dtype=torch.float32)
    assert difference.dtype == torch.float32 and torch.equal(difference, (W - W0).float())
    assert streamed.info() == whole.info()
    assert torch.equal(rounded.apply(W0, V, dtype=torch.float32), W.float())
    assert rounded.info().residual != whole.info().residual  # of the float32 rows


@pytest.mark.parametrize("soft", [False, True])
def test_a_given_misfit_is_the_one_the_operator_would_compute(soft):
    """``apply(W0, V, misfit=V - W0 C^T)``, as a merge calls it with each concept's own change, gives
    the rows and the diagnostics of ``apply(W0, V)`` to float64 rounding."""
    g = torch.Generator().manual_seed(1)
    d, s, n = 24, 6, 50
    C_reg = torch.randn(80, d, generator=g, dtype=torch.float64)
    C = torch.randn(s, d, generator=g, dtype=torch.float64)
    W0 = torch.randn(n, d, generator=g, dtype=torch.float64)
    change = 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64)
    V = (W0 + change) @ C.T
    factor = (lambda: factor_soft(C_reg.T @ C_reg, [C[:2], C[2:]], [10.0, 3.0], 0.5, diagnostics=True)) if soft \
        else (lambda: factor_hard(C_reg.T @ C_reg, C, diagnostics=True))
    computed, given = factor(), factor()
    W = computed.apply(W0, V)
    torch.testing.assert_close(given.apply(W0, V, misfit=change @ C.T), W, rtol=0, atol=1e-12)
    assert given.info().residual == pytest.approx(computed.info().residual, rel=1e-6, abs=1e-14)
    assert given.info().relative_change == pytest.approx(computed.info().relative_change, rel=1e-9)


def test_operator_checks_the_rows_it_is_given():
    G = torch.eye(4, dtype=torch.float64)
    operator = factor_hard(G, torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="W0 columns"):
        operator.apply(torch.zeros(3, 5), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="V columns"):
        operator.apply(torch.zeros(3, 4), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="misfit columns"):
        operator.apply(torch.zeros(3, 4), torch.zeros(3, 2), misfit=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="without diagnostics"):
        operator.info()


# ----------------------------------------------------------------------------- options and plans


@pytest.mark.parametrize("options, message", [
    (dict(method="soft", mu=-1.0), r"^mu -1: must be a finite number >= 0\.$"),
    (dict(method="constrained", ridge=float("nan")), r"^ridge nan: must be a finite number"),
    (dict(method="constrained", relative_ridge=-1e-3), r"^relative_ridge -0.001: must be"),
    (dict(method="constrained", weights=[1.0]), r"^weights only applies to method soft or hybrid, not to method "
                                                r"constrained"),
    (dict(method="hybrid", weights=[1.0]), r"^method hybrid needs rows pipeline: its soft terms are the start and "
                                           r"padding rows of the target prompts, which only the pipeline rule reads"),
    (dict(rows="all"), r"^rows 'all': choose one of authors, pipeline\.$"),
    (dict(method="sum", weights=[1.0], mu=2.0), r"^weights and mu only apply to method soft"),
    (dict(method="soft", weights=[1.0, 0.0]), r"^weights: every weight must be a finite number > 0, got 0\.$"),
    (dict(method="soft", weights=[]), r"^weights: give one weight per concept"),
    (dict(method="soft", mu=0.0), "without a unique solution"),
    (dict(method="constrained", batch_size=0), r"^batch_size 0: must be at least 1\.$"),
    (dict(method="constrained", text_dtype="float8"), r"^text_dtype 'float8': choose one of float32, float16"),
    (dict(method="constrained", device="meta"), r"^device meta: this command runs on cpu or cuda\[:N\] or mps"),
    (dict(method="best"), "Unknown merge method"),
])
def test_bad_options_are_refused_before_any_work(options, message):
    with pytest.raises(MergeError, match=message):
        MergeOptions(**options)
    # merge() and merge_to_file() check them before they even open the base
    with pytest.raises(MergeError, match=message):
        merge(["/nonexistent/delta.safetensors"], base="/nonexistent/base", **options)
    with pytest.raises(MergeError, match=message):
        merge_to_file(["/nonexistent/delta.safetensors"], "/nonexistent/out.safetensors", base="/nonexistent/base",
                      **options)


def test_options_are_given_one_way():
    with pytest.raises(MergeError, match=r"^Give either options= or option keywords \(ridge\), not both\.$"):
        merge(["/nonexistent/delta.safetensors"], base="/nonexistent/base", options=MergeOptions(), ridge=1.0)


def test_soft_weights_must_match_the_concepts(base, two):
    with pytest.raises(MergeError, match=r"^weights: got 3 weight\(s\) for 2 concepts \(<new1>, <new2>\)"):
        merge(two, captions(), base=base, method="soft", weights=[1.0, 2.0, 3.0])


def test_a_recorded_merge_replays_from_its_recipe(base, two, tmp_path):
    """The options that decide the weights are in the file; the same inputs and captions with
    the recorded options give the same weights, bit for bit."""
    output = tmp_path / "soft.safetensors"
    report = merge_to_file(two, output, captions(), base=base, method="soft", weights=[30.0, 7.0],
                           relative_ridge=1e-3, batch_size=3)
    assert report.method == "soft" and output.exists()
    recipe = load(output).metadata["recipe"]
    options = MergeOptions.from_recipe(recipe)
    assert options == MergeOptions(method="soft", weights=(30.0, 7.0), mu=1.0, relative_ridge=1e-3)
    replayed = merge(two, captions(), base=base, options=options)
    written = load(output)
    for name in base.layer_names():
        assert torch.equal(replayed.layers[name].rows(), written.layers[name].rows()), name
    assert MergeOptions.from_recipe(recipe, device="cpu").device == torch.device("cpu")
    with pytest.raises(MergeError, match="records no options"):
        MergeOptions.from_recipe({"method": "constrained", "ridge": 0.0})
    with pytest.raises(MergeError, match="does not know: tau"):
        MergeOptions.from_recipe({"options": {"method": "constrained", "tau": 1}})


def test_recorded_prompts_are_reused_and_renamed(base, tmp_path):
    custom = random_concept_delta(base, "<new1>", "cat", seed=3)
    custom.concepts = (Concept("<new1>", "cat", ("<new1> cat on a sofa", "a sketch of <new1> cat")),)
    other = random_concept_delta(base, "<new1>", "dog", seed=4)
    path = save(custom, tmp_path / "custom.safetensors")
    plan = plan_merge([other, path], captions(), base=base)
    renamed = plan.concepts[1]
    assert renamed.token != "<new1>"
    assert renamed.prompts == (f"{renamed.token} cat on a sofa", f"a sketch of {renamed.token} cat")
    assert plan.formats == ("object", "native")
    # an explicit class word or template means: build the prompts from templates
    plan = plan_merge([path], captions(), base=base, target_templates=["a {token} {class_word} toy"])
    assert plan.concepts[0].prompts == ("a <new1> cat toy",)


def test_style_flag_and_templates_work_together(base, two):
    plan = plan_merge(two, captions(), base=base, styles=[False, True], target_templates=["{token} {class_word} X"])
    assert plan.concepts[0].prompts == ("<new1> cat X",)
    assert "painting in the style of <new2> pot" in plan.concepts[1].prompts
    plan = plan_merge(two, captions(), base=base, styles=[False, True], style_templates=["{token} art of {class_word}"])
    assert plan.concepts[1].prompts == ("<new2> art of pot",)
    assert plan.concepts[0].prompts == ("<new1> cat", "photo of a <new1> cat")


def test_templates_apply_only_to_their_kind_and_style_flags_only_add(base):
    """--style-template used to discard an object's recorded prompts, --target-template a style's,
    and --style 2 reset input 1's recorded style to an object."""
    thing = random_concept_delta(base, "<new1>", "cat", seed=3)
    thing.concepts = (Concept("<new1>", "cat", ("<new1> cat on a sofa",)),)
    style = random_concept_delta(base, "<new2>", "painting", seed=4)
    style.concepts = (Concept("<new2>", "painting", ("<new2> painting of a harbour",), style=True),)
    plan = plan_merge([thing, style], captions(), base=base, style_templates=["{token} art of {class_word}"])
    assert [c.prompts for c in plan.concepts] == [("<new1> cat on a sofa",), ("<new2> art of painting",)]
    plan = plan_merge([thing, style], captions(), base=base, target_templates=["a {token} {class_word} toy"])
    assert [c.prompts for c in plan.concepts] == [("a <new1> cat toy",), ("<new2> painting of a harbour",)]
    plan = plan_merge([style, thing], captions(), base=base, styles=[False, True])
    assert [c.style for c in plan.concepts] == [True, True]
    assert plan.concepts[0].prompts == ("<new2> painting of a harbour",)
    assert plan.concepts[1].prompts == ("<new1> cat", "painting in the style of <new1> cat")


def test_an_input_without_tokens_is_warned_about(base, two):
    tokenless = random_concept_delta(base, "<new9>", "cat", seed=5)
    tokenless.tokens = {}
    tokenless.concepts = (Concept("", "cat"),)
    with pytest.warns(UserWarning, match="no modifier token"):
        plan_merge([tokenless, two[1]], captions(), base=base)


def test_dry_run_summary_counts_rows_and_rank(base, two):
    twin = random_concept_delta(base, "<new1>", "cat", seed=9)
    plan = plan_merge([two[0], twin], captions(), base=base)
    summary = summarize_plan(plan)  # the twin's "<new1>" is renamed: its own embedding, its own rows
    assert summary.num_constraint_rows == sum(rows for *_, rows in summary.concepts)
    assert 0 < summary.rank <= summary.num_constraint_rows
    tokenless = [random_concept_delta(base, "<new9>", "cat", seed=seed) for seed in (5, 6)]
    for delta in tokenless:
        delta.tokens, delta.concepts = {}, (Concept("", "cat"),)
    with pytest.warns(UserWarning, match="no modifier token"):
        same = plan_merge(tokenless, captions(), base=base)
    duplicate = summarize_plan(same)
    # two concepts without a token and with one class word: the same prompts, so their rows repeat
    assert duplicate.rank == duplicate.num_constraint_rows // 2
    assert duplicate.estimated_memory_bytes > 0


def test_the_same_input_twice_is_refused(base, two, tmp_path):
    """It used to become two tokens with one embedding (<new2>, <new3>): the same concept twice."""
    path = save(two[0], tmp_path / "cat.safetensors")
    link = tmp_path / "link.safetensors"
    link.symlink_to(path)
    folder = save(two[0], tmp_path / "cat", format="diffusers", base=base)
    same_file = r"^Input 3 \(.*link\.safetensors\) is the same file as input 1 \(.*cat\.safetensors\): .*once"
    with pytest.raises(MergeError, match=same_file):
        plan_merge([path, two[1], link], captions(), base=base)
    with pytest.raises(MergeError, match=r"^Input 2 \(.*cat/?\) is the same folder as input 1 \(.*cat\)"):
        plan_merge([str(folder), f"{folder}/", two[1]], captions(), base=base)
    with pytest.raises(MergeError, match=r"^Input 3 is the same concept as input 1: a concept can be merged only once"):
        plan_merge([two[0], two[1], two[0]], captions(), base=base)
    reread = load(path, base=base)  # another object, its layers read from the file: equal all the same
    with pytest.raises(MergeError, match=r"^Input 2 \(.*cat\.safetensors\) is the same concept as input 1"):
        plan_merge([two[0], reread], captions(), base=base)
    # other paths to the same content: a diffusers folder and its own weights file, a copy
    weights = next(folder.glob("pytorch_custom_diffusion_weights.*"))
    with pytest.raises(MergeError, match=r"^Input 2 \(.*pytorch_custom_diffusion_weights.*\) is the same concept"):
        plan_merge([str(folder), str(weights), two[1]], captions(), base=base)
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(path.read_bytes())
    with pytest.raises(MergeError, match=r"^Input 2 \(.*copy\.safetensors\) is the same concept as input 1"):
        plan_merge([path, copy], captions(), base=base)
    other = random_concept_delta(base, "<new1>", "cat", seed=9)
    other.tokens = dict(two[0].tokens)  # an untrained token: the same embedding, but other weights
    assert len(plan_merge([two[0], other], captions(), base=base).concepts) == 2


def test_a_bfloat16_merge_keeps_every_constraint(base, two):
    """bfloat16 text features used to set the dependence tolerance to sqrt(eps) = 0.088, which
    dropped consistent rows (rank 17/18, residuals 1e-2): the targets come from the same rows."""
    three = [*two, random_concept_delta(base, "<new3>", "dog", seed=3)]
    _, report = merge(three, captions(), base=base, text_dtype=torch.bfloat16, return_report=True)
    assert report.solve_info.rank == report.solve_info.n_constraints == 18
    assert max(concept.residual for concept in report.concepts) < 1e-6
    summary = summarize_plan(plan_merge(three, captions(), base=base), text_dtype=torch.bfloat16)
    assert summary.rank == summary.num_constraint_rows == 18


def test_a_caption_holding_a_token_is_not_reused_for_another_embedding(base, two, tmp_path):
    """Such a caption is encoded with the token's embedding: the Gram cache must key on it."""
    reg = [*captions()[:20], "a <new1> cat on a sofa"]
    held_out = ["a house by the sea"]
    _, first = merge(two, reg, base=base, cache_dir=tmp_path, held_out=held_out, return_report=True)
    other = [random_concept_delta(base, "<new1>", "cat", seed=7), two[1]]  # <new1> with another embedding
    _, second = merge(other, reg, base=base, cache_dir=tmp_path, held_out=held_out, return_report=True)
    assert not first.gram_from_cache and not second.gram_from_cache
    _, again = merge(other, reg, base=base, cache_dir=tmp_path, held_out=held_out, return_report=True)
    assert again.gram_from_cache


@pytest.mark.parametrize("progress", [True, False])
def test_the_held_out_captions_get_a_labelled_progress_bar_unless_quiet(base, two, tmp_path, capsys, progress):
    held_out = ["a house by the sea", "two dogs in the snow"]
    merge(two, captions()[:10], base=base, cache_dir=tmp_path, held_out=held_out, progress=progress,
          return_report=True)
    shown = capsys.readouterr().err
    assert ("held-out features" in shown) == progress and ("text features" in shown) == progress


# ----------------------------------------------------------------------------- memory


MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, warnings
    from mergekit_cd.base import open_base
    from mergekit_cd.captions import default_reg_captions
    from mergekit_cd.features import TextFeatures
    from mergekit_cd.merge import merge, plan_merge

    base = open_base(sys.argv[1])
    inputs = sys.argv[2:5]
    held_out = [f"an ordinary caption number {i} about a house by the sea" for i in range(400)]
    plan = plan_merge(inputs, default_reg_captions()[:20], base=base)
    estimate = plan.estimated_memory_bytes(12)
    TextFeatures(base).gram(held_out[:5])  # load the libraries' lazy parts first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    warnings.simplefilter("ignore")
    merge(plan.deltas, default_reg_captions()[:20], base=base, held_out=held_out, return_report=True)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(after - before, estimate)
""")


@pytest.mark.slow
def test_peak_memory_stays_near_the_inputs(tall_base_path, tmp_path):
    """A base with tall K/V layers: the merge must not build (rows x captions) matrices."""
    folder = tall_base_path
    tall = open_base(folder)
    rows = sum(k[0] + v[0] for k, v in tall.kv_shapes().values())
    paths = [save(random_concept_delta(tall, f"<new{i}>", word, seed=i), tmp_path / f"{i}.safetensors")
             for i, word in enumerate(("cat", "dog", "pot"), start=1)]
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(folder), *map(str, paths)],
                            capture_output=True, text=True, check=True)
    growth, estimate = map(int, result.stdout.split()[-2:])
    kv_bytes = 4 * rows * tall.context_dim
    # the inputs (native files) stream layer by layer, so beyond the libraries only the result
    # (1 x K/V) and one layer's rows are held; the old report alone built float64
    # (rows x held-out rows) matrices, > 1 GB here, and the inputs took 3 x K/V
    assert growth < 2.5 * kv_bytes + 32 * 2**20, (growth, kv_bytes)
    assert kv_bytes <= estimate < 2.5 * kv_bytes + 32 * 2**20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_merge_on_cuda_matches_the_cpu(base, two, tmp_path):
    """The float32 text encoder differs by ~1e-6 between devices and the solve amplifies that
    (worst layer 2.8e-5 on an H200), so compare layers by relative Frobenius norm and check that
    both results keep every constraint; each device gets its own cache, so each encodes."""
    on_cpu, cpu_report = merge(two, captions(), base=base, cache_dir=tmp_path / "cpu", return_report=True)
    on_gpu, gpu_report = merge(two, captions(), base=base, device="cuda", cache_dir=tmp_path / "cuda",
                               return_report=True)
    assert not cpu_report.gram_from_cache and not gpu_report.gram_from_cache
    for name in base.layer_names():
        for which in ("key", "value"):
            cpu, gpu = getattr(on_cpu.layers[name], which), getattr(on_gpu.layers[name], which)
            assert gpu.device.type == "cpu" and gpu.shape == cpu.shape
            assert float(torch.linalg.norm(gpu - cpu) / torch.linalg.norm(cpu)) < 1e-3, (name, which)
    for report in (cpu_report, gpu_report):
        assert max(concept.residual for concept in report.concepts) < 1e-5


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_loaded_native_file_is_not_kept_mapped(base, two, tmp_path):
    """A streamed input holds no view into its file: one would keep the whole file mapped, and
    every page the validation read resident (10 SDXL inputs showed as 16 GB of RSS)."""
    path = save(two[0], tmp_path / "cat.safetensors")
    delta = load(path, base=base)
    with open("/proc/self/maps") as maps:
        assert str(path) not in maps.read()
    assert delta.tokens


@pytest.mark.parametrize("output_name", ["merged.safetensors", "merged.bin"])
def test_reported_residual_is_of_the_file_as_written(base, two, tmp_path, output_name):
    """The report measures the float32 result (differences, or full weights for the full-weight
    formats), not the float64 solve: recomputed here from the file written, with the merge's own
    feature rows, it agrees; the float64 solve's residual is orders of magnitude smaller."""
    from mergekit_cd import formats
    from mergekit_cd.delta import dense
    from mergekit_cd.features import TextFeatures
    from mergekit_cd.weights import FineTunedWeights

    merged, report = merge(two, captions(), base=base, return_report=True)
    output = save(merged, tmp_path / output_name, base=base)
    written = formats.read(output)
    encoder = TextFeatures(base, merged.tokens)
    for concept, delta in zip(report.concepts, two):
        C = torch.cat(encoder.features(list(concept.prompts))).double()  # each concept's on their own, as merged
        error = target = 0.0
        for layer in base.layer_names():
            for index, own in enumerate((delta.layers[layer].key, delta.layers[layer].value)):
                W0 = base.kv(layer)[index].double()
                W = written.layers[layer][index].double() if isinstance(written, FineTunedWeights) \
                    else W0 + dense((written.layers[layer].key, written.layers[layer].value)[index]).double()
                wanted = (W0 + dense(own).double()) @ C.T
                error += float((W @ C.T - wanted).square().sum())
                target += float(wanted.square().sum())
        reported = concept.full_weights_residual if isinstance(written, FineTunedWeights) else concept.residual
        assert (error / target) ** 0.5 == pytest.approx(reported, rel=1e-3)
        assert report.solve_info.residual < 1e-3 * reported


def test_the_recipe_hash_of_an_input_changes_with_any_one_of_its_values(base, two, tmp_path):
    """The recipe's content hash identifies each input by its differences and tokens, not by its
    file: a delta in memory and the same delta read from its file hash alike, and one value moved
    by one float32 step changes that input's hash, and only its."""
    from dataclasses import replace

    from mergekit_cd.delta import LayerDelta, dense

    def hashes(deltas):
        merged = merge(deltas, captions(), base=base, cache_dir=tmp_path / "cache")
        return [entry["content_sha256"] for entry in merged.metadata["recipe"]["inputs"]]

    first = hashes(two)
    assert hashes([str(save(two[0], tmp_path / "cat.safetensors")), two[1]]) == first
    layer = base.layer_names()[-1]
    value = dense(two[1].layers[layer].value).clone()
    value[-1, -1] = torch.nextafter(value[-1, -1], torch.tensor(float("inf")))
    moved = replace(two[1], layers={**two[1].layers, layer: LayerDelta(two[1].layers[layer].key, value)})
    changed = hashes([two[0], moved])
    assert changed[0] == first[0] and changed[1] != first[1]


@pytest.mark.parametrize("method", ["constrained", "sum"])
def test_the_layer_pass_in_many_chunks_gives_the_merge_of_one_chunk(base, two, method, monkeypatch):
    """The layer pass and the report work on chunks of rows (``row_slices``); a tiny layer fits in
    one, so here chunks of 1 to 5 rows, none aligned with the K/V boundary, must give the same
    merged weights to the bit and the same report to float64 rounding of its sums."""
    from mergekit_cd.solvers import _common

    def run() -> tuple:
        return merge(two, captions(), base=base, method=method, return_report=True, sum_drift=True)

    whole, report = run()
    for elements in (1, 3 * base.context_dim + 1, 5 * base.context_dim):
        monkeypatch.setattr(_common, "CHUNK_ELEMENTS", elements)
        chunked, chunked_report = run()
        for name, layer in whole.layers.items():
            assert torch.equal(chunked.layers[name].key, layer.key) and torch.equal(chunked.layers[name].value, layer.value)
        assert chunked_report.drift == pytest.approx(report.drift, rel=1e-12)
        assert chunked_report.sum_drift == pytest.approx(report.sum_drift, rel=1e-12)
        for mine, theirs in zip(chunked_report.concepts, report.concepts):
            assert (mine.residual, mine.sum_residual) == pytest.approx((theirs.residual, theirs.sum_residual), rel=1e-9)


def test_a_merge_written_as_differences_does_not_measure_the_full_weights_as_written(base, two, tmp_path):
    """The full weights' residuals cost the report a third candidate (a copy of every layer and its
    product with the constraint rows); only a full-weight output writes them, so only its report
    measures them, while the other figures come out the same to the bit with or without them."""
    from mergekit_cd.merge import merge_to_file

    _, everything = merge(two, captions(), base=base, return_report=True, sum_drift=True)
    as_differences = merge_to_file(two, tmp_path / "merged.safetensors", captions(), base=base, sum_drift=True)
    as_weights = merge_to_file(two, tmp_path / "merged.bin", captions(), base=base, sum_drift=True)
    assert [c.full_weights_residual for c in as_differences.concepts] == [None, None]
    assert [c.full_weights_residual for c in as_weights.concepts] == \
        [c.full_weights_residual for c in everything.concepts]
    for report in (as_differences, as_weights):
        assert [(c.residual, c.sum_residual) for c in report.concepts] == \
            [(c.residual, c.sum_residual) for c in everything.concepts]
        assert (report.drift, report.sum_drift) == (everything.drift, everything.sum_drift)


def test_a_repeated_merge_remembers_its_inputs_digests_by_their_stat_and_hashes_a_changed_one_again(
        base, two, tmp_path, monkeypatch):
    """The recipe's content hashes (sha256 of every input's differences: 7.1 GB for 100 SD1.5
    concepts) are remembered in the cache folder by each input file's stat: a second merge of the
    same files hashes nothing and records the same hashes; a file replaced by another delta is
    hashed again, to what a merge without the memo records, and the other input is not."""
    import importlib
    from dataclasses import replace

    from mergekit_cd import fileio
    from mergekit_cd.delta import LayerDelta

    merge_module = importlib.import_module("mergekit_cd.merge")  # the package's merge is the function
    monkeypatch.setattr(fileio, "RACY_NANOSECONDS", 0)  # the files were just written
    paths = [save(delta, tmp_path / f"{index}.safetensors", base=base) for index, delta in enumerate(two)]
    hashed = []
    real = merge_module._layer_digest
    monkeypatch.setattr(merge_module, "_layer_digest", lambda name, parts: hashed.append(name) or real(name, parts))

    def recorded(cache: str, **kwargs) -> list[str]:
        merged = merge(paths, captions(), base=base, cache_dir=tmp_path / cache, **kwargs)
        return [entry["content_sha256"] for entry in merged.metadata["recipe"]["inputs"]]

    first = recorded("cache")
    layers = len(base.layer_names())
    assert len(hashed) == 2 * layers
    hashed.clear()
    assert recorded("cache") == first and hashed == []

    layer = base.layer_names()[1]
    key = two[0].layers[layer].key
    moved = replace(two[0], layers={**two[0].layers, layer: LayerDelta(key + 1e-3, two[0].layers[layer].value)})
    save(moved, paths[0], base=base, force=True)
    again = recorded("cache")
    assert len(hashed) == layers and again[1] == first[1] and again[0] != first[0]
    assert recorded("fresh cache") == again


def test_a_repeated_merge_remembers_the_base_fingerprint_by_its_file_stat(tiny_pipeline_path, two, tmp_path,
                                                                        monkeypatch):
    """The base's K/V fingerprint reads every K/V tensor (1.4 GB for SDXL), which the merge then
    reads again; its layer digests are remembered in the cache folder by the weights file's stat,
    so a repeated merge reads the K/V once. The same fingerprint as without the memo; a rewritten
    file is read again, to the fingerprint of what it now holds."""
    import importlib
    import shutil

    from safetensors.torch import load_file, save_file

    from mergekit_cd import fileio
    from mergekit_cd.base import kv_fingerprint, open_base

    base_module = importlib.import_module("mergekit_cd.base")
    monkeypatch.setattr(fileio, "RACY_NANOSECONDS", 0)  # the files were just written
    folder = tmp_path / "base"
    shutil.copytree(tiny_pipeline_path("sd1"), folder)
    expected = kv_fingerprint((layer, *open_base(folder).kv(layer)) for layer in open_base(folder).layer_names())
    digested = []
    real = base_module._layer_fingerprint
    monkeypatch.setattr(base_module, "_layer_fingerprint", lambda *kv: digested.append(1) or real(*kv))

    layers = len(open_base(folder).layer_names())
    for reads in (layers, 0):  # the first merge digests every layer, the second none
        digested.clear()
        merged = merge(two, captions(), base=folder, cache_dir=tmp_path / "cache")
        assert merged.base_fingerprint == expected and len(digested) == reads

    stale = open_base(folder)  # has read its first layer before the file is rewritten (kv keeps it)
    first = stale.layer_names()[0]
    stale.kv(first)
    weights_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_file)
    weights[first + ".to_k.weight"] = weights[first + ".to_k.weight"] + 1e-2
    save_file(weights, weights_file)
    digested.clear()
    changed = open_base(folder)
    stale.remember_in(tmp_path / "cache")
    assert stale.fingerprint == changed.fingerprint  # of the file as rewritten, and remembered so
    digested.clear()
    changed = open_base(folder)
    changed.remember_in(tmp_path / "cache")
    assert changed.fingerprint != expected and digested == []
    assert changed.fingerprint == kv_fingerprint((layer, *changed.kv(layer)) for layer in changed.layer_names())


def test_the_base_held_out_outputs_are_computed_once_and_cached_beside_their_gram_matrix(base, two, tmp_path):
    """The drift's denominator, ||W0 C_h^T||^2 over the base's layers, is stored on a first merge
    and read back by the next (the same report); the stored value is that sum, and a damaged file
    is recomputed to it."""
    from mergekit_cd.captions import heldout_captions
    from mergekit_cd.feature_cache import cached_gram
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    _, first = merge(two, captions(), base=base, cache_dir=cache, return_report=True, sum_drift=True)
    [file] = cache.glob("base-outputs-*.safetensors")
    held_gram = cached_gram(base, heldout_captions(), cache_dir=cache)[0]
    expected = sum(float(((W0 @ held_gram) * W0).sum()) for W0 in
                   (torch.cat(base.kv(name)).double() for name in base.layer_names()))
    assert load_file(file)["squared_norm"].item() == pytest.approx(expected, rel=1e-12)
    _, second = merge(two, captions(), base=base, cache_dir=cache, return_report=True, sum_drift=True)
    assert (second.drift, second.sum_drift) == (first.drift, first.sum_drift)
    file.write_bytes(b"damaged")
    _, third = merge(two, captions(), base=base, cache_dir=cache, return_report=True, sum_drift=True)
    assert (third.drift, third.sum_drift) == (first.drift, first.sum_drift)
    assert load_file(file)["squared_norm"].item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds mapped files in /proc/self/maps")
def test_libc_is_looked_up_once_however_many_pickles_are_mapped(base, two, tmp_path, monkeypatch):
    """Handing a mapped pickle's pages back needs libc's madvise: libc is loaded once a process, not
    once per mapped input, and without ctypes' find_library, which forks ldconfig (100 forks
    planning 100 authors' files, before)."""
    import ctypes
    import ctypes.util

    from mergekit_cd import fileio

    loads, found = [], []
    real = ctypes.CDLL
    monkeypatch.setattr(ctypes, "CDLL", lambda name, **kwargs: loads.append(name) or real(name, **kwargs))
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: found.append(name))
    fileio._libc.cache_clear()
    fileio._libc_madvise.cache_clear()
    paths = [str(save(delta, tmp_path / f"{index}.bin", base=base)) for index, delta in enumerate(two)]
    plan_merge(paths, captions(), base=base)
    assert fileio._libc_madvise() is not None
    assert loads == [None] and found == []


def test_each_input_is_parsed_once_to_plan_and_each_layer_read_once_to_merge(base, tmp_path, monkeypatch):
    """Planning (resolve, detect, validate, compare, class words) unpickles an authors' .bin or a
    CompVis .ckpt once, and opens a safetensors file once; the merge then reads each layer of each
    input from what was opened (streaming), the recipe's content hash included. Before, a .bin was
    unpickled 5 times to plan and again for every layer read."""
    import safetensors

    from mergekit_cd import fileio
    from mergekit_cd.merge import prepare_merge_to_file

    deltas = [random_concept_delta(base, f"<new{i + 1}>", word, seed=i) for i, word in enumerate(
        ["cat", "dog", "pot", "car"])]
    inputs = [save(deltas[0], tmp_path / "cat.bin", base=base), save(deltas[1], tmp_path / "dog.ckpt", base=base),
              save(deltas[2], tmp_path / "pot.safetensors"), save(deltas[3], tmp_path / "car", base=base)]
    files = [*inputs[:3], inputs[3] / "pytorch_custom_diffusion_weights.safetensors", inputs[3] / "<new4>.safetensors"]
    opened: dict[str, int] = {}
    real_load, real_open = torch.load, safetensors.safe_open

    def counted(real):
        def call(path, *args, **kwargs):
            opened[str(path)] = opened.get(str(path), 0) + 1
            return real(path, *args, **kwargs)
        return call

    monkeypatch.setattr(torch, "load", counted(real_load))
    monkeypatch.setattr(fileio, "safe_open", counted(real_open))
    job = prepare_merge_to_file([str(path) for path in inputs], tmp_path / "merged.safetensors", captions(), base=base)
    assert job.plan.formats == ("authors-bin", "compvis", "native", "diffusers")
    assert {name: opened.get(str(name), 0) for name in files} == {name: 1 for name in files}
    opened.clear()
    job.run()
    layers = len(base.layer_names())
    # what was parsed to plan serves every layer read: no file is opened again
    assert {name: opened.get(str(name), 0) for name in files} == {name: 0 for name in files}
    assert layers > 1


class FileTensor(torch.Tensor):
    """A tensor of a memory-mapped pickle that counts the bytes of it that are read, into ``reads``
    under the name of the file entry it was loaded as (views of it count under that name too): an
    operation reads every byte of the views it is given when it returns a tensor of other memory (a
    sum, a copy, a comparison) or data as Python values; shapes, dtypes, storages and views read
    nothing."""

    entry: str
    reads: dict[str, int]
    _VALUES = {"item", "tolist", "numpy", "equal", "allclose", "__bool__", "__float__", "__int__", "__index__"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_flatten, tree_map

        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **(kwargs or {}))
            mapped = [value for value in tree_flatten((args, kwargs))[0] if isinstance(value, FileTensor)]

            def viewed(tensor: torch.Tensor) -> FileTensor | None:
                """The mapped input whose memory ``tensor`` is, if any."""
                pointer = tensor.untyped_storage().data_ptr()
                return next((value for value in mapped if value.untyped_storage().data_ptr() == pointer), None)

            outputs = [value for value in tree_flatten(result)[0] if isinstance(value, torch.Tensor)]
            if any(viewed(tensor) is None for tensor in outputs) or getattr(func, "__name__", "") in cls._VALUES:
                for value in mapped:
                    value.reads[value.entry] = value.reads.get(value.entry, 0) + value.numel() * value.element_size()
            return tree_map(lambda value: file_tensor(value, viewed(value).entry, viewed(value).reads)
                            if isinstance(value, torch.Tensor) and viewed(value) is not None else value, result)


def file_tensor(tensor: torch.Tensor, entry: str, reads: dict[str, int]) -> FileTensor:
    """``tensor`` (its memory, not a copy) as a :class:`FileTensor` counting into ``reads[entry]``."""
    with torch._C.DisableTorchFunctionSubclass():
        view = tensor.as_subclass(FileTensor)
    view.entry, view.reads = entry, reads
    return view


def _counting(contents, name: str, reads: dict[str, int], sizes: dict[str, int]):
    """A loaded pickle's contents, each tensor a :class:`FileTensor` named by its place in the file."""
    if isinstance(contents, torch.Tensor):
        sizes[name] = contents.numel() * contents.element_size()
        return file_tensor(contents, name, reads)
    if isinstance(contents, dict):
        return {key: _counting(value, f"{name}[{key!r}]", reads, sizes) for key, value in contents.items()}
    if isinstance(contents, (list, tuple)):
        return type(contents)(_counting(value, f"{name}[{index}]", reads, sizes)
                              for index, value in enumerate(contents))
    return contents


def counted_reads(path, monkeypatch) -> torch.Tensor:
    """How many times each byte of the file ``path`` is read through mergekit-cd's file reads
    (``fileio``'s ``open``: a safetensors file's header and tensors), counted from now on."""
    import builtins

    from mergekit_cd import fileio

    counts = torch.zeros(Path(path).stat().st_size, dtype=torch.int32)

    class CountedFile:
        def __init__(self, file):
            self.file = file

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def seek(self, *args):
            return self.file.seek(*args)

        def read(self, size=-1):
            start = self.file.tell()
            data = self.file.read(size)
            counts[start:start + len(data)] += 1
            return data

        def readinto(self, buffer):
            start = self.file.tell()
            count = self.file.readinto(buffer)
            counts[start:start + count] += 1
            return count

    def counted_open(file, *args, **kwargs):
        opened = builtins.open(file, *args, **kwargs)
        return CountedFile(opened) if str(file) == str(path) else opened

    monkeypatch.setattr(fileio, "open", counted_open, raising=False)
    return counts


def test_a_merge_reads_every_tensor_byte_of_its_inputs_once(base, tmp_path, monkeypatch):
    """Three inputs as their tools write them: a native .safetensors, diffusers' --no_safe_serialization
    folder (grad-requiring weights, a token .bin viewing the whole embedding table) and the authors'
    delta.bin. Planning and merging them (validation, the solve and the recipe's content hash) parse
    each file once (one safe_open, one torch.load) and read each tensor byte once: every byte of the
    safetensors file (its header too) through mergekit-cd's own reads, every byte of every pickled
    tensor through its mapping. Before, every layer was read twice: validated when planned, read
    again when merged."""
    import safetensors

    from mergekit_cd import fileio
    from mergekit_cd.merge import prepare_merge_to_file
    from mergekit_cd.testing import save_like_authors_bin, save_like_diffusers_bin
    from mergekit_cd.weights import FineTunedWeights

    # each token <new1>, as every tool names its first: the plan compares the inputs' tokens, and renames them
    deltas = [random_concept_delta(base, "<new1>", word, seed=i) for i, word in enumerate(["cat", "dog", "pot"])]
    native = save(deltas[0], tmp_path / "cat.safetensors")
    folder = save_like_diffusers_bin(FineTunedWeights.from_delta(deltas[1], base.kv), tmp_path / "dog")
    authors = save_like_authors_bin(FineTunedWeights.from_delta(deltas[2], base.kv), tmp_path / "pot" / "delta.bin")
    pickles = [folder / "pytorch_custom_diffusion_weights.bin", folder / "<new1>.bin", authors]
    inputs = [str(path) for path in [native, *pickles]]
    parsed: dict[str, int] = {}
    reads: dict[str, int] = {}
    sizes: dict[str, int] = {}
    real_load, real_safe_open = torch.load, safetensors.safe_open

    def load(path, *args, **kwargs):
        parsed[str(path)] = parsed.get(str(path), 0) + 1
        contents = real_load(path, *args, **kwargs)
        return _counting(contents, str(path), reads, sizes) if str(path) in inputs else contents

    def safe_open(path, *args, **kwargs):
        parsed[str(path)] = parsed.get(str(path), 0) + 1
        return real_safe_open(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    monkeypatch.setattr(fileio, "safe_open", safe_open)
    read_bytes = counted_reads(native, monkeypatch)
    job = prepare_merge_to_file([str(native), str(folder), str(authors)], tmp_path / "merged.safetensors", captions(),
                                base=base, class_words=["cat", "dog", "pot"])
    job.run()
    assert (tmp_path / "merged.safetensors").is_file()
    assert {path: parsed.get(path, 0) for path in inputs} == {path: 1 for path in inputs}
    assert read_bytes.min() == read_bytes.max() == 1, f"native file bytes read {read_bytes.unique().tolist()} times"
    assert len(sizes) == 2 * 2 * len(base.layer_names()) + 2  # K and V of each layer of two pickles, two tokens
    assert reads == sizes


def _poisoned(tensors: dict, keys: list[str]) -> str:
    """Write NaN into the last to_v entry of ``tensors`` (keys in file order); its key."""
    key = [key for key in keys if ".to_v" in key][-1]
    tensors[key][0, 0] = float("nan")
    return key


@pytest.mark.parametrize("layout", ["native", "diffusers", "authors-bin", "compvis"])
def test_a_non_finite_layer_is_found_while_merging_and_nothing_is_written(base, two, tmp_path, layout):
    """Planning checks the inputs' layers from their headers and pickled records; their values are
    checked as the merge reads them, once. A NaN in an input's last layer is then one error naming
    the file and key, and neither the output nor a partial one is left."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from mergekit_cd.merge import prepare_merge_to_file

    name = {"native": "pot.safetensors", "diffusers": "pot", "authors-bin": "pot.bin", "compvis": "pot.ckpt"}[layout]
    path = save(two[1], tmp_path / name, base=base)
    if layout in ("native", "diffusers"):
        file = path / "pytorch_custom_diffusion_weights.safetensors" if layout == "diffusers" else path
        with safe_open(str(file), "pt") as handle:
            header, keys = handle.metadata(), list(handle.keys())
        tensors = load_file(file)
        key = _poisoned(tensors, keys)
        save_file(tensors, file, metadata=header)
    else:
        file = path
        contents = torch.load(file, weights_only=True)
        stored = contents["unet" if layout == "authors-bin" else "state_dict"]
        key = _poisoned(stored, list(stored))
        torch.save(contents, file)
    first = save(two[0], tmp_path / "cat.safetensors")
    output = tmp_path / "merged.safetensors"
    job = prepare_merge_to_file([str(first), str(path)], output, captions(), base=base)
    with pytest.raises(MergeError) as error:
        job.run()
    assert str(error.value) == f"{file}: {key} holds NaN or infinite values."
    assert sorted(entry.name for entry in tmp_path.iterdir()) == sorted(["cat.safetensors", name])


def test_a_merge_grown_from_a_merged_file_reads_its_statistics_once(base, two, tmp_path, monkeypatch):
    """A merged input's layers and its statistics' per-layer changes are checked as the merge reads
    them too: every byte of the merged file is read once (its Gram matrix and features when planned)."""
    from mergekit_cd.merge import prepare_merge_to_file

    merged = tmp_path / "merged.safetensors"
    prepare_merge_to_file([two[0]], merged, captions(), base=base).run()
    assert load(merged).statistics is not None
    third = save(random_concept_delta(base, "<new3>", "dog", seed=3), tmp_path / "dog.safetensors")
    read_bytes = counted_reads(merged, monkeypatch)
    prepare_merge_to_file([str(merged), str(third)], tmp_path / "grown.safetensors", captions(), base=base).run()
    assert read_bytes.min() == read_bytes.max() == 1, f"merged file bytes read {read_bytes.unique().tolist()} times"


def test_the_text_phase_hands_its_free_heap_back_before_the_kv_pass(monkeypatch):
    """glibc keeps the free pages the text encoders' activations leave inside its heaps; the merge
    hands them back (``malloc_trim(0)``) before the K/V pass, which lowered the SDXL 10-concept
    cold merge's peak from 2.80 to 2.32 GiB (README); where libc has no malloc_trim, nothing fails."""
    import importlib

    from mergekit_cd import fileio

    merge_module = importlib.import_module("mergekit_cd.merge")  # the package's `merge` is the function
    calls = []

    class Glibc:
        def malloc_trim(self, pad: int) -> int:
            calls.append(pad)
            return 1

    monkeypatch.setattr(merge_module.sys, "platform", "linux")
    monkeypatch.setattr(fileio, "_libc", lambda: Glibc())
    merge_module._release_memory(torch.device("cpu"))
    assert calls == [0]
    monkeypatch.setattr(fileio, "_libc", lambda: object())  # another libc: no such function
    merge_module._release_memory(torch.device("cpu"))
    assert calls == [0]
