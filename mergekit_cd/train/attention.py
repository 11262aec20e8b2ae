"""Cross-attention that detaches the start token's key and value, as Custom Diffusion trains.

The start token (BOS) has the same features in every prompt; the authors stop gradients
through its key and value so that the K/V update is driven by the prompt's own tokens. The
forward values are unchanged. This processor does what diffusers' ``AttnProcessor2_0`` does
(scaled dot-product attention) with that one change, and reads the layer's own ``to_k`` /
``to_v`` weights, so the trained weights are the UNet's weights, not a processor's copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class DetachStartTokenAttnProcessor:
    """Scaled dot-product cross-attention with the first text token's K/V detached."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        cross = encoder_hidden_states is not None
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if cross:
            key = torch.cat([key[:, :1].detach(), key[:, 1:]], dim=1)
            value = torch.cat([value[:, :1].detach(), value[:, 1:]], dim=1)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                       dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def cross_attention_layers(unet) -> list[str]:
    """Names of the UNet's cross-attention modules (``...attn2``), in module order."""
    return [name for name, module in unet.named_modules()
            if name.endswith(".attn2") and hasattr(module, "to_k")]


def install(unet) -> dict:
    """Put the detaching processor on every cross-attention layer; returns the old processors."""
    original = dict(unet.attn_processors)
    layers = set(cross_attention_layers(unet))
    unet.set_attn_processor({name: DetachStartTokenAttnProcessor() if name[: -len(".processor")] in layers
                             else processor for name, processor in original.items()})
    return original


def restore(unet, original: dict) -> None:
    """Put back the processors :func:`install` replaced."""
    unet.set_attn_processor(original)
