"""Installing a delta into a diffusers pipeline (``mergekit_cd.apply``) and taking it out again.

Every case runs on the tiny SD1 and SDXL pipelines. The law: ``apply`` changes the K/V weights
and the pipeline's output for a prompt with the token; ``remove`` restores weights, tokenizers
and embedding tables bit for bit, so the output is the base's again, exactly. A delta that does
not fit is refused before anything changes. Also checked: diffusers' own ``load_attn_procs``
installs nothing (REFERENCE section 4), and the README snippets, run here verbatim.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

import mergekit_cd
from mergekit_cd.apply import apply, installed, remove
from mergekit_cd.delta import compress, dense
from mergekit_cd.errors import MergeError
from mergekit_cd.loading import save

ARCHITECTURES = ("sd1", "sdxl")
PROMPT = "photo of a <new1> cat"
SOURCES = ("object", "native", "diffusers", "authors-bin")


# ---------------------------------------------------------------- README snippet 1 (verbatim)
def load_merged(base, merged, device="cuda", dtype=torch.float16):
    """A diffusers pipeline with a merged delta installed (file, folder, or the authors' delta.bin)."""
    pipe = DiffusionPipeline.from_pretrained(base, torch_dtype=dtype).to(device)
    mergekit_cd.apply(pipe, merged)  # refuses a delta made for another base or architecture
    return pipe


# ---------------------------------------------------------------- README snippet 2 (verbatim)
from safetensors.torch import load_file  # noqa: E402  (the snippet's own import)


def install_manually(pipe, merged_file):
    """What mergekit_cd.apply does for a native .safetensors file, with diffusers alone."""
    tensors = load_file(merged_file)
    encoders = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: one embedding per text encoder
        encoders.append((pipe.tokenizer_2, pipe.text_encoder_2))
    with torch.no_grad():
        for key, tensor in tensors.items():
            name, part = key.rsplit(".", 1)
            if name.startswith("token."):  # token.<token>.<text encoder index>
                tokenizer, text_encoder = encoders[int(part)]
                pipe.load_textual_inversion(tensor, token=name[len("token."):], tokenizer=tokenizer,
                                            text_encoder=text_encoder)
            elif part in ("diff", "up"):  # <layer>.to_k.diff, or low-rank factors <layer>.to_k.up/.down
                difference = tensor if part == "diff" else tensor @ tensors[f"{name}.down"]
                weight = pipe.unet.get_submodule(name).weight  # name: <layer>.to_k or <layer>.to_v
                weight += difference.to(weight.device, weight.dtype)


# ---------------------------------------------------------------- helpers and fixtures
def load_pipeline(path):
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt: str = PROMPT) -> np.ndarray:
    """One seeded 2-step sample, as a float array."""
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np").images


def encoder_names(pipe) -> list[tuple[str, str]]:
    pairs = [("tokenizer", "text_encoder")]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append(("tokenizer_2", "text_encoder_2"))
    return pairs


def snapshot(pipe) -> dict:
    """Everything apply may touch: all UNet and text-encoder tensors, tokenizers, table sizes."""
    state = {"unet": {k: v.clone() for k, v in pipe.unet.state_dict().items()}}
    for tokenizer_name, encoder_name in encoder_names(pipe):
        tokenizer, encoder = getattr(pipe, tokenizer_name), getattr(pipe, encoder_name)
        state[encoder_name] = {k: v.clone() for k, v in encoder.state_dict().items()}
        state[tokenizer_name] = (len(tokenizer), tokenizer.get_vocab(), tokenizer(PROMPT).input_ids)
        state[encoder_name + ".sizes"] = (encoder.get_input_embeddings().num_embeddings,
                                          encoder.config.vocab_size)
    return state


def assert_same_state(pipe, before: dict) -> None:
    after = snapshot(pipe)
    assert before.keys() == after.keys()
    for name in before:
        if isinstance(before[name], dict) and name != "tokenizer" and name != "tokenizer_2":
            assert before[name].keys() == after[name].keys(), name
            changed = [k for k in before[name] if not torch.equal(before[name][k], after[name][k])]
            assert not changed, f"{name}: {changed[:3]} differ"
        else:
            assert before[name] == after[name], name


@pytest.fixture(scope="module")
def pipes(tiny_pipeline_path):
    """One loaded pipeline per architecture, with its base state and base output; shared by
    the tests of this module, each of which leaves it as it found it (asserted)."""
    loaded = {}
    for architecture in ARCHITECTURES:
        pipe = load_pipeline(tiny_pipeline_path(architecture))
        loaded[architecture] = (pipe, snapshot(pipe), generate(pipe))
    return loaded


# ---------------------------------------------------------------- the law
@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("source", SOURCES)
def test_apply_changes_output_and_remove_restores_the_base_exactly(pipes, tiny_delta_files,
                                                                   architecture, source):
    """apply: K/V weights become base + difference, the token gets its embedding in every text
    encoder and the output for a prompt with the token changes; remove: bit-identical base."""
    pipe, base_state, base_output = pipes[architecture]
    files = tiny_delta_files(architecture)
    delta = files["object"]

    returned = apply(pipe, files[source])
    assert installed(pipe) is not None
    try:
        layer = next(iter(delta.layers))
        module = pipe.unet.get_submodule(layer)
        torch.testing.assert_close(module.to_k.weight, base_state["unet"][f"{layer}.to_k.weight"]
                                   + dense(delta.layers[layer].key), rtol=0, atol=1e-6)
        torch.testing.assert_close(module.to_v.weight, base_state["unet"][f"{layer}.to_v.weight"]
                                   + dense(delta.layers[layer].value), rtol=0, atol=1e-6)
        assert set(returned.layers) == set(delta.layers)
        for index, (tokenizer_name, encoder_name) in enumerate(encoder_names(pipe)):
            tokenizer = getattr(pipe, tokenizer_name)
            row = tokenizer.convert_tokens_to_ids("<new1>")
            assert tokenizer("<new1>", add_special_tokens=False).input_ids == [row]
            table = getattr(pipe, encoder_name).get_input_embeddings().weight
            torch.testing.assert_close(table[row], delta.tokens["<new1>"][index], rtol=0, atol=1e-6)
        with_delta = generate(pipe)
        assert np.abs(with_delta - base_output).max() > 1e-3
    finally:
        remove(pipe)
    assert installed(pipe) is None
    assert_same_state(pipe, base_state)
    np.testing.assert_array_equal(generate(pipe), base_output)


def test_remove_restores_a_float16_unet_exactly(tiny_pipeline_path, tiny_delta_files):
    """The base fingerprint is taken in float16, so a half-precision UNet matches its fp32 base;
    the addition is rounded once, and remove gives back the very same half weights."""
    pipe = load_pipeline(tiny_pipeline_path("sd1"))
    pipe.unet.to(torch.float16)
    before = snapshot(pipe)
    delta = tiny_delta_files("sd1")["object"]
    apply(pipe, delta)
    layer = next(iter(delta.layers))
    expected = (before["unet"][f"{layer}.to_k.weight"].float() + delta.layers[layer].key).half()
    assert torch.equal(pipe.unet.get_submodule(layer).to_k.weight, expected)
    remove(pipe)
    assert_same_state(pipe, before)


# ---------------------------------------------------------------- refusals
def test_applying_twice_without_remove_is_an_error(pipes, tiny_delta_files):
    pipe, base_state, _ = pipes["sd1"]
    files = tiny_delta_files("sd1")
    apply(pipe, files["native"])
    try:
        installed_state = snapshot(pipe)
        with pytest.raises(MergeError, match=r"already has a delta installed .*delta\.safetensors.*"
                                             r"mergekit_cd\.remove\(pipe\) first"):
            apply(pipe, files["object"])
        assert_same_state(pipe, installed_state)
    finally:
        remove(pipe)
    assert_same_state(pipe, base_state)
    with pytest.raises(MergeError, match="No mergekit-cd delta is installed"):
        remove(pipe)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_delta_for_another_base_is_refused_unless_check_base_is_false(pipes, tiny_delta_files, architecture):
    pipe, base_state, base_output = pipes[architecture]
    delta = tiny_delta_files(architecture)["object"]
    other = dataclasses.replace(delta, base="someone/other-model", base_fingerprint="0f" * 32)
    with pytest.raises(MergeError, match=r"was made for another base model \(someone/other-model, "
                                         r"fingerprint 0f0f0f0f0f0f\) than this pipeline .*"
                                         r"check_base=False"):
        apply(pipe, other)
    assert installed(pipe) is None
    assert_same_state(pipe, base_state)

    apply(pipe, other, check_base=False)
    try:
        assert np.abs(generate(pipe) - base_output).max() > 1e-3
    finally:
        remove(pipe)
    assert_same_state(pipe, base_state)


@pytest.mark.parametrize(("pipeline", "delta_of", "source", "message"), [
    ("sd1", "sdxl", "object", r"the delta is an sdxl delta but this pipeline is sd1 .*wrong architecture"),
    ("sdxl", "sd1", "native", r"delta\.safetensors is an sd1 delta but this pipeline is sdxl"),
    ("sd1", "sdxl", "authors-bin", r"delta\.bin is an sdxl delta but this pipeline is sd1"),
    # the authors' own files record no architecture: their shapes give it away
    ("sd1", "sdxl", "authors-own", r"delta\.bin was made for a model whose text features have 160 "
                                   r"dimensions, but this pipeline \(sd1\) uses 64: wrong architecture"),
    ("sdxl", "sd1", "authors-own", r"delta\.bin was made for a model whose text features have 64 "
                                   r"dimensions, but this pipeline \(sdxl\) uses 160"),
])
def test_delta_for_another_architecture_is_refused(pipes, tiny_delta_files, authors_own, pipeline, delta_of,
                                                   source, message):
    pipe, base_state, _ = pipes[pipeline]
    files = tiny_delta_files(delta_of)
    path = authors_own(files["authors-bin"]) if source == "authors-own" else files[source]
    with pytest.raises(MergeError, match=message):
        apply(pipe, path, check_base=False)
    assert installed(pipe) is None
    assert_same_state(pipe, base_state)


def test_token_already_in_the_vocabulary_is_refused_before_anything_changes(pipes, tiny_delta_files):
    pipe, base_state, _ = pipes["sdxl"]
    delta = tiny_delta_files("sdxl")["object"]
    clash = dataclasses.replace(delta, tokens={"<|endoftext|>": delta.tokens["<new1>"]}, concepts=())
    with pytest.raises(MergeError, match=r"token <\|endoftext\|> is already in the pipeline's tokenizer .*afresh"):
        apply(pipe, clash)
    assert_same_state(pipe, base_state)


def test_token_of_the_wrong_width_is_refused(pipes, tiny_delta_files):
    pipe, base_state, _ = pipes["sd1"]
    delta = tiny_delta_files("sd1")["object"]
    wide = dataclasses.replace(delta, tokens={"<new1>": (torch.zeros(96),)})
    with pytest.raises(MergeError, match=r"token <new1> has embedding sizes \(96,\), but the text "
                                         r"encoder\(s\) of this pipeline need \(64,\)\.$"):
        apply(pipe, wide)
    assert_same_state(pipe, base_state)


# ---------------------------------------------------------------- REFERENCE section 4
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_load_attn_procs_installs_nothing_but_apply_does(pipes, tiny_delta_files, architecture):
    """diffusers 0.42: ``unet.load_attn_procs(<diffusers-layout folder>)`` returns without error
    and leaves processors, weights and outputs as they were; mergekit_cd.apply changes them."""
    import diffusers

    pipe, base_state, base_output = pipes[architecture]
    folder = tiny_delta_files(architecture)["diffusers"]
    processors = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
    result = pipe.unet.load_attn_procs(folder, weight_name="pytorch_custom_diffusion_weights.safetensors")
    assert result is None
    same = ({name: type(p) for name, p in pipe.unet.attn_processors.items()} == processors
            and np.array_equal(generate(pipe), base_output))
    assert same, (f"diffusers {diffusers.__version__}'s load_attn_procs now installs Custom Diffusion "
                  f"weights: update the README and REFERENCE section 4")
    assert_same_state(pipe, base_state)

    apply(pipe, folder)
    try:
        assert np.abs(generate(pipe) - base_output).max() > 1e-3
    finally:
        remove(pipe)


# ---------------------------------------------------------------- the README snippets
@pytest.mark.filterwarnings("ignore:`torch_dtype` is deprecated:FutureWarning")
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_readme_snippet_load_merged(pipes, tiny_pipeline_path, tiny_delta_files, architecture):
    pipe, _, base_output = pipes[architecture]
    merged = tiny_delta_files(architecture)["native"]
    loaded = load_merged(tiny_pipeline_path(architecture), merged, device="cpu", dtype=torch.float32)
    loaded.set_progress_bar_config(disable=True)
    snippet_output = generate(loaded)
    apply(pipe, merged)
    try:
        np.testing.assert_array_equal(snippet_output, generate(pipe))
    finally:
        remove(pipe)
    mergekit_cd.remove(loaded)
    np.testing.assert_array_equal(generate(loaded), base_output)


@pytest.mark.parametrize(("architecture", "compressed"), [("sd1", False), ("sdxl", False), ("sd1", True)])
def test_readme_snippet_manual_route_matches_apply(pipes, tiny_pipeline_path, tiny_delta_files, tmp_path,
                                                   architecture, compressed):
    """load_textual_inversion for the tokens plus the differences added to attn2.to_k / to_v
    gives the same weights, embeddings and output as mergekit_cd.apply, dense or low-rank."""
    pipe, _, _ = pipes[architecture]
    delta = tiny_delta_files(architecture)["object"]
    merged = tiny_delta_files(architecture)["native"]
    if compressed:
        merged = save(compress(delta, rtol=0.1)[0], tmp_path / "compressed.safetensors")
    manual = load_pipeline(tiny_pipeline_path(architecture))
    install_manually(manual, merged)
    apply(pipe, merged)
    try:
        for name, weight in pipe.unet.state_dict().items():
            if ".attn2.to_" in name:
                torch.testing.assert_close(manual.unet.state_dict()[name], weight, rtol=0, atol=1e-6)
        for tokenizer_name, encoder_name in encoder_names(pipe):
            row = getattr(pipe, tokenizer_name).convert_tokens_to_ids("<new1>")
            assert getattr(manual, tokenizer_name).convert_tokens_to_ids("<new1>") == row
            torch.testing.assert_close(getattr(manual, encoder_name).get_input_embeddings().weight[row],
                                       getattr(pipe, encoder_name).get_input_embeddings().weight[row])
        np.testing.assert_allclose(generate(manual), generate(pipe), rtol=0, atol=1e-5)
    finally:
        remove(pipe)


def test_package_exports_the_api():
    """The README's ``mergekit_cd.apply`` / ``remove`` are these functions."""
    assert mergekit_cd.apply is apply and mergekit_cd.remove is remove
    assert all(callable(getattr(mergekit_cd, name)) for name in ("merge", "load", "save"))
