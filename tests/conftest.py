"""Shared pytest fixtures and the hypothesis profiles.

Profiles: ``ci`` (the default, used by ``make test``): derandomised, so every run checks the
same examples; ``thorough``: 2000 random examples per property (``HYPOTHESIS_PROFILE=thorough``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=60, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session", autouse=True)
def _keep_the_default_allocator() -> Iterator[None]:
    """cd-inspect and cd-convert fix glibc's mmap threshold for their process; called in-process,
    they would slow every later training test by a third. Tests of that bound run the commands
    in a subprocess (test_hostile_inputs)."""
    from mergekit_cd.cli import _common

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_common, "release_large_blocks", lambda: None)
        yield


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test caches Gram matrices and features in one folder of the session, never in the
    user's cache, and runs under the file and merge bounds whatever the user's environment says."""
    from mergekit_cd.limits import OVERRIDE

    monkeypatch.setenv("MERGEKIT_CD_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.delenv(OVERRIDE, raising=False)


@pytest.fixture(scope="session")
def benchmark_script() -> Callable[[str], Any]:
    """Import one of ``benchmarks/``'s scripts by name (they are scripts, not a package)."""
    import importlib.util

    def load(name: str) -> Any:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent.parent / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


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


@pytest.fixture(scope="session")
def tiny_delta_files(tiny_pipeline_path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict]:
    """Factory: ``tiny_delta_files("sd1")`` -> one random concept (token ``<new1>``, class ``cat``)
    on the tiny base of that architecture (seed 0), as an object and saved in each format.

    Keys: ``"object"`` (the ConceptDelta), ``"native"`` (``delta.safetensors``), ``"diffusers"``
    (a folder), ``"authors-bin"`` (``delta.bin``, full weights); ``"other-native"`` is a second
    concept (``<new2>``, ``dog``), to merge with the first. Made once per session; treat
    the files as read-only.
    """
    from mergekit_cd.base import open_base
    from mergekit_cd.loading import save
    from mergekit_cd.testing import random_concept_delta

    cache: dict[str, dict] = {}

    def get(architecture: str) -> dict:
        if architecture not in cache:
            base = open_base(tiny_pipeline_path(architecture))
            delta = random_concept_delta(base, "<new1>", "cat", seed=1)
            folder = tmp_path_factory.mktemp(f"delta-{architecture}")
            files = {"object": delta}
            for name, file_name in (("native", "delta.safetensors"), ("diffusers", "delta"),
                                    ("authors-bin", "delta.bin")):
                files[name] = save(delta, folder / file_name, format=name, base=base)
            other = random_concept_delta(base, "<new2>", "dog", seed=2)
            files["other-native"] = save(other, folder / "other.safetensors", base=base)
            cache[architecture] = files
        return cache[architecture]

    return get


@pytest.fixture(scope="session")
def tiny_models(tiny_pipeline_path, tiny_delta_files) -> None:
    """The tiny SD1 and SDXL bases and their delta files, built before a test captures output
    (saving them prints transformers' progress bars, which are not a command's output).
    Modules that read a command's output use it: ``pytestmark = pytest.mark.usefixtures("tiny_models")``."""
    for architecture in ("sd1", "sdxl"):
        tiny_pipeline_path(architecture)
        tiny_delta_files(architecture)


@pytest.fixture
def authors_own(tmp_path: Path) -> Callable[[Path], Path]:
    """Factory: a copy of our ``delta.bin`` as the authors' script writes it, without our
    ``"mergekit_cd"`` metadata (no architecture, base or class words recorded)."""
    import torch

    def strip(path: Path) -> Path:
        content = torch.load(path, weights_only=True)
        del content["mergekit_cd"]
        copy = tmp_path / "authors-own" / "delta.bin"
        copy.parent.mkdir(exist_ok=True)
        torch.save(content, copy)
        return copy

    return strip


@pytest.fixture(scope="session")
def tall_base_path(tiny_pipeline_path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD1 base with 3000-row K/V layers (17 MB of K/V, the rest next to nothing), so that
    memory tests can tell holding K/V-sized data from not. Treat it as read-only."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("tall") / "base"
    shutil.copytree(tiny_pipeline_path("sd1"), folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    generator = torch.Generator().manual_seed(0)
    for key in tensors:
        if ".attn2.to_k." in key or ".attn2.to_v." in key:
            tensors[key] = torch.randn(3000, tensors[key].shape[1], generator=generator) * 0.05
    save_file(tensors, weights)
    return folder


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for the whole session: the tiny models' matrices are so small that a
    second thread is pure overhead, and on a busy 2-core machine it makes them many times slower
    (the demo sets one thread for its process too; the tests no longer depend on running after it)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
