"""``cd-inspect FILE``: what a delta file holds (format, architecture, base, layers, tokens, norms)."""

from __future__ import annotations

import argparse
import sys

from ..summary import summarize
from ._common import run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cd-inspect", description="Print the format, architecture, base fingerprint, layers, tokens, "
                                        "norms and metadata of a Custom Diffusion delta file or folder (a LoRA's "
                                        "parts beyond the cross-attention K/V counted by kind), or the token, widths "
                                        "and layout of a textual-inversion embedding file.",
        epilog="example:\n  cd-inspect merged.safetensors\n  cd-inspect delta.bin --base ./sd15\n  cd-inspect sks.pt",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="delta file, folder or hub repo id (any supported format), or a token "
                                     "embedding file")
    parser.add_argument("--base", help="base model: show full-weight files as differences against it")
    parser.add_argument("--all-layers", action="store_true", help="list every layer, not just the first ten")
    return parser


def main_with_args(args: argparse.Namespace) -> int:
    print("\n".join(summarize(args.file, base=args.base).lines(all_layers=args.all_layers)))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(main_with_args, build_parser(), argv, file_tool=True)


if __name__ == "__main__":
    sys.exit(main())
