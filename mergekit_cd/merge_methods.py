"""The table of merge methods: what each needs and how it makes a layer. Adding a method is one
entry here; the merge, ``cd-merge --method`` and ``cd-eval --compare`` read this table."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import MergeError
from .solvers import factor_hard, factor_hybrid, factor_soft


@dataclass(frozen=True)
class MergeMethod:
    """One merge method.

    ``factor`` (solved methods): ``(G, targets, contexts, weights, mu, ridge=, rtol=, diagnostics=)`` ->
    an operator whose ``apply(W0, V)`` gives each layer's merged weights, from the caption Gram
    matrix ``G``, each concept's target feature rows and (``context_rows`` methods) each concept's
    context rows, V holding the targets on all of them in that order; factored once, applied to
    every layer. ``combine`` (naive methods): ``(sum of the inputs' differences, number of inputs)``
    -> the merged difference. ``concept_weights``: takes one weight per concept (and ``mu``, unless
    ``context_rows``: there the weights are those of the context rows). ``context_rows``: its
    targets are each prompt's token rows and its soft terms the other rows the UNet reads, so it
    needs the ``pipeline`` row rule.
    """

    name: str
    summary: str
    factor: Callable[..., Any] | None = None
    combine: Callable[[Tensor, int], Tensor] | None = None
    concept_weights: bool = False
    context_rows: bool = False

    @property
    def solves(self) -> bool:
        """Whether it needs the regularisation captions' Gram matrix and a factorisation."""
        return self.factor is not None


def _factor_constrained(G: Tensor, targets: Sequence[Tensor], contexts: Sequence[Tensor],
                        weights: Sequence[float] | None, mu: float, *, ridge: float, rtol: float,
                        diagnostics: bool) -> Any:
    return factor_hard(G, torch.cat(list(targets)), ridge=ridge, rtol=rtol, diagnostics=diagnostics)


def _factor_soft(G: Tensor, targets: Sequence[Tensor], contexts: Sequence[Tensor], weights: Sequence[float] | None,
                 mu: float, *, ridge: float, rtol: float, diagnostics: bool) -> Any:
    return factor_soft(G, list(targets), list(weights or ()), mu, ridge=ridge, rtol=rtol, diagnostics=diagnostics)


def _factor_hybrid(G: Tensor, targets: Sequence[Tensor], contexts: Sequence[Tensor], weights: Sequence[float] | None,
                   mu: float, *, ridge: float, rtol: float, diagnostics: bool) -> Any:
    return factor_hybrid(G, torch.cat(list(targets)), list(contexts), list(weights or ()), ridge=ridge, rtol=rtol,
                         diagnostics=diagnostics)


METHOD_TABLE: dict[str, MergeMethod] = {method.name: method for method in (
    MergeMethod("constrained", "each concept's outputs on its target prompts kept exactly, the captions' changed "
                               "least (the paper's merge)", factor=_factor_constrained),
    MergeMethod("soft", "each concept's outputs kept in proportion to its weight, the captions' changed least",
                factor=_factor_soft, concept_weights=True),
    MergeMethod("hybrid", "each concept's outputs on the tokens of its target prompts kept exactly, on their "
                          "start and padding rows in proportion to its weight, the captions' changed least "
                          "(needs --rows pipeline)", factor=_factor_hybrid, concept_weights=True, context_rows=True),
    MergeMethod("sum", "the inputs' differences added (naive baseline)", combine=lambda total, count: total),
    MergeMethod("average", "the inputs' differences averaged (naive baseline)",
                combine=lambda total, count: total / count),
)}
#: Method names, in the table's order (the choices of ``--method``).
METHODS: tuple[str, ...] = tuple(METHOD_TABLE)


def get_method(name: str) -> MergeMethod:
    """The method called ``name``, or one MergeError listing the choices."""
    if name not in METHOD_TABLE:
        raise MergeError(f"Unknown merge method {name!r}; choose one of {', '.join(METHODS)}.")
    return METHOD_TABLE[name]


def weighted_method_names(*, mu: bool = False) -> str:
    """The methods that take concept weights (with ``mu``: and ``mu``), for messages (``"soft or hybrid"``)."""
    return " or ".join(name for name, method in METHOD_TABLE.items()
                       if method.concept_weights and not (mu and method.context_rows))


def solved_method_names() -> str:
    """The solved methods, whose merges store statistics to grow from, for messages
    (``"constrained, soft or hybrid"``)."""
    names = [name for name, method in METHOD_TABLE.items() if method.solves]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
