"""Parity of MMRL, MMRL++ and AlignedNorm with their official code on golden-tensor fixtures.

Reached through ``python -m alignednorm.compat.parity FIXTURE_DIR`` (which dispatches on the
manifest's config section). Every setting is read from the fixture's ``manifest.json``. We build
our method through the public API, load the values through the official-checkpoint import path,
evaluate on base and new classes, run one training step and one AdamW step, and compare every
tensor of the fixture.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from alignednorm.backbone.clip import ClipBackbone
from alignednorm.backbone.hooks import Trace, Traces
from alignednorm.compat.official import convert_official_state, ours_to_official
from alignednorm.compat.parity import build_report, compare, fixture_threads, read_manifest, tolerances
from alignednorm.methods import create_method

# Official config section -> (our method, official key -> our config field)
_COMMON = {"ALPHA": "class_branch_weight", "BETA": "prc_beta", "REG_WEIGHT": "reg_weight",
           "REP_LAYERS": "rep_layers", "REP_DIM": "rep_dim", "N_REP_TOKENS": "n_rep_tokens",
           "PROJ_LORA_DIM": "proj_lora_dim", "RES_LORA_DIM": "res_lora_dim"}
SECTIONS = {
    "TRAINER.MMRLpp": ("mmrlpp", _COMMON),
    "TRAINER.MMRL": ("mmrl", {**_COMMON, "SCALE": "class_branch_weight"}),  # MMRL v1 calls ALPHA "SCALE"
    "TRAINER.ALIGNEDNORM": ("alignednorm", {**_COMMON, "SEQ_NORM": "token_align_weight",
                                            "FINAL_NORM": "proj_align_weight"}),
}

def method_from_manifest(manifest: dict) -> tuple[str, dict, bool]:
    """Our method name, its config, and whether the official decoupled rule applies."""
    for section, (name, keys) in SECTIONS.items():
        if section in manifest["config"]:
            official = manifest["config"][section]
            config = {ours: official[key] for key, ours in keys.items() if key in official}
            config["inference"] = "unified" if name == "alignednorm" else "decoupled"
            return name, config, name != "alignednorm"
    raise ValueError(f"manifest config has none of the sections {sorted(SECTIONS)}")


def _vision_records(trace: Trace, ln_pre: torch.Tensor, layers: list[int], n: int) -> dict:
    start = trace.prompt_start
    out = {"vision.ln_pre_out": ln_pre}
    for layer, h in trace.hidden.items():
        out[f"vision.block_out.{layer:02d}"] = h
    cls = torch.stack([trace.hidden[layer][:, 0] for layer in layers])  # (K, B, W)
    rep = torch.stack([trace.hidden[layer][:, start : start + n] for layer in layers])  # (K, B, n, W)
    out.update({"vision.cls_hidden": cls, "vision.rep_hidden": rep, "vision.cls_hidden_norm": cls.norm(dim=-1),
                "vision.rep_hidden_mean_norm": rep.mean(dim=2).norm(dim=-1),
                "vision.rep_hidden_norm": rep.norm(dim=-1)})
    if trace.attn_out:
        out["vision.attn_out_cls"] = torch.stack([trace.attn_out[layer][:, 0] for layer in layers])
        out["vision.attn_out_rep"] = torch.stack([trace.attn_out[layer][:, start : start + n] for layer in layers])
    return out


def _text_records(trace: Trace, token_ids: torch.Tensor, layers: list[int], n: int) -> dict:
    eot = token_ids.argmax(dim=-1)
    rows = torch.arange(token_ids.shape[0])
    eot_hidden = [h[rows, eot + (n if layer >= layers[0] else 0)] for layer, h in sorted(trace.hidden.items())]
    rep = torch.stack([trace.hidden[layer][:, 1 : 1 + n] for layer in layers])
    return {"text.eot_hidden": torch.stack(eot_hidden), "text.rep_hidden": rep}


def _evaluate(method, classnames, template, images, prefix: str, rule: str) -> dict:
    method.set_classnames(classnames, template)
    method.eval()
    with torch.no_grad():
        out = method(images, rule=rule)
    b = out.branches
    return {f"{prefix}.logits": b["logits_cls"], f"{prefix}.logits_rep": b["logits_rep"],
            f"{prefix}.logits_fusion": b["logits_fusion"], f"{prefix}.image_features": b["f_c"],
            f"{prefix}.text_features": b["text_features"], f"{prefix}.output": out.logits,
            f"{prefix}.frozen_text_features": method.frozen_text_features()}


def _train_step(method, manifest, images, labels, official_names) -> dict:
    cfg = method.config
    layers, n = list(cfg.rep_layers), cfg.n_rep_tokens
    method.set_classnames(manifest["class_names_base"], manifest["template"])
    method.train()
    vtrace, ttrace = Trace(record_attn_out=True), Trace()
    terms, outputs = method.compute_terms(images, labels, trace=Traces(image=vtrace, text=ttrace))
    method.zero_grad(set_to_none=True)
    terms["loss"].backward()
    b = outputs.branches
    rec = {f"train.{k}": b[k] for k in ("z_c", "z_p", "text_features", "text_features_unnorm", "logits_rep",
                                        "logits_fusion", "cls_ln_post", "rep_ln_post_mean")}
    rec["train.rep_tokens_visual"], rec["train.rep_tokens_text"] = method.mapped_tokens()
    rec.update({"train.logits": b["logits_cls"], "train.image_features": b["f_c"],
                "train.image_features_rep": b["f_p"], "train.acc": terms["acc"]})
    with torch.no_grad():
        rec["frozen.image_features"] = F.normalize(method.backbone.encode_image(images).features, dim=-1)
    rec["frozen.text_features"] = method.frozen_text_features()
    rec.update(_vision_records(vtrace, method.backbone.embed_image(images), layers, n))
    rec.update(_text_records(ttrace, method.token_ids, layers, n))
    rec.update(_loss_records(method, terms))
    params = dict(method.named_parameters())
    for ours, param in params.items():
        if param.requires_grad:
            official = ours_to_official(ours, official_names) or ours
            rec[f"grad.{official}"] = param.grad if param.grad is not None else torch.zeros_like(param)
    step = manifest["optimizer_step"]
    optimizer = torch.optim.AdamW(method.learnable_parameters(), lr=step["lr_at_step"], betas=tuple(step["betas"]),
                                  eps=step["eps"], weight_decay=step["weight_decay"],
                                  amsgrad=step.get("amsgrad", False))
    optimizer.step()
    for ours, param in params.items():
        if param.requires_grad:
            rec[f"after_step.{ours_to_official(ours, official_names) or ours}"] = param.detach()
    return rec


def _loss_records(method, terms: dict) -> dict:
    rec = {f"loss.{k}": v for k, v in terms.items() if k not in ("acc", "loss")}
    rec["loss.total"] = terms["loss"]
    if method.name != "alignednorm" and method.config.reg_weight:
        # The MMRL++ fixtures store the anchors before the λ weighting.
        for key in ("reg_img", "reg_text"):
            rec[f"loss.{key}"] = terms[key] / method.config.reg_weight
    return rec


def compute_outputs(fixture: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """Every tensor a fixture holds, computed by our implementation from the fixture's inputs."""
    name, config, _decoupled = method_from_manifest(manifest)
    backbone = ClipBackbone.from_file(fixture / "clip_tiny.safetensors")
    method = create_method(name, backbone, config)
    official = load_file(str(fixture / "learnable.safetensors"))
    start_values = convert_official_state(official)
    inputs = load_file(str(fixture / "inputs.safetensors"))
    images, labels, template = inputs["images"], inputs["labels"], manifest["template"]
    ours: dict[str, torch.Tensor] = {}
    for half, rule in (("base", "seen"), ("new", "unseen")):
        method.load_learnable_state_dict(start_values, source=str(fixture / "learnable.safetensors"))
        ours.update(_evaluate(method, manifest[f"class_names_{half}"], template, images, f"eval_{half}", rule))
        ours[f"tokens.{half}"] = method.token_ids
    method.load_learnable_state_dict(start_values)
    ours.update(_train_step(method, manifest, images, labels, list(official)))
    return ours


def run_parity(fixture_dir: str | Path, threads: int | None = None) -> dict:
    """Compare our implementation with a fixture; returns the report (``report["ok"]``)."""
    fixture, manifest = read_manifest(fixture_dir)
    with fixture_threads(manifest, threads):
        name, config, _ = method_from_manifest(manifest)
        ours = compute_outputs(fixture, manifest)
        reference = load_file(str(fixture / "outputs.safetensors"))
        inputs = load_file(str(fixture / "inputs.safetensors"))
        # Our tokenizer must give the official token ids, or nothing downstream can match.
        reference.setdefault("tokens.base", inputs["tokenized_prompts"])
        reference.setdefault("tokens.new", inputs["tokenized_prompts_new"])
        tol = tolerances(manifest)
        results = {}
        for key, ref in sorted(reference.items()):
            results[key] = compare(key, ours[key], ref, tol) if key in ours else {"ok": False, "error": "not computed"}
        return build_report(fixture, name, config, results)
