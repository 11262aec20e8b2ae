"""Function-level fidelity: the UNet's noise predictions of several models on the same inputs.

Every compared model sees the same :class:`Probes`: noisy latents, timesteps and prompts
drawn once from a seeded generator. Only the prompts' token names change from model to model
(a merge may have renamed a token). The measures are relative norms over a whole probe set:

- fidelity of concept i in model M: ``1 - ||eps_M - eps_i|| / ||eps_i - eps_B||`` on concept
  i's probes (1: M predicts what concept i's own model predicts; 0: no closer than the base;
  negative: further away than the base). B is the base UNet with concept i's own token
  embedding installed: every merge keeps the tokens as they are, so this measures the part
  of the concept a merge decides about, its K/V change;
- fidelity against the plain base (``fidelity_plain_base``): the same with B the plain base,
  to which the token is plain text, as the issue defines it; the token's own effect counts
  too, so a merge that keeps the token usually scores higher here;
- preservation of M: ``||eps_M - eps_B|| / ||eps_B||`` on held-out captions (0: the base's
  predictions exactly; lower is better).

``eps`` is whatever the UNet predicts (noise, or v for v-prediction models).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..architectures import pipeline_architecture


@dataclass(frozen=True)
class Probes:
    """Fixed inputs on which models are compared.

    noisy: (n, c, h, w) noisy latents, float32 on the CPU; timesteps: (n,) integers;
    prompts: one per sample, written with the reference token names.
    """

    noisy: Tensor
    timesteps: Tensor
    prompts: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.prompts)

    def with_prompts(self, prompts: Sequence[str]) -> Probes:
        return Probes(self.noisy, self.timesteps, tuple(prompts))


def draw_probes(clean: Tensor, prompts: Sequence[str], count: int, *, scheduler,
                generator: torch.Generator) -> Probes:
    """``count`` samples: a clean latent and a prompt picked at random, a uniform timestep of
    the training schedule and Gaussian noise, mixed by ``scheduler.add_noise``."""
    num_train_timesteps = int(scheduler.config.num_train_timesteps)
    picks = torch.randint(len(clean), (count,), generator=generator)
    prompt_picks = torch.randint(len(prompts), (count,), generator=generator)
    timesteps = torch.randint(num_train_timesteps, (count,), generator=generator)
    noise = torch.randn((count, *clean.shape[1:]), generator=generator)
    noisy = scheduler.add_noise(clean[picks].float(), noise, timesteps)
    return Probes(noisy, timesteps, tuple(prompts[int(i)] for i in prompt_picks))


def training_scheduler(pipe):
    """The DDPM noise schedule the model was trained with (from its scheduler's config)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def rename_tokens(prompt: str, renames: Mapping[str, str]) -> str:
    """``prompt`` with each whole-word token of ``renames`` replaced by its new name (a token
    inside a longer word, ``<new1>cat``, is left alone: it is not that token)."""
    for old, new in renames.items():
        if old and old != new:
            prompt = re.sub(rf"(?<!\S){re.escape(old)}(?!\S)", lambda _: new, prompt)
    return prompt


class NoisePredictor:
    """The UNet's predictions for probes, with the pipeline's own text encoding.

    The context is what the pipeline feeds the UNet at inference (``encode_prompt``, padded to
    the tokenizer's length, no classifier-free guidance); SDXL also gets the pooled text
    embedding and the size/crop conditioning of an uncropped image at the default size.
    """

    def __init__(self, pipe, *, batch_size: int = 8) -> None:
        self.pipe = pipe
        self.batch_size = batch_size
        self.architecture = pipeline_architecture(pipe)

    def _encode(self, prompts: Sequence[str]) -> dict[str, tuple[Tensor, Tensor | None]]:
        """Per distinct prompt, its context (tokens, d) and pooled embedding (SDXL) or None."""
        unique = list(dict.fromkeys(prompts))
        encoded: dict[str, tuple[Tensor, Tensor | None]] = {}
        for start in range(0, len(unique), self.batch_size):
            chunk = unique[start:start + self.batch_size]
            with torch.no_grad():
                outputs = self.pipe.encode_prompt(prompt=chunk, device=self.pipe.unet.device,
                                                  num_images_per_prompt=1, do_classifier_free_guidance=False)
            context = outputs[0]
            pooled = outputs[2] if self.architecture.time_conditioning else None
            for index, prompt in enumerate(chunk):
                encoded[prompt] = (context[index], pooled[index] if pooled is not None else None)
        return encoded

    def predict(self, probes: Probes) -> Tensor:
        """(n, c, h, w) predictions for ``probes``, float32 on the CPU."""
        unet = self.pipe.unet
        encoded = self._encode(probes.prompts)
        outputs = []
        for start in range(0, len(probes), self.batch_size):
            stop = min(start + self.batch_size, len(probes))
            prompts = probes.prompts[start:stop]
            context = torch.stack([encoded[p][0] for p in prompts])
            noisy = probes.noisy[start:stop].to(unet.device, unet.dtype)
            extra = {}
            if self.architecture.time_conditioning:
                height, width = (side * int(self.pipe.vae_scale_factor) for side in noisy.shape[-2:])
                time_ids = torch.tensor([self.architecture.time_ids(height, width)], dtype=context.dtype,
                                        device=unet.device).repeat(len(prompts), 1)
                extra["added_cond_kwargs"] = {"text_embeds": torch.stack([encoded[p][1] for p in prompts]),
                                              "time_ids": time_ids}
            with torch.no_grad():
                output = unet(noisy, probes.timesteps[start:stop].to(unet.device),
                              encoder_hidden_states=context.to(unet.dtype), **extra).sample
            outputs.append(output.float().cpu())
        return torch.cat(outputs)


def fidelity(model: Tensor, concept: Tensor, base: Tensor) -> float:
    """``1 - ||model - concept|| / ||concept - base||``; NaN when the concept changes nothing."""
    change = float((concept.double() - base.double()).norm())
    if change == 0:
        return math.nan
    return 1.0 - float((model.double() - concept.double()).norm()) / change


def relative_change(model: Tensor, base: Tensor) -> float:
    """``||model - base|| / ||base||`` (the absolute norm when the base predicts zeros)."""
    difference = float((model.double() - base.double()).norm())
    scale = float(base.double().norm())
    return difference / scale if scale > 0 else difference
