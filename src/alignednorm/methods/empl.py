"""EMPL (Chen et al., ICCV 2023), UNOFFICIAL RECONSTRUCTION: prompts sampled from an energy CLIP defines.

No official or third-party code, and not the paper's full text, could be found: only the abstract
("multiple prompt embeddings drawn from an energy-based distribution implicitly defined by the VLM",
parameter-efficient). Everything below is our design (specs/empl.md §3), not the paper's method,
and its numbers are never reproductions of the paper's tables.

* Parameters (§3.1): CoOp's unified context ``V̄`` (:class:`~alignednorm.prompts.text_context.TextContext`),
  nothing else: the parameter count is CoOp's.
* Energy (§3.2, :mod:`alignednorm.losses.energy`): with ``z_c(V, x) = s · cos(f(x), g(V, c))``, the free
  energy ``E(V; x) = −T logsumexp_c(z_c / T)`` (or, in training only, the conditional ``−z_y``) plus
  the prior ``(λ/2) ‖(V − V̄) / r‖²``, ``r`` the RMS entry of ``V̄``.
* Sampling (§3.3, :mod:`alignednorm.prompts.langevin`): K chains ``V⁰ = V̄ + σ₀ r ε``, S steps
  ``V^{t+1} = V^t − (η r²/2) ∇_V E + ν √η r ξ``, conditioned on the batch (``batch_mean``: the chains
  follow the batch's mean energy ``(1/B) Σ_i E(V; x_i)``; one set of chains per batch) or on each image.
* Aggregation (§3.4): the K samples' (plus ``V̄``'s with ``include_mean``) class probabilities are
  averaged and the logits are ``log mean_k p_k`` (or the mean logits, or logits of the mean
  normalised text features); a single prompt gives its own logits, so K = 0 is CoOp bit for bit.
* Loss (§3.5, the "meta-learning" reading): CE of the aggregated prediction (inner loop = the
  Langevin steps, first order by default) + μ · CE of ``V̄`` alone.

**Inference needs gradients**: the Langevin steps differentiate the energy with respect to detached
copies of the context even inside ``predict``'s ``torch.no_grad()`` (locally re-enabled; no
parameter's ``.grad`` is touched, no graph leaves the step) and cost ``K × S`` text-tower forward and
backward passes per test batch (``× B`` per image). Evaluation noise comes from a generator seeded
with ``seed`` in every call, so predictions are reproducible (``deterministic_eval`` also sets ξ = 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from alignednorm.backbone.hooks import Traces
from alignednorm.errors import ConfigError
from alignednorm.losses.energy import ENERGIES, classifier_energy, gaussian_prior
from alignednorm.methods.base import MethodTraits, Outputs, StepState, check_range, register_method
from alignednorm.methods.coop import CoOp
from alignednorm.prompts.langevin import init_chains, langevin_sample

CONDITIONS = ("batch_mean", "per_image")
AGGREGATES = ("prob", "logit", "feature")


def aggregate_logits(per_sample: Tensor, texts: Tensor, image: Tensor, scale: float, mode: str) -> Tensor:
    """Combine K prompts' logits ``(B, K, C)`` into ``(B, C)`` (specs/empl.md §3.4).

    ``prob``: ``log (1/K) Σ_k softmax(z_k)``; ``logit``: ``(1/K) Σ_k z_k``; ``feature``: ``s · f · w̄``
    with ``w̄ = normalise(mean_k w_k)`` from normalised texts ``(B|1, K, C, E)`` and image ``f`` ``(B, E)``.
    """
    if mode == "prob":
        return torch.logsumexp(F.log_softmax(per_sample, dim=-1), dim=1) - math.log(per_sample.shape[1])
    if mode == "logit":
        return per_sample.mean(dim=1)
    mean_text = F.normalize(texts.mean(dim=1), dim=-1)  # (B|1, C, E)
    return scale * torch.einsum("be,bce->bc", image, mean_text.expand(image.shape[0], -1, -1))


@register_method("empl")
class EMPL(CoOp):
    """EMPL, unofficial reconstruction: K Langevin samples of a CoOp context from CLIP's free energy."""

    traits = MethodTraits(note="unofficial reconstruction (no reference code or numbers; specs/empl.md)",
                          citation="""@inproceedings{chen2023empl,
  title = {A Retrospect to Multi-prompt Learning across Vision and Language},
  author = {Chen, Ziliang and Huang, Xin and Guan, Quanlong and Lin, Liang and Luo, Weiqi},
  booktitle = {ICCV}, pages = {22190--22201}, year = {2023},
  note = {EMPL here is an unofficial reconstruction from the abstract; no reference code or numbers}}""")


    @dataclass
    class Config(CoOp.Config):
        """EMPL settings (all ours: the paper's are unknown; specs/empl.md §3.7).

        Attributes:
            n_ctx, ctx_init, class_token_position: CoOp's context; ``class_specific`` must stay false.
            num_samples: K sampled prompts (0: only ``V̄``, i.e. CoOp).
            langevin_steps: S Langevin steps per chain.
            step_size: η, in units of the context's RMS entry r (§3.3).
            noise_scale: ν, the Langevin noise factor (1: SGLD, 0: energy descent).
            init_noise: σ₀, the chains' start spread in units of r.
            temperature: T of the free energy.
            prior_weight: λ of the prior ``(λ/2) ‖(V − V̄)/r‖²``.
            energy: ``free`` or ``conditional`` (``−z_y``, training only; evaluation uses ``free``).
            condition: ``batch_mean`` (one set of chains per batch) or ``per_image`` (cost × B).
            aggregate: ``prob``, ``logit`` or ``feature`` (§3.4).
            include_mean: ``V̄`` itself is one of the aggregated prompts.
            first_order: use ∇E as a constant when back-propagating into ``V̄`` (false: through it).
            mean_prompt_weight: μ, weight of the CE of ``V̄`` alone.
            deterministic_eval: ξ = 0 at evaluation (the seeded start spread stays).
            seed: seeds the evaluation noise in every forward call (training uses torch's RNG).
        """

        n_ctx: int = 4
        ctx_init: str = "a photo of a"
        num_samples: int = 4
        langevin_steps: int = 2
        step_size: float = 1e-3
        noise_scale: float = 1.0
        init_noise: float = 0.01
        temperature: float = 1.0
        prior_weight: float = 1.0
        energy: str = "free"
        condition: str = "batch_mean"
        aggregate: str = "prob"
        include_mean: bool = True
        first_order: bool = True
        mean_prompt_weight: float = 1.0
        deterministic_eval: bool = False
        seed: int = 0

        def validate(self) -> None:
            super().validate()
            for name in ("num_samples", "langevin_steps", "step_size", "noise_scale", "init_noise", "prior_weight",
                         "mean_prompt_weight"):
                check_range(self, name, 0)
            check_range(self, "temperature", 1e-6)
            for name, allowed in (("energy", ENERGIES), ("condition", CONDITIONS), ("aggregate", AGGREGATES)):
                if getattr(self, name) not in allowed:
                    raise ConfigError(f"EMPL.Config.{name} = {getattr(self, name)!r}; expected one of {allowed}")
            if self.class_specific:
                raise ConfigError("EMPL.Config.class_specific = True; EMPL samples one unified context")
            if self.num_samples == 0 and not self.include_mean:
                raise ConfigError("EMPL.Config.num_samples = 0 with include_mean = False leaves no prompt")

    # ------------------------------------------------------------------ sampling
    def sample_texts(self, contexts: Tensor) -> Tensor:
        """Normalised class embeddings ``(N, C, E)`` of contexts ``(N, L, W)``."""
        n, classes = contexts.shape[0], len(self.context.classnames)
        prompts = torch.cat([self.context.embeddings(contexts[i]) for i in range(n)])  # (N·C, T, W)
        ids = self.context.token_ids.repeat(n, 1)  # (N·C, T)
        # each chain is its own variable (Langevin steps differentiate by it): equal chains stay separate rows
        return F.normalize(self.encode_prompts(prompts, ids, built_alike=False), dim=-1).view(n, classes, -1)

    def chain_logits(self, f: Tensor, texts: Tensor) -> Tensor:
        """Logits ``(B, K, C)`` of normalised images ``(B, E)`` under chains' texts ``(K, C, E)`` or ``(B·K, C, E)``."""
        if self.config.condition == "per_image":
            texts = texts.view(f.shape[0], -1, *texts.shape[1:])  # (B, K, C, E)
            return self.logit_scale * torch.einsum("be,bkce->bkc", f, texts)
        return self.logit_scale * torch.einsum("be,kce->bkc", f, texts)

    def unit(self) -> Tensor:
        """r, the context's RMS entry (detached): the unit of the Langevin step, start spread and prior (§3.3)."""
        return self.context.ctx.detach().pow(2).mean().sqrt()

    def chain_energy(self, logits: Tensor, samples: Tensor, mean: Tensor, kind: str, labels: Tensor | None) -> Tensor:
        """§3.2 per chain ``(N,)``: logits ``(B, K, C)`` → energy (batch mean or per image) + prior of ``(N, L, W)``."""
        cfg = self.config
        e = classifier_energy(logits, kind, labels, cfg.temperature)  # (B, K)
        e = e.reshape(-1) if cfg.condition == "per_image" else e.mean(dim=0)  # (N,)
        return e + gaussian_prior(samples, mean, cfg.prior_weight, self.unit())

    def sample_contexts(self, f: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        """K (× B per image) Langevin samples ``(N, L, W)`` of the context and their energy path ``(S, N)``."""
        cfg, mean = self.config, self.context.ctx
        evaluating = not self.training
        if evaluating:  # samples never carry a graph into the parameters at evaluation
            mean = mean.detach()
        generator = torch.Generator(device=mean.device).manual_seed(cfg.seed) if evaluating else None
        r = self.unit()
        chains = cfg.num_samples * (f.shape[0] if cfg.condition == "per_image" else 1)
        kind = "free" if evaluating else cfg.energy
        second_order = not (cfg.first_order or evaluating)

        def energy(v: Tensor) -> Tensor:  # §3.2: (N, L, W) -> (N,)
            prior_mean = mean if second_order else mean.detach()
            return self.chain_energy(self.chain_logits(f, self.sample_texts(v)), v, prior_mean, kind, labels)

        start = init_chains(mean, chains, cfg.init_noise, r, generator)
        noise = 0.0 if evaluating and cfg.deterministic_eval else cfg.noise_scale
        result = langevin_sample(energy, start, cfg.langevin_steps, cfg.step_size, noise_scale=noise, scale=r,
                                 create_graph=second_order, generator=generator)
        return result.samples, result.energies

    # ------------------------------------------------------------------ forward and loss
    def forward(self, images: Tensor, rule: str = "any", trace: Traces | None = None,
                labels: Tensor | None = None) -> Outputs:
        trace = trace or Traces()
        image = self.backbone.encode_image(images, trace=trace.image).features
        outputs = self.outputs_from(image, self.text_features(trace.text))  # V̄'s (CoOp's) logits
        if self.config.num_samples == 0:
            return outputs
        f = outputs.branches["image_features"]
        samples, energies = self.sample_contexts(f, labels)
        texts = self.sample_texts(samples)  # (N, C, E)
        per_sample = self.chain_logits(f, texts)  # (B, K, C)
        texts = texts.view(-1 if self.config.condition == "per_image" else 1, self.config.num_samples, *texts.shape[1:])
        if self.config.include_mean:
            mean_text = outputs.branches["text_features"].expand(texts.shape[0], 1, -1, -1)  # (B|1, 1, C, E)
            per_sample = torch.cat([outputs.logits.unsqueeze(1), per_sample], dim=1)
            texts = torch.cat([mean_text, texts], dim=1)
        single = per_sample.shape[1] == 1  # one prompt: its own logits (K = 0 or 1 is CoOp's forward)
        logits = per_sample[:, 0] if single else aggregate_logits(per_sample, texts, f, self.logit_scale,
                                                                  self.config.aggregate)
        outputs.branches.update(logits_mean=outputs.logits, logits_samples=per_sample, samples=samples,
                                energies=energies)
        outputs.logits = logits
        return outputs

    def training_step(self, batch: tuple[Tensor, Tensor], state: StepState | None = None) -> dict[str, Tensor]:
        images, labels = batch
        outputs = self(images, rule="seen", labels=labels)
        terms = self.ce_terms(outputs, labels)  # CE of the aggregated prediction (§3.5)
        if self.config.num_samples and self.config.mean_prompt_weight:
            ce_mean = F.cross_entropy(outputs.branches["logits_mean"], labels)
            terms["loss"] = terms["loss"] + self.config.mean_prompt_weight * ce_mean
            terms["ce_mean"] = ce_mean.detach()
        with torch.no_grad():
            terms.update(self.norm_terms())
            terms.update(self.sample_terms(outputs, labels))
        return terms

    def sample_terms(self, outputs: Outputs, labels: Tensor | None = None) -> dict[str, Tensor]:
        """Logged (§3.6): sample norm, shift from ``V̄`` (relative), energy at the chains' start and end."""
        if "samples" not in outputs.branches:
            return {}
        samples, energies = outputs.branches["samples"].detach(), outputs.branches["energies"]
        mean = self.context.ctx.detach()
        k = self.config.num_samples
        kind = self.config.energy if self.training else "free"
        final = self.chain_energy(outputs.branches["logits_samples"][:, -k:].detach(), samples, mean, kind, labels)
        return {"sample_norm": samples.norm(dim=-1).mean(),
                "sample_shift": ((samples - mean).flatten(1).norm(dim=-1) / mean.norm()).mean(),
                "energy_start": (energies[0] if energies.numel() else final).mean(), "energy_end": final.mean()}
