"""Install a delta into a loaded diffusers pipeline, and take it out again.

``unet.load_attn_procs`` silently installs nothing for Custom Diffusion weights (diffusers
0.29-0.42), so this adds the K/V differences to the UNet's own ``attn2.to_k``/``to_v``
weights, adds the modifier tokens to every tokenizer/text encoder pair, and checks that the
weights really changed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from . import formats
from .architectures import ARCHITECTURES
from .base import kv_fingerprint
from .delta import ConceptDelta, dense
from .errors import MergeError
from .loading import PathLike, resolve_delta
from .weights import FineTunedWeights

_STATE = "_mergekit_cd_installed"


@dataclass
class _Installed:
    """What :func:`remove` needs to restore: original K/V weights, tokenizers, table sizes."""

    weights: dict[str, tuple[Tensor, Tensor]]
    tokenizers: dict[str, object]
    table_sizes: dict[str, int]


def _pipeline_kv(pipe, layer: str) -> tuple[Tensor, Tensor]:
    module = pipe.unet.get_submodule(layer)
    return module.to_k.weight.detach(), module.to_v.weight.detach()


def _pipeline_layers(pipe) -> list[str]:
    return sorted(name for name, module in pipe.unet.named_modules()
                  if name.endswith(".attn2") and hasattr(module, "to_k"))


def _encoder_pairs(pipe) -> list[tuple[str, str]]:
    """(tokenizer, text encoder) attribute names of the pipeline, in feature order."""
    architecture = ARCHITECTURES["sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd1"]
    return list(zip(architecture.tokenizers, architecture.text_encoders))


def apply(pipe, delta: ConceptDelta | PathLike, *, scale: float = 1.0, check_base: bool = True) -> ConceptDelta:
    """Add ``delta`` (object, file, folder or hub repo) to ``pipe`` in place; returns the delta.

    Full fine-tuned weight files are read as differences against the pipeline's own weights.
    A delta that records a base fingerprint is refused on another base unless
    ``check_base=False``. Only one delta can be installed at a time: merge first.
    """
    if getattr(pipe, _STATE, None) is not None:
        raise MergeError("This pipeline already has a delta installed; call mergekit_cd.remove(pipe) "
                         "first, or merge the deltas into one with mergekit_cd.merge.")
    layers = _pipeline_layers(pipe)
    source = "the delta"
    if not isinstance(delta, ConceptDelta):
        source = str(delta)
        content = formats.read(resolve_delta(delta))
        delta = content.to_delta(lambda name: _pipeline_kv(pipe, name)) \
            if isinstance(content, FineTunedWeights) else content
    _check_fits_pipeline(pipe, delta, layers, source, check_base)

    state = _Installed({}, {}, {})
    with torch.no_grad():
        for name, layer in delta.layers.items():
            module = pipe.unet.get_submodule(name)
            state.weights[name] = (module.to_k.weight.detach().clone(), module.to_v.weight.detach().clone())
            for linear, difference in ((module.to_k, layer.key), (module.to_v, layer.value)):
                linear.weight += scale * dense(difference).to(linear.weight.device, linear.weight.dtype)
        _install_tokens(pipe, delta, state)
    setattr(pipe, _STATE, state)
    changed = any(not torch.equal(pipe.unet.get_submodule(n).to_k.weight, state.weights[n][0])
                  or not torch.equal(pipe.unet.get_submodule(n).to_v.weight, state.weights[n][1])
                  for n in delta.layers)
    nonzero = scale != 0 and any(float(dense(l.key).abs().max()) > 0 or float(dense(l.value).abs().max()) > 0
                                 for l in delta.layers.values())
    if nonzero and not changed:
        remove(pipe)
        raise MergeError(f"Installing {source} did not change the pipeline's weights (its differences "
                         f"are below the UNet's {pipe.unet.dtype} precision).")
    return delta


def _check_fits_pipeline(pipe, delta: ConceptDelta, layers: list[str], source: str, check_base: bool) -> None:
    missing = sorted(set(layers) - set(delta.layers))
    extra = sorted(set(delta.layers) - set(layers))
    if missing or extra:
        example = (missing or extra)[0]
        raise MergeError(f"{source} does not fit this pipeline: {len(missing)} of its cross-attention "
                         f"layers are missing and {len(extra)} are unknown, e.g. {example}.")
    for name in layers:
        key, _ = _pipeline_kv(pipe, name)
        if tuple(delta.layers[name].key.shape) != tuple(key.shape):
            raise MergeError(f"{source}: layer {name} has shape {tuple(delta.layers[name].key.shape)}, "
                             f"the pipeline's is {tuple(key.shape)} (wrong architecture).")
    if check_base and delta.base_fingerprint:
        fingerprint = kv_fingerprint((name, *_pipeline_kv(pipe, name)) for name in layers)
        if fingerprint != delta.base_fingerprint:
            raise MergeError(f"{source} was made for another base model ({delta.base or 'unnamed'}, "
                             f"fingerprint {delta.base_fingerprint[:12]}) than this pipeline "
                             f"(fingerprint {fingerprint[:12]}); pass check_base=False if you know "
                             f"they are equivalent.")


def _install_tokens(pipe, delta: ConceptDelta, state: _Installed) -> None:
    """Add each token to every tokenizer and set its embedding row in the matching encoder."""
    for index, (tokenizer_name, encoder_name) in enumerate(_encoder_pairs(pipe)):
        tokenizer, encoder = getattr(pipe, tokenizer_name), getattr(pipe, encoder_name)
        state.tokenizers[tokenizer_name] = copy.deepcopy(tokenizer)
        table = encoder.get_input_embeddings()
        state.table_sizes[encoder_name] = table.weight.shape[0]
        for token in delta.tokens:
            if token in tokenizer.get_vocab():
                raise MergeError(f"Token {token} is already in the pipeline's vocabulary; load the "
                                 f"pipeline afresh or remove the delta installed before.")
        tokenizer.add_tokens(list(delta.tokens))
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        table = encoder.get_input_embeddings()
        for token, embeddings in delta.tokens.items():
            row = tokenizer.convert_tokens_to_ids(token)
            table.weight[row] = embeddings[index].to(table.weight.device, table.weight.dtype)


def remove(pipe) -> None:
    """Undo :func:`apply`: restore the K/V weights, tokenizers and embedding tables exactly."""
    state: _Installed | None = getattr(pipe, _STATE, None)
    if state is None:
        raise MergeError("No mergekit-cd delta is installed in this pipeline.")
    with torch.no_grad():
        for name, (key, value) in state.weights.items():
            module = pipe.unet.get_submodule(name)
            module.to_k.weight.copy_(key)
            module.to_v.weight.copy_(value)
        for tokenizer_name, tokenizer in state.tokenizers.items():
            setattr(pipe, tokenizer_name, tokenizer)
        for encoder_name, size in state.table_sizes.items():
            getattr(pipe, encoder_name).resize_token_embeddings(size)
    setattr(pipe, _STATE, None)
