"""``cd-merge A B C -o OUT --base BASE``: merge Custom Diffusion concepts into one delta."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import formats
from ..captions import default_reg_captions, read_captions
from ..errors import MergeError
from ..features import DEFAULT_ROWS, ROW_RULES
from ..fileio import check_not_an_input
from ..merge import MergePlan, MergeReport, prepare_merge_to_file, summarize_plan
from ..merge_methods import METHODS, solved_method_names
from ..merge_options import OTHER_LAYERS, MergeOptions, OptionError
from ._common import (add_device_arguments, add_lora_rtol_argument, describe_factors, device, paired_embeddings, run,
                      style_flags, table)

#: Options whose flag is not their field's name (``--dtype`` sets the text-encoder precision).
FLAGS = {"text_dtype": "dtype", "held_out": "held_out_captions"}

EXAMPLES = """\
examples:
  cd-merge cat/ pot/delta.bin -o merged/ --base stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --class cat --class pot
  cd-merge a.safetensors b.safetensors -o ab.safetensors --base ./sd15 --ridge 1e-3
  cd-merge a.safetensors b.safetensors -o ab/ --base ./sd15 --method soft --weights 100 10
  cd-merge a.safetensors b.safetensors -o ab/ --base ./sd15 --method hybrid --rows pipeline
  cd-merge a.safetensors b.safetensors -o ab/ --base ./sd15 --dry-run
  cd-merge lora.safetensors cat/ -o merged.safetensors --base ./sd15 --format kohya-lora \\
      --embedding 'lora.safetensors=sks.pt:<sks>' --other-layers sum --class dog --class cat
  cd-merge ab.safetensors c.safetensors -o abc.safetensors --base ./sd15   # grow a merge by c
  cd-merge abc.safetensors --drop "<new2>" -o ac.safetensors --base ./sd15   # shrink it

Inputs may be files or folders in any supported format, or Hugging Face repo ids
(resolved through the local cache; set HF_HUB_OFFLINE=1 to never touch the network)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cd-merge",
        description="Merge Custom Diffusion concept deltas into one: every concept keeps its K/V outputs "
                    "on its own target prompts, and the base changes as little as possible on ordinary "
                    "captions (Kumari et al. 2023, constrained least squares).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="concept deltas: files, folders or hub repo ids; a .safetensors "
                                                  "merge made by cd-merge adds its concepts (solved again from the "
                                                  "statistics it stores, as if from their own files)")
    parser.add_argument("-o", "--output", required=True,
                        help="FILE.safetensors writes the native file, a name without extension a folder in "
                             "the diffusers layout (pytorch_custom_diffusion_weights.safetensors + "
                             "<token>.safetensors); see --format")
    parser.add_argument("--base", required=True, help="base model: diffusers folder or hub repo id")
    parser.add_argument("--embedding", action="append", default=[], metavar="INPUT=FILE[:TOKEN]",
                        help="pair a textual-inversion embedding file (A1111 .pt, kohya emb_params, SDXL "
                             "clip_l/clip_g, diffusers learned_embeds) with an input, named by its position "
                             "(1-based) or as given: its token becomes the input's trigger, one concept "
                             "(repeatable). A1111 and kohya files name their token by the file name; :TOKEN "
                             "names it anew (needed when that name is a word the base already has, e.g. "
                             "sks.pt:<sks>). An embedding file given as an input of its own is a concept of its "
                             "own: its token on the base's unchanged K/V")
    parser.add_argument("--other-layers", choices=OTHER_LAYERS, default="refuse",
                        help="what becomes of a LoRA input's parts beyond the cross-attention K/V "
                             "(self-attention, feed-forward, projections), which the merge does not solve for: "
                             "refuse such an input (default), drop them, or carry its UNet modules into a LoRA "
                             "output (--format diffusers-lora or kohya-lora) as the sum / average over the inputs. "
                             "Text-encoder parts change the features the merge is computed on: every choice but "
                             "refuse drops them, with a warning")
    parser.add_argument("--class", dest="class_words", action="append", metavar="WORD",
                        help="class word of each input, in input order (repeat once per input; "
                             "comma-separated for an input with several tokens). Needed when an input's "
                             "file does not record it")
    parser.add_argument("--style", action="append", default=[], metavar="INPUT",
                        help="treat this input (its position, 1-based, or its name as given) as a style "
                             "concept: style target prompts instead of object prompts (a style its file "
                             "records stays one without this flag)")
    parser.add_argument("--target-template", action="append", metavar="TEMPLATE",
                        help="target prompt template of object concepts (style concepts keep theirs), with "
                             "{token} and {class_word}; repeatable. Default: the prompts an input's file records, else "
                             "'{token} {class_word}' and 'photo of a {token} {class_word}'")
    parser.add_argument("--style-template", action="append", metavar="TEMPLATE",
                        help="the same for style concepts (--style, or recorded as styles); object "
                             "concepts keep theirs. Default: the prompts an input's file records, else "
                             "'{token} {class_word}' and 'painting in the style of {token} {class_word}'")
    parser.add_argument("--method", choices=METHODS, default="constrained",
                        help="constrained (default, the paper's), soft (weighted), hybrid (exact on the prompts' "
                             "tokens, weighted on their start and padding rows; needs --rows pipeline), or the "
                             "naive sum / average")
    parser.add_argument("--rows", choices=tuple(ROW_RULES), default=DEFAULT_ROWS,
                        help="which text-feature rows of the target prompts and captions the merge uses: "
                             + "; ".join(f"{name}: {rule.summary}" for name, rule in ROW_RULES.items())
                             + f" (default {DEFAULT_ROWS})")
    parser.add_argument("--weights", type=float, nargs="+",
                        help="soft: weight of each concept (default 1000 each); larger keeps it more exactly; "
                             "hybrid: weight of each concept's start and padding rows (default 1000 each)")
    parser.add_argument("--mu", type=float, help="soft: weight of preserving the captions (default 1)")
    parser.add_argument("--ridge", type=float, default=0.0,
                        help="adds ridge*||W - W0||^2: bounds how far weights move in feature directions "
                             "the captions never exercise (default 0, the paper's objective)")
    parser.add_argument("--relative-ridge", type=float, default=0.0, metavar="R",
                        help="the same, in units of the caption Gram matrix's mean eigenvalue; 1e-3 is a "
                             "good start: it cuts the weight change several-fold at almost no cost in drift")
    parser.add_argument("--reg-captions", type=Path, metavar="FILE",
                        help="regularisation captions, one per line (default: the ~1200 shipped with mergekit-cd)")
    parser.add_argument("--num-reg-captions", type=int, metavar="N", help="use only the first N captions")
    parser.add_argument("--held-out-captions", type=Path, metavar="FILE",
                        help="captions for the drift report (default: the shipped held-out set)")
    parser.add_argument("--sum-drift", action="store_true",
                        help="report the naive sum's held-out drift beside the merge's, for comparison: an "
                             "exact product with the d x d held-out Gram matrix per layer, which doubles the "
                             "time of an SDXL merge (the naive sum's residuals are always reported)")
    parser.add_argument("--format", choices=formats.format_names(), help=formats.OUTPUT_FORMAT_HELP)
    parser.add_argument("--batch-size", type=int, default=64, help="captions per text-encoder batch (default 64)")
    parser.add_argument("--cache-dir", type=Path, help="where cached Gram matrices live "
                                                       "(default $MERGEKIT_CD_CACHE or ~/.cache/mergekit_cd)")
    parser.add_argument("--drop", action="append", default=[], metavar="TOKEN",
                        help="leave out the concept of this token of a merged input (repeatable): the result "
                             "equals the merge of the other concepts from scratch, without their files")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and stop before solving")
    add_lora_rtol_argument(parser)
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    parser.add_argument("--no-base-check", action="store_true",
                        help="accept inputs whose recorded base fingerprint differs (experts only)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_device_arguments(parser)
    return parser


def _options(args: argparse.Namespace) -> MergeOptions:
    """The merge options the arguments give, refused in the command line's words when wrong."""
    try:
        options = MergeOptions(method=args.method, rows=args.rows, weights=args.weights, mu=args.mu, ridge=args.ridge,
                               relative_ridge=args.relative_ridge, text_dtype=args.dtype,
                               batch_size=args.batch_size, device=device(args.device), cache_dir=args.cache_dir,
                               held_out=read_captions(args.held_out_captions) if args.held_out_captions else None,
                               sum_drift=args.sum_drift, other_layers=args.other_layers)
        options.check_inputs(len(args.inputs))
    except OptionError as error:
        raise _in_flags(error) from None
    return options


def _in_flags(error: OptionError) -> MergeError:
    """The option error worded with cd-merge's flags (``--relative-ridge``)."""
    return MergeError(error.render(lambda name: "--" + FLAGS.get(name, name).replace("_", "-")))


def main_with_args(args: argparse.Namespace) -> int:
    if args.num_reg_captions is not None and args.num_reg_captions < 1:
        raise MergeError(f"--num-reg-captions {args.num_reg_captions}: must be at least 1.")
    options = _options(args)
    caption_files = [file for file in (args.reg_captions, args.held_out_captions) if file]
    if not args.dry_run:  # a caption file is an input too: -o there would replace it
        check_not_an_input(Path(args.output), caption_files)
    captions = read_captions(args.reg_captions) if args.reg_captions else None
    if args.num_reg_captions is not None:
        captions = (captions or default_reg_captions())[: args.num_reg_captions]
    try:
        job = prepare_merge_to_file(args.inputs, args.output, captions, base=args.base, format=args.format,
                                    force=args.force, options=options, class_words=args.class_words,
                                    styles=style_flags(args.inputs, args.style, what="an input"),
                                    target_templates=args.target_template, style_templates=args.style_template,
                                    check_base=not args.no_base_check, dry_run=args.dry_run,
                                    embeddings=paired_embeddings(args.inputs, args.embedding),
                                    lora_rtol=args.lora_rtol, drop=args.drop)
    except OptionError as error:
        raise _in_flags(error) from None
    for rename in job.plan.token_renames:
        print(f"token {rename.old} of {job.plan.sources[rename.operand]} renamed to {rename.new}")
    if args.dry_run:
        print(_describe_plan(job.plan, options))
        return 0
    report = job.run(progress=not args.quiet)
    print(_describe_report(report, full_weights=formats.get_format(job.format).WRITES_FULL_WEIGHTS))
    if report.factors is not None:
        print(describe_factors(report.factors))
    print(_describe_statistics(report, job.format, job.options))
    print(f"wrote {job.output}")
    return 0


def _describe_plan(plan: MergePlan, options: MergeOptions) -> str:
    """Inputs, formats, tokens, prompts, constraint rows, rank and memory: what a merge would do."""
    summary = summarize_plan(plan, device=options.device, text_dtype=options.text_dtype,
                             batch_size=options.batch_size, rule=options.row_rule,
                             token_rows_only=options.spec.context_rows)
    base = plan.base
    rows = [(source, read_as, concept.token or "(none)", concept.class_word, count, " | ".join(concept.prompts))
            for source, read_as, concept, count in summary.concepts]
    return "\n".join([
        f"base: {base.name} ({base.architecture.name}, {len(base.layer_names())} cross-attention layers, "
        f"{plan.num_weight_rows} K/V rows x {base.context_dim} features, fingerprint {base.fingerprint[:12]})",
        table(rows, ("input", "format", "token", "class", "rows", "target prompts")),
        f"method {options.method}, rows {options.rows}: {summary.num_constraint_rows} constraint rows of rank {summary.rank}, "
        f"{len(plan.reg_captions)} regularisation captions, estimated peak memory "
        f"{summary.estimated_memory_bytes / 2**20:.0f} MiB (plus the Python runtime)",
        *(f"other layers {options.other_layers}: {line}" for line in plan.other_layers)])


def _describe_report(report: MergeReport, *, full_weights: bool) -> str:
    """Per-concept residuals of the file as written (float32 full weights when ``full_weights``,
    else float32 differences), held-out drift and solver diagnostics (float64) as a small table."""
    rows = [(c.token, c.class_word, f"{c.full_weights_residual if full_weights else c.residual:.2e}",
             f"{c.sum_residual:.2e}") for c in report.concepts]
    lines = [table(rows, ("token", "class", "residual as written", "naive sum residual")),
             f"held-out drift: {report.drift:.2e}"
             + (f" (naive sum: {report.sum_drift:.2e})" if report.sum_drift is not None else "")]
    if report.solve_info is not None:
        info = report.solve_info
        lines.append(f"solve (float64): residual {info.residual:.1e}, rank {info.rank}/{info.n_constraints}, "
                     f"cond(G) {info.g_condition:.1e}, "
                     f"cond(M) {info.m_condition:.1e}, ridge {info.ridge:.3g}, weights moved "
                     f"{100 * info.relative_change:.3g}% of their norm"
                     + (", Gram matrix from cache" if report.gram_from_cache else ""))
    lines.extend(f"note: {note}" for note in report.notes)
    return "\n".join(lines)


def _describe_statistics(report: MergeReport, output_format: str, options: MergeOptions) -> str:
    """Whether the output can be grown or shrunk later, and what its statistics cost against the difference."""
    if report.statistics is not None:
        size = report.statistics
        return (f"merge statistics: {size.concepts} concept{'s' if size.concepts != 1 else ''}, "
                f"{size.statistics_bytes / 2**20:.3g} MiB beside the "
                f"{size.delta_bytes / 2**20:.3g} MiB difference ({size.statistics_bytes / size.delta_bytes:.2f}x): "
                f"cd-merge can add concepts to this file or --drop them, exactly, without their files")
    if not options.spec.solves:
        return (f"merge statistics: none ({options.method} is not solved; only {solved_method_names()} merges "
                f"can grow)")
    return (f"merge statistics: not stored (the {output_format} format does not carry them; write a .safetensors "
            f"output to add concepts to or --drop them from the merge later)")


def main(argv: list[str] | None = None) -> int:
    return run(main_with_args, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
