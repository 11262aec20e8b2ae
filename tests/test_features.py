"""Tests for mergekit_cd.features: token features as cross-attention reads them, the authors'
row rule, batching, the Gram matrix and its cache, modifier tokens, prompts and captions."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mergekit_cd import features as features_module
from mergekit_cd.base import BaseModel, open_base
from mergekit_cd.captions import default_reg_captions, heldout_captions, read_captions
from mergekit_cd.errors import MergeError
from mergekit_cd.feature_cache import (
    cached_features,
    cached_gram,
    default_cache_dir,
    features_cache_key,
    gram_cache_key,
)
from mergekit_cd.features import ROW_RULES, TextFeatures, TextSet, kept_rows, row_rule
from mergekit_cd.prompts import OBJECT_TEMPLATES, target_prompts
from mergekit_cd.testing import build_tiny_pipeline
from mergekit_cd.tokens import install

CAPTIONS = [
    "photo of a cat",
    "a photo of a cat",
    "cat photo",
    "a dog in the garden",
    "a cat in the garden",  # same token count as the caption before: shares its batch
    "a very nice photo of a cat",
    "Photo of a red car",
    "a man",
]


@pytest.fixture(scope="module")
def sd1_base(tiny_pipeline_path) -> BaseModel:
    return open_base(tiny_pipeline_path("sd1"))


@pytest.fixture(scope="module")
def sdxl_base(tiny_pipeline_path) -> BaseModel:
    return open_base(tiny_pipeline_path("sdxl"))


@pytest.fixture(scope="module")
def sd1_features(sd1_base) -> TextFeatures:
    return TextFeatures(sd1_base)


@pytest.fixture(scope="module")
def sdxl_features(sdxl_base) -> TextFeatures:
    return TextFeatures(sdxl_base)


def _ids(tokenizer, caption: str) -> torch.Tensor:
    return torch.tensor([tokenizer(caption).input_ids])


# --- the row rule ------------------------------------------------------------------------------

@pytest.mark.parametrize("caption, start", [
    ("photo of a cat", 4),
    ("a photo of a cat", 4),  # "photo of a" within the first 15 characters: the authors' test
    ("A photo of a cat", 4),
    ("cat photo", 1),
    ("a very nice photo of a cat", 1),  # the phrase starts at character 12: not within 15
    ("Photo of a cat", 1),  # their test is case-sensitive
])
def test_kept_rows_follow_the_authors_rule(caption, start):
    assert kept_rows(caption, 9) == slice(start, 9)  # stop = number of tokens: EOS is kept
    assert ROW_RULES["authors"].name == "authors-v1"
    assert ROW_RULES["authors"].rows(caption, 9) == slice(start, 9)
    assert ROW_RULES["authors"].token_rows(caption, 9) == slice(0, 9 - start)  # all of its rows
    assert ROW_RULES["pipeline"].rows(caption, 9) == slice(0, None)  # every row, BOS and padding too
    assert ROW_RULES["pipeline"].token_rows(caption, 9) == slice(start, 9)


def test_an_unknown_row_rule_names_the_choices():
    with pytest.raises(MergeError, match="Unknown row rule 'all'; choose one of authors, pipeline"):
        row_rule("all")


def test_rows_kept_through_the_encoder(sd1_features):
    tokenizer, encoder = sd1_features.tokenizers[0], sd1_features.encoder(0)
    for caption, dropped in (("photo of a cat", 4), ("a photo of a cat", 4), ("cat photo", 1)):
        ids = _ids(tokenizer, caption)
        with torch.no_grad():
            states = encoder(ids).last_hidden_state[0]
        rows = sd1_features.features([caption])[0]
        assert rows.shape[0] == ids.shape[1] - dropped
        assert torch.equal(rows[-1], states[-1])  # the EOS row


# --- features equal hand-computed encoder outputs ----------------------------------------------

def test_sd1_features_are_the_last_hidden_state(sd1_features):
    pipe = build_tiny_pipeline("sd1")  # same seed as the saved folder: same weights
    caption = "a cat in the garden"
    with torch.no_grad():
        states = pipe.text_encoder(_ids(pipe.tokenizer, caption))[0][0]
    ours = sd1_features.features([caption])[0]
    assert ours.shape == (states.shape[0] - 1, 64)  # BOS dropped, EOS kept
    torch.testing.assert_close(ours, states[1:], rtol=0, atol=0)


def test_sdxl_features_concatenate_penultimate_states(sdxl_features):
    pipe = build_tiny_pipeline("sdxl")
    caption = "photo of a cat"
    with torch.no_grad():
        first = pipe.text_encoder(_ids(pipe.tokenizer, caption), output_hidden_states=True).hidden_states[-2]
        second = pipe.text_encoder_2(_ids(pipe.tokenizer_2, caption),
                                     output_hidden_states=True).hidden_states[-2]
    expected = torch.cat([first, second], dim=-1)[0, 4:]  # BOS + "photo of a" dropped
    ours = sdxl_features.features([caption])[0]
    assert ours.shape == (2, 160)  # "cat" and EOS
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


@pytest.mark.parametrize("architecture", ["sd1", "sdxl"])
def test_features_are_the_pipeline_context(architecture, sd1_features, sdxl_features):
    """diffusers' own encode_prompt pads to 77 tokens; CLIP is causal, so its first rows are ours."""
    pipe = build_tiny_pipeline(architecture)
    encoder = {"sd1": sd1_features, "sdxl": sdxl_features}[architecture]
    caption = "a cat in the garden"
    with torch.no_grad():
        context = pipe.encode_prompt(caption, device="cpu", num_images_per_prompt=1,
                                     do_classifier_free_guidance=False)[0][0]
    num_tokens = len(pipe.tokenizer(caption).input_ids)
    torch.testing.assert_close(encoder.features([caption])[0], context[1:num_tokens], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("architecture", ["sd1", "sdxl"])
def test_pipeline_rows_are_what_encode_prompt_gives(architecture, sd1_features, sdxl_features):
    """The pipeline rule's rows are diffusers' own prompt_embeds (StableDiffusionPipeline, and
    StableDiffusionXLPipeline's, padded by its second tokenizer with '!'), every row, for prompts
    of different lengths encoded in one batch; their token rows are the authors' rows."""
    pipe = build_tiny_pipeline(architecture)
    encoder = {"sd1": sd1_features, "sdxl": sdxl_features}[architecture]
    captions = ["a cat in the garden", "photo of a cat", "a man"]
    if architecture == "sdxl":
        assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    prompts = encoder.prompt_rows(captions, rule=ROW_RULES["pipeline"], batch_size=2)
    for caption, prompt in zip(captions, prompts):
        with torch.no_grad():
            context = pipe.encode_prompt(caption, device="cpu", num_images_per_prompt=1,
                                         do_classifier_free_guidance=False)[0][0]
        assert prompt.rows.shape == context.shape == (pipe.tokenizer.model_max_length, encoder.base.context_dim)
        torch.testing.assert_close(prompt.rows, context, rtol=1e-4, atol=1e-5)
        authors = encoder.features([caption])[0]
        torch.testing.assert_close(prompt.token_rows, authors, rtol=1e-4, atol=1e-5)
        assert prompt.context_rows.shape[0] == context.shape[0] - authors.shape[0]
        torch.testing.assert_close(prompt.context_rows[0], context[0])  # BOS is a context row


def test_pipeline_gram_counts_every_row_of_every_caption(sd1_features):
    gram, count = sd1_features.gram(CAPTIONS, rule=ROW_RULES["pipeline"], batch_size=3)
    stacked = torch.cat(sd1_features.features(CAPTIONS, rule=ROW_RULES["pipeline"])).double()
    assert count == len(CAPTIONS) * sd1_features.tokenizers[0].model_max_length == stacked.shape[0]
    torch.testing.assert_close(gram, stacked.T @ stacked, rtol=1e-6, atol=1e-6 * float(gram.abs().max()))


# --- batching and the Gram matrix --------------------------------------------------------------

@pytest.mark.parametrize("architecture", ["sd1", "sdxl"])
def test_batched_features_equal_one_by_one_in_input_order(architecture, sd1_features, sdxl_features):
    encoder = {"sd1": sd1_features, "sdxl": sdxl_features}[architecture]
    batched = encoder.features(CAPTIONS, batch_size=2)
    assert len(batched) == len(CAPTIONS)
    for caption, rows in zip(CAPTIONS, batched):
        alone = encoder.features([caption])[0]
        assert rows.dtype == torch.float32
        torch.testing.assert_close(rows, alone, rtol=1e-4, atol=1e-5)


def test_gram_is_the_float64_product_of_stacked_features(sdxl_features):
    gram, count = sdxl_features.gram(CAPTIONS, batch_size=3)
    stacked = torch.cat(sdxl_features.features(CAPTIONS)).double()
    assert gram.dtype == torch.float64 and gram.shape == (160, 160)
    assert count == stacked.shape[0]
    torch.testing.assert_close(gram, stacked.T @ stacked, rtol=1e-6, atol=1e-6 * float(gram.abs().max()))


def test_gram_of_no_captions_is_refused(sd1_features):
    with pytest.raises(MergeError, match="No captions"):
        sd1_features.gram([])
    assert sd1_features.features([]) == []


# --- the Gram cache ----------------------------------------------------------------------------

def test_cached_gram_second_call_never_touches_the_text_encoder(sd1_base, tmp_path, monkeypatch):
    captions = CAPTIONS[:5]
    gram, count, from_cache = cached_gram(sd1_base, captions, cache_dir=tmp_path)
    assert not from_cache
    assert len(list(tmp_path.glob("gram-*.safetensors"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("a cache hit must not load the tokenizer or text encoder")

    monkeypatch.setattr(BaseModel, "load_text_encoder", refuse)
    monkeypatch.setattr(BaseModel, "load_tokenizers", refuse)
    monkeypatch.setattr(features_module, "TextFeatures", refuse)
    again, again_count, from_cache = cached_gram(sd1_base, list(captions), cache_dir=tmp_path)
    assert from_cache and again_count == count
    assert torch.equal(again, gram)


def test_cache_key_depends_on_captions_dtype_and_base(sd1_base, sdxl_base):
    key = gram_cache_key(sd1_base, CAPTIONS, torch.float32)
    assert key == gram_cache_key(sd1_base, list(CAPTIONS), torch.float32)
    assert key != gram_cache_key(sd1_base, CAPTIONS[:-1], torch.float32)
    assert key != gram_cache_key(sd1_base, CAPTIONS, torch.float16)
    assert key != gram_cache_key(sdxl_base, CAPTIONS, torch.float32)
    assert key != gram_cache_key(sd1_base, CAPTIONS, torch.float32, rule=ROW_RULES["pipeline"])
    assert features_cache_key(sd1_base, CAPTIONS, torch.float32) != features_cache_key(
        sd1_base, CAPTIONS, torch.float32, rule=ROW_RULES["pipeline"])


def test_cached_pipeline_features_keep_their_token_rows(sd1_base, tmp_path):
    """A hit gives back each prompt's token rows among its padded rows; a file whose spans are
    missing or out of range is a miss, recomputed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    rule = ROW_RULES["pipeline"]
    prompts = ["<new1> cat", "photo of a <new1> cat"]
    tokens = {"<new1>": (torch.randn(64, generator=torch.Generator().manual_seed(5)),)}
    first, from_cache = cached_features(sd1_base, prompts, rule=rule, tokens=tokens, cache_dir=tmp_path)
    assert not from_cache and [prompt.tokens for prompt in first] == [slice(1, 4), slice(4, 7)]
    again, from_cache = cached_features(sd1_base, prompts, rule=rule, tokens=tokens, cache_dir=tmp_path)
    assert from_cache and [prompt.tokens for prompt in again] == [slice(1, 4), slice(4, 7)]
    assert all(torch.equal(a.rows, b.rows) for a, b in zip(again, first))
    [file] = tmp_path.glob("features-*.safetensors")
    with safe_open(str(file), framework="pt") as handle:
        stored, metadata = {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()
    for spans in ("[[1, 4]]", "[[1, 4], [4, 78]]", "[[1, 4], [5, 4]]", "not json"):
        save_file(stored, str(file), metadata={**metadata, "token_rows": spans})
        assert not cached_features(sd1_base, prompts, rule=rule, tokens=tokens, cache_dir=tmp_path)[1], spans


def test_cache_key_holds_the_tokens_that_occur_in_the_captions(sd1_base):
    generator = torch.Generator().manual_seed(2)
    one, other = (torch.randn(64, generator=generator),), (torch.randn(64, generator=generator),)
    captions = ["a ktn on the sofa", "a dog in the garden"]
    plain = gram_cache_key(sd1_base, captions, torch.float32)
    assert gram_cache_key(sd1_base, captions, torch.float32, {"<new1>": one}) == plain  # not in a caption
    with_one = gram_cache_key(sd1_base, captions, torch.float32, {"ktn": one, "<new1>": other})
    assert with_one not in (plain, gram_cache_key(sd1_base, captions, torch.float32, {"ktn": other}))
    assert gram_cache_key(sd1_base, captions, torch.float32, {"KTN": one}) != plain  # CLIP lower-cases
    assert gram_cache_key(sd1_base, captions, torch.float32, {"ktn": one}) == with_one


def test_damaged_cache_file_is_recomputed(sd1_base, tmp_path):
    gram, count, _ = cached_gram(sd1_base, CAPTIONS[:3], cache_dir=tmp_path)
    [file] = tmp_path.glob("gram-*.safetensors")
    file.write_bytes(b"not a safetensors file")
    again, again_count, from_cache = cached_gram(sd1_base, CAPTIONS[:3], cache_dir=tmp_path)
    assert not from_cache and again_count == count
    torch.testing.assert_close(again, gram)


def _nan_at_corner(gram: torch.Tensor) -> torch.Tensor:
    gram[0, 1] = float("nan")
    return gram


def _asymmetric(gram: torch.Tensor) -> torch.Tensor:
    gram[0, 1] += 1.0
    return gram


@pytest.mark.parametrize("damage", [
    pytest.param(lambda gram, metadata: (_nan_at_corner(gram), metadata), id="one-nan"),
    pytest.param(lambda gram, metadata: (gram.fill_(float("inf")), metadata), id="infinite"),
    pytest.param(lambda gram, metadata: (_asymmetric(gram), metadata), id="asymmetric"),
    pytest.param(lambda gram, metadata: (gram[:-1, :-1].contiguous(), metadata), id="wrong-shape"),
    pytest.param(lambda gram, metadata: (gram.float(), metadata), id="float32"),
    pytest.param(lambda gram, metadata: (-gram, metadata), id="negative-diagonal"),
    pytest.param(lambda gram, metadata: (gram, {**metadata, "rows": "many"}), id="rows-not-a-number"),
    pytest.param(lambda gram, metadata: (gram, {**metadata, "rows": "0"}), id="no-rows"),
    pytest.param(lambda gram, metadata: (gram, {k: v for k, v in metadata.items() if k != "rows"}), id="no-rows-key"),
])
def test_a_cached_gram_that_is_not_a_valid_gram_matrix_is_recomputed(sd1_base, tmp_path, damage):
    """One NaN written into a cache file used to reach the solver (ValueError: G contains NaN)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    gram, count, _ = cached_gram(sd1_base, CAPTIONS[:3], cache_dir=tmp_path)
    [file] = tmp_path.glob("gram-*.safetensors")
    with safe_open(str(file), framework="pt") as handle:
        stored, metadata = handle.get_tensor("gram").clone(), handle.metadata()
    damaged, metadata = damage(stored, metadata)
    save_file({"gram": damaged}, str(file), metadata=metadata)
    again, again_count, from_cache = cached_gram(sd1_base, CAPTIONS[:3], cache_dir=tmp_path)
    assert not from_cache and again_count == count
    torch.testing.assert_close(again, gram)
    assert cached_gram(sd1_base, CAPTIONS[:3], cache_dir=tmp_path)[2]  # rewritten, valid again


@pytest.mark.parametrize("dtype, remedy", [(torch.float32, "weights may be damaged"),
                                           (torch.bfloat16, r"float32 \(--dtype float32\)")], ids=["float32", "bfloat16"])
def test_non_finite_features_name_the_text_encoder_and_dtype(sd1_base, dtype, remedy):
    encoder = TextFeatures(sd1_base, dtype=dtype)
    with torch.no_grad():
        encoder.encoder(0).get_input_embeddings().weight[:] = float("inf")  # the encoder held from now on
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(MergeError, match=rf"text encoder text_encoder of .* NaN or infinite features in "
                                         rf"{name} \(for '.*'\); .*{remedy}"):
        encoder.gram(CAPTIONS[:3])
    with pytest.raises(MergeError, match="NaN or infinite features"):
        encoder.features(CAPTIONS[:1])


def test_cached_features_need_no_text_encoder_on_a_hit_and_key_on_the_tokens(sd1_base, tmp_path, monkeypatch):
    generator = torch.Generator().manual_seed(4)
    tokens = {"<new1>": (torch.randn(64, generator=generator),)}
    prompts = ["<new1> cat", "photo of a <new1> cat", "a dog"]
    rows, from_cache = cached_features(sd1_base, prompts, tokens=tokens, cache_dir=tmp_path)
    assert not from_cache
    expected = TextFeatures(sd1_base, tokens).features(prompts)
    for ours, theirs in zip(rows, expected, strict=True):
        torch.testing.assert_close(ours.rows, theirs)
        assert ours.tokens == slice(0, theirs.shape[0])
    key = features_cache_key(sd1_base, prompts, torch.float32, tokens)
    assert key != features_cache_key(sd1_base, prompts, torch.float32, {"<new1>": (-tokens["<new1>"][0],)})
    assert key != features_cache_key(sd1_base, prompts, torch.bfloat16, tokens)
    assert key != features_cache_key(sd1_base, prompts[:2], torch.float32, tokens)
    [file] = tmp_path.glob("features-*.safetensors")
    pristine = file.read_bytes()
    file.write_bytes(pristine[:-8])  # truncated: recomputed
    assert not cached_features(sd1_base, prompts, tokens=tokens, cache_dir=tmp_path)[1]

    def refuse(*args, **kwargs):
        raise AssertionError("a cache hit must not load the tokenizer or text encoder")

    monkeypatch.setattr(BaseModel, "load_text_encoder", refuse)
    monkeypatch.setattr(BaseModel, "load_tokenizers", refuse)
    again, from_cache = cached_features(sd1_base, list(prompts), tokens=tokens, cache_dir=tmp_path)
    assert from_cache and all(torch.equal(a.rows, b.rows) and a.tokens == b.tokens
                              for a, b in zip(again, rows, strict=True))


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MERGEKIT_CD_CACHE", str(tmp_path / "own"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "own"
    monkeypatch.delenv("MERGEKIT_CD_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "mergekit_cd"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "mergekit_cd"


# --- modifier tokens ---------------------------------------------------------------------------

def test_tokens_change_only_prompts_that_contain_them(sdxl_base, sdxl_features):
    generator = torch.Generator().manual_seed(0)
    embeddings = (torch.randn(64, generator=generator), torch.randn(96, generator=generator))
    with_token = TextFeatures(sdxl_base, {"<new1>": embeddings})
    other = TextFeatures(sdxl_base, {"<new1>": tuple(-e for e in embeddings)})
    plain_captions = ["a cat in the garden", "photo of a dog"]
    for ours, plain in zip(with_token.features(plain_captions), sdxl_features.features(plain_captions)):
        assert torch.equal(ours, plain)
    prompt = "photo of a <new1> cat"
    assert [len(ids) for ids in with_token.token_ids([prompt])[0]] == [7, 7]  # one token, both tokenizers
    changed, flipped = with_token.features([prompt])[0], other.features([prompt])[0]
    assert changed.shape == (3, 160)  # <new1>, cat, EOS
    assert not torch.allclose(changed, flipped)


def test_sdxl_encoders_load_one_at_a_time_and_once_for_every_set(sdxl_base, monkeypatch):
    """encode() runs every set through the first encoder, releases it, then loads the second: each
    loads once, never both at once, and each set's result is what it gives alone (to the bit)."""
    import gc
    import weakref

    generator = torch.Generator().manual_seed(5)
    tokens = {"<new1>": (torch.randn(64, generator=generator), torch.randn(96, generator=generator))}
    sets = [TextSet(("<new1> cat", "photo of a <new1> cat")), TextSet(tuple(CAPTIONS), gram=True),
            TextSet(tuple(CAPTIONS[:3]), gram=True)]
    alone = [TextFeatures(sdxl_base, tokens).encode([text_set], batch_size=2)[0] for text_set in sets]
    loaded, live = [], weakref.WeakSet()
    load = BaseModel.load_text_encoder

    def counted(self, index, *args, **kwargs):
        gc.collect()
        assert not live, "an encoder was still held when the next one loaded"
        loaded.append(index)
        model = load(self, index, *args, **kwargs)
        live.add(model)
        return model

    monkeypatch.setattr(BaseModel, "load_text_encoder", counted)
    encoder = TextFeatures(sdxl_base, tokens)
    together = encoder.encode(sets, batch_size=2)
    assert loaded == [0, 1]
    for prompts, expected in zip(together[0], alone[0], strict=True):
        assert torch.equal(prompts.rows, expected.rows) and prompts.tokens == expected.tokens
    for (gram, count), (expected, expected_count) in zip(together[1:], alone[1:], strict=True):
        assert torch.equal(gram, expected) and count == expected_count
    # a second call (a merge's captions after its prompts) starts with the encoder still held
    (gram, count), = encoder.encode(sets[1:2], batch_size=2)
    assert loaded == [0, 1, 0]
    assert torch.equal(gram, alone[1][0]) and count == alone[1][1]


def _whole_forward(self, index, batches, texts, label=None):
    """Each batch through encoder ``index`` whole, one batch after another: how encode() ran them
    before it ran them a layer at a time."""
    encoder = self.encoder(index)
    with torch.no_grad():
        return [encoder(torch.tensor([ids[index] for ids in batch])).last_hidden_state for batch in batches]


@pytest.mark.parametrize("architecture", ["sd1", "sdxl"])
@pytest.mark.parametrize("rule", ["authors", "pipeline"])
def test_encoding_a_layer_at_a_time_gives_the_whole_forward_to_the_bit(architecture, rule, sd1_base, sdxl_base,
                                                                       monkeypatch):
    """Every batch run through each layer in turn (a layer's weights in memory at a time) gives
    exactly the states of each batch run through the encoder whole: the prompts' rows and the Gram
    matrices are equal to the bit (the same batches, the same operations), with modifier tokens."""
    base = {"sd1": sd1_base, "sdxl": sdxl_base}[architecture]
    generator = torch.Generator().manual_seed(3)
    tokens = {"<new1>": tuple(torch.randn(size, generator=generator) for size in base.token_dims())}
    sets = [TextSet(("<new1> cat", "photo of a <new1> cat", "a <new1> cat in the garden")),
            TextSet(tuple(CAPTIONS), gram=True), TextSet(tuple(CAPTIONS[2:]), gram=True)]

    def encoded() -> list:
        return TextFeatures(base, tokens).encode(sets, rule=ROW_RULES[rule], batch_size=2)

    by_layer = encoded()
    monkeypatch.setattr(TextFeatures, "_encode", _whole_forward)
    whole = encoded()
    for ours, expected in zip(by_layer[0], whole[0], strict=True):
        assert torch.equal(ours.rows, expected.rows) and ours.tokens == expected.tokens
    for (gram, count), (expected, expected_count) in zip(by_layer[1:], whole[1:], strict=True):
        assert torch.equal(gram, expected) and count == expected_count


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mapped pages are found in /proc/self/maps")
def test_each_layer_runs_on_every_batch_and_is_handed_back_before_the_next(sdxl_base, monkeypatch):
    """Within an encoder, each layer runs on every batch of every set, and then the mapped pages of
    its weights, and only its, are handed back, before the next layer runs: one layer's weights
    are in memory at a time. The weights are views of the mapped file, so the pages are there to
    hand back."""
    from mergekit_cd.fileio import MappedPages

    events = []
    release = MappedPages.release

    def recorded(self, tensors):
        tensors = list(tensors)
        events.append(("released", frozenset(tensor.data_ptr() for tensor in tensors)))
        release(self, tensors)

    monkeypatch.setattr(MappedPages, "release", recorded)
    features = TextFeatures(sdxl_base)
    sets = [TextSet(tuple(CAPTIONS)), TextSet(("a man", "two dogs in the snow"), gram=True)]
    batch_count = sum(len(features._batches(text_set.texts, ROW_RULES["authors"], 2)[2]) for text_set in sets)
    for index in (0, 1):
        encoder, mapped = features._encoder(index)
        assert len(mapped) == len(sdxl_base.text_encoder_files(index)) == 1 and mapped[0].ranges
        layers = features_module._encoder_layers(encoder)
        assert all(any(low <= weight.data_ptr() < high for pages in mapped for low, high in pages.ranges)
                   for weight in layers.parameters())
        events.clear()
        hooks = [layer.register_forward_hook(lambda module, args, output, number=number: events.append(("ran", number)))
                 for number, layer in enumerate(layers)]
        features._encode(index, *_every_batch(features, sets, index))
        for hook in hooks:
            hook.remove()
        expected = []
        for number, layer in enumerate(layers):
            expected += [("ran", number)] * batch_count
            expected += [("released", frozenset(weight.data_ptr() for weight in layer.parameters()))] * len(mapped)
        assert events == expected


def _every_batch(features: TextFeatures, sets: list[TextSet], index: int) -> tuple[list, list]:
    """encode()'s arguments to _encode: every batch of every set, its token ids and its texts."""
    batches, texts = [], []
    for text_set in sets:
        ids, _, groups = features._batches(text_set.texts, ROW_RULES["authors"], 2)
        batches += [[ids[i] for i in group] for group in groups]
        texts += [[text_set.texts[i] for i in group] for group in groups]
    return batches, texts


def test_rows_laid_over_the_table_read_as_a_copied_table(sd1_base):
    """install(copy_table=False) looks the table up with the tokens' rows laid over it (AddedRows), the
    table neither copied nor read whole: the encoder gives exactly what the copied table gives."""
    generator = torch.Generator().manual_seed(6)
    rows = {"<new1>": torch.randn(64, generator=generator), "<new2>": torch.randn(64, generator=generator)}
    outputs = []
    for copy_table in (True, False):
        tokenizer, encoder = sd1_base.load_tokenizers()[0], sd1_base.load_text_encoder(0)
        table = encoder.get_input_embeddings().weight
        old = install(tokenizer, encoder, rows, copy_table=copy_table)
        assert old is table
        ids = torch.tensor([tokenizer("a <new2> and <new1> cat").input_ids])
        with torch.no_grad():
            outputs.append(encoder(ids).last_hidden_state)
        if not copy_table:
            assert encoder.get_input_embeddings().table.weight is table  # the same table, not copied
            with torch.no_grad():
                looked_up = encoder.get_input_embeddings()(ids[0])
            assert torch.equal(looked_up[2], rows["<new2>"]) and torch.equal(looked_up[4], rows["<new1>"])
            assert torch.equal(looked_up[1], table[ids[0, 1]])
    assert torch.equal(*outputs)


def test_token_embedding_row_is_what_the_encoder_reads(sd1_base):
    embedding = torch.randn(64, generator=torch.Generator().manual_seed(1))
    encoder = TextFeatures(sd1_base, {"<new1>": (embedding,)})
    tokenizer, text_encoder = encoder.tokenizers[0], encoder.encoder(0)
    row = tokenizer.convert_tokens_to_ids("<new1>")
    with torch.no_grad():
        assert torch.equal(text_encoder.get_input_embeddings()(torch.tensor([row]))[0], embedding)


def test_bad_tokens_are_refused(sdxl_base):
    with pytest.raises(MergeError, match="already in the base model's vocabulary"):
        TextFeatures(sdxl_base, {"<|endoftext|>": (torch.zeros(64), torch.zeros(96))})
    with pytest.raises(MergeError, match=r"embedding sizes \(64,\).*\(64, 96\)"):
        TextFeatures(sdxl_base, {"<new1>": (torch.zeros(64),)})
    with pytest.raises(MergeError, match="holds whitespace"):
        TextFeatures(sdxl_base, {"<new 1>": (torch.zeros(32), torch.zeros(48))})


# --- target prompts ----------------------------------------------------------------------------

def test_target_prompts_defaults():
    assert target_prompts("<new1>", "cat") == ["<new1> cat", "photo of a <new1> cat"]
    assert target_prompts("<new1>", "art", style=True) == \
        ["<new1> art", "painting in the style of <new1> art"]


def test_a_class_containing_art_is_not_a_style():
    """The authors' script took "cartoon" for a style because it contains "art"."""
    assert target_prompts("<new1>", "cartoon") == [t.format(token="<new1>", class_word="cartoon")
                                                    for t in OBJECT_TEMPLATES]
    assert target_prompts("<new1>", "art") == ["<new1> art", "photo of a <new1> art"]


def test_custom_templates_and_spacing():
    assert target_prompts("<new1>", "dog", templates=["a {token} {class_word} on the beach", "{token}"]) == \
        ["a <new1> dog on the beach", "<new1>"]
    assert target_prompts("", "dog") == ["dog", "photo of a dog"]
    assert target_prompts("<new1>", "", templates=["{token} {class_word}", "{token}"]) == ["<new1>"]
    with pytest.raises(MergeError, match="lacks {token}"):
        target_prompts("<new1>", "dog", templates=["a {class_word}"])
    with pytest.raises(MergeError, match="only use {token} and {class_word}"):
        target_prompts("<new1>", "dog", templates=["{token} {colour}"])


# --- captions ----------------------------------------------------------------------------------

def test_packaged_captions():
    package = Path(features_module.__file__).parent / "data"
    reg = default_reg_captions()
    lines = (package / "reg_captions.txt").read_text().splitlines()
    assert reg == [line.strip() for line in lines if line.strip()]
    assert len(reg) == 1232
    assert len(heldout_captions()) == 300
    assert not set(reg) & set(heldout_captions())


def test_read_captions(tmp_path):
    file = tmp_path / "captions.txt"
    file.write_text("a cat\n\n  a dog  \n\n")
    assert read_captions(file) == ["a cat", "a dog"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(MergeError, match=f"{empty}.*empty"):
        read_captions(empty)
    with pytest.raises(MergeError, match="Cannot read captions file"):
        read_captions(tmp_path / "absent.txt")
