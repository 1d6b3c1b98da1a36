"""Hugging Face hub ids (``org/name`` or ``org/name@revision``) resolved to a local snapshot folder.

Resolution goes through ``huggingface_hub`` and its cache, so a model downloaded once by any tool is
found again. ``HF_HUB_CACHE`` (or ``HF_HOME``/hub) and ``HF_HUB_OFFLINE`` are read when a checkpoint is
opened, not when the library was imported. Only what mergescope needs is fetched: the top-level weights
(safetensors shards and their index, else ``pytorch_model*.bin``, or a LoRA adapter), ``config.json``,
``generation_config.json`` and the tokenizer files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import CheckpointError
from .model_files import MODEL_FILES

# huggingface_hub is imported inside the functions that reach the hub: start-up cost (about 0.5 s, paid only
# by hub ids)

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
_FILE_SUFFIXES = (".safetensors", ".json", ".bin", ".pt", ".pth", ".yml", ".yaml")
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_OFFLINE_PATTERNS = ["*.safetensors", "*.safetensors.index.json", *_ADAPTER_FILES, *MODEL_FILES]


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``text`` looks like a hub id, else None."""
    match = HUB_ID.match(text)
    if not match or text.startswith((".", "/", "~")) or text.endswith(_FILE_SUFFIXES):
        return None
    return match["repo"], match["revision"]


def hub_cache_dir() -> Path:
    """The hub cache folder: ``HF_HUB_CACHE``, else ``HF_HOME``/hub, else ``~/.cache/huggingface/hub``."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def files_to_fetch(repo_files: list[str]) -> list[str]:
    """The files of a repository mergescope reads: weights in one format, config and tokenizer.

    Only top-level files count. Sharded ``model-*.safetensors`` with their index win over a single
    ``model.safetensors``, which wins over any other ``*.safetensors`` (Mistral's ``consolidated``
    copy is never fetched beside the shards), which win over ``pytorch_model*.bin``.
    """
    top = [f for f in repo_files if "/" not in f]
    extras = [f for f in top if f in MODEL_FILES]
    if "adapter_config.json" in top:
        return [*extras, *(f for f in _ADAPTER_FILES if f in top)]
    if "model.safetensors.index.json" in top:
        shards = [f for f in top if f.startswith("model-") and f.endswith(".safetensors")]
        return [*extras, "model.safetensors.index.json", *shards]
    if "model.safetensors" in top:
        return [*extras, "model.safetensors"]
    safetensors = [f for f in top if f.endswith((".safetensors", ".safetensors.index.json"))]
    if safetensors:
        return [*extras, *safetensors]
    return [*extras, *(f for f in top if f.startswith("pytorch_model") and f.endswith((".bin", ".bin.index.json")))]


def resolve_hub_id(text: str) -> Path:
    """Download (or find in the cache) hub id ``text`` and return its snapshot folder.

    Online, the repository's file list decides what to fetch; when the hub cannot be reached, the cache
    is used as if ``HF_HUB_OFFLINE`` were set.
    """
    parsed = parse_hub_id(text)
    if parsed is None:
        raise CheckpointError(f"{text}: not a hub id (expected org/name or org/name@revision)")
    repo, revision = parsed
    cache = hub_cache_dir()
    if not hub_offline():
        try:
            return _fetch(text, repo, revision, cache)
        except _Unreachable as exc:
            try:
                return _from_cache(text, repo, revision, cache)
            except CheckpointError:
                raise CheckpointError(
                    f"{text}: cannot reach the hub ({exc}) and it is not in the cache {cache}"
                ) from None
    return _from_cache(text, repo, revision, cache)


class _Unreachable(Exception):
    """The hub could not be reached (network down, proxy, timeout)."""


def _from_cache(text: str, repo: str, revision: str | None, cache: Path) -> Path:
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import snapshot_download

    patterns = _OFFLINE_PATTERNS + ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
    try:
        folder = snapshot_download(
            repo, revision=revision, cache_dir=cache, allow_patterns=patterns, local_files_only=True
        )
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled):
        raise CheckpointError(
            f"{text}: not in the hub cache {cache} and HF_HUB_OFFLINE is set; download it first "
            f"(`hf download {repo}`) or unset HF_HUB_OFFLINE"
        ) from None
    except hub_errors.HFValidationError as exc:
        raise CheckpointError(f"{text}: not a valid hub id ({exc})") from None
    return Path(folder)


def _fetch(text: str, repo: str, revision: str | None, cache: Path) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import errors as hub_errors

    try:
        patterns = files_to_fetch(HfApi().list_repo_files(repo, revision=revision))
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache, allow_patterns=patterns))
    except hub_errors.GatedRepoError:
        raise CheckpointError(
            f"{text}: gated repository; accept its licence on the hub and log in (`hf auth login`)"
        ) from None
    except hub_errors.RepositoryNotFoundError:
        raise CheckpointError(
            f"{text}: no such repository on the hub (or it is private: log in with `hf auth login`)"
        ) from None
    except hub_errors.RevisionNotFoundError:
        raise CheckpointError(f"{text}: the repository has no revision {revision!r}") from None
    except hub_errors.HFValidationError as exc:
        raise CheckpointError(f"{text}: not a valid hub id ({exc})") from None
    except (hub_errors.HfHubHTTPError, *hub_errors.HfHubHTTPError.__bases__, OSError) as exc:
        # HfHubHTTPError's bases include the HTTP library's own error class (httpx's HTTPError in
        # huggingface_hub 2.x), whose ConnectError & co. are not OSErrors: a hub that cannot be reached.
        raise _Unreachable((str(exc).splitlines() or [type(exc).__name__])[0]) from None
