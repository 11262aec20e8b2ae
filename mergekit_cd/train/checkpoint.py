"""Resumable training checkpoints: the trainable tensors and optimizer state, written atomically.

A checkpoint is a folder ``OUT/checkpoints/step-000050/`` holding ``state.pt``: the step, the
trainable tensors by name, the optimizer (AdamW's two moments per trainable value) and
gradient-scaler state, the losses so far, the base fingerprint, the recipe fields a resume
must match (see :func:`mergekit_cd.train.config.resume_fields`) and the whole configuration as
JSON. It is about three times the trainable weights in float32 (weights and two moments):
about 0.23 GB for SD1.5's K/V and 4.1 GB for SDXL's, more with ``--train q,k,v,out``. No
random generator state is saved: data order, augmentation, noise and timesteps are functions
of (seed, process, step) (see :mod:`mergekit_cd.train.data`), and nothing in a step draws
from torch's global generators. Files hold only tensors and plain containers, and are read
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from ..errors import MergeError
from ..fileio import atomic_path, load_pickle, save_pickle

FORMAT = "mergekit-cd-train-checkpoint"
VERSION = 2  # 2: recipe fields checked on resume; no generator states
STATE_FILE = "state.pt"
_NAME = re.compile(r"^step-(\d+)$")


def folder_for(root: Path, step: int) -> Path:
    """The finished checkpoint folder of ``step``."""
    return Path(root) / f"step-{step:06d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints under ``root``, oldest first."""
    if not Path(root).is_dir():
        return []
    found = [(int(match.group(1)), path) for path in Path(root).iterdir()
             if (match := _NAME.match(path.name)) and (path / STATE_FILE).is_file()]
    return [path for _, path in sorted(found)]


def resolve(reference: Path, output: Path) -> Path:
    """A checkpoint folder from ``--resume``: a step folder, a checkpoints folder or a run's
    output folder (its latest checkpoint), or ``latest`` (the latest of this run's output)."""
    reference = Path(reference)
    if str(reference) == "latest":
        reference = Path(output) / "checkpoints"
    candidates = [reference, reference / "checkpoints"]
    for candidate in candidates:
        if (candidate / STATE_FILE).is_file():
            return candidate
        found = list_checkpoints(candidate)
        if found:
            return found[-1]
    raise MergeError(f"--resume {reference}: no checkpoint there (expected a folder with {STATE_FILE}, "
                     f"or a checkpoints folder holding step-NNNNNN folders).")


def save(root: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write the checkpoint of ``step`` (``state``, with the format tag and version) atomically,
    replacing one of the same step; keep only the newest ``keep``."""
    final = folder_for(root, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(final, force=True, folder=True, foreign_entries=lambda folder: []) as partial:
        save_pickle({"format": FORMAT, "version": VERSION, **state}, partial / STATE_FILE)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read(folder: Path) -> dict[str, Any]:
    """The state of a checkpoint; refuses foreign files and other versions."""
    state = load_pickle(folder / STATE_FILE)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MergeError(f"{folder / STATE_FILE} is not a cd-train checkpoint.")
    if state.get("version") != VERSION:
        raise MergeError(f"{folder / STATE_FILE} is a version {state.get('version')} checkpoint; this "
                         f"cd-train reads version {VERSION}.")
    return state
