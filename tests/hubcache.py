"""A Hugging Face hub cache built on disk, laid out exactly as huggingface_hub lays it out."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import huggingface_hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_hub_cache(cache: Path, repo_id: str, source: Path, *, skip: tuple[str, ...] = (),
                      change=None) -> None:
    """Lay ``source``'s files out as huggingface_hub's cache does: content-addressed blobs,
    snapshot files as relative symlinks to them, and ``refs/main`` naming the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    for file in sorted(source.rglob("*")):
        relative = file.relative_to(source).as_posix()
        if file.is_dir() or relative.startswith(skip):
            continue
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)  # no newline, as huggingface_hub writes it


def use_hub_cache(monkeypatch, cache: Path, *, offline: bool) -> None:
    """Point huggingface_hub at ``cache``. huggingface_hub 2.4 reads HF_HUB_CACHE and
    HF_HUB_OFFLINE into ``constants`` when it is imported, so both the environment and the
    constants are patched: the test holds whether it reads them at import or at call time."""
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
