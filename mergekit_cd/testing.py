"""Tiny, offline Stable-Diffusion-like pipelines for tests, demos and experiments.

Real checkpoints are gigabytes and live on the Hugging Face hub. This module builds
miniature pipelines with the same *structure* (same module names, same kinds of
blocks, same text-encoder/cross-attention wiring) from configs alone, with seeded
random weights and a CLIP tokenizer written on the fly, so that everything that
reads or edits cross-attention K/V weights can be exercised without a network:

>>> from mergekit_cd.testing import build_tiny_pipeline, save_tiny_pipeline
>>> pipe = build_tiny_pipeline("sd1", seed=0)           # StableDiffusionPipeline
>>> folder = save_tiny_pipeline("sdxl", "tiny-sdxl")    # a diffusers folder

Architectures (see ``TINY_CONFIGS``):

- ``"sd1"``: SD1.x-like. CLIP-L-like text encoder (``quick_gelu``), hidden 64,
  UNet cross_attention_dim 64, conv proj_in/proj_out.
- ``"sd2"``: SD2.x-like. OpenCLIP-H-like text encoder (``gelu``), hidden 96,
  UNet cross_attention_dim 96, linear proj_in/proj_out.
- ``"sdxl"``: SDXL-like. ``text_encoder`` hidden 64 (CLIP-L-like) and
  ``text_encoder_2`` hidden 96 (bigG-like, with projection); the UNet reads the
  concatenation of both encoders' penultimate hidden states: cross_attention_dim
  160 = 64 + 96.

Feature widths are large enough against a few concepts' constraint rows (6 each) for merging
to behave as it does at full size, where 768+ dimensions dwarf the constraints. Text-encoder
layer norms get random scales and offsets, as trained CLIP models have (with the default
unit scale and zero offset, every final-layer-norm output would lie in one hyperplane). Two transformer layers per attention block at the low resolution,
  so names like ``transformer_blocks.1.attn2`` exist, as in real SDXL.

All UNets use ``layers_per_block=2`` with two cross-attention down blocks, a
cross-attention mid block and two cross-attention up blocks, so the CompVis ->
diffusers block-name mapping of real SD checkpoints holds for them too.
Cross-attention layers (``attn2``) and their output dims:
sd1/sd2: 11 layers (5 x 32, 6 x 64); sdxl: 17 layers (5 x 32, 12 x 64).

Tokenizer: byte-level BPE with the CLIP conventions (lower-casing, ``</w>`` word
ends, bos ``<|startoftext|>``, eos ``<|endoftext|>``, ``model_max_length`` 77). Every
byte has a token, so any caption tokenizes; common caption words and the rare
initializer tokens ``ktn``/``pll``/``ucd``/``sks`` are single tokens. Padding
follows the real checkpoints: SD1 and SDXL ``tokenizer`` pad with the eos token,
SD2 and SDXL ``tokenizer_2`` pad with ``"!"`` (id 0; as in the real tokenizers,
``"!"`` is then a special token, so a literal ``!`` in a caption maps to it).

Weights are deterministic: the same architecture and seed give bit-identical
weights whatever was built before, and the caller's global torch RNG state is left
untouched. Images of a tiny pipeline are noise; only shapes and plumbing are real.
Default image size is 16 x 16 (latent 8 x 8); height/width must be multiples of 4.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = [
    "ARCHITECTURES",
    "FULL_SIZE_CONFIGS",
    "TINY_CONFIGS",
    "build_tiny_pipeline",
    "random_concept_delta",
    "random_concept_deltas",
    "save_full_size_base",
    "save_tiny_pipeline",
    "tiny_tokenizer",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# Per-architecture tiny configs. "text_encoders" lists (component name, tokenizer pad
# token, CLIPTextConfig kwargs, model class name) in pipeline order; "unet" and "vae"
# are passed to UNet2DConditionModel / AutoencoderKL (plus the shared _UNET_COMMON /
# _VAE_COMMON). For sdxl, projection_class_embeddings_input_dim =
# 6 * addition_time_embed_dim + text_encoder_2 projection_dim (6 micro-conditioning
# numbers: original size, crop top-left, target size).
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "sd1": {
        "pipeline": "StableDiffusionPipeline",
        "text_encoders": [
            (
                "text_encoder",
                EOS_TOKEN,
                dict(hidden_size=64, intermediate_size=256, num_attention_heads=4,
                     num_hidden_layers=3, hidden_act="quick_gelu", projection_dim=64),
                "CLIPTextModel",
            ),
        ],
        "unet": dict(cross_attention_dim=64, attention_head_dim=2, use_linear_projection=False),
        "vae": dict(scaling_factor=0.18215),
    },
    "sd2": {
        "pipeline": "StableDiffusionPipeline",
        "text_encoders": [
            (
                "text_encoder",
                "!",
                dict(hidden_size=96, intermediate_size=384, num_attention_heads=4,
                     num_hidden_layers=4, hidden_act="gelu", projection_dim=96),
                "CLIPTextModel",
            ),
        ],
        "unet": dict(cross_attention_dim=96, attention_head_dim=(2, 4), use_linear_projection=True),
        "vae": dict(scaling_factor=0.18215),
    },
    "sdxl": {
        "pipeline": "StableDiffusionXLPipeline",
        "text_encoders": [
            (
                "text_encoder",
                EOS_TOKEN,
                dict(hidden_size=64, intermediate_size=256, num_attention_heads=4,
                     num_hidden_layers=3, hidden_act="quick_gelu", projection_dim=64),
                "CLIPTextModel",
            ),
            (
                "text_encoder_2",
                "!",
                dict(hidden_size=96, intermediate_size=384, num_attention_heads=4,
                     num_hidden_layers=4, hidden_act="gelu", projection_dim=96),
                "CLIPTextModelWithProjection",
            ),
        ],
        "unet": dict(
            cross_attention_dim=160,  # 64 + 96: both encoders' features concatenated
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 96,
        ),
        "vae": dict(scaling_factor=0.13025),
    },
}

ARCHITECTURES: tuple[str, ...] = tuple(TINY_CONFIGS)

_UNET_COMMON: dict[str, Any] = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32,
)
_VAE_COMMON: dict[str, Any] = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    norm_num_groups=16,
)
# The scheduler SD checkpoints are trained with (DDIM sampling of it).
_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)
# Fixed component indices: each module gets its own seed, so changing one config
# never changes another module's weights.
_COMPONENT_INDEX = {"unet": 0, "vae": 1, "text_encoder": 2, "text_encoder_2": 3}

# Words that tokenize to one token "<word></w>" (common caption words, the augmentation
# prefixes "a far away", "very small", "zoomed in", "close up", and so on).
_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "in", "on", "with", "and", "at", "by", "to", "for", "is",
    "photo", "picture", "image", "painting", "style", "art", "drawing", "sketch",
    "close", "up", "zoomed", "far", "away", "very", "small", "large", "high", "quality",
    "cat", "dog", "man", "woman", "person", "people", "car", "house", "tree", "flower",
    "chair", "table", "teddy", "bear", "toy", "pot", "wooden", "barn", "tortoise",
    "plushy", "sculpture", "guitar", "watch", "moon", "sun", "sky", "water",
    "beach", "garden", "forest", "city", "street", "mountain", "river", "snow", "grass",
    "room", "background", "sitting", "standing", "front", "top", "red", "blue", "green",
    "yellow", "black", "white", "van", "gogh", "monet",
    # rare tokens used to initialise modifier tokens (Custom Diffusion, DreamBooth)
    "ktn", "pll", "ucd", "sks",
)


def _bytes_to_unicode() -> list[str]:
    """The 256 printable characters GPT-2/CLIP byte-level BPE uses for bytes 0..255."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply byte-pair merges to ``pieces`` the way CLIP's BPE does (lowest rank first)."""
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        first, second = pieces[i], pieces[i + 1]
        merged: list[str] = []
        j = 0
        while j < len(pieces):
            if j + 1 < len(pieces) and pieces[j] == first and pieces[j + 1] == second:
                merged.append(first + second)
                j += 2
            else:
                merged.append(pieces[j])
                j += 1
        pieces = merged
    return pieces


def _vocab_and_merges(words: Sequence[str] = _WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-ordered vocab (bytes, bytes + </w>, merge results, bos, eos) and merges.

    Each of ``words`` ends up a single token: merges are appended (lowest
    priority) until BPE with the merges so far turns the word into one piece; appending
    never changes how earlier words tokenize.
    """
    chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while len(pieces := _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return vocab, merges


def _write_vocab_files(directory: str | os.PathLike[str], words: Sequence[str] = _WORDS) -> None:
    """Write vocab.json and merges.txt (CLIP's file format) into ``directory``."""
    vocab, merges = _vocab_and_merges(words)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def tiny_tokenizer(pad_token: str = EOS_TOKEN, *, words: Sequence[str] = _WORDS) -> Any:
    """A byte-level ``CLIPTokenizer`` (model_max_length 77) that tokenizes any text.

    ``pad_token``: ``"<|endoftext|>"`` (SD1, SDXL ``tokenizer``) or ``"!"`` (SD2, SDXL
    ``tokenizer_2``). Its length is the ``vocab_size`` of every tiny text encoder. ``words``
    become single tokens (the toy world passes its own vocabulary).
    """
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="mergekit_cd_tok_") as tmp:
        _write_vocab_files(tmp, words)
        tokenizer = CLIPTokenizer.from_pretrained(
            tmp,
            model_max_length=77,
            bos_token=BOS_TOKEN,
            eos_token=EOS_TOKEN,
            unk_token=EOS_TOKEN,
            pad_token=pad_token,
        )
    tokenizer.name_or_path = "mergekit_cd/tiny-clip-tokenizer"
    return tokenizer


def _check_architecture(architecture: str) -> dict[str, Any]:
    try:
        return TINY_CONFIGS[architecture]
    except KeyError:
        raise ValueError(
            f"unknown architecture {architecture!r}; expected one of {', '.join(ARCHITECTURES)}"
        ) from None


def _seeded(seed: int, component: str, build: Any) -> Any:
    """Build one module with torch's global RNG seeded for it, then put it in eval mode."""
    torch.manual_seed(seed * 16 + _COMPONENT_INDEX[component])
    module = build().eval()
    if component.startswith("text_encoder"):
        with torch.no_grad():
            for norm in (m for m in module.modules() if isinstance(m, torch.nn.LayerNorm)):
                norm.weight.copy_(1.0 + 0.2 * torch.randn_like(norm.weight))
                norm.bias.copy_(0.2 * torch.randn_like(norm.bias))
    return module


def build_tiny_pipeline(architecture: str, *, seed: int = 0) -> Any:
    """Build a tiny ``StableDiffusionPipeline`` (``"sd1"``, ``"sd2"``) or
    ``StableDiffusionXLPipeline`` (``"sdxl"``) with seeded random fp32 weights, on CPU.
    """
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    config = _check_architecture(architecture)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")

    components: dict[str, Any] = {}
    # fork_rng: seeding here must not disturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        for name, pad_token, te_kwargs, model_class in config["text_encoders"]:
            tokenizer = tiny_tokenizer(pad_token)
            te_config = CLIPTextConfig(
                vocab_size=len(tokenizer),
                max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **te_kwargs,
            )
            cls = getattr(transformers, model_class)
            components[name] = _seeded(seed, name, lambda: cls(te_config))
            components[name.replace("text_encoder", "tokenizer")] = tokenizer
        components["unet"] = _seeded(
            seed, "unet", lambda: UNet2DConditionModel(**_UNET_COMMON, **config["unet"])
        )
        components["vae"] = _seeded(
            seed, "vae", lambda: AutoencoderKL(**_VAE_COMMON, **config["vae"])
        )
    components["scheduler"] = DDIMScheduler(**_SCHEDULER)

    pipeline_class = getattr(diffusers, config["pipeline"])
    if pipeline_class is diffusers.StableDiffusionPipeline:
        components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipeline_class(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(
    architecture: str, path: str | os.PathLike[str], *, seed: int = 0
) -> Path:
    """Build a tiny pipeline and save it as a diffusers folder (safetensors, unsharded)
    at ``path``; returns ``Path(path)``. Loads back with ``DiffusionPipeline.from_pretrained``.
    """
    path = Path(path)
    pipe = build_tiny_pipeline(architecture, seed=seed)
    pipe.save_pretrained(path, safe_serialization=True)
    # Also write CLIP's classic vocab.json/merges.txt beside tokenizer.json, as real
    # SD repositories have them (older transformers read only these).
    for name in ("tokenizer", "tokenizer_2"):
        if (path / name).is_dir():
            _write_vocab_files(path / name)
    return path


def random_concept_delta(base: Any, token: str = "<new1>", class_word: str = "cat", *, seed: int = 0,
                         strength: float = 0.05) -> Any:
    """A stand-in for a trained concept on ``base`` (a :class:`~mergekit_cd.base.BaseModel`).

    Fine-tuning K/V on prompts moves each weight only along the text features of those
    prompts (the gradient of ``||W c - t||^2`` is ``(W c - t) c^T``), so every difference here is
    a random combination of the features of the concept's training prompts, scaled to
    ``strength`` times the weight's norm. The token gets random embeddings (std 0.02, like
    CLIP's table). Deterministic in ``seed``; records base, fingerprint, architecture, class word.
    """
    return random_concept_deltas(base, [(token, class_word)], seed=seed, strength=strength)[0]


def random_concept_deltas(base: Any, concepts: list[tuple[str, str]], *, seed: int = 0,
                          strength: float = 0.05) -> list[Any]:
    """:func:`random_concept_delta` for several (token, class word) pairs, seeds ``seed, seed + 1, ...``,
    with one text-encoder load for all of them (what makes 100 full-size concepts affordable)."""
    from .delta import Concept, ConceptDelta, LayerDelta
    from .features import TextFeatures, TextSet
    from .prompts import target_prompts

    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(concepts))]
    embeddings = {token: tuple(0.02 * torch.randn(dim, generator=generator) for dim in base.token_dims())
                  for (token, _), generator in zip(concepts, generators)}
    prompts_of = [tuple(target_prompts(token, class_word)) for token, class_word in concepts]
    encoded = TextFeatures(base, embeddings).encode([TextSet((*prompts, f"a {token} {class_word} on a table",
                                                              f"a close up of a {token} {class_word}"))
                                                     for prompts, (token, class_word) in zip(prompts_of, concepts)])
    base_layers = [(name, base.kv(name)) for name in base.layer_names()]
    deltas = []
    for (token, class_word), generator, prompts, training in zip(concepts, generators, prompts_of, encoded):
        features = torch.cat([prompt.rows for prompt in training])

        def difference(weight: torch.Tensor) -> torch.Tensor:
            change = torch.randn(weight.shape[0], features.shape[0], generator=generator) @ features
            return change * (strength * float(weight.norm()) / float(change.norm()))

        layers = {name: LayerDelta(difference(key), difference(value)) for name, (key, value) in base_layers}
        deltas.append(ConceptDelta(layers, {token: embeddings[token]}, base=base.name,
                                   base_fingerprint=base.fingerprint, architecture=base.architecture.name,
                                   concepts=(Concept(token, class_word, prompts),)))
    return deltas

_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
               hidden_act="quick_gelu", projection_dim=768)
_OPEN_CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                        num_hidden_layers=32, hidden_act="gelu", projection_dim=1280)

#: Real layer shapes of SD1.5 and SDXL (their published configs), for benchmarks at full size:
#: the text encoders (CLIP ViT-L; SDXL adds OpenCLIP bigG) and the UNet's configuration.
FULL_SIZE_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": {
        "text_encoders": [("text_encoder", EOS_TOKEN, _CLIP_L, "CLIPTextModel")],
        "unet": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                     block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        "vae": dict(sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.18215),
    },
    "sdxl": {
        "text_encoders": [("text_encoder", EOS_TOKEN, _CLIP_L, "CLIPTextModel"),
                          ("text_encoder_2", "!", _OPEN_CLIP_BIG_G, "CLIPTextModelWithProjection")],
        "unet": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                     block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                     use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                     projection_class_embeddings_input_dim=2816),
    },
}
#: CLIP's vocabulary size: the embedding tables get their real size (the tiny tokenizer uses the first rows).
_CLIP_VOCAB = 49408


def save_full_size_base(kind: str, path: str | os.PathLike[str], *, seed: int = 0,
                        full_unet: bool = False) -> Path:
    """Write a base with the real shapes of SD1.5 (``"sd15"``) or SDXL (``"sdxl"``) and random weights.

    By default only what a merge reads is written: the text encoder(s) at full size (random
    weights, the tiny tokenizer), the UNet's real ``config.json``, and its ``attn2.to_k``/``to_v``
    tensors under their real names and shapes (a full SDXL UNet would be 10 GB of random
    numbers nobody reads); such a folder serves ``cd-merge`` and benchmarks, not sampling.
    ``full_unet`` (SD1.5 only) writes the whole UNet and VAE instead: a complete pipeline, for
    baselines that load one.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file
    import transformers
    from transformers import CLIPTextConfig

    if kind not in FULL_SIZE_CONFIGS:
        raise ValueError(f"kind must be one of {sorted(FULL_SIZE_CONFIGS)}, got {kind!r}")
    config = FULL_SIZE_CONFIGS[kind]
    path = Path(path)
    model_index: dict[str, Any] = {"_class_name": "StableDiffusionXLPipeline" if kind == "sdxl"
                                   else "StableDiffusionPipeline", "_diffusers_version": "0.30.0"}
    with torch.random.fork_rng(devices=[]):
        for name, pad_token, te_kwargs, model_class in config["text_encoders"]:
            tokenizer = tiny_tokenizer(pad_token)
            te_config = CLIPTextConfig(vocab_size=_CLIP_VOCAB, max_position_embeddings=tokenizer.model_max_length,
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id, **te_kwargs)
            encoder = _seeded(seed, name, lambda: getattr(transformers, model_class)(te_config))
            encoder.save_pretrained(path / name, safe_serialization=True)
            del encoder
            tokenizer_name = name.replace("text_encoder", "tokenizer")
            tokenizer.save_pretrained(path / tokenizer_name)
            _write_vocab_files(path / tokenizer_name)
            model_index[name] = ["transformers", model_class]
            model_index[tokenizer_name] = ["transformers", "CLIPTokenizer"]
        if full_unet:
            if "vae" not in config:
                raise ValueError(f"full_unet is only offered for sd15 (a full {kind} UNet is too large).")
            _seeded(seed, "unet", lambda: UNet2DConditionModel(**config["unet"])).save_pretrained(path / "unet")
            _seeded(seed, "vae", lambda: AutoencoderKL(**config["vae"])).save_pretrained(path / "vae")
            model_index.update(vae=["diffusers", "AutoencoderKL"], safety_checker=[None, None],
                               feature_extractor=[None, None], requires_safety_checker=False)
        else:
            with torch.device("meta"):
                unet = UNet2DConditionModel(**config["unet"])
            unet.save_config(path / "unet")
            generator = torch.Generator().manual_seed(seed)
            tensors = {name: 0.02 * torch.randn(tuple(parameter.shape), generator=generator)
                       for name, parameter in unet.named_parameters()
                       if name.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))}
            save_file(tensors, str(path / "unet" / "diffusion_pytorch_model.safetensors"))
    DDIMScheduler(**_SCHEDULER).save_pretrained(path / "scheduler")
    model_index["unet"] = ["diffusers", "UNet2DConditionModel"]
    model_index["scheduler"] = ["diffusers", "DDIMScheduler"]
    (path / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return path


# --------------------------------------------------------------------------- files as the peers write them
def _peer_parameters(weights: Any) -> tuple[dict[str, torch.nn.Parameter], dict[str, Any]]:
    """``weights``' layers as trainable parameters and its tokens as rows of whole embedding tables,
    exactly what the peers' scripts hold when they save: ``text_encoder.get_input_embeddings().weight[id]``
    is a view into the table that requires grad, and an SDXL token is a list of two such rows."""
    unet = {f"{layer}.{projection}.weight": torch.nn.Parameter(matrix.detach().clone())
            for layer, pair in weights.layers.items() for projection, matrix in zip(("to_k", "to_v"), pair)}
    first = next(iter(weights.tokens.values()), ())
    tables = [torch.nn.Parameter(torch.randn(64 + len(weights.tokens), embedding.numel())) for embedding in first]
    with torch.no_grad():
        for row, embeddings in enumerate(weights.tokens.values()):
            for table, embedding in zip(tables, embeddings):
                table[64 + row] = embedding
    tokens = {}
    for row, name in enumerate(weights.tokens):
        rows = [table[64 + row] for table in tables]
        tokens[name] = rows[0] if len(rows) == 1 else rows
    return unet, tokens


def save_like_authors_bin(weights: Any, path: str | os.PathLike[str]) -> Path:
    """``weights`` (:class:`~mergekit_cd.weights.FineTunedWeights`) as the authors'
    ``src/diffusers_training.py`` saves ``delta.bin``: ``torch.save`` of trainable parameters
    (``requires_grad=True``) and of token rows that are grad-requiring views into the whole
    embedding table; SDXL tokens as ``[text_encoder row, text_encoder_2 row]`` lists."""
    unet, tokens = _peer_parameters(weights)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"unet": unet, "modifier_token": tokens}, path)
    return path


def save_like_diffusers_bin(weights: Any, folder: str | os.PathLike[str]) -> Path:
    """``weights`` as diffusers' ``train_custom_diffusion.py --no_safe_serialization`` saves them:
    ``pytorch_custom_diffusion_weights.bin`` with grad-requiring processor weights (and the empty
    entries of processors without weights) and one ``<token>.bin`` per token holding a
    grad-requiring view of a row of the whole embedding table."""
    unet, tokens = _peer_parameters(weights)
    if any(isinstance(row, list) for row in tokens.values()):
        raise ValueError("diffusers' train_custom_diffusion.py trains SD1/SD2 only; it writes no SDXL token files")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {}
    for key, parameter in unet.items():
        layer, projection, _ = key.rsplit(".", 2)
        state[f"{layer}.processor.{projection}_custom_diffusion.weight"] = parameter
        state[f"{layer.removesuffix('attn2')}attn1.processor"] = {}
    torch.save(state, folder / "pytorch_custom_diffusion_weights.bin")
    for name, row in tokens.items():
        torch.save({name: row}, folder / f"{name}.bin")
    return folder
