"""A frozen CLIP whose towers we run block by block, so methods can edit the token sequence.

``ClipBackbone`` wraps one open_clip ``CLIP``: embeddings -> per block (prompt hook -> block ->
record) -> final norm -> pooling -> projection, in both towers. Only attribute names shared by
OpenAI's archives and open_clip 3.x/4.x are touched (style.md §3).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer
from torch import Tensor, nn

from alignednorm.backbone.hooks import PromptHook, PromptState, Trace, splice
from alignednorm.backbone.loading import load_clip


@dataclass
class TowerOutput:
    """What one tower returns.

    Attributes:
        features: projected pooled feature ``(B, E)``, not normalised.
        tokens: every token after the final LayerNorm (``ln_post``/``ln_final``), ``(B, T, W)``.
        hidden: the last block's output before the final LayerNorm, ``(B, T, W)``.
        prompt_start, prompt_count: where prompt tokens sit in ``tokens``/``hidden``.
        trace: the per-layer record, when one was passed in.
    """

    features: Tensor
    tokens: Tensor
    hidden: Tensor
    prompt_start: int = 0
    prompt_count: int = 0
    trace: Trace | None = None


def causal_mask(length: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Additive causal mask ``(T, T)``: ``-inf`` above the diagonal."""
    return torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu(1)


class ClipBackbone(nn.Module):
    """A frozen CLIP with prompt hooks in both towers.

    Args:
        model: an open_clip ``CLIP`` (OpenAI layout: text modules on the model itself).
        source: where the weights came from (a path), kept for run metadata.
    """

    def __init__(self, model: CLIP, source: str | None = None):
        super().__init__()
        if not hasattr(model, "token_embedding") or not hasattr(model.visual, "transformer"):
            raise TypeError("ClipBackbone needs an open_clip CLIP with a ViT image tower and a built-in text tower")
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.source = source
        self.tokenizer = SimpleTokenizer(context_length=self.context_length)

    @classmethod
    def from_file(cls, path: str | Path, model_name: str | None = None) -> ClipBackbone:
        """Load weights from a local file; see :func:`alignednorm.backbone.loading.load_clip`."""
        return cls(load_clip(path, model_name), source=str(path))

    def train(self, mode: bool = True) -> ClipBackbone:
        # The CLIP stays in eval mode: it is frozen, and methods toggle only their own modules.
        super().train(mode)
        self.model.eval()
        return self

    # ----------------------------------------------------------------- geometry
    @property
    def vision_layers(self) -> int:
        return len(self.model.visual.transformer.resblocks)

    @property
    def text_layers(self) -> int:
        return len(self.model.transformer.resblocks)

    @property
    def vision_width(self) -> int:
        return self.model.visual.conv1.out_channels

    @property
    def text_width(self) -> int:
        return self.model.ln_final.weight.shape[0]

    @property
    def embed_dim(self) -> int:
        return self.model.visual.proj.shape[1]

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return size[0] if isinstance(size, tuple) else int(size)

    @property
    def context_length(self) -> int:
        return self.model.positional_embedding.shape[0]

    def tokenize(self, texts: list[str]) -> Tensor:
        """BPE token ids ``(N, context_length)``; raises if a text would be truncated."""
        ids = self.tokenizer(texts)
        too_long = [t for t, row in zip(texts, ids) if row[-1] != 0 and row.argmax() == len(row) - 1]
        if too_long:
            raise ValueError(f"prompt longer than the context length {self.context_length}: {too_long[0]!r}")
        return ids

    # ----------------------------------------------------------------- vision
    def embed_image(self, images: Tensor) -> Tensor:
        """Patch + class + positional embeddings and ``ln_pre``: ``(B, 1 + grid², W)``."""
        visual = self.model.visual
        x = visual.conv1(images.to(visual.conv1.weight.dtype))  # (B, W, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, W)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        return visual.ln_pre(x)

    def encode_image(
        self,
        images: Tensor | None = None,
        hook: PromptHook | None = None,
        trace: Trace | None = None,
        start_layer: int = 1,
        hidden: Tensor | None = None,
        prompt_state: PromptState | None = None,
    ) -> TowerOutput:
        """Run the image tower.

        Args:
            images: ``(B, 3, H, W)`` normalised images (ignored when ``hidden`` is given).
            hook: asked before every block for prompt tokens.
            trace: filled with per-layer states / attention when given.
            start_layer: the first block to run (1-based); with ``hidden``, the input of that block.
            hidden: cached sequence entering ``start_layer`` (prefix caching).
            prompt_state: where prompts already sit in ``hidden``.
        """
        x = self.embed_image(images) if hidden is None else hidden
        state = prompt_state or PromptState()
        blocks = self.model.visual.transformer.resblocks
        x = self._run_blocks(x, blocks, hook, trace, state, start_layer, causal=False)
        visual = self.model.visual
        tokens = visual.ln_post(x)
        features = tokens[:, 0] @ visual.proj
        return TowerOutput(features, tokens, x, state.start, state.n, trace)

    def image_prefix(self, images: Tensor, upto: int, trace: Trace | None = None) -> Tensor:
        """The sequence entering block ``upto`` without prompts (blocks ``1 .. upto-1`` run).

        Methods whose prompts start at block J compute this once and continue from it with
        ``encode_image(hidden=..., start_layer=J)`` for both the prompted and the frozen pass.
        """
        x = self.embed_image(images)
        blocks = self.model.visual.transformer.resblocks[: upto - 1]
        return self._run_blocks(x, blocks, None, trace, PromptState(), 1, causal=False)

    # ----------------------------------------------------------------- text
    def text_prefix(self, token_ids: Tensor, upto: int, trace: Trace | None = None) -> Tensor:
        """The text sequence entering block ``upto`` without prompts (blocks ``1 .. upto-1`` run)."""
        blocks = self.model.transformer.resblocks[: upto - 1]
        return self._run_blocks(self.embed_text(token_ids), blocks, None, trace, PromptState(), 1, causal=True)

    def embed_text(self, token_ids: Tensor) -> Tensor:
        """Token + positional embeddings ``(N, T, W)``."""
        x = self.model.token_embedding(token_ids)
        return x + self.model.positional_embedding.to(x.dtype)

    def encode_text(
        self,
        token_ids: Tensor,
        hook: PromptHook | None = None,
        trace: Trace | None = None,
        embeddings: Tensor | None = None,
        start_layer: int = 1,
        prompt_state: PromptState | None = None,
    ) -> TowerOutput:
        """Run the text tower.

        Args:
            token_ids: ``(N, T)`` token ids; the end-of-text token is the largest id in each row.
            hook: asked before every block for prompt tokens (inserted after the start token).
            trace: filled with per-layer states / attention when given.
            embeddings: ``(N, T, W)`` to use instead of ``embed_text(token_ids)`` (CoOp-style
                context vectors); with ``start_layer > 1``, the cached input of that block.
            start_layer: the first block to run (1-based).
            prompt_state: where prompts already sit in ``embeddings``.
        """
        x = self.embed_text(token_ids) if embeddings is None else embeddings
        state = prompt_state or PromptState()
        x = self._run_blocks(x, self.model.transformer.resblocks, hook, trace, state, start_layer, causal=True)
        tokens = self.model.ln_final(x)
        eot = token_ids.argmax(dim=-1)
        if state.n:
            # Tokens inserted at or before the EOT position push it back by their number.
            eot = eot + torch.where(eot >= state.start, state.n, 0)
        pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device), eot]
        proj = self.model.text_projection
        features = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return TowerOutput(features, tokens, x, state.start, state.n, trace)

    # ----------------------------------------------------------------- blocks
    def _run_blocks(self, x, blocks, hook, trace, state, start_layer, causal) -> Tensor:
        for layer in range(start_layer, len(blocks) + 1):
            if hook is not None:
                prompt = hook(layer)
                if prompt is not None:
                    x = splice(x, prompt, state)
            mask = causal_mask(x.shape[1], x.device, x.dtype) if causal else None
            x = self._block(blocks[layer - 1], x, mask, layer, trace)
        if trace is not None:
            trace.prompt_start, trace.prompt_count = state.start, state.n
        return x

    @staticmethod
    def _block(block: nn.Module, x: Tensor, mask: Tensor | None, layer: int, trace: Trace | None) -> Tensor:
        """One pre-norm residual block: ``x + attn(ln_1 x)``, then ``x + mlp(ln_2 x)``."""
        want_weights = trace is not None and layer in trace.attention_layers
        h = block.ln_1(x)
        attn_out, weights = block.attn(
            h, h, h, need_weights=want_weights, attn_mask=mask, average_attn_weights=False
        )
        x = x + block.ls_1(attn_out)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        if trace is not None:
            if trace.record_hidden:
                trace.hidden[layer] = x
            if trace.record_attn_out:
                trace.attn_out[layer] = attn_out
            if want_weights:
                trace.attention[layer] = weights  # (B, heads, T, T)
        return x
