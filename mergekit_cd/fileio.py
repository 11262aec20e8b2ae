"""Safe file input and output: atomic writes, file identities, and the one pickle loader.

Every output is written under a temporary sibling name and renamed into place only when the
writer finished, so an interrupted or failed write never leaves a half-written delta where a
finished one is expected. Pickle files (``.bin``, ``.ckpt``) can run code when loaded; they
are only ever opened by :func:`load_pickle`, which accepts plain tensors and containers.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import math
import os
import pickle
import pickletools
import re
import secrets
import shutil
import stat
import struct
import time
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .errors import MergeError
from .limits import (MAX_PICKLE_OPERATIONS, MAX_PICKLE_PROGRAM, check_limit, check_tensor_size, check_total_values,
                     current_base_bound)

#: How torch's weights-only unpickler names a global it refuses (two wordings across versions).
_DISALLOWED_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([^\s,]+)")


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, force: bool, folder: bool = False,
                foreign_entries: Callable[[Path], list[str]] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; rename it to ``path`` only on success
    (:func:`atomic_outputs` of one output).

    folder: create the temporary path as an empty folder (for multi-file layouts); otherwise
    the caller creates the file. An existing ``path`` is refused unless ``force``; with
    ``force`` it is replaced only after the new output is complete, and an existing folder
    only as :func:`check_destination` allows (``foreign_entries``).
    """
    with atomic_outputs([Path(path)], force=force, folder=folder, foreign_entries=foreign_entries) as (temporary,):
        yield temporary


@contextmanager
def atomic_outputs(targets: Sequence[Path], *, force: bool, folder: bool | Sequence[bool] = False,
                   foreign_entries: Callable[[Path], list[str]] | None = None,
                   check: bool = True) -> Iterator[tuple[Path, ...]]:
    """The one atomic writer: yield a temporary sibling per target to write, and only when every
    one is written put them all in place, or none.

    Placing sets every existing target aside (the last target first: it may mark the group as
    complete, as ``delta.safetensors`` marks a finished training run), then renames the
    temporaries in order, so the last target appears last; when a rename fails, every target gets
    back what it held. ``folder``: the temporaries are created as empty folders (for all targets,
    or per target). ``check``: refuse what :func:`check_destination` refuses first (callers that
    checked before their work pass False). On any failure no temporary is left; a write failure
    (``OSError``, or safetensors' own error) becomes one :class:`MergeError` naming the target.
    """
    targets = [Path(target) for target in targets]
    if not targets:
        yield ()
        return
    if check:
        for target in targets:
            check_destination(target, force=force, foreign_entries=foreign_entries)
    temporaries = tuple(_sibling(target, "partial") for target in targets)
    current = targets[0]
    try:
        folders = [folder] * len(targets) if isinstance(folder, bool) else list(folder)
        for temporary, is_folder in zip(temporaries, folders, strict=True):
            if is_folder:
                temporary.mkdir()
        yield temporaries
        current = _place_all(temporaries, targets, force=force)
    except (OSError, SafetensorError) as error:  # safetensors reports I/O failures as its own type
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise MergeError(f"Cannot write {getattr(error, 'target', current)}: {reason}.") from error
    finally:
        for temporary in temporaries:  # none is left after a complete placing
            _remove(temporary)


def _place_all(temporaries: Sequence[Path], targets: Sequence[Path], *, force: bool) -> Path:
    """Rename each temporary onto its target, all or none (see :func:`atomic_outputs`); what the
    targets held before is removed once all are placed. Without ``force`` a target is claimed
    exclusively: one that appeared since it was checked is never replaced. Returns the last target."""
    if force and len(targets) == 1 and not targets[0].is_dir() and not temporaries[0].is_dir():
        os.replace(temporaries[0], targets[0])  # a file over a file: atomic, never absent
        return targets[0]
    aside: dict[Path, Path] = {}
    placed: list[Path] = []
    target = targets[-1]
    try:
        for target in reversed(targets if force else ()):
            if os.path.lexists(target):
                aside[target] = _sibling(target, "old")
                os.rename(target, aside[target])
        for temporary, target in zip(temporaries, targets):
            (os.rename if force else _claim)(temporary, target)
            placed.append(target)
    except OSError as error:
        for done in reversed(placed):
            _remove(done)
        for original, old in aside.items():
            os.rename(old, original)
        error.target = target  # type: ignore[attr-defined]  # which output failed, for the message
        raise
    for old in aside.values():
        _remove(old)
    return target


def _claim(temporary: Path, target: Path) -> None:
    """Rename ``temporary`` to ``target`` unless something is there now (another writer's output
    that appeared after the check): a file is hard-linked into place, which fails on an existing
    name; a folder's name is claimed with ``mkdir`` (which fails on any existing name, an empty
    folder included, onto which a rename would succeed), then the folder renamed onto that claim."""
    appeared = FileExistsError(errno.EEXIST, "it appeared while the output was written (another writer?); "
                                             "pass --force to overwrite")
    if temporary.is_dir():
        try:
            os.mkdir(target)
        except FileExistsError:
            raise appeared from None
        try:
            os.rename(temporary, target)
        except OSError as error:
            if error.errno in (errno.ENOTEMPTY, errno.EEXIST):  # another writer filled the claim
                raise appeared from None
            os.rmdir(target)
            raise
        return
    try:
        os.link(temporary, target)
    except FileExistsError:
        raise appeared from None
    except OSError as error:  # a file system without hard links
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(target):
            raise appeared from None
        os.rename(temporary, target)
        return
    os.unlink(temporary)


def check_destination(target: Path, *, force: bool,
                      foreign_entries: Callable[[Path], list[str]] | None = None) -> None:
    """Fail before any work is done when the output could not, or must not, be written.

    An existing output is refused unless ``force``. Even with ``force``, an existing folder is
    replaced only when it is empty or an output of the format being written:
    ``foreign_entries(folder)`` names what in it is not (a format that writes folders passes
    it; without it every entry is foreign), so someone's model folder is never deleted.
    """
    parent = target.parent
    if not parent.exists():
        raise MergeError(f"Cannot write {target}: folder {parent} does not exist.")
    if not parent.is_dir():
        raise MergeError(f"Cannot write {target}: {parent} is not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MergeError(f"Cannot write {target}: folder {parent} is not writable.")
    if target.is_dir() and not target.is_symlink():  # before the --force advice: it would not help
        try:
            names = sorted(entry.name for entry in target.iterdir())
        except OSError as error:
            raise MergeError(f"{target} is a folder that cannot be read ({error.strerror or error}); refusing "
                             f"to replace it, even with --force. Choose another output name.") from None
        if names and foreign_entries is None:
            raise MergeError(f"{target} is a folder (holding e.g. {names[0]}); refusing to replace it with a "
                             f"file, even with --force. Choose another output name.")
        foreign = foreign_entries(target) if names else []
        if foreign:
            raise MergeError(f"{target} holds other things than a Custom Diffusion output (e.g. "
                             f"{foreign[0]}); refusing to replace it, even with --force. Choose "
                             f"another output name.")
    if os.path.lexists(target) and not force:
        raise MergeError(f"{target} exists; pass --force to overwrite.")


def check_not_an_input(target: Path, inputs: Iterable[str | os.PathLike[str]]) -> None:
    """Refuse an output that is one of ``inputs``, lies inside one, or holds one, with or without
    ``--force``: writing it would destroy that input. Both the names as given and the paths they
    resolve to (through symlinks) are compared; inputs that are not local paths (hub repo ids) are
    skipped."""
    outputs = {Path(os.path.abspath(target)), Path(target).resolve()}
    for source in inputs:
        if not os.path.lexists(source):
            continue
        for output in outputs:
            for path in {Path(os.path.abspath(source)), Path(source).resolve()}:
                if output == path or path in output.parents or output in path.parents:
                    how = "is" if output == path else "lies inside" if path in output.parents else "holds"
                    harm = "would change" if how == "lies inside" else "would destroy"
                    raise MergeError(f"Cannot write {target}: it {how} the input {source}, which writing it {harm} "
                                     f"(even with --force). Choose another output name.")


def _sibling(target: Path, purpose: str) -> Path:
    """A hidden, unused name next to ``target`` (same folder, so renames are atomic)."""
    return target.with_name(f".{target.name}.{secrets.token_hex(4)}.{purpose}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


def save_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike[str],
                     metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, made reproducible and ordinary: the header's metadata in
    key order (safetensors writes it in hash order, so the same content gave different bytes)
    and the file's mode by the umask, as every other file (safetensors creates it 0600)."""
    save_file(tensors, str(path), metadata=metadata)
    with open(path, "r+b") as file:
        length = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(length))
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        canonical = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canonical) <= length:  # the same JSON, reordered: its length cannot grow
            file.seek(8)
            file.write(canonical.ljust(length, b" "))
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process's file-creation mask (read by setting it, then setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_pickle(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save``, its write failures (full disk, I/O error) raised as OSError.

    torch reports them as RuntimeError (``[enforce fail at inline_container.cc:672] ... file write
    failed``, whatever the cause); saving plain tensors and containers fails no other way. A full
    disk is told by the space left where the file was being written.
    """
    try:
        with open(path, "wb") as file:  # a file object: the archive is named "archive", whatever the
            torch.save(obj, file)  # (temporary) file name, and saving the same content gives the same bytes
    except RuntimeError as error:
        if _nearly_full(Path(path).parent):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from error
        raise OSError(errno.EIO, _reason(error)) from error


def _nearly_full(folder: Path) -> bool:
    """Less than 1 MiB free in ``folder``'s file system: a failed write there ran out of space."""
    try:
        return shutil.disk_usage(folder).free < 2**20
    except OSError:
        return False


class _ParseScope:
    """What :func:`parse_once` keeps: parsed pickles and open safetensors handles, by file identity."""

    def __init__(self) -> None:
        self.parsed: dict[tuple[Any, ...], Any] = {}

    @staticmethod
    def key(kind: str, path: str | os.PathLike[str], *extra: Any) -> tuple[Any, ...] | None:
        try:
            return (kind, file_identity(path), *extra)
        except OSError:
            return None  # the reader says what is wrong with the path


_SCOPE: ContextVar[_ParseScope | None] = ContextVar("mergekit_cd_parse_scope", default=None)


@contextmanager
def parse_once() -> Iterator[None]:
    """Within, each file is parsed once: detecting its format, validating it and planning with it
    share one unpickling (or one parsed safetensors header), keyed by file identity so that a
    replaced file is parsed anew; the scope's own references are released on exit. Layers read
    later, while merging, come from what was parsed: a safetensors file's tensors are read one
    at a time into memory of their own, a pickle's are copied out of its one mapping (whose pages
    read stay resident, as clean file pages, while the delta is in use).
    """
    if _SCOPE.get() is not None:
        yield
        return
    token = _SCOPE.set(_ParseScope())
    try:
        yield
    finally:
        _SCOPE.reset(token)


def load_pickle(path: str | os.PathLike[str], *, mmap: bool = False) -> Any:
    """Load a torch pickle holding only tensors and plain containers; never runs its code.

    mmap: map tensor data instead of reading it (cheap for sniffing; zip-format files only,
    older files are read whole). Within :func:`parse_once` a file is unpickled once.
    Any failure is one :class:`MergeError` naming the file: a file that needs other globals
    (it would run code) is refused, an unreadable one is reported truncated or corrupt.
    """
    _check_not_empty(path)
    if os.fspath(path).endswith(".safetensors"):  # torch.load would read it whole with safetensors instead
        raise MergeError(f"{path}: a .safetensors file is not a torch pickle (.bin, .ckpt, .pt); refused.")
    is_zip = zipfile.is_zipfile(path)
    mapped = mmap and is_zip
    scope = _SCOPE.get()
    key = scope.key("pickle", path, mapped) if scope is not None else None
    if key is not None and key in scope.parsed:
        if isinstance(scope.parsed[key], MergeError):
            raise scope.parsed[key]  # refused once: not checked again by every format's detection
        return _within_base_bound(scope.parsed[key], path)
    try:
        _check_program(path, is_zip)
        contents = _unpickle(path, mapped)
        _check_no_overlap(contents, path)
    except MergeError as error:
        if key is not None:
            scope.parsed[key] = error
        raise
    if key is not None:
        scope.parsed[key] = contents
    return _within_base_bound(contents, path)


def _check_program(path: str | os.PathLike[str], is_zip: bool) -> None:
    """Bound the unpickling work before torch does it: a torch zip by its directory
    (:func:`_check_archive`), then its pickle program, or an old non-zip file's pickles, by
    their operations, counted without building anything (torch's weights-only unpickler spends
    microseconds per operation: a 60 MB pickle of 30M ints took minutes)."""
    if is_zip:
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, ValueError) as error:
            raise MergeError(f"{path}: truncated, or not a valid PyTorch (zip) file ({error}).") from None
        with archive:
            program = _check_archive(archive, path)
            if program is not None:
                with archive.open(program) as file:
                    _count_operations(file, 1, path)
        return
    with open(path, "rb") as file:  # an old torch file: magic number, protocol, system info, then the data
        if file.read(1) != pickle.PROTO:
            return  # not a pickle of protocol 2 or later: torch's loader refuses it at once
        file.seek(0)
        _count_operations(_BoundedReader(file, path), 4, path)


class _BoundedReader:
    """A file whose single reads are bounded: a pickle's argument (``BINBYTES8`` and the like)
    may declare any length, and a sparse file can back gigabytes of it."""

    def __init__(self, file: Any, path: str | os.PathLike[str]) -> None:
        self.file, self.path = file, path

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            raise ValueError("an unbounded read")  # genops never asks for one
        check_limit(size, MAX_PICKLE_PROGRAM, "an argument of its pickle declares {count} bytes", self.path)
        return self.file.read(size)

    def readline(self) -> bytes:
        return self.file.readline(MAX_PICKLE_PROGRAM)


def _count_operations(file: Any, pickles: int, path: str | os.PathLike[str]) -> None:
    """Count the operations of the next ``pickles`` pickles in ``file``, refusing more than
    :data:`~mergekit_cd.limits.MAX_PICKLE_OPERATIONS`; a malformed pickle is left for torch's
    loader to name."""
    count = 0
    try:
        for _ in range(pickles):
            for _ in pickletools.genops(file):
                count += 1
                if count > MAX_PICKLE_OPERATIONS:
                    check_limit(count, MAX_PICKLE_OPERATIONS, "its pickle runs at least {count} operations", path)
                    return  # lifted by the override
    except (ValueError, EOFError, UnicodeDecodeError, zipfile.BadZipFile, OSError):
        return


def _check_archive(archive: zipfile.ZipFile, path: str | os.PathLike[str]) -> zipfile.ZipInfo | None:
    """Refuse a torch zip by what its directory declares, before anything is inflated: torch
    stores every entry uncompressed and once, so a compressed one (a zip bomb) or a repeated
    one is foreign, and entries may not declare more bytes than the file holds, nor a pickle program past
    :data:`~mergekit_cd.limits.MAX_PICKLE_PROGRAM`. Returns the pickle program's entry."""
    size = os.path.getsize(path)
    program = None
    seen: set[str] = set()
    for entry in archive.infolist():
        if entry.filename in seen:  # torch reads the last of two same-named entries: one would be checked, another run
            raise MergeError(f"{path}: its entry {entry.filename} is in the archive twice; torch never writes that, "
                             f"so this is not a file it saved.")
        seen.add(entry.filename)
        if entry.compress_type != zipfile.ZIP_STORED:
            raise MergeError(f"{path}: its entry {entry.filename} is compressed ({entry.compress_size:,} bytes "
                             f"inflating to {entry.file_size:,}); torch never compresses, so this is not a "
                             f"file torch wrote; refused.")
        if entry.file_size > size:
            raise MergeError(f"{path}: its entry {entry.filename} declares {entry.file_size:,} bytes, more than "
                             f"the file holds; truncated or corrupt.")
        if entry.filename == "data.pkl" or entry.filename.endswith("/data.pkl"):
            check_limit(entry.file_size, MAX_PICKLE_PROGRAM,
                        f"its pickle program {entry.filename} declares {{count}} bytes", path)
            program = program or entry
    return program


def _unpickle(path: str | os.PathLike[str], mapped: bool) -> Any:
    """:func:`load_pickle`'s one call of ``torch.load``, with every failure one MergeError."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as error:
        disallowed = _DISALLOWED_GLOBAL.search(str(error))
        if disallowed:
            raise MergeError(f"{path}: needs more than plain tensors to load (it would run code: "
                             f"{disallowed.group(1)}); refused.") from None
        raise MergeError(f"{path}: not a plain-tensor torch file ({_reason(error)}); truncated "
                         f"or corrupt, or it uses pickle features that could run code; refused.") from None
    except OSError as error:
        if error.errno == errno.EINVAL:  # torch's zip reader on an archive cut short
            raise MergeError(f"{path}: truncated, or not a valid PyTorch (zip) file: its archive cannot "
                             f"be read.") from None
        raise MergeError(f"Cannot read {path}: {error.strerror or error}.") from error
    except Exception as error:  # noqa: BLE001 - a corrupt pickle can fail in any of pickle's internals
        raise MergeError(f"{path}: truncated or corrupt ({_reason(error)}).") from None


def load_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file; a broken file is one MergeError."""
    with open_safetensors(path) as file:
        return {key: read_tensor(file, key, path) for key in file.keys()}, file.metadata()


def read_tensor(handle: SafetensorsFile, key: str, source: str | os.PathLike[str], *, data: bool = True) -> Tensor:
    """One tensor of an open safetensors file, its declared size checked (from the header) before
    anything is read: at most :data:`~mergekit_cd.limits.MAX_TENSOR_ELEMENTS` values. ``data=False``:
    its stand-in from the header (:meth:`SafetensorsFile.stand_in`), nothing read."""
    check_tensor_size(handle.shape(key), key, source)
    return handle.read(key) if data else handle.stand_in(key)


#: safetensors' dtype names, as torch holds them.
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                       "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


class SafetensorsFile:
    """A safetensors file validated by ``safe_open`` and then read one tensor at a time with plain
    reads into memory of its own.

    ``safe_open`` maps the whole file, and every page a pass over the tensors touches stays
    resident while the map is open: validating a 12 KB sparse file that declares 1.3 GB cost
    1.6 GB. Here one tensor is in memory at a time, and the header, parsed once, serves every
    later read (a file of 10,000 layers was parsed 10,000 times).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = path
        self.identity = file_identity(path)  # what later reads check: the file validated here
        with safe_open(str(path), framework="pt") as handle:  # validates offsets and sizes; maps only
            self._metadata = handle.metadata() or {}
            keys = list(handle.keys())
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))
        if file_identity(path) != self.identity or not isinstance(header, dict) or not set(keys) <= set(header):
            raise MergeError(f"{path} changed while it was being read; read it again when it is complete.")
        self._start = 8 + length
        self._entries = {key: header[key] for key in keys}
        self.total_values = sum(math.prod(entry["shape"]) for entry in self._entries.values())

    def keys(self) -> list[str]:
        return list(self._entries)

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        """The dtype the header declares for ``key``; one no delta holds is refused."""
        dtype = _SAFETENSORS_DTYPES.get(self._entries[key]["dtype"])
        if dtype is None:
            raise MergeError(f"{self.path}: {key} has dtype {self._entries[key]['dtype']}, which no delta holds.")
        return dtype

    def stand_in(self, key: str) -> Tensor:
        """The tensor ``key`` without its data (its shape and dtype on the meta device), from the
        header alone: what a check of its structure looks at when its values are read later."""
        return torch.empty(self.shape(key), dtype=self.dtype(key), device="meta")

    def read(self, key: str) -> Tensor:
        """The tensor ``key``, read from the file, which must be the one validated: a file moved,
        replaced or rewritten since is refused (:func:`check_unchanged`)."""
        check_unchanged(self.path, self.identity)
        entry = self._entries[key]
        tensor = torch.empty(self.shape(key), dtype=self.dtype(key))
        start, end = entry["data_offsets"]
        buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        try:
            with open(self.path, "rb") as file:
                file.seek(self._start + start)
                complete = file.readinto(buffer) == end - start
        except OSError as error:
            raise MergeError(f"Cannot read {self.path}: {error.strerror or error}.") from error
        if not complete:
            raise MergeError(f"{self.path}: truncated safetensors file ({key} ends past its end).")
        return tensor


@contextmanager
def open_safetensors(path: str | os.PathLike[str]) -> Iterator[SafetensorsFile]:
    """A :class:`SafetensorsFile`, a broken or unreadable file turned into one MergeError;
    within :func:`parse_once`, parsed once per file."""
    _check_not_empty(path)
    scope = _SCOPE.get()
    key = scope.key("safetensors", path) if scope is not None else None
    try:
        if key is None:
            file = SafetensorsFile(path)
        else:  # kept for the scope; a failure is kept too
            if key not in scope.parsed:
                try:
                    scope.parsed[key] = SafetensorsFile(path)
                except (SafetensorError, OSError, ValueError) as error:
                    scope.parsed[key] = error
            if isinstance(scope.parsed[key], BaseException):
                raise scope.parsed[key]
            file = scope.parsed[key]
    except SafetensorError as error:
        raise MergeError(f"{path}: truncated or corrupt safetensors file ({error}).") from None
    except OSError as error:
        raise MergeError(f"Cannot read {path}: {error.strerror or error}.") from error
    except ValueError as error:  # a header safe_open accepted that json does not: not a file it wrote
        raise MergeError(f"{path}: corrupt safetensors header ({error}).") from None
    _check_declared_total(file, path)
    yield file


def _check_declared_total(handle: SafetensorsFile, path: str | os.PathLike[str]) -> None:
    """Read for a base, every value the header declares, against what a file for it can hold."""
    if current_base_bound() is not None:
        check_total_values(handle.total_values, path)


def _within_base_bound(contents: Any, path: str | os.PathLike[str]) -> Any:
    """``contents``, once their tensors' values are within what a file for the base being read
    for can hold (a mapped pickle: nothing is read to count them)."""
    if current_base_bound() is not None:
        check_total_values(sum(tensor.numel() for tensor in _pickled_tensors(contents)), path)
    return contents


def _check_no_overlap(contents: Any, path: str | os.PathLike[str]) -> None:
    """A pickle's tensors may not declare more bytes than its storages hold: 80 views of one 16 MB
    storage declared 1.3 GB, which validating them (each view is checked, and rows copied) costs.
    A real delta's tensors are separate (or one tensor saved under two keys, counted once); a token
    row that views the whole embedding table is smaller than its storage."""
    tensors = _pickled_tensors(contents)
    views = {(tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride()): tensor for tensor in tensors}
    declared = sum(tensor.numel() * tensor.element_size() for tensor in views.values())  # one tensor saved twice: once
    storages = {(tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()) for tensor in tensors}
    stored = sum(nbytes for _, nbytes in storages)
    if declared > stored:
        raise MergeError(f"{path}: its tensors declare {declared:,} bytes but its storages hold {stored:,}: "
                         f"the tensors overlap, which no delta's do; refused.")


def _pickled_tensors(contents: Any) -> list[Tensor]:
    """Every tensor in a loaded pickle (its plain containers walked; nothing is read)."""
    tensors, stack = [], [contents]
    while stack:
        value = stack.pop()
        if isinstance(value, Tensor):
            tensors.append(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return tensors


def file_identity(path: str | os.PathLike[str]) -> tuple[int, int, int]:
    """(device and inode, size, modification time): changes when the file is replaced or rewritten."""
    stat = os.stat(path)
    return stat.st_dev * 2**64 + stat.st_ino, stat.st_size, stat.st_mtime_ns


#: The file of a cache folder that remembers values made from files' contents by the files' stat
#: (:class:`StatMemo`): the digests of a base's text files, the digests of a merge's inputs.
STAT_MEMO = "file-digests.json"
_STAT_MEMO_VERSION = "1"
#: A file modified (or its times set) less than this long before it is read is not remembered: a
#: second write within one tick of the file system's clock could leave its stat as it was (git's
#: "racily clean" files).
RACY_NANOSECONDS = 2 * 10**9
#: What :meth:`StatMemo.observe` gives: a file's stat key and when it was taken (ns).
Observed = tuple[list[int], int]


class StatMemo:
    """Values made from files' contents, remembered in one JSON file of a cache folder by each file's
    stat (resolved path, device, inode, size, change and modification times in ns), as git's index
    remembers its files: a value is given back only while the file's stat is as it was when the
    value was made, and a write moves its times (a replacement its inode), so a changed file's values
    are made anew. A file modified within :data:`RACY_NANOSECONDS` before it was read, or changed
    while it was, is not remembered; a damaged memo counts as empty, and one that cannot be written
    is left as it is (the values are made again next time: the memo only saves reading, it never
    decides a value). ``path`` None: nothing is remembered."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries = _read_stat_memo(path) if path is not None else {}
        self.learned = False

    @staticmethod
    def observe(file: str) -> Observed:
        """The stat key of ``file`` (a resolved path) and the time, taken before its content is read."""
        return _stat_key(file), time.time_ns()

    def get(self, file: str, what: str) -> Any:
        """The value ``what`` remembered for ``file`` (a resolved path) as its stat is now, else None."""
        entry = self.entries.get(file)
        return entry["values"].get(what) if entry is not None and entry["stat"] == _stat_key(file) else None

    def get_digests(self, file: str, what: str, names: Iterable[str]) -> dict[str, str] | None:
        """The hex digests remembered as ``what`` for ``file`` by name, when they are exactly one for
        each of ``names``; else None (missing, another file's, or damaged: made again)."""
        found = self.get(file, what)
        if not isinstance(found, dict) or set(found) != set(names):
            return None
        try:
            for digest in found.values():
                bytes.fromhex(digest)
        except (TypeError, ValueError):
            return None
        return found

    def put(self, file: str, what: str, value: Any, observed: Observed) -> None:
        """Remember ``value``, made from ``file`` as :meth:`observe` found it before reading it, unless
        the file changed since or was modified within :data:`RACY_NANOSECONDS` before."""
        stat_key, read_at = observed
        if self.path is None or read_at - max(stat_key[3:]) < RACY_NANOSECONDS or _stat_key(file) != stat_key:
            return
        entry = self.entries.get(file)
        if entry is None or entry["stat"] != stat_key:
            entry = self.entries[file] = {"stat": stat_key, "values": {}}
        entry["values"][what] = value
        self.learned = True

    def save(self) -> None:
        """Write what was learned, atomically (readers never see half of it)."""
        if not self.learned:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.path, force=True) as temporary:
                temporary.write_text(json.dumps({"format_version": _STAT_MEMO_VERSION, "files": self.entries},
                                                sort_keys=True), encoding="utf-8")
        except (OSError, MergeError):
            pass  # unwritable: the values are made again next time
        self.learned = False


def remembered_sha256s(files: Sequence[Path], memo_folder: Path | None) -> list[str]:
    """sha256 hex of each file's bytes; with ``memo_folder``, remembered in its :data:`STAT_MEMO`
    (:class:`StatMemo`): a file whose stat is as remembered is not read again."""
    memo = StatMemo(memo_folder / STAT_MEMO if memo_folder is not None else None)
    digests = []
    for file in files:
        real = os.path.realpath(file)
        remembered = memo.get(real, "sha256")
        if isinstance(remembered, str):
            digests.append(remembered)
            continue
        observed = memo.observe(real)
        digest = hashlib.sha256()
        with open(real, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
        digests.append(digest.hexdigest())
        memo.put(real, "sha256", digests[-1], observed)
    memo.save()
    return digests


def _stat_key(path: str) -> list[int]:
    """What a write or a replacement of the file changes: [device, inode, size, ctime_ns, mtime_ns]."""
    found = os.stat(path)
    return [found.st_dev, found.st_ino, found.st_size, found.st_ctime_ns, found.st_mtime_ns]


def _read_stat_memo(path: Path) -> dict[str, dict[str, Any]]:
    """The remembered entries by resolved path; empty when the memo is missing or damaged."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    files = document.get("files") if isinstance(document, dict) and \
        document.get("format_version") == _STAT_MEMO_VERSION else None
    if not isinstance(files, dict):
        return {}
    return {name: entry for name, entry in files.items()
            if isinstance(entry, dict) and isinstance(entry.get("values"), dict)
            and isinstance(entry.get("stat"), list) and len(entry["stat"]) == 5
            and all(type(value) is int for value in entry["stat"])}


def check_unchanged(path: str | os.PathLike[str], identity: tuple[int, int, int] | None) -> None:
    """Refuse to read on from a file that was moved, replaced or rewritten since it was validated
    (``identity``: its :func:`file_identity` then)."""
    try:
        unchanged = file_identity(path) == identity
    except OSError:
        unchanged = False
    if not unchanged:
        raise MergeError(f"{path} was moved, replaced or changed after it was read; load it again.")


def _check_not_empty(path: str | os.PathLike[str]) -> None:
    """A regular file with content: a FIFO or a device (``/dev/zero``) reports size 0, but reading
    one blocks or never ends, so it is named for what it is."""
    try:
        status = os.stat(path)
    except OSError as error:
        raise MergeError(f"Cannot read {path}: {error.strerror or error}.") from error
    if not stat.S_ISREG(status.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(status.st_mode) else "a device" if
                stat.S_ISCHR(status.st_mode) or stat.S_ISBLK(status.st_mode) else "a socket" if
                stat.S_ISSOCK(status.st_mode) else "not a file")
        raise MergeError(f"{path}: not a regular file ({kind}); give a delta file or folder.")
    if status.st_size == 0:
        raise MergeError(f"{path}: truncated or corrupt (the file is empty).")


def _reason(error: BaseException) -> str:
    """The informative first sentence of torch's long load errors (its inner unpickler error)."""
    inner = error.__context__ if isinstance(error.__context__, pickle.UnpicklingError) else error
    text = " ".join(str(inner).split())
    return text.split(". ")[0][:200] or type(inner).__name__


# ---------------------------------------------------------------- pages of a mapped file
_MADV_DONTNEED = 4  # Linux; the pages of a private file mapping are read from the file again on use


class MappedPages:
    """Hands back the pages of a memory-mapped torch pickle that were read, so that reading a
    large file through its mapping, a layer at a time, holds about one layer in memory.

    A file mapping keeps every page once touched resident (counted in RSS) while it is mapped:
    100 authors' ``delta.bin`` files held all 7 GiB of themselves through a merge. Only pages
    of ``path``'s own mappings are released (found in ``/proc/self/maps``), so heap memory is
    never touched; where that is not available (not Linux), nothing is done.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.ranges = _file_mappings(Path(path))
        self._madvise = _libc_madvise() if self.ranges else None
        self._page = os.sysconf("SC_PAGE_SIZE") if self.ranges else 1

    def release(self, tensors: Iterable[torch.Tensor]) -> None:
        """Drop the whole pages of each tensor's storage from memory (they stay readable)."""
        if self._madvise is None:
            return
        for tensor in tensors:
            storage = tensor.untyped_storage()
            start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
            start, end = -(-start // self._page) * self._page, end // self._page * self._page
            if end > start and any(low <= start and end <= high for low, high in self.ranges):
                self._madvise(start, end - start, _MADV_DONTNEED)


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    """Address ranges where this process maps ``path`` (empty where /proc is unavailable)."""
    try:
        target = str(path.resolve())
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            low, high = (int(value, 16) for value in fields[0].split("-"))
            ranges.append((low, high))
    return ranges


@functools.cache
def _libc() -> Any | None:
    """The C library, loaded once a process as what the interpreter already links (``dlopen(NULL)``,
    no ``find_library``, which runs ``ldconfig`` in a child process); None where it cannot be."""
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def libc_function(name: str) -> Callable[..., int] | None:
    """The C library's function ``name`` (the memory calls: ``madvise``, glibc's ``malloc_trim`` and
    ``mallopt``), or None where this C library has none: the one home of that lookup."""
    library = _libc()
    return getattr(library, name, None) if library is not None else None


@functools.cache
def _libc_madvise() -> Callable[[int, int, int], int] | None:
    """libc's ``madvise``, typed once a process."""
    import ctypes

    madvise = libc_function("madvise")
    if madvise is None:
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return madvise
