"""What a training run holds, as data: :class:`TrainingState` (made once by :func:`.setup.setup`,
frozen) and :class:`Progress` (the loop's own record, the one mutable part).

This module imports nothing of the trainer but its data types, so the setup, the step, the
loop and the output writer all read these types without importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..architectures import Architecture
from ..base import BaseModel
from .config import TrainingConfig
from .data import InstanceSet
from .embeddings import NewTokenEmbedding
from .priors import ClassImages

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass(frozen=True)
class Models:
    """The base pipeline as set up for training: frozen parts in their dtypes, the start-token
    detaching processors installed (``original_processors`` are put back when training ends)."""

    pipe: Any
    architecture: Architecture
    tokenizers: tuple[Any, ...]  # in the architecture's order, the new tokens added
    encoders: tuple[Any, ...]
    noise_scheduler: Any  # DDPM, from the pipeline's scheduler config
    vae_dtype: torch.dtype
    unet_dtype: torch.dtype
    original_processors: dict[str, Any]


@dataclass(frozen=True)
class Trainables:
    """What trains: the chosen projections of every cross-attention layer and the new token rows."""

    layers: tuple[str, ...]  # the cross-attention layers, in module order
    base_weights: dict[str, Tensor]  # the projections as loaded, float32 on the CPU: the delta is against these
    named: tuple[tuple[str, nn.Parameter], ...]  # (name, parameter): the projections, then each encoder's rows
    wrappers: tuple[NewTokenEmbedding, ...]  # one per text encoder, holding the new rows

    @property
    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters, in the order of ``named`` (the optimizer's and the checkpoint's)."""
        return [parameter for _, parameter in self.named]


@dataclass(frozen=True)
class ClassFeatures:
    """The class images' latent distributions and their captions' text features, computed once."""

    latent_mean: Tensor
    latent_std: Tensor
    rows: dict[str, int]  # caption -> its row of context and pooled
    context: Tensor
    pooled: Tensor | None  # SDXL's pooled text embedding


@dataclass(frozen=True)
class ClassData:
    """Prior preservation's class images: per concept, every caption, and either the cached
    features or (``cache=False``) the pixels, encoded again every step."""

    sets: tuple[ClassImages, ...]
    captions: tuple[str, ...]  # of every class image, concept by concept
    features: ClassFeatures | None
    pixels: Tensor | None  # uint8 (n, 3, H, W) on the CPU, without the cache


@dataclass(frozen=True)
class Start:
    """Where the loop begins: step 0, or a checkpoint's step with its losses so far."""

    step: int = 0
    losses: tuple[float, ...] = ()
    resumed_from: Path | None = None


@dataclass(frozen=True)
class TrainingState:
    """Everything the loop needs, as :func:`.setup.setup` leaves it (the tensors inside train;
    which tensors they are does not change)."""

    config: TrainingConfig
    accelerator: Accelerator
    base: BaseModel  # its name, fingerprint and architecture; the diffusers layout is written against it
    models: Models
    weights: Trainables
    optimizer: torch.optim.Optimizer
    instances: InstanceSet
    prior: ClassData | None  # None without prior preservation
    resolution: int
    learning_rate: float  # as scaled (--scale-lr)
    fields: dict[str, Any]  # the recipe a resume must match (see :func:`.config.resume_fields`)
    start: Start


@dataclass
class Progress:
    """How far a run is: what it is doing (for the out-of-memory message), the steps done and their losses."""

    phase: str = "setup"
    step: int = 0
    losses: list[float] = field(default_factory=list)
    batch: str = ""  # while training: "batch size 8, resolution 512"

    def where(self) -> str:
        """`` at step 12 (batch size 8, resolution 512)`` while training, else `` while <phase>``."""
        if self.phase == "training":
            return f" at step {self.step + 1} ({self.batch})"
        return f" while {self.phase}"
