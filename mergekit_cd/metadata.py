"""The JSON metadata mergekit-cd writes into its outputs, and reading it back.

One JSON document per file, stored in the safetensors header (``__metadata__`` maps strings
to strings) as ``{"format": "mergekit-cd", "format_version": "1", "mergekit_cd": <json>}``.
The document (format version 1)::

    {
      "format_version": "1",
      "tool": {"name": "mergekit-cd", "version": "0.1.0"},   # the program that wrote the file
      "base": "stable-diffusion-v1-5/stable-diffusion-v1-5" | null,      # name, path or repo id
      "base_fingerprint": "<hex>" | null,                   # hash of the base's K/V weights
      "architecture": "sd1" | "sd2" | "sdxl" | null,
      "concepts": [{"token": "<new1>", "class_word": "cat" | null,
                    "prompts": ["photo of a <new1> cat"], "style": false}],
      "recipe": {}                  # free: how a merge was made (method, inputs + sha256, ridge)
      ...                           # any other JSON-serialisable entry of the object's metadata
    }

Every field but ``format_version`` may be missing; files made by other tools have no
document at all. A newer ``format_version`` is refused rather than half understood.
"""

from __future__ import annotations

import json
from typing import Any

from .architectures import ARCHITECTURES
from .delta import Concept, ConceptDelta, Provenance
from .errors import MergeError
from .limits import MAX_METADATA_BYTES, MAX_PROMPTS, check_limit
from .version import __version__
from .weights import FineTunedWeights

FORMAT_VERSION = "1"
HEADER_FORMAT = "mergekit-cd"
HEADER_KEY = "mergekit_cd"
IDENTITY_FIELDS = ("base", "base_fingerprint", "architecture", "concepts")
#: How deep our documents may nest (ours are 4 levels deep); deeper ones are refused, not recursed into.
MAX_DEPTH = 32
_OWNED_FIELDS = ("format_version", "tool", *IDENTITY_FIELDS)
#: How errors found in a document about to be written begin.
_WRITING = "Cannot write the delta"
#: What a document too deep to parse is read as (``null`` is a document of its own).
_TOO_DEEP = object()


def to_metadata(obj: ConceptDelta | FineTunedWeights) -> dict[str, Any]:
    """The metadata document describing ``obj``; free entries of ``obj.metadata`` are kept."""
    free = {key: value for key, value in obj.metadata.items() if key not in _OWNED_FIELDS}
    return {
        "format_version": FORMAT_VERSION,
        "tool": {"name": "mergekit-cd", "version": __version__},
        "base": obj.base,
        "base_fingerprint": obj.base_fingerprint,
        "architecture": obj.architecture,
        "concepts": [{"token": c.token, "class_word": c.class_word, "prompts": list(c.prompts),
                      "style": c.style} for c in obj.concepts],
        "recipe": {},
        **free,
    }


def provenance_from_metadata(document: dict[str, Any], *, source: str = "metadata") -> Provenance:
    """The :class:`~mergekit_cd.delta.Provenance` a metadata document records (base,
    fingerprint, architecture, concepts, and its other fields as metadata); ``source`` names it
    in errors."""
    if not isinstance(document, dict):
        raise MergeError(f"{source}: mergekit-cd metadata must be a JSON object, got "
                         f"{type(document).__name__}.")
    _check_version(document.get("format_version"), source)
    for name in ("base", "base_fingerprint", "architecture"):
        if not isinstance(document.get(name), (str, type(None))):
            raise MergeError(f"{source}: metadata field {name!r} must be a string or null.")
    architecture = document.get("architecture")
    if architecture is not None and architecture not in ARCHITECTURES:
        raise MergeError(f"{source}: metadata names architecture {architecture!r}; this version "
                         f"knows {', '.join(ARCHITECTURES)}.")
    if not isinstance(document.get("concepts") or [], list):
        raise MergeError(f"{source}: metadata field 'concepts' must be a list.")
    return Provenance(document.get("base"), document.get("base_fingerprint"), architecture,
                      tuple(_concept(entry, source) for entry in document.get("concepts") or ()),
                      {key: value for key, value in document.items() if key not in ("format_version", *IDENTITY_FIELDS)})


def _check_version(version: Any, source: str) -> None:
    if version is None:
        raise MergeError(f"{source}: mergekit-cd metadata has no format_version.")
    if version != FORMAT_VERSION:
        raise MergeError(f"{source}: metadata format_version {version!r} is not one this "
                         f"mergekit-cd reads ({FORMAT_VERSION!r}); upgrade mergekit-cd.")


def _concept(entry: Any, source: str) -> Concept:
    valid = (isinstance(entry, dict) and isinstance(entry.get("token"), str)
             and isinstance(entry.get("class_word"), (str, type(None)))
             and isinstance(entry.get("prompts", []), list)
             and all(isinstance(p, str) for p in entry.get("prompts", []))
             and isinstance(entry.get("style", False), bool))
    if not valid:
        raise MergeError(f"{source}: metadata concept {entry!r} is malformed; expected "
                         f'{{"token": str, "class_word": str|null, "prompts": [str], "style": bool}}.')
    check_limit(len(entry.get("prompts", ())), MAX_PROMPTS,
                f"the concept {entry['token']!r} records {{count}} target prompts", source)
    return Concept(entry["token"], entry.get("class_word"), tuple(entry.get("prompts", ())),
                   entry.get("style", False))


def to_header(obj: ConceptDelta | FineTunedWeights) -> dict[str, str]:
    """The safetensors ``__metadata__`` (string -> string) carrying ``obj``'s metadata."""
    return {"format": HEADER_FORMAT, "format_version": FORMAT_VERSION, HEADER_KEY: dump_document(obj)}


def dump_document(obj: ConceptDelta | FineTunedWeights, **extra: Any) -> str:
    """``obj``'s metadata document (with ``extra`` fields) as JSON, read back the way a reader
    will before anything is written: every file we write is one we read (the same bounds)."""
    try:
        text = json.dumps({**to_metadata(obj), **extra}, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise MergeError(f"The delta's metadata cannot be stored as JSON: {error}.") from None
    provenance_from_metadata(parse_document(text, source=_WRITING, where="its metadata"), source=_WRITING)
    return text


def from_header(header: dict[str, str], *, source: str) -> Provenance:
    """The provenance a safetensors header records; the empty one when it has none of ours."""
    if header.get("format") != HEADER_FORMAT or HEADER_KEY not in header:
        return Provenance()
    _check_version(header.get("format_version"), source)
    return provenance_from_metadata(parse_document(header[HEADER_KEY], source=source, where="the header"),
                                  source=source)


def parse_document(text: str, *, source: str, where: str) -> Any:
    """Our metadata JSON ``text`` (found in ``where`` of ``source``), refusing what a well-formed
    document never holds: invalid JSON, a key given twice (JSON would silently keep the last),
    and nesting deeper than :data:`MAX_DEPTH` (200,000 levels would exhaust the recursion of
    every reader and writer after us)."""
    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        repeated = next((key for key, _ in pairs if key in seen or seen.add(key)), None)
        if repeated is not None:
            raise MergeError(f"{source}: the mergekit-cd metadata in {where} gives the key {repeated!r} twice.")
        return dict(pairs)

    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    check_limit(size, MAX_METADATA_BYTES, f"the mergekit-cd metadata in {where} is {{count}} bytes", source)
    try:
        document = json.loads(text, object_pairs_hook=unique)
    except json.JSONDecodeError as error:
        raise MergeError(f"{source}: the mergekit-cd metadata in {where} is not valid JSON ({error}).") from None
    except RecursionError:
        document = _TOO_DEEP
    if document is _TOO_DEEP or _depth(document) > MAX_DEPTH:
        raise MergeError(f"{source}: the mergekit-cd metadata in {where} nests deeper than {MAX_DEPTH} levels; "
                         f"no file mergekit-cd writes does.")
    return document


def _depth(document: Any) -> int:
    """How deeply lists and objects nest in ``document`` (iteratively: no recursion to exhaust)."""
    deepest, stack = 0, [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_DEPTH:
                stack.extend((item, depth + 1) for item in (value.values() if isinstance(value, dict) else value))
    return deepest
