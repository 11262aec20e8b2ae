"""What every command shares: the error boundary, devices and dtypes, and small tables."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import torch

from ..errors import MergeError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def run(main: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser,
        argv: Sequence[str] | None = None) -> int:
    """Parse, run, and turn user errors into one line on stderr and exit status 1."""
    args = parser.parse_args(argv)
    try:
        return main(args) or 0
    except MergeError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


def device(name: str) -> torch.device:
    """``cuda`` falls back to CPU with a notice when no GPU is present; anything else must exist."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        print("note: no CUDA device available, running on CPU", file=sys.stderr)
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise MergeError(f"Unknown device {name!r}: {error}") from None


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu",
                        help="where to run the text encoder and the solve: cpu (default) or cuda[:N]; "
                             "falls back to CPU when no GPU is present")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="text-encoder precision (the solve is always float64; default float32)")


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A small left-aligned text table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
