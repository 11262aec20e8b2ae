"""Turn a model or delta reference into a local path: a folder or file on disk, or a Hugging
Face repo id (``org/name``, optionally ``org/name@revision``) fetched through the hub cache.
A delta reference may also name one file or folder inside a repo: ``org/name:path/in/repo``
or ``org/name@revision:path/in/repo`` (:func:`split_path`).

Only the files a caller asks for (``allow_patterns``) are fetched, so opening a base model never
downloads its VAE. The cache is huggingface_hub's own (``HF_HUB_CACHE`` / ``HF_HOME``, read by
huggingface_hub when it is imported), so files fetched by diffusers are reused and vice versa.

Offline use never waits on the network: with ``HF_HUB_OFFLINE=1`` only the cache is read, and
otherwise a short probe of the hub endpoint decides first whether the hub can be reached at
all (huggingface_hub itself has no timeout on its metadata requests). A repo or file that is
not in the cache then gives one :class:`MergeError` naming the repo, what is missing, the
cache folder and the fix.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import constants, get_session, snapshot_download
from huggingface_hub.utils import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .builtin import builtin_folder
from .errors import MergeError

#: Seconds to wait for the hub endpoint before treating the machine as offline.
PROBE_TIMEOUT_SECONDS = 5.0

# owner/name, each part letters, digits, "-", "_" or "." (the hub's rule), optional @revision.
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)(?:@(?P<revision>[^\s@]+))?$")


def parse_repo_reference(reference: str, revision: str | None = None) -> tuple[str, str | None]:
    """Split ``org/name@revision`` into (repo id, revision); MergeError when it is no repo id.

    A revision given both ways must agree, so a caller's option never silently overrides the
    reference the user wrote.
    """
    match = _REPO_ID.match(reference)
    if match is None or ".." in reference:
        raise MergeError(f"{reference} is not a local file or folder, nor a Hugging Face repo id "
                         f"(org/name or org/name@revision).")
    written = match.group("revision")
    if written and revision and written != revision:
        raise MergeError(f"{reference} names revision {written}, but revision {revision} was also "
                         f"given; give it once.")
    return match.group("repo"), written or revision


def split_path(reference: str) -> tuple[str, str | None]:
    """``org/name@revision:path/in/repo`` -> (``org/name@revision``, ``path/in/repo``).

    Without ``:`` the path is None (the whole repo). A path that leaves the repo (``..``) or is
    empty is a MergeError. (Git revisions cannot hold ``:``, so the first one splits.)
    """
    repo, colon, inside = reference.partition(":")
    if not colon:
        return reference, None
    inside = inside.strip("/")
    if not inside or "\\" in inside or any(part in ("", ".", "..") for part in inside.split("/")):
        raise MergeError(f"{reference}: {inside or 'nothing'!r} after ':' is not a path inside the repo "
                         f"(expected org/name:folder/file.safetensors).")
    return repo, inside


def cache_folder() -> Path:
    """The hub cache huggingface_hub uses (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    return Path(constants.HF_HUB_CACHE).expanduser()


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks huggingface_hub for no network."""
    return bool(constants.is_offline_mode())


def hub_reachable() -> bool:
    """Whether the hub endpoint answers within :data:`PROBE_TIMEOUT_SECONDS`.

    Any failure to get a response (no DNS, refused, timeout, proxy error) counts as unreachable:
    the probe only decides whether to read the cache alone.
    """
    return not is_offline() and _answers(constants.ENDPOINT)


@functools.lru_cache(maxsize=None)
def _answers(endpoint: str) -> bool:
    """One probe per endpoint and process: a dead network costs the timeout once, not per file."""
    try:
        get_session().head(endpoint, timeout=PROBE_TIMEOUT_SECONDS)
    except Exception:  # noqa: BLE001 - every failure mode means "no usable network"
        return False
    return True


def resolve(reference: str, *, allow_patterns: Sequence[str] | None = None,
            ignore_patterns: Sequence[str] | None = None, revision: str | None = None) -> Path:
    """A local path for ``reference``: an existing file or folder as is, else a repo snapshot.

    For a repo id, only files matching ``allow_patterns`` and none of ``ignore_patterns``
    (fnmatch, as huggingface_hub reads them, where ``*`` also matches ``/``: ``"*/*"`` ignores
    every file below the top level; ``None`` = no filter) are fetched into the hub cache; the
    snapshot folder is returned.
    Offline, or when the hub cannot be reached, the cached snapshot is used. The snapshot
    may still lack files the hub could not be asked for: callers check what they need and
    report it with :func:`missing_files_error`.
    """
    shipped = builtin_folder(reference)
    if shipped is not None:
        return shipped
    local = Path(reference).expanduser()
    if local.exists():
        return local
    repo_id, revision = parse_repo_reference(reference, revision)
    online = hub_reachable()
    try:
        folder = snapshot_download(repo_id, revision=revision, local_files_only=not online,
                                   allow_patterns=list(allow_patterns) if allow_patterns else None,
                                   ignore_patterns=list(ignore_patterns) if ignore_patterns else None)
    except LocalEntryNotFoundError:
        raise MergeError(_not_cached_message(reference, repo_id, revision, online)) from None
    except RevisionNotFoundError:
        raise MergeError(f"The Hugging Face repo {repo_id} has no revision {revision}.") from None
    except (GatedRepoError, RepositoryNotFoundError):
        raise MergeError(f"{reference} is not a local file or folder, and the Hugging Face repo "
                         f"{repo_id} was not found or needs access: check the name, or log in "
                         f"(`hf auth login`) and accept the model's terms on its hub page.") from None
    except HFValidationError as error:
        raise MergeError(f"{reference} is not a valid Hugging Face repo id: {error}") from None
    except HfHubHTTPError as error:
        raise MergeError(f"Fetching {repo_id} from the Hugging Face hub failed: {error}") from None
    return Path(folder)


def missing_files_error(reference: str, folder: Path, missing: Sequence[str], *, what: str) -> MergeError:
    """One error for files that a resolved reference lacks, with the fix that fits its origin.

    ``what`` names the thing the reference should be (e.g. "diffusers Stable Diffusion folder").
    """
    listed = ", ".join(missing)
    if Path(reference).expanduser().exists():
        return MergeError(f"{folder} is not a complete {what}: it lacks {listed}.")
    repo_id, _ = parse_repo_reference(reference)
    return MergeError(f"The Hugging Face repo {repo_id} (snapshot {folder} in the hub cache "
                      f"{cache_folder()}) is not a complete {what}: it lacks {listed}. Either the repo "
                      f"does not have them or they were never fetched into this cache. {_fix(repo_id)}")


def _not_cached_message(reference: str, repo_id: str, revision: str | None, online: bool) -> str:
    """Why a repo is not available, for the cache-only path (offline or hub unreachable)."""
    if is_offline():
        why = "HF_HUB_OFFLINE is set"
    elif online:
        why = "the hub could not provide it"
    else:
        why = f"the hub ({constants.ENDPOINT}) cannot be reached"
    at = f" at revision {revision}" if revision else ""
    return (f"{reference} is not a local file or folder, and the Hugging Face repo {repo_id}{at} is "
            f"not in the hub cache {cache_folder()} ({why}). {_fix(repo_id)}")


def _fix(repo_id: str) -> str:
    return (f"Fix: run `hf download {repo_id}` (`huggingface-cli download {repo_id}` with older "
            f"huggingface_hub) on a connected machine and copy its cache here, or point "
            f"HF_HUB_CACHE at a cache that has it.")
