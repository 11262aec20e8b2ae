"""Resumable training checkpoints: small (trainable tensors and optimizer state only), atomic.

A checkpoint is a folder ``OUT/checkpoints/step-000050/`` holding ``state.pt`` (step, trainable
tensors by name, optimizer and gradient-scaler state, losses so far, base fingerprint, the
run's configuration as JSON) and ``rng-<process>.pt`` per process (torch, CUDA and Python RNG
states). The data order, augmentation and noise do not need saving: they are functions of
(seed, process, step) (see :mod:`mergekit_cd.train.data`). Files hold only tensors and plain
containers, and are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import MergeError
from ..fileio import load_pickle, save_pickle

FORMAT = "mergekit-cd-train-checkpoint"
VERSION = 1
STATE_FILE = "state.pt"
_NAME = re.compile(r"^step-(\d+)$")


def folder_for(root: Path, step: int) -> Path:
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


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_rng(folder: Path, process: int) -> None:
    save_pickle(rng_state(), folder / f"rng-{process}.pt")


def write_state(folder: Path, state: dict[str, Any]) -> None:
    save_pickle({"format": FORMAT, "version": VERSION, **state}, folder / STATE_FILE)


def partial_folder(root: Path, step: int) -> Path:
    return Path(root) / f".step-{step:06d}.partial"


def publish(partial: Path, root: Path, step: int, keep: int) -> Path:
    """Rename a completely written checkpoint into place; keep only the newest ``keep``."""
    final = folder_for(root, step)
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read(folder: Path, process: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(state, this process's RNG state or None) of a checkpoint; refuses foreign files."""
    state = load_pickle(folder / STATE_FILE)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MergeError(f"{folder / STATE_FILE} is not a cd-train checkpoint.")
    if state.get("version") != VERSION:
        raise MergeError(f"{folder / STATE_FILE} is a version {state.get('version')} checkpoint; this "
                         f"cd-train reads version {VERSION}.")
    rng_file = folder / f"rng-{process}.pt"
    return state, (load_pickle(rng_file) if rng_file.is_file() else None)
