"""The rows of an evaluation: merge methods to run (``--compare``), given deltas, the base.

A compare list is a comma-separated string (or a sequence of items) of:

- ``sum``, ``average``: the naive baselines;
- ``constrained``: the paper's merge; ``ridge=X`` / ``relative-ridge=X``: the same with a ridge
  (absolute, or in units of the caption Gram matrix's mean eigenvalue, as ``cd-merge``);
- ``soft``: the soft merge over a sweep of concept weights (:data:`SOFT_SWEEP`), drawn as a
  curve by the plot; ``soft=W``: one soft merge with weight ``W`` for every concept;
- ``hybrid``, ``hybrid=W``: the hybrid merge the same way, its weights those of the concepts'
  context rows (it needs the ``pipeline`` row rule, cd-eval's ``--rows pipeline``);
- ``base``: the base UNet with the concepts' tokens (fidelity 0 and preservation 0 by
  definition: the reference ``fidelity`` is measured from);
- ``plain-base``: the plain base, the concepts' tokens plain text to it (``fidelity_plain_base``
  0 and preservation 0 by definition: the issue's reference B).

An empty list is refused: leave ``compare`` out (None) for the default rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import MergeError
from ..merge_methods import METHOD_TABLE
from ..merge_options import MergeOptions, OptionError

#: Concept weights of the soft merge that ``soft`` sweeps (mu = 1): from loose to nearly exact.
SOFT_SWEEP = (1.0, 10.0, 100.0, 1000.0)
#: What ``--compare`` accepts, for messages.
COMPARE_FORMS = ("sum, average, constrained, ridge=X, relative-ridge=X, soft, soft=W, hybrid, hybrid=W, base, "
                 "plain-base")
#: Kinds of the rows that change no K/V weight: their constraint residual is the base's.
BASE_KINDS = ("base", "plain-base")


@dataclass(frozen=True)
class Method:
    """One row to compare.

    kind: a method of the merge method table (``constrained``, ``soft``, ``hybrid``, ``sum``,
    ``average``: a merge run by :func:`mergekit_cd.merge` with ``options``), ``base`` (the concepts'
    tokens only), ``plain-base`` (nothing installed), or ``delta`` (a delta given by the user, ``source``).
    """

    label: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)
    source: Any = None

    def merge_options(self, rows: str, num_concepts: int = 1, **fields: Any) -> MergeOptions:
        """The options of the merge this row runs (a kind of the method table) under the row rule
        ``rows``, its weight given to each of ``num_concepts`` concepts, ``fields`` where it runs; a
        refusal names cd-eval's flags (``--compare hybrid needs --rows pipeline``)."""
        options = dict(self.options)
        weight = options.pop("weight", None)
        if weight is not None:
            options["weights"] = [weight] * num_concepts
        try:
            return MergeOptions(method=self.kind, rows=rows, **options, **fields)
        except OptionError as error:
            raise MergeError(error.render(lambda name: "--compare" if name == "method"
                                          else "--" + name.replace("_", "-"))) from None


def parse_compare(spec: str | Sequence[str] | None) -> list[Method]:
    """The methods a compare list names, in order, without repeats (see the module docstring);
    None names none, an empty list is a MergeError (it would silently leave only the sum row)."""
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else [part for item in spec for part in str(item).split(",")]
    names = [item.strip() for item in items if item.strip()]
    if not names:
        raise MergeError(f"--compare {spec if isinstance(spec, str) else ','.join(map(str, spec))!r}: names no "
                         f"method; give a comma-separated list of {COMPARE_FORMS}, or leave --compare out for "
                         f"the default.")
    methods: list[Method] = []
    for item in names:
        for method in _parse_item(item):
            if all(method.label != known.label for known in methods):
                methods.append(method)
    return methods


def _parse_item(item: str) -> list[Method]:
    """One item: a method of the merge method table (a weighted one swept, or at ``=W``), a ridge,
    or a base row; each method name is a row of that method."""
    name, _, value = item.partition("=")
    name = name.strip().lower()
    weighted = name in METHOD_TABLE and METHOD_TABLE[name].concept_weights
    if (name in METHOD_TABLE or name == "base") and not value:
        if weighted:
            return [weighted_method(name, weight) for weight in SOFT_SWEEP]
        return [Method(name, name)]
    if name == "plain-base" and not value:
        return [Method("plain base", name)]
    if weighted:
        return [weighted_method(name, _number(item, value, positive=True))]
    if name in ("ridge", "relative-ridge"):
        number = _number(item, value, positive=False)
        option = "ridge" if name == "ridge" else "relative_ridge"
        return [Method(f"constrained {name}={number:g}", "constrained", {option: number})]
    raise MergeError(f"--compare: unknown method {item!r}; use a comma-separated list of {COMPARE_FORMS}.")


def weighted_method(name: str, weight: float) -> Method:
    """The weighted merge method ``name`` (e.g. ``soft``) with ``weight`` for every concept (mu = 1)."""
    return Method(f"{name} w={weight:g}", name, {"weight": weight})


def _number(item: str, text: str, *, positive: bool) -> float:
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        bound = "> 0" if positive else ">= 0"
        raise MergeError(f"--compare {item}: the value must be a finite number {bound}.")
    return number
