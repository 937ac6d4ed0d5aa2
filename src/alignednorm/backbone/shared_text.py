"""Causal blocks over many prompts that begin alike: the common beginning is computed once.

Class prompts such as ``[SOS] [inserted prompt tokens] a photo of a <class> . [EOT]`` are identical
up to the class name. Under the causal mask a position sees only earlier ones, so the hidden
states of those leading positions are the same in every row at every layer. This runner keeps
them as one row ``(1, P, W)`` and lets the class-specific rest ``(N, R, W)`` attend to their
keys and values: every linear layer and MLP runs on ``N·R + P`` tokens instead of ``N·(P + R)``.

It is exact, gradients included, when the shared rows are shared by construction: the input of
the leading positions carries no gradient (frozen token ids, cached states) or its rows were
built alike by the caller (:func:`shareable`), and every prompt spliced into them is one
``(n, W)`` set for all rows (or an expanded view of one). Otherwise the caller runs the
ordinary path; a prompt that cannot be put into the shared part mid-way joins the rows again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignednorm.backbone.blocks import linear, mlp, norm, scale
from alignednorm.backbone.hooks import LayerPrompt, PromptHook, PromptState, splice

BlockFn = Callable[[nn.Module, Tensor, int], Tensor]


def leading_shared_length(x: Tensor) -> int:
    """How many leading positions of ``x`` ``(N, T, W)`` are equal in every row."""
    same = (x == x[:1]).flatten(2).all(dim=-1).all(dim=0)  # (T,)
    return int(same.int().cumprod(dim=0).sum())


def shareable(x: Tensor, rows_built_alike: bool = False) -> int:
    """The shared length to use for ``x`` (0: run the ordinary path).

    Rows equal by value are equal for the gradient only when they were built alike: from frozen
    inputs, or by the same computation from the same learnable tensors (one context for every
    class). A caller whose ``x`` needs a gradient says so with ``rows_built_alike``; a
    class-specific context may equal another class's by value, never by construction.
    One position at least stays row-specific, so every pooled end-of-text token is in the rest.
    """
    if x.shape[0] < 2 or (x.requires_grad and not rows_built_alike):
        return 0
    return min(leading_shared_length(x), x.shape[1] - 1)


def _one_set(tokens: Tensor) -> Tensor | None:
    """``tokens`` as one ``(n, W)`` set for every row, or None when rows get their own."""
    if tokens.dim() == 2:
        return tokens
    return tokens[0] if tokens.stride(0) == 0 else None  # an expanded view: one set by construction


def _fits_shared(prompt: LayerPrompt, state: PromptState, shared: int) -> bool:
    """Whether ``prompt`` touches only the shared positions with one token set for all rows."""
    if _one_set(prompt.tokens) is None:
        return False
    n = prompt.tokens.shape[-2]
    if prompt.mode == "insert":
        return prompt.at is not None and 0 <= prompt.at <= shared
    at = state.start if prompt.at is None else prompt.at
    return 0 <= at and at + n <= shared


def _heads(x: Tensor, heads: int) -> Tensor:
    b, t, w = x.shape
    return x.view(b, t, heads, w // heads).transpose(1, 2)  # (B, H, T, d)


def shared_attention(attn: nn.MultiheadAttention, shared: Tensor, rest: Tensor) -> tuple[Tensor, Tensor]:
    """Causal self-attention of ``cat(shared.expand(N), rest)`` computed without repeating ``shared``."""
    heads, n, p, r = attn.num_heads, rest.shape[0], shared.shape[1], rest.shape[1]
    q_s, k_s, v_s = (_heads(t, heads) for t in F.linear(shared, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1))
    q_r, k_r, v_r = (_heads(t, heads) for t in F.linear(rest, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1))
    out_s = F.scaled_dot_product_attention(q_s, k_s, v_s, is_causal=True)
    keys = torch.cat([k_s.expand(n, -1, -1, -1), k_r], dim=2)
    values = torch.cat([v_s.expand(n, -1, -1, -1), v_r], dim=2)
    visible = torch.ones(r, p + r, dtype=torch.bool, device=rest.device).tril(p)  # rest position i sees <= p + i
    out_r = F.scaled_dot_product_attention(q_r, keys, values, attn_mask=visible)

    def merge(o: Tensor) -> Tensor:
        b, _, t, _ = o.shape
        return linear(attn.out_proj, o.transpose(1, 2).reshape(b, t, -1))

    return merge(out_s), merge(out_r)


def shared_block(block: nn.Module, shared: Tensor, rest: Tensor) -> tuple[Tensor, Tensor]:
    """One pre-norm residual block (as ``ClipBackbone._block``) on the split sequence."""
    attn_s, attn_r = shared_attention(block.attn, norm(block.ln_1, shared), norm(block.ln_1, rest))
    shared, rest = shared + scale(block.ls_1, attn_s), rest + scale(block.ls_1, attn_r)

    def feed_forward(x: Tensor) -> Tensor:
        return scale(block.ls_2, mlp(block.mlp, norm(block.ln_2, x)))

    return shared + feed_forward(shared), rest + feed_forward(rest)


def run_shared(x: Tensor, shared: int, blocks, hook: PromptHook | None, state: PromptState, start_layer: int,
               full_block: BlockFn) -> Tensor:
    """Run ``blocks[start_layer - 1:]`` on ``x`` ``(N, T, W)`` whose first ``shared`` positions agree.

    ``full_block(block, x, layer)`` runs one block on whole rows, for the layers after a prompt that
    does not fit the shared part.
    """
    n = x.shape[0]
    head, rest = x[:1, :shared], x[:, shared:]
    for layer in range(start_layer, len(blocks) + 1):
        prompt = hook(layer) if hook is not None else None
        if prompt is not None:
            if not _fits_shared(prompt, state, head.shape[1]):
                joined = torch.cat([head.expand(n, -1, -1), rest], dim=1)
                return _finish(joined, blocks, hook, state, layer, prompt, full_block)
            head = splice(head, replace(prompt, tokens=_one_set(prompt.tokens)), state)
        head, rest = shared_block(blocks[layer - 1], head, rest)
    return torch.cat([head.expand(n, -1, -1), rest], dim=1)


def _finish(x: Tensor, blocks, hook: PromptHook | None, state: PromptState, layer: int, prompt: LayerPrompt,
            full_block: BlockFn) -> Tensor:
    """Whole rows from ``layer`` on, its already-asked ``prompt`` first."""
    for current in range(layer, len(blocks) + 1):
        prompt = prompt if current == layer else (hook(current) if hook is not None else None)
        if prompt is not None:
            x = splice(x, prompt, state)
        x = full_block(blocks[current - 1], x, current)
    return x
