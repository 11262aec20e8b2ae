"""``MergeOptions``: every option of a merge, checked once, behind the API and ``cd-merge`` alike.

The options that decide the result (method, row rule, weights, mu, ridges, text precision) are recorded in
the merged file's recipe, so :meth:`MergeOptions.from_recipe` replays a recorded merge; the others
(device, batch size, cache folder, held-out captions) change where and how fast it runs, or only
its report.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from . import formats
from .devices import float64_device, parse_device
from .errors import MergeError
from .features import DEFAULT_ROWS, ROW_RULES, RowRule
from .merge_methods import MergeMethod, get_method, weighted_method_names

#: Soft-merge weight of each concept when none is given: its outputs are kept almost exactly.
DEFAULT_SOFT_WEIGHT = 1e3
#: Soft-merge weight of preserving the captions when none is given.
DEFAULT_MU = 1.0
#: Text-encoder precisions a merge may run in (the solve is always float64).
TEXT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                       "bfloat16": torch.bfloat16}
#: What a merge does with a LoRA input's parts beyond the cross-attention K/V (``other_layers``).
OTHER_LAYERS = ("refuse", "drop", "sum", "average")
#: The options a recipe records: those that decide the merged weights.
RECORDED = ("method", "rows", "weights", "mu", "ridge", "relative_ridge", "text_dtype", "other_layers")


class OptionError(MergeError):
    """A merge option that is wrong on its own, worded with the caller's names for the options.

    ``template`` names options as ``{field}`` placeholders; :meth:`render` fills them, e.g. with
    ``--relative-ridge`` for the command line. ``str()`` uses the Python names.
    """

    def __init__(self, template: str, **values: Any) -> None:
        self.template = template
        self.values = values
        super().__init__(self.render(lambda name: name))

    def render(self, spell: Callable[[str], str]) -> str:
        """The message with every option named by ``spell(field_name)``."""
        names = {option.name: spell(option.name) for option in fields(MergeOptions)}
        return self.template.format(**names, **self.values)


@dataclass(frozen=True)
class MergeOptions:
    """How to merge (see :func:`mergekit_cd.merge`); refused on construction when inconsistent.

    ``rows`` names the row rule (:data:`mergekit_cd.features.ROW_RULES`): which rows of the
    target prompts and captions the merge uses; ``hybrid`` needs ``pipeline``.
    ``weights`` (one per concept) and ``mu`` apply to the weighted methods only; left ``None``
    they take :data:`DEFAULT_SOFT_WEIGHT` and :data:`DEFAULT_MU` (``hybrid`` takes no ``mu``: its
    weights are those of each concept's context rows, against the captions' weight 1). ``ridge`` adds
    ``ridge * ||W - W0||^2``; ``relative_ridge`` the same in units of the caption Gram matrix's
    mean eigenvalue. ``held_out`` captions feed only the report's drift figures; ``sum_drift``
    adds the naive sum's drift on them, for comparison: an exact d x d product per layer, as much
    work as the rest of an SDXL merge, so only when asked.

    ``other_layers``: what becomes of a LoRA input's parts beyond the cross-attention K/V, which
    the merge does not solve for: ``refuse`` such an input (the default), ``drop`` them, or carry
    its UNet modules into a LoRA output as the ``sum`` / ``average`` over the inputs of their
    low-rank differences. Text-encoder parts change the features the merge is computed on, so
    every choice but ``refuse`` drops them, with a warning.
    """

    method: str = "constrained"
    rows: str = DEFAULT_ROWS
    weights: tuple[float, ...] | None = None
    mu: float | None = None
    ridge: float = 0.0
    relative_ridge: float = 0.0
    text_dtype: torch.dtype = torch.float32
    batch_size: int = 64
    device: torch.device = torch.device("cpu")
    cache_dir: Path | None = None
    held_out: tuple[str, ...] | None = None
    sum_drift: bool = False
    other_layers: str = "refuse"

    def __post_init__(self) -> None:
        set_field = object.__setattr__.__get__(self)  # frozen: normalise the given types once, here
        if self.weights is not None:
            set_field("weights", tuple(float(weight) for weight in self.weights))
        if self.held_out is not None:
            set_field("held_out", tuple(self.held_out))
        if self.cache_dir is not None:
            set_field("cache_dir", Path(self.cache_dir))
        if isinstance(self.text_dtype, str):
            if self.text_dtype not in TEXT_DTYPES:
                raise OptionError("{text_dtype} {value!r}: choose one of " + ", ".join(TEXT_DTYPES) + ".",
                                  value=self.text_dtype)
            set_field("text_dtype", TEXT_DTYPES[self.text_dtype])
        set_field("device", parse_device(self.device, types=("cpu", "cuda", "mps"), option="device"))
        self._check()

    def _check(self) -> None:
        """Every option that is wrong on its own or with the others, in the order a user fixes them."""
        spec = self.spec
        if self.rows not in ROW_RULES:
            raise OptionError("{rows} {value!r}: choose one of " + ", ".join(ROW_RULES) + ".", value=self.rows)
        if spec.context_rows and not self.row_rule.padded:
            raise OptionError("{method} {method_name} needs {rows} pipeline: its soft terms are the start and "
                              "padding rows of the target prompts, which only the pipeline rule reads; add "
                              "{rows} pipeline.", method_name=self.method)
        soft_only = [name for name in ("weights", "mu") if getattr(self, name) is not None]
        if soft_only and not (spec.concept_weights and (self.mu is None or not spec.context_rows)):
            verb = "applies" if len(soft_only) == 1 else "apply"
            methods = weighted_method_names(mu=self.mu is not None)  # a context_rows method takes no mu
            raise OptionError(" and ".join("{" + name + "}" for name in soft_only)
                              + f" only {verb} to {{method}} {methods}, not to {{method}} "
                                f"{self.method}; add {{method}} {methods} or leave them out.")
        for name in ("ridge", "relative_ridge", "mu"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise OptionError("{" + name + "} {value:g}: must be a finite number >= 0.", value=value)
        if self.mu == 0 and self.ridge == 0 and self.relative_ridge == 0:
            raise OptionError("{mu} 0 with no {ridge} / {relative_ridge} leaves the soft merge without a unique "
                              "solution; give {mu} > 0, or a small {relative_ridge} such as 1e-3.")
        if self.weights is not None:
            if not self.weights:
                raise OptionError("{weights}: give one weight per concept, in input order.")
            bad = [weight for weight in self.weights if not (math.isfinite(weight) and weight > 0)]
            if bad:
                raise OptionError("{weights}: every weight must be a finite number > 0, got {value:g}.", value=bad[0])
        if self.batch_size < 1:
            raise OptionError("{batch_size} {value}: must be at least 1.", value=self.batch_size)
        if self.text_dtype not in TEXT_DTYPES.values():
            raise OptionError("{text_dtype} {value}: choose one of " + ", ".join(TEXT_DTYPES) + ".",
                              value=self.text_dtype)
        if self.other_layers not in OTHER_LAYERS:
            raise OptionError("{other_layers} {value!r}: choose one of " + ", ".join(OTHER_LAYERS) + ".",
                              value=self.other_layers)

    @property
    def spec(self) -> MergeMethod:
        """The method's entry in the method table."""
        return get_method(self.method)

    @property
    def row_rule(self) -> RowRule:
        """The row rule ``rows`` names."""
        return ROW_RULES[self.rows]

    @property
    def solve_device(self) -> torch.device:
        """Where the float64 solve runs: the device, or the CPU for MPS."""
        return float64_device(self.device)

    def check_inputs(self, count: int) -> None:
        """Before any file is read: every input holds at least one concept, so needs a weight."""
        if self.weights is not None and len(self.weights) < count:
            raise OptionError("{weights}: got {given} weight(s) for {count} inputs, which hold at least {count} "
                              "concepts; give one per concept, in input order.", given=len(self.weights), count=count)

    def concept_weights(self, tokens: Sequence[str]) -> list[float]:
        """The weight of each concept (named by ``tokens``, for the message) of a weighted merge."""
        if self.weights is None:
            return [DEFAULT_SOFT_WEIGHT] * len(tokens)
        if len(self.weights) != len(tokens):
            raise OptionError("{weights}: got {given} weight(s) for {count} concepts ({tokens}); give one per "
                              "concept, in input order.", given=len(self.weights), count=len(tokens),
                              tokens=", ".join(tokens))
        return list(self.weights)

    @property
    def carries_other_layers(self) -> bool:
        """Whether the output carries the LoRA inputs' other UNet modules (``sum`` / ``average``)."""
        return self.other_layers in ("sum", "average")

    @property
    def other_layers_on_load(self) -> str:
        """The load boundary's rule for those parts (:func:`mergekit_cd.loading.load`): refuse,
        drop, or keep them for the merge to combine."""
        return "keep" if self.carries_other_layers else self.other_layers

    def other_layers_scale(self, num_inputs: int) -> float:
        """The weight of each input's other modules in the output: 1 (sum) or 1 / inputs (average)."""
        return 1.0 / num_inputs if self.other_layers == "average" else 1.0

    def check_output_format(self, output_format: str, output: str | Path) -> None:
        """Before any work: carried modules need an output that holds them (a LoRA layout)."""
        if self.carries_other_layers and not formats.get_format(output_format).HOLDS_OTHER_MODULES:
            holders = " or ".join(module.NAME for module in formats.FORMATS if module.HOLDS_OTHER_MODULES)
            raise OptionError("{other_layers} {value} carries the LoRA inputs' UNet modules beyond the cross-attention "
                              "K/V into the output, and {output} is written as {format}, which holds the K/V alone; "
                              "write a LoRA (format {holders}), or choose {other_layers} drop.",
                              value=self.other_layers, output=output, format=output_format, holders=holders)

    @property
    def soft_mu(self) -> float:
        """``mu`` of a weighted merge."""
        return DEFAULT_MU if self.mu is None else self.mu

    def to_recipe(self, num_concepts: int) -> dict[str, Any]:
        """The options that decide the merged weights, as JSON, defaults filled in."""
        recipe: dict[str, Any] = {"method": self.method, "rows": self.rows, "ridge": self.ridge,
                                  "relative_ridge": self.relative_ridge,
                                  "text_dtype": str(self.text_dtype).removeprefix("torch."),
                                  "other_layers": self.other_layers}
        if self.spec.concept_weights and not self.spec.context_rows:
            recipe["mu"] = self.soft_mu
        if self.spec.concept_weights:
            recipe["weights"] = list(self.weights) if self.weights is not None \
                else [DEFAULT_SOFT_WEIGHT] * num_concepts
        return recipe

    @classmethod
    def from_recipe(cls, recipe: Mapping[str, Any], **overrides: Any) -> MergeOptions:
        """The options a merged file's recipe records (``delta.metadata["recipe"]["options"]``),
        with ``overrides`` (e.g. a device) on top: what replays that merge."""
        recorded = recipe.get("options")
        if recorded is None:
            raise MergeError("The recipe records no options: it was written before merges recorded them "
                             "(only the method, the total ridge and the soft weights), so it cannot be replayed.")
        if not isinstance(recorded, Mapping):
            raise MergeError(f"The recipe's options should be a JSON object, found {type(recorded).__name__}.")
        unknown = sorted(set(recorded) - set(RECORDED))
        if unknown:
            raise MergeError(f"The recipe records options this version does not know: {', '.join(unknown)}.")
        return cls(**{**recorded, **overrides})
