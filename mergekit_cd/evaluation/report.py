"""What an evaluation found, as objects, table rows, JSON, and a fidelity-preservation plot."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MergeError
from ..fileio import atomic_outputs, check_destination

#: Version of the JSON layout written by :func:`write_json`.
JSON_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ConceptInfo:
    """One evaluated concept: its token (as its own delta names it), class, prompts, sources."""

    token: str
    class_word: str
    prompts: tuple[str, ...]
    source: str  # the input it comes from
    latents: str  # where its probe latents came from: an instance folder, or "sampled ..."


@dataclass(frozen=True)
class ConceptScores:
    """How one model does on one concept."""

    token: str
    fidelity: float  # 1 - ||eps_M - eps_i|| / ||eps_i - eps_B|| on the concept's probes, B with its token
    fidelity_plain_base: float  # the same with B the plain base (the definition; the token counts too)
    residual: float  # K/V outputs on its target-prompt features: ||(M - D_i) C^T|| / ||(W0 + D_i) C^T||
    text_alignment: float | None = None  # CLIPScore, tokens removed from the prompt
    image_alignment: float | None = None  # CLIP image-image cosine, generated vs reference
    dino_alignment: float | None = None  # DINO image-image cosine, generated vs reference


@dataclass(frozen=True)
class MethodResult:
    """One row: a merge method (or a given delta, or the base) and its scores."""

    label: str
    kind: str  # constrained, soft, hybrid, sum, average, base, plain-base, delta
    options: dict[str, Any]
    concepts: tuple[ConceptScores, ...]
    preservation: float  # ||eps_M - eps_B|| / ||eps_B|| on held-out captions
    world: dict[str, dict[str, float]] | None = None  # the toy world's detector rates (cd-eval --world)

    @property
    def mean_fidelity(self) -> float:
        """Mean fidelity over the concepts (the base with each concept's token as reference)."""
        return _mean([c.fidelity for c in self.concepts])

    @property
    def mean_fidelity_plain_base(self) -> float:
        """Mean fidelity over the concepts with the plain base as reference."""
        return _mean([c.fidelity_plain_base for c in self.concepts])

    @property
    def max_residual(self) -> float:
        values = [c.residual for c in self.concepts if not math.isnan(c.residual)]
        return max(values) if values else math.nan

    def mean(self, metric: str) -> float | None:
        """Mean of ``text_alignment``, ``image_alignment`` or ``dino_alignment`` over concepts."""
        values = [getattr(c, metric) for c in self.concepts]
        return None if any(v is None for v in values) else _mean(values)


@dataclass(frozen=True)
class EvalReport:
    """Everything :func:`mergekit_cd.evaluate` measured, and how."""

    base: str
    architecture: str
    concepts: tuple[ConceptInfo, ...]
    rows: tuple[MethodResult, ...]
    settings: dict[str, Any]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def row(self, label: str) -> MethodResult:
        """The row named ``label`` (e.g. ``"sum"``, ``"constrained"``, ``"soft w=10"``)."""
        for row in self.rows:
            if row.label == label:
                return row
        raise KeyError(f"no row {label!r}; rows: {', '.join(r.label for r in self.rows)}")

    @property
    def has_clip(self) -> bool:
        return any(c.text_alignment is not None for row in self.rows for c in row.concepts)

    @property
    def has_dino(self) -> bool:
        return any(c.dino_alignment is not None for row in self.rows for c in row.concepts)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN written as null)."""
        rows = [{**asdict(row), "mean_fidelity": row.mean_fidelity,
                 "mean_fidelity_plain_base": row.mean_fidelity_plain_base, "max_residual": row.max_residual}
                for row in self.rows]
        content = {"format_version": JSON_FORMAT_VERSION, "base": self.base, "architecture": self.architecture,
                   "concepts": [asdict(c) for c in self.concepts], "rows": rows,
                   "settings": self.settings, "notes": list(self.notes)}
        return _finite(content)


#: cd-eval --world columns: (rate key, heading).
WORLD_COLUMNS = (("presence", "presence (world)"), ("both", "both present (world)"),
                 ("ordinary", "ordinary prompts (world)"), ("preservation", "preservation (world)"))


def summary_table(report: EvalReport) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the summary: per concept its fidelity, then their mean, the (mean)
    fidelity against the plain base, preservation, worst constraint residual, and the CLIP /
    DINO means when they were measured."""
    tokens = [concept.token for concept in report.concepts]
    if len(set(tokens)) < len(tokens):  # separately trained concepts often share a token name
        tokens = [f"{c.token} {c.class_word}".strip() for c in report.concepts]
    if len(set(tokens)) < len(tokens):  # ... and a class word
        tokens = [f"{index + 1} ({name})" for index, name in enumerate(tokens)]
    header = ["method", *(f"fidelity {t}" for t in tokens)]
    if len(tokens) > 1:
        header.append("mean fidelity")
    header += ["mean fidelity (plain base)" if len(tokens) > 1 else "fidelity (plain base)",
               "preservation", "max residual"]
    metrics = []
    if report.has_clip:
        metrics += [("text_alignment", "text (CLIP)"), ("image_alignment", "image (CLIP)")]
    if report.has_dino:
        metrics.append(("dino_alignment", "image (DINO)"))
    header += [name for _, name in metrics]
    world = [(key, name) for key, name in WORLD_COLUMNS if any(r.world and key in r.world for r in report.rows)]
    header += [name for _, name in world]
    rows = []
    for row in report.rows:
        cells = [row.label, *(_number(c.fidelity, ".3f") for c in row.concepts)]
        if len(tokens) > 1:
            cells.append(_number(row.mean_fidelity, ".3f"))
        cells += [_number(row.mean_fidelity_plain_base, ".3f"), _number(row.preservation, ".3f"),
                  _number(row.max_residual, ".1e")]
        cells += [_number(row.mean(metric), ".3f") for metric, _ in metrics]
        cells += [_number(row.world[key]["value"], ".2f") if row.world and key in row.world else "n/a"
                  for key, _ in world]
        rows.append(cells)
    return header, rows


def check_outputs(json_path: str | os.PathLike[str] | None = None, plot_path: str | os.PathLike[str] | None = None,
                  *, force: bool = False) -> None:
    """Refuse, before any work, outputs that cannot or must not be written: one path for both,
    a missing or read-only folder, an existing file without ``force``, a plot suffix PIL does
    not write."""
    if json_path is not None and plot_path is not None and _same_file(Path(json_path), Path(plot_path)):
        raise MergeError(f"The JSON and the plot would both be written to {plot_path}; give each its own file.")
    if json_path is not None:
        check_destination(Path(json_path), force=force)
    if plot_path is not None:
        check_plot_path(plot_path, force=force)


def write_outputs(report: EvalReport, *, json_path: str | os.PathLike[str] | None = None,
                  plot_path: str | os.PathLike[str] | None = None, force: bool = False) -> list[Path]:
    """Write the JSON and / or the plot, all or nothing: each goes to a temporary name first, and
    only when every one is written are they all renamed into place, in one step that puts back
    what it replaced if a rename fails; so a failure leaves no partial output."""
    check_outputs(json_path, plot_path, force=force)
    writers: list[tuple[Path, Callable[[Path], object]]] = []
    if json_path is not None:
        text = json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n"
        writers.append((Path(json_path), lambda path: path.write_text(text, encoding="utf-8")))
    if plot_path is not None:
        image, image_format = _plot(report), _image_format(Path(plot_path))
        writers.append((Path(plot_path), lambda path: image.save(path, format=image_format)))
    with atomic_outputs([target for target, _ in writers], force=force, check=False) as temporaries:
        for (target, write), temporary in zip(writers, temporaries):
            try:
                write(temporary)
            except OSError as error:
                raise MergeError(f"Cannot write {target}: {error.strerror or error}.") from error
    return [target for target, _ in writers]


def write_json(report: EvalReport, path: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Write :meth:`EvalReport.to_dict` as JSON, atomically."""
    return write_outputs(report, json_path=path, force=force)[0]


def save_plot(report: EvalReport, path: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Draw mean fidelity against preservation, one point per row (the soft merges as a curve), atomically."""
    return write_outputs(report, plot_path=path, force=force)[0]


def check_plot_path(path: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Refuse, before any work, a plot path that cannot or must not be written (or drawn: matplotlib
    is an optional extra)."""
    from PIL import Image

    from .plot import require_matplotlib

    require_matplotlib()
    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None or image_format not in Image.SAVE:
        raise MergeError(f"Cannot write the plot {path}: {path.suffix or 'no extension'} is not an image format "
                         f"PIL writes (use .png).")
    check_destination(path, force=force)
    return path


def _plot(report: EvalReport) -> Any:
    """The image of mean fidelity against preservation, one point per row; soft merges as a curve."""
    from .plot import draw_scatter

    points = [(row.preservation, row.mean_fidelity, row.label, row.kind) for row in report.rows
              if math.isfinite(row.preservation) and math.isfinite(row.mean_fidelity)]
    soft = sorted((row.options.get("weight", 0.0), row.preservation, row.mean_fidelity)
                  for row in report.rows if row.kind == "soft")
    curve = [(x, y) for _, x, y in soft if math.isfinite(x) and math.isfinite(y)]
    concepts = ", ".join(f"{c.token} {c.class_word}".strip() for c in report.concepts)
    return draw_scatter(points, curve, title=f"{Path(report.base).name or report.base}: {concepts}",
                        x_label="preservation: held-out change vs base (lower is better)",
                        y_label="mean concept fidelity (higher is better)")


def _same_file(a: Path, b: Path) -> bool:
    """Whether two output paths name one file (through ``..``, links, or an existing file)."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.expanduser().resolve() == b.expanduser().resolve()


def _image_format(path: Path) -> str:
    from PIL import Image

    return Image.registered_extensions()[path.suffix.lower()]


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _number(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    return "n/a" if math.isnan(value) else format(value, spec)


def _finite(value: Any) -> Any:
    """``value`` with NaN / infinite floats replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
