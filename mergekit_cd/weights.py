"""Full fine-tuned K/V weights, as the authors' and diffusers' training scripts save them.

:class:`FineTunedWeights` is deliberately a different type from :class:`~mergekit_cd.delta.ConceptDelta`:
the algebra works on differences only. ``to_delta`` / ``from_delta`` convert at the boundary,
against the base the weights were trained from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .base import BaseModel
from .delta import Concept, ConceptDelta, LayerDelta, LazyLayers, Provenanced, Shapes, dense


@dataclass(eq=False)
class FineTunedWeights(Provenanced):
    """Full K and V weights per layer (layer name -> (to_k, to_v)) plus modifier tokens.

    ``layers`` is a dict, or :class:`~mergekit_cd.delta.LazyLayers` reading each layer from its
    file when accessed. ``ignored`` lists weights a file held that a K/V merge does not use
    (e.g. q/out projections trained with ``--train q,k,v,out``), by their key in the file.
    """

    layers: Mapping[str, tuple[Tensor, Tensor]]
    tokens: dict[str, tuple[Tensor, ...]] = field(default_factory=dict)
    base: str | None = None
    base_fingerprint: str | None = None
    architecture: str | None = None
    concepts: tuple[Concept, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()

    def shapes(self) -> dict[str, Shapes]:
        """(to_k shape, to_v shape) per layer, without reading layers kept in their file."""
        if isinstance(self.layers, LazyLayers):
            return self.layers.shapes()
        return {name: (key.shape, value.shape) for name, (key, value) in self.layers.items()}

    def to_delta(self, base_kv: Callable[[str], tuple[Tensor, Tensor]]) -> ConceptDelta:
        """Differences against the base; ``base_kv(layer)`` gives the base (to_k, to_v) weights.

        Layers kept in their file stay there when ``base_kv`` is a :class:`BaseModel`'s ``kv``
        (read from the base's files, so the same on every call): each difference is made when
        its layer is read, and a merge holds one layer of each input at a time. Any other
        ``base_kv`` (e.g. a live pipeline's weights, which :func:`~mergekit_cd.apply` then
        changes) gets every difference made now.
        """
        if isinstance(self.layers, LazyLayers) and isinstance(getattr(base_kv, "__self__", None), BaseModel):
            layers: Mapping[str, LayerDelta] = LazyLayers(self.shapes(),
                                                          lambda name: _difference(self.layers[name], base_kv(name)))
        else:
            layers = {name: _difference(pair, base_kv(name)) for name, pair in self.layers.items()}
        return ConceptDelta.with_provenance(layers, dict(self.tokens), self.provenance)

    @classmethod
    def from_delta(cls, delta: ConceptDelta, base_kv: Callable[[str], tuple[Tensor, Tensor]]) -> FineTunedWeights:
        """Full weights ``base + difference`` for writing full-weight formats."""
        layers = {}
        for name, layer in delta.layers.items():
            base_key, base_value = base_kv(name)
            layers[name] = (base_key.float() + dense(layer.key).float(),
                            base_value.float() + dense(layer.value).float())
        return cls.with_provenance(layers, dict(delta.tokens), delta.provenance)


def _difference(weights: tuple[Tensor, Tensor], base: tuple[Tensor, Tensor]) -> LayerDelta:
    """One layer's fine-tuned (to_k, to_v) minus the base's, in float32."""
    (key, value), (base_key, base_value) = weights, base
    return LayerDelta(key.float() - base_key.float(), value.float() - base_value.float())
