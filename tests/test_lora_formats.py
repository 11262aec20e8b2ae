"""Merged concepts as LoRA + textual-inversion files (diffusers-lora, kohya-lora), loaded by plain
diffusers with no mergekit-cd at inference, and read back as concept inputs. The law: a
constrained merge written as a LoRA is exact (its difference has one rank per constraint row),
and diffusers' ``load_lora_weights`` + ``load_textual_inversion`` give the pipeline that
``mergekit_cd.apply`` of the native file gives, on the tiny SD1 and SDXL bases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergekit_cd import formats
from mergekit_cd.apply import apply
from mergekit_cd.base import open_base
from mergekit_cd.cli.convert import main as cd_convert
from mergekit_cd.cli.merge import main as cd_merge
from mergekit_cd.delta import Concept, LayerDelta, dense, factorize
from mergekit_cd.errors import MergeError
from mergekit_cd.loading import load, save
from mergekit_cd.merge import MergeOptions, execute, merge, plan_merge

pytest.importorskip("peft")  # diffusers loads LoRAs through peft

ARCHITECTURES = ("sd1", "sdxl")
PROMPT = "photo of a <new1> cat next to a <new2> dog"
CAPTIONS = ["a photo of a cat", "a dog on the grass", "a red car", "a house at night", "a cat and a dog"]


@pytest.fixture(scope="module")
def merged(tiny_pipeline_path, tiny_delta_files, tmp_path_factory):
    """Per architecture: the constrained merge of two concepts, as a native file, a diffusers-lora
    folder and a kohya-lora file (with its embedding files beside it)."""
    out = {}
    for architecture in ARCHITECTURES:
        base = open_base(tiny_pipeline_path(architecture))
        files = tiny_delta_files(architecture)
        delta = merge([files["native"], files["other-native"]], CAPTIONS, base=base, ridge=1e-4)
        folder = tmp_path_factory.mktemp(f"lora-{architecture}")
        (folder / "kohya").mkdir()
        out[architecture] = dict(
            base=base, delta=delta,
            native=save(delta, folder / "merged.safetensors", base=base),
            diffusers=save(delta, folder / "merged-lora", format="diffusers-lora"),
            kohya=save(delta, folder / "kohya" / "merged.safetensors", format="kohya-lora"))
    return out


def _latents(pipe) -> torch.Tensor:
    """Two seeded denoising steps of PROMPT, as latents (text encoders and UNet both in play)."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="latent").images


def _with_apply(path: Path, native: Path) -> torch.Tensor:
    pipe = DiffusionPipeline.from_pretrained(path)
    apply(pipe, native)
    return _latents(pipe)


def _load_embeddings(pipe, files: dict[str, Path], *, key_for_sd1: str | None) -> None:
    """What a diffusers user does with one textual-inversion file per token (SDXL: clip_l/clip_g)."""
    for token, file in files.items():
        state = load_file(file)
        if getattr(pipe, "text_encoder_2", None) is None and key_for_sd1 is None:
            pipe.load_textual_inversion(str(file))  # as the README says: the file names its token
        elif getattr(pipe, "text_encoder_2", None) is None:
            pipe.load_textual_inversion(state[key_for_sd1], token=token)
        else:
            pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                        tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_merge_written_as_diffusers_lora_loads_in_plain_diffusers_as_apply_installs_it(
        merged, tiny_pipeline_path, architecture):
    item = merged[architecture]
    expected = _with_apply(tiny_pipeline_path(architecture), item["native"])
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_path(architecture))
    pipe.load_lora_weights(item["diffusers"])
    _load_embeddings(pipe, {token: item["diffusers"] / f"{token[1:-1]}.safetensors" for token in ("<new1>", "<new2>")},
                     key_for_sd1=None)
    got = _latents(pipe)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (got - expected).abs().max()
    pipe.unload_lora_weights()  # the tokens stay: what the K/V change alone does to the output
    assert (_latents(pipe) - expected).abs().max() > 100 * (got - expected).abs().max()
    with safe_open(item["diffusers"] / "pytorch_lora_weights.safetensors", "pt") as handle:
        config = json.loads(handle.metadata()["lora_adapter_metadata"])
        assert all(key.startswith("unet.") for key in handle.keys())
    assert config["unet.lora_alpha"] == config["unet.r"] and config["unet.alpha_pattern"] == config["unet.rank_pattern"]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_merge_written_as_kohya_lora_loads_through_diffusers_kohya_conversion(
        merged, tiny_pipeline_path, architecture):
    """diffusers converts kohya names itself (SDXL: the LDM block names); it does not read
    bundled embeddings, so those keys are left out and the embedding files beside are loaded."""
    item = merged[architecture]
    expected = _with_apply(tiny_pipeline_path(architecture), item["native"])
    state = load_file(item["kohya"])
    names = {key.split(".")[0] for key in state if key.startswith("lora_unet_")}
    assert all(("input_blocks" in n or "output_blocks" in n or "middle_block" in n) == (architecture == "sdxl")
               for n in names), sorted(names)[:3]
    assert {key.split(".")[1] for key in state if key.startswith("bundle_emb.")} == {"<new1>", "<new2>"}
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_path(architecture))
    pipe.load_lora_weights({k: v for k, v in state.items() if not k.startswith("bundle_emb.")})
    folder = item["kohya"].parent / "merged_embeddings"
    _load_embeddings(pipe, {token: folder / f"{token[1:-1]}.safetensors" for token in ("<new1>", "<new2>")},
                     key_for_sd1="emb_params")
    got = _latents(pipe)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_lora_files_read_back_as_the_merged_delta(merged, architecture):
    item = merged[architecture]
    for path, name in ((item["diffusers"], "diffusers-lora"), (item["kohya"], "kohya-lora")):
        assert formats.detect_format(path).NAME == name
        back = load(path, base=item["base"])
        assert set(back.tokens) == {"<new1>", "<new2>"}
        for token, embeddings in item["delta"].tokens.items():
            assert all(torch.equal(a, b) for a, b in zip(embeddings, back.tokens[token]))
        for layer, pair in item["delta"].layers.items():
            for want, got in zip((pair.key, pair.value), (back.layers[layer].key, back.layers[layer].value)):
                assert torch.allclose(dense(got), want, rtol=0, atol=1e-6 * float(want.abs().max())), layer


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_lora_token_files_have_portable_names_and_keep_their_tokens_inside(merged, tmp_path, architecture):
    """``<new1>`` is no file name on Windows: both LoRA layouts write ``new1.safetensors`` (diffusers'
    file keyed by the token, every file with the token in its metadata), which read back as the
    token; a file renamed by its user is named by its file, as A1111 names it."""
    from mergekit_cd.formats.token_files import read_token_file

    item = merged[architecture]
    kohya_folder = item["kohya"].parent / "merged_embeddings"
    for folder in (item["diffusers"], kohya_folder):
        assert sorted(path.name for path in folder.glob("new*")) == ["new1.safetensors", "new2.safetensors"]
        assert read_token_file(folder / "new1.safetensors", "beside the LoRA")[0] == "<new1>"
    if architecture == "sd1":
        assert list(load_file(item["diffusers"] / "new1.safetensors")) == ["<new1>"]  # load_textual_inversion's key
    renamed = tmp_path / "mycat.safetensors"
    renamed.write_bytes((kohya_folder / "new1.safetensors").read_bytes())
    assert read_token_file(renamed, "as an input")[0] == "mycat"


@pytest.mark.parametrize("tokens, problem", [
    (("<new1>", "new1"), "tokens '<new1>' and 'new1' would have one file, new1.safetensors, once the characters "
                         "Windows forbids are left out; rename one, or write the native format (one file)."),
    (("<con>",), "token '<con>' has no portable file name ('con' once the characters Windows forbids are left out); "
                 "rename it."),
])
def test_lora_token_names_without_a_portable_file_name_of_their_own_are_refused(merged, tmp_path, tokens, problem):
    delta = merged["sd1"]["delta"]
    vector = next(iter(delta.tokens.values()))
    renamed = type(delta)(delta.layers, {token: vector for token in tokens}, architecture=delta.architecture)
    for name, path in (("diffusers-lora", tmp_path / "d"), ("kohya-lora", tmp_path / "k.safetensors")):
        with pytest.raises(MergeError) as error:
            save(renamed, path, format=name)
        assert str(error.value) == f"Cannot write {path} as {name}: {problem}"


def test_a_constrained_merge_is_factored_exactly_at_its_rank(merged):
    """Its difference (V - W0 C^T) Z has at most one rank per constraint row; the factors
    reproduce the float32 difference to its rounding, and every matrix is reported exact."""
    delta = merged["sd1"]["delta"]
    factored, report = factorize(delta, rtol=0.5)  # a loose bound that exact factoring ignores
    assert len(report.exact) == 2 * len(delta.layers)
    rows = max(rank for pair in report.ranks.values() for rank in pair)
    assert 0 < rows < min(dense(delta.layers[next(iter(delta.layers))].key).shape)
    for layer, pair in delta.layers.items():
        for want, got in zip((pair.key, pair.value), (factored.layers[layer].key, factored.layers[layer].value)):
            assert float((got.dense() - want).norm()) <= 1e-6 * float(want.norm())
    assert report.relative_error <= 1e-6  # of what is stored: float32 factors


def _full_rank(delta):
    """``delta`` with every difference replaced by a random full-rank matrix (as one concept
    trained at full size has: the tiny random concepts are low rank)."""
    generator = torch.Generator().manual_seed(3)
    return delta._with_layers({name: LayerDelta(*(torch.randn(dense(part).shape, generator=generator) * 1e-2
                                                  for part in (pair.key, pair.value)))
                               for name, pair in delta.layers.items()})


def test_a_full_rank_difference_is_factored_within_the_bound_and_says_so(tiny_delta_files):
    delta = _full_rank(tiny_delta_files("sd1")["object"])
    factored, report = factorize(delta, rtol=0.3)
    assert report.exact == ()
    assert 0 < report.relative_error <= 0.3 and report.max_layer_error <= 0.3 + 1e-6
    for layer, pair in delta.layers.items():
        assert factored.layers[layer].key.rank < min(pair.key.shape)
        got = factored.layers[layer].key.dense()
        assert float((got - pair.key).norm()) <= 0.3 * float(pair.key.norm()) + 1e-6


def test_cd_merge_writes_a_kohya_lora_and_prints_its_ranks(tiny_pipeline_path, tiny_delta_files, tmp_path, capsys):
    files = tiny_delta_files("sd1")
    out = tmp_path / "merged.safetensors"
    assert cd_merge([str(files["native"]), str(files["other-native"]), "--base", str(tiny_pipeline_path("sd1")),
                     "-o", str(out), "--format", "kohya-lora", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "K/V differences exact at their rank" in printed and "none approximated" in printed
    assert sorted(path.name for path in (tmp_path / "merged_embeddings").iterdir()) == [
        "new1.safetensors", "new2.safetensors"]  # portable names (Windows forbids < and >)
    assert formats.detect_format(out).NAME == "kohya-lora"
    assert not list(tmp_path.glob(".*"))
    # the embedding folder is an output too: checked before any work, replaced only with --force
    arguments = [str(files["native"]), str(files["other-native"]), "--base", str(tiny_pipeline_path("sd1")),
                 "-o", str(tmp_path / "again.safetensors"), "--format", "kohya-lora", "-q"]
    (tmp_path / "again_embeddings").mkdir()
    (tmp_path / "again_embeddings" / "notes.txt").write_text("mine")
    assert cd_merge(arguments) == 1
    assert "again_embeddings holds other things" in capsys.readouterr().err
    assert cd_merge([*arguments, "--force"]) == 1 and (tmp_path / "again_embeddings" / "notes.txt").exists()
    assert not (tmp_path / "again.safetensors").exists()


def test_cd_convert_of_a_full_rank_concept_reports_the_lora_error(tiny_pipeline_path, tiny_delta_files, tmp_path,
                                                                  capsys):
    source = save(_full_rank(tiny_delta_files("sd1")["object"]), tmp_path / "full.safetensors")
    out = tmp_path / "lora"
    assert cd_convert([str(source), "-o", str(out), "--to", "diffusers-lora", "--lora-rtol", "0.2"]) == 0
    printed = capsys.readouterr().out
    assert "within --lora-rtol 0.2" in printed and " 0 of " in printed, printed
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "new1.safetensors").is_file()
    back = load(out)
    assert all(layer.key.rank < min(layer.key.shape) for layer in back.layers.values())


# ---------------------------------------------------------------- what is refused
def _kohya_state(merged) -> dict[str, torch.Tensor]:
    return load_file(merged["sd1"]["kohya"])


_SELF_ATTENTION = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
_TEXT_ENCODER = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


@pytest.mark.parametrize("extra, holds", [
    ({f"{_SELF_ATTENTION}.lora_down.weight": torch.zeros(2, 8), f"{_SELF_ATTENTION}.lora_up.weight": torch.zeros(8, 2)},
     "self-attention; e.g. down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    ({f"{_TEXT_ENCODER}.lora_down.weight": torch.zeros(2, 8), f"{_TEXT_ENCODER}.lora_up.weight": torch.zeros(8, 2),
      f"{_TEXT_ENCODER}.alpha": torch.tensor(2.0)},
     f"text-encoder parts; e.g. {_TEXT_ENCODER}.alpha, {_TEXT_ENCODER}.lora_down.weight"),
])
def test_a_lora_with_parts_beyond_cross_attention_kv_is_refused_naming_them_and_the_option(
        merged, tiny_pipeline_path, tmp_path, capsys, extra, holds):
    path = tmp_path / "other.safetensors"
    save_file({**_kohya_state(merged), **extra}, path)
    """In each use's words: loading (load, cd-convert) offers drop and keep, a merge drop, sum and average."""
    text_encoder = ("; its text-encoder parts can only be dropped, as they change the text features {merge} "
                    "computed on" if "text-encoder" in holds else "")
    loading = (f"{path}: holds parts beyond the UNet's cross-attention K/V ({holds}); a delta is its attn2.to_k / "
               f"attn2.to_v differences, and the rest is not dropped silently. Choose with {{option}}: drop (read the "
               f"K/V alone), or keep (its UNet modules too, which only a LoRA output holds)"
               f"{text_encoder.format(merge='a K/V merge is')}.")
    merging = (f"{path}: holds parts beyond the UNet's cross-attention K/V ({holds}); the merge solves for "
               f"attn2.to_k / attn2.to_v alone, and will not drop the rest silently. Choose with --other-layers: drop "
               f"(merge the K/V alone), or sum / average (carry the UNet modules into a LoRA output as the inputs' "
               f"sum or average){text_encoder.format(merge='the merge is')}.")
    with pytest.raises(MergeError) as error:
        load(path)
    assert str(error.value) == loading.format(option="other_layers")
    assert cd_merge([str(path), "--base", str(tiny_pipeline_path("sd1")), "-o", str(tmp_path / "m.safetensors"),
                     "-q"]) == 1
    assert capsys.readouterr().err == f"cd-merge: error: {merging}\n"
    assert cd_convert([str(path), "-o", str(tmp_path / "out.safetensors")]) == 1
    assert capsys.readouterr().err == f"cd-convert: error: {loading.format(option='--other-layers')}\n"


@pytest.mark.parametrize("key, kind", [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.dora_scale", "DoRA magnitudes"),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.hada_w1_a", "LyCORIS (LoHa/LoKr) parts"),
])
def test_a_lora_with_parts_that_are_no_plain_factors_is_refused_whatever_the_other_layers_rule(merged, tmp_path,
                                                                                              key, kind):
    path = tmp_path / "other.safetensors"
    save_file({**_kohya_state(merged), key: torch.ones(1, 8)}, path)
    for rule in ("refuse", "drop", "keep"):
        with pytest.raises(MergeError) as error:
            load(path, other_layers=rule)
        assert str(error.value) == (
            f"{path}: holds 1 tensor that is no plain LoRA factor (e.g. {key}: {kind}); mergekit-cd reads the "
            f"lora_A / lora_B (lora_down / lora_up) factors of a LoRA, and will not read the rest as if they were "
            f"absent.")


def test_a_lora_with_nan_or_mismatched_factors_is_one_error(merged, tmp_path):
    state = _kohya_state(merged)
    down = next(key for key in state if key.endswith("lora_down.weight"))
    bad = {**state, down: torch.full_like(state[down], float("nan"))}
    save_file(bad, tmp_path / "nan.safetensors")
    with pytest.raises(MergeError, match="not finite|NaN|non-finite"):
        load(tmp_path / "nan.safetensors")
    bad = {**state, down: state[down][:-1]}
    save_file(bad, tmp_path / "rank.safetensors")
    with pytest.raises(MergeError, match="do not multiply"):
        load(tmp_path / "rank.safetensors")


def test_a_lora_for_another_architecture_is_refused_against_the_base(merged):
    with pytest.raises(MergeError, match="is an sdxl delta but .* is an sd1 model"):
        load(merged["sdxl"]["kohya"], base=merged["sd1"]["base"])
    with pytest.raises(MergeError, match="is an sd1 delta but .* is an sdxl model"):
        load(merged["sd1"]["diffusers"], base=merged["sdxl"]["base"])


def test_a_bundled_embedding_of_several_vectors_is_refused(merged, tmp_path):
    state = _kohya_state(merged)
    key = next(key for key in state if key.startswith("bundle_emb."))
    save_file({**state, key: state[key].repeat(3, 1)}, tmp_path / "multi.safetensors")
    with pytest.raises(MergeError, match="holds 3 vectors"):
        load(tmp_path / "multi.safetensors")


# ---------------------------------------------------------------- LoRAs made by others as inputs
def _peft_lora(tiny_pipeline_path, folder: Path, targets: list[str], *, metadata: bool = True) -> tuple[Path, dict]:
    """A LoRA made with peft on the tiny SD1 UNet (r 4, alpha 8: scale 2; B randomised, as after
    training), saved by diffusers' ``save_lora_weights``; and each module's difference as peft
    computes it."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_path("sd1"))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="gaussian")
    pipe.unet.add_adapter(config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in pipe.unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    differences = {name: module.get_delta_weight("default").detach().clone()
                   for name, module in pipe.unet.named_modules() if hasattr(module, "get_delta_weight")}
    extra = {"unet_lora_adapter_metadata": config.to_dict()} if metadata else {}
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet), **extra)
    return folder, differences


def test_a_peft_lora_of_cross_attention_kv_is_read_at_its_scale_and_merged(tiny_pipeline_path, tiny_delta_files,
                                                                          tmp_path, capsys):
    folder, differences = _peft_lora(tiny_pipeline_path, tmp_path / "peft", ["attn2.to_k", "attn2.to_v"])
    delta = load(folder, base=open_base(tiny_pipeline_path("sd1")))
    assert formats.detect_format(folder).NAME == "diffusers-lora" and delta.tokens == {}
    for module, want in differences.items():
        layer, projection = module.rsplit(".", 1)
        got = dense(getattr(delta.layers[layer], {"to_k": "key", "to_v": "value"}[projection]))
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), module  # alpha / r = 2 applied
    out = tmp_path / "merged.safetensors"
    assert cd_merge([str(folder), str(tiny_delta_files("sd1")["native"]), "--base", str(tiny_pipeline_path("sd1")),
                     "--class", "sks dog", "--class", "cat", "-o", str(out), "-q", "--ridge", "1e-4"]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    rows = lines[lines.index(next(line for line in lines if line.startswith("------"))) + 1:][:2]
    assert [row.split()[-3:-2] for row in rows] == [["dog"], ["cat"]], printed  # the LoRA has no token
    assert max(float(row.split()[-2]) for row in rows) < 1e-5, printed  # both kept: residual as written


def test_a_peft_lora_without_adapter_metadata_is_read_at_scale_one_as_diffusers_does(tiny_pipeline_path, tmp_path):
    folder, differences = _peft_lora(tiny_pipeline_path, tmp_path / "peft", ["attn2.to_k", "attn2.to_v"],
                                     metadata=False)
    delta = load(folder)
    module, want = next(iter(differences.items()))
    layer, projection = module.rsplit(".", 1)
    assert torch.allclose(dense(delta.layers[layer].key if projection == "to_k" else delta.layers[layer].value),
                          want / 2, rtol=1e-5, atol=1e-7)


def test_a_peft_lora_of_more_layers_is_refused_naming_them(tiny_pipeline_path, tmp_path, capsys):
    folder, _ = _peft_lora(tiny_pipeline_path, tmp_path / "peft", ["to_k", "to_v", "to_q"])
    with pytest.raises(MergeError) as error:
        load(folder)
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    assert str(error.value).startswith(
        f"{folder}: holds parts beyond the UNet's cross-attention K/V "
        f"(self-attention, cross-attention queries and outputs; e.g. {block}.attn1.to_k, {block}.attn1.to_q); ")


def test_diffusers_older_attention_processor_lora_keys_are_read(merged, tmp_path):
    """diffusers' LoRAs of before peft: ``<layer>.processor.to_k_lora.down.weight`` / ``.up.weight``."""
    state = load_file(merged["sd1"]["diffusers"] / "pytorch_lora_weights.safetensors")
    old = {key.removeprefix("unet.").replace(".to_k.lora_A.", ".processor.to_k_lora.down.")
           .replace(".to_k.lora_B.", ".processor.to_k_lora.up.").replace(".to_v.lora_A.", ".processor.to_v_lora.down.")
           .replace(".to_v.lora_B.", ".processor.to_v_lora.up."): value for key, value in state.items()}
    assert all("processor" in key for key in old)
    save_file(old, tmp_path / "old.safetensors")
    back = load(tmp_path / "old.safetensors")
    for layer, pair in merged["sd1"]["delta"].layers.items():
        assert torch.allclose(dense(back.layers[layer].value), pair.value, atol=1e-6 * float(pair.value.abs().max()))


def test_a_kohya_lora_without_bundled_embeddings_takes_the_embedding_files_beside_it(merged, tmp_path):
    """``x.safetensors`` and ``x_embeddings/``: an A1111 ``.pt`` (pickled as A1111 saves it, with
    ``requires_grad`` rows) and a kohya ``emb_params`` file, each named by its file."""
    item = merged["sd1"]
    state = {k: v for k, v in _kohya_state(merged).items() if not k.startswith("bundle_emb.")}
    save_file(state, tmp_path / "x.safetensors")
    (tmp_path / "x_embeddings").mkdir()
    first, second = (item["delta"].tokens[token][0] for token in ("<new1>", "<new2>"))
    row = torch.nn.Parameter(first[None].clone())  # A1111 trains the rows as a parameter
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": row}, "name": "<new1>", "step": 500,
                "sd_checkpoint": "4bdfc29c", "sd_checkpoint_name": "base"}, tmp_path / "x_embeddings" / "<new1>.pt")
    save_file({"emb_params": second[None].contiguous()}, tmp_path / "x_embeddings" / "<new2>.safetensors")
    back = load(tmp_path / "x.safetensors", base=item["base"])
    assert list(back.tokens) == ["<new1>", "<new2>"]
    assert torch.equal(back.tokens["<new1>"][0], first) and torch.equal(back.tokens["<new2>"][0], second)
    assert not back.tokens["<new1>"][0].requires_grad


def test_a_multi_vector_embedding_file_is_refused(merged, tmp_path):
    folder = tmp_path / "lora"
    folder.mkdir()
    weights = merged["sd1"]["diffusers"] / "pytorch_lora_weights.safetensors"
    (folder / weights.name).write_bytes(weights.read_bytes())
    save_file({"emb_params": torch.randn(3, 64)}, folder / "<new9>.safetensors")
    with pytest.raises(MergeError, match="holds 3 vectors; a Custom Diffusion token is one"):
        load(folder)


@pytest.mark.parametrize("config, message", [
    ({"unet.r": 4, "unet.lora_alpha": "eight"}, "lora_alpha of .* should be one positive number, found 'eight'"),
    ({"unet.r": 4, "unet.lora_alpha": -1}, "should be one positive number, found -1"),
    ({"unet.r": 4, "unet.alpha_pattern": [1]}, "alpha_pattern is not a JSON object"),
])
def test_hostile_adapter_metadata_is_one_error(merged, tmp_path, config, message):
    folder = tmp_path / "lora"
    folder.mkdir()
    tensors = load_file(merged["sd1"]["diffusers"] / "pytorch_lora_weights.safetensors")
    save_file(tensors, folder / "pytorch_lora_weights.safetensors",
              metadata={"lora_adapter_metadata": json.dumps(config)})
    with pytest.raises(MergeError, match=message):
        load(folder)
    state = load_file(merged["sd1"]["kohya"])
    alpha = next(key for key in state if key.endswith(".alpha"))
    save_file({**state, alpha: torch.tensor(float("nan"))}, tmp_path / "nan-alpha.safetensors")
    with pytest.raises(MergeError, match=r"\.alpha should be one positive number"):
        load(tmp_path / "nan-alpha.safetensors")


def test_a_factor_given_twice_is_refused(merged, tmp_path):
    tensors = load_file(merged["sd1"]["diffusers"] / "pytorch_lora_weights.safetensors")
    key = next(iter(tensors))
    save_file({**tensors, key.replace("unet.", "base_model.model.", 1): tensors[key].clone()},
              tmp_path / "twice.safetensors")
    with pytest.raises(MergeError, match="both hold the"):
        load(tmp_path / "twice.safetensors")


# ---------------------------------------------------------------- --other-layers: LoRAs of more layers merged
MORE_LAYERS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"]


def _is_kv(module: str) -> bool:
    return module.endswith(("attn2.to_k", "attn2.to_v"))


def _residuals(printed: str) -> list[float]:
    """The 'residual as written' column of cd-merge's summary table."""
    lines = printed.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("------"))) + 1
    return [float(line.split()[-2]) for line in lines[start:start + 2]]


def test_cd_merge_drops_a_peft_loras_other_layers_on_request_and_keeps_the_kv_constraints(
        tiny_pipeline_path, tiny_delta_files, tmp_path, capsys):
    folder, differences = _peft_lora(tiny_pipeline_path, tmp_path / "peft", MORE_LAYERS)
    other = sorted(module for module in differences if not _is_kv(module))
    out = tmp_path / "merged.safetensors"
    arguments = [str(folder), str(tiny_delta_files("sd1")["native"]), "--base", str(tiny_pipeline_path("sd1")),
                 "--class", "sks dog", "--class", "cat", "-o", str(out), "-q", "--ridge", "1e-4"]
    assert cd_merge(arguments) == 1 and "Choose with --other-layers: drop" in capsys.readouterr().err
    assert cd_merge([*arguments, "--other-layers", "drop"]) == 0
    printed = capsys.readouterr().out
    assert max(_residuals(printed)) < 1e-5, printed
    assert (f"note: other layers drop: {folder}: {len(other)} UNet modules beyond the cross-attention K/V dropped "
            f"(self-attention, feed-forward, cross-attention queries and outputs)") in printed.splitlines(), printed
    written = load(out)
    assert written.metadata["recipe"]["options"]["other_layers"] == "drop" and written.other_modules == {}


@pytest.mark.parametrize("rule, output_format", [("sum", "diffusers-lora"), ("average", "kohya-lora")])
def test_cd_merge_carries_a_peft_loras_other_layers_into_a_lora_output_as_their_sum_or_average(
        tiny_pipeline_path, tiny_delta_files, tmp_path, capsys, rule, output_format):
    """The K/V constraints hold as without them; every other module is the sum (average: half,
    over two inputs) of the inputs' differences, as peft computes them, and diffusers loads it."""
    folder, differences = _peft_lora(tiny_pipeline_path, tmp_path / "peft", MORE_LAYERS)
    other = {module: difference for module, difference in differences.items() if not _is_kv(module)}
    out = tmp_path / ("merged" if output_format == "diffusers-lora" else "merged.safetensors")
    assert cd_merge([str(folder), str(tiny_delta_files("sd1")["native"]), "--base", str(tiny_pipeline_path("sd1")),
                     "--class", "sks dog", "--class", "cat", "-o", str(out), "-q", "--ridge", "1e-4",
                     "--format", output_format, "--other-layers", rule]) == 0
    printed = capsys.readouterr().out
    assert max(_residuals(printed)) < 1e-5, printed
    carried = {"sum": "the output holds the sum of those modules over the 2 inputs",
               "average": "the output holds their average over the 2 inputs (each weighted 1/2)"}[rule]
    assert (f"note: other layers {rule}: {folder}: {len(other)} UNet modules beyond the cross-attention K/V kept "
            f"(self-attention, feed-forward, cross-attention queries and outputs); {carried}") in printed.splitlines()
    scale = 1.0 if rule == "sum" else 0.5
    back = load(out, other_layers="keep")
    assert back.metadata["recipe"]["options"]["other_layers"] == rule
    assert sorted(back.other_modules) == sorted(other)
    for module, difference in other.items():
        assert torch.allclose(back.other_modules[module].dense(), scale * difference, rtol=1e-5, atol=1e-7), module
    if output_format == "diffusers-lora":  # what a diffusers user gets: the same differences on the UNet
        pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_path("sd1"))
        pipe.load_lora_weights(out)
        adapter = pipe.get_active_adapters()[0]
        for module, difference in other.items():
            got = pipe.unet.get_submodule(module).get_delta_weight(adapter)
            assert torch.allclose(got, scale * difference, rtol=1e-5, atol=1e-7), module


def test_a_merge_carrying_other_modules_reads_back_converts_and_replays_from_its_recipe(
        tiny_pipeline_path, tiny_delta_files, tmp_path, capsys):
    """Every file we write is one we read: an --other-layers sum output loads with keep (its default
    refusal names keep), converts to the other LoRA layout with cd-convert --other-layers keep
    (refused before any work into a layout that holds K/V alone), and its recipe replays the merge."""
    folder, _ = _peft_lora(tiny_pipeline_path, tmp_path / "peft", MORE_LAYERS)
    native = tiny_delta_files("sd1")["native"]
    out = tmp_path / "merged.safetensors"
    assert cd_merge([str(folder), str(native), "--base", str(tiny_pipeline_path("sd1")), "--class", "sks dog",
                     "--class", "cat", "-o", str(out), "-q", "--ridge", "1e-4", "--format", "kohya-lora",
                     "--other-layers", "sum"]) == 0
    with pytest.raises(MergeError, match=r"Choose with other_layers: drop \(read the K/V alone\), or keep"):
        load(out)
    written = load(out, other_layers="keep")
    assert written.other_modules

    native_out = tmp_path / "converted.safetensors"
    capsys.readouterr()
    assert cd_convert([str(out), "-o", str(native_out), "--other-layers", "keep"]) == 1
    assert capsys.readouterr().err == (
        f"cd-convert: error: --other-layers keep carries a LoRA's UNet modules beyond the cross-attention K/V into the "
        f"output, and {native_out} is written as native, which holds the K/V alone; write a LoRA (diffusers-lora or "
        f"kohya-lora), or choose --other-layers drop.\n")
    assert not native_out.exists()
    converted = tmp_path / "converted-lora"
    assert cd_convert([str(out), "-o", str(converted), "--to", "diffusers-lora", "--other-layers", "keep"]) == 0
    back = load(converted, other_layers="keep")
    assert sorted(back.other_modules) == sorted(written.other_modules)
    for module, part in written.other_modules.items():
        assert torch.allclose(back.other_modules[module].dense(), part.dense(), rtol=1e-5, atol=1e-7), module
    assert back.allclose(written, atol=1e-7)
    assert cd_convert([str(out), "-o", str(tmp_path / "kv.safetensors"), "--other-layers", "drop"]) == 0
    assert load(tmp_path / "kv.safetensors").other_modules == {}

    recorded = written.metadata["recipe"]
    with pytest.warns(UserWarning, match="has no modifier token"):
        again = merge([folder, native], base=tiny_pipeline_path("sd1"), class_words=["sks dog", "cat"],
                      options=MergeOptions.from_recipe(recorded))
    assert sorted(again.other_modules) == sorted(written.other_modules)
    assert again.allclose(written, atol=1e-6)


def test_a_plan_keeping_other_modules_is_not_executed_under_another_rule(tiny_pipeline_path, tmp_path):
    folder, _ = _peft_lora(tiny_pipeline_path, tmp_path / "peft", MORE_LAYERS)
    plan = plan_merge([str(folder)], CAPTIONS, base=tiny_pipeline_path("sd1"), class_words=["dog"],
                      other_layers="keep")
    with pytest.raises(MergeError) as error:
        execute(plan, MergeOptions(other_layers="drop"))
    assert str(error.value) == (f"{folder} was planned with its LoRA modules beyond the cross-attention K/V kept, but "
                                f"the merge's other_layers is drop; plan it with that rule.")


def test_other_layers_sum_into_an_output_that_cannot_hold_them_is_refused_before_any_work(
        tiny_pipeline_path, tiny_delta_files, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    assert cd_merge([str(tiny_delta_files("sd1")["native"]), "--base", str(tiny_pipeline_path("sd1")), "-o", str(out),
                     "-q", "--other-layers", "sum"]) == 1
    assert capsys.readouterr().err == (
        f"cd-merge: error: --other-layers sum carries the LoRA inputs' UNet modules beyond the cross-attention K/V "
        f"into the output, and {out} is written as native, which holds the K/V alone; write a LoRA (format "
        f"diffusers-lora or kohya-lora), or choose --other-layers drop.\n")
    with pytest.raises(MergeError, match="other_layers 'all': choose one of refuse, drop, sum, average"):
        merge([tiny_delta_files("sd1")["native"]], CAPTIONS, base=tiny_pipeline_path("sd1"), other_layers="all")


def test_a_loras_text_encoder_parts_are_dropped_with_a_warning_saying_why(merged, tiny_pipeline_path, tmp_path,
                                                                          capsys):
    path = tmp_path / "with-te.safetensors"
    save_file({**_kohya_state(merged), f"{_TEXT_ENCODER}.lora_down.weight": torch.zeros(2, 8),
               f"{_TEXT_ENCODER}.lora_up.weight": torch.zeros(8, 2), f"{_TEXT_ENCODER}.alpha": torch.tensor(2.0)}, path)
    warning = (f"{path}: its text-encoder parts (1 module) are dropped: they change the text features the merge is "
               f"computed on, so no merge can keep them (the merged file works with the base's text encoders).")
    for rule in ("drop", "keep"):
        with pytest.warns(UserWarning) as caught:
            delta = load(path, other_layers=rule)
        assert [str(w.message) for w in caught] == [warning]
        assert delta.other_modules == {} and delta.unread_parts == ()
    out = tmp_path / "merged.safetensors"
    assert cd_merge([str(path), "--base", str(tiny_pipeline_path("sd1")), "-o", str(out), "-q", "--class", "cat,dog",
                     "--other-layers", "drop"]) == 0
    captured = capsys.readouterr()
    assert f"cd-merge: warning: {warning}" in captured.err.splitlines()
    assert f"note: other layers drop: {path}: 1 text-encoder module dropped (text-encoder parts)" in captured.out


def test_apply_and_cd_sample_refuse_a_lora_with_more_than_kv_unless_drop_is_chosen(
        merged, tiny_pipeline_path, tmp_path, capsys):
    """apply installs K/V alone, so it goes through load's rule: a LoRA's other modules (a file's,
    or a loaded delta's kept ones) are refused naming them, before the pipeline changes; drop
    installs the K/V alone; text-encoder parts are dropped with cd-merge's warning."""
    from mergekit_cd.cli import sample as cd_sample

    folder, _ = _peft_lora(tiny_pipeline_path, tmp_path / "peft", MORE_LAYERS)
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_path("sd1"))
    layer = next(name for name, module in pipe.unet.named_modules() if name.endswith("attn2"))
    before = pipe.unet.get_submodule(layer).to_k.weight.detach().clone()
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    refusal = (f"{{source}}: holds parts beyond the UNet's cross-attention K/V (self-attention, feed-forward, "
               f"cross-attention queries and outputs; e.g. {block}.attn1.to_k, {block}.attn1.to_out.0); apply "
               f"installs attn2.to_k / attn2.to_v alone, and will not drop the rest silently. Choose with {{option}}: "
               f"drop (install the K/V alone; diffusers' load_lora_weights installs a LoRA's other modules).")
    for given, source in ((folder, str(folder)), (load(folder, other_layers="keep"), "the delta")):
        with pytest.raises(MergeError) as error:
            apply(pipe, given)
        assert str(error.value) == refusal.format(source=source, option="other_layers")
        assert torch.equal(pipe.unet.get_submodule(layer).to_k.weight, before)
    installed = apply(pipe, folder, other_layers="drop")
    assert installed.other_modules == {} and installed.unread_parts == ()
    kv = load(folder, other_layers="drop").layers[layer].key
    assert torch.allclose(pipe.unet.get_submodule(layer).to_k.weight - before, dense(kv), atol=1e-6)

    with_te = tmp_path / "with-te.safetensors"
    save_file({**_kohya_state(merged), f"{_TEXT_ENCODER}.lora_down.weight": torch.zeros(2, 8),
               f"{_TEXT_ENCODER}.lora_up.weight": torch.zeros(8, 2), f"{_TEXT_ENCODER}.alpha": torch.tensor(2.0)},
              with_te)
    with pytest.warns(UserWarning) as caught:
        apply(DiffusionPipeline.from_pretrained(tiny_pipeline_path("sd1")), with_te, other_layers="drop")
    assert [str(w.message) for w in caught] == [
        f"{with_te}: its text-encoder parts (1 module) are dropped: they change the text features the merge is "
        f"computed on, so no merge can keep them (the merged file works with the base's text encoders)."]

    arguments = ["--base", str(tiny_pipeline_path("sd1")), "--delta", str(folder), "a dog", "-n", "1", "--steps", "1",
                 "-q", "-o", str(tmp_path / "grid.png")]
    capsys.readouterr()  # the pipelines loaded above
    assert cd_sample.main(arguments) == 1
    assert capsys.readouterr().err == f"cd-sample: error: {refusal.format(source=folder, option='--other-layers')}\n"
    assert not (tmp_path / "grid.png").exists()
    assert cd_sample.main([*arguments, "--other-layers", "drop"]) == 0 and (tmp_path / "grid.png").is_file()


def test_other_modules_round_trip_through_both_lora_layouts_and_the_algebra(tiny_pipeline_path, tmp_path):
    folder, differences = _peft_lora(tiny_pipeline_path, tmp_path / "peft", MORE_LAYERS)
    delta = load(folder, other_layers="keep")
    assert sorted(delta.other_modules) == sorted(module for module in differences if not _is_kv(module))
    for output_format, path in (("kohya-lora", tmp_path / "k.safetensors"), ("diffusers-lora", tmp_path / "d")):
        back = load(save(delta, path, format=output_format), other_layers="keep")
        assert back.allclose(delta, atol=1e-7), output_format
    doubled = delta + delta
    module = next(iter(delta.other_modules))
    assert doubled.other_modules[module].rank == 2 * delta.other_modules[module].rank
    assert torch.allclose(doubled.other_modules[module].dense(), (2 * delta).other_modules[module].dense(), atol=1e-7)
    assert (delta - delta).other_modules[module].dense().abs().max() <= 1e-7
    with pytest.raises(MergeError, match="which only diffusers-lora or kohya-lora hold; write one of those"):
        save(delta, tmp_path / "native.safetensors")


@pytest.mark.parametrize("module, architecture, name", [
    ("down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0", "sd1",
     "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_out_0"),
    ("up_blocks.1.attentions.2.proj_in", "sd1", "lora_unet_up_blocks_1_attentions_2_proj_in"),
    ("mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj", "sd1",
     "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj"),
    ("down_blocks.1.resnets.0.time_emb_proj", "sd1", "lora_unet_down_blocks_1_resnets_0_time_emb_proj"),
    ("down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q", "sdxl",
     "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"),
    ("up_blocks.0.attentions.2.transformer_blocks.9.ff.net.2", "sdxl",
     "lora_unet_output_blocks_2_1_transformer_blocks_9_ff_net_2"),
])
def test_kohya_names_of_other_modules_are_the_ones_kohya_writes_and_read_back(module, architecture, name):
    from mergekit_cd.formats import kohya_lora

    assert kohya_lora.kohya_name(module, architecture) == name
    assert kohya_lora.module_of(name) == module


# ---------------------------------------------------------------- embedding files as inputs, and paired
def _a1111_embedding(path: Path, rows: torch.Tensor) -> Path:
    """An embedding as AUTOMATIC1111 saves it: a pickle with the rows as a trained Parameter."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(rows.clone())},
                "name": path.stem, "step": 500, "sd_checkpoint": "4bdfc29c", "sd_checkpoint_name": "base"}, path)
    return path


def test_an_embedding_file_on_its_own_is_a_concept_on_the_bases_kv(tiny_pipeline_path, tiny_delta_files, tmp_path,
                                                                   capsys):
    base = open_base(tiny_pipeline_path("sd1"))
    row = torch.randn(1, base.token_dims()[0], generator=torch.Generator().manual_seed(2))
    embedding = _a1111_embedding(tmp_path / "<sks>.pt", row)
    delta = load(embedding, base=base)
    assert list(delta.tokens) == ["<sks>"] and torch.equal(delta.tokens["<sks>"][0], row[0])
    assert not delta.tokens["<sks>"][0].requires_grad
    assert all(layer.rows().abs().max() == 0 for layer in delta.layers.values())
    arguments = [str(tiny_delta_files("sd1")["native"]), str(embedding), "--base", str(tiny_pipeline_path("sd1")),
                 "--class", "cat", "--class", "dog", "-o", str(tmp_path / "merged.safetensors"), "-q", "--ridge", "1e-4"]
    assert cd_merge([*arguments, "--dry-run"]) == 0
    assert any(line.split()[:3] == [str(embedding), "embedding", "<sks>"] for line in capsys.readouterr().out.splitlines())
    assert cd_merge(arguments) == 0
    assert max(_residuals(capsys.readouterr().out)) < 1e-5
    with pytest.raises(MergeError) as error:
        load(embedding)
    assert str(error.value) == (f"{embedding} is a token embedding file: as an input it is its token on the base's "
                                f"unchanged K/V weights; give the base model (--base).")


def test_embedding_files_of_the_wrong_width_several_vectors_or_unknown_layout_are_one_error_naming_them(
        tiny_pipeline_path, tmp_path):
    base = open_base(tiny_pipeline_path("sd1"))
    width = base.token_dims()[0]
    wide = tmp_path / "wide.safetensors"
    save_file({"clip_l": torch.zeros(1, width), "clip_g": torch.zeros(1, width)}, wide)  # SDXL's, for SD1
    with pytest.raises(MergeError) as error:
        load(wide, base=base)
    assert str(error.value) == (f"{wide}: token wide has embedding sizes ({width}, {width}), but the text "
                                f"encoder(s) of {base.name} need ({width},).")
    several = _a1111_embedding(tmp_path / "several.pt", torch.zeros(3, width))
    with pytest.raises(MergeError) as error:
        load(several, base=base)
    assert str(error.value) == (f"{several}: token embedding string_to_param['*'] holds 3 vectors; a Custom "
                                f"Diffusion token is one (a multi-vector textual inversion cannot be merged as one "
                                f"token).")
    unknown = tmp_path / "unknown.safetensors"
    save_file({"clip_l": torch.zeros(1, width), "extra": torch.zeros(1)}, unknown)
    with pytest.raises(MergeError) as error:
        load(unknown, base=base)
    assert str(error.value) == (f"{unknown}: expected a token embedding file as an input ({{'<token>': vector}}, "
                                f"{{'clip_l', 'clip_g'}} for SDXL, {{'emb_params'}} or A1111's string_to_param), "
                                f"found keys ['clip_l', 'extra'].")


def test_an_embedding_paired_with_a_tokenless_lora_makes_one_concept(tiny_pipeline_path, tiny_delta_files, tmp_path,
                                                                    capsys):
    folder, _ = _peft_lora(tiny_pipeline_path, tmp_path / "peft", ["attn2.to_k", "attn2.to_v"])
    base = open_base(tiny_pipeline_path("sd1"))
    row = torch.randn(1, base.token_dims()[0], generator=torch.Generator().manual_seed(4))
    embedding = _a1111_embedding(tmp_path / "<sks>.pt", row)
    out = tmp_path / "merged.safetensors"
    arguments = [str(folder), str(tiny_delta_files("sd1")["native"]), "--base", str(tiny_pipeline_path("sd1")),
                 "--class", "dog", "--class", "cat", "-o", str(out), "-q", "--ridge", "1e-4"]
    assert cd_merge([*arguments, "--embedding", f"1={embedding}", "--dry-run"]) == 0
    rows = [line.split()[:4] for line in capsys.readouterr().out.splitlines()]
    assert [str(folder), "diffusers-lora", "<sks>", "dog"] in rows, rows
    assert cd_merge([*arguments, "--embedding", f"{folder}={embedding}"]) == 0
    assert max(_residuals(capsys.readouterr().out)) < 1e-5
    written = load(out)
    assert [concept.token for concept in written.concepts] == ["<sks>", "<new1>"]
    assert torch.equal(written.tokens["<sks>"][0], row[0])
    assert cd_merge([*arguments, "--embedding", f"3={embedding}"]) == 1
    assert capsys.readouterr().err == (
        f"cd-merge: error: --embedding 3={embedding}: expected INPUT=FILE[:TOKEN], INPUT an input's position (1-2) or "
        f"its name as given (e.g. --embedding '1=sks.pt:<sks>').\n")
    with pytest.raises(MergeError) as error:
        load(tiny_delta_files("sd1")["native"], base=base, embeddings=[_a1111_embedding(tmp_path / "<new1>.pt", row)])
    assert str(error.value) == (f"{tmp_path / '<new1>.pt'}: token <new1> is already in "
                                f"{tiny_delta_files('sd1')['native']}; a token can be paired once.")


def test_a_kohya_loras_bundled_embeddings_must_agree_with_the_files_beside_it(merged, tmp_path):
    """Both as kohya-lora writes them read back (the merged fixture's file), and under the names it
    used to write (``<new1>.safetensors``); a stale file beside is one error."""
    state = _kohya_state(merged)
    save_file(state, tmp_path / "x.safetensors")
    folder = tmp_path / "x_embeddings"
    folder.mkdir()
    for token in ("<new1>", "<new2>"):
        (folder / f"{token}.safetensors").write_bytes((merged["sd1"]["kohya"].parent / "merged_embeddings" /
                                                       f"{token[1:-1]}.safetensors").read_bytes())
    assert set(load(tmp_path / "x.safetensors").tokens) == {"<new1>", "<new2>"}
    save_file({"emb_params": torch.zeros(1, merged["sd1"]["base"].token_dims()[0])}, folder / "<new2>.safetensors")
    with pytest.raises(MergeError) as error:
        load(tmp_path / "x.safetensors")
    assert str(error.value) == (f"{tmp_path / 'x.safetensors'}: its bundled embeddings (<new1>, <new2>) differ from "
                                f"the embedding files in {folder} (<new1>, <new2>); a LoRA's tokens must be one set. "
                                f"Remove or replace the stale one.")


def test_the_readme_example_pairs_an_a1111_file_named_by_a_vocabulary_word_under_a_new_name(
        tiny_pipeline_path, tiny_delta_files, tmp_path, capsys, monkeypatch):
    """A1111 names a token by its file stem, and ``sks`` is one word of the vocabulary: refused in one
    line naming the file and the way out (``FILE:TOKEN``), paired or on its own; the README's
    command, with the new name, merges a kohya LoRA of more layers with a concept."""
    import shutil

    folder, _ = _peft_lora(tiny_pipeline_path, tmp_path / "peft", MORE_LAYERS)
    save(load(folder, other_layers="keep"), tmp_path / "lora.safetensors", format="kohya-lora")
    shutil.copytree(tiny_delta_files("sd1")["diffusers"], tmp_path / "cat")
    base = open_base(tiny_pipeline_path("sd1"))
    row = torch.randn(1, base.token_dims()[0], generator=torch.Generator().manual_seed(6))
    _a1111_embedding(tmp_path / "sks.pt", row)
    monkeypatch.chdir(tmp_path)
    command = ["lora.safetensors", "cat/", "-o", "merged.safetensors", "--base", str(tiny_pipeline_path("sd1")),
               "--format", "kohya-lora", "--other-layers", "sum", "--class", "dog", "--class", "cat", "-q"]
    capsys.readouterr()
    assert cd_merge([*command, "--embedding", "lora.safetensors=sks.pt"]) == 1
    in_vocabulary = ("sks.pt: its token sks is already in the base model's vocabulary (AUTOMATIC1111 and kohya name an "
                     "embedding's token by its file name); a modifier token must be new: ")
    assert capsys.readouterr().err == (
        f"cd-merge: error: {in_vocabulary}give it a new name, --embedding 'INPUT=sks.pt:<sks>' (in Python, "
        f"embeddings=[(\"sks.pt\", \"<sks>\")]).\n")
    assert cd_merge(["cat/", "sks.pt", *command[2:]]) == 1
    assert capsys.readouterr().err == (
        f"cd-merge: error: {in_vocabulary}as an input of its own, rename the file to a new word (e.g. sks_emb.pt), or "
        f"pair it with an input under a new name (--embedding 'INPUT=sks.pt:<sks>').\n")
    assert cd_merge([*command, "--embedding", "lora.safetensors=sks.pt:<sks>"]) == 0
    written = load("merged.safetensors", other_layers="keep")
    assert [concept.token for concept in written.concepts] == ["<sks>", "<new1>"]
    assert torch.equal(written.tokens["<sks>"][0], row[0]) and written.other_modules
    assert load("lora.safetensors", base=base, other_layers="drop",
                embeddings=[("sks.pt", "<sks>")]).tokens.keys() == {"<sks>"}


@pytest.mark.parametrize("spec, files", [
    ("1=sks.pt", ["sks.pt"]), ("1=sks.pt:<sks>", [("sks.pt", "<sks>")]), ("1=C:\\emb\\sks.pt", ["C:\\emb\\sks.pt"]),
    ("1=C:\\emb\\sks.pt:<sks>", [("C:\\emb\\sks.pt", "<sks>")]), ("a=x.pt:<x>", [("x.pt", "<x>")]),
])
def test_embedding_specs_split_off_a_new_token_name_after_the_last_colon(spec, files):
    from mergekit_cd.cli._common import paired_embeddings

    assert paired_embeddings(["a"], [spec]) == [files]


def test_one_embedding_file_used_twice_is_refused_naming_both_uses(tiny_pipeline_path, tiny_delta_files, tmp_path,
                                                                   capsys):
    """Paired with two inputs (renamed or not), or an input and paired too: one token would trigger
    two concepts with conflicting constraints."""
    base = open_base(tiny_pipeline_path("sd1"))
    embedding = _a1111_embedding(tmp_path / "x.pt", torch.randn(1, base.token_dims()[0]))
    first, second = str(tiny_delta_files("sd1")["native"]), str(tiny_delta_files("sd1")["other-native"])
    common = ["--base", str(tiny_pipeline_path("sd1")), "-o", str(tmp_path / "m.safetensors"), "-q"]
    twice = "The embedding file {path} is given twice, {first} and {second}: its token would be the trigger of two " \
            "concepts, whose constraints conflict; give it once."
    capsys.readouterr()  # the fixtures' progress
    assert cd_merge([first, second, *common, "--embedding", f"1={embedding}", "--embedding", f"2={embedding}"]) == 1
    assert capsys.readouterr().err == "cd-merge: error: " + twice.format(
        path=embedding, first=f"paired with input 1 ({first})", second=f"paired with input 2 ({second})") + "\n"
    assert cd_merge([first, str(embedding), *common, "--embedding", f"1={tmp_path}/./x.pt:<y>"]) == 1
    assert capsys.readouterr().err == "cd-merge: error: " + twice.format(
        path=f"{tmp_path}/x.pt", first=f"as input 2 ({embedding})", second=f"paired with input 1 ({first})") + "\n"
    with pytest.raises(MergeError) as error:
        plan_merge([first, second], CAPTIONS, base=base, embeddings=[[embedding], [(embedding, "<y>")]])
    assert str(error.value) == twice.format(path=embedding, first=f"paired with input 1 ({first})",
                                            second=f"paired with input 2 ({second})")


def test_cd_inspect_counts_a_loras_modules_beyond_kv_by_kind_and_reads_embedding_files(
        merged, tiny_pipeline_path, tmp_path, capsys):
    """What a merge would refuse is shown, counted in modules by the kinds its refusal names; an
    embedding file cd-merge reads as an input is shown with its token, widths and layout."""
    from mergekit_cd.cli import inspect as cd_inspect

    folder, differences = _peft_lora(tiny_pipeline_path, tmp_path / "peft", MORE_LAYERS)
    other = [module for module in differences if not _is_kv(module)]
    kinds = {"self-attention": sum(".attn1." in m for m in other), "feed-forward": sum(".ff." in m for m in other),
             "cross-attention queries and outputs": sum(".attn2." in m for m in other)}
    capsys.readouterr()
    assert cd_inspect.main([str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("beyond K/V:"))
    assert lines[start] == (f"beyond K/V:   {len(other)} LoRA modules the merge does not solve for (cd-merge "
                            f"--other-layers), e.g. down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k")
    assert {line.rsplit(maxsplit=1)[0].strip(): int(line.split()[-1]) for line in lines[start + 1:start + 4]} == kinds

    with_te = tmp_path / "with-te.safetensors"
    save_file({**_kohya_state(merged), f"{_TEXT_ENCODER}.lora_down.weight": torch.zeros(2, 8),
               f"{_TEXT_ENCODER}.lora_up.weight": torch.zeros(8, 2), f"{_TEXT_ENCODER}.alpha": torch.tensor(2.0)},
              with_te)
    assert cd_inspect.main([str(with_te)]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("beyond K/V:"))
    assert lines[start].startswith("beyond K/V:   1 LoRA module the merge") and lines[start + 1].split() == [
        "text-encoder", "parts", "1"]

    width = merged["sd1"]["base"].token_dims()[0]
    embedding = _a1111_embedding(tmp_path / "sks.pt", torch.zeros(1, width))
    assert cd_inspect.main([str(embedding)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"file:         {embedding}",
        "format:       embedding (AUTOMATIC1111 string_to_param, named by its file)",
        f"architecture: unknown, text features: {width}",
        "base:         not recorded",
        f"tokens:       sks [{width}]",
        "layers:       none: a token embedding file (as a cd-merge input, its token on the base's unchanged K/V)"]
    sdxl = merged["sdxl"]["kohya"].parent / "merged_embeddings" / "new1.safetensors"
    assert cd_inspect.main([str(sdxl), "--base", str(tiny_pipeline_path("sdxl"))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "format:       embedding (SDXL clip_l / clip_g, named by its file)"
    assert lines[2].startswith("architecture: sdxl (from the base)")
    assert lines[5] == f"tokens:       <new1> {list(merged['sdxl']['base'].token_dims())}"
    assert cd_inspect.main([str(sdxl), "--base", str(tiny_pipeline_path("sd1"))]) == 1
    assert "token <new1> has embedding sizes" in capsys.readouterr().err


def test_counts_and_shapes_in_messages_read_as_words(merged, tmp_path):
    """One module is "1 UNet module"; text-encoder parts are counted in modules, as UNet parts
    are; a shape is a plain tuple; a concept with no token is shown as such by cd-inspect."""
    from mergekit_cd.loading import load_source
    from mergekit_cd.summary import summarize

    state = _kohya_state(merged)
    one = tmp_path / "one.safetensors"
    save_file({**state, f"{_SELF_ATTENTION}.lora_down.weight": torch.zeros(2, 8),
               f"{_SELF_ATTENTION}.lora_up.weight": torch.zeros(8, 2)}, one)
    assert load_source(one, other_layers="drop").other_layers == (
        "1 UNet module beyond the cross-attention K/V dropped (self-attention)")

    value = next(key for key in state if "attn2_to_v" in key and key.endswith("lora_down.weight"))
    wide = state[value].shape
    save_file({**state, value: torch.zeros(wide[0], wide[1] + 1)}, tmp_path / "shapes.safetensors")
    key = state[value.replace("to_v", "to_k").replace("lora_down", "lora_up")].shape[0]
    with pytest.raises(MergeError) as error:
        load(tmp_path / "shapes.safetensors")
    assert str(error.value).endswith(f"has K and V parts of different shapes [({key}, {wide[1]}), "
                                     f"({key}, {wide[1] + 1})].")

    delta = merged["sd1"]["delta"]
    tokenless = type(delta)(delta.layers, {}, architecture=delta.architecture,
                            concepts=(Concept("", "dog", ("dog",)),))
    summary = summarize(save(tokenless, tmp_path / "tokenless.safetensors"))
    assert summary.concepts == ("(no token) = dog",)
