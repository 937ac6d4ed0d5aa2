"""One CLIP residual block as plain tensor calls: open_clip's arithmetic with less dispatch.

A tiny model's step is bound by dispatch, not arithmetic: each ``nn.Module`` call and the generic
argument handling of ``nn.MultiheadAttention`` (its fast-path test, mask canonicalisation, shape
checks) cost more than its matrix products. For the parts of a standard open_clip block —
``LayerNorm``, batch-first self-attention with one packed input projection, a Linear–activation–Linear
MLP, ``Identity`` or ``LayerScale`` — these helpers call the same torch functions on the same values
in the same order and layout, so outputs and the gradients that reach prompts are bitwise those of the
modules (``tests/test_blocks.py`` compares them); any other part goes through its module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm as OpenClipLayerNorm
from open_clip.transformer import QuickGELU
from torch import Tensor, nn


def norm(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` for a LayerNorm; open_clip's casts back to the input dtype (fp32 out of autocast)."""
    if type(module) is OpenClipLayerNorm:
        return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps).to(x.dtype)
    if type(module) is nn.LayerNorm:
        return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)
    return module(x)


def linear(module: nn.Module, x: Tensor) -> Tensor:
    return F.linear(x, module.weight, module.bias) if type(module) is nn.Linear else module(x)


def scale(module: nn.Module, x: Tensor) -> Tensor:
    """``ls_1`` / ``ls_2``: nothing to do for ``Identity``."""
    return x if type(module) is nn.Identity else module(x)


def activation(module: nn.Module, x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x) if type(module) is QuickGELU else module(x)


def mlp(module: nn.Module, x: Tensor) -> Tensor:
    """The block's ``c_fc -> gelu -> c_proj`` (another MLP layout runs as its module)."""
    if type(module) is not nn.Sequential or tuple(module._modules) != ("c_fc", "gelu", "c_proj"):
        return module(x)
    return linear(module.c_proj, activation(module.gelu, linear(module.c_fc, x)))


def plain_self_attention(attn: nn.Module) -> bool:
    """Whether ``attn`` is batch-first self-attention that :func:`self_attention` reproduces exactly."""
    return (type(attn) is nn.MultiheadAttention and attn.batch_first and attn._qkv_same_embed_dim
            and attn.bias_k is None and not attn.add_zero_attn)


def self_attention(attn: nn.MultiheadAttention, x: Tensor, mask: Tensor | None) -> Tensor:
    """``attn(x, x, x, attn_mask=mask)[0]`` for a float additive ``mask`` ``(T, T)`` or none.

    The ops of ``F.multi_head_attention_forward``'s path without weights, in its (T, B) layout: the
    matrix products keep its row order (their rounding depends on it; OpenAI's CLIP runs them so too).
    """
    b, t, e = x.shape
    heads = attn.num_heads
    d = e // heads
    proj = F.linear(x.transpose(0, 1), attn.in_proj_weight, attn.in_proj_bias)  # (T, B, 3E)
    proj = proj.unflatten(-1, (3, e)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()  # (3, T, B, E)
    q, k, v = (proj[i].view(t, b * heads, d).transpose(0, 1).view(b, heads, t, d) for i in range(3))
    out = F.scaled_dot_product_attention(q, k, v, None if mask is None else mask.view(1, 1, t, t),
                                         dropout_p=attn.dropout if attn.training else 0.0)
    out = F.linear(out.permute(2, 0, 1, 3).reshape(t * b, e), attn.out_proj.weight, attn.out_proj.bias)
    return out.view(t, b, e).transpose(0, 1)


def lean_applies(block: nn.Module, x: Tensor, mask: Tensor | None) -> bool:
    """Whether :func:`run_block` computes ``block`` on ``x`` exactly as its modules would.

    Not for cross-attention or a boolean mask, nor where ``nn.MultiheadAttention`` may take its fused
    inference kernel (no grad, eval, no mask, even heads), whose rounding differs: numbers stay as they were.
    """
    attn = block.attn
    return (plain_self_attention(attn) and not hasattr(block, "ln_1_kv")
            and (mask is None or mask.is_floating_point()) and not _fused_path_possible(attn, x, mask))


def _fused_path_possible(attn: nn.MultiheadAttention, x: Tensor, mask: Tensor | None) -> bool:
    """False when one of the conditions that rule out MHA's fused path holds (torch's ``why_not_fast_path``)."""
    return not (attn.training or mask is not None or attn.num_heads % 2 or torch.is_autocast_enabled()
                or (torch.is_grad_enabled() and x.requires_grad) or not torch.backends.mha.get_fastpath_enabled())


def run_block(block: nn.Module, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """One pre-norm residual block ``x + attn(ln_1 x)``, then ``x + mlp(ln_2 x)``; also the attention output."""
    attn_out = self_attention(block.attn, norm(block.ln_1, x), mask)
    x = x + scale(block.ls_1, attn_out)
    return x + scale(block.ls_2, mlp(block.mlp, norm(block.ln_2, x))), attn_out
