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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..builtin import builtin_folder
from ..errors import MergeError
from .fidelity import rename_tokens

#: CLIPScore's weight (Hessel et al. 2021), as the paper used it.
CLIP_SCORE_WEIGHT = 2.5
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def strip_tokens(prompt: str, tokens: Iterable[str]) -> str:
    """``prompt`` without the modifier tokens (whole words), spaces collapsed:
    ``"photo of a <new1> cat"`` -> ``"photo of a cat"``."""
    return " ".join(rename_tokens(prompt, dict.fromkeys(tokens, " ")).split())


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
    """A local folder (or a built-in model) holding a transformers model (config.json and
    weights), else MergeError."""
    path = builtin_folder(str(folder)) or Path(folder).expanduser()
    if not path.is_dir():
        raise MergeError(f"{option} {folder}: no such folder; give a local folder with a {what} model "
                         f"(config.json and model.safetensors), nothing is downloaded.")
    if not (path / "config.json").is_file():
        raise MergeError(f"{option} {folder}: no config.json there; it is not a transformers {what} model folder.")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise MergeError(f"{option} {folder}: config.json but no weights (model.safetensors or "
                         f"pytorch_model.bin); download the {what} model completely.")
    return path


def _first_line(error: BaseException) -> str:
    """``Type: first line of the message`` (shortened), to name a library's error in one line."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    line = line if len(line) <= 120 else line[:117] + "..."
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def _load(loader: Any, path: Path, option: str, what: str, *, hint: str = "", **options: Any) -> Any:
    """``loader.from_pretrained(path)``; whatever transformers raises (a missing file, a corrupt
    safetensors header, a pickle that does not unpickle, ...) becomes one MergeError."""
    try:
        return loader.from_pretrained(str(path), local_files_only=True, **options)
    except Exception as error:  # noqa: BLE001 - the loaders raise many types for a bad folder
        raise MergeError(f"{option} {path}: cannot load the {what} ({_first_line(error)}){hint}.") from None


def _load_model(loader: Any, path: Path, option: str, what: str, *, optional: tuple[str, ...] = ()) -> Any:
    """The model with every parameter read from the folder: transformers would fill parameters
    the weights lack with random numbers (a warning, then meaningless scores), so that is a
    MergeError too. optional: prefixes of parameters the metrics never use (a ViT's pooler)."""
    advice = "; are its weights complete and uncorrupted? Download them again"
    model, info = _load(loader, path, option, what, hint=advice, output_loading_info=True)
    missing = sorted(name for name in info.get("missing_keys", ()) if not name.startswith(optional))
    if missing:
        raise MergeError(f"{option} {path}: its weights lack {len(missing)} of the {what}'s parameters "
                         f"(e.g. {missing[0]}), which would be left random; are they this model's complete "
                         f"weights? Download them again.")
    return model


def _config(path: Path, option: str, what: str) -> Any:
    """The folder's transformers config (its ``model_type`` says what model the folder holds)."""
    from transformers import AutoConfig

    return _load(AutoConfig, path, option, f"{what} model's config.json")


def _check_works(option: str, path: Path, what: str, check: Callable[[], object]) -> None:
    """Run ``check`` (embed a test image, or a text) now, so a model that loads but cannot do the
    job (a processor or tokenizer that does not fit it) is refused before any UNet work."""
    try:
        check()
    except Exception as error:  # noqa: BLE001 - any failure of the model on a plain input
        raise MergeError(f"{option} {path}: the {what} model fails on a test input "
                         f"({_first_line(error)}); is it a complete {what} model folder?") from None


def _test_image() -> Any:
    """A plain grey RGB image for :func:`_check_works`."""
    from PIL import Image

    return Image.new("RGB", (64, 64), (127, 127, 127))


def _embedding(output: Any) -> Tensor:
    """A features tensor from ``get_*_features``: a tensor (transformers 4) or an output with
    the projected embedding as ``pooler_output`` (transformers 5)."""
    return output if isinstance(output, Tensor) else output.pooler_output


def _embed_images(processor: Any, model: Any, images: Sequence[Any], *, batch_size: int, device: torch.device,
                  forward: Callable[[Tensor], Tensor]) -> Tensor:
    """``forward(pixel_values)`` over ``images`` in batches: (n, d), float32 on the CPU."""
    rows = []
    for start in range(0, len(images), batch_size):
        pixels = processor(images=list(images[start:start + batch_size]),
                           return_tensors="pt")["pixel_values"].to(device, model.dtype)
        with torch.no_grad():
            rows.append(forward(pixels).float().cpu())
    return torch.cat(rows)


def _takes_images(config: Any) -> bool:
    """Whether a config describes an image model (one with a vision input: channels, patches)."""
    return hasattr(config, "num_channels") or hasattr(config, "patch_size")


class ClipEmbedder:
    """A CLIP model (transformers ``CLIPModel``), its tokenizer and image processor, from one
    local folder. Loading checks the folder holds a CLIP model and embeds a test image and text,
    so a wrong or corrupt folder is one MergeError up front."""

    def __init__(self, folder: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                 batch_size: int = 16, option: str = "--clip") -> None:
        from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

        path = check_model_folder(folder, option, "CLIP")
        config = _config(path, option, "CLIP")
        if not isinstance(config, CLIPConfig):
            hint = (" A vision model such as DINO goes to --dino." if _takes_images(config) else "")
            raise MergeError(f"{option} {path}: holds a {config.model_type!r} model, not a CLIP model "
                             f"(transformers CLIPModel, e.g. openai/clip-vit-base-patch32).{hint}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = _load_model(CLIPModel, path, option, "CLIP model").to(self.device).eval()
        self.tokenizer = _load(AutoTokenizer, path, option, "CLIP tokenizer")
        self.processor = _load(CLIPImageProcessor, path, option, "CLIP image processor")
        _check_works(option, path, "CLIP",
                     lambda: (self.embed_images([_test_image()]), self.embed_texts(["a photo of a cat"])))

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
        return _embed_images(self.processor, self.model, images, batch_size=self.batch_size, device=self.device,
                             forward=lambda pixels: _embedding(self.model.get_image_features(pixel_values=pixels)))


class DinoEmbedder:
    """A DINO ViT (any transformers vision backbone whose input is ``pixel_values``) from a
    local folder; its CLS embedding. A CLIP model or a text model is refused at load, and the
    model embeds a test image then, so a wrong folder is one MergeError up front."""

    def __init__(self, folder: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                 batch_size: int = 16, option: str = "--dino") -> None:
        from transformers import AutoImageProcessor, AutoModel, CLIPConfig

        path = check_model_folder(folder, option, "DINO")
        config = _config(path, option, "DINO")
        if isinstance(config, CLIPConfig):
            raise MergeError(f"{option} {path}: holds a CLIP model (text and image towers); give it to --clip. "
                             f"--dino needs a vision model such as facebook/dino-vits16.")
        self.device = torch.device(device)
        self.batch_size = batch_size
        # DINO checkpoints come without a pooler; the CLS embedding does not use it
        model = _load_model(AutoModel, path, option, "DINO model", optional=("pooler.",))
        self.model = model.to(self.device).eval()
        if getattr(self.model, "main_input_name", None) != "pixel_values":
            raise MergeError(f"{option} {path}: holds a {type(self.model).__name__}, whose input is "
                             f"{getattr(self.model, 'main_input_name', 'unknown')}, not images; --dino needs a "
                             f"vision model such as facebook/dino-vits16.")
        self.processor = _load(AutoImageProcessor, path, option, "DINO image processor")
        _check_works(option, path, "DINO", lambda: self.embed_images([_test_image()]))

    def embed_images(self, images: Sequence[Any]) -> Tensor:
        """(n, d) CLS-token embeddings of the last layer (after its norm), float32 on the CPU."""
        return _embed_images(self.processor, self.model, images, batch_size=self.batch_size, device=self.device,
                             forward=lambda pixels: self.model(pixel_values=pixels).last_hidden_state[:, 0])
