"""Deep prompts: per-block token stacks for either tower, MaPLe's text→vision couplings, GPA.

Deep prompting (VPT-deep, IVLP, MaPLe) gives block ``l = 1..J`` of a tower its own ``n``
learnable tokens. Block 1's tokens enter with the input (text: in place of the first ``n`` word
embeddings after SOT; vision: appended after the patch tokens, before ``ln_pre``); at the input
of every later block ``l ≤ J`` they **replace** what block ``l − 1`` output at those positions
(MaPLe Eq. 2–6, PromptSRC §3.1: ``[_, x_l, _] = B_l([P_{l−1}, x_{l−1}, ...])``). Blocks past ``J``
pass the prompt positions through.

Names here ↔ official code:

* :class:`PromptStack` entry ``"l"`` ↔ MaPLe ``prompt_learner.ctx`` (l = 1) and
  ``compound_prompts_text[l − 2]``; PromptSRC ``prompt_learner.ctx`` / ``image_encoder.VPT``
  (l = 1) and ``{text,image}_encoder.transformer.resblocks[l − 1].VPT_shallow``.
* :class:`Coupling` entry ``"l"`` ↔ MaPLe's coupling function F_l (Eq. 7):
  ``prompt_learner.proj`` (l = 1) and ``compound_prompt_projections[l − 2]``.

**Official float16 rounding** (``official_fp16_rounding``). With ``PREC fp32`` the official MaPLe
and IVLP blocks still call ``.half()`` on every *visual* prompt and every *deep text* prompt
before concatenating it into the float32 sequence (the input-layer text context is not cast).
So the forward sees those tokens rounded to float16, and in the backward the gradient of each
expanded copy (one per image or class) is rounded to float16 before the copies are summed in
float32. :func:`expand_tokens` reproduces both effects by expanding first and then rounding
(``x.half().float()`` under autograd); it is needed to meet the golden-tensor tolerances
(``shared/reference`` maple_a / promptsrc_a) and changes results at the 1e-4 level only.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import Tensor, nn

from alignednorm.backbone.hooks import LayerPrompt, PromptHook
from alignednorm.errors import ConfigError


def round_fp16(x: Tensor) -> Tensor:
    """``x`` rounded to float16 and back to its dtype (differentiable; the gradient is rounded too)."""
    return x.to(torch.float16).to(x.dtype)


def expand_tokens(tokens: Tensor, count: int, fp16_rounding: bool = False) -> Tensor:
    """``(n, W)`` tokens → ``(count, n, W)`` copies, each rounded to float16 when asked (see module doc)."""
    copies = tokens.unsqueeze(0).expand(count, -1, -1)  # (count, n, W)
    return round_fp16(copies) if fp16_rounding else copies


class PromptStack(nn.ParameterDict):
    """Learnable ``(n, W)`` tokens for some blocks of one tower, keyed by the 1-based block number.

    Args:
        blocks: the prompted blocks (e.g. ``1..J``).
        n: tokens per block.
        width: the tower's width W.
        std: init N(0, std²), as the official code draws every deep prompt.
    """

    def __init__(self, blocks: list[int], n: int, width: int, std: float = 0.02):
        super().__init__({str(b): nn.Parameter(torch.empty(n, width).normal_(std=std)) for b in blocks})

    def blocks(self) -> list[int]:
        return sorted(int(k) for k in self.keys())

    def deep(self, upto: int | None = None) -> dict[int, Tensor]:
        """``{block: tokens}`` for blocks ≥ 2 (and ≤ ``upto``): the ones that replace previous outputs."""
        return {b: self[str(b)] for b in self.blocks() if b >= 2 and (upto is None or b <= upto)}


class Coupling(nn.ModuleDict):
    """MaPLe's coupling functions ``F_l: Linear(W_t → W_v)``, one per prompted block (Eq. 7).

    Block 1's function is its own ``nn.Linear``; the deeper ones start as copies of one
    ``nn.Linear`` (the official code deep-copies a single layer, so they are equal at init).

    Args:
        blocks: the prompted blocks ``1..J``.
        text_width, vision_width: W_t and W_v.
        fp16_init: round block 1's initial weights to float16 (the official code calls ``.half()`` on
            that layer whatever the precision, so its start values are float16-rounded).
    """

    def __init__(self, blocks: list[int], text_width: int, vision_width: int, fp16_init: bool = False):
        layers = {}
        deep = None
        for b in blocks:
            if b == 1:
                layers["1"] = nn.Linear(text_width, vision_width)
                if fp16_init:
                    with torch.no_grad():
                        for p in layers["1"].parameters():
                            p.copy_(round_fp16(p))
            else:
                deep = deep or nn.Linear(text_width, vision_width)
                layers[str(b)] = copy.deepcopy(deep)
        super().__init__(layers)

    def forward(self, text_tokens: dict[int, Tensor]) -> dict[int, Tensor]:
        """``{block: (n, W_t)}`` → ``{block: (n, W_v)}``: the vision prompts of every coupled block."""
        return {b: self[str(b)](tokens) for b, tokens in text_tokens.items() if str(b) in self}


def text_context_hook(deep: dict[int, Tensor], at: int = 1) -> PromptHook:
    """Replace text positions ``at .. at+n-1`` by ``deep[l]`` ``(C, n, W_t)`` at the input of block ``l``."""

    def hook(layer: int) -> LayerPrompt | None:
        tokens = deep.get(layer)
        return None if tokens is None else LayerPrompt(tokens, mode="replace", at=at)

    return hook


def appended_vision_hook(first: Tensor, deep: dict[int, Tensor]) -> PromptHook:
    """Vision prompts appended after the patch tokens at block 1, replaced at the later blocks.

    Args:
        first: ``(B, n, W_v)`` block-1 prompts, already through ``ln_pre`` (LayerNorm acts per token,
            so ``ln_pre([x, p]) = [ln_pre(x), ln_pre(p)]``: appending after ``ln_pre`` is exact).
        deep: ``{block: (B, n, W_v)}`` for blocks ≥ 2.
    """

    def hook(layer: int) -> LayerPrompt | None:
        if layer == 1:
            return LayerPrompt(first, mode="insert", at=-1)
        tokens = deep.get(layer)
        return None if tokens is None else LayerPrompt(tokens, mode="replace", at=None)

    return hook


def context_init(backbone, ctx_init: str, n_ctx: int, width: int) -> tuple[Tensor, str]:
    """Initial text context ``(n_ctx, W_t)`` and the words standing in the prompt before the class name.

    With ``ctx_init`` (official CTX_INIT): the token embeddings of its first ``n_ctx`` tokens, and the
    whole phrase as prompt prefix (the words past ``n_ctx`` stay fixed tokens). Without: N(0, 0.02²)
    vectors and ``"X X ... X"`` placeholders, as the official code.
    """
    if not ctx_init:
        return torch.empty(n_ctx, width).normal_(std=0.02), " ".join(["X"] * n_ctx)
    phrase = ctx_init.replace("_", " ")
    ids = backbone.tokenize([phrase])
    n_words = int(ids[0].argmax()) - 1  # tokens between SOT and EOT
    if n_words < n_ctx:
        raise ConfigError(f"ctx_init = {ctx_init!r} has {n_words} tokens, fewer than n_ctx = {n_ctx}; "
                          "use a longer phrase or ctx_init='' (random init)")
    weight = backbone.token_embedding.weight
    with torch.no_grad():
        vectors = backbone.token_embedding(ids.to(weight.device))[0, 1 : 1 + n_ctx].float().cpu().clone()
    return vectors, phrase


def splice_context(embeddings: Tensor, ctx: Tensor) -> Tensor:
    """Token embeddings ``(C, T, W)`` with positions ``1..n`` replaced by the context ``(n, W)`` (or ``(C, n, W)``)."""
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(embeddings.shape[0], -1, -1)
    n = ctx.shape[1]
    return torch.cat([embeddings[:, :1], ctx.to(embeddings.dtype), embeddings[:, 1 + n :]], dim=1)


def gaussian_epoch_weights(mean: float, std: float, epochs: int) -> np.ndarray:
    """PromptSRC's GPA weights ``w_e ∝ N(e; mean, std²)`` for epochs ``e = 1..epochs``, summing to 1 (Eq. 7)."""
    e = np.arange(1, epochs + 1, dtype=np.float64)
    density = np.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    return density / density.sum()


class GaussianPromptAverage:
    """Gaussian-weighted prompt aggregation (PromptSRC's GPA, Eq. 7): ``P = Σ_e w_e P_e``.

    After every epoch ``e`` the learnable tensors are weighted by ``w_e`` and added to a running
    sum; after the last epoch the sum replaces the tensors. The official code weights its whole
    state dict (frozen CLIP included), which leaves frozen tensors equal up to rounding, since the
    weights sum to 1; we sum the learnable tensors only.
    """

    def __init__(self, mean: float, std: float):
        self.mean, self.std = mean, std
        self.sums: dict[str, Tensor] = {}

    def weights(self, epochs: int) -> np.ndarray:
        return gaussian_epoch_weights(self.mean, self.std, epochs)

    @torch.no_grad()
    def update(self, params: dict[str, Tensor], epoch: int, epochs: int) -> bool:
        """Add epoch ``epoch`` (0-based) of ``epochs``; returns True when the average is complete."""
        weight = float(self.weights(epochs)[epoch])
        if epoch == 0:
            self.sums = {}
        for name, value in params.items():
            weighted = value.detach() * weight  # float32 product, as the official weighting
            self.sums[name] = self.sums[name] + weighted if name in self.sums else weighted.clone()
        return epoch == epochs - 1

    def pop(self) -> dict[str, Tensor]:
        sums, self.sums = self.sums, {}
        return sums
