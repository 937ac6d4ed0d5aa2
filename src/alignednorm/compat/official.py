"""Import prompts trained with the official code of any method that declares its official names.

Each method declares how the official code names its learned tensors
(``MethodTraits.official_names``, :mod:`alignednorm.methods.official_names`); this module only reads
Dassl's files and applies that naming. Dassl saves the whole ``CustomCLIP`` state dict (frozen CLIP included) in
``<output>/MultiModalRepresentationLearner/model.pth.tar-<epoch>``. We keep only the learned
tensors and rename them onto our modules; the frozen CLIP weights in the file are ignored
(ours come from the backbone checkpoint) and ``prompt_embeddings`` (class-specific) is dropped,
as the official loader does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from alignednorm.errors import CheckpointError
from alignednorm.methods.base import Method, get_method_class
from alignednorm.methods.official_names import OfficialNames


def official_names(method: str | None) -> OfficialNames:
    """The naming a method declares (``MethodTraits.official_names``); ``None`` reads MMRL / MMRL++ / AlignedNorm."""
    names = get_method_class(method or "mmrlpp").traits.official_names
    if names is None:
        raise CheckpointError(f"method {method!r} declares no official checkpoint names to import")
    return names


def official_to_ours(name: str, method: str | None = None) -> str | None:
    """Our parameter name for an official learnable tensor, or ``None`` for frozen / unknown ones."""
    return official_names(method).to_ours(name)


def ours_to_official(name: str, official: list[str] | None = None, method: str | None = None) -> str | None:
    """The official name of one of our learnable tensors (``None`` if it has none)."""
    return official_names(method).to_official(name, official)


def to_official_state(state: dict[str, torch.Tensor], method: str | None = None) -> dict[str, torch.Tensor]:
    """Our learnable tensors under the official code's names (for its ``load_model``)."""
    names = official_names(method)
    return {names.to_official(k) or k: v for k, v in state.items()}


def convert_official_state(state: dict[str, torch.Tensor], method: str | None = None) -> dict[str, torch.Tensor]:
    """Keep the learned tensors of an official state dict, under our names (the method's declared naming)."""
    names = official_names(method)
    out = names.convert(state)
    if not out:
        raise CheckpointError(f"no {method or 'MMRL/MMRL++/AlignedNorm'} learnable tensors found "
                              f"(expected names such as '{names.example}')")
    return out


def read_official_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a Dassl ``model.pth.tar-N`` (or a bare state dict / safetensors) of the official code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"official checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001  (safetensors raises its own error types for damaged files)
            raise CheckpointError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable Dassl checkpoint ({type(exc).__name__}: {exc})") from exc
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict with a 'state_dict' entry (Dassl's save_checkpoint format)")
    return state


def import_official(method: Method, path: str | Path) -> None:
    """Load learned values from an official checkpoint into ``method`` (strict on what it needs)."""
    state = convert_official_state(read_official_checkpoint(path), method.name)
    method.load_learnable_state_dict(state, source=str(path))
