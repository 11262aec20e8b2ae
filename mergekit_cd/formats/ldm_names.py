"""The LDM (CompVis / SGM) names of the cross-attention blocks and their diffusers names: one
home for the mapping the CompVis checkpoints and kohya's SDXL LoRAs both use.

Every Stable Diffusion UNet (SD1, SD2, SDXL) has two layers per block, so an LDM
``input_blocks.i`` is diffusers' down block ``(i - 1) // 3``, layer ``(i - 1) % 3``, and
``output_blocks.i`` is up block ``i // 3``, layer ``i % 3`` (diffusers' own SGM conversion reads
them the same way); the attention is the block's second module (``.1.``).
"""

from __future__ import annotations

import re

_COMPVIS_BLOCK = re.compile(r"^(input_blocks\.(\d+)|middle_block|output_blocks\.(\d+))\.1\.(.+)$")
_DIFFUSERS_BLOCK = re.compile(r"^(down_blocks\.(\d+)\.attentions\.(\d+)|mid_block\.attentions\.0"
                              r"|up_blocks\.(\d+)\.attentions\.(\d+))\.(.+)$")


def to_diffusers_name(name: str) -> str | None:
    """``input_blocks.i.1.rest`` -> ``down_blocks.{(i-1)//3}.attentions.{(i-1)%3}.rest`` and
    likewise for the middle and output blocks; None for a name outside those blocks."""
    match = _COMPVIS_BLOCK.match(name)
    if match is None:
        return None
    _, down, up, rest = match.groups()
    if down is not None:
        index = int(down) - 1
        return None if index < 0 else f"down_blocks.{index // 3}.attentions.{index % 3}.{rest}"
    if up is not None:
        return f"up_blocks.{int(up) // 3}.attentions.{int(up) % 3}.{rest}"
    return f"mid_block.attentions.0.{rest}"


def to_compvis_name(layer: str) -> str | None:
    """The inverse of :func:`to_diffusers_name`; None for a layer CompVis has no name for."""
    match = _DIFFUSERS_BLOCK.match(layer)
    if match is None:
        return None
    _, down_block, down_attention, up_block, up_attention, rest = match.groups()
    if down_block is not None:
        attention = int(down_attention)
        return f"input_blocks.{3 * int(down_block) + attention + 1}.1.{rest}" if attention < 3 else None
    if up_block is not None:
        attention = int(up_attention)
        return f"output_blocks.{3 * int(up_block) + attention}.1.{rest}" if attention < 3 else None
    return f"middle_block.1.{rest}"
