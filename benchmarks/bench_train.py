"""Training speed and peak memory of cd-train against the same recipe run the plain way.

"Plain" is what the public scripts do every step: encode the class images with the VAE and the
class prompts with the text encoder(s). cd-train computes the class images' latent
distributions and the class prompts' text features once and samples the latents from the
cached distribution, which draws exactly what encoding would (a test checks the losses agree).
Both runs use the same seed, device, data and options, one after the other in this
invocation, each in its own process (so each has its own peak memory).

Models (random weights, nothing downloaded):
- ``tiny-sd1``, ``tiny-sdxl``: the test models (16 px); plumbing only, timings mean little.
- ``sd15-shaped``: the SD1.5 UNet (860M parameters), VAE and a CLIP ViT-L-sized text encoder,
  with a small vocabulary; the real per-step cost at 512 px.
- ``sdxl-shaped``: the SDXL UNet (2.6B), VAE and both text encoders at full width (GPU).

Class images come from a folder of synthetic images (``--num-class-images``, default 200, the
paper's count), so generating them is not part of the timing. Steps per second are measured
after ``--warmup`` steps. Peak memory: CUDA's peak allocation during the steps; on the CPU the
process's peak resident size.

Run: ``python benchmarks/bench_train.py`` (tiny SD1 on the CPU, under a minute), or on a GPU
``python benchmarks/bench_train.py --model sd15-shaped --device cuda --steps 20``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = ("tiny-sd1", "tiny-sdxl", "sd15-shaped", "sdxl-shaped")


def build_base(model: str, folder: Path) -> Path:
    """A diffusers folder for ``model`` (random weights), written once into ``folder``."""
    target = folder / model
    if (target / "model_index.json").is_file():
        return target
    if model.startswith("tiny-"):
        from mergekit_cd.testing import save_tiny_pipeline

        return save_tiny_pipeline(model[len("tiny-"):], target)
    return _save_full_size(model, target)


def _save_full_size(model: str, target: Path) -> Path:
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from mergekit_cd.testing import tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=1024 if model == "sdxl-shaped" else 512,
                        scaling_factor=0.13025 if model == "sdxl-shaped" else 0.18215)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)

    def clip(hidden, layers, heads, act, projection=None, pad="<|endoftext|>"):
        tok = tiny_tokenizer(pad)
        config = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                                num_hidden_layers=layers, num_attention_heads=heads, hidden_act=act,
                                max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                projection_dim=projection or hidden)
        return tok, (CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config))

    if model == "sd15-shaped":
        tokenizer, text_encoder = clip(768, 12, 12, "quick_gelu")
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        tokenizer, text_encoder = clip(768, 12, 12, "quick_gelu")
        tokenizer_2, text_encoder_2 = clip(1280, 32, 20, "gelu", projection=1280, pad="!")
        unet = UNet2DConditionModel(
            sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                         scheduler=scheduler)
    pipe.save_pretrained(target, safe_serialization=True)
    return target


def draw_images(folder: Path, count: int, size: int, seed: int) -> Path:
    """Simple synthetic photos: a coloured disc on a coloured background."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        if (folder / f"{index:04d}.png").is_file():
            continue
        image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 255, 3)))
        low, high = sorted(int(v) for v in rng.integers(0, size, 2))
        ImageDraw.Draw(image).ellipse((low, low, max(high, low + 2), max(high, low + 2)),
                                      fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        image.save(folder / f"{index:04d}.png")
    return folder


def child(args: argparse.Namespace) -> None:
    """One training run; prints one JSON line with its speed and peak memory."""
    import torch

    from mergekit_cd.train import train

    if args.threads:
        torch.set_num_threads(args.threads)
    stamps: list[float] = []
    result = train(args.base, args.instance_dir, "cat", Path(args.output), reg_dir=args.reg_dir,
                   steps=args.warmup + args.steps, batch_size=args.batch_size, resolution=args.resolution,
                   num_class_images=args.num_class_images, mixed_precision=args.mixed_precision,
                   gradient_checkpointing=args.gradient_checkpointing, device=args.device, seed=0,
                   checkpoint_every=10**9, progress=False, cache=args.variant == "cached",
                   on_step=lambda step, loss: stamps.append(time.perf_counter()), force=True)
    measured = stamps[args.warmup:]
    rate = (len(measured) - 1) / (measured[-1] - measured[0]) if len(measured) > 1 else float("nan")
    peak = result.peak_memory_bytes
    if peak is None:  # CPU: the process's peak resident size (Linux reports KiB)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"variant": args.variant, "steps_per_second": rate, "peak_bytes": peak,
                      "final_loss": result.losses[-1],
                      "mixed_precision": result.delta.metadata["recipe"]["mixed_precision"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="tiny-sd1")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--batch-size", type=int, default=8, help="default 8, the paper's")
    parser.add_argument("--resolution", type=int, help="default: the model's own")
    parser.add_argument("--num-class-images", type=int, default=200)
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per run (default 1: steadier timings on a shared machine; "
                             "0: torch's choice)")
    parser.add_argument("--work-dir", type=Path, help="keep models and images here (default: a temporary folder)")
    parser.add_argument("--child", dest="variant", choices=("cached", "plain"), help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--instance-dir", help=argparse.SUPPRESS)
    parser.add_argument("--reg-dir", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench_train_") as temporary:
        work = args.work_dir or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        base = build_base(args.model, work)
        native = {"tiny-sd1": 16, "tiny-sdxl": 16, "sd15-shaped": 512, "sdxl-shaped": 1024}[args.model]
        size = args.resolution or native
        instance = draw_images(work / f"instance-{size}", 8, size, seed=1)
        reg = draw_images(work / f"class-{size}-{args.num_class_images}", args.num_class_images, size, seed=2)
        print(f"model {args.model} ({time.perf_counter() - started:.0f} s to build), device {args.device}, "
              f"batch {args.batch_size} (+{args.batch_size} class images), {size} px, "
              f"{args.num_class_images} class images, {args.threads or 'default'} CPU thread(s), "
              f"{args.steps} timed steps after {args.warmup}", flush=True)
        rows = {}
        for variant in ("cached", "plain"):
            command = [sys.executable, __file__, "--child", variant, "--base", str(base), "--instance-dir",
                       str(instance), "--reg-dir", str(reg), "--output", str(work / f"out-{variant}"),
                       "--model", args.model, "--device", args.device, "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--num-class-images",
                       str(args.num_class_images), "--mixed-precision", args.mixed_precision,
                       "--threads", str(args.threads)]
            if args.resolution:
                command += ["--resolution", str(args.resolution)]
            if args.gradient_checkpointing:
                command.append("--gradient-checkpointing")
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if done.returncode != 0:
                sys.exit(f"{variant} run failed:\n{done.stderr[-3000:]}")
            rows[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        cached, plain = rows["cached"], rows["plain"]
        print(f"{'run':28s} {'steps/s':>9s} {'peak memory':>12s} {'final loss':>11s} {'precision':>9s}")
        for name, row in (("cd-train (cached priors)", cached), ("plain (encode every step)", plain)):
            print(f"{name:28s} {row['steps_per_second']:9.3f} {row['peak_bytes'] / 2**30:9.2f} GiB "
                  f"{row['final_loss']:11.5f} {row['mixed_precision']:>9s}")
        print(f"speed ratio cd-train / plain: {cached['steps_per_second'] / plain['steps_per_second']:.2f}x; "
              f"peak memory ratio: {cached['peak_bytes'] / plain['peak_bytes']:.2f}")


if __name__ == "__main__":
    main()
