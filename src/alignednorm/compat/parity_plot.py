"""Parity of PLOT and PLOT + Nemesis with the official trainers of the Nemesis repository on golden tensors.

A fixture (``shared/reference/plot_a``, ``plot_nemesis_a``; README section "CoOp, CoCoOp, PLOT ...")
records one official ``forward_backward`` of ``PLOT`` / ``PLOTNemesis`` (ShyFoo/Nemesis ``trainers/plot*.py``)
in float32 on a tiny ResNet CLIP: the ResNet stages, every attention-pool output (the local features),
the N·C prompts and text blocks, the OT problem (similarity, cost, kernel, Sinkhorn's scalings,
iteration count and last error, plan), the logits, CE, the Nemesis terms, the gradient, Dassl's first
SGD step and eval logits before and after it. We build ``plot`` / ``plot_nemesis`` from the manifest's
``TRAINER.PLOT`` / ``TRAINER.PLOTNemesis`` section and its ``plot`` record (Sinkhorn's ε, iteration
cap and stop threshold; whether the pooled token is a local feature), load the start values through
the official-checkpoint importer and compare every tensor. The SGD step is compared as ``after − start``
at the gradient tolerance, as for Nemesis. Options the official code crashes on (word init,
class-specific contexts) are refused by our config with a one-line error.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from alignednorm.backbone.hooks import Traces
from alignednorm.compat.parity import build_report, compare, fixture_start, fixture_threads, read_manifest
from alignednorm.compat.parity_nemesis import (
    _coop_config,
    _nemesis_config,
    _positions,
    _start,
    compare_fixture,
    start_training_record,
)
from alignednorm.losses.nemesis import logged_position_norms, matrix_norm, pan_weights

# Official config section -> our method.
SECTIONS = {"TRAINER.PLOTNemesis": "plot_nemesis", "TRAINER.PLOT": "plot"}
# Sinkhorn's kernel and scalings span orders of magnitude (K = exp(-cost / eps) ~ 1e-5..1e-3, r ~ 1/(M N K)
# ~ 1e3): a float32 rounding of the cost, amplified by 1/eps, moves them by ~1e-6 of their size. They are
# compared relative to their largest entry, at the hidden-state tolerance (1e-5 of it).
RELATIVE = ("ot.K", "ot.r", "ot.c")
# Sinkhorn's last error is a mean of differences of those ~1e3 row scalings (~6e-3 at exit): float32 keeps
# two to three of its digits (fixture A: 1.6e-3 relative), so it is compared to 1% of itself; the exact
# iteration counts (ot.iterations, eval_after_step.ot_iterations) pin the stop rule.
SELF_RELATIVE = {"ot.final_err": 1e-2}


def _plot_config(manifest: dict, official: dict) -> dict:
    """PLOT's settings: the prompt learner's keys, Sinkhorn's rule and the local features the manifest records."""
    config = _coop_config(official)
    config["n_sets"] = int(official.get("N", 4))
    plot = manifest.get("plot", {})
    sinkhorn = plot.get("sinkhorn", {})
    config.update(ot_eps=float(sinkhorn.get("eps", 0.1)), ot_max_iter=int(sinkhorn.get("max_iter", 100)))
    stop = re.search(r"<\s*([0-9.eE+-]+)", str(sinkhorn.get("stop", "")))
    config["ot_threshold"] = float(stop.group(1)) if stop else 0.01
    tokens = manifest.get("sequence_layout", {}).get("image_tokens_M")
    grid = manifest.get("tiny_clip", {}).get("local_tokens")
    if tokens is not None and grid is not None:
        if int(tokens) not in (int(grid), int(grid) + 1):
            raise ValueError(f"manifest sequence_layout.image_tokens_M = {tokens}; expected {grid} or {int(grid) + 1}")
        config["local_features"] = "spatial" if int(tokens) == int(grid) else "all"
    return config


def method_from_manifest(manifest: dict) -> tuple[str, dict]:
    """Our method name and config for a PLOT / PLOT + Nemesis fixture."""
    for section, name in SECTIONS.items():
        if section in manifest["config"]:
            official = manifest["config"][section]
            config = _plot_config(manifest, official)
            if name == "plot_nemesis":
                config.update(_nemesis_config(official, manifest["config"].get("DATASET.NAME", "")))
            return name, config
    raise ValueError(f"manifest config has none of the sections {sorted(SECTIONS)}")


def _forward_records(method, outputs, trace: Traces, images) -> dict:
    """The training forward's tensors, in the official layouts."""
    b = outputs.branches
    local = b["local_features_unnorm"]
    if method.config.local_features == "spatial":
        local = local[:, 1:]
    text = b["text_features_unnorm"]
    n_sets, classes = method.context.n_sets, len(method.classnames)
    rec = {"train.image_features_unnorm": local.transpose(0, 1),  # (M, B, E)
           "train.image_features": torch.nn.functional.normalize(local, dim=-1).transpose(0, 1),
           "train.text_features_unnorm": text,
           "train.text_features": torch.nn.functional.normalize(text.view(n_sets, classes, -1), dim=-1),
           "train.logits": outputs.logits, "train.sim_op": b["ot_scores"],
           "train.logit_scale_exp": torch.tensor(method.logit_scale), "train.prompts": method.context.embeddings(),
           "ot.sim": b["ot_similarity"], "ot.wdist": 1.0 - b["ot_similarity"], "ot.K": b["ot_kernel"],
           "ot.T": b["ot_plan"], "ot.r": b["ot_r"], "ot.c": b["ot_c"], "ot.final_err": b["ot_error"],
           "ot.iterations": b["ot_iterations"],
           "vision.stem_out": method.backbone.model.visual.stem(images) if not method.backbone.is_vit else None}
    rec.update({f"vision.layer{stage}_out": h for stage, h in trace.image.hidden.items()} if not method.backbone.is_vit
               else {f"vision.block_out.{layer:02d}": h for layer, h in trace.image.hidden.items()})
    rec.update({f"text.block_out.{layer:02d}": h for layer, h in trace.text.hidden.items()})
    return {k: v for k, v in rec.items() if v is not None}


def _nemesis_records(method, step, labels, positions) -> dict:
    terms = step.terms
    rec = {"schedule.omega": torch.tensor(step.omega_e, dtype=torch.float64)}
    rec.update({f"loss.{t}": terms[t] for t in ("pun", "pan") if t in terms})
    rec["loss.n_loss_logged"] = sum(terms[t] for t in ("pun", "pan") if t in terms)
    if step.alpha_pun is not None:
        rec["alpha.pun"] = step.alpha_pun
    decision = step.pan
    if decision is not None:
        if decision.logits is None:  # no selection: the official code still ran (and discarded) the search
            local = step.outputs.branches["local_features_unnorm"].detach()
            logits = method.pre_inference_logits(local, positions)
            searched = pan_weights(logits, labels, positions, method.context.n_ctx, 1.0)
            decision = type(decision)(decision.positions, decision.alpha, logits, searched.pred,
                                      searched.ori_correct, searched.crt_correct)
        rec.update({"alpha.pan": decision.alpha, "pan.inference_logits": decision.logits, "pan.pred": decision.pred,
                    "pan.ori_correct": decision.ori_correct, "pan.crt_correct": decision.crt_correct,
                    "pan.pos_list": torch.tensor(decision.positions)})
    return rec


def _evaluate(method, images, prefix: str) -> dict:
    method.eval()
    with torch.no_grad():
        outputs = method(images)
    return {f"{prefix}.output": outputs.logits, f"{prefix}.ot_iterations": outputs.branches["ot_iterations"]}


def _train(method, manifest, images, labels, start: dict, names: dict, positions) -> dict:
    rec, trace = start_training_record(method, start)
    param, norm = method.context.ctx, getattr(method.config, "norm", "l2")
    if method.name == "plot_nemesis":
        step = method.compute_step(images, labels, state=_start(manifest), positions=positions, trace=trace)
        outputs, loss = step.outputs, step.terms["loss"]
        rec.update(_nemesis_records(method, step, labels, positions))
    else:
        outputs = method(images, rule="seen", trace=trace)
        loss = method.ce_terms(outputs, labels)["loss"]
    ce = method.ce_terms(outputs, labels)
    rec.update(_forward_records(method, outputs, trace, images))
    rec.update({"loss.ce": ce["ce"], "loss.total": loss, "train.acc": ce["acc"].double()})
    method.zero_grad(set_to_none=True)
    loss.backward()
    params = dict(method.named_parameters())
    rec.update({f"grad.{official}": params[ours].grad.clone() for ours, official in names.items()})
    cfg = manifest["optimizer_step"]
    torch.optim.SGD(method.learnable_parameters(), lr=cfg["lr_at_step"], momentum=cfg.get("momentum", 0.0),
                    weight_decay=cfg.get("weight_decay", 0.0), dampening=cfg.get("dampening", 0.0),
                    nesterov=cfg.get("nesterov", False)).step()
    rec.update({f"after_step.{official}": params[ours].detach().clone() for ours, official in names.items()})
    rec["norms.per_position_after_step"] = logged_position_norms(param, norm)
    rec["norms.matrix_norm_after_step"] = matrix_norm(param, norm).double()
    rec.update(_evaluate(method, images, "eval_after_step"))
    return rec


def compute_outputs(fixture: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """Every tensor a PLOT / PLOT + Nemesis fixture holds, computed by our implementation."""
    s = fixture_start(fixture, *method_from_manifest(manifest))
    method, start, names = s.method, s.start, s.names
    images, labels = s.inputs["images"], s.inputs["labels"]
    method.set_classnames(manifest["class_names"])
    method.load_learnable_state_dict(start, source=s.source)
    ours = {"tokens.base": method.context()[1]}
    ours.update(_evaluate(method, images, "eval"))
    ours.update(_train(method, manifest, images, labels, start, names, _positions(fixture, manifest)))
    return ours


def run_parity(fixture_dir: str | Path, threads: int | None = None) -> dict:
    """Compare our PLOT / PLOT + Nemesis with a fixture; the report's ``ok`` is True iff all tensors fit."""
    fixture, manifest = read_manifest(fixture_dir)
    with fixture_threads(manifest, threads):
        name, config = method_from_manifest(manifest)
        results = compare_fixture(fixture, manifest, compute_outputs(fixture, manifest), _compare_ot)
        return build_report(fixture, name, config, results)


def _compare_ot(key: str, ours: torch.Tensor, ref: torch.Tensor, tol: dict) -> dict:
    """The OT tensors whose size spans decades relative to their largest entry; the rest as usual."""
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    if key in SELF_RELATIVE:
        return compare(key, ours, ref, {**tol, "hidden": SELF_RELATIVE[key] * scale})
    if key in RELATIVE:
        return compare(key, ours, ref, {**tol, "hidden": tol["hidden"] * max(scale, 1e-30)})
    return compare(key, ours, ref, tol)
