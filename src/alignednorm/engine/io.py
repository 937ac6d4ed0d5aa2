"""Atomic file writes: a result or checkpoint is either complete on disk or absent."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from alignednorm.errors import AlignedNormError, CheckpointError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    A crash or a full disk leaves the old file (or none), never a half-written one.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        raise AlignedNormError(f"cannot write to {path.parent}: {exc.strerror or exc}") from exc
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
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
