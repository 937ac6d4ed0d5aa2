"""Atomic file writes: a result or checkpoint is either complete on disk or absent.

Each write goes to ``.<name>.<8 hex digits>.tmp`` beside its target and is renamed into place;
:func:`clean_stale_temp_files` removes the ones an interrupted process left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from alignednorm.errors import AlignedNormError, CheckpointError

# The temp names of atomic_write. The 8-character token also matches the names that earlier
# versions made with tempfile.mkstemp (lowercase letters, digits, "_"), so their leftovers go too.
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp")


def _create_temp(path: Path) -> Path:
    """Create an empty, new temp file beside ``path``, with the permissions the umask gives.

    ``tempfile.mkstemp`` would make it 0600, and the rename would keep that for the result.
    """
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temp name beside {path}")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    A crash or a full disk leaves the old file (or none), never a half-written one. The file gets
    the mode any new file gets under the current umask (0644 under umask 022).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = _create_temp(path)
    except OSError as exc:
        raise AlignedNormError(f"cannot write to {path.parent}: {exc.strerror or exc}") from exc
    try:
        mode = stat.S_IMODE(tmp_path.stat().st_mode)
        write(tmp_path)
        if stat.S_IMODE(tmp_path.stat().st_mode) != mode:
            os.chmod(tmp_path, mode)  # the writer made a new file (safetensors does, as 0600)
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise AlignedNormError(f"could not write {path}: {exc.strerror or exc}; nothing was left half-written") from exc
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def clean_stale_temp_files(folder: str | Path, min_age_s: float = 0.0) -> list[Path]:
    """Remove the temp files that interrupted atomic writes left in ``folder`` (not its subfolders).

    Only regular files named like this module's temp files (``.<name>.<token>.tmp``) are removed,
    never anything else. A temp file of a write still in progress is indistinguishable from a
    stale one, so call this while no writer uses ``folder`` (e.g. holding the run lock), or pass
    ``min_age_s`` to spare files modified in the last ``min_age_s`` seconds.

    Returns:
        The removed files, sorted; [] when ``folder`` does not exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now = time.time()
    removed = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not _TEMP_NAME.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < min_age_s:
                continue
            os.unlink(entry.path)
        except FileNotFoundError:  # another cleaner or the writer itself got there first
            continue
        except OSError as exc:
            raise AlignedNormError(f"cannot remove stale temp file {entry.path}: {exc.strerror or exc}") from exc
        removed.append(Path(entry.path))
    return removed


def write_json(path: str | Path, data) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a corrupt header
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def save_torch(path: str | Path, obj) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) for this process."""
    info = os.stat(path)
    key = (str(Path(path).resolve()), info.st_size, info.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]
