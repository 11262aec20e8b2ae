"""What every command shares: the error boundary, terminal-safe output, quiet libraries, devices
and dtypes, argument types, tables."""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

import torch

from ..delta import LORA_RTOL, CompressionReport
from ..devices import parse_device
from ..errors import MergeError, TokenRenameWarning
from ..fileio import libc_function
from ..merge_options import TEXT_DTYPES as DTYPES
from ..sampling import MAX_SEED
from ..solvers import IllConditionedWarning

#: Our own warnings that the commands report themselves (renamed tokens, the solver's notes).
REPORTED_WARNINGS = (TokenRenameWarning, IllConditionedWarning)
#: Libraries whose deprecation notices are for developers, not for the user of a command.
THIRD_PARTY_MODULES = r"(diffusers|transformers|huggingface_hub|accelerate|torch|safetensors)(\.|$)"


def run(main: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser,
        argv: Sequence[str] | None = None, *, file_tool: bool = False) -> int:
    """Parse, run quietly, and turn user errors into one line on stderr and exit status 1.

    While ``main`` runs, transformers / diffusers / huggingface_hub log only errors and show no
    progress bars of their own, :data:`REPORTED_WARNINGS` are not printed (the commands print
    those facts in their reports), nor are the libraries' deprecation notices, and every other
    warning is one line ``<prog>: warning: <message>`` (no source file and line, which mean
    nothing to a command's user); everything is restored afterwards.
    """
    args = parser.parse_args(argv)
    if file_tool:  # reads files, runs no model: see release_large_blocks
        release_large_blocks()
    try:
        with quiet_libraries(), warnings.catch_warnings(), redirect_stdout(_TerminalSafe(sys.stdout)):
            warnings.showwarning = _warning_printer(parser.prog)
            for category in REPORTED_WARNINGS:
                warnings.simplefilter("ignore", category)
            for category in (FutureWarning, DeprecationWarning):  # not actionable for a command's user
                warnings.filterwarnings("ignore", category=category, module=THIRD_PARTY_MODULES)
            return main(args) or 0
    except MergeError as error:
        print(f"{parser.prog}: error: {terminal_safe(str(error))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `cd-inspect x | head`: the reader left, which is fine
        _silence_stdout()
        return 141


def release_large_blocks() -> None:
    """Have glibc's malloc return every freed block of 1 MB or more to the system at once. Its
    dynamic threshold otherwise serves tensors from its heaps after the first is freed, and one
    pass over 80 tensors of 16 MB, each freed before the next was read, held 60 to 800 MB. Only
    for the file tools (cd-inspect, cd-convert): it makes a training step about 30% slower."""
    mallopt = libc_function("mallopt") if sys.platform.startswith("linux") else None
    if mallopt is not None:  # glibc
        mallopt(-3, 2**20)  # M_MMAP_THRESHOLD


def _warning_printer(prog: str) -> Callable[..., None]:
    """A ``warnings.showwarning`` that prints ``prog: warning: message`` as one line on stderr."""
    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: object = None, line: str | None = None) -> None:
        print(f"{prog}: warning: {terminal_safe(' '.join(str(message).split()))}", file=sys.stderr)

    return show


def terminal_safe(text: str) -> str:
    """``text`` with every character a terminal would act on (control characters, ANSI escapes,
    invisible formatting) shown escaped, as Python writes it; newlines and tabs are kept. What a
    command prints comes partly from files (names, prompts, keys), which may be hostile."""
    return "".join(character if character.isprintable() or character in "\n\t" else repr(character)[1:-1]
                   for character in text)


class _TerminalSafe:
    """A text stream writing through :func:`terminal_safe` into ``stream``: every command's stdout."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(terminal_safe(text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout replaced (tests) or already closed
        pass


#: The logging modules of the libraries a command quiets (both have transformers' logging API).
LIBRARY_LOGGING = ("transformers.utils.logging", "diffusers.utils.logging")


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Errors only and no progress bars from transformers, diffusers and huggingface_hub, without
    importing any of them: importing diffusers takes 3 s (it pulls in torch._dynamo), and a merge
    needs neither it nor, with cached features, transformers. A library already imported is quieted
    now; one imported during the command as soon as its logging module is loaded
    (:class:`_QuietOnImport`). Each is restored afterwards to the state it had before it was quieted.
    """
    import huggingface_hub.utils as hub_utils  # loaded with mergekit_cd.hub already

    saved: list[tuple[Any, tuple[int, bool]]] = []

    def quiet(logging_module: Any) -> None:
        saved.append((logging_module, (logging_module.get_verbosity(), logging_module.is_progress_bar_enabled())))
        logging_module.set_verbosity_error()
        logging_module.disable_progress_bar()

    hub_disabled = hub_utils.are_progress_bars_disabled()
    hub_utils.disable_progress_bars()
    hook = _QuietOnImport({name: quiet for name in LIBRARY_LOGGING if name not in sys.modules})
    for name in LIBRARY_LOGGING:
        if name in sys.modules:
            quiet(sys.modules[name])
    sys.meta_path.insert(0, hook)
    try:
        yield
    finally:
        sys.meta_path.remove(hook)
        for logging_module, (verbosity, bars) in reversed(saved):
            logging_module.set_verbosity(verbosity)
            if bars:
                logging_module.enable_progress_bar()
        if not hub_disabled:
            hub_utils.enable_progress_bars()


class _QuietOnImport(importlib.abc.MetaPathFinder):
    """An import hook that runs ``callbacks[name](module)`` right after the module ``name`` is
    first executed: it finds the module's spec through the other finders and wraps its loader."""

    def __init__(self, callbacks: dict[str, Callable[[Any], None]]) -> None:
        self.callbacks = callbacks

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        callback = self.callbacks.pop(name, None)
        if callback is None:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def execute_then_call(module: Any) -> None:
            execute(module)
            callback(module)
        spec.loader.exec_module = execute_then_call  # this spec's own loader: one per module found
        return spec


def seed_type(text: str) -> int:
    """argparse type of a seed: a whole number from 0 to :data:`MAX_SEED`, the seeds torch takes
    (a larger one would fail inside torch, with a traceback)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{value} is out of range: a seed is a whole number from 0 to "
                                         f"2**64 - 1 ({MAX_SEED})")
    return value


def non_negative_float_type(text: str) -> float:
    """argparse type of a finite number >= 0, e.g. a guidance scale (diffusers silently reads nan
    as no guidance at all)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number >= 0")
    return value


def device(name: str, *, types: Sequence[str] = ("cpu", "cuda")) -> torch.device:
    """The device ``--device name`` names (see :func:`mergekit_cd.devices.parse_device`)."""
    return parse_device(name, types=types)


def add_device_argument(parser: argparse.ArgumentParser, *, what: str = "the pipeline",
                        types: Sequence[str] = ("cpu", "cuda")) -> None:
    """``--device`` alone (commands without a text-encoder precision to choose, e.g. cd-sample)."""
    others = ", ".join("cuda or cuda:N" if kind == "cuda" else kind for kind in types if kind != "cpu")
    parser.add_argument("--device", default="cpu",
                        help=f"where to run {what}: cpu (default), {others}; a device this machine "
                             f"does not have is an error")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype`` (the text-encoder precision), for cd-merge."""
    add_device_argument(parser, what="the text encoder and the solve")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="text-encoder precision (the solve is always float64; default float32)")


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A small left-aligned text table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def style_flags(inputs: list[str], styles: list[str], *, what: str = "input") -> list[bool] | None:
    """Per input, whether ``--style`` named it (by 1-based position or by its name as given)."""
    if not styles:
        return None
    flags = [False] * len(inputs)
    for style in styles:
        if style.isdigit() and 1 <= int(style) <= len(inputs):
            flags[int(style) - 1] = True
        elif style in inputs:
            flags[inputs.index(style)] = True
        else:
            raise MergeError(f"--style {style}: not {what} position (1-{len(inputs)}) or {what} name.")
    return flags


def paired_embeddings(inputs: list[str], specs: list[str]) -> list[list[str | tuple[str, str]]] | None:
    """Per input, the embedding files ``--embedding INPUT=FILE[:TOKEN]`` pairs with it (INPUT: its
    1-based position or its name as given); the first ``=`` after which an input is named splits a
    spec, and ``:TOKEN`` gives the file's token a new name (``(file, token)``): the last ``:`` of a
    spec that is no existing file, followed by no path separator (``C:\\x\\sks.pt`` stays a path)."""
    if not specs:
        return None
    files: list[list[str | tuple[str, str]]] = [[] for _ in inputs]
    for spec in specs:
        cuts = [index for index, char in enumerate(spec) if char == "="]
        target = next((spec[:cut] for cut in cuts if spec[:cut] in inputs
                       or (spec[:cut].isdigit() and 1 <= int(spec[:cut]) <= len(inputs))), None)
        if target is None or not spec[len(target) + 1:]:
            raise MergeError(f"--embedding {spec}: expected INPUT=FILE[:TOKEN], INPUT an input's position "
                             f"(1-{len(inputs)}) or its name as given (e.g. --embedding '1=sks.pt:<sks>').")
        index = inputs.index(target) if target in inputs else int(target) - 1
        given = spec[len(target) + 1:]
        file, _, token = given.rpartition(":")
        renamed = file and token and "/" not in token and "\\" not in token and not Path(given).exists()
        files[index].append((file, token) if renamed else given)
    return files


def add_lora_rtol_argument(parser: argparse.ArgumentParser) -> None:
    """``--lora-rtol``, the error bound of a LoRA output where the difference is not low rank."""
    parser.add_argument("--lora-rtol", type=non_negative_float_type, default=LORA_RTOL, metavar="RTOL",
                        help="LoRA outputs (diffusers-lora, kohya-lora): a low-rank difference (every "
                             "constrained or soft merge) is written exactly at its rank; any other (one "
                             "trained concept, a sum) at the smallest rank with relative error at most RTOL "
                             "(default: %(default)s)")


def describe_factors(report: CompressionReport) -> str:
    """A LoRA output's ranks and error, as measured on what is written."""
    ranks = [rank for pair in report.ranks.values() for rank in pair]
    matrices = len(ranks)
    inexact = matrices - len(report.exact)
    error = (f"the other {inexact} within --lora-rtol {report.rtol:g} (relative error {report.relative_error:.2g}, "
             f"worst matrix {report.max_layer_error:.2g})" if inexact else "none approximated")
    return (f"LoRA: ranks {min(ranks, default=0)} to {max(ranks, default=0)}; {len(report.exact)} of {matrices} "
            f"K/V differences exact at their rank (to float32 rounding), {error}; "
            f"{report.parameters_before} -> {report.parameters_after} numbers")
