"""``make demo``: the whole story on the built-in toy world, offline, in a few minutes on a CPU.

1. Opens the shipped base ``builtin:toyworld``: a small Stable Diffusion pipeline trained on a
   world of coloured, patterned shapes (see its model card).
2. Trains two personal concepts with ``cd-train``, the quality benchmark's first pair: a blue
   diamond with two orange bands (``<new6> diamond``) and a yellow smiley circle (``<new4>
   circle``), from the shipped instance images, with the benchmark's recipe.
3. Merges them with ``cd-merge``: the constrained merge, the naive sum and the average.
4. Samples a labelled grid (each concept alone, the merges, the base) of two-concept prompts.
5. Judges every model with the world's detector: is each concept there, are both, is the rest
   of the prompt followed, and do ordinary prompts still work (the benchmark's rows for this pair).
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

import torch

from ..fileio import atomic_path
from ..toyworld import concept_images_path, reg_captions_path
from ..toyworld.benchmark import (BASE, PAIRS, BenchmarkOptions, grid_prompts, recipe_arguments, sampling_pipeline,
                                  token_of)
from ..toyworld.concepts import concept

OUTPUT = Path("demo-output")
PAIR = PAIRS[0]
#: The quality benchmark's recipe (the paper's, scaled to the world's tiny UNet), fewer class images.
RECIPE = BenchmarkOptions().quick()
#: Images per prompt when the demo scores each model (the full benchmark uses more), and denoising steps.
IMAGES_PER_PROMPT = RECIPE.images_per_prompt
SAMPLING_STEPS = RECIPE.sampling_steps


def run_command(main, arguments: list[str]) -> None:
    """Print the command as a user would type it, then run it in this process."""
    print(f"\n$ {shlex.join(arguments)}", flush=True)
    code = main(arguments[1:])
    if code:
        sys.exit(code)


def main() -> None:
    from ._common import table
    from .merge import main as cd_merge
    from .train import main as cd_train
    from ..loading import load
    from ..toyworld.benchmark import PairResult, pooled, score_models
    from ..toyworld.detector import Detector
    from ..toyworld.grid import labelled_grid

    # the world's matrices are small: one thread avoids the overhead of two
    torch.set_num_threads(1)
    os.environ.setdefault("MERGEKIT_CD_CACHE", str(OUTPUT / "cache"))
    start = time.perf_counter()
    OUTPUT.mkdir(exist_ok=True)
    items = [concept(name) for name in PAIR]
    tokens = [token_of(item) for item in items]
    print(f"Base model: {BASE}, a Stable Diffusion pipeline trained on the toy world (32 px shapes; "
          f"model card: mergekit_cd/toyworld/assets/MODEL_CARD.md).")

    deltas = []
    for item, token in zip(items, tokens):
        print(f"\nConcept {token} {item.class_word}: {item.description}.")
        run_command(cd_train, ["cd-train", "--base", BASE, "--instance-dir", str(concept_images_path(item.name)),
                               "--class-word", item.class_word, "--token", token, "--init-token", item.init_token,
                               "-o", str(OUTPUT / item.name), *recipe_arguments(RECIPE), "--checkpoint-every", "1000",
                               "-q", "--force"])
        deltas.append(str(OUTPUT / item.name / "delta.safetensors"))

    merges = {}
    for method in ("constrained", "sum", "average"):
        path = str(OUTPUT / f"{method}.safetensors")
        run_command(cd_merge, ["cd-merge", *deltas, "-o", path, "--base", BASE, "--method", method,
                               "--reg-captions", str(reg_captions_path()), "--force", "-q"])
        merges[method] = path

    print("\nSampling and judging every model (the detector says what each image shows) ...", flush=True)
    models = [("base", "base (no token)", None, dict(tokens=["", ""])),
              ("single", f"{tokens[0]} alone", load(deltas[0], base=BASE), dict(with_concepts=(0,), with_pair=False)),
              ("single", f"{tokens[1]} alone", load(deltas[1], base=BASE), dict(with_concepts=(1,), with_pair=False)),
              *((method, f"{method} merge", load(path, base=BASE), {}) for method, path in merges.items())]
    scores, grid_rows = score_models(sampling_pipeline(), Detector.load(), models, tokens, items,
                                     images_per_prompt=IMAGES_PER_PROMPT, steps=SAMPLING_STEPS)
    grid = OUTPUT / "grid.png"
    with atomic_path(grid, force=True) as temporary:
        labelled_grid(grid_rows, columns=[prompt for prompt, _ in grid_prompts(tokens, items)]).save(temporary,
                                                                                                   format="PNG")
    rows = pooled([PairResult(PAIR, scores)])
    header = ["model", "presence", "both present", "background", "ordinary prompts", "preservation"]
    cells = [[label, *(f"{row[key].value:.2f}" if key in row else "n/a"
                       for key in ("presence", "both", "background", "ordinary", "preservation"))]
             for label, row in rows.items()]
    print("\n" + table(cells, header))
    print(f"\n  presence: share of a concept's own prompts whose image shows it; both present: share of\n"
          f"  two-concept prompts showing both; ordinary prompts: share of token-free prompts drawn as\n"
          f"  named; preservation: that relative to the base. {IMAGES_PER_PROMPT} images per prompt here, so\n"
          f"  the rates are rough: `python benchmarks/bench_quality.py` measures five pairs with intervals.")
    print(f"\nDone in {time.perf_counter() - start:.0f} s. In {OUTPUT}/:\n"
          f"  {PAIR[0]}/, {PAIR[1]}/ ... the trained concepts (delta.safetensors, diffusers/ layout)\n"
          f"  constrained.safetensors, sum.safetensors, average.safetensors ... the merges\n"
          f"  grid.png ................... every model's images of the same prompts and seeds, labelled")


if __name__ == "__main__":
    main()
