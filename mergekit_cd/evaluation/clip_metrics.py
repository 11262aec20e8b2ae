"""The paper's image metrics, from CLIP and DINO models in local folders (nothing is downloaded).

- text alignment: CLIPScore, ``2.5 * max(cos(text, image), 0)``, of each generated image with
  its prompt, the modifier tokens removed from the prompt;
- image alignment: the mean CLIP image-image cosine over all (generated, reference) pairs;
- DINO image alignment: the same with a DINO ViT's CLS embedding.

Kumari et al. used CLIP ViT-B/32 and DINO ViT-S/16 (``openai/clip-vit-base-patch32`` and
``facebook/dino-vits16`` as transformers folders).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import MergeError

#: CLIPScore's weight (Hessel et al. 2021), as the paper used it.
CLIP_SCORE_WEIGHT = 2.5
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def strip_tokens(prompt: str, tokens: Iterable[str]) -> str:
    """``prompt`` without the modifier tokens (whole words), spaces collapsed:
    ``"photo of a <new1> cat"`` -> ``"photo of a cat"``."""
    for token in tokens:
        if token:
            prompt = re.sub(rf"(?<!\S){re.escape(token)}(?!\S)", " ", prompt)
    return " ".join(prompt.split())


def clip_score(text_embeddings: Tensor, image_embeddings: Tensor) -> Tensor:
    """Row-wise CLIPScore ``2.5 * max(cos(t_k, i_k), 0)`` of paired (n, d) embeddings."""
    cosine = torch.nn.functional.cosine_similarity(text_embeddings.double(), image_embeddings.double(), dim=-1)
    return CLIP_SCORE_WEIGHT * cosine.clamp_min(0)


def mean_pairwise_cosine(generated: Tensor, reference: Tensor) -> float:
    """Mean cosine similarity over every (generated row, reference row) pair."""
    a = torch.nn.functional.normalize(generated.double(), dim=-1)
    b = torch.nn.functional.normalize(reference.double(), dim=-1)
    return float((a @ b.T).mean())


def check_model_folder(folder: str | os.PathLike[str], option: str, what: str) -> Path:
    """A local folder holding a transformers model (config.json and weights), else MergeError."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise MergeError(f"{option} {folder}: no such folder; give a local folder with a {what} model "
                         f"(config.json and model.safetensors), nothing is downloaded.")
    if not (path / "config.json").is_file():
        raise MergeError(f"{option} {folder}: no config.json there; it is not a transformers {what} model folder.")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise MergeError(f"{option} {folder}: config.json but no weights (model.safetensors or "
                         f"pytorch_model.bin); download the {what} model completely.")
    return path


def _load(loader, path: Path, option: str, what: str, **options) -> Any:
    try:
        return loader.from_pretrained(str(path), local_files_only=True, **options)
    except (OSError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MergeError(f"{option} {path}: cannot load the {what} model: {first}") from None


def _embedding(output: Any) -> Tensor:
    """A features tensor from ``get_*_features``: a tensor (transformers 4) or an output with
    the projected embedding as ``pooler_output`` (transformers 5)."""
    return output if isinstance(output, Tensor) else output.pooler_output


class ClipEmbedder:
    """A CLIP model, its tokenizer and image processor, from one local folder."""

    def __init__(self, folder: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                 batch_size: int = 16, option: str = "--clip") -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        path = check_model_folder(folder, option, "CLIP")
        self.name = str(folder)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = _load(CLIPModel, path, option, "CLIP").to(self.device).eval()
        self.tokenizer = _load(AutoTokenizer, path, option, "CLIP tokenizer")
        self.processor = _load(CLIPImageProcessor, path, option, "CLIP image processor")

    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """(n, d) projected text embeddings, float32 on the CPU."""
        rows = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                   return_tensors="pt").to(self.device)
            with torch.no_grad():
                rows.append(_embedding(self.model.get_text_features(**batch)).float().cpu())
        return torch.cat(rows)

    def embed_images(self, images: Sequence[Any]) -> Tensor:
        """(n, d) projected image embeddings, float32 on the CPU."""
        rows = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(images=list(images[start:start + self.batch_size]),
                                    return_tensors="pt")["pixel_values"].to(self.device, self.model.dtype)
            with torch.no_grad():
                rows.append(_embedding(self.model.get_image_features(pixel_values=pixels)).float().cpu())
        return torch.cat(rows)


class DinoEmbedder:
    """A DINO ViT (any transformers vision backbone) from a local folder; its CLS embedding."""

    def __init__(self, folder: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                 batch_size: int = 16, option: str = "--dino") -> None:
        from transformers import AutoImageProcessor, AutoModel

        path = check_model_folder(folder, option, "DINO")
        self.name = str(folder)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = _load(AutoModel, path, option, "DINO").to(self.device).eval()
        self.processor = _load(AutoImageProcessor, path, option, "DINO image processor")

    def embed_images(self, images: Sequence[Any]) -> Tensor:
        """(n, d) CLS-token embeddings of the last layer (after its norm), float32 on the CPU."""
        rows = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(images=list(images[start:start + self.batch_size]),
                                    return_tensors="pt")["pixel_values"].to(self.device, self.model.dtype)
            with torch.no_grad():
                rows.append(self.model(pixel_values=pixels).last_hidden_state[:, 0].float().cpu())
        return torch.cat(rows)
