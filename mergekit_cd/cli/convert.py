"""``cd-convert IN -o OUT --to FORMAT``: rewrite a delta in another format."""

from __future__ import annotations

import argparse
import sys

from .. import formats
from ..errors import MergeError
from ..loading import OTHER_LAYERS_ON_LOAD, convert
from ..merge_options import OptionError
from ._common import add_lora_rtol_argument, describe_factors, run

EXAMPLES = """\
examples:
  cd-convert delta.bin -o cat.safetensors --to native --base ./sd15
  cd-convert cat.safetensors -o cat/ --to diffusers --base ./sd15
  cd-convert cat.safetensors -o compressed_delta.bin --to authors-bin --compress 0.05
  cd-convert merged.safetensors -o merged-lora/ --to diffusers-lora
  cd-convert merged.safetensors -o merged_lora.safetensors --to kohya-lora
  cd-convert merged-lora/ -o merged_lora.safetensors --to kohya-lora --other-layers keep"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cd-convert", description="Convert a Custom Diffusion delta between formats. Full-weight formats "
                                        "(diffusers, authors-bin, compvis) need --base to turn weights into "
                                        "differences or back.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="delta file, folder or hub repo id (any supported format)")
    parser.add_argument("-o", "--output", required=True, help="output file or folder")
    parser.add_argument("--to", choices=formats.format_names(), help=formats.OUTPUT_FORMAT_HELP)
    parser.add_argument("--base", help="base model (diffusers folder or hub repo id)")
    parser.add_argument("--compress", type=float, metavar="RTOL",
                        help="store low-rank differences with relative error at most RTOL "
                             "(native, or the compressed variants of authors-bin / compvis)")
    add_lora_rtol_argument(parser)
    parser.add_argument("--other-layers", choices=OTHER_LAYERS_ON_LOAD, default="refuse",
                        help="what becomes of a LoRA input's parts beyond the cross-attention K/V (self-attention, "
                             "feed-forward, projections; the modules a cd-merge --other-layers sum output carries): "
                             "refuse such an input (default), drop them, or keep its UNet modules (only into a LoRA "
                             "output: --to diffusers-lora or kohya-lora). Text-encoder parts are only ever dropped, "
                             "with a warning")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    parser.add_argument("--no-base-check", action="store_true",
                        help="accept a delta whose recorded base fingerprint differs (experts only)")
    return parser


def main_with_args(args: argparse.Namespace) -> int:
    to = formats.output_format(args.output, args.to)
    try:
        report = convert(args.input, args.output, to, base=args.base, compress_rtol=args.compress,
                         force=args.force, check_base=not args.no_base_check, lora_rtol=args.lora_rtol,
                         other_layers=args.other_layers)
    except OptionError as error:  # the refusal of a LoRA's other parts, in this command's flag
        raise MergeError(error.render(lambda name: "--" + name.replace("_", "-"))) from None
    if report is not None and formats.get_format(to).FACTORS_ONLY:
        print(describe_factors(report))
    elif report is not None:
        print(f"compressed: relative error {report.relative_error:.3g} (bound {report.rtol:g}), "
              f"{report.parameters_before} -> {report.parameters_after} numbers")
        if report.kept_dense:
            print(f"kept dense: {len(report.kept_dense)} of {2 * len(report.ranks)} matrices (their low-rank "
                  f"factors would be larger), e.g. {report.kept_dense[0]}")
    print(f"wrote {args.output} ({to})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(main_with_args, build_parser(), argv, file_tool=True)


if __name__ == "__main__":
    sys.exit(main())
