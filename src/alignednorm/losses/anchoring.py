"""Self-regularisation towards frozen CLIP features (MMRL/MMRL++'s "anchoring")."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def cosine_anchor(features: Tensor, frozen: Tensor) -> Tensor:
    """``1 − mean_i cos(features_i, frozen_i)`` over rows; both ``(N, E)``."""
    return 1.0 - F.cosine_similarity(features, frozen, dim=-1, eps=1e-8).mean()
