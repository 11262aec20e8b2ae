"""``cd-eval --base B --concepts D1 D2 --merged M``: what a merge keeps of each concept, and breaks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..captions import default_reg_captions, read_captions
from ..errors import MergeError
from ..evaluation import evaluate, summary_table
from ..evaluation.methods import COMPARE_FORMS
from ..evaluation.options import EvalOptions
from ..evaluation.report import check_outputs, write_outputs
from ..features import DEFAULT_ROWS, ROW_RULES
from ..fileio import check_not_an_input
from ._common import (DTYPES, add_device_argument, device, non_negative_float_type, run, seed_type, style_flags,
                      table)

#: The UNet runs anywhere diffusers does; merges on mps solve on the CPU.
DEVICE_TYPES = ("cpu", "cuda", "mps")

EXAMPLES = """\
examples:
  cd-eval --base ./sd15 --concepts cat.safetensors pot.safetensors --merged merged.safetensors
  cd-eval --base ./sd15 --concepts cat.safetensors pot.safetensors --compare sum,constrained,relative-ridge=1e-3,soft \\
      --instance-dirs data/cat data/pot --json eval.json --plot eval.png
  cd-eval --base ./sd15 --concepts cat.safetensors --merged merged.safetensors \\
      --clip ./clip-vit-base-patch32 --dino ./dino-vits16 --device cuda

fidelity of a concept: 1 - ||eps_M - eps_i|| / ||eps_i - eps_B|| on its probes, B the base with the
concept's token (1: the model predicts what the concept's own delta does; 0: what the base does with
the concept's token; below 0: worse). Every merge keeps the tokens, so this scores the K/V change.
fidelity (plain base): the same with B the plain base, which reads the token as plain text (the
token's own effect counts too); --compare plain-base adds that base as a row (0 there by definition).
preservation: ||eps_M - eps_B|| / ||eps_B|| on held-out captions (0: the base exactly; lower is better).
max residual: the worst concept's relative K/V error on its target-prompt features (the merge's constraint)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cd-eval",
        description="Measure merges by the UNet's noise predictions: how much of each concept's own change "
                    "survives (fidelity) and how much the model changes on held-out captions (preservation), "
                    "on the same seeded latents, timesteps and noise for every model; with local CLIP / DINO "
                    "models also the paper's text and image alignment.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="base pipeline: diffusers folder or hub repo id")
    parser.add_argument("--concepts", nargs="+", required=True, metavar="DELTA",
                        help="the single-concept deltas that were merged (any supported format)")
    parser.add_argument("--merged", nargs="+", default=[], metavar="DELTA",
                        help="deltas to evaluate, one row each: a cd-merge output, a jointly trained delta, ...")
    parser.add_argument("--compare", metavar="LIST",
                        help=f"merges to run and evaluate too, comma-separated: {COMPARE_FORMS} (soft: a sweep "
                             f"of concept weights; base: the base with the concepts' tokens; plain-base: the "
                             f"base alone). Default: sum with --merged, else sum,average,constrained; a sum "
                             f"row is always shown; an empty list is an error")
    parser.add_argument("--class", dest="class_words", action="append", metavar="WORD",
                        help="class word of each concept input, in order (repeat once per input); needed when "
                             "a file does not record it")
    parser.add_argument("--style", action="append", default=[], metavar="INPUT",
                        help="treat this concept input (1-based position or name) as a style concept")
    parser.add_argument("--instance-dirs", nargs="+", type=Path, metavar="DIR",
                        help="one folder of instance images per concept, in order. Without them, the probes "
                             "use images sampled from each concept's own delta")
    parser.add_argument("--held-out", type=Path, metavar="FILE",
                        help="held-out captions, one per line (default: the shipped held-out set); keep them "
                             "apart from the regularisation captions")
    parser.add_argument("--reg-captions", type=Path, metavar="FILE",
                        help="regularisation captions of the compared merges (default: the shipped set)")
    parser.add_argument("--num-reg-captions", type=int, metavar="N", help="use only the first N of them")
    parser.add_argument("--rows", choices=tuple(ROW_RULES), default=DEFAULT_ROWS,
                        help=f"row rule of the compared merges, as cd-merge's --rows (default {DEFAULT_ROWS}); "
                             f"--compare hybrid needs pipeline")
    parser.add_argument("--samples", type=int, default=16, metavar="N",
                        help="probes per concept: latent, timestep, noise and prompt (default 16)")
    parser.add_argument("--held-out-samples", type=int, default=32, metavar="N",
                        help="held-out captions probed for preservation (default 32)")
    parser.add_argument("--batch-size", type=int, default=8, help="UNet batch size (default 8)")
    parser.add_argument("--seed", type=seed_type, default=0,
                        help="seed of every random draw, 0 to 2**64-1; sampled image j uses seed+j (default 0)")
    parser.add_argument("--sample-images", type=int, default=2, metavar="N",
                        help="without instance images: images sampled per target prompt (default 2)")
    parser.add_argument("--sample-steps", type=int, default=20, metavar="N",
                        help="without instance images: denoising steps of those samples (default 20)")
    parser.add_argument("--clip", type=Path, metavar="DIR",
                        help="local transformers CLIP folder (the paper: openai/clip-vit-base-patch32): adds "
                             "text alignment (CLIPScore, tokens removed) and CLIP image alignment")
    parser.add_argument("--dino", type=Path, metavar="DIR",
                        help="local transformers DINO ViT folder (the paper: facebook/dino-vits16): adds DINO "
                             "image alignment")
    parser.add_argument("--num-images", type=int, default=4, metavar="N",
                        help="with --clip/--dino: images generated per target prompt and model (default 4)")
    parser.add_argument("--steps", type=int, default=50, help="with --clip/--dino: denoising steps (default 50)")
    parser.add_argument("--guidance-scale", type=non_negative_float_type, default=6.0,
                        help="classifier-free guidance of every sample, a finite number >= 0 (default 6, the "
                             "paper's)")
    parser.add_argument("--world", nargs="+", metavar="CONCEPT",
                        help="with --base builtin:toyworld: the toy-world concept of each --concepts input (e.g. "
                             "twotone-star dotted-ring); adds the world detector's rates per row: presence of "
                             "each concept on its prompts, both present, ordinary prompts followed, and that "
                             "relative to the base (uses --num-images, --steps, --guidance-scale)")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write every number as JSON (with --plot: another file; both are written, "
                             "or neither)")
    parser.add_argument("--plot", type=Path, metavar="FILE.png",
                        help="draw mean fidelity against preservation, one point per row (soft merges as a curve)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite existing --json / --plot files (never an input file)")
    parser.add_argument("--cache-dir", type=Path, help="where cached Gram matrices live "
                                                       "(default $MERGEKIT_CD_CACHE or ~/.cache/mergekit_cd)")
    parser.add_argument("--no-base-check", action="store_true",
                        help="accept deltas whose recorded base fingerprint differs (experts only)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_device_argument(parser, what="the pipeline", types=DEVICE_TYPES)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="precision of the pipeline's weights (default float32). float16 or bfloat16 halve "
                             "memory and run faster on a GPU; the scores then carry their rounding")
    return parser


def main_with_args(args: argparse.Namespace) -> int:
    options = EvalOptions(samples=args.samples, held_out_samples=args.held_out_samples, batch_size=args.batch_size,
                          seed=args.seed, sample_images=args.sample_images, sample_steps=args.sample_steps,
                          num_images=args.num_images, steps=args.steps, guidance_scale=args.guidance_scale,
                          device=device(args.device, types=DEVICE_TYPES), dtype=DTYPES[args.dtype],
                          cache_dir=args.cache_dir)
    if args.num_reg_captions is not None and args.num_reg_captions < 1:
        raise MergeError(f"--num-reg-captions {args.num_reg_captions}: must be at least 1.")
    check_outputs(args.json, args.plot, force=args.force)
    _check_not_an_input(args)
    captions = read_captions(args.reg_captions) if args.reg_captions else None
    if args.num_reg_captions is not None:
        captions = (captions or default_reg_captions())[: args.num_reg_captions]
    report = evaluate(args.concepts, base=args.base, merged=args.merged, compare=args.compare,
                      class_words=args.class_words, styles=style_flags(args.concepts, args.style, what="a concept"),
                      instance_dirs=args.instance_dirs,
                      held_out=read_captions(args.held_out) if args.held_out else None, reg_captions=captions,
                      clip=args.clip, dino=args.dino, world=args.world, rows=args.rows,
                      check_base=not args.no_base_check,
                      progress=not args.quiet, options=options)
    header, rows = summary_table(report)
    print(table(rows, header))
    for note in report.notes:
        print(f"note: {note}")
    for path in write_outputs(report, json_path=args.json, plot_path=args.plot, force=args.force):
        print(f"wrote {path}")
    return 0


def _check_not_an_input(args: argparse.Namespace) -> None:
    """Refuse a --json / --plot file that is one of the inputs, inside one (the base, an instance
    folder, a CLIP folder) or holds one: --force would overwrite it."""
    inputs = [*args.concepts, *args.merged, args.base, *(args.instance_dirs or ()),
              *(value for value in (args.held_out, args.reg_captions, args.clip, args.dino) if value is not None)]
    for output in (args.json, args.plot):
        if output is not None:
            check_not_an_input(output, inputs)


def main(argv: list[str] | None = None) -> int:
    return run(main_with_args, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
