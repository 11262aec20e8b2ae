"""Full fine-tuned K/V weights, as the authors' and diffusers' training scripts save them.

:class:`FineTunedWeights` is deliberately a different type from :class:`~mergekit_cd.delta.ConceptDelta`:
the algebra works on differences only. ``to_delta`` / ``from_delta`` convert at the boundary,
against the base the weights were trained from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .delta import Concept, ConceptDelta, LayerDelta, dense


@dataclass(eq=False)
class FineTunedWeights:
    """Full K and V weights per layer (layer name -> (to_k, to_v)) plus modifier tokens.

    ``ignored`` lists weights a file held that a K/V merge does not use (e.g. q/out
    projections trained with ``--train q,k,v,out``), by their key in the file.
    """

    layers: dict[str, tuple[Tensor, Tensor]]
    tokens: dict[str, tuple[Tensor, ...]] = field(default_factory=dict)
    base: str | None = None
    base_fingerprint: str | None = None
    architecture: str | None = None
    concepts: tuple[Concept, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()

    def to_delta(self, base_kv: Callable[[str], tuple[Tensor, Tensor]]) -> ConceptDelta:
        """Differences against the base; ``base_kv(layer)`` gives the base (to_k, to_v) weights."""
        layers = {}
        for name, (key, value) in self.layers.items():
            base_key, base_value = base_kv(name)
            layers[name] = LayerDelta(key.float() - base_key.float(), value.float() - base_value.float())
        return ConceptDelta(layers, dict(self.tokens), base=self.base,
                            base_fingerprint=self.base_fingerprint, architecture=self.architecture,
                            concepts=self.concepts, metadata=dict(self.metadata))

    @classmethod
    def from_delta(cls, delta: ConceptDelta, base_kv: Callable[[str], tuple[Tensor, Tensor]]) -> FineTunedWeights:
        """Full weights ``base + difference`` for writing full-weight formats."""
        layers = {}
        for name, layer in delta.layers.items():
            base_key, base_value = base_kv(name)
            layers[name] = (base_key.float() + dense(layer.key).float(),
                            base_value.float() + dense(layer.value).float())
        return cls(layers, dict(delta.tokens), delta.base, delta.base_fingerprint, delta.architecture,
                   delta.concepts, dict(delta.metadata))
