"""``EvalOptions``: how cd-eval measures (probe counts, sampling, precision, device), checked once,
behind :func:`~mergekit_cd.evaluation.evaluate` and ``cd-eval`` alike, and recorded in the report."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..errors import MergeError
from ..sampling import check_seed

#: The options that count something: each a whole number >= 1.
COUNTS = ("samples", "held_out_samples", "batch_size", "sample_images", "sample_steps", "num_images", "steps")


@dataclass(frozen=True)
class EvalOptions:
    """samples / held_out_samples: noise-prediction probes per concept and of held-out captions.
    sample_images / sample_steps: reference images sampled per target prompt from each concept's
    own delta when no instance images are given. num_images / steps / guidance_scale: images per
    prompt for the CLIP / DINO and world metrics. All randomness comes from ``seed``; ``dtype`` is
    the pipeline's precision, ``cache_dir`` the text-feature cache of the merges run."""

    samples: int = 16
    held_out_samples: int = 32
    batch_size: int = 8
    seed: int = 0
    sample_images: int = 2
    sample_steps: int = 20
    num_images: int = 4
    steps: int = 50
    guidance_scale: float = 6.0
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        for name in COUNTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MergeError(f"{name.replace('_', ' ')} must be a whole number >= 1, got {value!r}.")
        check_seed(self.seed, 1, option="seed")
        if not (isinstance(self.guidance_scale, (int, float)) and math.isfinite(self.guidance_scale)
                and self.guidance_scale >= 0):  # diffusers reads nan as no guidance
            raise MergeError(f"guidance scale must be a finite number >= 0, got {self.guidance_scale!r}.")
        object.__setattr__(self, "device", torch.device(self.device))
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))

    @classmethod
    def from_fields(cls, options: EvalOptions | None, given: dict[str, Any]) -> EvalOptions:
        """``options``, or options built from keyword ``given``; both at once is one MergeError."""
        unknown = sorted(set(given) - {option.name for option in fields(cls)})
        if unknown:
            raise TypeError(f"evaluate() got unexpected keyword arguments: {', '.join(unknown)}")
        if options is not None and given:
            raise MergeError(f"Give either options= or option keywords ({', '.join(sorted(given))}), not both.")
        return options if options is not None else cls(**given)

    def check_images(self, images: int) -> None:
        """Every one of ``images`` sampled images gets a seed torch takes (``seed + index``)."""
        check_seed(self.seed, images, option="seed")

    def settings(self) -> dict[str, Any]:
        """The report's record of these options."""
        return {"seed": self.seed, "samples": self.samples, "held_out_samples": self.held_out_samples,
                "batch_size": self.batch_size, "device": str(self.device), "dtype": str(self.dtype),
                "sample_images": self.sample_images, "sample_steps": self.sample_steps,
                "num_images": self.num_images, "steps": self.steps, "guidance_scale": self.guidance_scale}
