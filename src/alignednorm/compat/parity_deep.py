"""Parity of MaPLe and PromptSRC with their official code on golden-tensor fixtures.

A fixture (``shared/reference/maple_a``, ``promptsrc_a``; format in that folder's README) records
two one-batch epochs of the official trainer in its float32 path. We build the method from the
manifest's ``TRAINER.MAPLE`` / ``TRAINER.PROMPTSRC`` section with ``official_fp16_rounding`` on
(that path rounds prompts to float16), load the start values through the official-checkpoint
importer, evaluate on base and new classes, then run two SGD steps with the manifest's rates,
momentum and weight decay (PromptSRC: a GPA update after each, as the official end-of-epoch
branch), recording every tensor the fixture holds.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from alignednorm.backbone.hooks import Trace, Traces
from alignednorm.compat.parity import (
    build_report,
    compare,
    fixture_start,
    fixture_threads,
    manifest_sgd,
    read_manifest,
    tolerances,
)
from alignednorm.compat.rounded_copies import (
    compare_rounded_copies,
    compare_within_bounds,
    coupling_gradient_bounds,
    per_copy_coupling_gradients,
    per_copy_gradients,
)
from alignednorm.losses.self_regularization import template_mean_text_features
from alignednorm.methods import StepState
from alignednorm.prompts.deep import expand_tokens
from alignednorm.prompts.label_space import LabelSpace

# Official config section -> (our method, official key -> our config field)
SECTIONS = {
    "TRAINER.MAPLE": ("maple", {"N_CTX": "n_ctx", "CTX_INIT": "ctx_init", "PROMPT_DEPTH": "prompt_depth"}),
    "TRAINER.PROMPTSRC": ("promptsrc", {
        "N_CTX_TEXT": "n_ctx_text", "N_CTX_VISION": "n_ctx_vision", "CTX_INIT": "ctx_init",
        "PROMPT_DEPTH_TEXT": "text_depth", "PROMPT_DEPTH_VISION": "vision_depth",
        "TEXT_LOSS_WEIGHT": "text_loss_weight", "IMAGE_LOSS_WEIGHT": "image_loss_weight",
        "GPA_MEAN": "gpa_mean", "GPA_STD": "gpa_std"}),
}


def method_from_manifest(manifest: dict) -> tuple[str, dict]:
    """Our method name and config for a MaPLe / PromptSRC fixture."""
    for section, (name, keys) in SECTIONS.items():
        if section in manifest["config"]:
            official = manifest["config"][section]
            config = {ours: official[key] for key, ours in keys.items() if key in official}
            for field in ("text_loss_weight", "image_loss_weight", "gpa_mean", "gpa_std"):
                if field in config:
                    config[field] = float(config[field])
            n_ctx = config.get("n_ctx", config.get("n_ctx_text"))
            if config.get("ctx_init") and n_ctx > 4:  # the official code ignores CTX_INIT past 4 tokens
                config["ctx_init"] = ""
            config["official_fp16_rounding"] = True  # the official float32 path rounds its prompts
            config["unused_prompt_blocks"] = True  # the official code accepts depths past a shallow CLIP's blocks
            if name == "promptsrc":
                config["teacher_templates"] = "label_space"  # the manifest's templates, through the label space
            return name, config
    raise ValueError(f"manifest config has none of the sections {sorted(SECTIONS)}")


def _space(manifest: dict, half: str) -> LabelSpace:
    templates = manifest.get("teacher_templates") or [manifest["template"]]
    return LabelSpace(tuple(manifest[f"class_names_{half}"]), tuple(templates))


def _text_records(method, trace: Trace, n_ctx: int) -> dict:
    ids = method.token_ids
    rows, eot = torch.arange(ids.shape[0]), ids.argmax(dim=-1)
    layers = sorted(trace.hidden)
    return {"text.eot_hidden": torch.stack([trace.hidden[layer][rows, eot] for layer in layers]),
            "text.ctx_hidden": torch.stack([trace.hidden[layer][:, 1 : 1 + n_ctx] for layer in layers]),
            "text.block_out.01": trace.hidden[1]}


def _vision_records(method, images, first: torch.Tensor, trace: Trace) -> dict:
    prompts = expand_tokens(first, images.shape[0], method.config.official_fp16_rounding)
    out = {"vision.ln_pre_out": torch.cat([method.backbone.embed_image(images),
                                           method.backbone.image_pre_norm(prompts)], dim=1)}
    out.update({f"vision.block_out.{layer:02d}": h for layer, h in trace.hidden.items()})
    return out


def _prompt_records(method) -> dict:
    if method.name == "maple":
        vision = method.vision_prompts()
        return {"train.prompts": method.text_prompts_input(method.text_prompts["1"]), "train.shared_ctx": vision[1],
                "train.visual_deep_prompts": torch.stack([vision[b] for b in sorted(vision) if b >= 2])}
    return {"train.prompts": method.text_prompts_input(method.text_prompts["1"])}


def _evaluate(method, manifest, images, half: str) -> dict:
    method.set_label_space(_space(manifest, half))
    method.eval()
    with torch.no_grad():
        b = method(images).branches
    out = {f"eval_{half}.{k}": b[k] for k in ("text_features_unnorm", "image_features_unnorm")}
    out[f"eval_{half}.logits"] = method(images).logits
    out[f"tokens.{half}"] = method.token_ids
    if method.name == "promptsrc":
        suffix = "" if half == "base" else "_new"
        out[f"frozen.fixed_embeddings_unnorm{suffix}"] = method.teacher_text_features()
        if half == "base":
            _, per_template = template_mean_text_features(method.backbone, method.classnames,
                                                          method.teacher_templates())
            out["frozen.template_text_features"] = per_template
    return out


def _forward_backward(method, images, labels) -> tuple[dict, dict]:
    """One official ``forward_backward`` without the optimiser step: (terms, records)."""
    vtrace, ttrace = Trace(), Trace()
    if method.name == "promptsrc":
        terms, outputs, teacher = method.compute_terms(images, labels, trace=Traces(image=vtrace, text=ttrace))
    else:
        outputs = method(images, rule="seen", trace=Traces(image=vtrace, text=ttrace))
        terms, teacher = {"ce": F.cross_entropy(outputs.logits, labels)}, None
        terms["loss"] = terms["ce"]
    method.zero_grad(set_to_none=True)
    terms["loss"].backward()
    b = outputs.branches
    rec = {f"train.{k}": b[k] for k in ("text_features", "text_features_unnorm", "image_features",
                                        "image_features_unnorm")}
    rec["train.logits"] = outputs.logits
    rec["train.logit_scale_exp"] = torch.tensor(method.logit_scale)
    rec.update({f"loss.{k}": v for k, v in terms.items() if k != "loss"})
    rec["loss.total"] = terms["loss"]
    first = method.vision_prompts()[1] if method.name == "maple" else method.vision_prompts["1"]
    rec.update(_vision_records(method, images, first, vtrace))
    n_ctx = method.config.n_ctx if method.name == "maple" else method.config.n_ctx_text
    rec.update(_text_records(method, ttrace, n_ctx))
    rec.update(_prompt_records(method))
    if teacher is not None:
        with torch.no_grad():
            frozen = method.backbone.encode_image(images).features
        rec.update({"frozen.image_features_unnorm": frozen, "frozen.image_features": teacher["frozen_image"],
                    "frozen.fixed_embeddings": teacher["frozen_text"],
                    "frozen.zero_shot_logits": teacher["zero_shot_logits"]})
    return terms, rec


def _gpa_records(method, names: dict[str, str], tag: str, step: int, epochs: int) -> dict:
    """GPA after epoch ``step`` (0-based): the running sums (or the average, once loaded)."""
    method.on_epoch_end(StepState(epoch=step, max_epochs=epochs))
    params = dict(method.named_parameters())
    values = method.averager.sums or {n: params[n].detach() for n in names}
    rec = {f"gpa.{tag}.{names[n]}": values[n].clone() for n in names}
    if step == 0:  # the official GPA weights frozen tensors too; its sum of weights leaves them unchanged
        weight = float(method.averager.weights(epochs)[0])
        rec[f"gpa.{tag}.image_encoder.proj"] = method.backbone.image_projection.detach() * weight
    return rec


def _train(method, manifest, images, labels, start, names) -> dict:
    method.set_label_space(_space(manifest, "base"))
    method.load_learnable_state_dict(start)
    method.train()
    step = manifest["optimizer_step"]
    params = dict(method.named_parameters())
    optimizer = manifest_sgd(method.learnable_parameters(), step)
    epochs = manifest["config"]["OPTIM"]["MAX_EPOCH"]
    with per_copy_gradients(method) as copies, per_copy_coupling_gradients(method) as coupled:
        _, rec = _forward_backward(method, images, labels)
    # Compared by the float16 rounded-copies rule (not tensors of the fixture themselves).
    rec.update({f"copies.{names[n]}": torch.cat(g) for n, g in copies.items()})
    tol = tolerances(manifest)
    for block, (inputs, grads) in coupled.items():
        if not grads:  # a block past the backbone's layers: no gradient reached it
            continue
        for kind, bounds in coupling_gradient_bounds(inputs, torch.cat(grads), tol).items():
            official = names.get(f"couplings.{block}.{kind}")
            if official is not None:
                rec[f"bounds.{official}"] = bounds
    for ours, official in names.items():
        grad = params[ours].grad
        rec[f"grad.{official}"] = grad.clone() if grad is not None else torch.zeros_like(params[ours])
    optimizer.step()
    rec.update({f"after_step.{official}": params[ours].detach().clone() for ours, official in names.items()})
    if method.name == "promptsrc":
        rec["gpa.weights"] = torch.from_numpy(method.averager.weights(epochs))
        rec.update(_gpa_records(method, names, "after_step1", 0, epochs))
    for group in optimizer.param_groups:
        group["lr"] = step["lr_at_step2"]
    terms, _ = _forward_backward(method, images, labels)
    rec["step2.loss.total"] = terms["loss"]
    optimizer.step()
    rec.update({f"step2.after_step.{official}": params[ours].detach().clone() for ours, official in names.items()})
    if method.name == "promptsrc":
        rec.update(_gpa_records(method, names, "after_step2", 1, epochs))
    return rec


def compute_outputs(fixture: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """Every tensor a MaPLe / PromptSRC fixture holds, computed by our implementation."""
    s = fixture_start(fixture, *method_from_manifest(manifest))
    method, start, names, inputs = s.method, s.start, s.names, s.inputs
    images, labels = inputs["images"], inputs["labels"]
    ours: dict[str, torch.Tensor] = {}
    for half in ("base", "new"):
        method.load_learnable_state_dict(start, source=s.source)
        ours.update(_evaluate(method, manifest, images, half))
    if "teacher_tokens" in inputs:
        space = _space(manifest, "base")
        ours["tokens.teacher"] = torch.stack([method.backbone.tokenize(space.prompts(k))
                                              for k in range(len(space.templates))])
    ours.update(_train(method, manifest, images, labels, start, names))
    return ours


def reference_extras(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Input tensors compared too: the official token ids of the prompts (and teacher templates)."""
    extra = {"tokens.base": inputs["tokenized_prompts"], "tokens.new": inputs["tokenized_prompts_new"]}
    if "teacher_tokens" in inputs:
        extra["tokens.teacher"] = inputs["teacher_tokens"]
    return extra


def _tolerance_name(key: str) -> str:
    """The name whose group sets ``key``'s tolerance: step-2 tensors are losses / parameters too."""
    return key.removeprefix("step2.")


def _compare(key: str, ours: dict[str, torch.Tensor], ref: torch.Tensor, tol: dict) -> dict:
    if key not in ours:
        return {"ok": False, "error": "not computed"}
    plain = compare(_tolerance_name(key), ours[key], ref, tol)
    if plain["ok"] or not key.startswith("grad."):
        return plain
    bounds = ours.get(key.replace("grad.", "bounds.", 1))
    if bounds is not None:  # a coupling's weight or bias: its gradient passed through the float16 copies
        return compare_within_bounds(ours[key], ref, bounds, tol)
    copies = ours.get(key.replace("grad.", "copies.", 1))
    if copies is None:
        return plain
    # The rule requires our own gradient to be the rounded copies' sum too: where a tensor also has
    # other gradient paths (MaPLe's text prompts feed its vision prompts), only the plain rule applies.
    return compare_rounded_copies(ours[key], ref, copies, tol)


def run_parity(fixture_dir: str | Path, threads: int | None = None) -> dict:
    """Compare our MaPLe / PromptSRC with a fixture; the report's ``ok`` is True iff all tensors fit."""
    fixture, manifest = read_manifest(fixture_dir)
    with fixture_threads(manifest, threads):
        name, config = method_from_manifest(manifest)
        ours = compute_outputs(fixture, manifest)
        reference = load_file(str(fixture / "outputs.safetensors"))
        reference.update(reference_extras(load_file(str(fixture / "inputs.safetensors"))))
        tol = tolerances(manifest)
        results = {key: _compare(key, ours, ref, tol) for key, ref in sorted(reference.items())}
        return build_report(fixture, name, config, results)
