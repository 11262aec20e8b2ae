"""How well the base model follows world prompts, judged by the detector: the ceiling of every
personalisation and merge measured on it.

``python -m mergekit_cd.toyworld.prompt_following [--images N]`` prints per-attribute accuracy on
single-object prompts (class, colour, pattern), two-object prompts and backgrounds;
``--write-card`` also writes the shipped model card from it, ``training.json`` (the shipped base's
runs) and ``default_run.json`` (one run of ``train_base``'s defaults from scratch, measured).
``--unet FOLDER --kinds single`` measures one of ``train_base``'s EMA snapshots in its run's pipeline.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .scenes import BACKGROUNDS, CLASSES, COLOURS, PATTERNS, article


@dataclass(frozen=True)
class Probe:
    """A prompt and what it names: objects (class, colour, pattern or None) and a background."""

    prompt: str
    objects: tuple[tuple[str, str, str | None], ...]
    background: str | None
    kind: str  # "single", "pattern", "two", "background"


KINDS = ("single", "pattern", "two", "background")


def probes(count: int, *, seed: int = 0) -> list[Probe]:
    """``count`` seeded prompts of each kind: one coloured object; one object with a pattern; two
    coloured objects side by side; one coloured object in a named background."""
    rng = np.random.default_rng([seed, 11])
    result = []
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    for _ in range(count):
        cls, colour = str(rng.choice(CLASSES)), str(rng.choice(colours))
        result.append(Probe(article(f"{colour} {cls}"), ((cls, colour, None),), None, "single"))
    for _ in range(count):
        cls, colour, pattern = str(rng.choice(CLASSES)), str(rng.choice(colours)), str(rng.choice(PATTERNS[1:]))
        result.append(Probe(article(f"{colour} {pattern} {cls}"), ((cls, colour, pattern),), None, "pattern"))
    for _ in range(count):
        first, second = rng.choice(len(CLASSES), size=2, replace=False)
        a, b = str(rng.choice(colours)), str(rng.choice(colours))
        objects = ((CLASSES[first], a, None), (CLASSES[second], b, None))
        result.append(Probe(f"{article(f'{a} {CLASSES[first]}')} next to {article(f'{b} {CLASSES[second]}')}",
                            objects, None, "two"))
    for _ in range(count):
        cls, colour, background = str(rng.choice(CLASSES)), str(rng.choice(colours)), str(rng.choice(backgrounds))
        result.append(Probe(f"{article(f'{colour} {cls}')} {BACKGROUNDS[background]}", ((cls, colour, None),),
                            background, "background"))
    return result


def measure(pipe: Any, detector: Any, prompt_probes: Sequence[Probe], *, steps: int = 20,
            guidance_scale: float = 6.0, seed: int = 0, seeds: Sequence[int] | None = None) -> dict[str, float]:
    """Accuracies over ``prompt_probes`` (one image each, seed ``seed + i``, or ``seeds[i]``):

    - ``class`` / ``colour`` (single-object prompts): the named class is present / present in
      the named colour; ``colour_any_class``: some object has the named colour; ``pattern``: present with the named pattern (pattern prompts);
    - ``two_classes`` / ``two_colours``: both named classes present / both in their colours;
    - ``background``: the named background (background prompts).
    """
    from .quality import sample_batch

    seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(prompt_probes))]
    images = sample_batch(pipe, [p.prompt for p in prompt_probes], seeds, steps=steps, guidance_scale=guidance_scale)
    found = detector.detect(images)
    tallies: dict[str, list[bool]] = {}
    for probe, detection in zip(prompt_probes, found):
        def note(name: str, ok: bool) -> None:
            tallies.setdefault(name, []).append(bool(ok))
        if probe.kind == "single":
            cls, colour, _ = probe.objects[0]
            note("class", detection.has(cls))
            note("colour", detection.has(cls, colour=colour))
            note("colour_any_class", any(found == colour for _, found, _ in detection.objects))
        elif probe.kind == "pattern":
            cls, colour, pattern = probe.objects[0]
            note("pattern", detection.has(cls, pattern=pattern))
        elif probe.kind == "two":
            note("two_classes", all(detection.has(cls) for cls, _, _ in probe.objects))
            note("two_colours", all(detection.has(cls, colour=colour) for cls, colour, _ in probe.objects))
        else:
            note("background", detection.background == probe.background)
    return {name: float(np.mean(values)) for name, values in tallies.items()} | {
        f"n_{kind}": sum(p.kind == kind for p in prompt_probes) for kind in KINDS}


def write_card(accuracy: dict[str, float], detector_accuracy: dict[str, float], training: dict[str, Any],
               path: Any, *, steps: int, count: int, default_run: dict[str, Any] | None = None) -> None:
    """The shipped model card: what the base was trained on, how long, and what it follows;
    ``default_run``: the record of one from-scratch run of the script's defaults, if measured."""
    from .train_base import SCHEDULER_CONFIG, TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG, VISION_CONFIG

    runs = []
    while training:
        runs.insert(0, training)
        training = training.get("continues")
    unet_steps = sum(run["steps"]["unet"] for run in runs)
    lines = [
        "# builtin:toyworld: a Stable Diffusion pipeline of the toy world",
        "",
        "A diffusers `StableDiffusionPipeline` (32 x 32 px images, 16 x 16 x 4 latents) trained from scratch",
        "on the seeded scenes of `mergekit_cd.toyworld.scenes`: one to three shapes (8 classes, 8 colours,",
        "4 patterns, two sizes, anywhere) on 7 backgrounds, with captions from varied templates.",
        "Load it with `StableDiffusionPipeline.from_pretrained(mergekit_cd.toyworld.base_path())`, or name it",
        "`--base builtin:toyworld` in every cd-* command. Its CLIP-style pair is `builtin:toyworld-clip`.",
        "",
        "## Training",
        "",
        f"Components: text tower {TEXT_CONFIG}; image tower {VISION_CONFIG}; AutoencoderKL {VAE_CONFIG};",
        f"UNet2DConditionModel {UNET_CONFIG}; DDIM over {SCHEDULER_CONFIG}.",
        "",
        f"{len(runs)} run(s) on a 2-core CPU that other work shared at times, {unet_steps} UNet steps in all:",
        "",
    ]
    for number, run in enumerate(runs, 1):
        minutes = run["seconds"]["total"] / 60
        decoder = run["steps"].get("decoder", 0)
        decoder_text = (f"; then the autoencoder's decoder alone, {decoder} steps at batch {run['batch_sizes']['vae']} "
                        f"on the frozen encoder's latents (as SD's ft-MSE decoder: the UNet's latent space unchanged)"
                        if decoder else "")
        text = run["steps"].get("text", 0)
        supervision = (f"{text} steps at batch {run['batch_sizes'].get('text')} on the attributes its captions name "
                       f"(`mergekit_cd.toyworld.text_supervision`: each class word's row names its class and its "
                       f"phrase's colour and pattern, the rows after the caption name everything in it)")
        tower = f"fine-tuned {supervision} and then frozen" if text else "then frozen"
        if run.get("continues"):
            text_step = (f"the pipeline's text encoder of run {number - 1} fine-tuned {supervision}, then "
                         if text else "")
            lines.append(f"{number}. `{run['command']}`: {text_step}the UNet {run['steps']['unet']} steps further at "
                         f"batch {run['batch_sizes']['unet']}, on {'that text encoder and ' if text else ''}the "
                         f"frozen {'' if text else 'CLIP pair and '}autoencoder of run {number - 1}{decoder_text} "
                         f"({minutes:.0f} min).")
        else:
            lines.append(
                f"{number}. `{run['command']}` ({run['scenes']} scenes x 3 captions, seed {run['seed']}, "
                f"{minutes:.0f} min): the CLIP-style pair contrastively (symmetric InfoNCE), "
                f"{run['steps']['clip']} steps at batch {run['batch_sizes']['clip']}, its text tower {tower} as "
                f"the pipeline's `text_encoder`; the AutoencoderKL (reconstruction + 1e-6 KL), {run['steps']['vae']} "
                f"steps at batch {run['batch_sizes']['vae']}; the UNet (epsilon prediction, min-SNR-5 weights, 10% "
                f"caption dropout for classifier-free guidance, EMA 0.999), {run['steps']['unet']} steps at batch "
                f"{run['batch_sizes']['unet']}{decoder_text}.")
        if run.get("note"):
            lines.append(f"   {run['note']}")
    lines += [
        "",
        "## Prompt following (measured by the world's detector)",
        "",
        f"`python -m mergekit_cd.toyworld.prompt_following --images {count}`: {count} seeded prompts of each kind,",
        f"one image each, {steps} DDIM steps, guidance 6:",
        "",
        "| prompt kind | attribute | accuracy |",
        "|---|---|---|",
        f"| one object (\"a red star\") | class | {accuracy['class']:.2f} |",
        f"| one object | colour (class and colour right) | {accuracy['colour']:.2f} |",
        f"| one object | colour of any object drawn | {accuracy['colour_any_class']:.2f} |",
        f"| one object with a pattern (\"a blue striped ring\") | pattern (class and pattern right) | "
        f"{accuracy['pattern']:.2f} |",
        f"| two objects (\"a red star next to a blue ring\") | both classes | {accuracy['two_classes']:.2f} |",
        f"| two objects | both classes in their colours | {accuracy['two_colours']:.2f} |",
        f"| one object in a scene (\"a red star on the beach\") | background | {accuracy['background']:.2f} |",
        "",
        f"The floor the project set for this base, class and colour each at least 0.80 on one-object prompts, is "
        f"{'met' if min(accuracy['class'], accuracy['colour']) >= 0.8 else 'NOT met'}"
        + ("." if min(accuracy['class'], accuracy['colour']) >= 0.8 else
           f": after {unet_steps} UNet steps it draws the named colour and background more often than the named"
           " shape. The next step is more steps of the same script (`--continue-from`), ideally on a GPU with"
           " `--device cuda`."),
        "",
        "The detector itself, on held-out generator scenes: " + ", ".join(
            f"{name} {value:.3f}" for name, value in detector_accuracy.items()) + ".",
        *(_default_run_lines(default_run) if default_run else []),
    ]
    path.write_text("\n".join(lines) + "\n")


def _default_run_lines(record: dict[str, Any]) -> list[str]:
    """The card's section on one run of ``train_base``'s defaults from scratch: its time per stage
    and its prompt following, measured as the shipped base's is, and its ``note`` if any
    (``default_run.json``)."""
    run, accuracy = record["training"], record["accuracy"]
    stages = ", ".join(f"{name.removesuffix('_s')} {seconds / 60:.0f} min" for name, seconds in run["seconds"].items()
                       if name != "total" and seconds)
    steps = ", ".join(f"{name} {count}" for name, count in run["steps"].items())
    met = min(accuracy["class"], accuracy["colour"]) >= 0.8
    snapshots = ", ".join(f"{values['class']:.2f} at {step}" for step, values in record.get("snapshots", {}).items())
    return [
        "",
        "## One run of the script's defaults, from scratch",
        "",
        f"`{run['command']}` (steps: {steps}; seed {run['seed']}) took {run['seconds']['total'] / 60:.0f} min "
        f"({stages}) and {record['cpu_minutes']:.0f} min of CPU time (user + system), on {record['machine']}.",
        f"Measured as above: one-object class {accuracy['class']:.2f}, class and colour {accuracy['colour']:.2f}, "
        f"pattern {accuracy['pattern']:.2f}, both of two classes {accuracy['two_classes']:.2f}, background "
        f"{accuracy['background']:.2f}: the floor is {'met' if met else 'NOT met'}."
        + (f" One-object class accuracy of its EMA snapshots (`--snapshot-every`, the first 100 prompts): "
           f"{snapshots}." if snapshots else ""),
        "The shipped base is the longer chain of runs above; "
        + ("this run shows that the script alone, with its defaults, trains a base that meets the floor."
           if met else "the script's defaults alone do not reach the floor."),
        *([record["note"]] if record.get("note") else []),
    ]


def _load_unet(folder: str, parser: argparse.ArgumentParser) -> Any:
    """The ``UNet2DConditionModel`` saved in ``folder``; anything else is one usage error naming it."""
    from diffusers import UNet2DConditionModel

    from ..errors import first_line

    config = Path(folder) / "config.json"
    try:
        kind = json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        parser.error(f"--unet {folder}: no saved model there (no readable config.json)")
    if kind != "UNet2DConditionModel":
        parser.error(f"--unet {folder}: a saved {kind or 'model of no known class'}, not a UNet2DConditionModel")
    try:
        return UNet2DConditionModel.from_pretrained(folder).eval()
    except (OSError, ValueError) as error:
        parser.error(f"--unet {folder}: cannot load it: {first_line(error)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mergekit_cd.toyworld.prompt_following", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100, help="prompts of each kind (default %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default %(default)s)")
    parser.add_argument("--sampler", choices=("ddim", "dpm-solver++"), default="ddim",
                        help="the base's own DDIM scheduler (the model card's), or DPM-Solver++ as the "
                             "quality benchmark samples (default %(default)s)")
    parser.add_argument("--base", default="builtin:toyworld")
    parser.add_argument("--unet", metavar="FOLDER",
                        help="measure this UNet in the base's pipeline instead of its own, e.g. a snapshot "
                             "train_base --snapshot-every saved (FOLDER/snapshots/unet-STEP)")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                        help="prompt kinds to measure; each keeps its prompts and seeds of the full "
                             "measurement (default: all)")
    parser.add_argument("--write-card", action="store_true",
                        help="write MODEL_CARD.md beside the shipped base (needs its training.json)")
    args = parser.parse_args(argv)
    from . import ASSETS
    from .benchmark import sampling_pipeline
    from .detector import Detector, heldout_accuracy

    if args.write_card and (args.sampler != "ddim" or args.unet or set(args.kinds) != set(KINDS)):
        parser.error("--write-card measures the base as it is, with its own sampler and every prompt kind: "
                     "leave out --sampler, --unet and --kinds")
    started = time.perf_counter()
    pipe = sampling_pipeline(args.base, dpm_solver=args.sampler == "dpm-solver++")
    if args.unet:
        pipe.unet = _load_unet(args.unet, parser)
    chosen = [(index, probe) for index, probe in enumerate(probes(args.images)) if probe.kind in args.kinds]
    accuracy = measure(pipe, Detector.load(), [probe for _, probe in chosen], seeds=[index for index, _ in chosen],
                       steps=args.steps)
    for name, value in accuracy.items():
        print(f"{name:<12} {value:.3f}" if not name.startswith("n_") else f"{name:<12} {value}")
    print(f"measured in {time.perf_counter() - started:.0f} s")
    if args.write_card:
        training = json.loads((ASSETS / "training.json").read_text())
        default_run = ASSETS / "default_run.json"
        write_card(accuracy, heldout_accuracy(), training, ASSETS / "MODEL_CARD.md", steps=args.steps,
                   count=args.images,
                   default_run=json.loads(default_run.read_text()) if default_run.exists() else None)
        print(f"wrote {ASSETS / 'MODEL_CARD.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
