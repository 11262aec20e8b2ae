"""The training run: :func:`run` sets up (:func:`.setup.setup`), loops (:func:`train`), checkpoints
and writes the delta.

The loop takes :func:`.step.loss` of each step, averages the gradients of the trainable set
across processes (one all-reduce per step), clips, steps the optimizer, saves checkpoints and
validation images, and stops cleanly (a resumable checkpoint) on Ctrl-C or when the
``on_step`` callback asks. A run resumed from a checkpoint takes exactly the steps an
uninterrupted run takes (see :mod:`.step`).

Devices, several processes and mixed precision go through ``accelerate``: run
``accelerate launch -m mergekit_cd.train ...`` for several GPUs.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import MergeError
from . import attention, checkpoint, embeddings, output
from .config import TrainingConfig, check_config
from .setup import setup
from .state import Progress, TrainingState
from .step import loss

#: Called after every step with (step number, loss); returning True stops the run as Ctrl-C does.
StepCallback = Callable[[int, float], Any]


@dataclass
class TrainingResult:
    """What :func:`mergekit_cd.train` made and how the run went.

    losses: every step's loss (the steps of earlier sessions too, when resumed).
    steps_per_second: of this session's steps (setup and caching excluded).
    peak_memory_bytes: the accelerator's peak allocation (CUDA only, else None).
    pipeline: the trained pipeline (tokens installed, weights trained) when asked for.
    """

    delta: Any
    output: Path
    native: Path | None
    diffusers: Path | None
    losses: list[float]
    steps: int
    steps_this_session: int
    seconds: float
    steps_per_second: float
    peak_memory_bytes: int | None
    resumed_from: Path | None = None
    pipeline: Any = None


class TrainingInterrupted(KeyboardInterrupt):
    """The run stopped early (Ctrl-C or a callback) after saving a resumable checkpoint."""

    def __init__(self, step: int, checkpoint_folder: Path) -> None:
        super().__init__(f"interrupted after step {step}; checkpoint saved to {checkpoint_folder}; "
                         f"continue with --resume {checkpoint_folder}")
        self.step = step
        self.checkpoint = checkpoint_folder


OOM_HINT = ("Out of memory{where}. Try a smaller --batch-size (with --scale-lr the learning rate follows "
            "it), --gradient-checkpointing, --mixed-precision fp16 (or bf16), or a smaller --resolution.")


def run(config: TrainingConfig, *, on_step: StepCallback | None = None,
        return_pipeline: bool = False) -> TrainingResult:
    """Train the concepts of ``config`` and write the delta; see :func:`mergekit_cd.train.train`."""
    config = check_config(config)
    progress = Progress()
    try:
        state = setup(config, progress)
        return train(state, progress, on_step=on_step, return_pipeline=return_pipeline)
    except torch.OutOfMemoryError:
        raise MergeError(OOM_HINT.format(where=progress.where())) from None
    except RuntimeError as error:
        if "can't allocate memory" in str(error) or "out of memory" in str(error).lower():
            raise MergeError(OOM_HINT.format(where=progress.where())) from None
        raise


@contextmanager
def interrupt_requests() -> Any:
    """A flag set by the first Ctrl-C (the step finishes, a checkpoint is saved); a second
    Ctrl-C interrupts at once. Outside the main thread Ctrl-C is left as it is."""
    flag = {"set": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["set"]:
            raise KeyboardInterrupt
        flag["set"] = True
        tqdm.write("stopping after this step to save a checkpoint (Ctrl-C again to stop at once)",
                   file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def train(state: TrainingState, progress: Progress | None = None, *, on_step: StepCallback | None = None,
          return_pipeline: bool = False) -> TrainingResult:
    """Take the steps from ``state.start`` to --steps, then write the delta (main process) and
    return what the run made; ``progress`` records where it is (a fresh one when not given)."""
    config, accelerator = state.config, state.accelerator
    if progress is None:
        progress = Progress()
    progress.step, progress.losses = state.start.step, list(state.start.losses)
    device = accelerator.device
    cuda = torch.cuda.is_available() and device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    progress.batch = f"batch size {config.batch_size}, resolution {state.resolution}"
    progress.phase = "training"
    started = time.perf_counter()
    bar = tqdm(total=config.total_steps, initial=state.start.step, desc="training", unit="step",
               disable=not (config.progress and accelerator.is_main_process), dynamic_ncols=True)
    with interrupt_requests() as interrupt, bar:
        while progress.step < config.total_steps:
            value = training_step(state, progress.step)
            progress.losses.append(value)
            progress.step += 1
            bar.set_postfix(loss=f"{value:.4f}")
            bar.update(1)
            stop = bool(on_step(progress.step, value)) if on_step else False
            _after_step(state, progress, _any_process(state, stop or interrupt["set"]))
    seconds = time.perf_counter() - started
    progress.phase = "writing the delta"
    done = progress.step - state.start.step
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    delta, native, diffusers_folder = _finish(state, progress)
    return TrainingResult(
        delta=delta, output=Path(config.output), native=native, diffusers=diffusers_folder,
        losses=list(progress.losses), steps=progress.step, steps_this_session=done, seconds=seconds,
        steps_per_second=done / seconds if seconds > 0 else float("nan"), peak_memory_bytes=peak,
        resumed_from=state.start.resumed_from, pipeline=state.models.pipe if return_pipeline else None)


def training_step(state: TrainingState, step: int) -> float:
    """Step ``step``: the loss, its gradients (averaged across processes, clipped), one optimizer
    step; returns the loss averaged across processes."""
    config, accelerator = state.config, state.accelerator
    value = loss(state, step)
    if not torch.isfinite(value):
        raise MergeError(f"The loss became {value.item()} at step {step + 1}; lower --lr, or "
                         f"use bf16 instead of fp16 (--mixed-precision).")
    accelerator.backward(value)
    _average_gradients(state)
    if config.max_grad_norm:
        accelerator.clip_grad_norm_(state.weights.parameters, config.max_grad_norm)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    return float(accelerator.reduce(value.detach(), reduction="mean"))


def _after_step(state: TrainingState, progress: Progress, stop: bool) -> None:
    """After a step: stop with a checkpoint when asked, save one every --checkpoint-every steps,
    sample the validation prompts every --validation-every steps and at the end."""
    config, step, total = state.config, progress.step, state.config.total_steps
    if stop and step < total:
        raise TrainingInterrupted(step, save_checkpoint(state, progress))
    if step % config.checkpoint_every == 0 and step < total:
        save_checkpoint(state, progress)
    if config.validation_prompts and (step % config.validation_every == 0 or step == total):
        validate(state, step)


def _finish(state: TrainingState, progress: Progress) -> tuple[Any, Path | None, Path | None]:
    """Put the pipeline back as diffusers loads it (its own processors, eval mode, plain token
    tables) and write the delta; returns (delta, native file, diffusers folder; None off the main process)."""
    pipe = state.models.pipe
    attention.restore(pipe.unet, state.models.original_processors)
    pipe.unet.eval()  # the returned pipeline samples, it does not train
    delta = output.build_delta(state, progress)
    native = diffusers_folder = None
    if state.accelerator.is_main_process:
        native, diffusers_folder = output.write(state.config.output, delta, base=state.base,
                                                trainables=state.weights.named)
    state.accelerator.wait_for_everyone()
    embeddings.finish(state.models.encoders, state.weights.wrappers)
    return delta, native, diffusers_folder


def _average_gradients(state: TrainingState) -> None:
    """Average the trainable gradients across processes in one all-reduce (nothing with one process)."""
    accelerator = state.accelerator
    if accelerator.num_processes == 1:
        return
    parameters = state.weights.parameters
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() for p in parameters])
    flat = accelerator.reduce(flat, reduction="mean")
    offset = 0
    for p in parameters:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def _any_process(state: TrainingState, flag: bool) -> bool:
    """Whether ``flag`` is set on any process (each process stops at the same step)."""
    accelerator = state.accelerator
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def save_checkpoint(state: TrainingState, progress: Progress) -> Path:
    """Write a checkpoint of the state after ``progress.step`` steps (all processes take part)."""
    config, accelerator, step = state.config, state.accelerator, progress.step
    root = Path(config.output) / "checkpoints"
    final = checkpoint.folder_for(root, step)
    if accelerator.is_main_process:
        checkpoint.save(root, step, {
            "step": step, "tokens": [c.token for c in config.concepts],
            "base_fingerprint": state.base.fingerprint, "fields": state.fields,
            "trainables": {name: p.detach().to("cpu", copy=True) for name, p in state.weights.named},
            "optimizer": state.optimizer.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "losses": list(progress.losses), "config": config.to_json()}, config.keep_checkpoints)
    accelerator.wait_for_everyone()
    return final


def validate(state: TrainingState, step: int) -> Path | None:
    """Sample the validation prompts with the weights as they are after ``step`` steps (main process only)."""
    if not state.accelerator.is_main_process:
        return None
    from ..fileio import atomic_path
    from ..sampling import image_grid, sample

    config, pipe = state.config, state.models.pipe
    folder = Path(config.output) / "validation"
    folder.mkdir(exist_ok=True)
    pipe.unet.eval()
    try:
        with torch.no_grad(), state.accelerator.autocast():
            images = sample(pipe, list(config.validation_prompts), num_images=config.num_validation_images,
                            seed=config.seed, steps=config.validation_sampling_steps,
                            height=state.resolution, width=state.resolution)
    finally:
        pipe.unet.train()
    path = folder / f"step-{step:06d}.png"
    with atomic_path(path, force=True) as temporary:
        image_grid(images, config.num_validation_images).save(temporary, format="PNG")
    return path
