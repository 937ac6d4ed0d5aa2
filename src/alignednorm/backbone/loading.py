"""Load CLIP weights from the files people actually have.

Supported, all local (nothing here downloads):

* OpenAI's 2021 TorchScript archives (``ViT-B-16.pt``): read with a restricted unpickler
  that rebuilds tensors and never executes code from the archive; ``torch.jit.load`` is the
  fallback for archives the reader does not understand.
* Plain state dicts in OpenAI naming, saved with ``torch.save`` or as safetensors.
* open_clip checkpoints (``{"state_dict": ...}``, ``module.`` prefixes) with an open_clip
  model name, e.g. ``ViT-B-16`` + ``open_clip_pytorch_model.bin``.

OpenAI checkpoints always get QuickGELU: open_clip's ``create_model`` silently builds GELU
for such files, which shifts every feature a little (see specs/ecosystem.md §3.3).
"""

from __future__ import annotations

import io
import logging
import pickle
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import ClassVar

import open_clip
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import load_file

from alignednorm.errors import CheckpointError, state_mismatch

log = logging.getLogger(__name__)

# Keys OpenAI archives carry that are not model weights.
_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size")


class _Inert:
    """Stands in for any TorchScript class while unpickling: it only keeps its state."""

    def __init__(self, *args, **kwargs):
        self.state = None

    def __setstate__(self, state):
        self.state = state


class _TensorOnlyUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript ``data.pkl`` allowing only tensor rebuilds and containers."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
    }

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._prefix = prefix
        self._storages: dict[str, torch.UntypedStorage] = {}

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return _Inert
        if module == "torch" and name.endswith("Storage"):
            return getattr(torch, name)
        if (module, name) in self._ALLOWED:
            return getattr(__import__(module, fromlist=[name]), name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint archive")

    def persistent_load(self, pid):
        _, storage_type, key, _location, _numel = pid
        if key not in self._storages:
            raw = self._archive.read(f"{self._prefix}/data/{key}")
            self._storages[key] = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8)
        dtype = storage_type.dtype if hasattr(storage_type, "dtype") else storage_type(0).dtype
        return torch.storage.TypedStorage(wrap_storage=self._storages[key], dtype=dtype, _internal=True)


def _collect_tensors(obj, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Walk the unpickled module tree and name every tensor the way ``state_dict`` does."""
    if isinstance(obj, _Inert):
        _collect_tensors(obj.state, prefix, out)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(key, str) and not key.startswith("_"):
                _collect_tensors(value, f"{prefix}{key}.", out)
    elif isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = obj


def read_torchscript_archive(path: Path) -> dict[str, torch.Tensor]:
    """Read the tensors of a TorchScript archive without executing any of its code."""
    with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkl:
            raise CheckpointError(f"{path}: zip archive without a top-level data.pkl; not a TorchScript file")
        prefix = pkl[0].split("/")[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # TypedStorage deprecation, internal only
            root = _TensorOnlyUnpickler(archive.read(pkl[0]), archive, prefix).load()
    tensors: dict[str, torch.Tensor] = {}
    _collect_tensors(root, "", tensors)
    # The causal mask is an attribute (OpenAI) or a non-persistent buffer (open_clip), not a weight.
    return {k: v for k, v in tensors.items() if k.rsplit(".", 1)[-1] != "attn_mask"}


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    """Accept ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers and DDP ``module.`` prefixes."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (or a TorchScript CLIP archive)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a CLIP checkpoint file of any supported format into a flat state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises several error types for bad headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    if _is_torchscript(path):
        try:
            return read_torchscript_archive(path)
        except (pickle.UnpicklingError, KeyError, ValueError, TypeError) as exc:
            log.warning("%s: code-free reader failed (%s); falling back to torch.jit.load", path, exc)
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: unknown checkpoint format ({type(exc).__name__}); expected an OpenAI .pt archive, "
            "a torch state dict, an open_clip checkpoint or a .safetensors file"
        ) from exc
    return _unwrap(obj, path)


def openai_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """Infer the architecture of an OpenAI-format state dict (ViT or ResNet image tower)."""
    sd = state_dict
    for key in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection"):
        if key not in sd:
            raise CheckpointError(f"not an OpenAI-format CLIP state dict: missing key {key!r}")
    if "visual.proj" in sd:
        width = sd["visual.conv1.weight"].shape[0]
        patch = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        layers = len([k for k in sd if k.startswith("visual.transformer.resblocks.") and k.endswith("in_proj_weight")])
        vision = {"layers": layers, "width": width, "patch_size": patch, "image_size": patch * grid}
    else:
        counts = [len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4)]
        grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = {"layers": tuple(counts), "width": sd["visual.layer1.0.conv1.weight"].shape[0], "image_size": grid * 32}
    text_width = sd["ln_final.weight"].shape[0]
    text = {
        "context_length": sd["positional_embedding"].shape[0],
        "vocab_size": sd["token_embedding.weight"].shape[0],
        "width": text_width,
        "heads": max(1, text_width // 64),
        "layers": len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}),
    }
    return {"embed_dim": sd["text_projection"].shape[1], "vision_cfg": vision, "text_cfg": text}


def _load_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    mismatch = state_mismatch(expected, state_dict)
    if mismatch:
        raise CheckpointError(f"{source}: weights do not fit the model: {mismatch}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state_dict.items()})


def build_openai_clip(state_dict: dict[str, torch.Tensor], source: str = "state dict") -> CLIP:
    """Build an open_clip ``CLIP`` (QuickGELU, float32) holding an OpenAI-format state dict."""
    sd = {k: v for k, v in state_dict.items() if k not in _NON_WEIGHT_KEYS}
    cfg = openai_config(sd)
    model = CLIP(
        cfg["embed_dim"],
        vision_cfg=CLIPVisionCfg(**cfg["vision_cfg"]),
        text_cfg=CLIPTextCfg(**cfg["text_cfg"]),
        quick_gelu=True,  # OpenAI trained with QuickGELU
    )
    _load_strict(model, sd, source)
    return model.float().eval()


def load_clip(path: str | Path, model_name: str | None = None) -> CLIP:
    """Load a CLIP model from a local file.

    Args:
        path: an OpenAI ``.pt`` archive, a state dict (``.pt``/``.bin``/``.safetensors``) in OpenAI
            naming, or an open_clip checkpoint.
        model_name: the open_clip architecture name (``"ViT-B-16"``) for open_clip checkpoints;
            ``None`` infers an OpenAI-style architecture from the weights.

    Returns:
        An open_clip ``CLIP`` in eval mode, float32, on the CPU.
    """
    state_dict = read_state_dict(path)
    if model_name is None:
        return build_openai_clip(state_dict, source=str(path))
    if model_name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if model_name.lower() in m.lower()][:5]
        raise CheckpointError(f"unknown open_clip model {model_name!r}" + (f"; close: {close}" if close else ""))
    model = open_clip.create_model(model_name, pretrained=None)
    _load_strict(model, OrderedDict(state_dict), str(path))
    return model.float().eval()
