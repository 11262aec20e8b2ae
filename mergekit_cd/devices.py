"""Devices: which one a name means on this machine, and where float64 work runs.

The rules of the ``--device`` option of every command and of the library's ``device=``
arguments live here, so the library never reaches into the command-line layer for them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import MergeError


def parse_device(name: str | torch.device, *, types: Sequence[str] = ("cpu", "cuda"),
                 option: str = "--device") -> torch.device:
    """The device ``name`` names, if the caller runs there and this machine has it.

    types: the device types supported (a merge: cpu and cuda, its solve is float64, which MPS
    lacks; sampling adds mps). A name torch does not parse, a type not supported (meta, xla,
    ...) and a device this machine lacks (cuda without a GPU, cuda:N past the last GPU) are
    each one MergeError, worded with ``option``, naming the devices that are available.
    """
    have = available_devices(types)
    try:
        chosen = torch.device(name)
    except RuntimeError:
        raise MergeError(f"{option} {name}: not a device name; {have}.") from None
    if chosen.type not in types:
        supported = " or ".join("cuda[:N]" if kind == "cuda" else kind for kind in types)
        raise MergeError(f"{option} {name}: this command runs on {supported}, not {chosen.type}; {have}.")
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "torch found no GPU" if torch.version.cuda else f"torch {torch.__version__} was built without CUDA"
            raise MergeError(f"{option} {name}: no CUDA device is available ({why}); {have}.")
        if chosen.index is not None and chosen.index >= count:
            raise MergeError(f"{option} {name}: there is no such GPU; {have}.")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise MergeError(f"{option} {name}: MPS (Apple GPU) is not available here; {have}.")
    return chosen


def available_devices(types: Sequence[str] = ("cpu", "cuda")) -> str:
    """``this machine has cpu, cuda:0``: the devices of ``types`` present here, for messages."""
    names = ["cpu"]
    if "cuda" in types and torch.cuda.is_available():
        names += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if "mps" in types and torch.backends.mps.is_available():
        names.append("mps")
    return f"this machine has {', '.join(names)}"


def float64_device(device: str | torch.device) -> torch.device:
    """Where float64 work (Gram sums, solves) runs for ``device``: there, except on MPS, which
    has no float64, so the CPU."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device
