"""EVA-CLIP image towers run block by block: open_clip's ``TimmModel`` around a timm ``Eva`` trunk.

open_clip builds the image tower of EVA01-CLIP (g) and EVA02-CLIP (B, L, E) as timm's ``Eva``:
patch embedding, class token, absolute position embedding, then blocks that are pre-norm
(EVA01; EVA02-B/L also rotate queries and keys of the patch tokens by a rotary position
embedding, RoPE, and use a SwiGLU MLP and LayerNorms inside attention and MLP) or post-norm
(EVA02-E), a final norm, the class token and the trunk's linear head as the projection.

The block forward is written out here so prompts can be spliced in between blocks (same hook
protocol as the ViT path of :class:`~alignednorm.backbone.clip.ClipBackbone`). Prompt tokens
count as prefix tokens, like the class token: they get no rotary embedding, and every patch
token keeps its own, since RoPE encodes where a patch sits on the image grid and a prompt has
no place there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel
from timm.layers import RotaryEmbeddingCat, apply_rot_embed_cat
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
from torch import Tensor, nn

from alignednorm.backbone.hooks import PromptHook, PromptState, Trace, splice


def is_eva_tower(visual: nn.Module) -> bool:
    """Whether ``visual`` is open_clip's timm adapter around a timm ``Eva`` (checked by :func:`tower_problems`)."""
    return isinstance(visual, TimmModel) and isinstance(visual.trunk, Eva)


def tower_problems(visual: nn.Module) -> list[str]:
    """What in an open_clip timm image tower the EVA runner would run wrongly ([] when none)."""
    trunk = getattr(visual, "trunk", None)
    if not isinstance(visual, TimmModel) or type(trunk) is not Eva:
        return [f"a timm image tower ({type(trunk).__name__}) that is not timm's Eva (only EVA-CLIP's are supported)"]
    problems = []
    if trunk.cls_token is None:
        problems.append("no class token in the Eva tower (prompts are placed after it and it is pooled)")
    if trunk.reg_token is not None:
        problems.append("register tokens in the Eva tower")
    if trunk.global_pool != "token" or trunk.attn_pool is not None:
        problems.append(f"image pooling {trunk.global_pool!r} instead of the class token ('token')")
    if trunk.pos_embed is None or trunk.no_embed_class or trunk.dynamic_img_size:
        problems.append("an Eva position embedding other than one absolute table over class token and patches")
    if trunk.rope is not None and (type(trunk.rope) is not RotaryEmbeddingCat or trunk.rope_mixed):
        problems.append(f"a {type(trunk.rope).__name__} rotary embedding instead of EVA02's RotaryEmbeddingCat")
    if any(type(b) not in (EvaBlock, EvaBlockPostNorm) or type(b.attn) is not EvaAttention or b.attn.gate is not None
           for b in trunk.blocks):
        problems.append("Eva blocks other than EVA-CLIP's (EvaBlock/EvaBlockPostNorm with ungated EvaAttention)")
    if not isinstance(trunk.fc_norm, nn.Identity) or not isinstance(trunk.head, nn.Linear) or len(visual.head):
        problems.append("an image projection other than the Eva trunk's linear head (timm_proj must be null)")
    return problems


# ----------------------------------------------------------------------------- forward
def embed_image(visual: TimmModel, images: Tensor) -> Tensor:
    """Patch embeddings after the class token, plus the absolute position table, then ``norm_pre``:
    ``(B, 1 + grid², W)``."""
    trunk = visual.trunk
    x = trunk.patch_embed(images.to(trunk.patch_embed.proj.weight.dtype))  # (B, grid², W)
    cls = trunk.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
    return trunk.norm_pre(torch.cat([cls, x], dim=1) + trunk.pos_embed.to(x.dtype))


def project(visual: TimmModel, pooled: Tensor, delta: Tensor | None = None) -> Tensor:
    """Pooled tokens ``(B, W)`` through the trunk's linear head; ``delta`` ``(W, E)`` is added to its matrix."""
    head = visual.trunk.head
    if delta is None:
        return head(pooled)
    out = pooled @ (head.weight.t() + delta)
    return out if head.bias is None else out + head.bias


def sequence_rope(patch_rope: Tensor, prompts: PromptState) -> Tensor:
    """Rotary rows ``(T, 2d)`` for a whole sequence from the patches' ``(grid², 2d)`` (sines, then cosines).

    The class token and the prompts get the identity rotation (sin 0, cos 1), which leaves their
    queries and keys exactly as they are; the patch tokens keep their rows in order, around the prompts.
    """
    half = patch_rope.shape[-1] // 2
    identity = torch.cat([patch_rope.new_zeros(1, half), patch_rope.new_ones(1, half)], dim=-1)
    before = max(prompts.start - 1, 0)  # patch tokens between the class token and the prompts
    return torch.cat([identity, patch_rope[:before], identity.expand(prompts.n, -1), patch_rope[before:]])


def _heads(attn: EvaAttention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values ``(B, heads, T, d)``, from a fused or from separate projections."""
    b, t, _ = x.shape
    if attn.qkv is not None:  # fused; the key bias is a zero buffer, as in EVA
        bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = F.linear(x, attn.qkv.weight, bias).reshape(b, t, 3, attn.num_heads, -1)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q, k, v = (proj(x).reshape(b, t, attn.num_heads, -1).transpose(1, 2)
               for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    return q, k, v


def _attention(attn: EvaAttention, x: Tensor, rope: Tensor | None, need_weights: bool
               ) -> tuple[Tensor, Tensor | None]:
    """EVA attention (``rope`` ``(T, 2d)`` covers every position) and, when asked, its probabilities."""
    q, k, v = _heads(attn, x)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        q = apply_rot_embed_cat(q, rope, half=attn.rotate_half).type_as(v)
        k = apply_rot_embed_cat(k, rope, half=attn.rotate_half).type_as(v)
    weights = None
    if need_weights:
        weights = (q @ k.transpose(-2, -1) * attn.scale).softmax(dim=-1)  # (B, heads, T, T)
        out = weights @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    out = out.transpose(1, 2).flatten(2)  # (B, heads, T, d) -> (B, T, heads*d)
    return attn.proj(attn.norm(out)), weights


def _scaled(gamma: Tensor | None, x: Tensor) -> Tensor:
    return x if gamma is None else gamma * x


def _block(block: nn.Module, x: Tensor, rope: Tensor | None, need_weights: bool
           ) -> tuple[Tensor, Tensor, Tensor | None]:
    """One Eva block: the output, the attention branch and (when asked) the attention probabilities."""
    if isinstance(block, EvaBlockPostNorm):  # EVA02-E: x + norm(attn(x)), x + norm(mlp(x))
        attn_out, weights = _attention(block.attn, x, rope, need_weights)
        x = x + block.norm1(attn_out)
        return x + block.norm2(block.mlp(x)), attn_out, weights
    attn_out, weights = _attention(block.attn, block.norm1(x), rope, need_weights)
    x = x + _scaled(block.gamma_1, attn_out)
    return x + _scaled(block.gamma_2, block.mlp(block.norm2(x))), attn_out, weights


def run_blocks(trunk: Eva, x: Tensor, blocks: nn.ModuleList, hook: PromptHook | None, trace: Trace | None,
               state: PromptState, start_layer: int) -> Tensor:
    """Run ``blocks`` from ``start_layer`` (1-based), asking ``hook`` before each, recording into ``trace``."""
    patch_rope = None if trunk.rope is None else trunk.rope.get_embed()  # (grid², 2d)
    for layer in range(start_layer, len(blocks) + 1):
        prompt = hook(layer) if hook is not None else None
        if prompt is not None:
            x = splice(x, prompt, state)
        rope = None if patch_rope is None else sequence_rope(patch_rope, state)
        want_weights = trace is not None and layer in trace.attention_layers
        x, attn_out, weights = _block(blocks[layer - 1], x, rope, want_weights)
        if trace is not None:
            trace.record(layer, x, attn_out, weights)
            trace.positions[layer] = (state.start, state.n)
    if trace is not None:
        trace.prompt_start, trace.prompt_count = state.start, state.n
    return x
