"""mergekit-cd: compose Custom Diffusion concepts for Stable Diffusion.

Each concept is a small K/V delta of the UNet's cross-attention layers plus a modifier token;
several deltas are merged by a constrained least-squares solve (see :mod:`mergekit_cd.solvers`).
"""

from .delta import (
    CompressionReport,
    Concept,
    ConceptDelta,
    LayerDelta,
    LowRank,
    average_deltas,
    compress,
    interpolate,
    sum_deltas,
)
from .apply import apply, remove
from .errors import MergeError
from .evaluation import evaluate
from .loading import convert, load, save
from .merge import MergeReport, merge, merge_to_file
from .merge_options import MergeOptions
from .solvers import SolveInfo, solve_hard, solve_hybrid, solve_soft
from .train import train  # the function; reach its modules with `from mergekit_cd.train import loop`
from .version import __version__


__all__ = [
    "apply",
    "convert",
    "evaluate",
    "load",
    "merge",
    "merge_to_file",
    "MergeOptions",
    "MergeReport",
    "remove",
    "save",
    "CompressionReport",
    "Concept",
    "ConceptDelta",
    "LayerDelta",
    "LowRank",
    "MergeError",
    "SolveInfo",
    "average_deltas",
    "compress",
    "interpolate",
    "solve_hard",
    "solve_hybrid",
    "solve_soft",
    "sum_deltas",
    "__version__",
    "train",
]
