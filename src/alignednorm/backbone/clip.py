"""A frozen CLIP whose towers we run block by block, so methods can edit the token sequence.

``ClipBackbone`` wraps one open_clip ``CLIP``: embeddings -> per block (prompt hook -> block ->
record) -> final norm -> pooling -> projection, in both towers. Only attribute names shared by
OpenAI's archives and open_clip 3.x/4.x are touched (style.md §3). OpenAI's ResNet image towers
(RN50, RN101) run as one frozen module: methods that only prompt the text tower (zero-shot, CoOp,
CoCoOp, Nemesis, linear probe) work on them, vision hooks get a clear error; every output of their
attention pool (the local features of OT scoring, PLOT) comes from
:meth:`ClipBackbone.encode_image_tokens`. EVA-CLIP image towers
(timm's ``Eva`` in open_clip's ``TimmModel``) run block by block in :mod:`alignednorm.backbone.eva`,
and a text tower under ``model.text`` (``CustomTextCLIP``) is reached through :attr:`~ClipBackbone.text_tower`.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.tokenizer import SimpleTokenizer
from torch import Tensor, nn

from alignednorm.backbone import eva
from alignednorm.backbone.blocks import lean_applies, run_block
from alignednorm.backbone.chunks import encode_text_in_chunks
from alignednorm.backbone.frozen_memo import FrozenPassMemo, autocast_on_cpu
from alignednorm.backbone.hooks import Prefix, PromptHook, PromptState, Trace, splice
from alignednorm.backbone.loading import load_clip
from alignednorm.backbone.shared_text import run_shared, shareable
from alignednorm.errors import ConfigError


@dataclass
class TowerOutput:
    """What one tower returns.

    Attributes:
        features: projected pooled feature ``(B, E)``, not normalised.
        tokens: every token after the final LayerNorm (``ln_post``/``ln_final``), ``(B, T, W)``;
            ``None`` for a ResNet image tower.
        hidden: the last block's output before the final LayerNorm, ``(B, T, W)`` (``None`` for a ResNet).
        prompt_start, prompt_count: where prompt tokens sit in ``tokens``/``hidden``.
        trace: the per-layer record, when one was passed in.
    """

    features: Tensor
    tokens: Tensor | None
    hidden: Tensor | None
    prompt_start: int = 0
    prompt_count: int = 0
    trace: Trace | None = None


@functools.lru_cache(maxsize=64)
def causal_mask(length: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Additive causal mask ``(T, T)``: ``-inf`` above the diagonal (built once per length, device, dtype)."""
    return torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu(1)


class ClipBackbone(nn.Module):
    """A frozen CLIP with prompt hooks in both towers.

    Args:
        model: an open_clip ``CLIP`` (OpenAI layout: text modules on the model itself) or
            ``CustomTextCLIP`` (CLIP's text tower under ``model.text``), with a ViT or EVA-CLIP image
            tower, or OpenAI's ModifiedResNet one (text-side methods only).
        source: where the weights came from (a path), kept for run metadata.
    """

    def __init__(self, model: CLIP | CustomTextCLIP, source: str | None = None):
        super().__init__()
        visual = getattr(model, "visual", None)
        text = model.text if isinstance(model, CustomTextCLIP) else model
        if not hasattr(text, "token_embedding") or not (
                hasattr(visual, "transformer") or hasattr(visual, "attnpool") or eva.is_eva_tower(visual)):
            raise TypeError("ClipBackbone needs an open_clip CLIP or CustomTextCLIP with a ViT, EVA or ResNet image "
                            "tower and CLIP's text tower")
        eva_problems = eva.tower_problems(visual) if eva.is_eva_tower(visual) else []
        if eva_problems:
            raise TypeError(f"ClipBackbone would run this Eva image tower wrongly: it has {'; '.join(eva_problems)}")
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.source = source
        # Text-tower switches that change no feature, set only for a scope with :meth:`text_options`.
        self.cut_text_padding = True  # drop the padding after the last EOT (see text_length)
        self.share_text_prefix = True  # compute prompts' common beginning once (see backbone.shared_text)
        self.text_chunk: int | None = None  # at most this many prompts at once (None: all); see backbone.chunks
        self.tokenizer = SimpleTokenizer(context_length=self.context_length)
        self.frozen_memo: FrozenPassMemo | None = None  # see memoize_frozen_passes

    def _set_text_options(self, values: dict) -> dict:
        """Set the text-tower switches in ``values``; returns their previous values."""
        unknown = sorted(set(values) - {"cut_text_padding", "share_text_prefix", "text_chunk"})
        if unknown:
            raise TypeError(f"unknown text options {unknown}")
        saved = {name: getattr(self, name) for name in values}
        for name, value in values.items():
            setattr(self, name, value)
        return saved

    @contextlib.contextmanager
    def text_options(self, **values):
        """Set text-tower switches for a ``with`` block, restored after it.

        ``cut_text_padding`` / ``share_text_prefix`` (speed savings that change no feature: off only to
        measure them, or to record all 77 positions for a parity fixture) and ``text_chunk`` (encode
        at most that many prompts at once, for label spaces that do not fit in memory).
        """
        saved = self._set_text_options(values)
        try:
            yield self
        finally:
            for name, value in saved.items():
                setattr(self, name, value)

    @contextlib.contextmanager
    def memoize_frozen_passes(self, max_bytes: int):
        """Keep the image tower's frozen passes for a ``with`` block, for runs that see the same batches.

        Inside it, :meth:`image_prefix` and :meth:`frozen_features` (the frozen rest of the tower after
        it) are computed once per input content (:mod:`.frozen_memo`: exact, CPU tensors, at most
        ``max_bytes`` held). Yields the memo (its ``hits`` / ``misses``).
        """
        saved = self.frozen_memo
        self.frozen_memo = FrozenPassMemo(list(self.model.visual.parameters()), max_bytes)
        try:
            yield self.frozen_memo
        finally:
            self.frozen_memo = saved

    @classmethod
    def from_file(cls, path: str | Path, model_name: str | None = None, **text_options) -> ClipBackbone:
        """Load weights from a local file (:func:`alignednorm.backbone.loading.load_clip`).

        ``text_options`` set this backbone's :meth:`text_options` for its whole life (a parity
        harness that records all 77 text positions: ``cut_text_padding=False``).
        """
        backbone = cls(load_clip(path, model_name), source=str(path))
        backbone._set_text_options(text_options)
        return backbone

    def train(self, mode: bool = True) -> ClipBackbone:
        # The CLIP stays in eval mode: it is frozen, and methods toggle only their own modules.
        super().train(mode)
        self.model.eval()
        return self

    # ----------------------------------------------------------------- geometry
    @property
    def is_vit(self) -> bool:
        """Whether the image tower is a ViT, EVA's included (runs block by block, takes prompts and traces)."""
        return hasattr(self.model.visual, "transformer") or self.is_eva

    @property
    def is_eva(self) -> bool:
        """Whether the image tower is EVA-CLIP's timm ``Eva`` (run by :mod:`alignednorm.backbone.eva`)."""
        return eva.is_eva_tower(self.model.visual)

    @property
    def text_tower(self) -> nn.Module:
        """The module holding the text tower's parts: the CLIP itself, or ``model.text`` of a ``CustomTextCLIP``."""
        return self.model.text if isinstance(self.model, CustomTextCLIP) else self.model

    def require_vit(self, who: str) -> None:
        """Refuse, naming ``who``, when the image tower cannot take prompts (a ResNet)."""
        if not self.is_vit:
            raise ConfigError(f"{who} puts prompts into the image tower, which needs a ViT CLIP; this backbone "
                              f"({self.source or 'in memory'}) has a ResNet image tower (RN50/RN101). Use a ViT "
                              "checkpoint, or a text-side method (zeroshot, coop, cocoop, nemesis)")

    @property
    def vision_layers(self) -> int:
        return len(self._image_blocks) if self.is_vit else 0

    @property
    def text_layers(self) -> int:
        return len(self.text_tower.transformer.resblocks)

    @property
    def vision_width(self) -> int:
        if self.is_eva:
            return self.model.visual.trunk.embed_dim
        return self.model.visual.conv1.out_channels if self.is_vit else 0

    @property
    def text_width(self) -> int:
        return self.text_tower.ln_final.weight.shape[0]

    @property
    def embed_dim(self) -> int:
        proj = self.text_tower.text_projection
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[-1]

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)

    @property
    def context_length(self) -> int:
        return self.text_tower.positional_embedding.shape[0]

    # ----------------------------------------------------------------- parts methods read
    @property
    def token_embedding(self) -> nn.Embedding:
        """The text tower's token embedding table."""
        return self.text_tower.token_embedding

    @property
    def text_positional_embedding(self) -> Tensor:
        """The text tower's positional embeddings ``(context_length, W_t)``."""
        return self.text_tower.positional_embedding

    @property
    def logit_scale(self) -> Tensor:
        """CLIP's learned log temperature: ``exp`` of it scales the cosine logits."""
        return self.model.logit_scale

    @property
    def image_pre_norm(self) -> nn.Module:
        """The norm of the embedded image sequence before the blocks (``ln_pre``; EVA: ``norm_pre``)."""
        return self.model.visual.trunk.norm_pre if self.is_eva else self.model.visual.ln_pre

    @property
    def image_final_norm(self) -> nn.Module:
        """The norm after the last image block (``ln_post``; EVA: the trunk's ``norm``)."""
        return self.model.visual.trunk.norm if self.is_eva else self.model.visual.ln_post

    @property
    def image_projection(self) -> Tensor:
        """The frozen image projection as a ``(W, E)`` matrix (EVA: its linear head's weight, transposed;
        that head also adds a bias, which :meth:`project_image` applies)."""
        return self.model.visual.trunk.head.weight.t() if self.is_eva else self.model.visual.proj

    @property
    def _image_blocks(self) -> nn.ModuleList:
        return self.model.visual.trunk.blocks if self.is_eva else self.model.visual.transformer.resblocks

    def tokenize(self, texts: list[str]) -> Tensor:
        """BPE token ids ``(N, context_length)``; raises if a text would be truncated."""
        ids = self.tokenizer(texts)
        too_long = [t for t, row in zip(texts, ids) if row[-1] != 0 and row.argmax() == len(row) - 1]
        if too_long:
            text = too_long[0] if len(too_long[0]) <= 80 else too_long[0][:77] + "..."
            raise ConfigError(f"prompt longer than the text context of {self.context_length} tokens: {text!r}")
        return ids

    # ----------------------------------------------------------------- vision
    def embed_image(self, images: Tensor) -> Tensor:
        """Patch + class + positional embeddings and ``ln_pre`` (EVA: ``norm_pre``): ``(B, 1 + grid², W)``."""
        if self.is_eva:
            return eva.embed_image(self.model.visual, images)
        visual = self.model.visual
        x = visual.conv1(images.to(visual.conv1.weight.dtype))  # (B, W, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, W)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        return visual.ln_pre(x)

    def pool_image(self, tokens: Tensor) -> Tensor:
        """The projected class token ``(B, E)`` of final-norm (``ln_post``) outputs ``(B, T, W)``."""
        return self.project_image(tokens[:, 0])

    def project_image(self, pooled: Tensor, delta: Tensor | None = None) -> Tensor:
        """Pooled tokens ``(B, W)`` through the frozen image projection, ``delta`` ``(W, E)`` added to its matrix."""
        if self.is_eva:
            return eva.project(self.model.visual, pooled, delta)
        proj = self.model.visual.proj
        return pooled @ (proj if delta is None else proj + delta)

    def encode_image(
        self,
        images: Tensor | None = None,
        hook: PromptHook | None = None,
        trace: Trace | None = None,
        prefix: Prefix | None = None,
    ) -> TowerOutput:
        """Run the image tower.

        Args:
            images: ``(B, 3, H, W)`` normalised images (not needed when ``prefix`` is given).
            hook: asked before every block for prompt tokens.
            trace: filled with per-layer states / attention when given.
            prefix: start at block ``prefix.layer`` from these cached states (see :meth:`image_prefix`).
        """
        if not self.is_vit:
            if hook is not None or trace is not None or prefix is not None:
                self.require_vit("a vision prompt hook, trace or prefix")
            return TowerOutput(self.model.visual(images), None, None)
        x, state, first = self._start(prefix, images, self.embed_image)
        x = self._run_image_blocks(x, self._image_blocks, hook, trace, state, first)
        tokens = self.image_final_norm(x)
        return TowerOutput(self.pool_image(tokens), tokens, x, state.start, state.n, trace)

    def frozen_features(self, prefix: Prefix) -> Tensor:
        """Features ``(B, E)`` of the image tower's prompt-free rest from ``prefix``, without gradient (a teacher).

        Equal to ``encode_image(prefix=prefix).features`` under ``no_grad``; taken from the frozen-pass memo
        when ``prefix`` came from it (see :meth:`memoize_frozen_passes`).
        """
        with torch.no_grad():
            memo = self.frozen_memo if self._memoizes() else None
            features = None if memo is None else memo.continuation(prefix.states, prefix.layer)
            if features is None:
                features = self.encode_image(prefix=prefix).features
                if memo is not None:
                    features = memo.store_continuation(prefix.states, prefix.layer, features)
            return features

    def encode_image_tokens(self, images: Tensor, trace: Trace | None = None) -> Tensor:
        """Every output token of the image tower in the joint space, ``(B, 1 + G, E)`` (not normalised).

        Index 0 is the pooled feature (equal to ``encode_image(images).features``), 1.. the G grid
        positions in row-major order: the local features of optimal-transport scoring (PLOT).

        * ViT / EVA: every token after the final norm, through the image projection (class token first).
        * ResNet: the attention pool run with every position as a query, not only the mean token
          (the spatial features of the last stage, positional embedding added, full attention among
          the ``1 + G`` tokens, then the q/k/v and output projections, as CLIP's pool does for token 0).
          A ``trace`` records the output of ResNet stage ``i`` as ``hidden[i]`` (``(B, C_i, H_i, W_i)``).
        """
        if self.is_vit:
            return self.project_image(self.encode_image(images, trace=trace).tokens)
        visual = self.model.visual
        x = visual.stem(images.to(visual.conv1.weight.dtype))  # (B, W, R/4, R/4)
        for stage, layer in enumerate((visual.layer1, visual.layer2, visual.layer3, visual.layer4), start=1):
            x = layer(x)
            if trace is not None and trace.record_hidden and trace.keeps(stage):
                trace.hidden[stage] = x
        return attention_pool_tokens(visual.attnpool, x)

    def image_prefix(self, images: Tensor, upto: int, trace: Trace | None = None) -> Prefix:
        """The prompt-free sequence entering block ``upto`` (blocks ``1 .. upto-1`` run)."""
        self.require_vit("image_prefix")
        unrecorded = trace is None or not trace.records_before(upto)
        key = self.frozen_memo.key(images, upto) if unrecorded and self._memoizes() else None
        states = None if key is None else self.frozen_memo.prefix(key)
        if states is not None:
            if trace is not None:
                trace.ran_prompt_free(upto)
            return Prefix(upto, states)
        blocks = self._image_blocks[: upto - 1]
        states = self._run_image_blocks(self.embed_image(images), blocks, None, trace, PromptState(), 1)
        return Prefix(upto, states if key is None else self.frozen_memo.store_prefix(key, states))

    def _memoizes(self) -> bool:
        """Whether a frozen pass may use the memo now: one is kept, no gradient is recorded, no autocast."""
        return self.frozen_memo is not None and not torch.is_grad_enabled() and not autocast_on_cpu()

    def _run_image_blocks(self, x, blocks, hook, trace, state, start_layer) -> Tensor:
        if self.is_eva:  # rotary embeddings and EVA's blocks
            return eva.run_blocks(self.model.visual.trunk, x, blocks, hook, trace, state, start_layer)
        return self._run_blocks(x, blocks, hook, trace, state, start_layer, causal=False)

    # ----------------------------------------------------------------- text
    def embed_text(self, token_ids: Tensor) -> Tensor:
        """Token + positional embeddings ``(N, T, W)``."""
        x = self.text_tower.token_embedding(token_ids)
        return x + self.text_tower.positional_embedding.to(x.dtype)

    def _keeps_padding(self, full_length: bool | None) -> bool:
        return not self.cut_text_padding if full_length is None else full_length

    @staticmethod
    def text_length(token_ids: Tensor) -> int:
        """Positions up to the longest prompt's end-of-text token: all that reaches any pooled feature.

        Under the causal mask a token attends only to earlier ones, so cutting the padding after the
        last EOT leaves every EOT state, and so every text feature, unchanged (77 -> ~10 positions).
        """
        return int(token_ids.argmax(dim=-1).max()) + 1

    def text_prefix(self, token_ids: Tensor, upto: int, trace: Trace | None = None,
                    embeddings: Tensor | None = None, full_length: bool | None = None) -> Prefix:
        """The prompt-free text sequence entering block ``upto`` (blocks ``1 .. upto-1`` run)."""
        x = self.embed_text(token_ids) if embeddings is None else embeddings
        if not self._keeps_padding(full_length):
            x = x[:, : self.text_length(token_ids)]
        blocks = self.text_tower.transformer.resblocks[: upto - 1]
        return Prefix(upto, self._run_blocks(x, blocks, None, trace, PromptState(), 1, causal=True))

    def pool_text(self, tokens: Tensor, token_ids: Tensor, prompts: PromptState | None = None) -> Tensor:
        """The projected end-of-text token ``(N, E)`` of ``ln_final`` outputs ``(N, T, W)``.

        The EOT is the largest id of each row of ``token_ids``; prompt tokens inserted at or before
        it push it back by their number.
        """
        eot = token_ids.argmax(dim=-1)
        if prompts is not None and prompts.n:
            eot = eot + torch.where(eot >= prompts.start, prompts.n, 0)
        pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device), eot]
        proj = self.text_tower.text_projection
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj

    def encode_text(
        self,
        token_ids: Tensor,
        hook: PromptHook | None = None,
        trace: Trace | None = None,
        embeddings: Tensor | None = None,
        prefix: Prefix | None = None,
        full_length: bool | None = None,
        embeddings_built_alike: bool = False,
    ) -> TowerOutput:
        """Run the text tower.

        Args:
            token_ids: ``(N, T)`` token ids; the end-of-text token is the largest id in each row.
            hook: asked before every block for prompt tokens (inserted after the start token).
            trace: filled with per-layer states / attention when given.
            embeddings: ``(N, T, W)`` input embeddings to use instead of ``embed_text(token_ids)``
                (CoOp-style context vectors put in place of some word embeddings).
            prefix: start at block ``prefix.layer`` from these cached states (see :meth:`text_prefix`).
            full_length: run all ``T`` positions; by default (``None``: ``not cut_text_padding``) the
                padding after the last end-of-text token is cut (:meth:`text_length`), which changes no feature.
            embeddings_built_alike: rows of ``embeddings`` equal at their leading positions were built
                alike (one context for every class, not one per class), so those positions may run once
                for all rows (:mod:`~alignednorm.backbone.shared_text`); never for class-specific contexts.

        With ``text_chunk`` set and more rows than it, the rows run in chunks under activation
        checkpointing and only ``features`` is returned (``tokens``/``hidden`` are ``None``).
        """
        if self.text_chunk and token_ids.shape[0] > self.text_chunk and trace is None:
            features = encode_text_in_chunks(self, self.text_chunk, token_ids, hook, embeddings, prefix,
                                             full_length=full_length, embeddings_built_alike=embeddings_built_alike)
            return TowerOutput(features, None, None)
        x, state, first = self._start(prefix, token_ids,
                                      self.embed_text if embeddings is None else lambda _: embeddings)
        if not self._keeps_padding(full_length):  # prompts inserted before the EOTs lengthen the kept part
            x = x[:, : self.text_length(token_ids) + (state.n if prefix is not None else 0)]
        x = self._run_blocks(x, self.text_tower.transformer.resblocks, hook, trace, state, first, causal=True,
                             rows_built_alike=embeddings_built_alike)
        tokens = self.text_tower.ln_final(x)
        return TowerOutput(self.pool_text(tokens, token_ids, state), tokens, x, state.start, state.n, trace)

    # ----------------------------------------------------------------- blocks
    @staticmethod
    def _start(prefix: Prefix | None, inputs, embed) -> tuple[Tensor, PromptState, int]:
        """The sequence, prompt bookkeeping and first block of a tower pass."""
        if prefix is None:
            return embed(inputs), PromptState(), 1
        return prefix.states, PromptState(prefix.prompts.start, prefix.prompts.n), prefix.layer

    def _run_blocks(self, x, blocks, hook, trace, state, start_layer, causal, rows_built_alike=False) -> Tensor:
        shared = shareable(x, rows_built_alike) if causal and trace is None and self.share_text_prefix else 0
        if shared:
            return run_shared(x, shared, blocks, hook, state, start_layer, self._causal_block)
        for layer in range(start_layer, len(blocks) + 1):
            if hook is not None:
                prompt = hook(layer)
                if prompt is not None:
                    x = splice(x, prompt, state)
            mask = causal_mask(x.shape[1], x.device, x.dtype) if causal else None
            x = self._block(blocks[layer - 1], x, mask, layer, trace)
            if trace is not None:
                trace.positions[layer] = (state.start, state.n)
        if trace is not None:
            trace.prompt_start, trace.prompt_count = state.start, state.n
        return x

    def _causal_block(self, block: nn.Module, x: Tensor, layer: int) -> Tensor:
        return self._block(block, x, causal_mask(x.shape[1], x.device, x.dtype), layer, None)

    @staticmethod
    def _block(block: nn.Module, x: Tensor, mask: Tensor | None, layer: int, trace: Trace | None) -> Tensor:
        """One pre-norm residual block: ``x + attn(ln_1 x)``, then ``x + mlp(ln_2 x)``."""
        want_weights = trace is not None and layer in trace.attention_layers
        if not want_weights and lean_applies(block, x, mask):
            x, attn_out = run_block(block, x, mask)  # the same arithmetic, fewer dispatches
        else:
            h = block.ln_1(x)
            attn_out, weights = block.attn(
                h, h, h, need_weights=want_weights, attn_mask=mask, average_attn_weights=False
            )
            x = x + block.ls_1(attn_out)
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        if trace is not None and trace.keeps(layer):
            if trace.record_hidden:
                trace.hidden[layer] = x
            if trace.record_attn_out:
                trace.attn_out[layer] = attn_out
        if want_weights:
            trace.attention[layer] = weights  # (B, heads, T, T)
        return x


def attention_pool_tokens(pool: nn.Module, x: Tensor) -> Tensor:
    """All ``1 + H·W`` outputs ``(B, 1 + H·W, E)`` of CLIP's ``AttentionPool2d`` on features ``(B, C, H, W)``.

    CLIP's pool keeps only output 0 (the query of the mean token); the others are the same attention
    with each grid position as the query (index ``1 + h·W + w``).
    """
    x = x.flatten(2).permute(2, 0, 1)  # (H·W, B, C)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + pool.positional_embedding[:, None].to(x.dtype)
    out, _ = F.multi_head_attention_forward(
        query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False)
    return out.transpose(0, 1)  # (B, 1 + H·W, E)
