"""One training step's objective: the masked instance loss plus the class images' prior loss.

Each step draws its instance images, augmentation, class images, noise and timesteps as
functions of (seed, process, step), so a run resumed from a checkpoint takes exactly the steps
an uninterrupted run takes (nothing in a step draws from torch's global generators: the
models' dropout rates are 0; a test checks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import data
from .state import Models, TrainingState

if TYPE_CHECKING:
    from accelerate import Accelerator


def latent_distribution(models: Models, pixels: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation of the VAE's latent distribution of pixels in [-1, 1].

    Outside autocast: the VAE runs in its own dtype (float32 for SDXL under fp16, whose VAE
    overflows in half precision)."""
    distribution = models.pipe.vae.encode(pixels.to(device, models.vae_dtype)).latent_dist
    return distribution.mean.float(), distribution.std.float()


def encode(models: Models, accelerator: Accelerator, prompts: list[str]) -> tuple[Tensor, Tensor | None]:
    """Cross-attention context (B, 77, d) and, for SDXL, the pooled text embedding."""
    states, pooled = [], None
    hidden_state = models.architecture.hidden_state
    penultimate = hidden_state is not None
    with accelerator.autocast():
        for tokenizer, encoder in zip(models.tokenizers, models.encoders):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(accelerator.device)
            out = encoder(ids, output_hidden_states=penultimate)
            states.append(out.hidden_states[hidden_state] if penultimate else out[0])
            if penultimate and out[0].ndim == 2:
                pooled = out[0]
    return torch.cat([s.float() for s in states], dim=-1), (pooled.float() if pooled is not None else None)


def loss(state: TrainingState, step: int) -> Tensor:
    """The training objective of step ``step``: instance loss + weight x prior loss."""
    instance, prior = loss_terms(state, step)
    return instance if prior is None else instance + state.config.prior_loss_weight * prior


def loss_terms(state: TrainingState, step: int) -> tuple[Tensor, Tensor | None]:
    """(masked instance loss, class-image loss or None) of step ``step``'s draws."""
    config, accelerator, models = state.config, state.accelerator, state.models
    device = accelerator.device
    generator = data.torch_generator(config.seed, accelerator.process_index, step)
    batch = state.instances.batch(seed=config.seed, process=accelerator.process_index, step=step,
                                  batch_size=config.batch_size, size=state.resolution,
                                  factor=models.pipe.vae_scale_factor, augment_images=config.augment,
                                  hflip=config.hflip)
    with torch.no_grad():
        mean, std = latent_distribution(models, batch.pixels, device)
    context, pooled = encode(models, accelerator, batch.prompts)
    halves = [(mean, std, context, pooled)]
    if state.prior is not None:
        halves.append(_class_half(state, step))
    means, stds, contexts, pooled_list = zip(*halves)
    mean, std = torch.cat(means), torch.cat(stds)
    sample = torch.randn(mean.shape, generator=generator).to(device)
    latents = _scaled(models, mean + std * sample)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    scheduler = models.noise_scheduler
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator).to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    added = None
    if models.architecture.time_conditioning:
        time_ids = torch.tensor([models.architecture.time_ids(state.resolution, state.resolution)],
                                dtype=torch.float32, device=device)
        added = {"text_embeds": torch.cat(pooled_list), "time_ids": time_ids.repeat(latents.shape[0], 1)}
    with accelerator.autocast():
        prediction = models.pipe.unet(noisy.to(models.unet_dtype), timesteps, torch.cat(contexts),
                                      added_cond_kwargs=added).sample.float()
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    count = config.batch_size
    mask = batch.masks.to(device)
    weights = timestep_weights(scheduler, timesteps, config.snr_gamma)
    # As both public scripts compute it: summed over channels, averaged over the pixels in the mask.
    instance_error = F.mse_loss(prediction[:count], target[:count], reduction="none")
    instance = (weights[:count] * (instance_error * mask).sum((1, 2, 3)) / mask.sum((1, 2, 3)).clamp(min=1.0)).mean()
    prior = None
    if state.prior is not None:
        prior = (weights[count:] * F.mse_loss(prediction[count:], target[count:], reduction="none").mean((1, 2, 3))).mean()
    return instance, prior


def timestep_weights(scheduler: Any, timesteps: Tensor, snr_gamma: float | None) -> Tensor:
    """Each sample's loss weight: 1, or min-SNR's ``min(SNR, gamma) / SNR`` (``/ (SNR + 1)`` for
    v-prediction), as diffusers' ``--snr_gamma`` weighs it."""
    if snr_gamma is None:
        return torch.ones(timesteps.shape, device=timesteps.device)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    denominator = snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr
    return torch.clamp(snr, max=snr_gamma) / denominator


def _class_half(state: TrainingState, step: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Step ``step``'s class images: their latent mean and std, context and pooled embedding
    (read from the cache, or computed now without it)."""
    config, prior = state.config, state.prior
    indices = data.shuffled_indices(config.seed, state.accelerator.process_index, data.CLASS_ORDER, step,
                                    config.batch_size, len(prior.captions))
    captions = [prior.captions[i] for i in indices]
    cached = prior.features
    if cached is not None:
        rows = [cached.rows[c] for c in captions]
        return (cached.latent_mean[indices], cached.latent_std[indices], cached.context[rows],
                cached.pooled[rows] if cached.pooled is not None else None)
    with torch.no_grad():
        mean, std = latent_distribution(state.models, data.to_unit_range(prior.pixels[indices]),
                                        state.accelerator.device)
        context, pooled = encode(state.models, state.accelerator, captions)
    return mean, std, context, pooled


def _scaled(models: Models, latents: Tensor) -> Tensor:
    """Latents as the UNet reads them: shifted (when the VAE has a shift factor) and scaled."""
    vae_config = models.pipe.vae.config
    if getattr(vae_config, "shift_factor", None) is not None:
        latents = latents - vae_config.shift_factor
    return latents * vae_config.scaling_factor
