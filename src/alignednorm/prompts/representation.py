"""MMRL's shared representation space and the aligners that map it into each tower.

R (``n × r`` learnable tokens) is shared by both modalities and every prompted layer; an
aligner maps it to a tower's width once per prompted layer:

* MMRL: one full linear map per layer (all copies of one initial ``nn.Linear``).
* MMRL++ (SRRA): ``T_k = R (W + A_k B_k)ᵀ + b_k`` with a shared ``W``, a rank-``q``
  residual ``A_k B_k`` (``B_k`` starts at zero) and a per-layer bias (all copies of one).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from alignednorm.backbone.hooks import LayerPrompt


def _linear_init(out_features: int, in_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features)


class ResidualAligner(nn.Module):
    """MMRL++'s shared-residual representation aligner for one tower.

    Args:
        num_layers: number of prompted layers K.
        rep_dim: r, the width of the shared representation tokens.
        width: the tower's width.
        rank: rank of the per-layer residual.
    """

    def __init__(self, num_layers: int, rep_dim: int, width: int, rank: int):
        super().__init__()
        base = _linear_init(width, rep_dim)
        self.weight = nn.Parameter(base.weight.detach().clone())  # (W, r)
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        self.bias = nn.ParameterList()
        for _ in range(num_layers):
            a = torch.empty(width, rank)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.A.append(nn.Parameter(a))
            self.B.append(nn.Parameter(torch.zeros(rank, rep_dim)))
            self.bias.append(nn.Parameter(base.bias.detach().clone()))

    def forward(self, rep_tokens: Tensor) -> Tensor:
        """``(n, r)`` -> ``(K, n, W)``: the tokens for every prompted layer."""
        return torch.stack([
            rep_tokens @ (self.weight + a @ b).t() + bias for a, b, bias in zip(self.A, self.B, self.bias)
        ])


class LinearAligner(nn.Module):
    """MMRL's aligner: an independent ``nn.Linear(r, W)`` per prompted layer, identical at start."""

    def __init__(self, num_layers: int, rep_dim: int, width: int):
        super().__init__()
        base = _linear_init(width, rep_dim)
        self.layers = nn.ModuleList(copy.deepcopy(base) for _ in range(num_layers))

    def forward(self, rep_tokens: Tensor) -> Tensor:
        return torch.stack([layer(rep_tokens) for layer in self.layers])  # (K, n, W)


def representation_hook(tokens: Tensor, layers: list[int], beta: float):
    """A prompt hook: insert ``tokens[0]`` after the first token at ``layers[0]``, then mix.

    At every later prompted layer the prompt positions become
    ``beta · tokens[k] + (1 − beta) · previous block output`` (MMRL++'s progressive
    composition); ``beta = 1`` is MMRL's plain replacement.
    """
    index = {layer: k for k, layer in enumerate(layers)}
    first = layers[0]

    def hook(layer: int) -> LayerPrompt | None:
        k = index.get(layer)
        if k is None:
            return None
        if layer == first:
            return LayerPrompt(tokens[0], mode="insert", at=1)
        return LayerPrompt(tokens[k], mode="blend", at=None, beta=beta)

    return hook
