"""Set a run up: check its inputs, load the base pipeline for Custom Diffusion, return its
:class:`~.state.TrainingState`.

Setup freezes everything but the cross-attention K/V (and optionally Q/out) weights and the
new token rows, puts the start-token-detaching processor on every cross-attention layer, and
computes the class images' latent distributions and the text features of the prompts without
trainable tokens once (``cache=False`` is the plain way: both again every step, kept for
benchmarks). Everything a user can get wrong (the output folder, the images, a checkpoint of
another run) is refused before the slow parts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..base import BaseModel, open_base
from ..devices import parse_device
from ..errors import MergeError
from ..feature_cache import default_cache_dir
from . import attention, checkpoint, data, embeddings, output, priors
from .config import PROJECTION_MODULES, TrainingConfig, compare_fields, resume_fields
from .embeddings import NewTokenEmbedding
from .state import ClassData, ClassFeatures, Models, Progress, Start, Trainables, TrainingState
from .step import encode, latent_distribution

if TYPE_CHECKING:
    from accelerate import Accelerator

def setup(config: TrainingConfig, progress: Progress | None = None) -> TrainingState:
    """Everything the loop needs for ``config`` (checked by :func:`.config.check_config`);
    ``progress.phase`` says what it is doing, for the out-of-memory message."""
    if progress is None:
        progress = Progress()
    accelerator = make_accelerator(config)
    images, real_class_images = _read_inputs(config)
    progress.phase = "opening the base model"
    base = open_base(config.base)
    progress.phase = "loading the base pipeline"
    pipe = _load_pipeline(config.base)
    resolution = _resolution(config, base, pipe)
    architecture = base.architecture
    tokenizers = tuple(getattr(pipe, name) for name in architecture.tokenizers)
    encoders = tuple(getattr(pipe, name) for name in architecture.text_encoders)
    wrappers = embeddings.add_tokens(tokenizers, encoders, [c.token for c in config.concepts],
                                     [config.init_token(i) for i in range(len(config.concepts))])
    instances = data.instance_set(images, [c.filled_instance_prompt() for c in config.concepts], resolution)
    vae_dtype, unet_dtype = _dtypes(accelerator.mixed_precision, base)
    weights = _freeze_and_cast(config, pipe, encoders, tuple(wrappers), base, accelerator.device,
                               vae_dtype, unet_dtype)
    processes = accelerator.num_processes
    learning_rate = config.learning_rate * (config.batch_size * processes if config.scale_lr else 1)
    fields = resume_fields(config, resolution=resolution, mixed_precision=accelerator.mixed_precision,
                           processes=processes)
    saved = None
    if config.resume is not None:  # refuse a checkpoint of another run before any work
        progress.phase = "reading the checkpoint"
        saved = _read_checkpoint(config, base.fingerprint, fields, weights)
    if accelerator.is_main_process:
        output.prepare(config)
    accelerator.wait_for_everyone()
    progress.phase = "preparing class images"
    class_sets = _class_images(config, accelerator, pipe, base, resolution, real_class_images) \
        if config.prior else None
    original_processors = attention.install(pipe.unet)
    if config.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    from diffusers import DDPMScheduler

    models = Models(pipe, architecture, tokenizers, encoders, DDPMScheduler.from_config(pipe.scheduler.config),
                    vae_dtype, unet_dtype, original_processors)
    optimizer = torch.optim.AdamW(weights.parameters, lr=learning_rate, betas=config.adam_betas,
                                  weight_decay=config.weight_decay, eps=config.adam_epsilon)
    start = _resume(saved, weights, optimizer, accelerator) if saved is not None else Start()
    optimizer = accelerator.prepare(optimizer)
    progress.phase = "caching class latents and text features"
    prior = _class_data(config, accelerator, models, class_sets, resolution) if class_sets is not None else None
    return TrainingState(config, accelerator, base, models, weights, optimizer, instances, prior, resolution,
                         learning_rate, fields, start)


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


def _read_inputs(config: TrainingConfig) -> tuple[list[list], dict[int, priors.ClassImages]]:
    """The output folder checked, every instance image and --reg-dir image read: refused before any model loads.

    Returns each concept's instance images and {concept index: its --reg-dir's class images}."""
    output.check(config)
    images = data.read_instance_images([c.instance_dir for c in config.concepts])
    real_class_images = {
        index: priors.read_reg_dir(concept.reg_dir, concept.filled_class_prompt(), config.num_class_images)
        for index, concept in enumerate(config.concepts) if config.prior and concept.reg_dir is not None}
    return images, real_class_images


def _load_pipeline(reference: str):
    """The base pipeline on the CPU, without its safety checker (not needed for training; it
    would blank some class images)."""
    from ..sampling import load_pipeline

    pipe = load_pipeline(reference, device="cpu")
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    return pipe


def _resolution(config: TrainingConfig, base: BaseModel, pipe) -> int:
    """--resolution, or the model's own; refused unless the VAE and the UNet's downsamplings divide it."""
    unet, vae_factor = pipe.unet, pipe.vae_scale_factor
    native = unet.config.sample_size * vae_factor
    resolution = config.resolution or native
    multiple = vae_factor * 2 ** (len(unet.config.block_out_channels) - 1)
    if resolution % multiple:
        lower = max(multiple, resolution // multiple * multiple)
        raise MergeError(f"--resolution {resolution} does not fit {base.name}: it must be a multiple "
                         f"of {multiple} (the VAE shrinks images {vae_factor} times and the UNet halves "
                         f"them {len(unet.config.block_out_channels) - 1} more times); e.g. {lower} or "
                         f"{lower + multiple}. The model's own resolution is {native}.")
    return resolution


def _dtypes(mixed_precision: str, base: BaseModel) -> tuple[torch.dtype, torch.dtype]:
    """(VAE dtype, UNet dtype) of the frozen parts under ``mixed_precision``."""
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
    vae_float32 = mixed_precision == "fp16" and base.architecture.vae_float32_under_fp16
    return (torch.float32 if vae_float32 else weight_dtype), weight_dtype


def _freeze_and_cast(config: TrainingConfig, pipe, encoders: tuple, wrappers: tuple[NewTokenEmbedding, ...],
                     base: BaseModel, device: torch.device, vae_dtype: torch.dtype,
                     unet_dtype: torch.dtype) -> Trainables:
    """Only the chosen projections of attn2 and the new token rows train; frozen parts may run
    in the mixed-precision dtype, trainable ones stay float32. Leaves the UNet in training mode."""
    for module in (pipe.unet, pipe.vae, *encoders):
        module.requires_grad_(False)
    layers = tuple(attention.cross_attention_layers(pipe.unet))
    children = [f"{layer}.{PROJECTION_MODULES[part]}" for layer in layers for part in config.train]
    # the base weights as loaded (float32), before any cast: the delta is taken against these
    base_weights: dict[str, Tensor] = {
        f"{child}.{name}": parameter.detach().to("cpu", torch.float32, copy=True)
        for child in children for name, parameter in pipe.unet.get_submodule(child).named_parameters()}
    for module, dtype in ((pipe.vae, vae_dtype), (pipe.unet, unet_dtype)):
        module.to(device)
        if dtype != torch.float32:
            module.to(dtype)
    for encoder in encoders:  # float32 (the new rows' gradient flows through them); autocast runs them
        encoder.to(device)
    named: list[tuple[str, nn.Parameter]] = []
    for child_name in children:
        child = pipe.unet.get_submodule(child_name).to(torch.float32)
        for parameter_name, parameter in child.named_parameters():
            name = f"{child_name}.{parameter_name}"
            with torch.no_grad():
                parameter.copy_(base_weights[name])  # exact, not float32(half(weight))
            parameter.requires_grad_(True)
            named.append((name, parameter))
    for index, wrapper in enumerate(wrappers):
        wrapper.rows.requires_grad_(True)
        named.append((f"{base.architecture.text_encoders[index]}.new_token_rows", wrapper.rows))
    pipe.unet.train()
    return Trainables(layers, base_weights, tuple(named), wrappers)


def _class_images(config: TrainingConfig, accelerator: Accelerator, pipe, base: BaseModel, resolution: int,
                  real: dict[int, priors.ClassImages]) -> tuple[priors.ClassImages, ...]:
    """Each concept's class images: its --reg-dir's, or generated (by the main process) and cached."""
    root = Path(config.class_cache_dir) if config.class_cache_dir else default_cache_dir()
    sets = []
    for index, concept in enumerate(config.concepts):
        if index in real:
            sets.append(real[index])
            continue
        prompt = concept.filled_class_prompt()
        folder = priors.cache_folder(root, base.fingerprint, prompt, resolution, config.class_sampling_steps,
                                     config.class_guidance_scale)
        if accelerator.is_main_process:
            priors.generate_class_images(pipe, prompt, config.num_class_images, folder, resolution=resolution,
                                         steps=config.class_sampling_steps,
                                         guidance_scale=config.class_guidance_scale,
                                         autocast=accelerator.autocast, progress=config.progress)
        accelerator.wait_for_everyone()  # the others read what the main process generated
        sets.append(priors.generated_class_images(folder, prompt, config.num_class_images))
    return tuple(sets)


def _read_checkpoint(config: TrainingConfig, fingerprint: str, fields: dict, weights: Trainables) -> dict:
    """The state of ``--resume``'s checkpoint, refused unless it is this run's: same base,
    same trainable weights and tokens, and the same recipe (only the step count may differ)."""
    folder = checkpoint.resolve(config.resume, config.output)
    state = checkpoint.read(folder)
    if state.get("base_fingerprint") != fingerprint:
        raise MergeError(f"Checkpoint {folder} was trained on another base model than {config.base}.")
    differences = compare_fields(fields, state.get("fields", {}))
    if differences:
        raise MergeError(f"Checkpoint {folder} belongs to a run with other options, so resuming would not "
                         f"continue it: {'; '.join(differences)}. Resume with the options the run was "
                         f"started with (only --steps may change, e.g. raised to train longer), or start "
                         f"a new run (another -o, or --force).")
    saved = state.get("trainables", {})
    if sorted(saved) != sorted(name for name, _ in weights.named):
        raise MergeError(f"Checkpoint {folder} trained other weights than this run would (e.g. another "
                         f"--train or base); resume with the options it was started with.")
    for name, parameter in weights.named:
        if saved[name].shape != parameter.shape:
            raise MergeError(f"Checkpoint {folder}: {name} has shape {tuple(saved[name].shape)}, the "
                             f"model's is {tuple(parameter.shape)}.")
    if int(state["step"]) > config.total_steps:
        raise MergeError(f"Checkpoint {folder} is at step {state['step']}, past --steps {config.total_steps}.")
    state["folder"] = folder
    return state


def _resume(state: dict, weights: Trainables, optimizer: torch.optim.Optimizer, accelerator: Accelerator) -> Start:
    """Continue from a checkpoint read (and checked) by :func:`_read_checkpoint`: its weights,
    optimizer and gradient-scaler state loaded, where it stopped returned."""
    saved = state["trainables"]
    with torch.no_grad():
        for name, parameter in weights.named:
            parameter.copy_(saved[name])
    optimizer.load_state_dict(state["optimizer"])  # its lr is this run's: --lr, --batch-size were checked
    if state.get("scaler") and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    return Start(int(state["step"]), tuple(float(x) for x in state.get("losses", [])), state["folder"])


def _class_data(config: TrainingConfig, accelerator: Accelerator, models: Models,
                sets: tuple[priors.ClassImages, ...], resolution: int) -> ClassData:
    """The class images as each step reads them: their features computed once, or (``cache=False``)
    their pixels, square at the training size."""
    captions = tuple(c for class_set in sets for c in class_set.captions)
    pixels = torch.stack([data.to_uint8(data.square(data.load_image(path), resolution))
                          for class_set in sets for path in class_set.paths])
    if not config.cache:
        return ClassData(sets, captions, None, pixels)
    return ClassData(sets, captions, _class_features(config, accelerator, models, pixels, captions), None)


def _class_features(config: TrainingConfig, accelerator: Accelerator, models: Models, pixels: Tensor,
                    captions: tuple[str, ...]) -> ClassFeatures:
    """The latent distributions of the class images (uint8 ``pixels``) and the text features of
    their distinct captions."""
    means, stds = [], []
    starts = range(0, len(pixels), config.batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc="class latents", unit="batch", dynamic_ncols=True,
                          disable=not (config.progress and accelerator.is_main_process)):
            mean, std = latent_distribution(models, data.to_unit_range(pixels[start:start + config.batch_size]),
                                            accelerator.device)
            means.append(mean)
            stds.append(std)
    distinct = list(dict.fromkeys(captions))
    contexts, pooled = [], []
    with torch.no_grad():
        for start in range(0, len(distinct), 64):
            context, pool = encode(models, accelerator, distinct[start:start + 64])
            contexts.append(context)
            pooled.append(pool)
    return ClassFeatures(torch.cat(means), torch.cat(stds), {caption: i for i, caption in enumerate(distinct)},
                         torch.cat(contexts), torch.cat(pooled) if pooled[0] is not None else None)
