"""File formats: one module per layout, each a :class:`~.protocol.Format` (``NAME``, ``detect``,
``read``, ``write`` and what it holds and how it is named).

``FORMATS`` is tried in order by :func:`detect_format`; adding a format is one new module and
one line here. Formats never do math: full-weight files read as
:class:`~mergekit_cd.weights.FineTunedWeights`, difference files as
:class:`~mergekit_cd.delta.ConceptDelta`, and conversion between them happens elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..delta import Provenance
from ..errors import MergeError
from ..fileio import check_destination, check_not_an_input, load_pickle, load_safetensors, parse_once
from ..metadata import from_header
from . import authors_bin, compvis, diffusers_layout, diffusers_lora, kohya_lora, native
from ._common import (Delta, check_token_shapes, describe_container, natural_order, read_metadata,
                      safetensors_header, values_checked_on_read)
from ._lora import counted
from .protocol import Format
from .token_files import token_folder, token_folder_entries

FORMATS: list[Format] = [
    native,
    diffusers_layout,
    authors_bin,
    compvis,
    diffusers_lora,
    kohya_lora,
]


def format_names() -> list[str]:
    """The ``NAME`` of every format, in detection order (the choices of ``--format``/``--to``)."""
    return [module.NAME for module in FORMATS]


def get_format(name: str) -> Format:
    """The format module called ``name``."""
    for module in FORMATS:
        if module.NAME == name:
            return module
    raise MergeError(f"Unknown format {name!r}; expected one of {', '.join(format_names())}.")


#: Output file extension -> the format it is written in by default; a name without one is a folder.
OUTPUT_SUFFIXES = {module.OUTPUT_SUFFIX: module.NAME for module in FORMATS if module.OUTPUT_SUFFIX}
FOLDER_FORMAT = next(module.NAME for module in FORMATS if module.OUTPUT_SUFFIX == "")
#: The help of ``--format`` / ``--to``: how the default is told from the output name.
OUTPUT_FORMAT_HELP = ("output format; default: from the output name: "
                      + ", ".join(f"{suffix} {name}" for suffix, name in OUTPUT_SUFFIXES.items())
                      + f", no extension (or an existing folder) the {FOLDER_FORMAT} folder layout; "
                      + " and ".join(module.NAME for module in FORMATS if module.OUTPUT_SUFFIX is None)
                      + " (LoRA with textual-inversion files, loadable without mergekit-cd) and any other "
                      "extension need this option")


def output_format(path: str | os.PathLike[str], format_name: str | None = None) -> str:
    """The format to write ``path`` in: ``format_name`` when given, else told by the name
    (:data:`OUTPUT_SUFFIXES`; a name without extension, or an existing folder, is
    :data:`FOLDER_FORMAT`); any other extension is refused rather than guessed.
    """
    if format_name is not None:
        return get_format(format_name).NAME
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in OUTPUT_SUFFIXES:
        return OUTPUT_SUFFIXES[suffix]
    if not suffix or path.is_dir():
        return FOLDER_FORMAT
    choices = ", ".join(f"{ext} ({name})" for ext, name in OUTPUT_SUFFIXES.items())
    raise MergeError(f"Cannot tell which format to write {path} in: {suffix} is none of {choices}, nor a "
                     f"folder name without extension ({FOLDER_FORMAT}). Rename the output, or name the "
                     f"format ({', '.join(format_names())}) with --format (cd-convert: --to).")


def check_can_hold(format_name: str, architecture: str | None, path: str | os.PathLike[str]) -> None:
    """Refuse a format that cannot hold models of ``architecture`` (e.g. SDXL as compvis)."""
    supported = get_format(format_name).ARCHITECTURES
    if architecture is None or supported is None or architecture in supported:
        return
    others = [module.NAME for module in FORMATS
              if module.ARCHITECTURES is None or architecture in module.ARCHITECTURES]
    raise MergeError(f"Cannot write {path} as {format_name}: the format holds only {' and '.join(supported)} "
                     f"models, and this is an {architecture} delta; choose {_one_of(others)} instead.")


def _one_of(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def check_holds_other_modules(format_name: str, modules: Sequence[str], path: str | os.PathLike[str]) -> None:
    """Refuse a format that cannot hold a LoRA's ``modules`` beyond the cross-attention K/V."""
    if modules and not get_format(format_name).HOLDS_OTHER_MODULES:
        holders = [module.NAME for module in FORMATS if module.HOLDS_OTHER_MODULES]
        raise MergeError(f"Cannot write {path} as {format_name}: the delta carries "
                         f"{counted(len(modules), 'LoRA module')} beyond the cross-attention K/V (e.g. "
                         f"{natural_order(modules)[0]}), which only {_one_of(holders)} hold; write one of those, or "
                         f"drop them.")


def check_output(path: str | os.PathLike[str], format_name: str, *, architecture: str | None = None,
                 force: bool = False, inputs: Sequence[str | os.PathLike[str]] = ()) -> None:
    """Everything about writing ``path`` that can be checked before the work: the format can
    hold the architecture, the folder is writable, an existing output is replaced only with
    ``force``, and never a folder holding other things, nor any of ``inputs``."""
    check_can_hold(format_name, architecture, path)
    module = get_format(format_name)
    for target in (*([token_folder(path, module.TOKEN_FOLDER_SUFFIX)] if module.TOKEN_FOLDER_SUFFIX else []),
                   Path(path)):
        check_not_an_input(target, inputs)
        check_destination(target, force=force, foreign_entries=module.foreign_entries if target == Path(path)
                          else token_folder_entries)



def detect_format(path: str | os.PathLike[str]) -> Format:
    """The first format that recognises ``path``; otherwise a MergeError saying what was found."""
    for module in FORMATS:
        if module.detect(path):
            return module
    raise MergeError(f"{path}: not a Custom Diffusion file mergekit-cd reads; found {_found(Path(path))}. "
                     f"Formats: {', '.join(format_names())}.")


def _found(path: Path) -> str:
    """What is at ``path``; an unreadable file raises its own MergeError (corrupt, refused)."""
    if path.is_dir():
        names = natural_order(entry.name for entry in path.iterdir())
        return f"a folder holding {names[:6]}" if names else "an empty folder"
    if not path.exists():
        raise MergeError(f"{path}: no such file or folder.")
    header = safetensors_header(path)
    if header is not None:
        return f"a safetensors file with keys {natural_order(header[0])[:4]} ({len(header[0])} keys)"
    if path.suffix == ".safetensors":
        load_safetensors(path)  # raises: empty, truncated or corrupt
    return f"a torch pickle holding {describe_container(load_pickle(path, mmap=True))}"


def recorded_provenance(path: str | os.PathLike[str]) -> Provenance:
    """What our metadata in a delta file or folder records (base, architecture, concepts), read
    without any tensor: a safetensors header, or a mapped pickle's metadata entry; the empty
    record if none."""
    path = Path(path)
    if path.is_dir():
        path = next((path / name for name in diffusers_layout.WEIGHTS_NAMES if (path / name).is_file()), path)
    header = safetensors_header(path)
    if header is not None:
        return from_header(header[1], source=str(path))
    contents = load_pickle(path, mmap=True)
    return read_metadata(contents, str(path)) if isinstance(contents, dict) else Provenance()


def read(path: str | os.PathLike[str], format_name: str | None = None) -> Delta:
    """Read ``path`` in the named format, or in the one :func:`detect_format` finds."""
    return read_detected(path, format_name)[1]


def read_detected(path: str | os.PathLike[str], format_name: str | None = None) -> tuple[str, Delta]:
    """``(format name, content)`` of ``path``: detection and reading share one parse of the file."""
    with parse_once():
        module = get_format(format_name) if format_name else detect_format(path)
        return module.NAME, module.read(path)


def write(obj: Delta, path: str | os.PathLike[str], format_name: str, *, force: bool = False) -> None:
    """Write ``obj`` to ``path`` in the named format (atomically; ``force`` replaces an output);
    its tokens must pass the readers' checks (:func:`~._common.check_token_shapes`: the one name
    rule, the count bound): a file we write is one we read."""
    check_token_shapes(obj.tokens, f"Cannot write {path}")
    get_format(format_name).write(obj, path, force=force)
