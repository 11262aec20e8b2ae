"""Shared pytest fixtures and the hypothesis profiles.

Profiles: ``ci`` (the default, used by ``make test``): derandomised, so every run checks the
same examples; ``thorough``: 2000 random examples per property (``HYPOTHESIS_PROFILE=thorough``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=60, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def tiny_pipeline_path(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: ``tiny_pipeline_path("sd1", seed=0)`` -> a saved tiny diffusers folder.

    Each (architecture, seed) is saved once per session; treat the folder as read-only.
    """
    from mergekit_cd.testing import save_tiny_pipeline

    cache: dict[tuple[str, int], Path] = {}

    def get(architecture: str, seed: int = 0) -> Path:
        key = (architecture, seed)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{architecture}-seed{seed}")
            cache[key] = save_tiny_pipeline(architecture, folder / "pipeline", seed=seed)
        return cache[key]

    return get
