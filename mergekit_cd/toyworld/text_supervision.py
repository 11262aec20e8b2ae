"""Attribute supervision of the world's text encoder: make the rows the UNet reads tell shapes apart.

Contrastive pretraining against a small ViT teaches the text tower what that ViT sees (colour,
background) and hardly anything of shape: swapping the class word moved the UNet's rows a third as
far as swapping the colour word (:mod:`.text_probe`), and a UNet trained on those rows drew blobs of
the right colour. Captions name their attributes, so the labels come from the words themselves:

- each class-word row names its class, and the colour and pattern words of its own phrase (binding);
- each colour- and pattern-word row names its word;
- every row after the caption (EOS and padding, which see all of it through causal attention) names
  the set of classes, colours and patterns in the caption, and its background.

Heads are cosine classifiers at a fixed scale, so a low loss needs rows that point apart, not a
large head. The result is the pipeline's frozen ``text_encoder``; the CLIP pair is left as trained.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .scenes import BACKGROUNDS, CLASSES, COLOURS, PATTERNS

#: Cosine-classifier logit scale: a margin of cosine 0.3 is worth a logit gap of 4.5.
LOGIT_SCALE = 15.0
_IGNORE = -100


@dataclass(frozen=True)
class RowLabels:
    """Per-token targets of one batch (``_IGNORE`` where a row has no such target) and per-caption
    sets for the rows after the caption."""

    cls: torch.Tensor          # (n, length): class index at class-word rows
    phrase_colour: torch.Tensor  # (n, length): colour of the class word's phrase, len(COLOURS) if unnamed
    phrase_pattern: torch.Tensor  # (n, length): pattern of the phrase, len(PATTERNS) if unnamed
    colour: torch.Tensor       # (n, length): colour index at colour-word rows
    pattern: torch.Tensor      # (n, length): pattern index at pattern-word rows
    after: torch.Tensor        # (n, length) bool: rows after the caption's last word (EOS, padding)
    class_set: torch.Tensor    # (n, classes) float multi-hot
    colour_set: torch.Tensor   # (n, colours)
    pattern_set: torch.Tensor  # (n, patterns)
    background: torch.Tensor   # (n,): background index, len(BACKGROUNDS) if unnamed


def row_labels(tokenizer: Any, ids: torch.Tensor) -> RowLabels:
    """The targets of captions tokenized as ``ids`` (padded to the tokenizer's length; every world
    word is one token, so a token's text is its word)."""
    n, length = ids.shape
    full = lambda: torch.full((n, length), _IGNORE, dtype=torch.long)  # noqa: E731
    cls, phrase_colour, phrase_pattern, colour, pattern = full(), full(), full(), full(), full()
    after = torch.zeros(n, length, dtype=torch.bool)
    class_set = torch.zeros(n, len(CLASSES))
    colour_set = torch.zeros(n, len(COLOURS))
    pattern_set = torch.zeros(n, len(PATTERNS))
    background = torch.full((n,), len(BACKGROUNDS), dtype=torch.long)
    colours, eos = list(COLOURS), tokenizer.eos_token_id
    for row, token_ids in enumerate(ids.tolist()):
        words = [token.removesuffix("</w>") for token in tokenizer.convert_ids_to_tokens(token_ids)]
        phrase_c, phrase_p = len(COLOURS), len(PATTERNS)
        end = token_ids.index(eos)
        after[row, end:] = True
        for position, word in enumerate(words[:end]):
            if word in COLOURS:
                colour[row, position] = phrase_c = colours.index(word)
                colour_set[row, phrase_c] = 1
            elif word in PATTERNS:
                pattern[row, position] = phrase_p = PATTERNS.index(word)
                pattern_set[row, phrase_p] = 1
            elif word in CLASSES:
                cls[row, position] = CLASSES.index(word)
                class_set[row, CLASSES.index(word)] = 1
                phrase_colour[row, position], phrase_pattern[row, position] = phrase_c, phrase_p
                phrase_c, phrase_p = len(COLOURS), len(PATTERNS)
        text = " ".join(words[1:end])
        for index, phrase in enumerate(BACKGROUNDS.values()):
            if text.endswith(" " + phrase):
                background[row] = index
    return RowLabels(cls, phrase_colour, phrase_pattern, colour, pattern, after, class_set, colour_set,
                     pattern_set, background)


class AttributeHeads(torch.nn.Module):
    """Cosine classifiers over rows: one per target of :class:`RowLabels`."""

    SIZES = {"cls": len(CLASSES), "phrase_colour": len(COLOURS) + 1, "phrase_pattern": len(PATTERNS) + 1,
             "colour": len(COLOURS), "pattern": len(PATTERNS), "class_set": len(CLASSES),
             "colour_set": len(COLOURS), "pattern_set": len(PATTERNS), "background": len(BACKGROUNDS) + 1}

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weights = torch.nn.ParameterDict({name: torch.nn.Parameter(torch.randn(size, width) / math.sqrt(width))
                                               for name, size in self.SIZES.items()})

    def logits(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Head ``name``'s logits of ``rows``: scaled cosines to its class directions."""
        return LOGIT_SCALE * F.normalize(rows, dim=-1) @ F.normalize(self.weights[name], dim=-1).T


def attribute_loss(heads: AttributeHeads, rows: torch.Tensor, labels: RowLabels) -> torch.Tensor:
    """Mean of the per-target losses on the text encoder's last hidden state ``rows`` (n, length, width)."""
    losses = []
    for name in ("cls", "phrase_colour", "phrase_pattern", "colour", "pattern"):
        target = getattr(labels, name)
        if (target != _IGNORE).any():
            losses.append(F.cross_entropy(heads.logits(name, rows).flatten(0, 1), target.flatten(),
                                          ignore_index=_IGNORE))
    tail = rows[labels.after]                                      # (rows after captions, width)
    caption_of_row = labels.after.nonzero()[:, 0]
    for name in ("class_set", "colour_set", "pattern_set"):
        losses.append(F.binary_cross_entropy_with_logits(heads.logits(name, tail) - LOGIT_SCALE / 2,
                                                         getattr(labels, name)[caption_of_row]))
    losses.append(F.cross_entropy(heads.logits("background", tail), labels.background[caption_of_row]))
    return torch.stack(losses).mean()


def supervise_text_encoder(text_encoder: Any, tokenizer: Any, captions: Sequence[str], *, steps: int,
                           batch_size: int, device: torch.device, seed: int, lr: float = 3e-4,
                           log: Any = print) -> Any:
    """Fine-tune ``text_encoder`` (a ``CLIPTextModel``) ``steps`` steps on :func:`attribute_loss`
    over ``captions``; returns it frozen."""
    from .train_base import _batches, _log_every, _schedule, _step

    torch.manual_seed(seed)
    text_encoder = text_encoder.to(device).train().requires_grad_(True)
    heads = AttributeHeads(text_encoder.config.hidden_size).to(device)
    parameters = [*text_encoder.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    scheduler = _schedule(optimizer, steps, warmup=max(1, steps // 20))
    rng = np.random.default_rng([seed, 5])
    start = time.perf_counter()
    for step, indices in enumerate(_batches(len(captions), batch_size, steps, rng)):
        batch = [captions[i] for i in indices]
        ids = tokenizer(batch, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        labels = row_labels(tokenizer, ids)
        rows = text_encoder(ids.to(device)).last_hidden_state
        loss = attribute_loss(heads, rows, RowLabels(*(value.to(device) for value in vars(labels).values())))
        _step(loss, optimizer, scheduler, parameters)
        if _log_every(step, steps):
            log(f"text  step {step + 1}/{steps}  attribute loss {loss.item():.4f}  "
                f"{time.perf_counter() - start:.0f} s")
    return text_encoder.eval().requires_grad_(False)
