"""Install a delta into a loaded diffusers pipeline, and take it out again.

``unet.load_attn_procs`` silently installs nothing for Custom Diffusion weights (diffusers
0.29-0.42), so this adds the K/V differences to the UNet's own ``attn2.to_k``/``to_v``
weights, adds the modifier tokens to every tokenizer/text encoder pair, and checks that the
weights really changed.

Everything is checked before anything is touched (architecture, layers, shapes, base
fingerprint, token sizes, tokens already in the vocabulary), so a refused delta leaves the
pipeline as it was. :func:`remove` restores the K/V weights, the tokenizers and the embedding
tables bit for bit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import formats
from .architectures import Architecture, pipeline_architecture
from .base import kv_fingerprint
from .delta import ConceptDelta, dense
from .errors import MergeError
from .loading import FitTarget, PathLike, check_fits, resolve_delta, settle_other_layers
from .tokens import check_new, install
from .weights import FineTunedWeights

_STATE = "_mergekit_cd_installed"
#: What :func:`apply` may do with a LoRA's parts beyond the cross-attention K/V: it installs K/V alone.
OTHER_LAYERS_ON_APPLY = ("refuse", "drop")


@dataclass
class _Table:
    """An embedding table as it was before tokens were added: its own Parameter, untouched."""

    weight: nn.Parameter
    num_embeddings: int
    vocab_size: int | None


@dataclass
class _Installed:
    """What :func:`remove` needs: original K/V weights (CPU copies), tokenizers, embedding tables."""

    source: str
    weights: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    tokenizers: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, _Table] = field(default_factory=dict)


# ---------------------------------------------------------------- what the pipeline has
def _pipeline_kv(pipe, layer: str) -> tuple[Tensor, Tensor]:
    module = pipe.unet.get_submodule(layer)
    return module.to_k.weight.detach(), module.to_v.weight.detach()


def _pipeline_layers(pipe) -> list[str]:
    return sorted(name for name, module in pipe.unet.named_modules()
                  if name.endswith(".attn2") and hasattr(module, "to_k"))


def _encoder_pairs(pipe, architecture: Architecture) -> list[tuple[str, str]]:
    """(tokenizer, text encoder) attribute names of the pipeline, in feature order."""
    pairs = list(zip(architecture.tokenizers, architecture.text_encoders))
    for tokenizer_name, encoder_name in pairs:
        if getattr(pipe, tokenizer_name, None) is None or getattr(pipe, encoder_name, None) is None:
            raise MergeError(f"This {architecture.name} pipeline has no {tokenizer_name} / {encoder_name}; "
                             f"the delta's tokens need both.")
    return pairs


# ---------------------------------------------------------------- apply / remove
def apply(pipe, delta: ConceptDelta | FineTunedWeights | PathLike, *, scale: float = 1.0,
          check_base: bool = True, other_layers: str = "refuse") -> ConceptDelta:
    """Add ``delta`` (object, file, folder or hub repo) to ``pipe`` in place; returns the delta.

    The K/V differences (times ``scale``) are added to every ``attn2.to_k``/``to_v`` weight of
    ``pipe.unet`` and the modifier tokens are added to every tokenizer with their embeddings.
    Full fine-tuned weight files are read as differences against the pipeline's own weights.
    A delta that records a base fingerprint is refused on another base unless
    ``check_base=False``; a delta of another architecture is always refused. Only one delta
    can be installed at a time (merge several first); :func:`remove` undoes this exactly.

    A LoRA's parts beyond the cross-attention K/V (its other UNet modules, as our ``--other-layers
    sum`` outputs carry them, and text-encoder parts) are not installed: such a delta is refused
    (``other_layers="refuse"``, the default, the rule :func:`~mergekit_cd.loading.load` applies)
    unless ``other_layers="drop"`` installs its K/V alone (text-encoder parts with a warning).
    """
    if other_layers not in OTHER_LAYERS_ON_APPLY:
        raise MergeError(f"other_layers {other_layers!r}: choose one of {', '.join(OTHER_LAYERS_ON_APPLY)} "
                         f"(apply installs the K/V alone).")
    if getattr(pipe, _STATE, None) is not None:
        previous = getattr(pipe, _STATE).source
        raise MergeError(f"This pipeline already has a delta installed ({previous}); call "
                         f"mergekit_cd.remove(pipe) first, or merge the deltas into one with "
                         f"mergekit_cd.merge.")
    architecture = pipeline_architecture(pipe)
    layers = _pipeline_layers(pipe)
    source = "the delta"
    content = delta
    if not isinstance(delta, (ConceptDelta, FineTunedWeights)):
        source = str(delta)
        content = formats.read(resolve_delta(delta))
    if isinstance(content, ConceptDelta):
        content = settle_other_layers(content, other_layers, source, "apply")[0]
    pairs = _encoder_pairs(pipe, architecture) if content.tokens else []
    _check_fits_pipeline(pipe, architecture, layers, pairs, content, source, check_base)
    if isinstance(content, FineTunedWeights):
        content = content.to_delta(lambda name: tuple(w.float().cpu() for w in _pipeline_kv(pipe, name)))
    delta = content
    check_new(list(delta.tokens), [getattr(pipe, name) for name, _ in pairs], lambda token, index: (
        f"{source}: token {token} is already in the pipeline's {pairs[index][0]} (added by "
        f"load_textual_inversion or an earlier delta?); load the pipeline afresh."))

    state = _Installed(source)
    try:
        with torch.no_grad():
            for name, layer in delta.layers.items():
                module = pipe.unet.get_submodule(name)
                state.weights[name] = (module.to_k.weight.detach().to("cpu", copy=True),
                                       module.to_v.weight.detach().to("cpu", copy=True))
                for linear, difference in ((module.to_k, layer.key), (module.to_v, layer.value)):
                    weight = linear.weight
                    # add in float32, round once to the pipeline's dtype
                    updated = weight.float() + scale * dense(difference).to(weight.device, torch.float32)
                    weight.copy_(updated.to(weight.dtype))
            _install_tokens(pipe, pairs, delta, state)
    except BaseException:
        _restore(pipe, state)
        raise
    setattr(pipe, _STATE, state)
    changed = any(not torch.equal(pipe.unet.get_submodule(n).to_k.weight.cpu(), state.weights[n][0])
                  or not torch.equal(pipe.unet.get_submodule(n).to_v.weight.cpu(), state.weights[n][1])
                  for n in delta.layers)
    nonzero = scale != 0 and any(bool(dense(part).abs().max() > 0)
                                 for layer in delta.layers.values() for part in (layer.key, layer.value))
    if nonzero and not changed:
        remove(pipe)
        raise MergeError(f"Installing {source} did not change the pipeline's weights (its differences "
                         f"are below the UNet's {pipe.unet.dtype} precision).")
    return delta


def remove(pipe) -> None:
    """Undo :func:`apply`: restore the K/V weights, tokenizers and embedding tables exactly."""
    state: _Installed | None = getattr(pipe, _STATE, None)
    if state is None:
        raise MergeError("No mergekit-cd delta is installed in this pipeline; nothing to remove.")
    _restore(pipe, state)
    setattr(pipe, _STATE, None)


def installed(pipe) -> str | None:
    """What :func:`apply` installed in ``pipe`` (its source), or None."""
    state: _Installed | None = getattr(pipe, _STATE, None)
    return state.source if state is not None else None


def _restore(pipe, state: _Installed) -> None:
    """Put back whatever ``state`` recorded (all of it after apply, part of it after a failure)."""
    with torch.no_grad():
        for name, (key, value) in state.weights.items():
            module = pipe.unet.get_submodule(name)
            module.to_k.weight.copy_(key)
            module.to_v.weight.copy_(value)
        for tokenizer_name, tokenizer in state.tokenizers.items():
            setattr(pipe, tokenizer_name, tokenizer)
        for encoder_name, table in state.tables.items():
            encoder = getattr(pipe, encoder_name)
            embedding = encoder.get_input_embeddings()
            embedding.weight = table.weight
            embedding.num_embeddings = table.num_embeddings
            if table.vocab_size is not None:
                encoder.config.vocab_size = table.vocab_size


# ---------------------------------------------------------------- checks, before anything changes
def _check_fits_pipeline(pipe, architecture: Architecture, layers: list[str], pairs: list[tuple[str, str]],
                         content: ConceptDelta | FineTunedWeights, source: str, check_base: bool) -> None:
    """Architecture, the fit (:func:`~mergekit_cd.loading.check_fits`: layers, shapes, token
    sizes), attention processors and base fingerprint; one MergeError naming the problem."""
    if content.architecture and content.architecture != architecture.name:
        raise MergeError(f"{source} is an {content.architecture} delta but this pipeline is "
                         f"{architecture.name} ({architecture.description}): wrong architecture.")
    key_shapes = {name: tuple(_pipeline_kv(pipe, name)[0].shape) for name in layers}
    target = FitTarget("this pipeline", "the pipeline", architecture.name, key_shapes,
                       key_shapes[layers[0]][1] if layers else 0,
                       tuple(getattr(pipe, encoder).get_input_embeddings().weight.shape[1] for _, encoder in pairs))
    check_fits(content, target, source)
    for name in layers:
        processor = getattr(pipe.unet.get_submodule(name), "processor", None)
        if getattr(processor, "train_kv", False):
            raise MergeError(f"Layer {name} of this pipeline runs a {type(processor).__name__}, which "
                             f"uses its own K/V weights instead of to_k/to_v, so the delta would have no "
                             f"effect; reset the attention processors first "
                             f"(pipe.unet.set_default_attn_processor()).")
    if check_base and content.base_fingerprint:
        fingerprint = kv_fingerprint((name, *_pipeline_kv(pipe, name)) for name in layers)
        if fingerprint != content.base_fingerprint:
            hint = (" A bfloat16 pipeline never matches (its weights are rounded): load it in float16 "
                    "or float32." if pipe.unet.dtype == torch.bfloat16 else "")
            raise MergeError(f"{source} was made for another base model ({content.base or 'unnamed'}, "
                             f"fingerprint {content.base_fingerprint[:12]}) than this pipeline "
                             f"(fingerprint {fingerprint[:12]}); pass check_base=False if you know "
                             f"they are equivalent.{hint}")


def _install_tokens(pipe, pairs: list[tuple[str, str]], delta: ConceptDelta, state: _Installed) -> None:
    """Add each token to every tokenizer and its embedding to a new table of the matching encoder
    (:func:`~mergekit_cd.tokens.install`); the old table's Parameter and a copy of each tokenizer
    are kept aside untouched, so :func:`remove` puts them back as they were."""
    for index, (tokenizer_name, encoder_name) in enumerate(pairs):
        tokenizer, encoder = getattr(pipe, tokenizer_name), getattr(pipe, encoder_name)
        state.tokenizers[tokenizer_name] = copy.deepcopy(tokenizer)
        table = encoder.get_input_embeddings()
        state.tables[encoder_name] = _Table(table.weight, table.num_embeddings,
                                            getattr(encoder.config, "vocab_size", None))
        install(tokenizer, encoder, {token: embeddings[index] for token, embeddings in delta.tokens.items()})
