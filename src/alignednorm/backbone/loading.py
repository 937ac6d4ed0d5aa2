"""Load CLIP weights from the files people actually have.

Supported, all local (nothing here downloads):

* OpenAI's 2021 TorchScript archives (``ViT-B-16.pt``): read with a restricted unpickler
  that rebuilds tensors and never executes code from the archive; ``torch.jit.load`` is the
  fallback for archives the reader does not understand.
* Plain state dicts in OpenAI naming, saved with ``torch.save`` or as safetensors.
* open_clip checkpoints (``{"state_dict": ...}``, ``module.`` prefixes) with an open_clip
  model name, e.g. ``ViT-B-16`` + ``open_clip_pytorch_model.bin``, EVA-CLIP's included
  (``EVA02-B-16``: a timm ``Eva`` image tower, the text tower under ``text.*``). Building the
  model downloads nothing: timm towers are built with random weights, then the file is loaded.

OpenAI checkpoints always get QuickGELU: open_clip's ``create_model`` silently builds GELU
for such files, which shifts every feature a little (see specs/ecosystem.md §3.3).

Without a model name the file itself must say what it is, and only some files do:

* TorchScript archives, and state dicts still carrying the archive's ``input_resolution`` /
  ``context_length`` / ``vocab_size``: OpenAI's, QuickGELU.
* Keys OpenAI's layout never has (``logit_bias``, ``text.*`` of a custom text tower,
  ``visual.trunk.*`` of a timm tower, ...) and open_clip training checkpoints (``epoch`` /
  ``name`` / ``optimizer`` beside ``state_dict``): open_clip files, so :class:`CheckpointError`
  asks for ``--clip-model``, unless their shapes are those of runnable open_clip configs
  (EVA-CLIP's) that agree on the activation: then they load as that config.
* Other plain state dicts are matched by their tensor shapes against open_clip's configs. Shapes
  of an OpenAI release (ViT-B-16, RN50, ...) load as OpenAI's weights (QuickGELU), with a warning:
  a GELU model trained with open_clip on that architecture (LAION's ViT-B-16) has exactly the same
  keys and shapes, and nothing in the file tells them apart. Shapes of other configs load as
  that config when all matches agree on the activation, and raise otherwise. Shapes of no config
  (the mini CLIP, test models) load in OpenAI's layout with QuickGELU. Each case logs which.

Only architectures the block-by-block runner (``ClipBackbone``) runs exactly are built: see
:func:`config_problems`.
"""

from __future__ import annotations

import copy
import io
import logging
import pickle
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import open_clip
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import ResidualAttentionBlock, TextTransformer, VisionTransformer
from safetensors.torch import load_file

from alignednorm.backbone.eva import tower_problems
from alignednorm.errors import CheckpointError, state_mismatch

log = logging.getLogger(__name__)

# Keys OpenAI archives carry that are not model weights.
_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size")
# The first name component of every key in OpenAI's layout.
_OPENAI_ROOTS = {"visual", "transformer", "token_embedding", "positional_embedding", "ln_final", "text_projection",
                 "logit_scale", *_NON_WEIGHT_KEYS}
# open_clip names of OpenAI's released architectures.
OPENAI_RELEASES = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14",
                   "ViT-L-14-336")
BPE_VOCAB_SIZE = 49408  # CLIP's byte-pair vocabulary, the one SimpleTokenizer encodes with


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


@dataclass
class _Checkpoint:
    """A checkpoint file's tensors and what its container said about where it came from.

    Attributes:
        tensors: the flat state dict (wrappers and ``module.`` prefixes removed).
        torchscript: read from a TorchScript archive (only OpenAI ships CLIP that way).
        training: open_clip training-checkpoint fields found beside ``state_dict`` (``epoch``, ...).
    """

    tensors: dict[str, torch.Tensor]
    torchscript: bool = False
    training: tuple[str, ...] = ()


# What open_clip's training program saves beside "state_dict".
_TRAINING_FIELDS = ("epoch", "name", "optimizer", "scaler")


def _unwrap(obj, path: Path) -> _Checkpoint:
    """Accept ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers and DDP ``module.`` prefixes."""
    training: tuple[str, ...] = ()
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                if key == "state_dict":
                    training = tuple(k for k in _TRAINING_FIELDS if k in obj)
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (or a TorchScript CLIP archive)")
    return _Checkpoint({k.removeprefix("module."): v for k, v in obj.items()}, training=training)


def _read_checkpoint(path: Path) -> _Checkpoint:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return _Checkpoint(load_file(str(path)))
        except Exception as exc:  # safetensors raises several error types for bad headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    if _is_torchscript(path):
        try:
            return _Checkpoint(read_torchscript_archive(path), torchscript=True)
        except (pickle.UnpicklingError, KeyError, ValueError, TypeError) as exc:
            log.warning("%s: code-free reader failed (%s); falling back to torch.jit.load", path, exc)
            return _Checkpoint(dict(torch.jit.load(str(path), map_location="cpu").state_dict()), torchscript=True)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: unknown checkpoint format ({type(exc).__name__}); expected an OpenAI .pt archive, "
            "a torch state dict, an open_clip checkpoint or a .safetensors file"
        ) from exc
    return _unwrap(obj, path)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a CLIP checkpoint file of any supported format into a flat state dict."""
    return _read_checkpoint(Path(path)).tensors


def _require(sd: dict[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"{source}: not a CLIP state dict in OpenAI naming: missing key {key!r}")
    return sd[key]


def openai_config(state_dict: dict[str, torch.Tensor], source: str = "state dict") -> dict:
    """Infer the architecture of an OpenAI-format state dict (ViT or ResNet image tower).

    Raises:
        CheckpointError: naming ``source`` and the first missing key the inference needs.
    """
    sd = state_dict
    for key in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection"):
        _require(sd, key, source)
    if any(k.startswith("visual.transformer.") for k in sd) or "visual.proj" in sd:
        conv1 = _require(sd, "visual.conv1.weight", source)
        width, patch = conv1.shape[0], conv1.shape[-1]
        grid = round((_require(sd, "visual.positional_embedding", source).shape[0] - 1) ** 0.5)
        _require(sd, "visual.proj", source)
        layers = len([k for k in sd if k.startswith("visual.transformer.resblocks.") and k.endswith("in_proj_weight")])
        vision = {"layers": layers, "width": width, "patch_size": patch, "image_size": patch * grid}
    elif any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in sd):
        counts = [len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4)]
        grid = round((_require(sd, "visual.attnpool.positional_embedding", source).shape[0] - 1) ** 0.5)
        width = _require(sd, "visual.layer1.0.conv1.weight", source).shape[0]
        vision = {"layers": tuple(counts), "width": width, "image_size": grid * 32}
    else:
        raise CheckpointError(f"{source}: not a CLIP state dict in OpenAI naming: no image tower "
                              "(neither visual.transformer.* of a ViT nor visual.layer1.* of a ResNet)")
    text_width = _text_width(sd)
    text = {
        "context_length": sd["positional_embedding"].shape[0],
        "vocab_size": sd["token_embedding.weight"].shape[0],
        "width": text_width,
        "heads": max(1, text_width // 64),
        "layers": len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}),
    }
    # A model with no blocks would load without complaint from such a file, and compute nonsense.
    for what, count in (("visual.transformer.resblocks.*", vision["layers"]),
                        ("transformer.resblocks.*", text["layers"])):
        if not count:
            raise CheckpointError(f"{source}: not a CLIP state dict in OpenAI naming: no blocks ({what})")
    return {"embed_dim": sd["text_projection"].shape[1], "vision_cfg": vision, "text_cfg": text}


def _text_width(sd: dict[str, torch.Tensor]) -> int:
    """The text tower's width as most of its width-bearing tensors say it, so that one wrong tensor is the
    one the strict load names (OpenAI's loader reads it from ``ln_final.weight`` alone)."""
    widths = [sd[k].shape[i] for k, i in (("ln_final.weight", 0), ("ln_final.bias", 0), ("positional_embedding", 1),
                                          ("token_embedding.weight", 1), ("text_projection", 0))
              if k in sd and sd[k].dim() > i]
    return max(set(widths), key=widths.count) if widths else sd["ln_final.weight"].shape[0]


def _load_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    mismatch = state_mismatch(expected, state_dict)
    if mismatch:
        raise CheckpointError(f"{source}: weights do not fit the model: {mismatch}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state_dict.items()})


def build_openai_clip(state_dict: dict[str, torch.Tensor], source: str = "state dict") -> CLIP:
    """Build an open_clip ``CLIP`` (QuickGELU, float32) holding an OpenAI-format state dict."""
    sd = {k: v for k, v in state_dict.items() if k not in _NON_WEIGHT_KEYS}
    cfg = openai_config(sd, source)
    model = CLIP(
        cfg["embed_dim"],
        vision_cfg=CLIPVisionCfg(**cfg["vision_cfg"]),
        text_cfg=CLIPTextCfg(**cfg["text_cfg"]),
        quick_gelu=True,  # OpenAI trained with QuickGELU
    )
    _load_strict(model, sd, source)
    return model.float().eval()


# ----------------------------------------------------------------------------- open_clip configs
# Config settings that do not change what the runner computes (sizes, init, norms and activations
# inside the blocks it calls, outputs it does not use). A setting outside these is refused, so a
# field a later open_clip adds is never run unchecked.
_NEUTRAL = {
    "model": {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
              "nonscalar_logit_scale"},
    "vision": {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size", "ls_init_value",
               "patch_dropout", "no_ln_pre", "pos_embed_type", "output_tokens", "act_kwargs", "norm_kwargs",
               # pooling the class token before or after ln_post gives the same vector
               "final_ln_after_pool", "attn_pooler_queries", "attn_pooler_heads",
               "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path"},
    "text": {"context_length", "width", "heads", "layers", "mlp_ratio", "ls_init_value", "pad_id", "eos_id",
             "final_ln_after_pool", "proj_bias", "output_tokens", "act_kwargs", "norm_kwargs",
             "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"},
}
# Flags that make open_clip build its custom attention blocks, which the runner does not call.
_CUSTOM_BLOCK_FLAGS = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
# timm trunks of open_clip's EVA-CLIP configs, each run by backbone/eva.py exactly like open_clip on tiny
# random weights of its kind (tests/test_eva.py): EVA02-B/L (RoPE, SwiGLU), EVA02-E (post-norm), EVA01-g.
EVA_TRUNKS = ("eva02_base_patch16_clip_224", "eva02_large_patch14_clip_224", "eva02_large_patch14_clip_336",
              "eva02_enormous_patch14_clip_224", "eva_giant_patch14_224")
# timm poolings that attend over all tokens instead of reading a class token.
_ATTENTION_POOLS = ("map", "abs_attn", "rot_attn")


def _block_problem(tower: str, cfg: dict) -> list[str]:
    flags = [f for f in _CUSTOM_BLOCK_FLAGS if cfg.get(f)]
    if cfg.get("block_type") not in (None, "default") or flags:
        which = ", ".join(flags) or f"block_type {cfg['block_type']!r}"
        return [f"custom {tower} blocks ({which}) instead of nn.MultiheadAttention blocks"]
    return []


def _timm_problems(vision: dict) -> list[str]:
    """Why a timm image tower config is not one of EVA-CLIP's (read by :mod:`alignednorm.backbone.eva`)."""
    name, pool, proj = vision["timm_model_name"], vision.get("timm_pool", "avg"), vision.get("timm_proj", "linear")
    problems = [] if name in EVA_TRUNKS else [f"a timm image tower ({name}) other than EVA-CLIP's Eva"]
    if pool != "token":
        why = " (attention pooling: SigLIP-style towers have no class token)" if pool in _ATTENTION_POOLS else ""
        problems.append(f"image pooling {pool!r}{why} instead of the class token ('token')")
    if proj is not None:
        problems.append(f"the timm projection {proj!r} instead of the trunk's linear head (timm_proj null)")
    return problems


def config_problems(cfg: dict) -> list[str]:
    """What in an open_clip model config the block-by-block runner would run wrongly ([] when none).

    Accepted: a ViT image tower pooled by its class token (or OpenAI's ModifiedResNet, or
    EVA-CLIP's timm ``Eva``, see :data:`EVA_TRUNKS`), and CLIP's text tower, on the model or under
    ``model.text`` (``custom_text``), on the 49,408-token BPE vocabulary with a causal mask and
    argmax (end-of-text) pooling, built from plain ``nn.MultiheadAttention`` blocks. Refused, with
    the reason: CoCa, other timm image towers (SigLIP's: no class token, attention pooling),
    Hugging Face text towers, other tokenizers or vocabularies (MetaCLIP 2 worldwide, CLIPA, SigLIP),
    other pooling (SigLIP's last token), no causal mask, custom attention blocks, and settings this
    check does not know.
    """
    problems = []
    if cfg.get("multimodal_cfg") is not None:
        problems.append("a CoCa captioning model (multimodal_cfg)")
    vision, text = cfg.get("vision_cfg") or {}, cfg.get("text_cfg") or {}
    if vision.get("timm_model_name"):
        problems += _timm_problems(vision)
    elif not isinstance(vision.get("layers"), (list, tuple)):  # a list of layers is OpenAI's ModifiedResNet
        if vision.get("attentional_pool"):
            problems.append("attentional pooling in the image tower instead of the class token")
        if vision.get("pool_type", "tok") != "tok":
            problems.append(f"image pooling {vision['pool_type']!r} instead of the class token ('tok')")
        problems += _block_problem("image", vision)
    if text.get("hf_model_name"):
        problems.append(f"a Hugging Face text tower ({text['hf_model_name']})")
    else:
        if text.get("hf_tokenizer_name"):
            problems.append(f"the tokenizer {text['hf_tokenizer_name']} instead of CLIP's BPE")
        if text.get("vocab_size", BPE_VOCAB_SIZE) != BPE_VOCAB_SIZE:
            problems.append(f"a vocabulary of {text['vocab_size']:,} tokens instead of CLIP's {BPE_VOCAB_SIZE:,} BPE")
        if text.get("tokenizer_kwargs") or text.get("tokenizer_mode"):
            problems.append(f"tokenizer settings {text.get('tokenizer_kwargs') or text.get('tokenizer_mode')}")
        if text.get("pool_type", "argmax") != "argmax":
            problems.append(f"text pooling {text['pool_type']!r} instead of the end-of-text token ('argmax')")
        if text.get("no_causal_mask"):
            problems.append("a text tower without causal mask")
        if text.get("embed_cls"):
            problems.append("a text class token (embed_cls)")
        if text.get("proj_type", "linear") == "none":
            problems.append("no text projection (proj_type 'none')")
        problems += _block_problem("text", text)
    known = {
        "model": _NEUTRAL["model"] | {"multimodal_cfg", "custom_text"},
        "vision": _NEUTRAL["vision"] | {"timm_model_name", "attentional_pool", "pool_type", "block_type",
                                        *_CUSTOM_BLOCK_FLAGS},
        "text": _NEUTRAL["text"] | {"hf_model_name", "hf_tokenizer_name", "vocab_size", "tokenizer_kwargs",
                                    "tokenizer_mode", "pool_type", "no_causal_mask", "embed_cls", "proj_type",
                                    "block_type", *_CUSTOM_BLOCK_FLAGS},
    }
    unknown = sorted({*(set(cfg) - known["model"]), *(f"vision_cfg.{k}" for k in set(vision) - known["vision"]),
                      *(f"text_cfg.{k}" for k in set(text) - known["text"])})
    if unknown:
        problems.append(f"settings this loader was not checked against: {', '.join(unknown)}")
    return problems


def model_problems(model: torch.nn.Module) -> list[str]:
    """What in a built model the block-by-block runner would run wrongly ([] when none).

    The same rules as :func:`config_problems`, read from the modules themselves.
    """
    if type(model) not in (CLIP, CustomTextCLIP):
        return [f"a {type(model).__name__} instead of open_clip's CLIP or CustomTextCLIP"]
    text = model.text if type(model) is CustomTextCLIP else model
    if type(text) not in (CLIP, TextTransformer):
        return [f"a {type(text).__name__} text tower instead of CLIP's (open_clip's TextTransformer)"]
    problems = []
    visual = model.visual
    blocks = list(text.transformer.resblocks)
    if isinstance(visual, VisionTransformer):
        if visual.attn_pool is not None or visual.pool_type != "tok":
            problems.append(f"image pooling {visual.pool_type!r}"
                            f"{' with an attentional pooler' if visual.attn_pool is not None else ''} "
                            "instead of the class token ('tok')")
        blocks += list(visual.transformer.resblocks)
    elif isinstance(visual, TimmModel):
        problems += tower_problems(visual)
    elif not isinstance(visual, ModifiedResNet):
        problems.append(f"a {type(visual).__name__} image tower instead of a ViT, EVA's or OpenAI's ResNet")
    if any(type(b) is not ResidualAttentionBlock or not isinstance(b.attn, torch.nn.MultiheadAttention)
           for b in blocks):
        problems.append("custom attention blocks instead of nn.MultiheadAttention blocks")
    pool_type = model.text_pool_type if text is model else text.pool_type
    if pool_type != "argmax":
        problems.append(f"text pooling {pool_type!r} instead of the end-of-text token ('argmax')")
    if text.attn_mask is None:
        problems.append("a text tower without causal mask")
    if text.vocab_size != BPE_VOCAB_SIZE:
        problems.append(f"a vocabulary of {text.vocab_size:,} tokens instead of CLIP's {BPE_VOCAB_SIZE:,} BPE")
    if getattr(text, "cls_emb", None) is not None:
        problems.append("a text class token (embed_cls)")
    if text.text_projection is None:
        problems.append("no text projection")
    return problems


def _refuse(what: str, problems: list[str]) -> CheckpointError:
    return CheckpointError(
        f"{what} cannot be run block by block: it has {'; '.join(problems)}. Supported: ViT image towers pooled by "
        "their class token (EVA-CLIP's timm Eva included; or OpenAI's ResNets) with CLIP's BPE text tower (causal, "
        "end-of-text pooling)")


def _instantiate(cfg: dict) -> CLIP | CustomTextCLIP:
    """The model open_clip's factory builds for ``cfg`` (a ``CustomTextCLIP`` when ``custom_text``), random
    weights; a timm image tower is built without its pretrained weights (nothing is downloaded)."""
    cfg = copy.deepcopy(cfg)
    if (cfg.get("vision_cfg") or {}).get("timm_model_name"):
        cfg["vision_cfg"]["timm_model_pretrained"] = False
    return (CustomTextCLIP if cfg.pop("custom_text", False) else CLIP)(**cfg)


def _build_config(name: str) -> CLIP | CustomTextCLIP:
    """A float32 ``CLIP`` of open_clip config ``name``, random weights, refused when not runnable.

    Built from the config directly, not with ``open_clip.create_model``: that logs "No pretrained
    weights loaded ... initialized randomly" on the root logger (setting it up as a side effect)
    although the weights are loaded right after; for the configs accepted here both build the
    same model.
    """
    cfg = open_clip.get_model_config(name)
    problems = config_problems(cfg)
    if problems:
        raise _refuse(f"open_clip model {name!r}", problems)
    model = _instantiate(cfg)
    problems = model_problems(model)
    if problems:
        raise _refuse(f"open_clip model {name!r}", problems)
    return model


def _shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items() if k not in _NON_WEIGHT_KEYS}


def matching_configs(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """The runnable open_clip configs whose weights have exactly the keys and shapes of ``state_dict``.

    Candidates are built on the meta device (no memory, a few ms each), after a cheap filter on
    the embedding and text widths.
    """
    shapes = _shapes(state_dict)
    # The text tower's keys: on the model (OpenAI's layout) or under text.* (custom_text, EVA-CLIP).
    root = next((r for r in ("", "text.") if f"{r}text_projection" in shapes and f"{r}ln_final.weight" in shapes), None)
    if root is None:
        return []
    embed_dim, text_width = shapes[f"{root}text_projection"][-1], shapes[f"{root}ln_final.weight"][0]
    found = []
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name)
        if (cfg.get("embed_dim"), (cfg.get("text_cfg") or {}).get("width", 512)) != (embed_dim, text_width):
            continue
        if bool(cfg.get("custom_text")) != (root == "text.") or config_problems(cfg):
            continue
        with torch.device("meta"):
            candidate = _instantiate(cfg)
        if _shapes(candidate.state_dict()) == shapes:
            found.append(name)
    return found


def _quick_gelu(name: str) -> bool:
    return bool(open_clip.get_model_config(name).get("quick_gelu"))


def _foreign_keys(sd: dict[str, torch.Tensor]) -> str | None:
    """Why ``sd`` is not in OpenAI's layout (an open_clip-only structure), or None."""
    signs = (("logit_bias", "a logit_bias (sigmoid-loss training)"), ("text.", "a custom text tower (text.*)"),
             ("visual.trunk.", "a timm image tower (visual.trunk.*)"), ("text_decoder.", "a CoCa decoder"),
             ("visual.attn_pool", "an attentional pooler (visual.attn_pool*)"))
    for prefix, what in signs:
        key = next((k for k in sd if k.startswith(prefix)), None)
        if key is not None:
            return f"{what}, e.g. key {key!r}"
    key = next((k for k in sorted(sd) if k.split(".")[0] not in _OPENAI_ROOTS), None)
    return None if key is None else f"keys outside OpenAI's layout, e.g. {key!r}"


def _load_without_name(ckpt: _Checkpoint, source: str) -> CLIP | CustomTextCLIP:
    """Decide what a file is from its contents alone (see the module docstring), and load it."""
    sd = ckpt.tensors
    ask = "pass --clip-model (model_name=) with its open_clip model name"
    if ckpt.torchscript or any(k in sd for k in _NON_WEIGHT_KEYS):
        log.info("%s: OpenAI archive; loaded with QuickGELU", source)
        return build_openai_clip(sd, source)
    candidates = matching_configs(sd)
    foreign = _foreign_keys(sd)
    if foreign and not candidates:
        raise CheckpointError(f"{source}: an open_clip checkpoint ({foreign}), not OpenAI's format; {ask}")
    fits = f" (its weights fit {', '.join(candidates)})" if candidates else ""
    if ckpt.training:
        raise CheckpointError(f"{source}: an open_clip training checkpoint ({', '.join(ckpt.training)} beside "
                              f"state_dict), which does not record its model or activation; {ask}{fits}")
    releases = [c for c in candidates if c in OPENAI_RELEASES]
    if releases:
        log.warning("%s: a state dict with the shapes of OpenAI's %s: loaded as OpenAI's weights (QuickGELU). "
                    "A model trained with open_clip on this architecture has the same keys and usually GELU; "
                    "for one, pass --clip-model %s", source, releases[0], releases[0])
        return build_openai_clip(sd, source)
    if candidates and len({_quick_gelu(c) for c in candidates}) == 1:
        log.info("%s: weights fit open_clip's %s; loaded as %s", source, ", ".join(candidates), candidates[0])
        model = _build_config(candidates[0])
        _load_strict(model, OrderedDict(sd), source)
        return model.float().eval()
    if candidates:
        raise CheckpointError(f"{source}: weights fit several open_clip models that differ in activation "
                              f"(GELU or QuickGELU), and the file does not say which; {ask}{fits}")
    log.info("%s: no open_clip config has these shapes; loaded in OpenAI's layout with QuickGELU", source)
    return build_openai_clip(sd, source)


def load_clip(path: str | Path, model_name: str | None = None) -> CLIP | CustomTextCLIP:
    """Load a CLIP model from a local file.

    Args:
        path: an OpenAI ``.pt`` archive, a state dict (``.pt``/``.bin``/``.safetensors``) in OpenAI
            naming, or an open_clip checkpoint.
        model_name: the open_clip architecture name (``"ViT-B-16"``) for open_clip checkpoints;
            ``None`` reads the architecture from the file (see the module docstring for what a
            file can and cannot tell).

    Returns:
        An open_clip ``CLIP`` (``CustomTextCLIP`` for EVA-CLIP) in eval mode, float32, on the CPU.

    Raises:
        CheckpointError: naming the file, for unreadable files, missing or mismatched weights,
            open_clip files loaded without ``model_name``, and architectures the block-by-block
            runner cannot run exactly.
    """
    ckpt = _read_checkpoint(Path(path))
    if model_name is None:
        return _load_without_name(ckpt, str(path))
    if model_name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if model_name.lower() in m.lower()][:5]
        raise CheckpointError(f"unknown open_clip model {model_name!r}" + (f"; close: {close}" if close else ""))
    if ckpt.torchscript and not _quick_gelu(model_name):
        raise CheckpointError(f"{path}: an OpenAI archive, trained with QuickGELU, but open_clip's {model_name} "
                              f"uses GELU; pass --clip-model {model_name}-quickgelu, or leave --clip-model out")
    model = _build_config(model_name)
    _load_strict(model, OrderedDict(ckpt.tensors), str(path))
    return model.float().eval()
