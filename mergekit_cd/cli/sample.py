"""``cd-sample --base BASE --delta OUT "prompt with <new1>" -n 4 -o grid.png``: seeded samples."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..apply import OTHER_LAYERS_ON_APPLY
from ..errors import MergeError
from ..merge_options import OptionError
from ..sampling import check_seed, sample_grid
from ._common import add_device_argument, device, non_negative_float_type, run, seed_type

#: Sampling runs anywhere diffusers does; cd-merge's float64 solve rules out mps there.
DEVICE_TYPES = ("cpu", "cuda", "mps")

EXAMPLES = """\
examples:
  cd-sample --base stable-diffusion-v1-5/stable-diffusion-v1-5 --delta merged/ \\
      "<new1> cat sitting next to a <new2> pot" -o grid.png
  cd-sample --base ./sd15 --delta cat.safetensors "photo of a <new1> cat" "<new1> cat in the snow" -n 2 --seed 7"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cd-sample", description="Sample images from a base model with a concept delta installed, "
                                       "seeded, and save them as one grid (one row per prompt).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", nargs="+", help="prompts; use the delta's tokens, e.g. '<new1> cat'")
    parser.add_argument("--base", required=True, help="base pipeline: diffusers folder or hub repo id")
    parser.add_argument("--delta", help="delta to install (any supported format); omit to sample the base")
    parser.add_argument("-o", "--output", type=Path, default=Path("grid.png"),
                        help="grid image, one row per prompt (default grid.png; .png, .jpg, .webp)")
    parser.add_argument("-n", "--num-images", type=int, default=4, help="images per prompt (default 4)")
    parser.add_argument("--seed", type=seed_type, default=0,
                        help="image j of every prompt uses seed+j, 0 to 2**64-1 (default 0)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--guidance-scale", type=non_negative_float_type, default=6.0,
                        help="classifier-free guidance, a finite number >= 0 (default 6, the paper's)")
    parser.add_argument("--height", type=int, help="image height (default: the model's)")
    parser.add_argument("--width", type=int, help="image width (default: the model's)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    parser.add_argument("--no-base-check", action="store_true",
                        help="install a delta whose recorded base fingerprint differs (experts only)")
    parser.add_argument("--other-layers", choices=OTHER_LAYERS_ON_APPLY, default="refuse",
                        help="what becomes of a LoRA delta's parts beyond the cross-attention K/V (self-attention, "
                             "feed-forward, text-encoder parts; an --other-layers sum output's carried modules), "
                             "which cd-sample does not install: refuse such a delta (default), or drop them and "
                             "sample with its K/V alone (text-encoder parts with a warning)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_device_argument(parser, what="the pipeline", types=DEVICE_TYPES)
    return parser


def main_with_args(args: argparse.Namespace) -> int:
    chosen = device(args.device, types=DEVICE_TYPES)
    check_seed(args.seed, args.num_images)
    try:
        path = sample_grid(args.base, args.delta, args.prompts, args.output, num_images=args.num_images,
                           seed=args.seed, steps=args.steps, guidance_scale=args.guidance_scale,
                           device=chosen, height=args.height, width=args.width, force=args.force,
                           check_base=not args.no_base_check, other_layers=args.other_layers,
                           progress=not args.quiet)
    except OptionError as error:  # the refusal of a LoRA's other parts, in this command's flag
        raise MergeError(error.render(lambda name: "--" + name.replace("_", "-"))) from None
    print(f"wrote {path} ({len(args.prompts)} prompt(s) x {args.num_images} image(s))")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(main_with_args, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
