"""What the face accepts for a backbone: ``--clip`` words (a path, or ``mini``), and open_clip names.

``--clip-model NAME --clip-pretrained TAG`` finds already-downloaded open_clip weights in open_clip's
or Hugging Face's cache (or a ``local-dir:`` folder); nothing is downloaded at run time. This lives
above the backbone (which only reads files) because ``mini`` names the built-in benchmark's CLIP.
"""

from __future__ import annotations

import os
from pathlib import Path

import open_clip

from alignednorm.errors import CheckpointError

# Names ``--clip`` accepts besides a file path.
BUILTIN_CLIPS = ("mini",)


def resolve_clip_path(value: str | Path) -> Path:
    """The checkpoint file ``--clip`` names: a path, or ``mini`` for the shipped tiny CLIP of the mini benchmark."""
    if str(value) == "mini":
        from alignednorm.mini import mini_clip_path

        return mini_clip_path().resolve()
    path = Path(value).expanduser()
    if not path.is_file():
        raise CheckpointError(f"--clip {value}: no such file; expected a CLIP checkpoint (OpenAI .pt, state dict, "
                              f"safetensors, open_clip) or one of {', '.join(BUILTIN_CLIPS)}")
    return path.resolve()


# File names open_clip stores pretrained weights under (Hugging Face repos and local folders).
PRETRAINED_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors",
                    "pytorch_model.bin")


def _hf_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def pretrained_candidates(model_name: str, tag: str) -> list[Path]:
    """Where a pretrained open_clip checkpoint may already be on this machine, in search order."""
    if tag.startswith("local-dir:"):
        folder = Path(tag.removeprefix("local-dir:")).expanduser()
        return [folder / name for name in PRETRAINED_FILES]
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise CheckpointError(f"--clip-pretrained {tag!r} is not a pretrained tag of open_clip model {model_name!r} "
                              f"(known: {', '.join(tags) or 'none'}; or local-dir:FOLDER)")
    out = []
    if cfg.get("url"):  # open_clip's own cache for URL downloads (the OpenAI releases)
        out.append(Path.home() / ".cache" / "clip" / cfg["url"].rsplit("/", 1)[-1])
    hub = cfg.get("hf_hub", "").strip("/")
    if hub:
        snapshots = _hf_cache() / f"models--{hub.replace('/', '--')}" / "snapshots"
        for snapshot in sorted(snapshots.glob("*")) if snapshots.is_dir() else []:
            out += [snapshot / name for name in PRETRAINED_FILES]
    return out


def resolve_pretrained(model_name: str, tag: str) -> tuple[Path, str | None]:
    """The local file of open_clip's ``model_name`` / ``tag``, and the model name to load it with.

    Nothing is downloaded: the file must already be in open_clip's or Hugging Face's cache, or in
    the ``local-dir:`` folder. OpenAI releases load in OpenAI's format (QuickGELU), so their model
    name is ``None``.
    """
    found = [p for p in pretrained_candidates(model_name, tag) if p.is_file()]
    if not found:
        where = ", ".join(str(p) for p in pretrained_candidates(model_name, tag)[:3]) or f"{_hf_cache()}/models--..."
        raise CheckpointError(f"open_clip weights {model_name}/{tag} are not on this machine and nothing is downloaded "
                              f"at run time: put the file at {where}, fill the cache once with open_clip "
                              f"(create_model('{model_name}', pretrained='{tag}')), or pass --clip FILE")
    path = found[0]
    openai_release = not tag.startswith("local-dir:") and open_clip.get_pretrained_cfg(model_name, tag).get(
        "quick_gelu", False) and path.suffix == ".pt"
    return path, None if openai_release else model_name


def backbone_source(clip: str | Path | None, model_name: str | None, pretrained: str | None) -> tuple[Path, str | None]:
    """The checkpoint file and open_clip model name from ``--clip``, ``--clip-model``, ``--clip-pretrained``."""
    if pretrained:
        if clip is not None:
            raise CheckpointError("give either --clip FILE or --clip-model NAME --clip-pretrained TAG, not both")
        if not model_name:
            raise CheckpointError(f"--clip-pretrained {pretrained!r} needs --clip-model (e.g. ViT-B-16)")
        return resolve_pretrained(model_name, pretrained)
    if clip is None:
        raise CheckpointError("no backbone given: pass --clip FILE (or 'mini'), or --clip-model NAME "
                              "--clip-pretrained TAG")
    return resolve_clip_path(clip), model_name
