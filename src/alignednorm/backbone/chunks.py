"""The text tower over many classes in chunks, so 1,000 prompted classes fit in memory.

Each chunk of rows runs on its own; under autograd it runs inside activation checkpointing, so
only its features stay in memory and its blocks run again during the backward pass. Rows never
interact in a text tower, so features and gradients are those of one pass over every row (up to
float rounding: each chunk cuts its padding after its own longest prompt).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from alignednorm.backbone.hooks import LayerPrompt, Prefix, PromptHook


def rows_hook(hook: PromptHook | None, rows: slice) -> PromptHook | None:
    """``hook`` restricted to ``rows``: per-row ``(N, n, W)`` prompt tokens are sliced, shared ones kept."""
    if hook is None:
        return None

    def sliced(layer: int) -> LayerPrompt | None:
        prompt = hook(layer)
        if prompt is None or prompt.tokens.dim() == 2:
            return prompt
        return replace(prompt, tokens=prompt.tokens[rows])

    return sliced


def encode_text_in_chunks(backbone, chunk: int, token_ids: Tensor, hook: PromptHook | None = None,
                          embeddings: Tensor | None = None, prefix: Prefix | None = None, **kwargs) -> Tensor:
    """Projected text features ``(N, E)`` of ``backbone.encode_text`` computed ``chunk`` rows at a time."""
    parts = []
    for start in range(0, token_ids.shape[0], chunk):
        rows = slice(start, start + chunk)
        part_prefix = None if prefix is None else replace(prefix, states=prefix.states[rows])
        part_embeddings = None if embeddings is None else embeddings[rows]

        def encode(ids=token_ids[rows], emb=part_embeddings, pre=part_prefix, rows=rows) -> Tensor:
            return backbone.encode_text(ids, hook=rows_hook(hook, rows), embeddings=emb, prefix=pre,
                                        **kwargs).features

        parts.append(checkpoint(encode, use_reentrant=False) if torch.is_grad_enabled() else encode())
    return torch.cat(parts)
