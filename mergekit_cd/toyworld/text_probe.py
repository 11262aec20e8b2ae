"""How much of each attribute a base's text encoder carries: the spread of its feature rows when
one word of a prompt changes (``python -m mergekit_cd.toyworld.text_probe [--base FOLDER]``).

The UNet can only draw what the context tells apart: if swapping the class word in ``"a red X"``
barely moves the rows the UNet reads, no amount of UNet training makes it draw the named shape.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import torch

from .scenes import CLASSES, COLOURS


def row_spread(tokenizer: Any, text_encoder: Any, prompts: Sequence[str], rows: int = 8) -> list[float]:
    """Mean distance of each of the first ``rows`` feature rows (prompts padded to the tokenizer's
    length, as the pipeline feeds the UNet) from their mean over ``prompts``."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        features = text_encoder(ids).last_hidden_state
    return [float(value) for value in (features - features.mean(0, keepdim=True)).norm(dim=-1).mean(0)[:rows]]


def probe(tokenizer: Any, text_encoder: Any) -> dict[str, list[float]]:
    """Row spreads when the class word varies (``"a red X"``) and when the colour word varies (``"a C star"``)."""
    return {"class": row_spread(tokenizer, text_encoder, [f"a red {cls}" for cls in CLASSES]),
            "colour": row_spread(tokenizer, text_encoder, [f"a {colour} star" for colour in COLOURS])}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mergekit_cd.toyworld.text_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="a pipeline folder (default: the shipped builtin:toyworld)")
    args = parser.parse_args(argv)
    from pathlib import Path

    from transformers import CLIPTextModel, CLIPTokenizer

    from . import base_path

    folder = Path(args.base) if args.base else base_path()
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    print("row:            BOS    a   word  word   ...")
    for word, spreads in probe(tokenizer, text_encoder).items():
        print(f"{word + ' varies:':<15}" + " ".join(f"{value:5.2f}" for value in spreads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
