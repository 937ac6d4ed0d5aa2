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

MaPLe's coupling functions ``F_l`` (official ``proj``, ``compound_prompt_projections``) sit before
such a cast: the gradient reaching ``F_l(P_l)`` is the same sum ``G = Σ_c fp16(g_c)``, and the weight
and bias gradients are ``Gᵀ P_l`` and ``Σ_k G_k``. With ``G`` in the interval above, interval
arithmetic bounds them (:func:`coupling_gradient_bounds`), widened by the same plain rule.
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


@contextlib.contextmanager
def per_copy_coupling_gradients(method):
    """``{block: (P_l, [(copies, n, W_v) float32 gradients before the float16 rounding])}`` of the next backward.

    Wraps MaPLe's coupling forward (to know which output comes from which block and its input ``P_l``)
    and ``expand_tokens`` for the duration.
    """
    from alignednorm.methods import maple
    from alignednorm.prompts.deep import Coupling

    outputs, records = {}, {}
    original_expand, original_forward = maple.expand_tokens, Coupling.forward

    def forward(self, text_tokens):
        out = original_forward(self, text_tokens)
        outputs.update({id(t): (b, text_tokens[b].detach().clone()) for b, t in out.items()})
        return out

    def expand(tokens, count, fp16_rounding=False):
        out = original_expand(tokens, count, fp16_rounding)
        if fp16_rounding and id(tokens) in outputs and out.requires_grad:
            block, inputs = outputs[id(tokens)]
            copies = records.setdefault(block, (inputs, []))[1]
            out.register_hook(lambda g, copies=copies: copies.append(g.detach().clone()))
        return out

    maple.expand_tokens, Coupling.forward = expand, forward
    try:
        yield records
    finally:
        maple.expand_tokens, Coupling.forward = original_expand, original_forward


def coupling_gradient_bounds(inputs: torch.Tensor, copies: torch.Tensor, tol: dict) -> dict[str, torch.Tensor]:
    """``{"weight": (2, W_v, W_t), "bias": (2, W_v)}``: low and high ends of a coupling's gradients.

    ``inputs`` ``(n, W_t)`` is ``P_l``, ``copies`` ``(copies, n, W_v)`` the per-copy gradients of ``F_l(P_l)``.
    """
    slack = tol["gradients_rel"] * copies.abs()
    low = (copies - slack).half().float().sum(0)  # (n, W_v): the ends of G
    high = (copies + slack).half().float().sum(0)
    a = low.unsqueeze(2) * inputs.unsqueeze(1)  # (n, W_v, W_t): each term G_ki · P_kj at both ends
    b = high.unsqueeze(2) * inputs.unsqueeze(1)
    weight = torch.stack([torch.minimum(a, b).sum(0), torch.maximum(a, b).sum(0)])
    return {"weight": weight, "bias": torch.stack([low.sum(0), high.sum(0)])}


def compare_within_bounds(ours: torch.Tensor, ref: torch.Tensor, bounds: torch.Tensor, tol: dict) -> dict:
    """The reference and our gradient within ``bounds`` ``(2, ...)`` widened by the plain rule."""
    limit = tol["gradients_rel"] * float(ref.abs().max()) if ref.numel() else 0.0
    low, high = bounds[0] - limit, bounds[1] + limit
    outside = max(float(torch.maximum(low - x, x - high).clamp(min=0).max()) for x in (ref, ours))
    return {"max_abs_diff": float((ours - ref).abs().max()), "tolerance": limit, "outside_rounding_interval": outside,
            "ok": outside == 0.0}
