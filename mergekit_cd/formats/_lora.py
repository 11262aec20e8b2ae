"""What the LoRA layouts share: which keys are the cross-attention K/V (everything else is
refused with what it is), pairing the factors, each tool's scale, and factors to write."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..delta import ConceptDelta, LayerDelta, LowRank
from ..errors import MergeError
from ._common import Delta, check_matrix, natural_order

KV_PROJECTIONS = ("to_k", "to_v")
_CROSS_ATTENTION = tuple(f".attn2.{projection}" for projection in KV_PROJECTIONS)


def check_lora_keys(keys: Iterable[str], source: str, *, module_of: Any, parts: dict[str, str],
                    extra: Iterable[str] = ()) -> dict[tuple[str, str], str]:
    """``(module, "up"/"down") -> key`` for the cross-attention K/V factors among ``keys``;
    ``module_of(name)`` gives a key's diffusers module path (None when it is no UNet module's).
    A key that is anything else (self-attention, feed-forward, text-encoder parts, DoRA
    magnitudes, LyCORIS variants) is refused with a summary of what the file holds: the merge
    is defined on the K/V of cross-attention only, and silently dropping a part would change
    what the LoRA does. ``extra``: keys the caller reads itself (alphas, bundled embeddings)."""
    found: dict[tuple[str, str], str] = {}
    other: list[str] = []
    skip = set(extra)
    for key in keys:
        if key in skip:
            continue
        suffix = next((s for s in parts if key.endswith(s)), None)
        module = module_of(key[: -len(suffix)]) if suffix else None
        if module is None or not module.endswith(_CROSS_ATTENTION):
            other.append(key)
            continue
        if (module, parts[suffix]) in found:
            raise MergeError(f"{source}: {key} and {found[(module, parts[suffix])]} both hold the "
                             f"{parts[suffix]} factor of {module}.")
        found[(module, parts[suffix])] = key
    if other:
        raise MergeError(f"{source}: holds {len(other)} tensors beyond the UNet's cross-attention K/V "
                         f"(e.g. {', '.join(natural_order(other)[:3])}: {_kinds(other)}); mergekit-cd reads "
                         f"only the attn2.to_k / attn2.to_v parts of a LoRA, and will not drop the rest "
                         f"silently. Extract those parts first.")
    if not found:
        raise MergeError(f"{source}: a LoRA file with no cross-attention K/V parts.")
    return found


def _kinds(keys: list[str]) -> str:
    """What the refused keys are, in words."""
    kinds = {"text-encoder parts": ("text_encoder", "lora_te"), "DoRA magnitudes": ("magnitude", "dora_scale"),
             "LyCORIS (LoHa/LoKr) parts": ("hada_", "lokr_"), "self-attention": ("attn1",),
             "feed-forward": ("ff.", "ff_"), "convolutions and projections": ("conv", "proj_")}
    named = [name for name, marks in kinds.items() if any(mark in key for key in keys for mark in marks)]
    return ", ".join(named) if named else "other modules"


def lora_layers(parts: dict[tuple[str, str], Tensor], scale: Any, source: str) -> dict[str, LayerDelta]:
    """Layer -> K/V differences ``scale(module, rank) * up @ down`` as LowRank; each module's two
    factors present, checked (finite, 2-D) and agreeing in rank; a projection the LoRA leaves out
    is an unchanged one (rank 0 of its sibling's shape: K and V of cross-attention have one shape)."""
    factors: dict[str, dict[str, LowRank]] = {}
    for module in natural_order({module for module, _ in parts}):
        if (module, "up") not in parts or (module, "down") not in parts:
            missing = "up (B)" if (module, "up") not in parts else "down (A)"
            raise MergeError(f"{source}: module {module} has no {missing} factor.")
        up = check_matrix(parts[(module, "up")], f"{module} up", source, factor=True)
        down = check_matrix(parts[(module, "down")], f"{module} down", source, factor=True)
        if up.shape[1] != down.shape[0]:
            raise MergeError(f"{source}: module {module} has factors of shapes {tuple(up.shape)} and "
                             f"{tuple(down.shape)}, which do not multiply (up: out x rank, down: rank x in).")
        layer, projection = module.rsplit(".", 1)
        factors.setdefault(layer, {})[projection] = LowRank(up * scale(module, up.shape[1]), down)
    layers: dict[str, LayerDelta] = {}
    widths: set[int] = set()
    for layer, pair in factors.items():
        shapes = {part.shape for part in pair.values()}
        if len(shapes) > 1:
            raise MergeError(f"{source}: layer {layer} has K and V parts of different shapes {sorted(shapes)}.")
        (out, width), = shapes
        widths.add(width)
        empty = LowRank(torch.zeros(out, 0), torch.zeros(0, width))
        layers[layer] = LayerDelta(pair.get("to_k", empty), pair.get("to_v", empty))
    if len(widths) > 1:
        raise MergeError(f"{source}: its layers read different feature widths {sorted(widths)}.")
    return layers


def peft_scale(config: dict[str, Any], module: str, rank: int, source: str) -> float:
    """peft's scale of ``module``: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), ``alpha_pattern``
    first; 1 with no adapter config (the diffusers convention for files without one)."""
    if not config:
        return 1.0
    pattern = config.get("alpha_pattern") or {}
    if not isinstance(pattern, dict):
        raise MergeError(f"{source}: its adapter metadata's alpha_pattern is not a JSON object.")
    alpha = next((value for key, value in pattern.items() if module == key or module.endswith("." + key)),
                 config.get("lora_alpha", rank))
    return positive_number(alpha, f"the lora_alpha of {module}", source) / (
        math.sqrt(rank) if config.get("use_rslora") is True else rank)


def positive_number(value: Any, what: str, source: str) -> float:
    """``value`` as a finite positive float (a LoRA's alpha), or one error naming it."""
    if isinstance(value, Tensor):
        value = float(value) if value.numel() == 1 else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise MergeError(f"{source}: {what} should be one positive number, found {value!r}.")
    return float(value)


def lora_factors(obj: Delta, target: Path, format_name: str) -> dict[str, LowRank]:
    """``"<layer>.to_k"`` -> factors of each nonzero K/V difference (a LoRA has no rank-0
    module: a zero difference is left out), refusing content that is not factored yet."""
    if not isinstance(obj, ConceptDelta):
        raise MergeError(f"Cannot write {target} as {format_name}: it stores differences, not full weights.")
    factors: dict[str, LowRank] = {}
    for layer, pair in obj.layers.items():
        for projection, part in zip(KV_PROJECTIONS, (pair.key, pair.value)):
            if not isinstance(part, LowRank):
                raise MergeError(f"Cannot write {target} as {format_name}: {layer}.{projection} is not factored "
                                 f"(mergekit_cd.save and the commands factor it first).")
            if part.rank:
                factors[f"{layer}.{projection}"] = part
    return factors
