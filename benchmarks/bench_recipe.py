"""Does a cd-train recipe teach the toy world's concepts? Train each, sample its prompt, count.

    python benchmarks/bench_recipe.py                              # the benchmark's recipe, all six
    python benchmarks/bench_recipe.py --lr 1e-4 --steps 300 banded-diamond smiley-circle
    python benchmarks/bench_recipe.py --aug --no-snr               # the paper's weighting and augmentation

For each concept: train it alone on ``builtin:toyworld`` with the given recipe (reused from
``--work`` when that recipe already ran), sample ``photo of a <token> <class>`` and ``a <token>
<class> on the beach`` with ``--samples`` seeds, and print the share of images in which the
detector finds the concept, with 95% intervals, next to the base's share for the same prompt
without the token. The README's recipe table was measured with it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from mergekit_cd.toyworld import benchmark
from mergekit_cd.toyworld.concepts import CONCEPT_NAMES, concept
from mergekit_cd.toyworld.quality import concept_prompts, rate, sample_batch


def main(argv: list[str] | None = None) -> int:
    defaults = benchmark.BenchmarkOptions().quick()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("concepts", nargs="*", default=list(CONCEPT_NAMES), metavar="CONCEPT",
                        help=f"concepts to train (default: all six: {', '.join(CONCEPT_NAMES)})")
    parser.add_argument("--lr", type=float, default=defaults.learning_rate, help="learning rate before scaling "
                        "by the batch (default %(default)g)")
    parser.add_argument("--steps", type=int, default=defaults.train_steps, help="default %(default)s")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="default %(default)s")
    parser.add_argument("--aug", action="store_true", help="the paper's resize augmentation (default off)")
    parser.add_argument("--snr-gamma", type=float, default=defaults.snr_gamma, help="min-SNR gamma "
                        "(default %(default)g)")
    parser.add_argument("--no-snr", action="store_true", help="every timestep weighs the same, as in the paper")
    parser.add_argument("--num-class-images", type=int, default=defaults.num_class_images,
                        help="default %(default)s")
    parser.add_argument("--samples", type=int, default=16, help="seeded samples per prompt (default %(default)s)")
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work/quality"),
                        help="trained concepts, reused between runs (default: %(default)s)")
    args = parser.parse_args(argv)
    for name in args.concepts:
        concept(name)  # an unknown name is refused before any training
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    options = replace(defaults, work=args.work, learning_rate=args.lr, train_steps=args.steps,
                      batch_size=args.batch_size, augment=args.aug, num_class_images=args.num_class_images,
                      snr_gamma=None if args.no_snr else args.snr_gamma)
    print(f"recipe: {options.recipe()}", flush=True)

    from mergekit_cd.apply import apply, remove
    from mergekit_cd.loading import load
    from mergekit_cd.toyworld.detector import Detector

    pipe, detector, seeds = benchmark.sampling_pipeline(), Detector.load(), list(range(args.samples))
    print("\n| concept | photo of a <token> <class> | on the beach | base, without the token |\n|---|---|---|---|")
    for name in args.concepts:
        item = concept(name)
        delta = load(benchmark.train_single(item, options), base=benchmark.BASE)
        token = benchmark.token_of(item)

        def shown(prompt: str) -> str:
            found = detector.detect(sample_batch(pipe, [prompt] * len(seeds), seeds,
                                                 steps=options.sampling_steps, guidance_scale=options.guidance_scale))
            return str(rate(sum(name in d.concepts for d in found), len(found)))

        (photo, _), (beach, _), *_ = concept_prompts(token, item)  # the benchmark's own prompts
        apply(pipe, delta)
        cells = [shown(photo), shown(beach)]
        remove(pipe)
        cells.append(shown(concept_prompts("", item)[0][0]))
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
