"""What the LoRA layouts share: which keys are the cross-attention K/V, which the UNet's other
modules and which are left unread (text-encoder parts; anything no plain LoRA factor is refused
with what it is), pairing the factors, each tool's scale, and factors to write."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..delta import ConceptDelta, LayerDelta, LowRank
from ..errors import MergeError
from ..fileio import read_tensor
from ._common import Delta, check_matrix, natural_order

KV_PROJECTIONS = ("to_k", "to_v")
_CROSS_ATTENTION = tuple(f".attn2.{projection}" for projection in KV_PROJECTIONS)
#: The first name of every module path in diffusers' UNet: a path starting otherwise is no
#: diffusers module (an SDXL resnet in kohya's LDM names), so nothing can carry it.
_UNET_ROOTS = ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
               "add_embedding")
#: How the LoRA layouts begin a text-encoder key: kohya's ``lora_te_``/``lora_te1_``/``lora_te2_``,
#: diffusers' ``text_encoder.``/``text_encoder_2.``.
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder")


@dataclass(frozen=True)
class LoraKeys:
    """A LoRA file's keys by what they are: ``(module, "up"/"down") -> key`` for the cross-attention
    K/V (``kv``) and for the UNet's other modules (``other``, diffusers module paths), and the keys
    no reader reads (``unread``): text-encoder parts, and UNet parts with no diffusers module name."""

    kv: dict[tuple[str, str], str]
    other: dict[tuple[str, str], str]
    unread: tuple[str, ...]


def check_lora_keys(keys: Iterable[str], source: str, *, module_of: Any, parts: dict[str, str],
                    extra: Iterable[str] = ()) -> LoraKeys:
    """The keys of a LoRA file sorted by what they are (:class:`LoraKeys`); ``module_of(name)``
    gives a key's diffusers module path (None when it is no UNet module's). A key that is no
    plain LoRA factor of the UNet or the text encoders (DoRA magnitudes, LyCORIS variants) is
    refused with a summary of what the file holds: reading such a file as a plain LoRA would
    change what it does. ``extra``: keys the caller reads itself (alphas, bundled embeddings)."""
    found: dict[str, dict[tuple[str, str], str]] = {"kv": {}, "other": {}}
    unread: list[str] = []
    unknown: list[str] = []
    skip = set(extra)
    for key in keys:
        if key in skip:
            continue
        if key.startswith(TEXT_ENCODER_PREFIXES):
            unread.append(key)
            continue
        suffix = next((s for s in parts if key.endswith(s)), None)
        module = module_of(key[: -len(suffix)]) if suffix else None
        if module is None:
            unknown.append(key)
            continue
        if module.split(".", 1)[0] not in _UNET_ROOTS:
            unread.append(key)
            continue
        kind = found["kv" if module.endswith(_CROSS_ATTENTION) else "other"]
        if (module, parts[suffix]) in kind:
            raise MergeError(f"{source}: {key} and {kind[(module, parts[suffix])]} both hold the "
                             f"{parts[suffix]} factor of {module}.")
        kind[(module, parts[suffix])] = key
    if unknown:
        raise MergeError(f"{source}: holds {counted(len(unknown), 'tensor')} that "
                         f"{'is no plain LoRA factor' if len(unknown) == 1 else 'are no plain LoRA factors'} (e.g. "
                         f"{', '.join(natural_order(unknown)[:3])}: {describe_parts(unknown)}); mergekit-cd reads "
                         f"the lora_A / lora_B (lora_down / lora_up) factors of a LoRA, and will not read the rest "
                         f"as if they were absent.")
    if not found["kv"]:
        raise MergeError(f"{source}: a LoRA file with no cross-attention K/V parts.")
    return LoraKeys(found["kv"], found["other"], tuple(natural_order(unread)))


#: What a LoRA's parts beyond the cross-attention K/V are, by marks in their names, in the order
#: messages name them; the first kind a name shows is its kind.
PART_KINDS = {"text-encoder parts": TEXT_ENCODER_PREFIXES, "DoRA magnitudes": ("magnitude", "dora_scale"),
              "LyCORIS (LoHa/LoKr) parts": ("hada_", "lokr_"), "self-attention": ("attn1",),
              "feed-forward": ("ff.", "ff_"), "cross-attention queries and outputs": ("attn2.to_q", "attn2_to_q",
                                                                                      "attn2.to_out", "attn2_to_out"),
              "convolutions and projections": ("conv", "proj_")}
OTHER_KIND = "other modules"
#: The endings of a LoRA key after its module's name: the factors and kohya's alpha.
_FACTOR_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".down.weight",
                    ".up.weight", ".alpha")


def part_kind(name: str) -> str:
    """What a LoRA key or module beyond the cross-attention K/V is (:data:`PART_KINDS`)."""
    return next((kind for kind, marks in PART_KINDS.items() if any(mark in name for mark in marks)), OTHER_KIND)


def part_module(name: str) -> str:
    """The module a LoRA key belongs to (the key without its factor's ending); a module path as it is."""
    return next((name[: -len(suffix)] for suffix in _FACTOR_SUFFIXES if name.endswith(suffix)), name)


def count_parts(names: Iterable[str]) -> dict[str, int]:
    """Kind -> how many modules of that kind ``names`` (keys or module paths) hold, in the order of
    :data:`PART_KINDS`."""
    modules = {part_module(name) for name in names}
    counts = {kind: sum(part_kind(module) == kind for module in modules) for kind in [*PART_KINDS, OTHER_KIND]}
    return {kind: count for kind, count in counts.items() if count}


def counted(count: int, noun: str) -> str:
    """``1 LoRA module``, ``3 LoRA modules``: a count with its noun in agreement."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def describe_parts(keys: Iterable[str]) -> str:
    """What LoRA keys beyond the cross-attention K/V are, in words."""
    return ", ".join(count_parts(keys)) or OTHER_KIND


def read_lora(handle: Any, keys: LoraKeys, scale: Any, source: str) -> tuple[
        dict[str, LayerDelta], dict[str, LowRank], tuple[str, ...]]:
    """From an open safetensors ``handle``: the K/V layers (:func:`lora_layers`), the UNet's other
    modules as low-rank differences at the same ``scale(module, rank)``, and the keys left unread:
    ``keys.unread`` and the factors of convolutions (LoCon), which only a merge's drop can take."""
    kv = {entry: read_tensor(handle, key, source) for entry, key in keys.kv.items()}
    other = {entry: read_tensor(handle, key, source) for entry, key in keys.other.items()}
    convolutions = {module for (module, _), tensor in other.items() if tensor.dim() != 2}
    unread = [*keys.unread, *(key for (module, _), key in keys.other.items() if module in convolutions)]
    modules = lora_modules({entry: tensor for entry, tensor in other.items() if entry[0] not in convolutions},
                           scale, source)
    return lora_layers(kv, scale, source), modules, tuple(natural_order(unread))


def lora_modules(parts: dict[tuple[str, str], Tensor], scale: Any, source: str) -> dict[str, LowRank]:
    """Module -> its difference ``scale(module, rank) * up @ down`` as LowRank; each module's two
    factors present, checked (finite, 2-D) and agreeing in rank."""
    modules: dict[str, LowRank] = {}
    for module in natural_order({module for module, _ in parts}):
        if (module, "up") not in parts or (module, "down") not in parts:
            missing = "up (B)" if (module, "up") not in parts else "down (A)"
            raise MergeError(f"{source}: module {module} has no {missing} factor.")
        up = check_matrix(parts[(module, "up")], f"{module} up", source, factor=True)
        down = check_matrix(parts[(module, "down")], f"{module} down", source, factor=True)
        if up.shape[1] != down.shape[0]:
            raise MergeError(f"{source}: module {module} has factors of shapes {tuple(up.shape)} and "
                             f"{tuple(down.shape)}, which do not multiply (up: out x rank, down: rank x in).")
        modules[module] = LowRank(up * scale(module, up.shape[1]), down)
    return modules


def lora_layers(parts: dict[tuple[str, str], Tensor], scale: Any, source: str) -> dict[str, LayerDelta]:
    """Layer -> K/V differences (:func:`lora_modules`); a projection the LoRA leaves out is an
    unchanged one (rank 0 of its sibling's shape: K and V of cross-attention have one shape)."""
    factors: dict[str, dict[str, LowRank]] = {}
    for module, part in lora_modules(parts, scale, source).items():
        layer, projection = module.rsplit(".", 1)
        factors.setdefault(layer, {})[projection] = part
    layers: dict[str, LayerDelta] = {}
    widths: set[int] = set()
    for layer, pair in factors.items():
        shapes = {part.shape for part in pair.values()}
        if len(shapes) > 1:
            raise MergeError(f"{source}: layer {layer} has K and V parts of different shapes "
                             f"{sorted(tuple(shape) for shape in shapes)}.")
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
    module: a zero difference is left out), refusing content that is not factored yet; then
    the other modules the delta carries (``other_modules``), under their module paths."""
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
    factors.update({module: part for module, part in obj.other_modules.items() if part.rank})
    return factors
