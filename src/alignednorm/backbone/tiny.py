"""Tiny random CLIPs in the real checkpoint formats, for tests and examples.

``test-vit-quickgelu`` is registered with open_clip (package data ``configs/open_clip``) and has
the geometry of ``shared/reference``'s tiny CLIP: 12 layers, width 64, patch 16 on 32 px,
embedding 32, the standard 77-token BPE context.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "open_clip"
TINY_MODEL_NAME = "test-vit-quickgelu"


def register_tiny_configs() -> None:
    """Make the tiny architectures known to ``open_clip.create_model``."""
    if TINY_MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)


def make_tiny_clip(
    seed: int = 0,
    layers: int = 12,
    width: int = 64,
    embed_dim: int = 32,
    image_size: int = 32,
    patch_size: int = 16,
    context_length: int = 77,
    heads: int | None = None,
) -> CLIP:
    """A randomly initialised OpenAI-layout CLIP (QuickGELU, float32) with non-trivial biases/norms."""
    torch.manual_seed(seed)
    model = CLIP(
        embed_dim,
        vision_cfg=CLIPVisionCfg(layers=layers, width=width, patch_size=patch_size, image_size=image_size,
                                 head_width=width // (heads or max(1, width // 64))),
        text_cfg=CLIPTextCfg(context_length=context_length, width=width, heads=heads or max(1, width // 64),
                             layers=layers),
        quick_gelu=True,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                # Non-zero biases and non-unit norms, so that a loader that drops one is caught.
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
    return model.eval()


def save_openai_state_dict(model: CLIP, path: str | Path, half: bool = True) -> Path:
    """Save ``model`` as an OpenAI-naming state dict (``.pt`` via torch.save, or ``.safetensors``)."""
    path = Path(path)
    state = {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path
