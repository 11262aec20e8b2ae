"""What a delta file holds, for ``cd-inspect``: format, kind, base, layers, tokens, norms, metadata,
a LoRA's parts beyond the cross-attention K/V; or a token embedding file's token and layout."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import formats
from .architectures import architecture_of_width
from .base import BaseModel, layer_order
from .delta import ConceptDelta, LowRank, dense
from .formats._common import natural_order
from .formats._lora import count_parts, counted
from .formats.token_files import token_file
from .loading import (EMBEDDING, as_base, check_delta, check_fits, check_token_sizes, fit_target, is_embedding_file,
                      resolve_delta)
from .weights import FineTunedWeights


@dataclass(frozen=True)
class LayerSummary:
    name: str
    shape: tuple[int, int]
    key_norm: float
    value_norm: float
    rank: str  # "full" or the low-rank factor ranks


@dataclass(frozen=True)
class Summary:
    """Everything ``cd-inspect`` prints.

    kind: what the file stores, "differences" or "full fine-tuned weights"; the layer norms
    are of differences whenever ``compared_with`` is set (full weights minus that base).
    architecture_source: "recorded" (in the file), "guessed" (from the text-feature width) or
    "base" (the base it was compared with).
    compared_with: the ``--base`` given, with its fingerprint and whether it matches the
    fingerprint the file records.
    beyond_kv: a LoRA's modules beyond the cross-attention K/V, counted by kind (as the refusal
    of ``--other-layers refuse`` names them), and one of them as an example.
    For a token embedding file (format ``embedding``), ``kind`` is its layout and there are no layers.
    """

    source: str
    format: str
    kind: str
    architecture: str | None
    architecture_source: str | None
    base: str | None
    base_fingerprint: str | None
    context_dim: int | None
    layers: tuple[LayerSummary, ...]
    tokens: dict[str, tuple[int, ...]]
    concepts: tuple[str, ...]
    ignored: tuple[str, ...]
    metadata: dict[str, Any]
    compared_with: str | None = None
    beyond_kv: dict[str, int] = field(default_factory=dict)
    beyond_kv_example: str | None = None

    @property
    def norms_of_differences(self) -> bool:
        return self.kind == "differences" or self.compared_with is not None

    def lines(self, *, all_layers: bool = False) -> list[str]:
        architecture = self.architecture or "unknown"
        if self.architecture and self.architecture_source != "recorded":
            architecture += f" ({self.architecture_source})"
        out = [f"file:         {self.source}",
               f"format:       {self.format} ({self.kind})",
               f"architecture: {architecture}, text features: {self.context_dim}",
               f"base:         {self.base or 'not recorded'}"
               + (f" (fingerprint {self.base_fingerprint[:16]})" if self.base_fingerprint else "")]
        if self.compared_with:
            out.append(f"compared to:  {self.compared_with}")
        out.append("tokens:       " + (", ".join(f"{t} {list(d)}" for t, d in self.tokens.items()) or "none"))
        if self.concepts:
            out.append("concepts:     " + ", ".join(self.concepts))
        if self.format == EMBEDDING:
            out.append("layers:       none: a token embedding file (as a cd-merge input, its token on the base's "
                       "unchanged K/V)")
            return out
        norms = "difference norms" if self.norms_of_differences else "weight norms"
        out.append(f"layers:       {len(self.layers)} cross-attention layers ({norms}: K, V)")
        shown = self.layers if all_layers or len(self.layers) <= 20 else self.layers[:10]
        for layer in shown:
            out.append(f"  {layer.name:64} {str(list(layer.shape)):12} {layer.key_norm:10.4g} "
                       f"{layer.value_norm:10.4g}  {layer.rank}")
        if len(shown) < len(self.layers):
            out.append(f"  ... {len(self.layers) - len(shown)} more (--all-layers)")
        if self.beyond_kv:
            out.append(f"beyond K/V:   {counted(sum(self.beyond_kv.values()), 'LoRA module')} the merge does not "
                       f"solve for (cd-merge --other-layers), e.g. {self.beyond_kv_example}")
            out.extend(f"  {kind:64} {count}" for kind, count in self.beyond_kv.items())
        if self.ignored:
            out.append(f"ignored:      {len(self.ignored)} entries a K/V merge does not use, "
                       f"e.g. {self.ignored[0]}")
        if self.metadata:
            out.append("metadata:")
            out.extend("  " + line for line in json.dumps(self.metadata, indent=2, default=str).splitlines())
        return out


def _rank(x: Any) -> str:
    return f"rank {x.rank}" if isinstance(x, LowRank) else "full"


def summarize(reference: str | os.PathLike[str], *,
              base: BaseModel | str | os.PathLike[str] | None = None) -> Summary:
    """Read ``reference`` (no base needed); with ``base``, full weights are shown as differences
    against it and the file's recorded base fingerprint is compared with it.

    The file is read once; the base's architecture, layers and token sizes must fit (a file
    recorded for another base fingerprint is still shown, with the difference noted).
    """
    path = resolve_delta(reference)
    source = str(reference)
    if is_embedding_file(path):
        return _summarize_embedding(path, source, as_base(base) if base is not None else None)
    module = formats.detect_format(path)
    content = module.read(path)
    beyond = [*content.other_modules, *content.unread_parts] if isinstance(content, ConceptDelta) else []
    kind = "full fine-tuned weights" if isinstance(content, FineTunedWeights) else "differences"
    ignored = (content.ignored if isinstance(content, FineTunedWeights)
               else tuple(content.metadata.get("ignored", ())))
    recorded = (content.base, content.base_fingerprint, content.architecture)
    compared_with = None
    if base is not None:
        base = as_base(base)
        if isinstance(content, FineTunedWeights):
            check_fits(content, fit_target(base), source)
            content = content.to_delta(base.kv)
        check_delta(content, base, source, check_base=False)
        compared_with = f"{base.name} (fingerprint {base.fingerprint[:16]}; {_match(recorded[1], base)})"
    if isinstance(content, FineTunedWeights):
        layers = tuple(LayerSummary(name, tuple(k.shape), float(k.float().norm()), float(v.float().norm()),
                                    "full")
                       for name, (k, v) in content.layers.items())
    else:
        layers = tuple(LayerSummary(name, tuple(layer.key.shape), float(dense(layer.key).float().norm()),
                                    float(dense(layer.value).float().norm()),
                                    _rank(layer.key) if _rank(layer.key) == _rank(layer.value)
                                    else f"{_rank(layer.key)} / {_rank(layer.value)}")
                       for name, layer in content.layers.items())
    layers = tuple(sorted(layers, key=lambda layer: layer_order(layer.name)))
    context = layers[0].shape[1] if layers else None
    architecture, architecture_source = recorded[2], "recorded"
    if architecture is None and base is not None:
        architecture, architecture_source = base.architecture.name, "from the base"
    elif architecture is None and architecture_of_width(context) is not None:
        architecture, architecture_source = architecture_of_width(context).name, "guessed from the text-feature width"
    metadata = {k: v for k, v in content.metadata.items() if k != "ignored"}
    concepts = tuple(f"{c.token or '(no token)'} = {'style' if c.style else (c.class_word or 'class not recorded')}"
                     for c in content.concepts)
    return Summary(source, module.NAME, kind, architecture, architecture_source if architecture else None,
                   recorded[0], recorded[1], context, layers,
                   {t: tuple(e.shape[0] for e in emb) for t, emb in content.tokens.items()},
                   concepts, ignored, metadata, compared_with, count_parts(beyond),
                   natural_order(beyond)[0] if beyond else None)


def _summarize_embedding(path: Path, source: str, base: BaseModel | None) -> Summary:
    """A token embedding file: its token, widths and layout (the architecture guessed from the
    widths, or the base's, whose text encoders they must fit)."""
    found = token_file(path, "to inspect")
    widths = tuple(embedding.shape[0] for embedding in found.embeddings)
    architecture, architecture_source, compared_with = None, None, None
    if base is not None:
        check_token_sizes({found.name: found.embeddings}, base.token_dims(), base.name, source)
        architecture, architecture_source = base.architecture.name, "from the base"
        compared_with = f"{base.name} (fingerprint {base.fingerprint[:16]}; the token's widths fit its text encoders)"
    elif architecture_of_width(sum(widths)) is not None:
        architecture = architecture_of_width(sum(widths)).name
        architecture_source = "guessed from the token's widths"
    return Summary(source, EMBEDDING, found.layout, architecture, architecture_source, None, None, sum(widths), (),
                   {found.name: widths}, (), (), {}, compared_with)


def _match(recorded_fingerprint: str | None, base: BaseModel) -> str:
    if recorded_fingerprint is None:
        return "the file records no base fingerprint"
    if recorded_fingerprint == base.fingerprint:
        return "matches the file's base"
    return "DIFFERS from the file's base: the delta was made for another model"
