"""The training run: set up the base pipeline for Custom Diffusion, loop, checkpoint, write the delta.

One :class:`Session` per run. Setup freezes everything but the cross-attention K/V (and
optionally Q/out) weights and the new token rows, puts the start-token-detaching processor on
every cross-attention layer, and computes the class images' latent distributions and the text
features of the prompts without trainable tokens once (``cache=False`` is the plain way:
both again every step, kept for benchmarks). Each step then draws its instance images,
augmentation, class images, noise and timesteps as functions of (seed, process, step), so a
run resumed from a checkpoint takes exactly the steps an uninterrupted run takes (nothing in a
step draws from torch's global generators: the models' dropout rates are 0; a test checks).

Devices, several processes and mixed precision go through ``accelerate``: run
``accelerate launch -m mergekit_cd.train ...`` for several GPUs. Gradients of the
trainable set are averaged across processes with one all-reduce per step.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..base import open_base
from ..devices import parse_device
from ..errors import MergeError
from ..feature_cache import default_cache_dir
from . import attention, checkpoint, data, embeddings, output, priors
from .config import TrainingConfig, check_config, compare_fields, resume_fields

if TYPE_CHECKING:
    from accelerate import Accelerator

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
    session = Session(config, on_step)
    try:
        session.setup()
        return session.train(return_pipeline=return_pipeline)
    except torch.OutOfMemoryError:
        raise MergeError(OOM_HINT.format(where=session.where())) from None
    except RuntimeError as error:
        if "can't allocate memory" in str(error) or "out of memory" in str(error).lower():
            raise MergeError(OOM_HINT.format(where=session.where())) from None
        raise


def make_accelerator(config: TrainingConfig) -> Accelerator:
    """An ``accelerate.Accelerator`` for the run (state of an earlier run in this process reset).

    ``config.device``: None or "auto" leaves the choice to accelerate (its config, ``accelerate
    launch``); otherwise the device as the other commands read ``--device``: cpu, cuda (the
    current GPU) or cuda:N (that GPU), and a device this machine lacks is an error, not a
    fallback. A numbered GPU is for one process: under ``accelerate launch`` every process
    takes its own.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    chosen = None if config.device in (None, "auto") else parse_device(config.device, types=("cpu", "cuda"))
    if PartialState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)  # a previous run in this process
    elif AcceleratorState._shared_state:
        AcceleratorState._reset_state()
    pinned = chosen is not None and chosen.type == "cuda" and chosen.index is not None
    saved = os.environ.get("ACCELERATE_TORCH_DEVICE")
    if pinned:  # accelerate's own way to name the device of a single process
        os.environ["ACCELERATE_TORCH_DEVICE"] = str(chosen)
    try:
        accelerator = Accelerator(mixed_precision=config.mixed_precision,
                                  cpu=chosen is not None and chosen.type == "cpu")
    except (ValueError, RuntimeError) as error:
        raise MergeError(f"Cannot set up training with --mixed-precision {config.mixed_precision}: "
                         f"{str(error).strip().splitlines()[0]}") from None
    finally:
        if pinned:
            if saved is None:
                os.environ.pop("ACCELERATE_TORCH_DEVICE", None)
            else:
                os.environ["ACCELERATE_TORCH_DEVICE"] = saved
    if pinned and accelerator.num_processes > 1:
        raise MergeError(f"--device {config.device} names one GPU, but accelerate runs "
                         f"{accelerator.num_processes} processes, each on its own GPU; leave --device out "
                         f"(or give cuda) under accelerate launch.")
    if chosen is not None and accelerator.device.type != chosen.type:
        raise MergeError(f"--device {config.device}: accelerate's configuration chose {accelerator.device} "
                         f"instead; check `accelerate config` or leave --device out.")
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise MergeError("--mixed-precision fp16 needs a GPU; on the CPU use bf16 or no.")
    return accelerator


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


class Session:
    """Everything one training run holds; :meth:`setup` then :meth:`train`."""

    def __init__(self, config: TrainingConfig, on_step: StepCallback | None) -> None:
        self.config = config
        self.on_step = on_step
        self.step = 0
        self.phase = "setup"

    def where(self) -> str:
        if self.phase == "training":
            return (f" at step {self.step + 1} (batch size {self.config.batch_size}, "
                    f"resolution {self.resolution})")
        return f" while {self.phase}"

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        config = self.config
        self.accelerator = make_accelerator(config)
        self.main = self.accelerator.is_main_process
        self.rank = self.accelerator.process_index
        self.device = self.accelerator.device
        output.check(config)
        self.images = data.read_instance_images([c.instance_dir for c in config.concepts])
        self.real_class_images = {  # {concept index: its --reg-dir images}, every one readable
            index: priors.read_reg_dir(concept.reg_dir, concept.filled_class_prompt(), config.num_class_images)
            for index, concept in enumerate(config.concepts) if config.prior and concept.reg_dir is not None}
        self.phase = "opening the base model"
        self.base = open_base(config.base)
        self.fingerprint = self.base.fingerprint
        self.architecture = self.base.architecture
        self.phase = "loading the base pipeline"
        from ..sampling import load_pipeline

        pipe = load_pipeline(config.base, device="cpu")
        if getattr(pipe, "safety_checker", None) is not None:
            pipe.safety_checker = None  # not needed for training; it would blank some class images
        self.pipe = pipe
        self.resolution = self._resolution()
        self.factor = pipe.vae_scale_factor
        self.tokenizers = [getattr(pipe, name) for name in self.architecture.tokenizers]
        self.encoders = [getattr(pipe, name) for name in self.architecture.text_encoders]
        self.tokens = [c.token for c in config.concepts]
        self.wrappers = embeddings.add_tokens(self.tokenizers, self.encoders, self.tokens,
                                              [config.init_token(i) for i in range(len(config.concepts))])
        self.instances = data.instance_set(self.images, [c.filled_instance_prompt() for c in config.concepts],
                                           self.resolution)
        self.layers = attention.cross_attention_layers(pipe.unet)
        self._freeze_and_cast()
        self.processes = self.accelerator.num_processes
        self.learning_rate = config.learning_rate * (config.batch_size * self.processes if config.scale_lr else 1)
        self.fields = resume_fields(config, resolution=self.resolution, mixed_precision=self.mixed_precision,
                                    processes=self.processes)
        checkpoint_state = None
        if config.resume is not None:  # refuse a checkpoint of another run before any work
            self.phase = "reading the checkpoint"
            checkpoint_state = self._read_checkpoint()
        if self.main:
            output.prepare(config)
        self.accelerator.wait_for_everyone()
        self.phase = "preparing class images"
        self.class_images = self._class_images() if config.prior else None
        self.original_processors = attention.install(pipe.unet)
        if config.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        optimizer = torch.optim.AdamW([p for _, p in self.trainables], lr=self.learning_rate,
                                      betas=config.adam_betas, weight_decay=config.weight_decay,
                                      eps=config.adam_epsilon)
        self.losses: list[float] = []
        self.resumed_from = None
        if checkpoint_state is not None:
            self._resume(checkpoint_state, optimizer)
        self.optimizer = self.accelerator.prepare(optimizer)
        self.phase = "caching class latents and text features"
        self._cache()

    def _resolution(self) -> int:
        unet, vae_factor = self.pipe.unet, self.pipe.vae_scale_factor
        native = unet.config.sample_size * vae_factor
        resolution = self.config.resolution or native
        multiple = vae_factor * 2 ** (len(unet.config.block_out_channels) - 1)
        if resolution % multiple:
            lower = max(multiple, resolution // multiple * multiple)
            raise MergeError(f"--resolution {resolution} does not fit {self.base.name}: it must be a multiple "
                             f"of {multiple} (the VAE shrinks images {vae_factor} times and the UNet halves "
                             f"them {len(unet.config.block_out_channels) - 1} more times); e.g. {lower} or "
                             f"{lower + multiple}. The model's own resolution is {native}.")
        return resolution

    def _freeze_and_cast(self) -> None:
        """Only the chosen projections of attn2 and the new token rows train; frozen parts may
        run in the mixed-precision dtype, trainable ones stay float32."""
        pipe, config = self.pipe, self.config
        self.mixed_precision = self.accelerator.mixed_precision
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.mixed_precision, torch.float32)
        for module in (pipe.unet, pipe.vae, *self.encoders):
            module.requires_grad_(False)
        vae_dtype = torch.float32 if self.mixed_precision == "fp16" and self.architecture.vae_float32_under_fp16 \
            else weight_dtype
        projections = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}
        children = [f"{layer}.{projections[part]}" for layer in self.layers for part in config.train]
        # the base weights as loaded (float32), before any cast: the delta is taken against these
        self.base_weights: dict[str, Tensor] = {
            f"{child}.{name}": parameter.detach().to("cpu", torch.float32, copy=True)
            for child in children for name, parameter in pipe.unet.get_submodule(child).named_parameters()}
        for module, dtype in ((pipe.vae, vae_dtype), (pipe.unet, weight_dtype)):
            module.to(self.device)
            if dtype != torch.float32:
                module.to(dtype)
        for encoder in self.encoders:  # float32 (the new rows' gradient flows through them); autocast runs them
            encoder.to(self.device)
        self.trainables: list[tuple[str, torch.nn.Parameter]] = []
        for child_name in children:
            child = pipe.unet.get_submodule(child_name).to(torch.float32)
            for parameter_name, parameter in child.named_parameters():
                name = f"{child_name}.{parameter_name}"
                with torch.no_grad():
                    parameter.copy_(self.base_weights[name])  # exact, not float32(half(weight))
                parameter.requires_grad_(True)
                self.trainables.append((name, parameter))
        for index, wrapper in enumerate(self.wrappers):
            wrapper.rows.requires_grad_(True)
            self.trainables.append((f"{self.architecture.text_encoders[index]}.new_token_rows", wrapper.rows))
        self.vae_dtype, self.unet_dtype = vae_dtype, weight_dtype
        pipe.unet.train()

    def _class_images(self) -> list[priors.ClassImages]:
        config = self.config
        root = Path(config.class_cache_dir) if config.class_cache_dir else default_cache_dir()
        sets = []
        for index, concept in enumerate(config.concepts):
            if index in self.real_class_images:
                sets.append(self.real_class_images[index])
                continue
            prompt = concept.filled_class_prompt()
            folder = priors.cache_folder(root, self.fingerprint, prompt, self.resolution,
                                         config.class_sampling_steps, config.class_guidance_scale)
            if self.main:
                priors.generate_class_images(self.pipe, prompt, config.num_class_images, folder,
                                             resolution=self.resolution, steps=config.class_sampling_steps,
                                             guidance_scale=config.class_guidance_scale,
                                             autocast=self.accelerator.autocast, progress=config.progress)
            self.accelerator.wait_for_everyone()  # the others read what the main process generated
            sets.append(priors.generated_class_images(folder, prompt, config.num_class_images))
        return sets

    def _read_checkpoint(self) -> dict:
        """The state of ``--resume``'s checkpoint, refused unless it is this run's: same base,
        same trainable weights and tokens, and the same recipe (only the step count may differ)."""
        config = self.config
        folder = checkpoint.resolve(config.resume, config.output)
        state = checkpoint.read(folder)
        if state.get("base_fingerprint") != self.fingerprint:
            raise MergeError(f"Checkpoint {folder} was trained on another base model than {config.base}.")
        differences = compare_fields(self.fields, state.get("fields", {}))
        if differences:
            raise MergeError(f"Checkpoint {folder} belongs to a run with other options, so resuming would not "
                             f"continue it: {'; '.join(differences)}. Resume with the options the run was "
                             f"started with (only --steps may change, e.g. raised to train longer), or start "
                             f"a new run (another -o, or --force).")
        saved = state.get("trainables", {})
        if sorted(saved) != sorted(name for name, _ in self.trainables):
            raise MergeError(f"Checkpoint {folder} trained other weights than this run would (e.g. another "
                             f"--train or base); resume with the options it was started with.")
        for name, parameter in self.trainables:
            if saved[name].shape != parameter.shape:
                raise MergeError(f"Checkpoint {folder}: {name} has shape {tuple(saved[name].shape)}, the "
                                 f"model's is {tuple(parameter.shape)}.")
        if int(state["step"]) > config.total_steps:
            raise MergeError(f"Checkpoint {folder} is at step {state['step']}, past --steps {config.total_steps}.")
        state["folder"] = folder
        return state

    def _resume(self, state: dict, optimizer: torch.optim.Optimizer) -> None:
        """Continue from a checkpoint read (and checked) by :meth:`_read_checkpoint`."""
        saved = state["trainables"]
        with torch.no_grad():
            for name, parameter in self.trainables:
                parameter.copy_(saved[name])
        optimizer.load_state_dict(state["optimizer"])  # its lr is this run's: --lr, --batch-size were checked
        self.scaler_state = state.get("scaler")
        self.step = int(state["step"])
        self.losses = [float(x) for x in state.get("losses", [])]
        self.resumed_from = state["folder"]

    # ------------------------------------------------------------------ caches
    def _class_pixels(self) -> Tensor:
        """Every class image, square at the training size, as uint8 (n, 3, H, W) on the CPU."""
        pixels = [data.to_uint8(data.square(data.load_image(path), self.resolution))
                  for class_set in self.class_images for path in class_set.paths]
        return torch.stack(pixels)

    def _cache(self) -> None:
        if not self.config.prior:
            return
        self.class_captions = [c for class_set in self.class_images for c in class_set.captions]
        self.class_pixel_cache = self._class_pixels()
        if not self.config.cache:
            return
        means, stds = [], []
        starts = range(0, len(self.class_pixel_cache), self.config.batch_size)
        with torch.no_grad():
            for start in tqdm(starts, desc="class latents", unit="batch", dynamic_ncols=True,
                              disable=not (self.config.progress and self.main)):
                chunk = self.class_pixel_cache[start:start + self.config.batch_size]
                mean, std = self._latent_distribution(data.to_unit_range(chunk))
                means.append(mean)
                stds.append(std)
        self.class_latent_mean, self.class_latent_std = torch.cat(means), torch.cat(stds)
        self.class_pixel_cache = None
        distinct = list(dict.fromkeys(self.class_captions))
        self.caption_index = {caption: i for i, caption in enumerate(distinct)}
        contexts, pooled = [], []
        with torch.no_grad():
            for start in range(0, len(distinct), 64):
                context, pool = self._encode(distinct[start:start + 64])
                contexts.append(context)
                pooled.append(pool)
        self.class_context = torch.cat(contexts)
        self.class_pooled = torch.cat(pooled) if pooled[0] is not None else None

    def _latent_distribution(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation of the VAE's latent distribution of pixels in [-1, 1].

        Outside autocast: the VAE runs in its own dtype (float32 for SDXL under fp16, whose VAE
        overflows in half precision)."""
        distribution = self.pipe.vae.encode(pixels.to(self.device, self.vae_dtype)).latent_dist
        return distribution.mean.float(), distribution.std.float()

    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor | None]:
        """Cross-attention context (B, 77, d) and, for SDXL, the pooled text embedding."""
        states, pooled = [], None
        penultimate = self.architecture.hidden_state is not None
        with self.accelerator.autocast():
            for tokenizer, encoder in zip(self.tokenizers, self.encoders):
                ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids.to(self.device)
                out = encoder(ids, output_hidden_states=penultimate)
                states.append(out.hidden_states[self.architecture.hidden_state] if penultimate else out[0])
                if penultimate and out[0].ndim == 2:
                    pooled = out[0]
        return torch.cat([s.float() for s in states], dim=-1), (pooled.float() if pooled is not None else None)

    # ------------------------------------------------------------------ one step
    def loss(self, step: int) -> Tensor:
        """The training objective of step ``step``: instance loss + weight x prior loss."""
        instance, prior = self.loss_terms(step)
        return instance if prior is None else instance + self.config.prior_loss_weight * prior

    def loss_terms(self, step: int) -> tuple[Tensor, Tensor | None]:
        """(masked instance loss, class-image loss or None) of step ``step``'s draws."""
        config = self.config
        generator = data.torch_generator(config.seed, self.rank, step)
        batch = self.instances.batch(seed=config.seed, process=self.rank, step=step,
                                     batch_size=config.batch_size, size=self.resolution, factor=self.factor,
                                     augment_images=config.augment, hflip=config.hflip)
        with torch.no_grad():
            mean, std = self._latent_distribution(batch.pixels)
        means, stds = [mean], [std]
        context, pooled = self._encode(batch.prompts)
        contexts, pooled_list = [context], [pooled]
        if config.prior:
            indices = data.shuffled_indices(config.seed, self.rank, data.CLASS_ORDER, step, config.batch_size,
                                            len(self.class_captions))
            captions = [self.class_captions[i] for i in indices]
            if config.cache:
                means.append(self.class_latent_mean[indices])
                stds.append(self.class_latent_std[indices])
                rows = [self.caption_index[c] for c in captions]
                contexts.append(self.class_context[rows])
                pooled_list.append(self.class_pooled[rows] if self.class_pooled is not None else None)
            else:
                with torch.no_grad():
                    class_mean, class_std = self._latent_distribution(
                        data.to_unit_range(self.class_pixel_cache[indices]))
                    class_context, class_pooled = self._encode(captions)
                means.append(class_mean)
                stds.append(class_std)
                contexts.append(class_context)
                pooled_list.append(class_pooled)
        mean, std = torch.cat(means), torch.cat(stds)
        sample = torch.randn(mean.shape, generator=generator).to(self.device)
        latents = (mean + std * sample)
        vae_config = self.pipe.vae.config
        if getattr(vae_config, "shift_factor", None) is not None:
            latents = latents - vae_config.shift_factor
        latents = latents * vae_config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=generator).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        added = None
        if self.architecture.time_conditioning:
            size = self.resolution
            time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32, device=self.device)
            added = {"text_embeds": torch.cat(pooled_list), "time_ids": time_ids.repeat(latents.shape[0], 1)}
        with self.accelerator.autocast():
            prediction = self.pipe.unet(noisy.to(self.unet_dtype), timesteps, torch.cat(contexts),
                                        added_cond_kwargs=added).sample.float()
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        count = config.batch_size
        mask = batch.masks.to(self.device)
        # As both public scripts compute it: summed over channels, averaged over the pixels in the mask.
        instance_error = F.mse_loss(prediction[:count], target[:count], reduction="none")
        instance = ((instance_error * mask).sum((1, 2, 3)) / mask.sum((1, 2, 3)).clamp(min=1.0)).mean()
        prior = F.mse_loss(prediction[count:], target[count:]) if config.prior else None
        return instance, prior

    def _average_gradients(self) -> None:
        if self.accelerator.num_processes == 1:
            return
        parameters = [p for _, p in self.trainables]
        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.flatten() for p in parameters])
        flat = self.accelerator.reduce(flat, reduction="mean")
        offset = 0
        for p in parameters:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    # ------------------------------------------------------------------ the loop
    def train(self, *, return_pipeline: bool = False) -> TrainingResult:
        config = self.config
        accelerator = self.accelerator
        if getattr(self, "scaler_state", None) and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(self.scaler_state)
        total = config.total_steps
        parameters = [p for _, p in self.trainables]
        first_step = self.step
        if torch.cuda.is_available() and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.phase = "training"
        started = time.perf_counter()
        bar = tqdm(total=total, initial=first_step, desc="training", unit="step",
                   disable=not (config.progress and self.main), dynamic_ncols=True)
        with interrupt_requests() as interrupt, bar:
            while self.step < total:
                loss = self.loss(self.step)
                if not torch.isfinite(loss):
                    raise MergeError(f"The loss became {loss.item()} at step {self.step + 1}; lower --lr, or "
                                     f"use bf16 instead of fp16 (--mixed-precision).")
                accelerator.backward(loss)
                self._average_gradients()
                if config.max_grad_norm:
                    accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                value = float(accelerator.reduce(loss.detach(), reduction="mean"))
                self.losses.append(value)
                self.step += 1
                bar.set_postfix(loss=f"{value:.4f}")
                bar.update(1)
                stop = bool(self.on_step(self.step, value)) if self.on_step else False
                stop = self._any_process(stop or interrupt["set"])
                if stop and self.step < total:
                    folder = self.save_checkpoint()
                    raise TrainingInterrupted(self.step, folder)
                if self.step % config.checkpoint_every == 0 and self.step < total:
                    self.save_checkpoint()
                if config.validation_prompts and (self.step % config.validation_every == 0 or self.step == total):
                    self.validate()
        seconds = time.perf_counter() - started
        self.phase = "writing the delta"
        done = self.step - first_step
        peak = (torch.cuda.max_memory_allocated(self.device)
                if torch.cuda.is_available() and self.device.type == "cuda" else None)
        attention.restore(self.pipe.unet, self.original_processors)
        self.pipe.unet.eval()  # as diffusers loads it: the returned pipeline samples, it does not train
        delta = output.build_delta(self)
        native = diffusers_folder = None
        if self.main:
            native, diffusers_folder = output.write(self, delta)
        accelerator.wait_for_everyone()
        embeddings.finish(self.encoders, self.wrappers)
        return TrainingResult(
            delta=delta, output=Path(config.output), native=native, diffusers=diffusers_folder,
            losses=list(self.losses), steps=self.step, steps_this_session=done, seconds=seconds,
            steps_per_second=done / seconds if seconds > 0 else float("nan"), peak_memory_bytes=peak,
            resumed_from=self.resumed_from, pipeline=self.pipe if return_pipeline else None)

    def _any_process(self, flag: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() > 0)

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the state after ``self.step`` steps (all processes take part)."""
        accelerator = self.accelerator
        root = Path(self.config.output) / "checkpoints"
        final = checkpoint.folder_for(root, self.step)
        if self.main:
            checkpoint.save(root, self.step, {
                "step": self.step, "tokens": self.tokens, "base_fingerprint": self.fingerprint,
                "fields": self.fields,
                "trainables": {name: p.detach().to("cpu", copy=True) for name, p in self.trainables},
                "optimizer": self.optimizer.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "losses": list(self.losses), "config": self.config.to_json()}, self.config.keep_checkpoints)
        accelerator.wait_for_everyone()
        return final

    def validate(self) -> Path | None:
        """Sample the validation prompts with the weights as they are now (main process only)."""
        if not self.main:
            return None
        from ..fileio import atomic_path
        from ..sampling import image_grid, sample

        config = self.config
        folder = Path(config.output) / "validation"
        folder.mkdir(exist_ok=True)
        self.pipe.unet.eval()
        try:
            with torch.no_grad(), self.accelerator.autocast():
                images = sample(self.pipe, list(config.validation_prompts), num_images=config.num_validation_images,
                                seed=config.seed, steps=config.validation_sampling_steps,
                                height=self.resolution, width=self.resolution)
        finally:
            self.pipe.unet.train()
        path = folder / f"step-{self.step:06d}.png"
        with atomic_path(path, force=True) as temporary:
            image_grid(images, config.num_validation_images).save(temporary, format="PNG")
        return path
