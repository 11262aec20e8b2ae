"""What a delta file holds, for ``cd-inspect``: format, kind, base, layers, tokens, norms, metadata."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from . import formats
from .delta import ConceptDelta, LowRank, dense
from .loading import as_base, load, resolve_delta
from .weights import FineTunedWeights

#: Text-feature widths of the real model families, to name the architecture of foreign files.
CONTEXT_DIMS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


@dataclass(frozen=True)
class LayerSummary:
    name: str
    shape: tuple[int, int]
    key_norm: float
    value_norm: float
    rank: str  # "full" or the low-rank factor ranks


@dataclass(frozen=True)
class Summary:
    """Everything ``cd-inspect`` prints."""

    source: str
    format: str
    kind: str  # "differences" or "full fine-tuned weights"
    architecture: str | None
    base: str | None
    base_fingerprint: str | None
    context_dim: int | None
    layers: tuple[LayerSummary, ...]
    tokens: dict[str, tuple[int, ...]]
    ignored: tuple[str, ...]
    metadata: dict[str, Any]

    def lines(self, *, all_layers: bool = False) -> list[str]:
        out = [f"file:         {self.source}",
               f"format:       {self.format} ({self.kind})",
               f"architecture: {self.architecture or 'unknown'} (text features: {self.context_dim})",
               f"base:         {self.base or 'not recorded'}"
               + (f" (fingerprint {self.base_fingerprint[:16]})" if self.base_fingerprint else ""),
               f"tokens:       " + (", ".join(f"{t} {list(d)}" for t, d in self.tokens.items()) or "none")]
        norms = "difference norms" if self.kind == "differences" else "weight norms"
        out.append(f"layers:       {len(self.layers)} cross-attention layers ({norms}: K, V)")
        shown = self.layers if all_layers or len(self.layers) <= 20 else self.layers[:10]
        for layer in shown:
            out.append(f"  {layer.name:64} {str(list(layer.shape)):12} {layer.key_norm:10.4g} "
                       f"{layer.value_norm:10.4g}  {layer.rank}")
        if len(shown) < len(self.layers):
            out.append(f"  ... {len(self.layers) - len(shown)} more (--all-layers)")
        if self.ignored:
            out.append(f"ignored:      {len(self.ignored)} entries a K/V merge does not use, e.g. {self.ignored[0]}")
        if self.metadata:
            out.append("metadata:")
            out.extend("  " + line for line in json.dumps(self.metadata, indent=2, default=str).splitlines())
        return out


def _rank(x: Any) -> str:
    return f"rank {x.rank}" if isinstance(x, LowRank) else "full"


def summarize(reference: str | os.PathLike[str], *, base: str | os.PathLike[str] | None = None) -> Summary:
    """Read ``reference`` (no base needed); with ``base``, full weights are shown as differences."""
    path = resolve_delta(reference)
    module = formats.detect_format(path)
    content = module.read(path)
    if base is not None:
        content = load(reference, base=as_base(base), check_base=False)
    if isinstance(content, FineTunedWeights):
        layers = tuple(LayerSummary(name, tuple(k.shape), float(k.float().norm()), float(v.float().norm()), "full")
                       for name, (k, v) in content.layers.items())
        ignored = content.ignored
        kind = "full fine-tuned weights"
    else:
        assert isinstance(content, ConceptDelta)
        layers = tuple(LayerSummary(name, tuple(layer.key.shape), float(dense(layer.key).float().norm()),
                                    float(dense(layer.value).float().norm()),
                                    _rank(layer.key) if _rank(layer.key) == _rank(layer.value)
                                    else f"{_rank(layer.key)} / {_rank(layer.value)}")
                       for name, layer in content.layers.items())
        ignored = tuple(content.metadata.get("ignored", ()))
        kind = "differences"
    context = layers[0].shape[1] if layers else None
    metadata = {k: v for k, v in content.metadata.items() if k != "ignored"}
    return Summary(str(reference), module.NAME, kind, content.architecture or CONTEXT_DIMS.get(context),
                   content.base, content.base_fingerprint, context, layers,
                   {t: tuple(e.shape[0] for e in emb) for t, emb in content.tokens.items()}, ignored, metadata)
