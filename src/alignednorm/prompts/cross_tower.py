"""HiCroPL's cross-tower prompt flow: layer-specific knowledge proxies and knowledge mappers.

HiCroPL (Zheng et al., ICCV 2025, §3.2–3.3) keeps ``n`` prompt tokens per block in both towers for
blocks ``1..d`` and lets knowledge flow between the towers, split at block ``k``:

* **Layers 1..k, text → vision.** A layer-specific knowledge proxy (LKP, Eq. 4) pools the ``n`` text
  prompts of each layer ``l ≤ k`` into one token: a learnable query ``q_l`` attends over them,
  ``t_l = LN_2(q_l + MHA(LN_1 q_l, LN_1 P^t_l, LN_1 P^t_l))``. The text→vision knowledge mapper
  (Eq. 5–6) then lets **all** ``k·n`` visual prompts of layers ``1..k`` attend to the ``k`` proxies
  at once (multi-scale fusion): with ``Q = W_q P^v``, ``K = W_k t``, ``V = W_v t``,
  ``Q' = Q + MHA(LN_1 Q, LN_1 K, LN_1 V)`` and ``P^v ← Q' + FFN(LN_2 Q')`` (FFN: 4× QuickGELU MLP).
* **Layers k+1..d, vision → text.** The mirror image: proxies pool each layer's visual prompts and
  the vision→text mapper rewrites the text prompts of layers ``k+1..d``.

The prompts that are not rewritten (text ``1..k``, vision ``k+1..d``) are used as they are; they are
the keys of the proxies. The module is a pure function of the prompts it is given; whether its
output replaces the stored prompts (the official behaviour) is the method's business
(``methods/hicropl.py``, option ``mapping``).

Names here ↔ official ``trainers/hicropl.py``:

* :class:`KnowledgeProxy` ↔ ``AttentionPooling``; ``text_proxies["l"]`` ↔
  ``attn_pooling_text_nets[l − 1]`` with ``query`` ↔ ``text_proxy_token[l − 1]``;
  ``vision_proxies["l"]`` ↔ ``attn_pooling_visual_nets[l − k − 1]`` / ``visual_proxy_token[l − k − 1]``.
* :class:`KnowledgeMapper` ↔ ``CrossPromptAttention``; ``text_to_vision`` ↔ ``text2visual_net``,
  ``vision_to_text`` ↔ ``visual2text_net`` (sub-module names identical).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass

import torch
from open_clip.transformer import QuickGELU
from torch import Tensor, nn

from alignednorm.errors import ConfigError


class KnowledgeProxy(nn.Module):
    """A layer-specific knowledge proxy (LKP, Eq. 4): one learnable query pools one layer's prompts.

    Args:
        width: the width W of the prompts it pools.
        heads: attention heads (the official code uses 8).
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, width))  # official: N(0, 1)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, prompts: Tensor) -> Tensor:
        """``(n, W)`` prompts → ``(1, W)`` proxy token."""
        # Keys and values normalised as two tensors, as the official code: torch projects them separately
        # then (one packed projection when they are the same object, which rounds differently).
        q, k, v = self.ln_1(self.query), self.ln_1(prompts), self.ln_1(prompts)
        pooled = self.query + self.attn(q, k, v, need_weights=False)[0]
        return self.ln_2(pooled)


class KnowledgeMapper(nn.Module):
    """Cross-attention from one tower's prompts (queries) to the other's proxies (Eq. 5–6).

    Args:
        width: the width of the prompts being rewritten (queries and output).
        source_width: the width of the proxies they attend to (keys and values).
        heads: attention heads (the official code uses 8).
    """

    def __init__(self, width: int, source_width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.linear_q = nn.Linear(width, width)
        self.linear_k = nn.Linear(source_width, width)
        self.linear_v = nn.Linear(source_width, width)
        self.ln_1 = nn.LayerNorm(width)
        self.ffn = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, prompts: Tensor, proxies: Tensor) -> Tensor:
        """``(m, W)`` prompts attending to ``(s, W_src)`` proxies → ``(m, W)`` new prompts."""
        q, k, v = self.linear_q(prompts), self.linear_k(proxies), self.linear_v(proxies)
        q = q + self.attn(self.ln_1(q), self.ln_1(k), self.ln_1(v), need_weights=False)[0]
        return q + self.ffn(self.ln_2(q))


@dataclass
class CrossTowerOutput:
    """What one pass of the cross-tower flow produced.

    Attributes:
        vision: ``{l: (n, W_v)}`` new visual prompts of layers ``1..k`` (official ``updated_visual_prompts``).
        text: ``{l: (n, W_t)}`` new text prompts of layers ``k+1..d`` (official ``updated_text_prompts``).
        text_proxies: ``(k, W_t)`` the text proxies of layers ``1..k`` (``None`` when k = 0).
        vision_proxies: ``(d − k, W_v)`` the visual proxies of layers ``k+1..d`` (``None`` when k = d).
    """

    vision: dict[int, Tensor]
    text: dict[int, Tensor]
    text_proxies: Tensor | None = None
    vision_proxies: Tensor | None = None


def _clones(module: nn.Module, layers: range) -> nn.ModuleDict:
    """Deep copies of ``module`` keyed by layer: the official ``_get_clones``, so all start equal."""
    return nn.ModuleDict({str(layer): copy.deepcopy(module) for layer in layers})


class CrossTowerFlow(nn.Module):
    """Bidirectional, hierarchical prompt flow: text → vision in layers ``1..k``, vision → text in ``k+1..d``.

    Args:
        depth: d, the prompted layers (PROMPT_DEPTH).
        cross_layer: k, the last layer of the text → vision direction (CROSS_LAYER); 0 or d leave out
            one direction.
        text_width, vision_width: W_t and W_v.
        heads: attention heads of the proxies and mappers; must divide both widths.
    """

    def __init__(self, depth: int, cross_layer: int, text_width: int, vision_width: int, heads: int = 8):
        super().__init__()
        if not 0 <= cross_layer <= depth:
            raise ConfigError(f"cross_layer = {cross_layer} must be within [0, prompt_depth = {depth}]")
        for name, width in (("text", text_width), ("vision", vision_width)):
            if width % heads:
                raise ConfigError(f"mapper_heads = {heads} does not divide the {name} width {width}")
        self.depth, self.cross_layer = depth, cross_layer
        # Each direction's proxies are copies of one module (same start values, as the official code).
        self.text_proxies = _clones(KnowledgeProxy(text_width, heads), range(1, cross_layer + 1))
        self.vision_proxies = _clones(KnowledgeProxy(vision_width, heads), range(cross_layer + 1, depth + 1))
        if cross_layer > 0:
            self.text_to_vision = KnowledgeMapper(vision_width, text_width, heads)
        if cross_layer < depth:
            self.vision_to_text = KnowledgeMapper(text_width, vision_width, heads)

    def forward(self, text: dict[int, Tensor], vision: dict[int, Tensor]) -> CrossTowerOutput:
        """Map prompts across the towers.

        Args:
            text: ``{l: (n, W_t)}`` text prompts of layers ``1..d``.
            vision: ``{l: (n, W_v)}`` visual prompts of layers ``1..d``.
        """
        k, d = self.cross_layer, self.depth
        out = CrossTowerOutput(vision={}, text={})
        if k > 0:
            out.vision, out.text_proxies = self._map(self.text_proxies, self.text_to_vision, text, vision,
                                                     range(1, k + 1))
        if k < d:
            out.text, out.vision_proxies = self._map(self.vision_proxies, self.vision_to_text, vision, text,
                                                     range(k + 1, d + 1))
        return out

    @staticmethod
    def _map(proxies: nn.ModuleDict, mapper: KnowledgeMapper, source: dict[int, Tensor],
             target: dict[int, Tensor], layers: range) -> tuple[dict[int, Tensor], Tensor]:
        """Pool ``source`` per layer, let all ``target`` prompts of ``layers`` attend to the pooled tokens."""
        pooled = torch.cat([proxies[str(layer)](source[layer]) for layer in layers])  # (L, W_src)
        queries = torch.stack([target[layer] for layer in layers])  # (L, n, W)
        mapped = mapper(queries.flatten(0, 1), pooled).view_as(queries)  # (L·n, W) -> (L, n, W)
        return {layer: mapped[i] for i, layer in enumerate(layers)}, pooled
