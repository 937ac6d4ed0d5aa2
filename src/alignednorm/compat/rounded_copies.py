"""Comparing gradients of prompts the official float32 paths round to float16 (MaPLe, PromptSRC, HiCroPL).

The official backward rounds the gradient of every copy of a visual prompt and of a deep text
prompt (one copy per image or class) to float16 before summing the copies. Our float32 forward
agrees with the official one to a few ulps but not bit for bit (and the last bits depend on the
CPU's kernels), so wherever a copy's gradient sits next to a float16 rounding boundary the two
round to neighbouring float16 values: one float16 step (~5e-4 relative to that copy) in the sum,
more than the 1e-4 × max|g| rule allows. For these tensors we record each copy's float32 gradient
before the rounding and require the reference to lie in ``[Σ_c fp16(g_c − δ|g_c|), Σ_c fp16(g_c +
δ|g_c|)]`` widened by that rule, δ = the rule's relative tolerance, applied per copy before
rounding: a copy may round either way only where it is within δ of a boundary. ``max_abs_diff``
still reports the plain difference.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def per_copy_gradients(method):
    """``{parameter name: [(copies, n, W) float32 gradients before the float16 rounding]}`` of the next backward.

    Wraps ``expand_tokens`` where the deep prompt methods call it (``methods/maple.py``) for the duration.
    """
    from alignednorm.methods import maple

    names, grads, original = {id(p): n for n, p in method.named_parameters()}, {}, maple.expand_tokens

    def expand(tokens, count, fp16_rounding=False):
        out = original(tokens, count, fp16_rounding)
        name = names.get(id(tokens))
        if fp16_rounding and name is not None and out.requires_grad:
            out.register_hook(lambda g, name=name: grads.setdefault(name, []).append(g.detach().clone()))
        return out

    maple.expand_tokens = expand
    try:
        yield grads
    finally:
        maple.expand_tokens = original


def compare_rounded_copies(ours: torch.Tensor, ref: torch.Tensor, copies: torch.Tensor, tol: dict) -> dict:
    """A gradient summed from float16-rounded copies against the reference (see the module docstring)."""
    limit = tol["gradients_rel"] * float(ref.abs().max()) if ref.numel() else 0.0
    slack = tol["gradients_rel"] * copies.abs()  # δ|g_c|
    low = (copies - slack).half().float().sum(0) - limit
    high = (copies + slack).half().float().sum(0) + limit
    # Both the reference and our own sum must be reachable from our copies.
    outside = max(float(torch.maximum(low - x, x - high).clamp(min=0).max()) for x in (ref, ours))
    return {"max_abs_diff": float((ours - ref).abs().max()), "tolerance": limit, "outside_rounding_interval": outside,
            "ok": outside == 0.0}
