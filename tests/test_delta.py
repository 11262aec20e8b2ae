"""Concept deltas: algebra laws, compression bounds, token collisions and compatibility errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from mergekit_cd import (
    Concept,
    ConceptDelta,
    LayerDelta,
    LowRank,
    MergeError,
    average_deltas,
    compress,
    interpolate,
    sum_deltas,
)
from mergekit_cd.errors import TokenRenameWarning

LAYERS = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2": 8,
          "mid_block.attentions.0.transformer_blocks.0.attn2": 12}


def make_delta(seed: int, *, context: int = 6, token: str = "<new1>", dtype=torch.float32,
               fingerprint: str | None = "f" * 64, encoders: int = 1, architecture: str = "sd1") -> ConceptDelta:
    g = torch.Generator().manual_seed(seed)
    layers = {name: LayerDelta(torch.randn(out, context, generator=g, dtype=dtype),
                               torch.randn(out, context, generator=g, dtype=dtype))
              for name, out in LAYERS.items()}
    embedding = tuple(torch.randn(4 + i, generator=g) for i in range(encoders))
    return ConceptDelta(layers, {token: embedding}, base="tiny-base", base_fingerprint=fingerprint,
                        architecture=architecture,
                        concepts=(Concept(token, "cat", (f"photo of a {token} cat",)),))


seeds = st.integers(0, 2**31 - 1)


@given(seeds, seeds)
def test_adding_then_subtracting_a_delta_gives_it_back(a_seed, b_seed):
    """(a + b) - b == a: differences and tokens alike, even when token names collide."""
    assume(a_seed != b_seed + 1)  # b == a would be one token, not a collision
    a, b = make_delta(a_seed), make_delta(b_seed + 1)
    with pytest.warns(TokenRenameWarning):
        both = a + b
    back = both - b
    assert back.allclose(a, rtol=1e-5, atol=1e-5)
    assert list(back.tokens) == ["<new1>"] and back.concepts == a.concepts


@given(seeds, st.floats(-4, 4, allow_nan=False))
def test_scaling_laws(seed, k):
    a = make_delta(seed)
    for name in LAYERS:
        assert torch.equal((k * a).layers[name].key, k * a.layers[name].key)
        assert torch.equal((-a).layers[name].value, -a.layers[name].value)
    difference = a * 2.0 - a
    assert (difference + make_delta(seed)).allclose(a * 2.0, rtol=1e-6, atol=1e-6)
    assert difference.tokens == {}  # subtracting a removes a's concept, token included
    if abs(k) > 1e-3:  # float32 differences: avoid underflow
        assert ((a * k) / k).allclose(a, rtol=1e-5, atol=1e-6)
    assert list((k * a).tokens) == list(a.tokens)


@given(seeds, seeds, st.floats(0, 1))
def test_interpolation_hits_its_endpoints_and_is_linear(a_seed, b_seed, t):
    a, b = make_delta(a_seed, token="<a>"), make_delta(b_seed, token="<b>")
    assert interpolate(a, b, 0.0).dense().layers.keys() == a.layers.keys()
    for name in LAYERS:
        mid = interpolate(a, b, t).layers[name].key
        expected = (1 - t) * a.layers[name].key + t * b.layers[name].key
        assert torch.allclose(mid, expected, atol=1e-5)
        assert torch.allclose(interpolate(a, b, 1.0).layers[name].value, b.layers[name].value)
    assert set(interpolate(a, b, t).tokens) == {"<a>", "<b>"}


def test_naive_sum_and_average_baselines():
    deltas = [make_delta(i, token=f"<new{i}>") for i in (1, 2, 3)]
    total = sum_deltas(deltas)
    assert total.allclose(deltas[0] + deltas[1] + deltas[2])
    assert sum(deltas).allclose(total)  # builtin sum starts from 0
    mean = average_deltas(deltas)
    assert mean.allclose(total / 3, rtol=1e-6, atol=1e-6)
    assert list(mean.tokens) == ["<new1>", "<new2>", "<new3>"]
    assert sum_deltas(deltas[:1]).allclose(deltas[0], rtol=0, atol=0)


def test_token_collisions_are_renamed_and_the_mapping_reported():
    a, b, c = make_delta(1), make_delta(2), make_delta(3)
    with pytest.warns(TokenRenameWarning, match=r"<new1> of operand 1 -> <new2>, <new1> of operand 2 -> <new3>"):
        merged = sum_deltas([a, b, c])
    assert [(r.operand, r.old, r.new) for r in merged.token_renames] == [(1, "<new1>", "<new2>"),
                                                                         (2, "<new1>", "<new3>")]
    assert torch.equal(merged.tokens["<new2>"][0], b.tokens["<new1>"][0])
    assert merged.concept_for("<new3>").prompts == ("photo of a <new3> cat",)


def test_the_same_token_in_two_operands_is_kept_once():
    a = make_delta(1)
    b = make_delta(2)
    b.tokens = dict(a.tokens)  # e.g. two deltas trained from one shared embedding
    merged = a + b
    assert list(merged.tokens) == ["<new1>"] and merged.token_renames == ()


def test_sdxl_tokens_keep_one_embedding_per_text_encoder():
    a = make_delta(1, encoders=2, token="<a>")
    b = make_delta(2, encoders=2, token="<b>")
    merged = a + b
    assert [e.shape[0] for e in merged.tokens["<a>"]] == [4, 5]


def test_deltas_for_different_bases_do_not_combine():
    a = make_delta(1)
    b = make_delta(2, fingerprint="0" * 64)
    with pytest.raises(MergeError, match=r"different base models: operand 0 \(tiny-base, fingerprint ffffffffffff\) "
                                         r"and operand 1 \(tiny-base, fingerprint 000000000000\)"):
        a + b


def test_deltas_whose_bases_cannot_be_matched_do_not_combine():
    a = make_delta(1, fingerprint=None)
    b = make_delta(2, fingerprint=None)
    b.base = "another-base"
    with pytest.raises(MergeError, match="base names differ and no fingerprint is recorded"):
        a + b
    unrecorded = make_delta(4, fingerprint=None)
    unrecorded.base = None
    with pytest.raises(MergeError, match=r"different base models: operand 1 .* and operand 2"):
        sum_deltas([unrecorded, make_delta(5), make_delta(6, fingerprint="0" * 64)])
    same_name = make_delta(3, fingerprint=None)
    assert (a + same_name).base == "tiny-base"


def test_deltas_with_clashing_shapes_or_layers_do_not_combine():
    with pytest.raises(MergeError, match=r"Layer down_blocks.0.attentions.0.transformer_blocks.0.attn2 key has "
                                         r"shape \(8, 6\) in operand 0 but \(8, 10\) in operand 1"):
        make_delta(1) + make_delta(2, context=10)
    wide_value = make_delta(2)
    name = next(iter(LAYERS))
    wide_value.layers[name] = LayerDelta(wide_value.layers[name].key, torch.zeros(9, 6))
    with pytest.raises(MergeError, match=rf"Layer {name} value has shape \(8, 6\) in operand 0 but \(9, 6\)"):
        make_delta(1) + wide_value
    partial = make_delta(3)
    partial.layers.pop("mid_block.attentions.0.transformer_blocks.0.attn2")
    with pytest.raises(MergeError, match="cover different layers, e.g. mid_block"):
        make_delta(1) - partial
    other = make_delta(4, architecture="sdxl")
    with pytest.raises(MergeError, match="different architectures: operand 0 is sd1, operand 1 is sdxl"):
        sum_deltas([make_delta(1), other])


def test_malformed_deltas_are_refused_at_construction():
    with pytest.raises(MergeError, match="expected a 2-D weight difference"):
        ConceptDelta({"x": LayerDelta(torch.zeros(3), torch.zeros(3, 2))})
    with pytest.raises(MergeError, match="reads 3 features but other layers read 2"):
        ConceptDelta({"x": LayerDelta(torch.zeros(3, 2), torch.zeros(3, 2)),
                      "y": LayerDelta(torch.zeros(3, 3), torch.zeros(3, 3))})
    with pytest.raises(MergeError, match=r"Token <b> has embedding shapes \(\(5,\),\), others have \(\(4,\),\)"):
        ConceptDelta({}, {"<a>": torch.zeros(4), "<b>": torch.zeros(5)})


@st.composite
def low_rank_plus_noise(draw):
    rows, cols = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    rank = draw(st.integers(0, min(rows, cols)))
    g = torch.Generator().manual_seed(draw(seeds))
    noise = 10.0 ** draw(st.integers(-6, 0))
    m = torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g)
    return m + noise * torch.randn(rows, cols, generator=g)


@given(low_rank_plus_noise(), low_rank_plus_noise(), st.sampled_from([1e-4, 0.01, 0.1, 0.5]),
       st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]), st.booleans())
def test_compression_error_stays_within_its_bound_and_is_reported_exactly(key, value, rtol, dtype, fallback):
    """Each matrix is stored as the fewest factors that meet the bound or, when those would take
    more bytes than the matrix (and ``dense_fallback``), as the matrix itself, exactly."""
    key = key.to(dtype)
    value = (value[:, : key.shape[1]] if value.shape[1] >= key.shape[1] else key.clone()).to(dtype)
    delta = ConceptDelta({"layer": LayerDelta(key, value)})
    compressed, report = compress(delta, rtol=rtol, dense_fallback=fallback)
    layer, original = compressed.layers["layer"], delta.layers["layer"]
    lost, norms = [], []
    for which, projection in (("key", "to_k"), ("value", "to_v")):
        stored, full = getattr(layer, which), getattr(original, which)
        norms.append(float(full.double().norm()))
        nbytes = full.numel() * full.element_size()
        rank = report.ranks["layer"][0 if which == "key" else 1]
        factor_bytes = rank * sum(full.shape) * max(full.element_size(), 4)
        if isinstance(stored, LowRank):
            assert stored.shape == full.shape and stored.rank == rank
            assert not fallback or factor_bytes <= nbytes
            assert f"layer.{projection}" not in report.kept_dense
            lost.append(float((stored.dense().double() - full.double()).norm()))
            if rank:  # minimal: one rank fewer would break the bound
                S = torch.linalg.svdvals(full.double())
                assert float(S[rank - 1:].square().sum().sqrt()) > rtol * norms[-1] * (1 - 1e-6)
        else:
            assert fallback and factor_bytes > nbytes and f"layer.{projection}" in report.kept_dense
            assert torch.equal(stored, full)
            lost.append(0.0)
        assert lost[-1] <= rtol * norms[-1] * (1 + 1e-9)
    overall = (sum(x * x for x in lost) / max(sum(n * n for n in norms), 1e-300)) ** 0.5
    assert report.relative_error <= rtol * (1 + 1e-9)
    assert report.relative_error == pytest.approx(overall, rel=1e-9, abs=1e-12)


def test_a_full_rank_difference_is_kept_dense_rather_than_grown():
    """Factors of a full-rank 8 x 6 matrix hold 6 * (8 + 6) = 84 numbers, the matrix 48."""
    delta = make_delta(1)
    compressed, report = compress(delta, rtol=1e-6)
    assert compressed.num_parameters() == delta.num_parameters() == report.parameters_after
    assert len(report.kept_dense) == 2 * len(LAYERS) and report.relative_error == 0
    assert compressed.allclose(delta, rtol=0, atol=0)
    factored, forced = compress(delta, rtol=1e-6, dense_fallback=False)
    assert forced.kept_dense == () and forced.parameters_after > forced.parameters_before
    assert all(isinstance(layer.key, LowRank) for layer in factored.layers.values())


def test_compressed_deltas_scale_without_densifying_and_add_densely():
    a, _ = compress(make_delta(1), rtol=0.5)
    scaled = 3.0 * a
    name = next(iter(LAYERS))
    assert isinstance(scaled.layers[name].key, LowRank)
    assert torch.allclose(scaled.layers[name].key.dense(), 3.0 * a.layers[name].key.dense(), atol=1e-5)
    total = a + make_delta(2, token="<b>")
    assert isinstance(total.layers[name].key, torch.Tensor)
    assert a.num_parameters() < make_delta(1).num_parameters()


def test_compress_rejects_a_meaningless_tolerance():
    with pytest.raises(MergeError, match=r"rtol must be in \[0, 1\)"):
        compress(make_delta(1), rtol=1.5)


def test_a_zero_dim_tensor_scales_like_the_number_it_holds():
    a = make_delta(1)
    name = next(iter(LAYERS))
    for scale in (torch.tensor(2.5), torch.tensor(2.5, dtype=torch.float64), torch.tensor(3)):
        for scaled in (scale * a, a * scale):
            assert torch.equal(scaled.layers[name].key, float(scale) * a.layers[name].key)
    assert torch.equal((a / torch.tensor(4.0)).layers[name].value, (a / 4.0).layers[name].value)
    for not_a_scale in (torch.tensor([2.0]), torch.tensor(True), True):
        with pytest.raises(TypeError):
            not_a_scale * a
