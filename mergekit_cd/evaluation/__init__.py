"""cd-eval: measure what a merge keeps of each concept and what it changes of the base.

- :func:`evaluate` (how it measures: :class:`EvalOptions`): function-level fidelity and preservation from the UNet's noise predictions
  (any model, CPU fine), the constraint residuals, and the paper's CLIP / DINO metrics when
  local CLIP / DINO folders are given;
- :class:`EvalReport`: the result; :func:`summary_table`, :func:`write_json`,
  :func:`save_plot` and :func:`write_outputs` (both files, all or nothing) present it.
"""

from .clip_metrics import clip_score, mean_pairwise_cosine, strip_tokens
from .methods import SOFT_SWEEP, Method, parse_compare
from .options import EvalOptions
from .report import (ConceptInfo, ConceptScores, EvalReport, MethodResult, save_plot, summary_table, write_json,
                     write_outputs)
from .runner import DEFAULT_COMPARE, evaluate

__all__ = [
    "DEFAULT_COMPARE",
    "SOFT_SWEEP",
    "ConceptInfo",
    "ConceptScores",
    "EvalOptions",
    "EvalReport",
    "Method",
    "MethodResult",
    "clip_score",
    "evaluate",
    "mean_pairwise_cosine",
    "parse_compare",
    "save_plot",
    "strip_tokens",
    "summary_table",
    "write_json",
    "write_outputs",
]
