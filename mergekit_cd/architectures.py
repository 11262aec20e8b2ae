"""The model families mergekit-cd knows, as data: text encoders, which hidden state feeds
cross-attention, how to recognise each family from a diffusers folder's configs, and how
kohya's LoRA files name its layers.

Layer names everywhere in mergekit-cd are diffusers module paths up to the cross-attention
module, e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn2``; its K and V weights are
``<layer>.to_k.weight`` and ``<layer>.to_v.weight`` in the UNet state dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import MergeError


@dataclass(frozen=True)
class Architecture:
    """One model family.

    text_encoders / tokenizers: component folder names, in the order their features are
    concatenated on the feature axis.
    hidden_state: ``None`` = ``last_hidden_state`` (after the final layer norm, SD1/SD2);
    ``-2`` = ``hidden_states[-2]``, the penultimate layer without final norm (SDXL).
    released_context_dim: the text-feature width of the family's released models (tiny test
    models differ), which names the family of a foreign file that records none.
    time_conditioning: the UNet also takes the pooled text embedding and the size/crop time ids
    (SDXL's ``text_time`` added conditioning).
    vae_float32_under_fp16: the VAE overflows in float16 and must encode in float32 (SDXL's).
    text_encoder_activation: the first text encoder's ``hidden_act`` that tells the family from
    one with the same components (SD2's OpenCLIP ``gelu`` against OpenAI CLIP's); None: any.
    kohya_ldm_names: kohya's LoRA files name its layers by the LDM blocks (``input_blocks_4_1_...``,
    SDXL), not by diffusers' module paths with ``_`` for ``.``.
    """

    name: str
    text_encoders: tuple[str, ...]
    tokenizers: tuple[str, ...]
    hidden_state: int | None
    description: str
    released_context_dim: int
    time_conditioning: bool = False
    vae_float32_under_fp16: bool = False
    text_encoder_activation: str | None = None
    kohya_ldm_names: bool = False

    def recognised_in(self, model_index: dict[str, Any], unet_config: dict[str, Any],
                      text_encoder_config: dict[str, Any]) -> bool:
        """Whether configs show every fact this entry records: its text encoders, its time
        conditioning (when it has one) and its text encoder's activation (when it names one)."""
        activation = text_encoder_config.get("hidden_act", "quick_gelu")  # transformers' CLIP default
        return (all(name in model_index for name in self.text_encoders)
                and (not self.time_conditioning or unet_config.get("addition_embed_type") == "text_time")
                and self.text_encoder_activation in (None, activation))

    @property
    def specificity(self) -> int:
        """How many facts :meth:`recognised_in` checks: the most specific recognised entry wins."""
        return len(self.text_encoders) + int(self.time_conditioning) + int(self.text_encoder_activation is not None)

    def time_ids(self, height: int, width: int) -> list[int]:
        """The size/crop time ids (``time_conditioning``) of an uncropped height x width image made
        at that size: original size, crop corner (0, 0), target size."""
        return [height, width, 0, 0, height, width]


ARCHITECTURES: dict[str, Architecture] = {
    "sd1": Architecture("sd1", ("text_encoder",), ("tokenizer",), None,
                        "Stable Diffusion 1.x (CLIP ViT-L text encoder)", 768),
    "sd2": Architecture("sd2", ("text_encoder",), ("tokenizer",), None,
                        "Stable Diffusion 2.x (OpenCLIP ViT-H text encoder)", 1024, text_encoder_activation="gelu"),
    "sdxl": Architecture("sdxl", ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"), -2,
                         "Stable Diffusion XL (CLIP ViT-L + OpenCLIP bigG)", 2048,
                         time_conditioning=True, vae_float32_under_fp16=True, kohya_ldm_names=True),
}


def architecture_of_width(context_dim: int | None) -> Architecture | None:
    """The family whose released models read text features of ``context_dim``, if one does."""
    return next((a for a in ARCHITECTURES.values() if a.released_context_dim == context_dim), None)


def detect_architecture(model_index: dict[str, Any], unet_config: dict[str, Any],
                        text_encoder_config: dict[str, Any]) -> Architecture:
    """Recognise the family from configs (never from names or paths): the most specific entry of
    the table whose facts they show (:meth:`Architecture.recognised_in`). SDXL: a second text
    encoder and the ``text_time`` added conditioning; SD2: one text encoder of OpenCLIP's
    ``gelu``; SD1: one text encoder.
    """
    if "text_encoder" not in model_index:
        raise MergeError("The model has no text_encoder; only text-conditioned Stable Diffusion "
                         "pipelines (SD1.x, SD2.x, SDXL) can be merged.")
    recognised = [a for a in ARCHITECTURES.values() if a.recognised_in(model_index, unet_config, text_encoder_config)]
    return max(recognised, key=lambda architecture: architecture.specificity)


def pipeline_architecture(pipe: Any) -> Architecture:
    """The family of a loaded diffusers pipeline, recognised from its configs as for a folder."""
    if getattr(pipe, "unet", None) is None:
        raise MergeError(f"{type(pipe).__name__} has no UNet; a delta goes into a Stable Diffusion "
                         f"pipeline (SD1.x, SD2.x, SDXL).")
    encoder = getattr(pipe, "text_encoder", None)
    encoder_config = encoder.config.to_dict() if encoder is not None else {}
    return detect_architecture(dict(pipe.config), dict(pipe.unet.config), encoder_config)
