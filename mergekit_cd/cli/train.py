"""``cd-train --base BASE --instance-dir DIR --class-word cat -o OUT``: learn a Custom Diffusion concept."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..train import TrainingInterrupted, train
from ._common import run, seed_type

DESCRIPTION = """\
Teach a Stable Diffusion model (SD1.x, SD2.x, SDXL) a new concept the Custom
Diffusion way (Kumari et al. 2023): only the cross-attention keys/values and a
new token's embedding train, with prior preservation on class images. The
result is a delta (the K/V changes and the token's embedding: about 77 MB for
SD1.5, 1.4 GB for SDXL) that cd-merge composes with others."""

EXAMPLES = """\
examples:
  cd-train --base runwayml/stable-diffusion-v1-5 --instance-dir data/cat \\
      --class-word cat -o cat/
  cd-train --base ./sd15 --instance-dir data/cat --class-word cat -o cat/ \\
      --reg-dir real_reg/samples_cat
  cd-train --base ./sdxl --instance-dir data/dog --class-word dog -o dog/ \\
      --token "<dog1>" --mixed-precision bf16 --gradient-checkpointing \\
      --batch-size 2
  cd-train --base ./sd15 --concepts concepts.json -o catpot/  # two, jointly
  cd-train --base ./sd15 --instance-dir data/cat --class-word cat -o cat/ \\
      --resume latest
  accelerate launch -m mergekit_cd.train --base ./sd15 --instance-dir data/cat \\
      --class-word cat -o cat/
  cd-merge cat/ dog/ -o catdog/ --base ./sd15        # compose what you trained

The output folder gets delta.safetensors (K/V differences, tokens and
metadata: class word, target prompts, base fingerprint, recipe) and diffusers/
(the layout diffusers' training script writes); cd-merge, cd-sample and
mergekit_cd.apply read either. Ctrl-C saves a checkpoint to resume from.
Defaults follow the paper: K/V of cross-attention and the new token train, 250
steps (500 for joint training), batch 8, lr 1e-5 x batch = 8e-5, AdamW (weight
decay 1e-2), gradient clipping 1.0, 200 generated class images, resize
augmentation with a loss mask.

concepts.json:
  [{"instance_dir": "data/cat", "class_word": "cat", "token": "<new1>"},
   {"instance_dir": "data/pot", "class_word": "pot", "token": "<new2>",
    "reg_dir": "real_reg/samples_pot"}]"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cd-train",
        description=DESCRIPTION,
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("what to learn")
    what.add_argument("--base", required=True, help="base model: diffusers folder or hub repo id")
    what.add_argument("--instance-dir", type=Path, metavar="DIR",
                      help="folder of the concept's images (png, jpg, jpeg, webp; 4-20 is typical)")
    what.add_argument("--class-word", metavar="WORD", help="the concept's class, e.g. cat, dog, pot, painting")
    what.add_argument("-o", "--output", type=Path, required=True, metavar="OUT",
                      help="output folder: delta.safetensors, diffusers/, checkpoints/, validation/")
    what.add_argument("--token", help="the new modifier token (default <new1>); must be new to the vocabulary")
    what.add_argument("--init-token", metavar="WORD",
                      help="existing single token the new one starts from (default ktn, the authors' choice)")
    what.add_argument("--instance-prompt", metavar="TEMPLATE",
                      help="training caption with {token} and {class_word} (default 'photo of a {token} "
                           "{class_word}')")
    what.add_argument("--concepts", type=Path, metavar="FILE",
                      help="JSON list of concepts to train jointly, instead of the one-concept options "
                           "--instance-dir, --class-word, --token, --init-token, --instance-prompt, --reg-dir "
                           "and --class-prompt (fields: instance_dir, class_word, token, init_token, "
                           "instance_prompt, reg_dir, class_prompt; diffusers' instance_data_dir and "
                           "class_data_dir are read too)")

    prior = parser.add_argument_group("prior preservation (class images)")
    prior.add_argument("--reg-dir", type=Path, metavar="DIR",
                       help="real class images (captions from images.txt + caption.txt, or <image>.txt beside "
                            "each image); default: generate --num-class-images with the base model")
    prior.add_argument("--num-class-images", type=int, default=200, metavar="N",
                       help="class images to generate (or the most to use from --reg-dir); default 200")
    prior.add_argument("--class-prompt", metavar="TEMPLATE",
                       help="caption of class images without their own, and prompt to generate them "
                            "(default 'photo of a {class_word}')")
    prior.add_argument("--prior-loss-weight", type=float, default=1.0, metavar="W",
                       help="weight of the class-image loss (default 1)")
    prior.add_argument("--no-prior", dest="prior", action="store_false",
                       help="train without class images (the paper's ablation; the class drifts)")
    prior.add_argument("--class-cache-dir", type=Path, metavar="DIR",
                       help="where generated class images are cached (default $MERGEKIT_CD_CACHE or "
                            "~/.cache/mergekit_cd)")
    prior.add_argument("--class-sampling-steps", type=int, default=50, metavar="N",
                       help="denoising steps per generated class image (default 50)")

    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--steps", type=int, metavar="N", help="training steps (default 250; 500 with several "
                                                               "concepts)")
    recipe.add_argument("--batch-size", type=int, default=8, metavar="N",
                        help="instance images per step, each paired with a class image (default 8)")
    recipe.add_argument("--lr", type=float, default=1e-5, metavar="LR",
                        help="learning rate before scaling (default 1e-5)")
    recipe.add_argument("--scale-lr", action=argparse.BooleanOptionalAction, default=True,
                        help="multiply --lr by batch size x processes (default on: 8e-5 at batch 8)")
    recipe.add_argument("--resolution", type=int, metavar="PX",
                        help="training resolution (default: the model's own, 512 for SD1.5)")
    recipe.add_argument("--train", default="k,v", metavar="PARTS",
                        help="cross-attention projections to train: k,v (default, what a merge uses) or q,k,v,out")
    recipe.add_argument("--no-aug", dest="augment", action="store_false",
                        help="no resize augmentation (and no loss mask)")
    recipe.add_argument("--hflip", action="store_true", help="also flip instance images at random")
    recipe.add_argument("--snr-gamma", type=float, metavar="GAMMA",
                        help="weigh each timestep's loss by min(SNR, GAMMA) / SNR (min-SNR, Hang et al. 2023; 5 "
                             "is usual, diffusers' --snr_gamma): the nearly clean timesteps, whose noise is "
                             "hard to guess, stop dominating the gradient; default off, as in the paper")
    recipe.add_argument("--seed", type=seed_type, default=0, help="seed of data order, augmentation and noise (default 0)")

    runtime = parser.add_argument_group("hardware and run control")
    runtime.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"),
                         help="frozen weights and activations in half precision (fp16: GPU only; bf16 also on "
                              "CPU); default: accelerate's setting (accelerate config / launch), else no")
    runtime.add_argument("--gradient-checkpointing", action="store_true",
                         help="recompute UNet activations in the backward pass: less memory, slower")
    runtime.add_argument("--device", default=None, metavar="DEVICE",
                         help="cpu, cuda or cuda:N; a device this machine lacks is an error (default: "
                              "accelerate's choice; several GPUs: accelerate launch, without --device)")
    runtime.add_argument("--checkpoint-every", type=int, default=50, metavar="N",
                         help="save a resumable checkpoint every N steps (default 50)")
    runtime.add_argument("--keep-checkpoints", type=int, default=1, metavar="N",
                         help="how many checkpoints to keep (default 1, the latest)")
    runtime.add_argument("--resume", type=Path, metavar="CHECKPOINT",
                         help="continue from a checkpoint folder, a run's output folder, or 'latest' (of -o); "
                              "give the options the run started with (only --steps may change, e.g. "
                              "raised to train longer), else it is refused")
    runtime.add_argument("--validation-prompt", action="append", default=[], metavar="PROMPT",
                         help="sample this prompt now and then into OUT/validation/ (repeatable)")
    runtime.add_argument("--validation-every", type=int, metavar="N",
                         help="steps between validation samples (default: --checkpoint-every)")
    runtime.add_argument("--num-validation-images", type=int, default=2, metavar="N",
                         help="images per validation prompt (default 2)")
    runtime.add_argument("--force", action="store_true", help="start over in an output folder that is not empty")
    runtime.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parser


def main_with_args(args: argparse.Namespace) -> int:
    options = dict(
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, scale_lr=args.scale_lr,
        resolution=args.resolution, train=tuple(args.train.split(",")), augment=args.augment, hflip=args.hflip,
        prior=args.prior, prior_loss_weight=args.prior_loss_weight, snr_gamma=args.snr_gamma, num_class_images=args.num_class_images,
        class_sampling_steps=args.class_sampling_steps, class_cache_dir=args.class_cache_dir,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed, resume=args.resume, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, validation_prompts=tuple(args.validation_prompt),
        validation_every=args.validation_every, num_validation_images=args.num_validation_images,
        device=args.device, force=args.force, progress=not args.quiet)
    try:
        result = train(args.base, args.instance_dir, args.class_word, args.output, token=args.token,
                       init_token=args.init_token, instance_prompt=args.instance_prompt, reg_dir=args.reg_dir,
                       class_prompt=args.class_prompt, concepts=args.concepts, **options)
    except TrainingInterrupted as interrupted:
        print(f"cd-train: {interrupted}", file=sys.stderr)
        return 130
    if result.native is None:  # not the main process of a multi-process run
        return 0
    losses = result.losses
    print(f"trained {', '.join(result.delta.tokens)} for {result.steps} steps "
          f"({result.steps_per_second:.2f} steps/s this session); loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"wrote {result.native} and {result.diffusers}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(main_with_args, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
