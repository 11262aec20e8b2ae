"""``make demo``: the whole story on a built-in example, offline, in a few minutes on a CPU.

1. Builds a small SD1-like base model (random weights, :mod:`mergekit_cd.testing`).
2. Draws instance images of two distinct objects (a yellow disc toy on blue, a red pot with a
   handle on white) and trains each as a concept with ``cd-train``.
3. Merges them with ``cd-merge`` (the paper's constrained merge, next to the naive sum).
4. Samples ``"<new1> toy ... <new2> pot"`` prompts with ``cd-sample`` into an image grid.
5. Measures both merges and the soft merge with ``cd-eval`` (table, JSON and plot).

The base is tiny and random, so its images are noise: what the demo shows is the plumbing and
the numbers (constraints kept, drift on held-out captions), not pretty pictures.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from .delta import ConceptDelta, dense
from .loading import load

OUTPUT = Path("demo-output")
#: Training is short (the paper uses 250 steps at batch 8 on 512 px): the tiny model learns fast.
TRAIN_OPTIONS = ["--steps", "60", "--batch-size", "2", "--num-class-images", "4",
                 "--class-sampling-steps", "5", "--checkpoint-every", "1000", "-q", "--force"]
#: (class word, token, init token): distinct init tokens keep the two tokens' features apart
#: (both starting from the same word makes their constraint rows nearly equal, which the exact
#: merge can only meet by moving the weights far).
CONCEPTS = (("toy", "<new1>", "ktn"), ("pot", "<new2>", "pll"))


def run_command(main, arguments: list[str]) -> None:
    """Print the command as a user would type it, then run it in this process."""
    print(f"\n$ {shlex.join(arguments)}", flush=True)
    code = main(arguments[1:])
    if code:
        sys.exit(code)


def draw_instance_images(folder: Path, kind: str, count: int = 6) -> Path:
    """Procedural photos of one object: position and size vary, the object does not."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        size = 64
        background = (30, 60, 190) if kind == "toy" else (245, 245, 240)
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        left, top, extent = 8 + 3 * index, 10 + 2 * (index % 3), 30 + 2 * (index % 4)
        if kind == "toy":  # a yellow disc with a dark eye
            draw.ellipse((left, top, left + extent, top + extent), fill=(250, 210, 20))
            draw.ellipse((left + extent // 3, top + extent // 3, left + extent // 2, top + extent // 2), fill=(20, 20, 20))
        else:  # a red pot with a handle
            draw.rectangle((left, top + 6, left + extent, top + extent), fill=(190, 30, 20))
            draw.arc((left + extent - 6, top + 10, left + extent + 8, top + extent - 6), 270, 90,
                     fill=(120, 20, 10), width=3)
        image.save(folder / f"{kind}-{index}.png")
    return folder


def delta_cosine(first: ConceptDelta, second: ConceptDelta) -> float:
    """Cosine between two deltas' K/V differences over all layers: how much they changed alike."""
    dot = first_norm = second_norm = 0.0
    for name in first.layers:
        mine, theirs = first.layers[name], second.layers[name]
        for a, b in ((mine.key, theirs.key), (mine.value, theirs.value)):
            a, b = dense(a).double(), dense(b).double()
            dot, first_norm, second_norm = dot + float((a * b).sum()), first_norm + float(a.square().sum()), \
                second_norm + float(b.square().sum())
    return dot / (first_norm * second_norm) ** 0.5


def summarize(report: Path, first: str, second: str, *, base: Path) -> None:
    """The numbers that tell the story, from cd-eval's JSON, and why the average does well here."""
    rows = {row["label"]: row for row in json.loads(report.read_text())["rows"]}
    print("\nSummary (cd-eval on the tiny model; fidelity: 1 = the concept's own model, preservation:"
          " held-out change, lower is better):")
    for label, name in (("merged", "constrained merge"), ("sum", "naive sum"), ("average", "average")):
        row = rows[label]
        print(f"  {name:<18} max residual {row['max_residual']:.1e}   mean fidelity {row['mean_fidelity']:.2f}"
              f"   preservation {row['preservation']:.4f}")
    cosine = delta_cosine(load(first, base=str(base)), load(second, base=str(base)))
    ratio = rows["average"]["preservation"] / rows["merged"]["preservation"]
    print(f"  The two concepts' K/V changes have cosine {cosine:.2f}: on this random base both mostly learned\n"
          f"  the same change (a drawn object on a plain background). The sum applies it twice; the average\n"
          f"  keeps it once, so its fidelity is high, but it meets no constraint exactly and moves the base\n"
          f"  {ratio:.1f}x as much as the constrained merge does on held-out captions.")


def main() -> None:
    from .cli.eval import main as cd_eval
    from .cli.merge import main as cd_merge
    from .cli.sample import main as cd_sample
    from .cli.train import main as cd_train
    from .testing import save_tiny_pipeline

    # the tiny model's matrices are small: one thread avoids the overhead of two
    torch.set_num_threads(1)
    os.environ.setdefault("MERGEKIT_CD_CACHE", str(OUTPUT / "cache"))
    start = time.perf_counter()
    OUTPUT.mkdir(exist_ok=True)
    base = OUTPUT / "tiny-sd1"
    if not base.exists():
        save_tiny_pipeline("sd1", base)
    print(f"Base model: {base} (a tiny SD1-like model with random weights, built offline).")

    deltas, image_dirs = [], []
    for word, token, init_token in CONCEPTS:
        images = draw_instance_images(OUTPUT / "instance-images" / word, word)
        image_dirs.append(str(images))
        run_command(cd_train, ["cd-train", "--base", str(base), "--instance-dir", str(images),
                               "--class-word", word, "--token", token, "--init-token", init_token, "-o", str(OUTPUT / word), *TRAIN_OPTIONS])
        deltas.append(str(OUTPUT / word / "delta.safetensors"))

    merged = str(OUTPUT / "merged.safetensors")
    run_command(cd_merge, ["cd-merge", *deltas, "-o", merged, "--base", str(base), "--force", "-q"])
    naive = str(OUTPUT / "naive-sum.safetensors")
    run_command(cd_merge, ["cd-merge", *deltas, "-o", naive, "--base", str(base), "--method", "sum", "--force", "-q"])

    grid = str(OUTPUT / "grid.png")
    run_command(cd_sample, ["cd-sample", "--base", str(base), "--delta", merged,
                            "<new1> toy sitting beside a <new2> pot", "photo of a <new1> toy",
                            "photo of a <new2> pot", "-n", "3", "--steps", "10", "-o", grid, "--force", "-q"])

    run_command(cd_eval, ["cd-eval", "--base", str(base), "--concepts", *deltas, "--merged", merged,
                          "--instance-dirs", *image_dirs, "--compare", "sum,average,relative-ridge=1e-3,soft", "--json",
                          str(OUTPUT / "eval.json"), "--plot", str(OUTPUT / "eval.png"), "--force", "-q"])

    summarize(OUTPUT / "eval.json", *deltas, base=base)
    print(f"\nDone in {time.perf_counter() - start:.0f} s. In {OUTPUT}/:\n"
          f"  toy/, pot/ ................. the trained concepts (delta.safetensors, diffusers/ layout)\n"
          f"  merged.safetensors ......... the constrained merge; naive-sum.safetensors the plain sum\n"
          f"  grid.png ................... samples of the merged model (noise: the base is random)\n"
          f"  eval.json, eval.png ........ what each merge keeps (fidelity) and changes (preservation)")


if __name__ == "__main__":
    main()
