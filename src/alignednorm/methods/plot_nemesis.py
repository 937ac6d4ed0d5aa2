"""PLOT + Nemesis (Fu et al., ICLR 2024, Table 2): PLOT's prompt sets with Nemesis's norm terms.

Per step, as ``nemesis`` on CoOp (official ``trainers/plot_nemesis.py``)::

    loss = CE(PLOT logits) + ω_E · (β · L_PUN + (1 − β) · L_PAN)

The context is ``(N, L, W)``: the per-position norms are ``(N, L)``, α ``(L,)`` broadcasts over the N
sets and the sum runs over them while M counts positions only, so with several sets each term is
the **sum** over sets of per-set position means (as the official code). PAN's pre-inference rescales
the drawn position in all N sets at once and scores every corrupted copy by its own Sinkhorn run
(on the CE pass's local features; the official code encodes the batch again, with equal results).
The paper uses ω = 0.1 for PLOT (§4.6), the default here. Inference is plain PLOT.
Settings and names: :mod:`alignednorm.methods.plot` and :mod:`alignednorm.methods.nemesis`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from alignednorm.backbone.hooks import Traces
from alignednorm.losses.nemesis import corrupted_contexts, position_norms, pun_weights, weighted_norm
from alignednorm.methods.base import MethodTraits, StepState, register_method
from alignednorm.methods.nemesis import Nemesis, NemesisStep
from alignednorm.methods.plot import Plot


@register_method("plot_nemesis")
class PlotNemesis(Plot, Nemesis):
    """PLOT + Nemesis's PUN and/or PAN norm terms with the ω_E schedule."""

    traits = MethodTraits(official_names=Plot.traits.official_names, citation=Nemesis.traits.citation)

    @dataclass
    class Config(Plot.Config, Nemesis.Config):
        """PLOT's settings plus Nemesis's (official ``TRAINER.PLOTNemesis`` keys: PLOT's, ``A``, ``NT``, ``NP``,
        ``CW``, ``BETA``); ``omega`` defaults to the paper's 0.1 for PLOT."""

        omega: float = 0.1

    @torch.no_grad()
    def pre_inference_logits(self, local: Tensor, positions: list[int]) -> Tensor:
        """``(P+1, B, C)`` PLOT logits of the clean sets and of each τ-rescaled copy, from local features.

        Copy p rescales position ``positions[p-1]`` in all N sets; its ``N·C`` prompts go through the text
        tower with the others at once, and each copy gets its own Sinkhorn run (its own stop test).
        """
        sets = corrupted_contexts(self.context.ctx, positions, self.config.tau)  # (P+1, N, L, W)
        embeddings, token_ids = self.context(sets.flatten(0, 1))  # ((P+1)·N·C, T, W)
        text = self.encode_prompts(embeddings, token_ids, built_alike=False)
        text = text.view(sets.shape[0], -1, text.shape[-1])  # (P+1, N·C, E)
        return torch.stack([self.logit_scale * self.scores(local, t).scores for t in text])

    def compute_step(self, images: Tensor, labels: Tensor, state: StepState | None = None,
                     positions: list[int] | None = None, trace: Traces | None = None) -> NemesisStep:
        """One step's terms (Eq. 5) on PLOT's logits; ``positions`` fixes PAN's draw."""
        cfg, ctx, trace = self.config, self.context.ctx, trace or Traces()
        local = self.local_features(images, trace.image)
        norms = position_norms(ctx, cfg.norm)  # (N, L), with gradient
        terms: dict[str, Tensor] = {}
        alpha_pun = decision = None
        if self.uses_pun:
            alpha_pun = pun_weights(self.context.n_ctx, cfg.omega, ctx.device)
            terms["pun"] = weighted_norm(alpha_pun, norms)  # sums over the N sets
        if self.uses_pan:
            decision = self.pan_decision(local.detach(), labels, positions)
            terms["pan"] = weighted_norm(decision.alpha, norms)
        outputs = self.outputs_from(local, self.text_features(trace.text))
        ce = self.ce_terms(outputs, labels)
        beta = {"pun": 1.0, "pan": 0.0}.get(cfg.terms, cfg.beta)
        n_loss = sum(w * terms[t] for t, w in (("pun", beta), ("pan", 1.0 - beta)) if t in terms)
        omega_e = self.omega_e(state)
        terms = {k: v.detach() for k, v in terms.items()}
        terms.update(loss=ce["loss"] + omega_e * n_loss, ce=ce["ce"], acc=ce["acc"], omega_e=torch.tensor(omega_e))
        terms.update(self.norm_terms(cfg.norm))
        if decision is not None:
            terms.update({f"pan_selected_{j}": (decision.alpha[j] != 0).float() for j in range(self.context.n_ctx)})
        return NemesisStep(terms, outputs, omega_e, alpha_pun, decision)
