"""cd-merge end to end on the tiny SD1, SD2 and SDXL models, checked against features computed here.

The check is independent of the library's feature code: tokens are installed and prompts
encoded with transformers directly, and the authors' row rule is re-implemented below.
"""

from __future__ import annotations

import pickle
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_cd import formats
from mergekit_cd.base import open_base
from mergekit_cd.cli.merge import main as cd_merge
from mergekit_cd.delta import ConceptDelta, LowRank, compress, dense
from mergekit_cd.loading import save
from mergekit_cd.captions import default_reg_captions
from mergekit_cd.merge import merge
from mergekit_cd.merge_options import MergeOptions
from mergekit_cd.testing import random_concept_delta, save_like_diffusers_bin
from mergekit_cd.weights import FineTunedWeights

from cli_output import one_error_line
from hubcache import add_to_hub_cache, use_hub_cache

CONCEPTS = [("<new1>", "cat"), ("<new2>", "pot"), ("<new3>", "dog")]
NUM_REG = 300  # keeps each run to a few seconds; the full set is exercised by the API tests
HELD_OUT = ["a red bicycle leaning on a brick wall", "two boats on a calm lake at dawn",
            "a bowl of oranges on a kitchen table", "an old man reading a newspaper in a park",
            "a watercolor of a lighthouse in a storm", "a golden retriever running on the beach"]
#: input kind -> (format, file name, compressed): every format, and the authors' compressed variants
INPUT_KINDS = {"native": ("native", "{i}.safetensors", False), "diffusers": ("diffusers", "{i}", False),
               "authors-bin": ("authors-bin", "{i}/delta.bin", False),
               "authors-bin-compressed": ("authors-bin", "{i}/compressed_delta.bin", True),
               "compvis": ("compvis", "{i}/delta_epoch=000001.ckpt", False),
               "compvis-compressed": ("compvis", "{i}/compressed_delta_epoch=000001.ckpt", True)}


@pytest.fixture(scope="module")
def bases(tiny_pipeline_path):
    return {arch: open_base(tiny_pipeline_path(arch)) for arch in ("sd1", "sd2", "sdxl")}


@pytest.fixture(scope="module")
def concept_deltas(bases):
    return {arch: [random_concept_delta(base, token, word, seed=10 + i)
                   for i, (token, word) in enumerate(CONCEPTS)] for arch, base in bases.items()}


# ----------------------------------------------------------------------------- independent features


def encode(base_path: Path, architecture: str, prompt: str, tokens: dict[str, tuple[torch.Tensor, ...]], *,
           padded: bool = False):
    """Token features of ``prompt`` as the UNet's cross-attention reads them, rows kept by the authors' rule;
    ``padded``: every row, tokenized as diffusers' encode_prompt does (padded to the tokenizer's
    max length with its own pad token), and the slice of the authors' rows among them."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    parts = [("tokenizer", "text_encoder", CLIPTextModel)]
    if architecture == "sdxl":
        parts.append(("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection))
    outputs = []
    for index, (tokenizer_name, encoder_name, model_class) in enumerate(parts):
        tokenizer = CLIPTokenizer.from_pretrained(base_path / tokenizer_name)
        encoder = model_class.from_pretrained(base_path / encoder_name).eval()
        tokenizer.add_tokens(list(tokens))
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for token, embeddings in tokens.items():
                encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(token)] = embeddings[index]
            padding = dict(padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
            ids = tokenizer(prompt, return_tensors="pt", **(padding if padded else {})).input_ids
            result = encoder(ids, output_hidden_states=True)
            num_tokens = len(tokenizer(prompt).input_ids)
        outputs.append(result.hidden_states[-2] if architecture == "sdxl" else result.last_hidden_state)
    features = torch.cat(outputs, dim=-1)[0].double()
    first_kept = 4 if "photo of a" in prompt[:15] else 1
    return (features, slice(first_kept, num_tokens)) if padded else features[first_kept:]


def merged_weights(output: Path, base) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Full merged K/V weights per layer, from whatever cd-merge wrote."""
    content = formats.read(output)
    if isinstance(content, FineTunedWeights):
        return {name: (k.double(), v.double()) for name, (k, v) in content.layers.items()}
    return {name: (base.kv(name)[0].double() + dense(layer.key).double(),
                   base.kv(name)[1].double() + dense(layer.value).double())
            for name, layer in content.layers.items()}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def check_merge(output: Path, base, architecture: str, deltas: list[ConceptDelta], merged_tokens: dict):
    """Every concept keeps its outputs on its target prompts; held-out drift below the naive sum's."""
    weights = merged_weights(output, base)
    assert set(weights) == set(base.layer_names())
    for delta, (token, word) in zip(deltas, CONCEPTS):
        embedding = delta.tokens[token]
        name = next(t for t, e in merged_tokens.items() if all(torch.equal(x, y) for x, y in zip(e, embedding)))
        for template in ("{} {}", "photo of a {} {}"):
            C = encode(base.path, architecture, template.format(name, word), {name: embedding})
            for layer in base.layer_names():
                for which, index in (("key", 0), ("value", 1)):
                    own = (base.kv(layer)[index].double() + dense(getattr(delta.layers[layer], which)).double()) @ C.T
                    assert relative(weights[layer][index] @ C.T, own) < 1e-5, (layer, which, template)
    drift = naive = base_norm = 0.0
    for caption in HELD_OUT:
        C = encode(base.path, architecture, caption, {})
        for layer in base.layer_names():
            for index, which in ((0, "key"), (1, "value")):
                W0 = base.kv(layer)[index].double()
                total = sum(dense(getattr(d.layers[layer], which)).double() for d in deltas)
                drift += float(((weights[layer][index] - W0) @ C.T).norm() ** 2)
                naive += float((total @ C.T).norm() ** 2)
                base_norm += float((W0 @ C.T).norm() ** 2)
    assert drift < 0.5 * naive, (drift / base_norm, naive / base_norm)


# ----------------------------------------------------------------------------- the CLI, every format


def write_inputs(tmp_path: Path, kind: str, deltas: list[ConceptDelta], base) -> tuple[list[str], list[ConceptDelta]]:
    """The input files of one kind, and the deltas they hold (compressed ones: the factors stored)."""
    fmt, name, compressed = INPUT_KINDS[kind]
    paths, stored = [], []
    for i, delta in enumerate(deltas):
        path = tmp_path / name.format(i=f"concept{i}")
        path.parent.mkdir(parents=True, exist_ok=True)
        if compressed:  # the authors' compressed files hold factors only, of a lossy rank here
            delta, _ = compress(delta, rtol=0.05, dense_fallback=False)
        save(delta, path, format=fmt, base=base)
        paths.append(str(path))
        stored.append(delta)
    return paths, stored


CASES = [(arch, kind) for arch in ("sd1", "sd2", "sdxl") for kind in INPUT_KINDS
         if not (arch == "sdxl" and kind.startswith("compvis"))]


@pytest.mark.parametrize("architecture, kind", CASES)
def test_cli_merge_keeps_every_concept_and_drifts_less_than_the_sum(architecture, kind, bases, concept_deltas,
                                                                    tmp_path, capsys):
    base = bases[architecture]
    inputs, deltas = write_inputs(tmp_path, kind, concept_deltas[architecture], base)
    if INPUT_KINDS[kind][2]:
        assert all(isinstance(formats.read(path).layers[base.layer_names()[0]].key, LowRank) for path in inputs)
    output = tmp_path / "merged.safetensors"
    # every format records class words and token names (the pickles in one metadata entry)
    code = cd_merge([*inputs, "-o", str(output), "--base", str(base.path), "--num-reg-captions", str(NUM_REG),
                     "-q"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "held-out drift" in printed.out and f"wrote {output}" in printed.out
    assert "naive sum:" not in printed.out  # its drift only with --sum-drift
    if kind.startswith("compvis"):
        # the authors' sampler names a CompVis file's one row <new1>, so each file holds <new1> and the
        # merge gives the second and third theirs back, saying so
        assert [line for line in printed.out.splitlines() if "renamed" in line] == [
            f"token <new1> of {inputs[i]} renamed to <new{i + 1}>" for i in (1, 2)]
    else:
        assert "renamed" not in printed.out
    merged = formats.read(output)
    assert merged.base_fingerprint == base.fingerprint and merged.architecture == architecture
    assert [c.class_word for c in merged.concepts] == [w for _, w in CONCEPTS]
    assert list(merged.tokens) == [t for t, _ in CONCEPTS]
    assert merged.metadata["recipe"]["method"] == "constrained"
    check_merge(output, base, architecture, deltas, merged.tokens)


def diffusers_training_output(folder: Path, base, delta: ConceptDelta, *, weights_format: str) -> Path:
    """The output folder of diffusers' ``train_custom_diffusion.py`` for ``delta``, built as that
    script writes it (REFERENCE section 3), with no mergekit-cd metadata: full fine-tuned K/V
    weights under the attention processors' names, and one ``<new1>`` file holding the token's
    row of the whole embedding table. The ``.bin`` variant is :func:`save_like_diffusers_bin`
    (grad-requiring tensors, the whole table pickled, ``{}`` for processors without weights)."""
    (embedding,) = next(iter(delta.tokens.values()))
    weights = FineTunedWeights.from_delta(replace(delta, tokens={"<new1>": (embedding,)}, concepts=()), base.kv)
    if weights_format == "bin":
        return save_like_diffusers_bin(weights, folder)
    folder.mkdir()
    state = {f"{layer}.processor.{projection}_custom_diffusion.weight": matrix
             for layer, pair in weights.layers.items() for projection, matrix in zip(("to_k", "to_v"), pair)}
    table = torch.randn(500, embedding.shape[0])
    table[321] = embedding
    save_file(state, folder / "pytorch_custom_diffusion_weights.safetensors", metadata={"format": "pt"})
    save_file({"<new1>": table[321]}, folder / "<new1>.safetensors", metadata={"format": "pt"})
    return folder


def test_cli_merges_diffusers_training_outputs_given_class_words(bases, concept_deltas, tmp_path, capsys):
    """Three runs of diffusers' training script (each names its token <new1>), two saved as
    safetensors and one as .bin: they hold no class word, so --class gives them."""
    base, deltas = bases["sd1"], concept_deltas["sd1"]
    inputs = [str(diffusers_training_output(tmp_path / f"run{i}", base, delta, weights_format=kind))
              for i, (delta, kind) in enumerate(zip(deltas, ("safetensors", "bin", "safetensors")))]
    output = tmp_path / "merged.safetensors"
    arguments = [*inputs, "-o", str(output), "--base", str(base.path), "--num-reg-captions", str(NUM_REG), "-q"]
    assert cd_merge(arguments) == 1
    assert "No class word for <new1> of" in capsys.readouterr().err and not output.exists()
    code = cd_merge([*arguments, *(arg for _, word in CONCEPTS for arg in ("--class", word))])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "renamed to <new2>" in printed.out and "renamed to <new3>" in printed.out
    merged = formats.read(output)
    assert merged.base_fingerprint == base.fingerprint
    assert [c.class_word for c in merged.concepts] == [w for _, w in CONCEPTS]
    check_merge(output, base, "sd1", deltas, merged.tokens)


def test_cli_writes_the_diffusers_layout_with_full_weights_and_token_files(bases, concept_deltas, tmp_path, capsys):
    base, deltas = bases["sd1"], concept_deltas["sd1"]
    inputs, _ = write_inputs(tmp_path, "native", deltas, base)
    output = tmp_path / "merged"
    assert cd_merge([*inputs, "-o", str(output), "--base", str(base.path), "--num-reg-captions", str(NUM_REG),
                     "-q"]) == 0
    assert sorted(p.name for p in output.iterdir()) == ["<new1>.safetensors", "<new2>.safetensors",
                                                       "<new3>.safetensors",
                                                       "pytorch_custom_diffusion_weights.safetensors"]
    weights = load_file(output / "pytorch_custom_diffusion_weights.safetensors")
    layer = base.layer_names()[0]
    assert f"{layer}.processor.to_k_custom_diffusion.weight" in weights
    check_merge(output, base, "sd1", deltas, formats.read(output).tokens)
    capsys.readouterr()


def row_residuals(output: Path, base, architecture: str, deltas: list[ConceptDelta], tokens: dict):
    """Over every concept, target prompt, layer, K and V: the largest relative residual of the written
    weights on the prompt's token rows, and the relative residual on its context rows (start,
    "photo of a", padding), each against the concept's own weights, with pipeline-rule features."""
    weights = merged_weights(output, base)
    token_worst, context_error, context_target = 0.0, 0.0, 0.0
    for delta, (token, word) in zip(deltas, CONCEPTS):
        for template in ("{} {}", "photo of a {} {}"):
            rows, kept = encode(base.path, architecture, template.format(token, word), {token: tokens[token]},
                                padded=True)
            context = torch.cat([rows[:kept.start], rows[kept.stop:]])
            for layer in base.layer_names():
                for which, index in (("key", 0), ("value", 1)):
                    own = base.kv(layer)[index].double() + dense(getattr(delta.layers[layer], which)).double()
                    token_worst = max(token_worst, relative(weights[layer][index] @ rows[kept].T, own @ rows[kept].T))
                    context_error += float(((weights[layer][index] - own) @ context.T).norm()) ** 2
                    context_target += float((own @ context.T).norm()) ** 2
    return token_worst, (context_error / context_target) ** 0.5


@pytest.mark.parametrize("architecture", ["sd1", "sdxl"])
def test_cli_hybrid_merge_keeps_the_token_rows_and_fits_the_context_rows_better(architecture, bases, concept_deltas,
                                                                               tmp_path, capsys):
    """--method hybrid --rows pipeline: every concept's outputs on its prompts' token rows are kept in
    the written file, as the paper's merge keeps them, and on the rows the UNet reads besides (start,
    padding) it is closer to each concept than the paper's merge, which leaves them free; the recipe
    names the rule and replays the merge."""
    base, deltas = bases[architecture], concept_deltas[architecture][:2]
    inputs, _ = write_inputs(tmp_path, "native", deltas, base)
    common = [*inputs, "--base", str(base.path), "--num-reg-captions", str(NUM_REG), "-q"]
    hybrid, constrained = tmp_path / "hybrid.safetensors", tmp_path / "constrained.safetensors"
    assert cd_merge([*common, "-o", str(hybrid), "--method", "hybrid", "--rows", "pipeline"]) == 0
    printed = capsys.readouterr().out
    assert "residual as written" in printed and "rank 12/12" in printed
    assert cd_merge([*common, "-o", str(constrained)]) == 0
    capsys.readouterr()
    merged = formats.read(hybrid)
    recipe = merged.metadata["recipe"]
    assert recipe["feature_rule"] == "pipeline-v1" and recipe["weights"] == [1000.0, 1000.0] and "mu" not in recipe
    assert recipe["options"]["method"] == "hybrid" and recipe["options"]["rows"] == "pipeline"
    assert formats.read(constrained).metadata["recipe"]["feature_rule"] == "authors-v1"
    hybrid_tokens, hybrid_context = row_residuals(hybrid, base, architecture, deltas, merged.tokens)
    constrained_tokens, constrained_context = row_residuals(constrained, base, architecture, deltas, merged.tokens)
    assert hybrid_tokens < 1e-5 and constrained_tokens < 1e-5
    assert hybrid_context < 0.5 * constrained_context, (hybrid_context, constrained_context)
    replayed = merge(deltas, base=base, options=MergeOptions.from_recipe(recipe),
                     reg_captions=default_reg_captions()[:NUM_REG])
    for name in base.layer_names():
        assert torch.equal(replayed.layers[name].rows(), merged.layers[name].rows()), name


def test_result_does_not_depend_on_input_order(bases, concept_deltas):
    base, deltas = bases["sd2"], concept_deltas["sd2"]
    forward = merge(deltas, None, base=base)
    backward = merge(deltas[::-1], None, base=base)
    for name in base.layer_names():
        for which in ("key", "value"):
            a, b = getattr(forward.layers[name], which), getattr(backward.layers[name], which)
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(a.abs().max()))
    assert forward.tokens.keys() == backward.tokens.keys()


def test_second_merge_reuses_the_cached_gram_matrix_without_the_text_encoder(bases, concept_deltas, monkeypatch):
    base, deltas = bases["sd1"], concept_deltas["sd1"]
    captions = [f"a photo of a house number {i}" for i in range(40)]
    first, first_report = merge(deltas[:2], captions, base=base, return_report=True)
    from mergekit_cd.base import BaseModel

    def refuse(*args, **kwargs):
        raise AssertionError("the second merge loaded a tokenizer or text encoder")

    monkeypatch.setattr(BaseModel, "load_text_encoder", refuse)
    monkeypatch.setattr(BaseModel, "load_tokenizers", refuse)
    second, second_report = merge(deltas[:2], captions, base=base, return_report=True)
    assert not first_report.gram_from_cache and second_report.gram_from_cache
    for name in base.layer_names():
        for which in ("key", "value"):
            assert torch.equal(getattr(first.layers[name], which), getattr(second.layers[name], which))
    assert second_report.concepts == first_report.concepts and second_report.drift == first_report.drift


#: cd-merge in a fresh interpreter; prints which of the heavy libraries it imported.
IMPORTS_OF_CD_MERGE = """
import sys
from mergekit_cd.cli.merge import main
try:
    code = main(sys.argv[1:])
except SystemExit as done:  # --help
    code = done.code
print(sorted(name for name in ("diffusers", "transformers") if name in sys.modules), code)
"""


def test_cd_merge_imports_no_diffusers_and_from_cached_features_no_transformers(tiny_delta_files,
                                                                               tiny_pipeline_path, tmp_path):
    """The text encoders and tokenizers are read through transformers, the K/V tensors through
    safetensors: cd-merge never imports diffusers (3 s, torch._dynamo with it), and a merge whose
    features are cached needs no text encoder, so not transformers either (0.7 s)."""
    import subprocess
    import sys

    files = tiny_delta_files("sd1")
    arguments = [str(files["native"]), str(files["other-native"]), "-o", str(tmp_path / "out.safetensors"),
                 "--base", str(tiny_pipeline_path("sd1")), "--num-reg-captions", "20", "--cache-dir",
                 str(tmp_path / "cache"), "--force", "-q"]

    def imported(*argv: str) -> str:
        result = subprocess.run([sys.executable, "-c", IMPORTS_OF_CD_MERGE, *argv], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()[-1]

    assert imported("--help") == "[] 0"
    assert imported(*arguments) == "['transformers'] 0"  # cold: the text encoder
    assert imported(*arguments) == "[] 0"  # cached


def test_methods_trade_fidelity_for_preservation(bases, concept_deltas):
    base, deltas = bases["sd1"], concept_deltas["sd1"]
    reports = {method: merge(deltas, None, base=base, method=method, return_report=True,
                             sum_drift=method == "constrained")[1]
               for method in ("constrained", "soft", "sum", "average")}
    assert reports["soft"].sum_drift is None  # the naive sum's drift only when asked: n d^2 a layer
    exact = max(c.residual for c in reports["constrained"].concepts)
    assert exact < 1e-5
    assert max(c.residual for c in reports["soft"].concepts) < max(c.residual for c in reports["sum"].concepts)
    assert reports["constrained"].drift < reports["sum"].drift
    assert reports["sum"].drift == pytest.approx(reports["constrained"].sum_drift)
    summed = merge(deltas, None, base=base, method="sum")
    name = base.layer_names()[0]
    expected = sum(dense(d.layers[name].key) for d in deltas)
    assert torch.allclose(summed.layers[name].key, expected, atol=1e-6)


def test_ridge_bounds_the_weight_change(bases, concept_deltas):
    base, deltas = bases["sd1"], concept_deltas["sd1"]
    _, plain = merge(deltas, None, base=base, return_report=True)
    _, damped = merge(deltas, None, base=base, ridge=10.0, return_report=True)
    assert damped.solve_info.relative_change < plain.solve_info.relative_change
    assert max(c.residual for c in damped.concepts) < 1e-5
    _, relative = merge(deltas, None, base=base, relative_ridge=1e-3, return_report=True)
    assert relative.solve_info.relative_change < 0.5 * plain.solve_info.relative_change
    assert relative.drift < 1.2 * plain.drift


def test_dry_run_prints_the_plan_and_writes_nothing(bases, concept_deltas, tmp_path, capsys):
    base, deltas = bases["sdxl"], concept_deltas["sdxl"]
    inputs, _ = write_inputs(tmp_path, "native", deltas, base)
    output = tmp_path / "merged.safetensors"
    assert cd_merge([*inputs, "-o", str(output), "--base", str(base.path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not output.exists()
    assert "sdxl" in out and "<new3>" in out and "photo of a <new2> pot" in out
    assert "18 constraint rows of rank 18" in out and "estimated peak memory" in out
    assert "native" in out  # the format each input was read in
    # every row of the padded prompts is a constraint of the constrained merge, only the tokens' of the hybrid
    assert cd_merge([*inputs, "-o", str(output), "--base", str(base.path), "--dry-run", "--rows", "pipeline"]) == 0
    assert f"method constrained, rows pipeline: {3 * 2 * 77} constraint rows" in capsys.readouterr().out
    assert cd_merge([*inputs, "-o", str(output), "--base", str(base.path), "--dry-run", "--rows", "pipeline",
                     "--method", "hybrid"]) == 0
    assert "method hybrid, rows pipeline: 18 constraint rows of rank 18" in capsys.readouterr().out
    assert not output.exists()


def test_dry_run_shows_style_and_object_templates_together(bases, concept_deltas, tmp_path, capsys):
    base, deltas = bases["sd1"], concept_deltas["sd1"]
    inputs, _ = write_inputs(tmp_path, "native", deltas, base)
    assert cd_merge([*inputs, "-o", str(tmp_path / "m.safetensors"), "--base", str(base.path), "--dry-run",
                     "--style", "2", "--target-template", "a {token} {class_word} toy",
                     "--style-template", "{token} art of {class_word}"]) == 0
    out = capsys.readouterr().out
    assert "a <new1> cat toy" in out and "<new2> art of pot" in out and "a <new3> dog toy" in out
    assert "photo of a" not in out


def test_base_and_deltas_as_hub_repo_ids_offline(bases, concept_deltas, tmp_path, monkeypatch, capsys):
    base, deltas = bases["sd1"], concept_deltas["sd1"]
    cache = tmp_path / "hf-cache"
    add_to_hub_cache(cache, "someone/tiny-sd1", base.path)
    for i, delta in enumerate(deltas[:2]):
        folder = tmp_path / f"repo{i}"
        folder.mkdir()
        save(delta, folder / "concept.safetensors")
        add_to_hub_cache(cache, f"someone/concept-{i}", folder)
    use_hub_cache(monkeypatch, cache, offline=True)
    output = tmp_path / "merged.safetensors"
    code = cd_merge(["someone/concept-0", "someone/concept-1", "-o", str(output), "--base", "someone/tiny-sd1",
                     "--num-reg-captions", str(NUM_REG), "-q"])
    assert code == 0, capsys.readouterr().err
    assert formats.read(output).base_fingerprint == base.fingerprint
    code = cd_merge(["someone/not-cached", "-o", str(tmp_path / "x.safetensors"), "--base", "someone/tiny-sd1"])
    assert code == 1
    assert "someone/not-cached" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad inputs


class RunsCode:
    """Unpickling this would create a file: the loader must refuse it without running it."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def bad_inputs(tmp_path: Path, base, other_base, sdxl_base, deltas) -> dict[str, tuple[list[str], str]]:
    """name -> (extra cd-merge arguments, expected message pattern)."""
    good = tmp_path / "good.safetensors"
    save(deltas[0], good)
    cases: dict[str, tuple[list[str], str]] = {}

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:200])
    cases["truncated file"] = ([str(truncated)], rf"{truncated}.*(truncated|corrupt)")

    noise = tmp_path / "noise.bin"
    noise.write_bytes(bytes(range(256)) * 8)
    cases["random bytes"] = ([str(noise)], rf"{noise}")

    payload = RunsCode()
    payload.marker = tmp_path / "code-ran"
    malicious = tmp_path / "malicious.bin"
    torch.save({"unet": payload}, malicious, pickle_protocol=2)
    cases["pickle that runs code"] = ([str(malicious)], rf"{malicious}.*(refused|refusing)")

    wrong_arch = tmp_path / "sdxl.safetensors"
    save(random_concept_delta(sdxl_base, "<x>", "cat"), wrong_arch)
    cases["wrong architecture"] = ([str(wrong_arch)], r"sdxl delta but .* is an sd1 model")

    other_delta = random_concept_delta(other_base, "<y>", "cat")
    wrong_base = tmp_path / "other-base.safetensors"
    save(other_delta, wrong_base)
    cases["wrong base"] = ([str(wrong_base)], r"made for another base model .*--no-base-check")

    wrong_base_bin = tmp_path / "other-base.bin"  # full weights of another base record it now too
    save(other_delta, wrong_base_bin, base=other_base)
    cases["wrong base .bin"] = ([str(wrong_base_bin)], rf"{wrong_base_bin} was made for another base model "
                                                       rf"\({other_base.name}, .*--no-base-check")

    nan = tmp_path / "nan.safetensors"
    tensors = load_file(good)
    first = next(k for k in tensors if k.endswith("to_k.diff"))
    tensors[first][0, 0] = float("nan")
    from safetensors import safe_open
    with safe_open(str(good), "pt") as handle:
        header = handle.metadata()
    save_file(tensors, nan, metadata=header)
    cases["NaN weights"] = ([str(nan)], rf"{nan}.*(NaN|non-finite|not finite)")

    missing = tmp_path / "missing.safetensors"
    partial = ConceptDelta({k: v for k, v in list(deltas[0].layers.items())[1:]}, deltas[0].tokens,
                           base=deltas[0].base, base_fingerprint=deltas[0].base_fingerprint,
                           architecture="sd1", concepts=deltas[0].concepts)
    save(partial, missing)
    cases["missing layers"] = ([str(missing)], r"missing 1 of 11 cross-attention layers")

    no_class = tmp_path / "no-class.bin"  # as the authors' scripts write it: no metadata
    save(deltas[1], no_class, format="authors-bin", base=base)
    contents = torch.load(no_class, weights_only=True)
    del contents["mergekit_cd"]
    torch.save(contents, no_class)
    cases["missing class word"] = ([str(good), str(no_class)], r"No class word .*--class WORD for every input")
    return cases


def test_bad_inputs_each_get_one_clear_message(bases, concept_deltas, tiny_pipeline_path, tmp_path, capsys):
    base = bases["sd1"]
    other_base = open_base(tiny_pipeline_path("sd1", seed=1))
    cases = bad_inputs(tmp_path, base, other_base, bases["sdxl"], concept_deltas["sd1"])
    capsys.readouterr()  # building the inputs may print; only the commands' output is checked
    for name, (inputs, pattern) in cases.items():
        output = tmp_path / f"out-{name.replace(' ', '-')}.safetensors"
        code = cd_merge([*inputs, "-o", str(output), "--base", str(base.path), "--num-reg-captions", "50", "-q"])
        assert code == 1, name
        message = one_error_line(capsys, "cd-merge")
        assert re.search(pattern, message), (name, message)
        assert not output.exists(), name
    assert not (tmp_path / "code-ran").exists()


def test_a_bin_from_another_base_merges_only_with_no_base_check(bases, concept_deltas, tiny_pipeline_path,
                                                                 tmp_path, capsys):
    base, other_base = bases["sd1"], open_base(tiny_pipeline_path("sd1", seed=1))
    good, other = tmp_path / "good.safetensors", tmp_path / "other-base.bin"
    save(concept_deltas["sd1"][0], good)
    save(random_concept_delta(other_base, "<y>", "cat"), other, base=other_base)
    output = tmp_path / "merged.safetensors"
    arguments = [str(good), str(other), "-o", str(output), "--base", str(base.path), "--num-reg-captions", "50",
                 "-q"]
    assert cd_merge(arguments) == 1
    assert "other-base.bin was made for another base model" in capsys.readouterr().err
    assert cd_merge([*arguments, "--no-base-check"]) == 0, capsys.readouterr().err
    assert formats.read(output).base_fingerprint == base.fingerprint


def test_more_constraint_rows_than_the_feature_rank_are_reported(bases, concept_deltas, tmp_path, capsys):
    """64-dimensional features, 13 concepts x 6 rows = 78 rows: some must be dependent, and it is said."""
    base = bases["sd1"]
    deltas = [random_concept_delta(base, f"<c{i}>", "cat", seed=100 + i) for i in range(13)]
    inputs = []
    for i, delta in enumerate(deltas):
        path = tmp_path / f"c{i}.safetensors"
        save(delta, path)
        inputs.append(str(path))
    output = tmp_path / "merged.safetensors"
    code = cd_merge([*inputs, "-o", str(output), "--base", str(base.path), "--num-reg-captions", "100", "-q"])
    out = capsys.readouterr().out
    assert code == 0
    assert "rank 64/78" in out
    assert "14 of 78 constraint rows depend on the others" in out and "least-squares" in out


def test_unwritable_output_is_one_error_and_leaves_nothing(bases, concept_deltas, tmp_path, capsys):
    base = bases["sd1"]
    good = tmp_path / "good.safetensors"
    save(concept_deltas["sd1"][0], good)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    output = blocker / "merged.safetensors"
    code = cd_merge([str(good), "-o", str(output), "--base", str(base.path), "--num-reg-captions", "50", "-q"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("cd-merge: error: ") and str(output) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "good.safetensors"]
    existing = tmp_path / "exists.safetensors"
    shutil.copy(good, existing)
    code = cd_merge([str(good), "-o", str(existing), "--base", str(base.path), "-q"])
    assert code == 1 and "exists; pass --force" in capsys.readouterr().err


def test_pickle_payload_class_is_picklable():
    """Guard for the malicious-pickle case above: the payload really would run on a plain load."""
    payload = RunsCode()
    payload.marker = Path("/nonexistent-dir/marker")
    assert pickle.dumps(payload)


@pytest.mark.parametrize("method", ["constrained", "soft"])
def test_a_concept_of_more_target_rows_than_features_is_merged_on_rows_spanning_them(tiny_pipeline_path, method,
                                                                                     monkeypatch):
    """A concept recording 2,000 prompts cost every layer 30 s: its rows are replaced by at most the
    features' width of rows with the same Gram matrix, which changes neither the merge nor its report."""
    import importlib

    from mergekit_cd.base import open_base
    from mergekit_cd.delta import Concept, ConceptDelta
    from mergekit_cd.testing import random_concept_deltas

    merge_module = importlib.import_module("mergekit_cd.merge")
    base = open_base(tiny_pipeline_path("sd1"))
    first, second = random_concept_deltas(base, [("<new1>", "cat"), ("<new2>", "dog")], seed=3)
    prompts = tuple(f"{place} photo of a <new1> cat" for place in
                    ("a", "a close", "a blurry", "a bright", "a dark", "an old", "a large", "a small", "a clean",
                     "a cropped", "a good", "a nice"))
    first = ConceptDelta(dict(first.layers), dict(first.tokens), base=first.base,
                         base_fingerprint=first.base_fingerprint, architecture=first.architecture,
                         concepts=(Concept("<new1>", "cat", prompts),))
    captions = ["a photo of a dog", "a red car", "a house by the sea", "a bowl of fruit"] * 3
    reduced, report = merge_module.merge([first, second], captions, base=base, method=method, return_report=True)
    monkeypatch.setattr(merge_module, "spanning_rows", lambda C: C)
    full, full_report = merge_module.merge([first, second], captions, base=base, method=method, return_report=True)
    width = base.context_dim
    note = next(note for note in report.notes if note.startswith("<new1>: its "))
    rows = int(note.split()[2].replace(",", ""))
    assert note == (f"<new1>: its {rows} target rows span at most {width} feature directions; the solve constrains "
                    f"{width} rows with the same Gram matrix instead (the same merge, each layer's work bounded by "
                    f"the width; the solve's rank and dependence counts count those rows)")
    assert rows > width and full_report.solve_info.n_constraints - report.solve_info.n_constraints == rows - width
    for name, layer in full.layers.items():
        for ours, theirs in ((reduced.layers[name].key, layer.key), (reduced.layers[name].value, layer.value)):
            assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-6 * float(theirs.abs().max())), name
    for ours, theirs in zip(report.concepts, full_report.concepts):
        assert ours.residual == pytest.approx(theirs.residual, rel=1e-3, abs=1e-6)
        assert ours.sum_residual == pytest.approx(theirs.sum_residual, rel=1e-6)
    assert report.drift == pytest.approx(full_report.drift, rel=1e-4)
