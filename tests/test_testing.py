"""Tests for mergekit_cd.testing: tiny offline SD / SDXL pipelines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mergekit_cd.testing import (
    ARCHITECTURES,
    TINY_CONFIGS,
    build_tiny_pipeline,
    save_tiny_pipeline,
    tiny_tokenizer,
)

CAPTION = "a photo of a cat with a teddy bear in the garden"
# (hidden size of each text encoder, UNet cross_attention_dim, number of attn2 layers)
EXPECTED = {
    "sd1": ([64], 64, 11),
    "sd2": ([96], 96, 11),
    "sdxl": ([64, 96], 160, 17),
}


def _text_encoders(pipe) -> list[tuple[object, object]]:
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def _kv_weights(unet) -> dict[str, torch.Tensor]:
    return {
        name: param.detach().clone()
        for name, param in unet.named_parameters()
        if ".attn2.to_k." in name or ".attn2.to_v." in name
    }


def _module_state(pipe) -> dict[str, torch.Tensor]:
    state = {}
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, component, None)
        if module is not None:
            state.update({f"{component}.{k}": v for k, v in module.state_dict().items()})
    return state


def _context(pipe, prompt: str) -> torch.Tensor:
    """Cross-attention context by hand (REFERENCE 1b): last hidden state for SD1/SD2,
    penultimate hidden states of both encoders concatenated for SDXL."""
    feats = []
    with torch.no_grad():
        for tokenizer, encoder in _text_encoders(pipe):
            ids = tokenizer(
                prompt, padding="max_length", max_length=tokenizer.model_max_length,
                truncation=True, return_tensors="pt",
            ).input_ids
            out = encoder(ids, output_hidden_states=True)
            feats.append(out.hidden_states[-2] if len(_text_encoders(pipe)) == 2 else out[0])
    return torch.cat(feats, dim=-1)


@pytest.fixture(scope="module")
def pipes():
    return {arch: build_tiny_pipeline(arch, seed=0) for arch in ARCHITECTURES}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_builds_with_expected_shapes(pipes, arch):
    pipe = pipes[arch]
    hidden, context_dim, n_layers = EXPECTED[arch]
    assert type(pipe).__name__ == TINY_CONFIGS[arch]["pipeline"]
    assert [enc.config.hidden_size for _, enc in _text_encoders(pipe)] == hidden
    assert pipe.unet.config.cross_attention_dim == context_dim
    attn2 = {n: m for n, m in pipe.unet.named_modules() if n.endswith(".attn2")}
    assert len(attn2) == n_layers
    assert {m.to_k.in_features for m in attn2.values()} == {context_dim}
    assert {m.to_k.out_features for m in attn2.values()} == {32, 64}
    for tokenizer, encoder in _text_encoders(pipe):
        assert encoder.config.vocab_size == len(tokenizer)
        assert tokenizer.model_max_length == 77
    if arch != "sdxl":
        assert pipe.safety_checker is None


def test_architectures_distinguishable_from_configs(pipes):
    sd1, sd2 = pipes["sd1"].text_encoder.config, pipes["sd2"].text_encoder.config
    assert (sd1.hidden_size, sd1.hidden_act) == (64, "quick_gelu")
    assert (sd2.hidden_size, sd2.hidden_act) == (96, "gelu")
    assert pipes["sdxl"].unet.config.addition_embed_type == "text_time"
    assert pipes["sd1"].unet.config.addition_embed_type is None


def test_sdxl_cross_attention_dim_is_sum_of_encoders(pipes):
    pipe = pipes["sdxl"]
    te, te2 = pipe.text_encoder.config, pipe.text_encoder_2.config
    assert pipe.unet.config.cross_attention_dim == te.hidden_size + te2.hidden_size
    unet = pipe.unet.config
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + te2.projection_dim
    # some SDXL attention blocks hold two transformer layers, as in the real model
    names = [n for n, _ in pipe.unet.named_modules() if n.endswith("transformer_blocks.1.attn2")]
    assert names


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_pipeline_context_matches_reference(pipes, arch):
    pipe = pipes[arch]
    with torch.no_grad():
        embeds = pipe.encode_prompt(CAPTION, device="cpu", num_images_per_prompt=1,
                                    do_classifier_free_guidance=False)[0]
    torch.testing.assert_close(embeds, _context(pipe, CAPTION), rtol=0, atol=0)


def test_same_seed_identical_different_seed_differs():
    a = _module_state(build_tiny_pipeline("sdxl", seed=3))
    build_tiny_pipeline("sd2", seed=7)  # unrelated build in between must not matter
    torch.manual_seed(12345)  # nor the caller's RNG state
    b = _module_state(build_tiny_pipeline("sdxl", seed=3))
    c = _module_state(build_tiny_pipeline("sdxl", seed=4))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    differing = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], c[k])]
    assert any(".attn2.to_k." in k for k in differing)
    assert any(k.startswith("text_encoder_2.") for k in differing)


def test_build_leaves_global_rng_untouched():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_tiny_pipeline("sd1", seed=5)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_reload_round_trip(pipes, tiny_pipeline_path, arch):
    from diffusers import DiffusionPipeline

    path = tiny_pipeline_path(arch)
    unet_file = path / "unet" / "diffusion_pytorch_model.safetensors"
    assert unet_file.is_file()
    assert not list((path / "unet").glob("*.index.json"))
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == TINY_CONFIGS[arch]["pipeline"]

    original = pipes[arch]
    expected_kv = _kv_weights(original.unet)
    on_disk = load_file(unet_file)
    assert {f"{k}" for k in expected_kv} <= on_disk.keys()
    assert all(torch.equal(on_disk[k], v) for k, v in expected_kv.items())

    loaded = DiffusionPipeline.from_pretrained(path)
    assert type(loaded) is type(original)
    loaded_kv = _kv_weights(loaded.unet)
    assert loaded_kv.keys() == expected_kv.keys()
    assert all(torch.equal(loaded_kv[k], v) for k, v in expected_kv.items())

    for (tok_a, enc_a), (tok_b, enc_b) in zip(_text_encoders(original), _text_encoders(loaded)):
        ids_a = tok_a(CAPTION, padding="max_length", max_length=77, return_tensors="pt").input_ids
        ids_b = tok_b(CAPTION, padding="max_length", max_length=77, return_tensors="pt").input_ids
        assert torch.equal(ids_a, ids_b)
        assert tok_b.pad_token == tok_a.pad_token
        with torch.no_grad():
            out_a = enc_a(ids_a, output_hidden_states=True)
            out_b = enc_b(ids_b, output_hidden_states=True)
        # same weights (checked bit for bit above); kernels may differ in the last bit
        assert torch.allclose(out_a[0], out_b[0], rtol=1e-5, atol=1e-6)
        assert torch.allclose(out_a.hidden_states[-2], out_b.hidden_states[-2], rtol=1e-5, atol=1e-6)


def test_specific_pipeline_class_loads(tiny_pipeline_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    assert isinstance(StableDiffusionPipeline.from_pretrained(tiny_pipeline_path("sd1")),
                      StableDiffusionPipeline)
    assert isinstance(StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_path("sdxl")),
                      StableDiffusionXLPipeline)


def test_save_returns_path(tmp_path):
    out = save_tiny_pipeline("sd1", str(tmp_path / "x"), seed=1)
    assert out == tmp_path / "x"
    assert (out / "tokenizer" / "vocab.json").is_file()
    assert (out / "tokenizer" / "merges.txt").is_file()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_pipeline_runs(pipes, arch):
    pipe = pipes[arch]
    images = pipe(CAPTION, num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3)
    assert np.isfinite(images).all()
    images = pipe(CAPTION, num_inference_steps=2, height=24, width=32, output_type="np",
                  guidance_scale=1.0, generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 24, 32, 3)
    assert np.isfinite(images).all()


def test_tokenizer_handles_any_text():
    tok = tiny_tokenizer()
    caption = "zürich naïve café 😀 xylophone quokka"
    ids = tok(caption).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True) == caption
    messy = "A Photo of   the CAT, (42) -- in Zürich?"
    decoded = tok.decode(tok(messy).input_ids, skip_special_tokens=True)
    assert decoded.replace(" ", "") == messy.lower().replace(" ", "")
    for word in ("a", "photo", "of", "the", "cat", "dog", "painting", "style", "ktn", "sks"):
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    padded = tok("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[3:] == [tok.eos_token_id] * 74


def test_tokenizer_pad_tokens_follow_real_checkpoints(pipes):
    assert pipes["sd1"].tokenizer.pad_token == "<|endoftext|>"
    assert pipes["sd2"].tokenizer.pad_token == "!"
    assert pipes["sd2"].tokenizer.pad_token_id == 0
    assert pipes["sdxl"].tokenizer.pad_token == "<|endoftext|>"
    assert pipes["sdxl"].tokenizer_2.pad_token == "!"
    for _, encoder in _text_encoders(pipes["sdxl"]) + _text_encoders(pipes["sd2"]):
        assert encoder.config.eos_token_id == pipes["sd1"].tokenizer.eos_token_id


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_adding_modifier_token(arch):
    pipe = build_tiny_pipeline(arch)
    for tokenizer, encoder in _text_encoders(pipe):
        before = encoder.get_input_embeddings().weight.detach().clone()
        n = len(tokenizer)
        assert tokenizer.add_tokens("<new1>") == 1
        assert len(tokenizer) == n + 1
        new_id = tokenizer.convert_tokens_to_ids("<new1>")
        assert new_id == n
        ids = tokenizer("a <new1> cat").input_ids
        assert ids.count(new_id) == 1 and len(ids) == 5
        encoder.resize_token_embeddings(len(tokenizer))
        after = encoder.get_input_embeddings().weight
        assert after.shape == (n + 1, before.shape[1])
        assert torch.equal(after[:n], before)
    images = pipe("a <new1> cat", num_inference_steps=2, output_type="np").images
    assert np.isfinite(images).all()


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_tiny_pipeline("sd3")
    with pytest.raises(ValueError, match="seed"):
        build_tiny_pipeline("sd1", seed=-1)


def test_full_size_sd15_base_has_the_real_shapes(tmp_path):
    """The SD1.5-size base: 16 cross-attention layers, 768-wide features, CLIP-L's 123M parameters."""
    from mergekit_cd.base import open_base
    from mergekit_cd.testing import save_full_size_base

    base = open_base(save_full_size_base("sd15", tmp_path / "sd15"))
    assert base.architecture.name == "sd1" and base.context_dim == 768
    shapes = base.kv_shapes()
    assert len(shapes) == 16
    assert shapes["down_blocks.0.attentions.0.transformer_blocks.0.attn2"][0] == (320, 768)
    assert sum(k.numel() + v.numel() for k, v in shapes.values()) == 19_169_280
    assert base.text_encoder_parameters() == (123_060_480,)


def test_full_size_sdxl_config_matches_the_published_model():
    """SDXL's 70 cross-attention layers, 2048-wide features: 1.36 GB of K/V in float32 per concept."""
    from diffusers import UNet2DConditionModel

    from mergekit_cd.testing import FULL_SIZE_CONFIGS

    with torch.device("meta"):
        unet = UNet2DConditionModel(**FULL_SIZE_CONFIGS["sdxl"]["unet"])
    kv = [p for name, p in unet.named_parameters() if name.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]
    assert len(kv) == 140 and {p.shape[1] for p in kv} == {2048}
    assert sum(p.numel() for p in kv) * 4 == 1_363_148_800


def test_random_concept_deltas_are_seeded_scaled_and_lie_along_their_prompts(tiny_pipeline_path):
    """The benchmark's stand-in concepts: reproducible, each layer's change ``strength`` times the
    base weight's norm, and every change a combination of the concept's own prompt features."""
    from mergekit_cd.base import open_base
    from mergekit_cd.delta import dense
    from mergekit_cd.features import TextFeatures
    from mergekit_cd.prompts import target_prompts
    from mergekit_cd.testing import random_concept_deltas

    base = open_base(tiny_pipeline_path("sd1"))
    specs = [("<new1>", "cat"), ("<new2>", "pot")]
    first, second = random_concept_deltas(base, specs, seed=3, strength=0.1)
    again = random_concept_deltas(base, specs, seed=3, strength=0.1)
    assert first.allclose(again[0], rtol=0, atol=0) and second.allclose(again[1], rtol=0, atol=0)
    assert not first.allclose(random_concept_deltas(base, specs, seed=4, strength=0.1)[0])
    training = [*target_prompts("<new1>", "cat"), "a <new1> cat on a table", "a close up of a <new1> cat"]
    features = torch.cat(TextFeatures(base, first.tokens).features(training)).double()
    assert features.shape[0] < features.shape[1]  # fewer rows than dimensions: the span test can fail
    span, _ = torch.linalg.qr(features.T)  # an orthonormal basis holding the features' span
    for name in base.kv_shapes():
        for weight, part in zip(base.kv(name), (first.layers[name].key, first.layers[name].value)):
            change = dense(part).double()
            assert float(change.norm()) == pytest.approx(0.1 * float(weight.norm()), rel=1e-5)
            assert float((change - change @ span @ span.T).norm()) < 1e-5 * float(change.norm())
