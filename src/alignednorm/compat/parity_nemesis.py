"""Parity of CoOp and Nemesis with the official CoOpNemesis trainer on golden-tensor fixtures.

A fixture (``shared/reference/nemesis_pun_a``, ``nemesis_pan_a``; README section "Nemesis fixtures")
records one official ``forward_backward`` of ``CoOpNemesis`` in float32 on a tiny CLIP: the CoOp
forward, CE, the PUN / PAN terms with their per-position weights, ω_E, PAN's pre-inference, the
gradient, Dassl's first SGD step and eval logits before and after it. We build ``nemesis`` (or
``coop`` for a plain CoOp section) from the manifest's config section, load the start values through
the official-checkpoint importer, use PAN's stored draw (``pan.pos_list``; a real run's Python
random state depends on its data pipeline), and compare every tensor. The SGD step moves the
context by ~lr·|g| ≈ 1e-5, so ``after_step.*`` is compared as the step ``after − start`` at the
gradient tolerance (the README's rule). Entry point: ``python -m alignednorm.compat.parity FIXTURE``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from alignednorm.backbone.hooks import Trace, Traces
from alignednorm.compat.parity import build_report, compare, fixture_start, fixture_threads, read_manifest, tolerances
from alignednorm.losses.nemesis import OFFICIAL_NORMS, logged_position_norms, matrix_norm, pan_weights
from alignednorm.methods import StepState

# Official config section -> our method.
SECTIONS = {"TRAINER.CoOpNemesis": "nemesis", "TRAINER.CoOp": "coop", "TRAINER.COOP": "coop"}
# Datasets on which the official code forces PAN's ω to 50 and ω_E to 1 (by name).
_FORCED_DATASETS = ("Food101", "OxfordPets")


def _coop_config(official: dict) -> dict:
    ctx_init = official.get("CTX_INIT", "") or ""
    return {"n_ctx": int(official.get("N_CTX", 16)), "ctx_init": ctx_init,
            # The official prompt learner ignores CSC under word init (one generic context).
            "class_specific": bool(official.get("CSC", False)) and not ctx_init,
            "class_token_position": official.get("CLASS_TOKEN_POSITION", "end")}


def _nemesis_config(official: dict, dataset: str) -> dict:
    config = {"omega": float(official["A"]), "norm": OFFICIAL_NORMS[official.get("NT", "two")],
              "tau": float(official.get("CW", 0.5))}
    positions = official.get("NP", 1)
    if isinstance(positions, str):  # "random<K>": K drawn positions weighted without the selection
        config.update(pan_positions=int(positions.removeprefix("random")), pan_search=False)
    else:
        config["pan_positions"] = int(positions)
    beta = float(official.get("BETA", 1.0))
    config.update({1.0: {"terms": "pun"}, 0.0: {"terms": "pan"}}.get(beta, {"terms": "both", "beta": beta}))
    if dataset in _FORCED_DATASETS:
        config.update(pan_omega=50.0, omega_schedule=False)
    return config


def method_from_manifest(manifest: dict) -> tuple[str, dict]:
    """Our method name and config for a CoOp / Nemesis fixture."""
    for section, name in SECTIONS.items():
        if section in manifest["config"]:
            official = manifest["config"][section]
            config = _coop_config(official)
            if name == "nemesis":
                config.update(_nemesis_config(official, manifest["config"].get("DATASET.NAME", "")))
            return name, config
    raise ValueError(f"manifest config has none of the sections {sorted(SECTIONS)}")


def _start(manifest: dict) -> StepState:
    info = manifest.get("nemesis") or {}
    epochs = info.get("max_epoch", manifest["config"].get("OPTIM", {}).get("MAX_EPOCH", 1))
    return StepState(epoch=int(info.get("epoch", 0)), max_epochs=int(epochs))


def _evaluate(method, images, start: dict, key: str) -> dict:
    if start is not None:
        method.load_learnable_state_dict(start)
    method.eval()
    with torch.no_grad():
        return {key: method(images).logits}


def _records(method, step, trace: Traces) -> dict:
    b = step.outputs.branches
    rec = {f"train.{k}": b[k] for k in ("image_features", "image_features_unnorm", "text_features",
                                        "text_features_unnorm")}
    rec.update({"train.logits": step.outputs.logits, "train.acc": step.terms["acc"],
                "train.prompts": method.context.embeddings()})
    rec.update({f"vision.block_out.{layer:02d}": h for layer, h in trace.image.hidden.items()})
    rec.update({f"text.block_out.{layer:02d}": h for layer, h in trace.text.hidden.items()})
    return rec


def _nemesis_records(method, step, images, labels, positions) -> dict:
    terms = step.terms
    rec = {"loss.ce": terms["ce"], "schedule.omega": torch.tensor(step.omega_e, dtype=torch.float64)}
    for term in ("pun", "pan"):
        if term in terms:
            rec[f"loss.{term}"] = terms[term]
    rec["loss.n_loss_logged"] = sum(terms[t] for t in ("pun", "pan") if t in terms)
    if step.alpha_pun is not None:
        rec["alpha.pun"] = step.alpha_pun
    if step.pan is not None:
        decision = step.pan
        if decision.logits is None:  # no selection: the official code still ran (and discarded) the search
            with torch.no_grad():
                image = method.backbone.encode_image(images).features
            logits = method.pre_inference_logits(image, positions)
            searched = pan_weights(logits, labels, positions, method.context.n_ctx, 1.0)
            decision = type(decision)(decision.positions, decision.alpha, logits, searched.pred,
                                      searched.ori_correct, searched.crt_correct)
        rec.update({"alpha.pan": decision.alpha, "pan.inference_logits": decision.logits, "pan.pred": decision.pred,
                    "pan.ori_correct": decision.ori_correct, "pan.crt_correct": decision.crt_correct,
                    "pan.pos_list": torch.tensor(decision.positions)})
    return rec


def start_training_record(method, start: dict) -> tuple[dict, Traces]:
    """The method at the fixture's start values in train mode: its starting per-position norms and a fresh trace."""
    method.load_learnable_state_dict(start)
    method.train()
    norm = getattr(method.config, "norm", "l2")
    return {"norms.per_position_start": logged_position_norms(method.context.ctx, norm)}, \
        Traces(image=Trace(), text=Trace())


def _train(method, manifest, images, labels, start: dict, names: dict, positions) -> dict:
    rec, trace = start_training_record(method, start)
    param, norm = method.context.ctx, getattr(method.config, "norm", "l2")
    if method.name == "nemesis":
        step = method.compute_step(images, labels, state=_start(manifest), positions=positions, trace=trace)
    else:  # plain CoOp: the same record with CE only
        from alignednorm.methods.nemesis import NemesisStep

        outputs = method(images, rule="seen", trace=trace)
        terms = method.ce_terms(outputs, labels)
        step = NemesisStep({**terms, "ce": terms["loss"]}, outputs, 1.0, None, None)
    rec.update(_records(method, step, trace))
    if method.name == "nemesis":
        rec.update(_nemesis_records(method, step, images, labels, positions))
    else:
        rec["loss.ce"] = step.terms["ce"]
    rec["loss.total"] = step.terms["loss"]
    method.zero_grad(set_to_none=True)
    step.terms["loss"].backward()
    for ours, official in names.items():
        rec[f"grad.{official}"] = dict(method.named_parameters())[ours].grad.clone()
    cfg = manifest["optimizer_step"]
    torch.optim.SGD(method.learnable_parameters(), lr=cfg["lr_at_step"], momentum=cfg.get("momentum", 0.0),
                    weight_decay=cfg.get("weight_decay", 0.0), dampening=cfg.get("dampening", 0.0),
                    nesterov=cfg.get("nesterov", False)).step()
    params = dict(method.named_parameters())
    rec.update({f"after_step.{official}": params[ours].detach().clone() for ours, official in names.items()})
    rec["norms.per_position_after_step"] = logged_position_norms(param, norm)
    rec["norms.matrix_norm_after_step"] = matrix_norm(param, norm).double()
    rec.update(_evaluate(method, images, None, "eval_after_step.output"))
    return rec


def _positions(fixture: Path, manifest: dict) -> list[int] | None:
    """PAN's drawn positions as the fixture stored them (outputs ``pan.pos_list``, else the manifest)."""
    path = fixture / "outputs.safetensors"
    outputs = load_file(str(path)) if path.is_file() else {}
    if "pan.pos_list" in outputs:
        return [int(p) for p in outputs["pan.pos_list"]]
    pan = (manifest.get("nemesis") or {}).get("pan") or {}
    return list(pan["pos_list"]) if "pos_list" in pan else None


def compute_outputs(fixture: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """Every tensor a CoOp / Nemesis fixture holds, computed by our implementation."""
    s = fixture_start(fixture, *method_from_manifest(manifest))
    method, start, names = s.method, s.start, s.names
    images, labels = s.inputs["images"], s.inputs["labels"]
    method.load_learnable_state_dict(start, source=s.source)
    method.set_classnames(manifest["class_names"])
    ours = {"tokens.base": method.context.token_ids}
    ours.update(_evaluate(method, images, start, "eval.output"))
    ours.update(_train(method, manifest, images, labels, start, names, _positions(fixture, manifest)))
    return ours


def _compare_step(key: str, ours: torch.Tensor, ref: torch.Tensor, initial: torch.Tensor, tol: dict) -> dict:
    """The SGD step ``after − start`` at the gradient tolerance, plus one float32 ulp of the parameter.

    Both after-step tensors are rounded to float32, so a last-bit difference in the gradient can
    move one element by an ulp of its value: more than 1e-4 × |step| when the step is ~1e-5.
    """
    result = compare("step." + key, ours - initial, ref - initial, tol)
    if "max_abs_diff" in result:
        largest = initial.abs().max().float()
        ulp = float(torch.nextafter(largest, torch.tensor(float("inf"))) - largest)
        result["tolerance"] += ulp
        result["ok"] = result["max_abs_diff"] <= result["tolerance"]
    return result


def compare_fixture(fixture: Path, manifest: dict, ours: dict[str, torch.Tensor], compare_other=compare) -> dict:
    """Every tensor of a fixture in this format (one class list, one SGD step) against ``ours``.

    ``after_step.*`` is compared as the step (:func:`_compare_step`) and as the value; every other
    tensor by ``compare_other(key, ours, ref, tol)``.
    """
    reference = load_file(str(fixture / "outputs.safetensors"))
    start = load_file(str(fixture / "learnable.safetensors"))
    reference["tokens.base"] = load_file(str(fixture / "inputs.safetensors"))["tokenized_prompts"]
    tol = tolerances(manifest)
    results = {}
    for key, ref in sorted(reference.items()):
        if key not in ours:
            results[key] = {"ok": False, "error": "not computed"}
        elif key.startswith("after_step."):
            initial = start[key.removeprefix("after_step.")]
            results[key] = _compare_step(key, ours[key], ref, initial, tol)
            results[key.replace("after_step.", "after_step_value.", 1)] = compare(key, ours[key], ref, tol)
        else:
            results[key] = compare_other(key, ours[key], ref, tol)
    return results


def run_parity(fixture_dir: str | Path, threads: int | None = None) -> dict:
    """Compare our CoOp / Nemesis with a fixture; the report's ``ok`` is True iff all tensors fit."""
    fixture, manifest = read_manifest(fixture_dir)
    with fixture_threads(manifest, threads):
        name, config = method_from_manifest(manifest)
        results = compare_fixture(fixture, manifest, compute_outputs(fixture, manifest))
        return build_report(fixture, name, config, results)
