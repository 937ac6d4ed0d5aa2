"""AlignedNorm's norm-alignment losses (ICML 2026, Eqs. 10–11).

Both pull the prompt side's norm towards the class-token side's norm, with the class-token
side detached (stop-gradient), so the prompts adapt and the class token keeps CLIP's scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

PROJ_FORMS = ("l1", "hinge", "smooth_l1", "ring")
TOKEN_FORMS = ("code", "paper")


def gap_loss(prompt_norm: Tensor, class_norm: Tensor, form: str = "l1", margin: float = 0.0) -> Tensor:
    """Elementwise penalty on ``prompt_norm − sg(class_norm)``.

    Forms (the paper's Table 10 names them; their exact formulas are not published, these are ours):
    ``l1`` |d| (the paper's and released code's form); ``hinge`` max(0, |d| − margin) (a dead
    zone of ``margin``); ``smooth_l1`` Huber with beta 1; ``ring`` d²/2 (Ring loss, Zheng et al. 2018,
    with the class-token norm as the target radius).
    """
    gap = prompt_norm - class_norm.detach()
    if form == "l1":
        return gap.abs()
    if form == "hinge":
        return F.relu(gap.abs() - margin)
    if form == "smooth_l1":
        return F.smooth_l1_loss(prompt_norm, class_norm.detach(), reduction="none", beta=1.0)
    if form == "ring":
        return 0.5 * gap.pow(2)
    raise ValueError(f"unknown L_proj form {form!r}; expected one of {PROJ_FORMS}")


def proj_alignment(z_p: Tensor, z_c: Tensor, form: str = "l1", margin: float = 0.0) -> Tensor:
    """L_proj (Eq. 10): batch mean of the gap between ‖z_p‖ and sg(‖z_c‖); ``(B, E)`` inputs."""
    return gap_loss(z_p.float().norm(dim=-1), z_c.float().norm(dim=-1), form, margin).mean()


def token_alignment(class_tokens: Tensor, prompt_tokens: Tensor, form: str = "code") -> Tensor:
    """L_token over the prompted layers.

    Args:
        class_tokens: ``(K, B, W)`` class token output by each prompted block (before ``ln_post``).
        prompt_tokens: ``(K, B, n, W)`` prompt tokens output by the same blocks.
        form: ``"code"`` — the authors' released trainer: per-token norms averaged over the batch
            *inside* |·|, then the mean over layers and tokens (the default; γ's published values
            assume it). ``"paper"`` — Eq. 11: per image, Σ_l |‖mean_j P_l[j]‖ − sg‖c_l‖|, then the
            batch mean (about K·n times larger in practice).
    """
    class_norm = class_tokens.float().norm(dim=-1)  # (K, B)
    if form == "code":
        prompt_norm = prompt_tokens.float().norm(dim=-1).mean(dim=1)  # (K, n): batch mean of per-token norms
        return (prompt_norm - class_norm.mean(dim=1, keepdim=True).detach()).abs().mean()
    if form == "paper":
        mean_norm = prompt_tokens.float().mean(dim=2).norm(dim=-1)  # (K, B)
        return (mean_norm - class_norm.detach()).abs().sum(dim=0).mean()
    raise ValueError(f"unknown L_token form {form!r}; expected one of {TOKEN_FORMS}")


def stack_layers(hidden: dict[int, Tensor], layers: list[int], start: int, n: int) -> tuple[Tensor, Tensor]:
    """Class ``(K, B, W)`` and prompt ``(K, B, n, W)`` tokens of the given layers from a trace."""
    states = torch.stack([hidden[layer] for layer in layers])  # (K, B, T, W)
    return states[:, :, 0], states[:, :, start : start + n]
