"""Nemesis (Fu et al., ICLR 2024): CoOp with its soft-prompt norms regularised (PUN / PAN).

Per step (Eq. 5, official ``CoOpNemesis.forward_backward``)::

    loss = CE + ω_E · (β · L_PUN + (1 − β) · L_PAN)

``terms`` picks ``pun`` (β = 1, the default), ``pan`` (β = 0) or ``both`` (0 < ``beta`` < 1). L_PUN
weighs every position by ω (Eq. 3); L_PAN weighs by ω only the positions whose τ-rescaling makes
a no-grad *pre-inference* on the same batch strictly more often correct (Eq. 4; positions drawn
with Python's ``random.sample``, seeded by the run). ω_E is the logistic epoch schedule (A.2.2),
set in :meth:`on_epoch_start` from the trainer's :class:`StepState`. Inference is plain CoOp.

Naming trap (specs/nemesis.md): the paper's ω is the official config key ``A`` (``omega`` here);
the official variable ``omega`` is the paper's ω_E (``omega_e`` here). τ ↔ ``CW`` ↔ ``tau``;
N ↔ ``NP`` ↔ ``pan_positions`` (``NP = "random<K>"`` ↔ ``pan_search=False``); ``NT`` ↔ ``norm``.
The official code forces PAN's ω to 50 and ω_E to 1 on Food101 / OxfordPets by dataset name;
here those are the explicit fields ``pan_omega`` and ``omega_schedule``, set per dataset in the preset.

The per-position context norms (``ctx_norm_j``, class mean for CSC, the paper's Figures 3 / A2 /
A3) and PAN's per-position selections (``pan_selected_j``: the epoch mean is the Low-Norm Effect's
occurrence frequency per position) are returned as training terms, so the trainer logs them per
step and as epoch means in ``log.jsonl``. Ours are taken before the step (the official log after it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from alignednorm.backbone.hooks import Traces
from alignednorm.errors import ConfigError
from alignednorm.losses.nemesis import (
    NORMS,
    PanDecision,
    corrupted_contexts,
    omega_schedule,
    pan_weights,
    position_norms,
    pun_weights,
    random_pan_weights,
    weighted_norm,
)
from alignednorm.methods.base import MethodTraits, Outputs, StepState, check_range, register_method
from alignednorm.methods.coop import CoOp

TERMS = ("pun", "pan", "both")


@dataclass
class NemesisStep:
    """Everything one Nemesis step computed (for parity checks and analyses)."""

    terms: dict[str, Tensor]
    outputs: Outputs
    omega_e: float
    alpha_pun: Tensor | None
    pan: PanDecision | None


@register_method("nemesis")
class Nemesis(CoOp):
    """CoOp + Nemesis's PUN and/or PAN norm terms with the ω_E schedule."""

    traits = MethodTraits(official_names=CoOp.traits.official_names, citation="""@inproceedings{fu2024nemesis,
  title = {Nemesis: Normalizing the Soft-prompt Vectors of Vision-Language Models},
  author = {Fu, Shuai and Wang, Xiequn and Huang, Qiushi and Zhang, Yu},
  booktitle = {ICLR}, year = {2024}}""")


    @dataclass
    class Config(CoOp.Config):
        """Nemesis settings on top of CoOp's (official ``TRAINER.CoOpNemesis`` keys in brackets).

        Attributes:
            terms: ``pun`` (BETA 1), ``pan`` (BETA 0) or ``both`` (0 < BETA < 1, weighted by ``beta``).
            beta: β, the PUN share when ``terms`` is ``both`` (BETA).
            omega: the paper's ω, the weight α of every weighted position (the code's ``A``; the
                paper: 1, except ImageNet 10, OxfordPets and Food101 50).
            pan_omega: PAN's ω when it differs from ``omega`` (the code forces 50 on Food101 and
                OxfordPets); ``None``: ``omega``.
            omega_schedule: scale the norm terms by the logistic ω_E over epochs (the code turns it
                off on Food101 and OxfordPets: ω_E = 1).
            schedule_rate: the growth rate k of ω_E (0.2).
            norm: ``l2``, ``l1`` or ``linf`` along the embedding axis (NT two / one / inf).
            pan_positions: N, positions drawn and corrupted per batch (NP).
            pan_search: run PAN's pre-inference selection; ``False`` weighs the N drawn positions
                unconditionally (the "w/o selection" ablation, NP = "random<N>"; here without the
                discarded pre-inference pass the official code still runs).
            tau: τ, the rescale factor of a corrupted position, 0 < τ < 1 (CW).
        """

        terms: str = "pun"
        beta: float = 0.5
        omega: float = 1.0
        pan_omega: float | None = None
        omega_schedule: bool = True
        schedule_rate: float = 0.2
        norm: str = "l2"
        pan_positions: int = 1
        pan_search: bool = True
        tau: float = 0.5

        def validate(self) -> None:
            super().validate()
            if self.terms not in TERMS:
                raise ConfigError(f"terms = {self.terms!r}; expected one of {TERMS}")
            if self.terms == "both" and not 0.0 < self.beta < 1.0:
                raise ConfigError(f"beta = {self.beta!r}; with terms='both' expected 0 < beta < 1 "
                                  "(beta 1 is terms='pun', beta 0 is terms='pan')")
            if self.norm not in NORMS:
                raise ConfigError(f"norm = {self.norm!r}; expected one of {tuple(NORMS)}")
            check_range(self, "omega", 0.0)
            if self.pan_omega is not None:
                check_range(self, "pan_omega", 0.0)
            check_range(self, "schedule_rate", 0.0)
            check_range(self, "pan_positions", 1)
            if not 0.0 < self.tau < 1.0:
                raise ConfigError(f"tau = {self.tau!r}; PAN rescales a position to shrink its norm: "
                                  "expected 0 < tau < 1")

    def __init__(self, backbone, config=None):
        super().__init__(backbone, config)
        if self.config.pan_positions > self.context.n_ctx:
            raise ConfigError(f"pan_positions = {self.config.pan_positions} exceeds the context length "
                              f"{self.context.n_ctx}")
        self.epoch_state = StepState()

    # ------------------------------------------------------------------ schedule
    def on_epoch_start(self, state: StepState) -> None:
        self.epoch_state = state

    def omega_e(self, state: StepState | None = None) -> float:
        """ω_E for ``state`` (default: the epoch the trainer last started); 1 with the schedule off."""
        state = state or self.epoch_state
        if not self.config.omega_schedule:
            return 1.0
        return omega_schedule(state.epoch, state.max_epochs, self.config.schedule_rate)

    @property
    def uses_pun(self) -> bool:
        return self.config.terms in ("pun", "both")

    @property
    def uses_pan(self) -> bool:
        return self.config.terms in ("pan", "both")

    # ------------------------------------------------------------------ PAN
    def draw_positions(self) -> list[int]:
        """N distinct positions, uniformly (Python's ``random.sample``, as the official ``update_alpha``)."""
        return random.sample(range(self.context.n_ctx), self.config.pan_positions)

    @torch.no_grad()
    def pre_inference_logits(self, image: Tensor, positions: list[int]) -> Tensor:
        """``(N+1, B, C)`` logits of the clean context and of each τ-rescaled one, from image features ``(B, E)``.

        The image features are the CE pass's (the frozen encoder gives the same on the same batch;
        the official code runs it again); the ``(N+1)·C`` prompts go through the text tower at once.
        """
        sets = corrupted_contexts(self.context.ctx, positions, self.config.tau)  # (N+1, [C,] L, W)
        embeddings = torch.cat([self.context.embeddings(s) for s in sets])  # ((N+1)·C, T, W)
        token_ids = self.context.token_ids.repeat(len(sets), 1)
        text = self.encode_prompts(embeddings, token_ids).view(len(sets), -1, image.shape[-1])  # (N+1, C, E)
        f = image / image.norm(dim=-1, keepdim=True)
        w = text / text.norm(dim=-1, keepdim=True)
        return self.logit_scale * f.unsqueeze(0) @ w.transpose(1, 2)

    def pan_decision(self, image: Tensor, labels: Tensor, positions: list[int] | None = None) -> PanDecision:
        """PAN's α for this batch (Eq. 4); ``positions`` defaults to a fresh draw."""
        positions = self.draw_positions() if positions is None else list(positions)
        omega = self.config.omega if self.config.pan_omega is None else self.config.pan_omega
        if not self.config.pan_search:
            return random_pan_weights(positions, self.context.n_ctx, omega, image.device)
        logits = self.pre_inference_logits(image, positions)
        return pan_weights(logits, labels, positions, self.context.n_ctx, omega)

    # ------------------------------------------------------------------ loss
    def compute_step(self, images: Tensor, labels: Tensor, state: StepState | None = None,
                     positions: list[int] | None = None, trace: Traces | None = None) -> NemesisStep:
        """One step's terms (Eq. 5) and what produced them; ``positions`` fixes PAN's draw."""
        cfg, ctx, trace = self.config, self.context.ctx, trace or Traces()
        image = self.backbone.encode_image(images, trace=trace.image).features
        norms = position_norms(ctx, cfg.norm)  # (L,) or (C, L), with gradient
        terms: dict[str, Tensor] = {}
        alpha_pun = decision = None
        if self.uses_pun:
            alpha_pun = pun_weights(self.context.n_ctx, cfg.omega, ctx.device)
            terms["pun"] = weighted_norm(alpha_pun, norms)
        if self.uses_pan:
            decision = self.pan_decision(image.detach(), labels, positions)
            terms["pan"] = weighted_norm(decision.alpha, norms)
        outputs = self.outputs_from(image, self.text_features(trace.text))
        ce = self.ce_terms(outputs, labels)
        if cfg.terms == "pun":
            n_loss = terms["pun"]
        elif cfg.terms == "pan":
            n_loss = terms["pan"]
        else:
            n_loss = cfg.beta * terms["pun"] + (1 - cfg.beta) * terms["pan"]
        omega_e = self.omega_e(state)
        total = ce["loss"] + omega_e * n_loss
        terms = {k: v.detach() for k, v in terms.items()}
        terms.update(loss=total, ce=ce["ce"], acc=ce["acc"], omega_e=torch.tensor(omega_e))
        terms.update(self.norm_terms(cfg.norm))
        if decision is not None:
            terms.update({f"pan_selected_{j}": (decision.alpha[j] != 0).float() for j in range(self.context.n_ctx)})
        return NemesisStep(terms, outputs, omega_e, alpha_pun, decision)

    def training_step(self, batch: tuple[Tensor, Tensor], state: StepState | None = None) -> dict[str, Tensor]:
        return self.compute_step(*batch, state=state).terms
