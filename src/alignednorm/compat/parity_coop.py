"""Parity of CoOp and CoCoOp with the official CoOp repository on golden-tensor fixtures.

A fixture (``shared/reference/coop_a``, ``cocoop_a``; README section "CoOp, CoCoOp, PLOT ...") records
two one-batch epochs of the official ``trainers/coop.py`` / ``trainers/cocoop.py`` in float32 (nothing
is rounded to float16 on that path), eval logits on the base classes and, from the same start values,
on the new classes. We build ``coop`` / ``cocoop`` from the manifest's ``TRAINER.COOP`` /
``TRAINER.COCOOP`` section, load the start values through the official-checkpoint importer, evaluate
both halves, then run the two SGD steps with the manifest's rates, recording every tensor the fixture
holds. (The Nemesis fixtures, whose section is ``TRAINER.CoOpNemesis``, go to ``parity_nemesis``.)
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
from alignednorm.compat.parity_deep import reference_extras

# Official config section -> our method.
SECTIONS = {"TRAINER.COOP": "coop", "TRAINER.CoOp": "coop", "TRAINER.COCOOP": "cocoop"}


def method_from_manifest(manifest: dict) -> tuple[str, dict]:
    """Our method name and config for a CoOp / CoCoOp fixture."""
    for section, name in SECTIONS.items():
        if section in manifest["config"]:
            official = manifest["config"][section]
            ctx_init = official.get("CTX_INIT", "") or ""
            config = {"n_ctx": int(official.get("N_CTX", 16)), "ctx_init": ctx_init}
            if name == "coop":
                # The official prompt learner ignores CSC under word init (one generic context).
                config.update(class_specific=bool(official.get("CSC", False)) and not ctx_init,
                              class_token_position=official.get("CLASS_TOKEN_POSITION", "end"))
            return name, config
    raise ValueError(f"manifest config has none of the sections {sorted(SECTIONS)}")


def _per_image_text(method, f: torch.Tensor, trace: Trace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CoCoOp's meta-net output ``(B, W)``, prompts ``(B, C, T, W)`` and text features ``(B, C, E)``."""
    bias = method.meta_net(f)
    prompts = torch.stack([method.context.embeddings(method.context.ctx + b) for b in bias])
    return bias, prompts, method.conditional_text_features(f, trace=trace)


def _text_records(method, trace: Trace, rows: int) -> dict:
    ids = method.context.token_ids.repeat(rows, 1)
    index, eot = torch.arange(ids.shape[0]), ids.argmax(dim=-1)
    layers = sorted(trace.hidden)
    return {"text.eot_hidden": torch.stack([trace.hidden[layer][index, eot] for layer in layers]),
            "text.block_out.01": trace.hidden[1]}


def _forward(method, images: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """One training forward with every record the fixture holds; returns (records, loss)."""
    vtrace, ttrace = Trace(), Trace()
    if method.name == "cocoop":
        image = method.backbone.encode_image(images, trace=vtrace).features
        f = image / image.norm(dim=-1, keepdim=True)
        bias, prompts, text = _per_image_text(method, f, ttrace)
        w = text / text.norm(dim=-1, keepdim=True)
        logits = method.logit_scale * (f.unsqueeze(1) * w).sum(dim=-1)
        rec = {"train.meta_net_out": bias, "train.prompts": prompts, "train.logits": logits}
        rows = images.shape[0]
    else:
        outputs = method(images, rule="seen", trace=Traces(image=vtrace, text=ttrace))
        image, text, f, w = (outputs.branches[k] for k in ("image_features_unnorm", "text_features_unnorm",
                                                            "image_features", "text_features"))
        rec = {"train.prompts": method.context.embeddings(), "train.logits": outputs.logits}
        rows = 1
    rec.update({"train.image_features_unnorm": image, "train.image_features": f, "train.text_features_unnorm": text,
                "train.text_features": w, "train.logit_scale_exp": torch.tensor(method.logit_scale),
                "vision.ln_pre_out": method.backbone.embed_image(images)})
    rec.update({f"vision.block_out.{layer:02d}": h for layer, h in vtrace.hidden.items()})
    rec.update(_text_records(method, ttrace, rows))
    return rec, rec["train.logits"]


def _evaluate(method, images: torch.Tensor, names: list[str], half: str) -> dict:
    method.set_classnames(names)
    method.eval()
    with torch.no_grad():
        outputs = method(images)
    out = {f"eval_{half}.{k}": outputs.branches[k] for k in ("text_features_unnorm", "image_features_unnorm")}
    out[f"eval_{half}.logits"] = outputs.logits
    out[f"tokens.{half}"] = method.context.token_ids
    return out


def _train(method, manifest: dict, images, labels, start: dict, names: dict[str, str]) -> dict:
    method.set_classnames(manifest["class_names_base"])
    method.load_learnable_state_dict(start)
    method.train()
    step = manifest["optimizer_step"]
    params = dict(method.named_parameters())
    optimizer = manifest_sgd(method.learnable_parameters(), step)
    rec, logits = _forward(method, images)
    loss = F.cross_entropy(logits, labels)
    rec.update({"loss.ce": loss, "loss.total": loss})
    method.zero_grad(set_to_none=True)
    loss.backward()
    rec.update({f"grad.{official}": params[ours].grad.clone() for ours, official in names.items()})
    optimizer.step()
    rec.update({f"after_step.{official}": params[ours].detach().clone() for ours, official in names.items()})
    for group in optimizer.param_groups:
        group["lr"] = step["lr_at_step2"]
    _, logits = _forward(method, images)
    loss = F.cross_entropy(logits, labels)
    rec["step2.loss.total"] = loss
    method.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    rec.update({f"step2.after_step.{official}": params[ours].detach().clone() for ours, official in names.items()})
    return rec


def compute_outputs(fixture: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """Every tensor a CoOp / CoCoOp fixture holds, computed by our implementation."""
    s = fixture_start(fixture, *method_from_manifest(manifest))
    method, start, names, inputs = s.method, s.start, s.names, s.inputs
    ours: dict[str, torch.Tensor] = {}
    recorded = manifest["tensors"]["outputs.safetensors"]
    for half in [h for h in ("base", "new") if f"eval_{h}.logits" in recorded]:
        method.set_classnames(manifest[f"class_names_{half}"])
        method.load_learnable_state_dict(start, source=s.source)
        ours.update(_evaluate(method, inputs["images"], manifest[f"class_names_{half}"], half))
    ours.update(_train(method, manifest, inputs["images"], inputs["labels"], start, names))
    return ours


def run_parity(fixture_dir: str | Path, threads: int | None = None) -> dict:
    """Compare our CoOp / CoCoOp with a fixture; the report's ``ok`` is True iff all tensors fit."""
    fixture, manifest = read_manifest(fixture_dir)
    with fixture_threads(manifest, threads):
        name, config = method_from_manifest(manifest)
        ours = compute_outputs(fixture, manifest)
        reference = load_file(str(fixture / "outputs.safetensors"))
        extras = reference_extras(load_file(str(fixture / "inputs.safetensors")))
        # A half without eval tensors (a class-specific context serves only its classes) has no token check.
        reference.update({k: v for k, v in extras.items() if f"eval_{k.split('.')[1]}.logits" in reference})
        tol = tolerances(manifest)
        results = {key: compare(key.removeprefix("step2."), ours[key], ref, tol) if key in ours
                   else {"ok": False, "error": "not computed"} for key, ref in sorted(reference.items())}
        return build_report(fixture, name, config, results)
