"""cd-eval and ``mergekit_cd.evaluate`` on tiny models: fidelity and preservation from the UNet's
noise predictions, constraint residuals, the paper's CLIP / DINO metrics on tiny random CLIP and
ViT models, the table, JSON and plot, and the command's one-line errors."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPImageProcessor

from mergekit_cd import MergeError, evaluate, merge
from mergekit_cd.base import open_base
from mergekit_cd.captions import default_reg_captions
from mergekit_cd.cli import eval as cd_eval
from mergekit_cd.evaluation import clip_score, mean_pairwise_cosine, parse_compare, strip_tokens, summary_table
from mergekit_cd.evaluation.fidelity import draw_probes
from mergekit_cd.evaluation.methods import SOFT_SWEEP
from mergekit_cd.evaluation.report import write_outputs
from mergekit_cd.loading import save
from mergekit_cd.merge_methods import METHOD_TABLE
from mergekit_cd.testing import random_concept_delta, tiny_tokenizer

from cli_output import one_error_line

#: Few probes, one tiny sampled image per prompt, two denoising steps: seconds per evaluation.
FAST = dict(samples=6, held_out_samples=6, sample_images=1, sample_steps=1, batch_size=6)
CAPTIONS = default_reg_captions()[:200]
HELD_OUT = [*CAPTIONS[:2], "a tortoise on a beach", "a red van in the snow"]

pytestmark = pytest.mark.filterwarnings("ignore::mergekit_cd.errors.TokenRenameWarning")  # two <new1> cats


@pytest.fixture(scope="module")
def sd1(tiny_pipeline_path, tmp_path_factory):
    """The tiny SD1 base and two concepts of the same class, which interfere when summed."""
    path = tiny_pipeline_path("sd1")
    base = open_base(path)
    return SimpleNamespace(path=path, base=base, cat=random_concept_delta(base, "<new1>", "cat", seed=1),
                           other_cat=random_concept_delta(base, "<new1>", "cat", seed=2),
                           cache=tmp_path_factory.mktemp("gram-cache"))


@pytest.fixture(scope="module")
def two_concepts(sd1):
    """Both concepts, the first one's own delta as the "merged" row, the sum, the paper's merge, the
    base with the concepts' tokens and the plain base."""
    return evaluate([sd1.cat, sd1.other_cat], base=sd1.path, merged=[sd1.cat],
                    compare="sum,constrained,base,plain-base", reg_captions=CAPTIONS, cache_dir=sd1.cache, **FAST)


@pytest.fixture(scope="module")
def one_concept(sd1):
    """One concept; rows: its own delta, the other cat's delta, and the sum of the one delta.
    Two of the held-out captions are regularisation captions."""
    return evaluate([sd1.cat], base=sd1.path, merged=[sd1.cat, sd1.other_cat], compare="sum", held_out=HELD_OUT,
                    cache_dir=sd1.cache, **FAST)


# ---------------------------------------------------------------- function-level fidelity
def test_a_delta_against_itself_has_fidelity_one_and_the_base_zero(two_concepts):
    """eps_M = eps_i gives 1 exactly under both references; the base with the concepts' tokens (no
    K/V change) gives fidelity 0, the plain base (the issue's B) gives fidelity_plain_base 0, and
    neither changes anything on held-out captions. The two references differ: the token alone
    already moves the plain base's predictions toward the concept."""
    itself = two_concepts.row("merged")
    assert itself.concepts[0].fidelity == pytest.approx(1.0, abs=1e-12)
    assert itself.concepts[0].fidelity_plain_base == pytest.approx(1.0, abs=1e-12)
    assert itself.concepts[0].residual == pytest.approx(0.0, abs=1e-6)
    base, plain = two_concepts.row("base"), two_concepts.row("plain base")
    assert [c.fidelity for c in base.concepts] == [0.0, 0.0]
    assert [c.fidelity_plain_base for c in plain.concepts] == [0.0, 0.0]
    assert base.preservation == plain.preservation == 0.0
    assert all(c.fidelity_plain_base > 0.05 for c in base.concepts)
    assert all(c.fidelity < -0.05 for c in plain.concepts)
    assert [c.residual for c in base.concepts] == [c.residual for c in plain.concepts]
    assert all(c.residual > 0.01 for c in base.concepts)
    header, rows = summary_table(two_concepts)
    assert header == ["method", "fidelity 1 (<new1> cat)", "fidelity 2 (<new1> cat)", "mean fidelity",
                      "mean fidelity (plain base)", "preservation", "max residual"]
    assert [row[0] for row in rows] == ["merged", "sum", "constrained", "base", "plain base"]
    assert rows[-2][1:] == ["0.000", "0.000", "0.000", rows[-2][4], "0.000", rows[-2][-1]]
    assert rows[-1][4:6] == ["0.000", "0.000"]
    content = two_concepts.to_dict()["rows"][0]
    assert content["concepts"][0]["fidelity_plain_base"] == pytest.approx(1.0, abs=1e-12)
    assert content["mean_fidelity_plain_base"] == itself.mean_fidelity_plain_base


def test_constrained_merge_beats_the_sum_when_concepts_interfere(two_concepts, sd1):
    """The constrained merge keeps each concept's K/V outputs on its target-prompt token rows
    (residual ~ 0) where the sum of two same-class concepts misses them, so its mean fidelity is
    higher and its preservation better. (Per concept it need not be: the rows the constraints
    leave free, BOS, padding and "photo of a", carry part of a concept.) The residual column is
    the merge report's."""
    constrained, summed = two_concepts.row("constrained"), two_concepts.row("sum")
    assert constrained.max_residual < 1e-4 < 0.1 < min(c.residual for c in summed.concepts)
    assert constrained.mean_fidelity > summed.mean_fidelity + 0.1
    assert constrained.preservation < summed.preservation

    _, report = merge([sd1.cat, sd1.other_cat], CAPTIONS, base=sd1.path, cache_dir=sd1.cache, return_report=True)
    for row_constrained, row_sum, reported in zip(constrained.concepts, summed.concepts, report.concepts):
        # the row measures the merge as installed, rounded to float32; the report, the float64 solve
        assert row_constrained.residual == pytest.approx(reported.residual, abs=1e-5)
        assert row_sum.residual == pytest.approx(reported.sum_residual, rel=1e-6)


def test_the_sum_of_a_single_delta_is_that_delta(one_concept):
    """Summing one delta changes nothing: same fidelity (1), residual (0) and preservation."""
    itself, summed = one_concept.row("merged 1"), one_concept.row("sum")
    assert summed.concepts[0].fidelity == pytest.approx(1.0, abs=1e-12)
    assert summed.concepts[0].residual == pytest.approx(0.0, abs=1e-6)
    assert summed.preservation == itself.preservation > 0
    other = one_concept.row("merged 2").concepts[0]  # another cat, whose own token stands in
    assert other.fidelity < 0.5 and other.residual > 0.01
    assert "merged 2: no token has <new1>'s embeddings; the cat concept's token <new1> stands for it." \
        in one_concept.notes
    assert "<new1> cat: no instance images; its probes use latents of 2 images sampled from its own delta " \
        "(1 step)." in one_concept.notes
    assert one_concept.concepts[0].latents == "sampled: 2 images from its own delta (1 step)"
    assert "2 of the 4 held-out captions are regularisation captions too, which the merges were fitted to keep: " \
        "preservation looks better than it is." in one_concept.notes


def test_results_are_reproducible_with_the_same_seed(one_concept, sd1):
    """Same seed: the same latents, timesteps, noise and prompts for every model, so the same
    numbers; another seed draws other probes."""
    again = evaluate([sd1.cat], base=sd1.path, merged=[sd1.cat, sd1.other_cat], compare="sum", held_out=HELD_OUT,
                     cache_dir=sd1.cache, **FAST)
    assert again.to_dict() == one_concept.to_dict()

    clean = torch.randn(3, 4, 8, 8)
    scheduler = SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000),
                                add_noise=lambda x, noise, t: x + noise * t[:, None, None, None])
    draws = [draw_probes(clean, ["a", "b"], 6, scheduler=scheduler, generator=torch.Generator().manual_seed(seed))
             for seed in (0, 0, 1)]
    assert torch.equal(draws[0].noisy, draws[1].noisy) and draws[0].prompts == draws[1].prompts
    assert not torch.equal(draws[0].timesteps, draws[2].timesteps)


# ---------------------------------------------------------------- the paper's metrics
def test_clip_score_matches_a_hand_computation():
    """CLIPScore 2.5 max(cos, 0) row by row; image alignment = mean cosine over all pairs;
    modifier tokens leave the prompt whole-word only."""
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    image = torch.tensor([[3.0, 4.0], [0.0, -5.0], [2.0, 2.0]])  # cos 0.6, -1, 1
    torch.testing.assert_close(clip_score(text, image), torch.tensor([1.5, 0.0, 2.5], dtype=torch.float64))
    generated = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    reference = torch.tensor([[1.0, 1.0], [-2.0, 0.0]])
    # cosines: (1,0)·: 1/sqrt2, -1; (0,1)·: 1/sqrt2, 0
    assert mean_pairwise_cosine(generated, reference) == pytest.approx((2 / math.sqrt(2) - 1) / 4)
    assert strip_tokens("photo of a <new1> cat beside a <new10> pot", ["<new1>", "<new10>"]) == \
        "photo of a cat beside a pot"
    assert strip_tokens("<new1>cat <new1>", ["<new1>"]) == "<new1>cat"


def tiny_clip(folder):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = tiny_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def tiny_dino(folder):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def instance_folder(folder, count=2, seed=0):
    """Random images of odd sizes (they are centre-cropped and resized to the model's size)."""
    folder.mkdir()
    generator = np.random.default_rng(seed)
    for index in range(count):
        pixels = generator.integers(0, 256, size=(20 + 4 * index, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
    return folder


def tiny_text_model(folder):
    from transformers import CLIPTextConfig, CLIPTextModel

    CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, bos_token_id=0, eos_token_id=1)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    """Tiny random CLIP and ViT (DINO) folders, and a text model that is neither."""
    folder = tmp_path_factory.mktemp("vision")
    return SimpleNamespace(clip=tiny_clip(folder / "clip"), dino=tiny_dino(folder / "dino"),
                           text=tiny_text_model(folder / "text"))


def test_sdxl_with_instance_images_and_clip_and_dino(tiny_pipeline_path, vision, tmp_path):
    """SDXL (pooled text embedding and size conditioning), probes on VAE latents of instance
    images, and the paper's three alignments from tiny random CLIP / ViT folders."""
    path = tiny_pipeline_path("sdxl")
    concept = random_concept_delta(open_base(path), "<new1>", "cat", seed=1)
    images = instance_folder(tmp_path / "cat")
    report = evaluate([concept], base=path, merged=[concept], compare="sum", instance_dirs=[images],
                      clip=vision.clip, dino=vision.dino, num_images=1, steps=2,
                      reg_captions=CAPTIONS, cache_dir=tmp_path / "cache", **FAST)
    assert report.concepts[0].latents == str(images)
    assert not any("sampled" in note for note in report.notes)
    itself, summed = report.row("merged"), report.row("sum")
    assert itself.concepts[0].fidelity == pytest.approx(1.0, abs=1e-12)
    for row in report.rows:
        scores = row.concepts[0]
        assert 0 <= scores.text_alignment <= 2.5
        assert -1 <= scores.image_alignment <= 1 and -1 <= scores.dino_alignment <= 1
    assert summed.concepts[0] == itself.concepts[0]  # the same model samples the same images
    header, _ = summary_table(report)
    assert header[-3:] == ["text (CLIP)", "image (CLIP)", "image (DINO)"]


@pytest.fixture
def bars(monkeypatch):
    """Every progress bar the runner makes, each with whether it shows and the list of its updates."""
    from mergekit_cd.evaluation import runner

    made = []

    class Recorded(runner.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.shown = not self.disable  # closing sets disable
            self.updates = []
            made.append(self)

        def update(self, n=1):
            self.updates.append(n)
            return super().update(n)

    monkeypatch.setattr(runner, "tqdm", Recorded)
    return made


def test_clip_scores_the_sampled_images_against_the_prompt_without_its_token(sd1, vision, tmp_path, monkeypatch,
                                                                             bars):
    """What the runner feeds CLIP: each row's sampled images (fixed ones here) and their prompts with
    the token stripped ("photo of a cat"). The scores match a hand computation with the tiny CLIP:
    text alignment = mean 2.5 max(cos, 0) of each image with its prompt, image alignment = mean
    cosine over all (generated, instance image) pairs. No progress bar shows without progress."""
    from transformers import AutoTokenizer, CLIPModel

    from mergekit_cd.evaluation import runner
    from mergekit_cd.evaluation.clip_metrics import ClipEmbedder

    rng = np.random.default_rng(7)
    fixed = {prompt: [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(2)]
             for prompt in ("<new1> cat", "photo of a <new1> cat")}

    def fixed_samples(pipe, prompts, *, num_images, **options):
        return [image for prompt in prompts for image in fixed[prompt][:num_images]]

    texts = []
    embed_texts = ClipEmbedder.embed_texts

    def recorded_embed_texts(self, batch):
        texts.append(list(batch))
        return embed_texts(self, batch)

    monkeypatch.setattr(runner, "sample_images", fixed_samples)
    monkeypatch.setattr(ClipEmbedder, "embed_texts", recorded_embed_texts)
    instance = instance_folder(tmp_path / "cat")
    report = evaluate([sd1.cat], base=sd1.path, merged=[sd1.cat], compare="sum", instance_dirs=[instance],
                      clip=vision.clip, num_images=2, steps=1, reg_captions=CAPTIONS, cache_dir=sd1.cache, **FAST)
    assert report.concepts[0].prompts == ("<new1> cat", "photo of a <new1> cat")
    stripped = ["cat", "cat", "photo of a cat", "photo of a cat"]
    assert texts == [["a photo of a cat"], stripped, stripped]  # first: the test input as CLIP loads

    def embedding(output):  # transformers 4 returns the tensor, 5 an output holding it
        return (output if isinstance(output, torch.Tensor) else output.pooler_output).double().numpy()

    def unit(rows):
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    model = CLIPModel.from_pretrained(vision.clip).eval()
    tokenizer, processor = AutoTokenizer.from_pretrained(vision.clip), CLIPImageProcessor.from_pretrained(vision.clip)
    generated = [*fixed["<new1> cat"], *fixed["photo of a <new1> cat"]]
    references = [Image.open(path).convert("RGB") for path in sorted(instance.iterdir())]
    with torch.no_grad():
        text = unit(embedding(model.get_text_features(**tokenizer(stripped, padding=True, return_tensors="pt"))))
        image = unit(embedding(model.get_image_features(**processor(images=generated, return_tensors="pt"))))
        reference = unit(embedding(model.get_image_features(**processor(images=references, return_tensors="pt"))))
    cosines = (text * image).sum(axis=1)
    assert (cosines > 0).any() and (cosines < 0).any()  # both sides of CLIPScore's max(cos, 0)
    for row in report.rows:
        assert row.concepts[0].text_alignment == pytest.approx(float(np.mean(2.5 * np.maximum(cosines, 0))), rel=1e-5)
        assert row.concepts[0].image_alignment == pytest.approx(float(np.mean(image @ reference.T)), rel=1e-5)
    assert bars and not any(bar.shown for bar in bars)


def test_every_long_phase_has_a_labelled_progress_bar(sd1, vision, monkeypatch, bars, capsys):
    """The merges (merge() draws its own bars too), the reference images and the CLIP samples (a
    step per denoising step), the reference predictions and the rows each have their own bar."""
    from mergekit_cd.evaluation import runner

    progress = []

    def recorded_merge(*args, **kwargs):
        progress.append(kwargs["progress"])
        return merge(*args, **kwargs)

    monkeypatch.setattr(runner, "merge", recorded_merge)
    capsys.readouterr()
    evaluate([sd1.cat], base=sd1.path, merged=[sd1.cat], compare="sum", clip=vision.clip, num_images=1, steps=2,
             reg_captions=CAPTIONS, cache_dir=sd1.cache, progress=True, **FAST)
    assert {bar.desc: (bar.total, bar.updates) for bar in bars if bar.shown} == {
        "merges": (1, [1]),  # the sum
        "reference images": (2, [1, 1]),  # 2 prompts x 1 image x 1 step
        "reference predictions": (3, [1, 1, 1]),  # the plain base, the base with the token, the concept's own
        "rows": (2, [1, 1]),
        "sampling for CLIP / DINO": (8, [1] * 8),  # 2 rows x 2 prompts x 1 image x 2 steps
    }
    assert progress == [True] and "merging layers" in capsys.readouterr().err


def test_the_merges_run_before_the_pipeline_loads(sd1, monkeypatch):
    """A merge that fails (e.g. on non-finite text features) fails before any UNet work."""
    from mergekit_cd.evaluation import runner

    def failing_merge(*args, **kwargs):
        raise MergeError("Non-finite text features for 'photo of a <new1> cat'.")

    def no_unet_work(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the merges ran")

    monkeypatch.setattr(runner, "merge", failing_merge)
    monkeypatch.setattr(runner, "load_pipeline", no_unet_work)
    with pytest.raises(MergeError, match="^Non-finite text features"):
        evaluate([sd1.cat], base=sd1.path, compare="constrained", reg_captions=CAPTIONS, cache_dir=sd1.cache, **FAST)


# ---------------------------------------------------------------- compare lists
def test_compare_lists_name_merges_and_sweeps():
    labels = [m.label for m in parse_compare("sum, soft=10,ridge=1e-3,relative-ridge=0.01,soft,base,sum")]
    assert labels == ["sum", "soft w=10", "constrained ridge=0.001", "constrained relative-ridge=0.01",
                      *(f"soft w={w:g}" for w in SOFT_SWEEP if w != 10), "base"]
    with pytest.raises(MergeError, match="unknown method 'lora'"):
        parse_compare("sum,lora")
    with pytest.raises(MergeError, match="soft=0: the value must be a finite number > 0"):
        parse_compare("soft=0")
    hybrid = parse_compare("hybrid,hybrid=10")  # a sweep of the hybrid, not of the soft merge under its name
    assert [m.label for m in hybrid] == [f"hybrid w={w:g}" for w in SOFT_SWEEP] and {m.kind for m in hybrid} == {"hybrid"}
    assert [m.kind for m in parse_compare(["base", "plain-base"])] == ["base", "plain-base"]


def test_each_method_of_the_table_is_a_row_of_that_method(monkeypatch):
    """A second weighted method ran the soft merge: any weighted name was read as ``soft``."""
    monkeypatch.setitem(METHOD_TABLE, "other", dataclasses.replace(METHOD_TABLE["soft"], name="other"))
    for name, method in METHOD_TABLE.items():
        assert {m.kind for m in parse_compare(name)} == {name}
        if method.concept_weights:
            assert [m.label for m in parse_compare(f"{name}=5")] == [f"{name} w=5"]
    assert [m.options for m in parse_compare("other")] == [{"weight": weight} for weight in SOFT_SWEEP]


def test_the_hybrid_merge_is_a_row_of_cd_eval_under_the_pipeline_rule(sd1, tiny_delta_files, monkeypatch, capsys):
    """--compare hybrid runs the hybrid merge (as cd-merge --method hybrid --rows pipeline would) and
    scores it; without --rows pipeline it is refused before any file is read or merge run."""
    from mergekit_cd.evaluation import runner

    files = tiny_delta_files("sd1")
    common = ["--base", str(sd1.path), "--concepts", str(files["native"]), str(files["other-native"]),
              "--compare", "constrained,hybrid=100", "--num-reg-captions", "200", "--cache-dir", str(sd1.cache), "-q"]
    monkeypatch.setattr(runner, "plan_merge", lambda *a, **k: pytest.fail("planned the merge"))
    capsys.readouterr()  # what making the fixtures printed
    assert error_of(capsys, common) == (
        "--compare hybrid needs --rows pipeline: its soft terms are the start and padding rows of the target prompts, "
        "which only the pipeline rule reads; add --rows pipeline.")
    monkeypatch.undo()
    concepts = [files["native"], files["other-native"]]
    merged = merge(concepts, CAPTIONS, base=sd1.path, method="hybrid", rows="pipeline", weights=[100, 100],
                   cache_dir=sd1.cache)
    report = evaluate(concepts, base=sd1.path, merged=[merged], compare="constrained,hybrid=100", rows="pipeline",
                      reg_captions=CAPTIONS, cache_dir=sd1.cache, **FAST)
    hybrid = report.row("hybrid w=100")
    assert hybrid.kind == "hybrid" and hybrid.options == {"weight": 100.0} and report.settings["rows"] == "pipeline"
    assert hybrid.concepts == report.row("merged").concepts  # the merge cd-merge makes, scored alike
    assert hybrid.max_residual < 1e-5  # the token rows, the residual's rows, are its exact constraints
    assert hybrid.preservation != report.row("constrained").preservation


@pytest.mark.parametrize("spec", ["", " , ", []])
def test_an_empty_compare_list_is_an_error_not_just_the_sum(spec):
    """An empty list would evaluate only the sum row that is always shown; None is the default."""
    with pytest.raises(MergeError, match="names no method; give a comma-separated list of sum, "):
        parse_compare(spec)
    assert parse_compare(None) == []


# ---------------------------------------------------------------- the command
def test_cd_eval_prints_the_table_and_writes_json_and_plot(sd1, tiny_delta_files, tmp_path, capsys):
    """Files in two formats (the merged one holds full weights), a soft curve, --json and --plot."""
    files = tiny_delta_files("sd1")
    arguments = ["--base", str(sd1.path), "--concepts", str(files["native"]), "--merged", str(files["diffusers"]),
                 "--compare", "soft=10,soft=1000", "--samples", "6", "--held-out-samples", "6",
                 "--sample-images", "1", "--sample-steps", "1", "--num-reg-captions", "200",
                 "--cache-dir", str(sd1.cache), "--json", str(tmp_path / "eval.json"),
                 "--plot", str(tmp_path / "eval.png"), "-q"]
    assert cd_eval.main(arguments) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["method", "fidelity", "<new1>", "fidelity", "(plain", "base)", "preservation", "max",
                              "residual"]
    assert [line.split()[0] for line in out[2:6]] == ["delta", "sum", "soft", "soft"]
    assert out[-2:] == [f"wrote {tmp_path / 'eval.json'}", f"wrote {tmp_path / 'eval.png'}"]
    content = json.loads((tmp_path / "eval.json").read_text())
    assert content["format_version"] == 1 and content["settings"]["seed"] == 0
    assert [row["label"] for row in content["rows"]] == ["delta", "sum", "soft w=10", "soft w=1000"]
    assert content["rows"][0]["concepts"][0]["fidelity"] == pytest.approx(1.0, abs=1e-6)
    assert content["rows"][0]["concepts"][0]["fidelity_plain_base"] == pytest.approx(1.0, abs=1e-6)
    with Image.open(tmp_path / "eval.png") as plot:
        assert plot.format == "PNG" and plot.size == (720, 480)
        assert len(plot.getcolors(10_000)) > 2

    assert cd_eval.main(arguments) == 1  # the outputs exist now
    assert "exists; pass --force" in capsys.readouterr().err


def error_of(capsys, arguments) -> str:
    assert cd_eval.main(arguments) == 1
    return one_error_line(capsys, "cd-eval")


def test_cd_eval_user_errors_are_one_line(sd1, tiny_delta_files, tmp_path, capsys):
    common = ["--base", str(sd1.path), "--concepts", str(tiny_delta_files("sd1")["native"]), "-q"]
    capsys.readouterr()  # what making the fixtures printed
    assert "unknown method 'lora'" in error_of(capsys, [*common, "--compare", "sum,lora"])
    assert error_of(capsys, [*common, "--instance-dirs", str(tmp_path / "missing")]) == \
        f"Instance image folder {tmp_path / 'missing'} does not exist."
    (tmp_path / "empty").mkdir()
    assert "holds no images" in error_of(capsys, [*common, "--instance-dirs", str(tmp_path / "empty")])
    assert "1 concept(s) (<new1> cat); give one folder per concept" in error_of(
        capsys, [*common, "--instance-dirs", str(tmp_path / "empty"), str(tmp_path / "empty")])
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text("{}")
    assert error_of(capsys, [*common, "--clip", str(tmp_path / "clip")]) == (
        f"--clip {tmp_path / 'clip'}: config.json but no weights (model.safetensors or pytorch_model.bin); "
        f"download the CLIP model completely.")
    assert "no such folder" in error_of(capsys, [*common, "--dino", str(tmp_path / "nowhere")])
    assert ".txt is not an image format" in error_of(capsys, [*common, "--plot", str(tmp_path / "plot.txt")])
    assert "samples must be a whole number >= 1, got 0" in error_of(capsys, [*common, "--samples", "0"])
    assert error_of(capsys, [*common, "--compare", ""]) == (
        "--compare '': names no method; give a comma-separated list of sum, average, constrained, ridge=X, "
        "relative-ridge=X, soft, soft=W, hybrid, hybrid=W, base, plain-base, or leave --compare out for the default.")


def test_cd_eval_refuses_wrong_or_corrupt_clip_and_dino_folders_before_the_unet_work(
        sd1, tiny_delta_files, vision, tmp_path, capsys, monkeypatch):
    """A CLIP folder given to --dino (and the reverse), a text model, corrupt weights, weights of
    another model, a processor that does not fit the model: one line each, found when the models
    load, before the pipeline is even loaded."""
    from mergekit_cd.evaluation import runner

    def no_unet_work(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the CLIP / DINO folders were checked")

    monkeypatch.setattr(runner, "load_pipeline", no_unet_work)
    common = ["--base", str(sd1.path), "--concepts", str(tiny_delta_files("sd1")["native"]), "-q"]
    capsys.readouterr()  # what making the fixtures printed
    assert error_of(capsys, [*common, "--dino", str(vision.clip)]) == (
        f"--dino {vision.clip}: holds a CLIP model (text and image towers); give it to --clip. "
        f"--dino needs a vision model such as facebook/dino-vits16.")
    assert error_of(capsys, [*common, "--clip", str(vision.dino)]) == (
        f"--clip {vision.dino}: holds a 'vit' model, not a CLIP model (transformers CLIPModel, e.g. "
        f"openai/clip-vit-base-patch32). A vision model such as DINO goes to --dino.")
    assert error_of(capsys, [*common, "--dino", str(vision.text)]) == (
        f"--dino {vision.text}: holds a CLIPTextModel, whose input is input_ids, not images; --dino needs a vision "
        f"model such as facebook/dino-vits16.")

    corrupt = shutil.copytree(vision.clip, tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"garbage!")
    message = error_of(capsys, [*common, "--clip", str(corrupt)])
    assert message.startswith(f"--clip {corrupt}: cannot load the CLIP model (SafetensorError: ")
    assert message.endswith("); are its weights complete and uncorrupted? Download them again.")
    (corrupt / "model.safetensors").unlink()
    (corrupt / "pytorch_model.bin").write_bytes(b"garbage!")
    message = error_of(capsys, [*common, "--clip", str(corrupt)])
    assert message.startswith(f"--clip {corrupt}: cannot load the CLIP model (")
    assert message.endswith("); are its weights complete and uncorrupted? Download them again.")
    (corrupt / "pytorch_model.bin").unlink()
    shutil.copy(vision.dino / "model.safetensors", corrupt / "model.safetensors")  # ViT weights, CLIP config
    message = error_of(capsys, [*common, "--clip", str(corrupt)])
    assert message.startswith(f"--clip {corrupt}: its weights lack 78 of the CLIP model's parameters (e.g. ")
    assert message.endswith("), which would be left random; are they this model's complete weights? "
                            "Download them again.")

    dino = shutil.copytree(vision.dino, tmp_path / "dino")
    with safe_open(dino / "model.safetensors", "pt") as weights:  # a truncated download: one layer short
        kept = {name: weights.get_tensor(name) for name in weights.keys() if ".layer.1." not in name}
    save_file(kept, dino / "model.safetensors", metadata={"format": "pt"})
    assert error_of(capsys, [*common, "--dino", str(dino)]).startswith(
        f"--dino {dino}: its weights lack 16 of the DINO model's parameters (e.g. ")

    mismatched = shutil.copytree(vision.clip, tmp_path / "mismatched")  # a processor for 64 px, a model for 32
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(mismatched)
    message = error_of(capsys, [*common, "--clip", str(mismatched)])
    assert message.startswith(f"--clip {mismatched}: the CLIP model fails on a test input (")
    assert message.endswith("); is it a complete CLIP model folder?")


def test_the_dino_pooler_may_be_missing(vision, tmp_path):
    """DINO checkpoints have no pooler, which the CLS embedding does not use: they load."""
    from mergekit_cd.evaluation.clip_metrics import DinoEmbedder

    dino = shutil.copytree(vision.dino, tmp_path / "dino")
    with safe_open(dino / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
        kept = {name: weights.get_tensor(name) for name in names if not name.startswith("pooler.")}
    assert len(kept) == len(names) - 2  # pooler.dense weight and bias
    save_file(kept, dino / "model.safetensors", metadata={"format": "pt"})
    embedder = DinoEmbedder(dino)
    assert embedder.embed_images([Image.new("RGB", (40, 30), (10, 200, 30))]).shape == (1, 32)


def test_cd_eval_checks_its_outputs_before_the_work(sd1, tiny_delta_files, tmp_path, capsys, monkeypatch):
    """One file for --json and --plot, a missing folder, an input as output (even with --force):
    refused before the pipeline loads."""
    from mergekit_cd.evaluation import runner

    def no_unet_work(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the outputs were checked")

    monkeypatch.setattr(runner, "load_pipeline", no_unet_work)
    concept = shutil.copy(tiny_delta_files("sd1")["native"], tmp_path / "cat.safetensors")
    common = ["--base", str(sd1.path), "--concepts", str(concept), "-q"]
    capsys.readouterr()  # what making the fixtures printed
    assert error_of(capsys, [*common, "--json", str(tmp_path / "out.png"), "--plot",
                             str(tmp_path / "sub" / ".." / "out.png")]) == (
        f"The JSON and the plot would both be written to {tmp_path / 'sub' / '..' / 'out.png'}; give each its own "
        f"file.")
    assert error_of(capsys, [*common, "--json", str(tmp_path / "missing" / "eval.json")]) == (
        f"Cannot write {tmp_path / 'missing' / 'eval.json'}: folder {tmp_path / 'missing'} does not exist.")
    assert error_of(capsys, [*common, "--json", str(concept), "--force"]) == (
        f"Cannot write {concept}: it is the input {concept}, which writing it would destroy (even with --force). "
        f"Choose another output name.")
    inside_base = sd1.path / "model_index.json"  # the base is an input too: --json there replaced its index
    before = inside_base.read_bytes()
    assert error_of(capsys, [*common, "--json", str(inside_base), "--force"]) == (
        f"Cannot write {inside_base}: it lies inside the input {sd1.path}, which writing it would change (even "
        f"with --force). Choose another output name.")
    assert inside_base.read_bytes() == before
    folder = tmp_path / "results"  # a folder is never replaced: advising --force would not help
    (folder / "old").mkdir(parents=True)
    for force in ([], ["--force"]):
        assert error_of(capsys, [*common, "--json", str(folder), *force]) == (
            f"{folder} is a folder (holding e.g. old); refusing to replace it with a file, even with --force. "
            f"Choose another output name.")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cat.safetensors", "results"]


def test_json_and_plot_are_written_all_or_nothing(one_concept, tmp_path, monkeypatch):
    """A plot that fails half-way leaves neither it nor the JSON (nor a temporary file) behind."""
    from mergekit_cd.evaluation import report as report_module

    class FullDisk:
        def save(self, path, format):
            path.write_bytes(b"half a png")
            raise OSError(28, "No space left on device")

    outputs = dict(json_path=tmp_path / "eval.json", plot_path=tmp_path / "eval.png")
    with monkeypatch.context() as patch:
        patch.setattr(report_module, "_plot", lambda report: FullDisk())
        with pytest.raises(MergeError, match="^Cannot write .*eval.png: No space left on device.$"):
            write_outputs(one_concept, **outputs)
    assert list(tmp_path.iterdir()) == []
    assert write_outputs(one_concept, **outputs) == list(outputs.values())
    assert json.loads(outputs["json_path"].read_text())["rows"][0]["label"] == "merged 1"


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("failing", ["json_path", "plot_path"])
def test_a_failing_rename_puts_every_output_back(one_concept, tmp_path, monkeypatch, existing, failing):
    """Whichever rename fails, the output renamed before it is taken out again (or the file --force
    was replacing put back), and no temporary or set-aside file is left."""
    outputs = dict(json_path=tmp_path / "eval.json", plot_path=tmp_path / "eval.png")
    if existing:
        outputs["json_path"].write_text("old json")
        outputs["plot_path"].write_bytes(b"old plot")

    def failing_onto_one_output(rename):
        def rename_unless_onto_the_failing_one(source, destination, *args, **kwargs):
            if Path(destination) == outputs[failing] and ".partial" in Path(source).name:
                raise OSError(5, "Input/output error")
            return rename(source, destination, *args, **kwargs)
        return rename_unless_onto_the_failing_one

    with monkeypatch.context() as patch:
        patch.setattr(os, "rename", failing_onto_one_output(os.rename))
        patch.setattr(os, "replace", failing_onto_one_output(os.replace))
        patch.setattr(os, "link", failing_onto_one_output(os.link))  # a new output is claimed by a link
        with pytest.raises(MergeError, match=f"^Cannot write .*{outputs[failing].name}: Input/output error.$"):
            write_outputs(one_concept, force=existing, **outputs)
    if existing:
        assert outputs["json_path"].read_text() == "old json" and outputs["plot_path"].read_bytes() == b"old plot"
        assert sorted(path.name for path in tmp_path.iterdir()) == ["eval.json", "eval.png"]
    else:
        assert list(tmp_path.iterdir()) == []
    assert write_outputs(one_concept, force=existing, **outputs) == list(outputs.values())
    assert json.loads(outputs["json_path"].read_text())["rows"][0]["label"] == "merged 1"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["eval.json", "eval.png"]


def test_cd_eval_runs_a_bfloat16_pipeline(sd1, tiny_delta_files, capsys):
    """The deltas are checked against the base in full precision as they load; installing them in a
    bfloat16 pipeline (whose rounded weights have another fingerprint) does not check again."""
    delta = str(tiny_delta_files("sd1")["native"])
    arguments = ["--base", str(sd1.path), "--concepts", delta, "--merged", delta, "--compare", "sum",
                 "--dtype", "bfloat16", "--samples", "2", "--held-out-samples", "2", "--sample-images", "1",
                 "--sample-steps", "1", "--num-reg-captions", "200", "--cache-dir", str(sd1.cache), "-q"]
    assert cd_eval.main(arguments) == 0, capsys.readouterr().err
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:4]}
    assert rows["delta"][:2] == ["1.000", "1.000"] and rows["sum"][:2] == ["1.000", "1.000"]


def test_cd_eval_names_its_flag_for_a_delta_of_another_base(sd1, tmp_path, capsys):
    """The base check's advice is the command's flag, not the Python argument."""
    other = save(dataclasses.replace(sd1.cat, base_fingerprint="0" * 64), tmp_path / "other.safetensors")
    message = error_of(capsys, ["--base", str(sd1.path), "--concepts", str(other), "-q"])
    assert message.startswith(f"{other} was made for another base model (") and "--no-base-check" in message
    assert "check_base" not in message


def test_a_plot_without_matplotlib_is_one_clear_error_before_any_work(tmp_path, monkeypatch):
    """matplotlib is the optional ``plot`` extra: its absence is named, with the fix."""
    import sys

    from mergekit_cd.evaluation.report import check_plot_path

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes ``import matplotlib`` fail
    with pytest.raises(MergeError, match=r"--plot needs matplotlib, which is not installed: "
                                         r"pip install 'mergekit-cd\[plot\]'"):
        check_plot_path(tmp_path / "plot.png")


def test_eval_options_are_one_model_checked_before_any_work(tmp_path):
    """evaluate's measuring options are one EvalOptions (cd-eval builds the same one): checked on
    construction, given as options= or as keywords, never both; a misspelt keyword is a TypeError."""
    from mergekit_cd.evaluation import EvalOptions

    with pytest.raises(MergeError, match=r"^samples must be a whole number >= 1, got 0\.$"):
        EvalOptions(samples=0)
    with pytest.raises(MergeError, match=r"^guidance scale must be a finite number >= 0, got nan\.$"):
        EvalOptions(guidance_scale=float("nan"))
    missing = tmp_path / "missing"  # never opened: the options are refused first
    with pytest.raises(MergeError, match=r"^Give either options= or option keywords \(samples\), not both\.$"):
        evaluate([missing], base=missing, options=EvalOptions(), samples=3)
    with pytest.raises(TypeError, match="sampels"):
        evaluate([missing], base=missing, sampels=3)
    assert EvalOptions(seed=3, device="cpu").settings()["seed"] == 3
