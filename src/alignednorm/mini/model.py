"""The tiny CLIP of the mini benchmark: its architecture, tokenizer, input transform and zero-shot check.

The model is a plain open_clip ``CLIP`` in OpenAI's architecture (ViT image tower, causal text
transformer, QuickGELU, 12 layers in both towers, one head of width 64) with OpenAI's 49,408-token
BPE tokenizer and a short context. Its ``state_dict()`` has exactly OpenAI's key names, so the
shipped checkpoint loads like any OpenAI CLIP checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, build_model_from_openai_state_dict
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image
from safetensors.torch import load_file

from .world import MINI_DATASETS, MiniDataset, get_mini, image_rng, render_image

__all__ = ["MINI_CLIP", "build_mini_clip", "encode_text", "evaluate_zero_shot", "load_mini_clip", "to_tensor",
           "tokenize"]

log = logging.getLogger(__name__)

MINI_CLIP: dict[str, int] = {
    "embed_dim": 64,
    "image_size": 32,
    "patch_size": 8,
    "vision_layers": 12,
    "vision_width": 64,
    "context_length": 32,
    "vocab_size": 49408,
    "text_width": 64,
    "text_layers": 12,
}
"""Architecture of the tiny CLIP (heads = width // 64, as in OpenAI's models)."""

_TOKENIZER: SimpleTokenizer | None = None
_MEAN = torch.tensor(OPENAI_DATASET_MEAN).view(3, 1, 1)
_STD = torch.tensor(OPENAI_DATASET_STD).view(3, 1, 1)


def build_mini_clip(**overrides: int) -> CLIP:
    """A randomly initialised tiny CLIP (float32), with :data:`MINI_CLIP` updated by ``overrides``."""
    cfg = {**MINI_CLIP, **overrides}
    vision = CLIPVisionCfg(layers=cfg["vision_layers"], width=cfg["vision_width"], patch_size=cfg["patch_size"],
                           image_size=cfg["image_size"])
    text = CLIPTextCfg(context_length=cfg["context_length"], vocab_size=cfg["vocab_size"], width=cfg["text_width"],
                       heads=max(1, cfg["text_width"] // 64), layers=cfg["text_layers"])
    return CLIP(cfg["embed_dim"], vision_cfg=vision, text_cfg=text, quick_gelu=True)


def load_mini_clip(path: str | os.PathLike) -> CLIP:
    """Build a float32 open_clip model from an OpenAI-format state dict saved as safetensors."""
    state = {k: v.float() for k, v in load_file(os.fspath(path)).items()}
    return build_model_from_openai_state_dict(state, quick_gelu=True, cast_dtype=None).float().eval()


def tokenize(texts: str | Sequence[str], context_length: int = MINI_CLIP["context_length"]) -> torch.Tensor:
    """OpenAI BPE token ids, (N, context_length) int64, zero-padded; raises if a text does not fit."""
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = SimpleTokenizer()
    texts = [texts] if isinstance(texts, str) else list(texts)
    tokens = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [_TOKENIZER.sot_token_id, *_TOKENIZER.encode(text), _TOKENIZER.eot_token_id]
        if len(ids) > context_length:
            raise ValueError(f"{text!r} needs {len(ids)} tokens; the context length is {context_length}")
        tokens[i, :len(ids)] = torch.tensor(ids)
    return tokens


def encode_text(model: CLIP, tokens: torch.Tensor, bucket: int = 16) -> torch.Tensor:
    """``model.encode_text`` run on the shortest prefixes that hold the EOT tokens (same result, less work).

    The text transformer is causal, so positions after the EOT token never reach its feature. Texts
    are grouped into length buckets of ``bucket`` tokens so one long caption does not pad the rest.

    Args:
        model: an open_clip ``CLIP`` with OpenAI-style text tower.
        tokens: (N, context_length) token ids.

    Returns:
        (N, embed_dim) unnormalised text features.
    """
    eot = tokens.argmax(dim=-1)  # OpenAI pooling: the EOT token has the largest id
    group = torch.div(eot, bucket, rounding_mode="floor")
    out = torch.empty(tokens.shape[0], model.text_projection.shape[1], dtype=model.text_projection.dtype)
    for g in group.unique().tolist():
        rows = (group == g).nonzero().squeeze(1)
        length = int(eot[rows].max()) + 1
        x = model.token_embedding(tokens[rows, :length]) + model.positional_embedding[:length]  # (n, L, width)
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
        out = out.index_put((rows,), x[torch.arange(len(rows)), eot[rows]] @ model.text_projection)
    return out


def to_tensor(images: Iterable[Image.Image | np.ndarray]) -> torch.Tensor:
    """Stack RGB images (already at the model's resolution) into a normalised (N, 3, H, W) float tensor."""
    arrays = np.stack([np.asarray(im, dtype=np.uint8) for im in images])  # (N, H, W, 3)
    x = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255.0
    return (x - _MEAN) / _STD


@torch.no_grad()
def class_embeddings(model: CLIP, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Normalised zero-shot classifier weights: the mean over ``templates`` of each class, (C, D)."""
    weights = []
    for template in templates:
        tokens = tokenize([template.format(c) for c in classnames], model.context_length)
        weights.append(F.normalize(encode_text(model, tokens), dim=-1))
    return F.normalize(torch.stack(weights).mean(0), dim=-1)


@torch.no_grad()
def accuracy(model: CLIP, images: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
             batch_size: int = 512) -> float:
    """Top-1 accuracy of the zero-shot classifier ``weights`` (C, D) on normalised ``images`` (N, 3, H, W)."""
    correct = 0
    for i in range(0, len(images), batch_size):
        feats = F.normalize(model.encode_image(images[i:i + batch_size]), dim=-1)
        correct += int(((feats @ weights.T).argmax(-1) == labels[i:i + batch_size]).sum())
    return correct / max(1, len(images))


def rendered_split(dataset: MiniDataset, seed: int = 0, split: str = "test",
                   per_class: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of one split rendered in memory (identical to the PNGs :func:`generate_world` writes)."""
    count = {"train": dataset.counts[0], "val": dataset.counts[1], "test": dataset.counts[2]}[split]
    count = min(count, per_class) if per_class else count
    labels = [lab for lab in range(len(dataset.classes)) for _ in range(count)]
    images = [render_image(dataset, lab, image_rng(seed, dataset, lab, split, i % count))
              for i, lab in enumerate(labels)]
    return to_tensor(images), torch.tensor(labels)


def read_split(root: str | os.PathLike, dataset: MiniDataset, per_class: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images of a generated dataset under the data root ``root`` (``per_class`` caps images per class)."""
    spec = dataset.spec()
    folder = Path(root) / spec.folder
    entries = json.loads((folder / spec.split_file).read_text(encoding="utf-8"))["test"]
    kept: dict[int, int] = {}
    images, labels = [], []
    for rel, label, _ in entries:
        if per_class is not None and kept.get(label, 0) >= per_class:
            continue
        kept[label] = kept.get(label, 0) + 1
        with Image.open(folder / spec.image_root / rel) as im:
            images.append(np.asarray(im.convert("RGB")))
        labels.append(label)
    return to_tensor(images), torch.tensor(labels)


def evaluate_zero_shot(state_dict_path: str | os.PathLike, root: str | os.PathLike | None = None,
                       names: Sequence[str] | None = None, templates: Sequence[str] | None = None,
                       per_class: int | None = None, seed: int = 0) -> dict[str, float]:
    """Zero-shot top-1 accuracy of a checkpoint on the test split of mini datasets.

    Args:
        state_dict_path: OpenAI-format state dict as safetensors (e.g. :func:`mini_clip_path`).
        root: data root holding a generated world (``root/mini/...``); None renders the test
            images in memory instead (same pixels).
        names: catalog names (default: every mini dataset, variants included).
        templates: prompt templates with ``{}`` (default: each dataset's own single template).
        per_class: at most this many test images per class (default: all).
        seed: world seed (only used when ``root`` is None).

    Returns:
        ``{name: accuracy in [0, 1]}``.
    """
    model = load_mini_clip(state_dict_path)
    results = {}
    for dataset in [get_mini(n) for n in names] if names else MINI_DATASETS:
        if root is None:
            images, labels = rendered_split(dataset, seed, "test", per_class)
        else:
            images, labels = read_split(root, dataset, per_class)
        weights = class_embeddings(model, dataset.classnames, templates or [dataset.template])
        results[dataset.name] = accuracy(model, images, labels, weights)
        log.info("zero-shot %s: %.1f%%", dataset.name, 100 * results[dataset.name])
    return results
