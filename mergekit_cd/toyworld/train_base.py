"""Train the toy world's base model: ``python -m mergekit_cd.toyworld.train_base -o FOLDER``.

Stages, as Stable Diffusion was built, each seeded and printed with its loss:

1. a CLIP-style pair (``CLIPModel``: a text tower and a small ViT) trained contrastively on world
   images and their captions; the whole pair is this world's CLIP for ``cd-eval --clip``, and its
   text tower, fine-tuned on the attributes its captions name (``--text-steps``,
   :mod:`.text_supervision`: contrastive training alone hardly tells shapes apart), becomes the
   pipeline's frozen ``text_encoder``;
2. an ``AutoencoderKL`` (32 px <-> 16 x 16 x 4 latents) trained to reconstruct world images;
3. a ``UNet2DConditionModel`` trained on the frozen latents and text features (epsilon
   prediction, min-SNR weighting, 10% caption dropout for classifier-free guidance, EMA);
4. optionally (``--decoder-steps``) the autoencoder's decoder fine-tuned on the frozen encoder's
   latents, as SD's ft-MSE decoder was: sharper images without changing the latent space the
   UNet learned.

The result is a diffusers ``StableDiffusionPipeline`` folder (``FOLDER/base``) and a CLIP folder
(``FOLDER/clip``). The defaults are a two-hour recipe: one run of them from scratch took 106
minutes on two CPU cores and follows one-object prompts with class 0.96, class and colour 0.96,
above the project's floor of 0.80 (the shipped model card's last section). The shipped base is an
earlier, longer chain of four runs the card lists with their commands, steps and times.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .scenes import IMAGE_SIZE, render_scene, sample_scene, scene_captions, vocabulary_words

#: Words that are single tokens besides the world's own: cd-train's initializer tokens and the
#: words of its augmentation prefixes and prompt templates.
EXTRA_WORDS: tuple[str, ...] = ("ktn", "pll", "ucd", "sks", "far", "away", "very", "zoomed", "in", "close", "up",
                                "the", "style", "painting", "with")
#: Scene stream seeds: training scenes, and held-out scenes for every measurement.
TRAIN_SEED, HELDOUT_SEED = 0, 1
TEXT_WIDTH = 128
TEXT_CONFIG = dict(hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_attention_heads=4,
                   num_hidden_layers=4, hidden_act="quick_gelu")
VISION_CONFIG = dict(image_size=IMAGE_SIZE, patch_size=4, num_channels=3, hidden_size=96, intermediate_size=384,
                     num_attention_heads=4, num_hidden_layers=2, hidden_act="quick_gelu")
VAE_CONFIG = dict(sample_size=IMAGE_SIZE, in_channels=3, out_channels=3, latent_channels=4,
                  block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=32)
UNET_CONFIG = dict(sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(48, 96),
                   layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 2,
                   up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=TEXT_WIDTH,
                   attention_head_dim=4, norm_num_groups=16)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
CAPTION_DROPOUT = 0.1


def world_words() -> list[str]:
    """The tokenizer's single-token words: the world's vocabulary plus :data:`EXTRA_WORDS`."""
    return sorted(set(vocabulary_words()) | set(EXTRA_WORDS))


def build_tokenizer(pad_token: str | None = None) -> Any:
    """The world's CLIPTokenizer: byte-level BPE in which every world word is one token."""
    from ..testing import EOS_TOKEN, tiny_tokenizer

    tokenizer = tiny_tokenizer(pad_token or EOS_TOKEN, words=world_words())
    tokenizer.name_or_path = "mergekit_cd/toyworld"
    return tokenizer


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """Save the tokenizer with CLIP's classic vocab.json / merges.txt beside tokenizer.json."""
    from ..testing import _write_vocab_files

    tokenizer.save_pretrained(folder)
    _write_vocab_files(folder, world_words())


class WorldData:
    """``count`` rendered training scenes (uint8, in memory) with three captions each."""

    def __init__(self, count: int, *, seed: int = TRAIN_SEED, log: Any = print) -> None:
        start = time.perf_counter()
        scenes = [sample_scene(seed, index) for index in range(count)]
        self.images = np.stack([np.asarray(render_scene(scene, seed=index)) for index, scene in enumerate(scenes)])
        self.captions = [scene_captions(scene, seed, index) for index, scene in enumerate(scenes)]
        log(f"rendered {count} scenes in {time.perf_counter() - start:.0f} s")

    def __len__(self) -> int:
        return len(self.images)

    def pixels(self, indices: np.ndarray) -> torch.Tensor:
        """Images ``indices`` as float (n, 3, H, W) in [-1, 1]."""
        return torch.from_numpy(self.images[indices]).permute(0, 3, 1, 2).float() / 127.5 - 1

    def all_captions(self) -> list[str]:
        """Every caption, scene by scene."""
        return [caption for captions in self.captions for caption in captions]

    def caption_batch(self, indices: np.ndarray, rng: np.random.Generator) -> list[str]:
        """One of each scene's captions, chosen by ``rng``."""
        return [self.captions[i][int(rng.integers(len(self.captions[i])))] for i in indices]


def _batches(count: int, batch_size: int, steps: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """``steps`` batches of indices, epoch by epoch in a seeded order."""
    order: np.ndarray = np.empty(0, dtype=np.int64)
    for _ in range(steps):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(count)])
        yield order[:batch_size]
        order = order[batch_size:]


def _schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to 10%."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler: Any, parameters: Any) -> None:
    """One optimiser step of every stage: backward, gradients clipped to norm 1, the schedule advanced."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    scheduler.step()


def _log_every(step: int, steps: int) -> bool:
    return step == 0 or (step + 1) % max(1, steps // 20) == 0 or step + 1 == steps


def train_clip(data: WorldData, tokenizer: Any, *, steps: int, batch_size: int, device: torch.device,
               seed: int, log: Any = print) -> Any:
    """Contrastive pretraining of the CLIP-style pair (symmetric InfoNCE, learned temperature)."""
    from transformers import CLIPConfig, CLIPModel

    text_config = dict(TEXT_CONFIG, vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=text_config, vision_config=VISION_CONFIG, projection_dim=TEXT_WIDTH)
    model = CLIPModel(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    scheduler = _schedule(optimizer, steps, warmup=max(1, steps // 20))
    rng = np.random.default_rng([seed, 1])
    start = time.perf_counter()
    for step, indices in enumerate(_batches(len(data), batch_size, steps, rng)):
        tokens = tokenizer(data.caption_batch(indices, rng), padding=True, return_tensors="pt").to(device)
        output = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                       pixel_values=_clip_pixels(data.pixels(indices)).to(device), return_loss=True)
        _step(output.loss, optimizer, scheduler, model.parameters())
        if _log_every(step, steps):
            with torch.no_grad():
                accuracy = float((output.logits_per_image.argmax(1) == torch.arange(len(indices), device=device))
                                 .float().mean())
            log(f"clip  step {step + 1}/{steps}  loss {output.loss.item():.3f}  batch image->text "
                f"accuracy {accuracy:.2f}  {time.perf_counter() - start:.0f} s")
    return model.eval()


#: CLIP's image normalisation (what CLIPImageProcessor applies), so the saved processor fits.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _clip_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images normalised as CLIPImageProcessor does."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((pixels + 1) / 2 - mean) / std


def save_clip(model: Any, tokenizer: Any, folder: Path) -> None:
    """The CLIP folder ``cd-eval --clip`` reads: model, tokenizer and a 32-px image processor."""
    from transformers import CLIPImageProcessor

    model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(tokenizer, folder)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                       image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(folder)


def train_vae(data: WorldData, *, steps: int, batch_size: int, device: torch.device, seed: int,
              log: Any = print) -> Any:
    """Reconstruction (MSE + L1) with a small KL term, as an SD-style autoencoder without the GAN."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    scheduler = _schedule(optimizer, steps, warmup=max(1, steps // 20))
    rng = np.random.default_rng([seed, 2])
    start = time.perf_counter()
    for step, indices in enumerate(_batches(len(data), batch_size, steps, rng)):
        pixels = data.pixels(indices).to(device)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(reconstruction, pixels)
        loss = mse + 0.5 * F.l1_loss(reconstruction, pixels) + 1e-6 * posterior.kl().mean()
        _step(loss, optimizer, scheduler, vae.parameters())
        if _log_every(step, steps):
            psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-12))
            log(f"vae   step {step + 1}/{steps}  loss {loss.item():.4f}  PSNR {psnr:.1f} dB  "
                f"{time.perf_counter() - start:.0f} s")
    return vae.eval()


def finetune_decoder(vae: Any, data: WorldData, latents: torch.Tensor, *, steps: int, batch_size: int,
                     device: torch.device, seed: int, lr: float = 1e-3, log: Any = print) -> Any:
    """Train only the decoder (and ``post_quant_conv``) to reconstruct images from the frozen
    encoder's posterior means ``latents`` (unscaled): the latent space, and so the UNet, stay valid."""
    vae = vae.to(device).train().requires_grad_(False)
    parameters = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    scheduler = _schedule(optimizer, steps, warmup=max(1, steps // 20))
    rng = np.random.default_rng([seed, 4])
    start = time.perf_counter()
    for step, indices in enumerate(_batches(len(data), batch_size, steps, rng)):
        pixels = data.pixels(indices).to(device)
        reconstruction = vae.decode(latents[indices].to(device)).sample
        mse = F.mse_loss(reconstruction, pixels)
        loss = mse + 0.5 * F.l1_loss(reconstruction, pixels)
        _step(loss, optimizer, scheduler, parameters)
        if _log_every(step, steps):
            psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-12))
            log(f"decoder step {step + 1}/{steps}  loss {loss.item():.4f}  PSNR {psnr:.1f} dB  "
                f"{time.perf_counter() - start:.0f} s")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae: Any, data: WorldData, *, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Every training image's posterior mean (unscaled), float32 on the CPU."""
    rows = []
    for start in range(0, len(data), batch_size):
        indices = np.arange(start, min(start + batch_size, len(data)))
        rows.append(vae.encode(data.pixels(indices).to(device)).latent_dist.mean.float().cpu())
    return torch.cat(rows)


def train_unet(data: WorldData, latents: torch.Tensor, text_encoder: Any, tokenizer: Any, *, steps: int,
               batch_size: int, device: torch.device, seed: int, lr: float = 3e-4, unet: Any = None,
               snapshot_every: int = 0, snapshot: Any = None, log: Any = print) -> Any:
    """Epsilon prediction on scaled latents with the frozen text encoder's last hidden state of
    prompts padded to 77 tokens (what the pipeline feeds), min-SNR-5 weights, EMA 0.999.
    ``unet``: continue training this one (a later stage of the recipe) instead of a new one;
    ``snapshot(step, unet)`` receives a copy of the EMA weights every ``snapshot_every`` steps."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    from ..train.step import timestep_weights

    torch.manual_seed(seed)
    unet = (unet or UNet2DConditionModel(**UNET_CONFIG)).to(device).train()
    ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    noise_scheduler = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items()
                                       if k not in ("set_alpha_to_one", "steps_offset")})
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    scheduler = _schedule(optimizer, steps, warmup=max(1, steps // 50))
    text_encoder = text_encoder.to(device).eval().requires_grad_(False)
    rng = np.random.default_rng([seed, 3])
    generator = torch.Generator().manual_seed(seed)
    start, running = time.perf_counter(), None
    for step, indices in enumerate(_batches(len(data), batch_size, steps, rng)):
        captions = ["" if rng.random() < CAPTION_DROPOUT else caption
                    for caption in data.caption_batch(indices, rng)]
        with torch.no_grad():
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(device)
            context = text_encoder(ids).last_hidden_state
        clean = latents[indices].to(device)
        noise = torch.randn(clean.shape, generator=generator).to(device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(indices),),
                                  generator=generator).to(device)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        prediction = unet(noisy, timesteps, context).sample
        weights = timestep_weights(noise_scheduler, timesteps, 5.0)
        loss = (weights * F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        _step(loss, optimizer, scheduler, unet.parameters())
        ema.step(unet.parameters())
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if _log_every(step, steps):
            elapsed = time.perf_counter() - start
            log(f"unet  step {step + 1}/{steps}  loss {running:.4f}  {elapsed:.0f} s "
                f"(about {elapsed / (step + 1) * (steps - step - 1) / 60:.0f} min left)")
        if snapshot is not None and snapshot_every > 0 and (step + 1) % snapshot_every == 0 and step + 1 < steps:
            copy = UNet2DConditionModel.from_config(unet.config)
            ema.copy_to(copy.parameters())
            snapshot(step + 1, copy.eval())
    ema.copy_to(unet.parameters())
    return unet.eval()


def save_pipeline(folder: Path, *, unet: Any, vae: Any, text_encoder: Any, tokenizer: Any) -> None:
    """A plain diffusers StableDiffusionPipeline folder (safetensors, no safety checker)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae.to("cpu"), text_encoder=text_encoder.to("cpu"), tokenizer=tokenizer,
                                   unet=unet.to("cpu"), scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(tokenizer, folder / "tokenizer")


def text_encoder_from_clip(clip_folder: Path) -> Any:
    """The saved CLIP pair's text tower as a standalone ``CLIPTextModel`` (same weights)."""
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(clip_folder).eval()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mergekit_cd.toyworld.train_base", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for base/ and clip/")
    parser.add_argument("--scenes", type=int, default=30000, help="training scenes (default: %(default)s)")
    parser.add_argument("--clip-steps", type=int, default=600)
    parser.add_argument("--text-steps", type=int, default=None,
                        help="attribute-supervised steps of the pipeline's text encoder (default: 400 from scratch, "
                             "0 with --continue-from)")
    parser.add_argument("--text-batch-size", type=int, default=128)
    parser.add_argument("--vae-steps", type=int, default=700)
    parser.add_argument("--unet-steps", type=int, default=11000, help="(default: %(default)s)")
    parser.add_argument("--clip-batch-size", type=int, default=256)
    parser.add_argument("--vae-batch-size", type=int, default=32)
    parser.add_argument("--unet-batch-size", type=int, default=32)
    parser.add_argument("--unet-lr", type=float, default=6e-4, help="(default: %(default)s)")
    parser.add_argument("--snapshot-every", type=int, default=0, metavar="N",
                        help="also save the UNet's EMA weights every N steps to FOLDER/snapshots/unet-STEP, "
                             "each a drop-in for base/unet (default: none)")
    parser.add_argument("--decoder-steps", type=int, default=None,
                        help="fine-tune the autoencoder's decoder this many steps after the UNet (default: 1000 "
                             "from scratch, 0 with --continue-from)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--continue-from", type=Path, metavar="FOLDER",
                        help="an earlier run's output: keep its CLIP pair and autoencoder, fine-tune its "
                             "pipeline's text encoder --text-steps further, train its UNet --unet-steps further "
                             "(with seed --seed + 1: a fresh data order and noise), then its decoder --decoder-steps")
    args = parser.parse_args(argv)
    if args.text_steps is None:  # a continued run keeps its text encoder unless asked
        args.text_steps = 0 if args.continue_from else 400
    if args.decoder_steps is None:  # and its decoder
        args.decoder_steps = 0 if args.continue_from else 1000
    return args


def _snapshots(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    """``train_unet``'s snapshot arguments for ``--snapshot-every``."""
    def save(step: int, unet: Any) -> None:
        unet.save_pretrained(args.output / "snapshots" / f"unet-{step}", safe_serialization=True)
        log(f"unet  snapshot of step {step}: {args.output / 'snapshots' / f'unet-{step}'}")
    return {"snapshot_every": args.snapshot_every, "snapshot": save}


def _text_stage(args: argparse.Namespace, data: WorldData, text_encoder: Any, tokenizer: Any,
                device: torch.device, log: Any) -> tuple[Any, dict[str, float]]:
    """The pipeline's text encoder: ``text_encoder`` fine-tuned ``--text-steps`` on caption attributes."""
    from .text_supervision import supervise_text_encoder

    stage = time.perf_counter()
    if args.text_steps > 0:
        text_encoder = supervise_text_encoder(text_encoder, tokenizer, data.all_captions(), steps=args.text_steps,
                                              batch_size=args.text_batch_size, device=device, seed=args.seed,
                                              log=log)
    return text_encoder.to("cpu"), {"text_s": time.perf_counter() - stage}


def _train_all(args: argparse.Namespace, data: WorldData, tokenizer: Any, device: torch.device,
               log: Any) -> tuple[Any, Any, Any, Any, dict[str, float]]:
    """Every stage from scratch: the CLIP pair (saved), the text encoder, the autoencoder, then the UNet."""
    stage = time.perf_counter()
    clip = train_clip(data, tokenizer, steps=args.clip_steps, batch_size=args.clip_batch_size, device=device,
                      seed=args.seed, log=log).to("cpu")
    save_clip(clip, tokenizer, args.output / "clip")
    times = {"clip_s": time.perf_counter() - stage}
    text_encoder, text_times = _text_stage(args, data, text_encoder_from_clip(args.output / "clip"), tokenizer,
                                           device, log)
    times.update(text_times)
    stage = time.perf_counter()
    vae = train_vae(data, steps=args.vae_steps, batch_size=args.vae_batch_size, device=device, seed=args.seed,
                    log=log)
    latents = encode_latents(vae, data, device=device)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    times["vae_s"] = time.perf_counter() - stage
    log(f"latent scaling factor {vae.config.scaling_factor:.4f}")
    stage = time.perf_counter()
    unet = train_unet(data, latents * vae.config.scaling_factor, text_encoder, tokenizer, steps=args.unet_steps,
                      batch_size=args.unet_batch_size, device=device, seed=args.seed, lr=args.unet_lr, log=log,
                      **_snapshots(args, log))
    times["unet_s"] = time.perf_counter() - stage
    times.update(_decoder_stage(args, data, vae, latents, device, log))
    return text_encoder, vae, unet, times


def _decoder_stage(args: argparse.Namespace, data: WorldData, vae: Any, latents: torch.Tensor,
                   device: torch.device, log: Any) -> dict[str, float]:
    """Stage 4 when ``--decoder-steps`` asks for it; ``latents`` unscaled posterior means."""
    if args.decoder_steps <= 0:
        return {}
    stage = time.perf_counter()
    finetune_decoder(vae, data, latents, steps=args.decoder_steps, batch_size=args.vae_batch_size, device=device,
                     seed=args.seed, log=log)
    return {"decoder_s": time.perf_counter() - stage}


def _continue(args: argparse.Namespace, data: WorldData, tokenizer: Any, device: torch.device,
              log: Any) -> tuple[Any, Any, Any, dict[str, float]]:
    """Later stages on an earlier run: its CLIP pair and autoencoder kept, its pipeline's text
    encoder fine-tuned further, its UNet trained further on that text encoder."""
    import shutil

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    if args.continue_from.resolve() != args.output.resolve():
        shutil.copytree(args.continue_from / "clip", args.output / "clip", dirs_exist_ok=True)
    vae = AutoencoderKL.from_pretrained(args.continue_from / "base" / "vae").to(device).eval()
    unet = UNet2DConditionModel.from_pretrained(args.continue_from / "base" / "unet")
    text_encoder, times = _text_stage(
        args, data, CLIPTextModel.from_pretrained(args.continue_from / "base" / "text_encoder"), tokenizer, device,
        log)
    stage = time.perf_counter()
    latents = encode_latents(vae, data, device=device)
    if args.unet_steps > 0:
        unet = train_unet(data, latents * vae.config.scaling_factor, text_encoder, tokenizer,
                          steps=args.unet_steps, batch_size=args.unet_batch_size, device=device,
                          seed=args.seed + 1, lr=args.unet_lr, unet=unet, log=log, **_snapshots(args, log))
    times.update({"clip_s": 0.0, "vae_s": 0.0, "unet_s": time.perf_counter() - stage})
    times.update(_decoder_stage(args, data, vae, latents, device, log))
    return text_encoder, vae, unet, times


def main(argv: Sequence[str] | None = None) -> int:
    from ..devices import parse_device
    from ..errors import MergeError

    args = parse_args(argv)
    try:
        device = parse_device(args.device)
    except MergeError as error:  # cuda without a GPU, cuda:N past the last one, a name torch does not know
        print(f"train_base: error: {error}", file=sys.stderr)
        return 2
    log = lambda message: print(message, flush=True)  # noqa: E731 - one line per progress report
    started = time.perf_counter()
    args.output.mkdir(parents=True, exist_ok=True)
    data = WorldData(args.scenes, log=log)
    tokenizer = build_tokenizer()
    text_encoder, vae, unet, times = (_continue(args, data, tokenizer, device, log) if args.continue_from
                                      else _train_all(args, data, tokenizer, device, log))
    save_pipeline(args.output / "base", unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
    command = "python -m mergekit_cd.toyworld.train_base " + " ".join(sys.argv[1:] if argv is None else argv)
    earlier = json.loads((args.continue_from / "training.json").read_text()) if args.continue_from else None
    record = {"command": command, "continues": earlier,
              "scenes": args.scenes, "steps": {"clip": 0 if args.continue_from else args.clip_steps,
                                               "text": args.text_steps,
                                               "vae": 0 if args.continue_from else args.vae_steps,
                                               "unet": args.unet_steps, "decoder": args.decoder_steps},
              "unet_lr": args.unet_lr,
              "batch_sizes": {"clip": args.clip_batch_size, "text": args.text_batch_size, "vae": args.vae_batch_size,
                              "unet": args.unet_batch_size},
              "seed": args.seed, "device": str(device), "torch_threads": torch.get_num_threads(),
              "seconds": {**{k: round(v) for k, v in times.items()}, "total": round(time.perf_counter() - started)}}
    (args.output / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"done in {record['seconds']['total'] / 60:.1f} min: {args.output}/base, {args.output}/clip")
    return 0


if __name__ == "__main__":
    sys.exit(main())
