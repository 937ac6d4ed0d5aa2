"""Parity of HiCroPL with its official code on golden-tensor fixtures.

A fixture (``shared/reference/hicropl_a``; format in that folder's README) records the official
trainer's float32 path: one ``forward_backward`` (the prompt learner's in-place mapping, the fused
features, the loss, every gradient and one Adam step), one eval forward of the stepped model (which
maps again), and eval forwards of fresh base- and new-class models from the start values. We build
``hicropl`` from the manifest's ``TRAINER.HICROPL`` section with ``mapping: reference`` and
``official_fp16_rounding`` on (that path rounds the visual and deep text prompts and the fixed text
embeddings to float16), the manifest's descriptions in the label space, load the start values
through the official-checkpoint importer and record every tensor the fixture holds. Besides the
stored tensors we check that each tensor of ``manifest.grad_none`` has no gradient and is unchanged
by the step, that the stored ones do have one, the Adam update itself (``update.*``: the step's
change from the values it started from, atol 1e-7 as the fixture README suggests; our Adam applied
to the fixture's gradients, since the gradients themselves may differ by the float16 rounding
below and Adam's eps 1e-3 passes that on), the prompt prefix and the tokenised descriptions.

**Float16 rounding.** Gradients of the float16-rounded prompt copies are compared by the rule of
:mod:`alignednorm.compat.rounded_copies`. The forward rounds the mapped prompts too: our mapper's
output agrees with the official one to ~1e-6 (compared as ``train.mapper_*``), but a last-bit
difference at a float16 boundary moves a prompt token by one float16 step (~5e-4), visible in that
token's block outputs and in the gradients. So, as for the description embeddings, the training
forward continues from the official mapped values (the fixture's ``train.*_prompts_used`` of the
mapped layers, written in after our own mapping); ``train.*_prompts_used`` record our own values.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from alignednorm.backbone.clip import ClipBackbone
from alignednorm.backbone.hooks import Trace, Traces
from alignednorm.compat.official import convert_official_state
from alignednorm.compat.parity import (
    build_report,
    compare,
    fixture_threads,
    official_name_map,
    read_manifest,
    tolerances,
)
from alignednorm.compat.rounded_copies import compare_rounded_copies, per_copy_gradients
from alignednorm.methods import create_method
from alignednorm.prompts.label_space import LabelSpace

SECTION = "TRAINER.HICROPL"
UPDATE_ATOL = 1e-7  # the Adam update of one step (fixture README: "at about 1e-7")
KEYS = {"N_CTX": "n_ctx", "CROSS_LAYER": "cross_layer", "CTX_INIT": "ctx_init", "PROMPT_DEPTH": "prompt_depth",
        "LAMBD": "distill_weight"}


def method_from_manifest(manifest: dict) -> tuple[str, dict]:
    """Our method name and config for a HiCroPL fixture."""
    official = manifest["config"][SECTION]
    config = {ours: official[key] for key, ours in KEYS.items() if key in official}
    if "distill_weight" in config:
        config["distill_weight"] = float(config["distill_weight"])
    # the official float32 path
    config.update(mapping="reference", official_fp16_rounding=True, unused_prompt_blocks=True)
    return "hicropl", config


def _space(manifest: dict, half: str) -> LabelSpace:
    descriptions = {name: tuple(s) for name, s in manifest["descriptions"].items()}
    return LabelSpace(tuple(manifest[f"class_names_{half}"]), descriptions=descriptions,
                      description_source="manifest.json descriptions")


def _layers(prompts: dict[int, torch.Tensor]) -> torch.Tensor:
    return torch.stack([prompts[b].detach().clone() for b in sorted(prompts)])  # (d, n, W)


@torch.no_grad()
def _sequence_first_text(backbone, ids: torch.Tensor) -> torch.Tensor:
    """Frozen CLIP text features ``(N, E)`` computed in the official tower's sequence-first layout.

    The official ``encode_text`` runs its blocks on ``(T, N, W)`` tensors; ours on ``(N, T, W)``. Both
    are float32 CLIP, equal to a few ulps, but the forward adds these embeddings rounded to float16
    (``fixed_embeddings.half()``), which turns a last-bit difference into one float16 step (~3e-5)
    wherever a value sits at a rounding boundary. So the parity feeds the forward fixed embeddings
    encoded in the official layout; ``frozen.*text_features`` still compare our own ones.
    """
    model = backbone.text_tower
    x = (model.token_embedding(ids) + model.positional_embedding).permute(1, 0, 2)  # (N, T, W) -> (T, N, W)
    mask = torch.full((x.shape[0], x.shape[0]), float("-inf")).triu(1)
    for block in model.transformer.resblocks:
        a, h = block.attn, block.ln_1(x)
        x = x + F.multi_head_attention_forward(
            h, h, h, a.embed_dim, a.num_heads, a.in_proj_weight, a.in_proj_bias, None, None, False, 0.0,
            a.out_proj.weight, a.out_proj.bias, training=False, need_weights=False, attn_mask=mask)[0]
        x = x + block.mlp(block.ln_2(x))
    x = model.ln_final(x.permute(1, 0, 2))  # (T, N, W) -> (N, T, W)
    return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ model.text_projection


def _use_official_layout_descriptions(method) -> torch.Tensor:
    """Our description embeddings (returned) and, for the forward, the same computed in the official layout."""
    ours = method.description_features()
    rows = []
    for name in method.classnames:
        x = _sequence_first_text(method.backbone, method.backbone.tokenize(list(method.label_space.descriptions[name])))
        x = x / x.norm(dim=-1, keepdim=True)
        x = x.mean(dim=0)
        rows.append(x / x.norm())
    method.set_description_features(torch.stack(rows))
    return ours


def _evaluate(method, manifest, images, half: str) -> dict:
    method.set_label_space(_space(manifest, half))
    fixed = _use_official_layout_descriptions(method)
    method.eval()
    with torch.no_grad():
        out = method(images)
    b = out.branches
    rec = {f"eval_{half}.output": out.logits, f"eval_{half}.frozen_text_features": fixed}
    rec.update({f"eval_{half}.{k}": b[k] for k in ("image_features", "text_features", "text_features_prompted")})
    rec[f"tokens.{half}"] = method.token_ids
    return rec


def _train_records(method, images, terms, outputs, mapped, used, vtrace: Trace, ttrace: Trace) -> dict:
    b = outputs.branches
    text, vision = used  # our parameters after our own rewrite (before the official values were written in)
    frozen = method.backbone.encode_image(images).features
    rec = {"train.logits": outputs.logits, "train.text_input": method.text_prompts_input(text[1]),
           "train.text_prompts_used": _layers(text), "train.visual_prompts_used": _layers(vision),
           "frozen.image_features_unnorm": frozen, "frozen.image_features": b["frozen_image_features"]}
    rec.update({f"train.{k}": b[k] for k in ("image_features", "image_features_prompted", "text_features",
                                             "text_features_prompted")})
    if mapped.vision:
        rec.update({"train.mapper_t2v_out": _layers(mapped.vision), "train.proxy_text_tokens": mapped.text_proxies})
    if mapped.text:
        rec.update({"train.mapper_v2t_out": _layers(mapped.text), "train.proxy_visual_tokens": mapped.vision_proxies})
    rec.update({f"loss.{k}": v for k, v in terms.items() if k in ("ce", "distill", "distill_text", "distill_image")})
    rec["loss.total"] = terms["loss"]
    rec.update({f"vision.block_out.{layer:02d}": h for layer, h in vtrace.hidden.items()})
    rec.update({f"text.block_out.{layer:02d}": h for layer, h in ttrace.hidden.items()})
    return rec


@contextlib.contextmanager
def _official_mapped_prompts(method, reference: dict[str, torch.Tensor]):
    """During the block: after the method's own in-place mapping, its mapped layers take the official values.

    Yields ``(text, vision)``: our own stored prompts right after our mapping (see the module docstring).
    """
    original, ours = method.map_in_place, []

    @torch.no_grad()
    def rewrite():
        mapped = original()
        text, vision = method.stored_prompts()
        ours.extend([{b: t.detach().clone() for b, t in text.items()},
                     {b: t.detach().clone() for b, t in vision.items()}])
        for stored, layers, key in ((vision, mapped.vision, "visual"), (text, mapped.text, "text")):
            order = sorted(stored)
            for b in layers:
                stored[b].copy_(reference[f"train.{key}_prompts_used"][order.index(b)])
        method.invalidate_text_cache()
        return mapped

    method.map_in_place = rewrite
    try:
        yield ours
    finally:
        del method.map_in_place


def _adam(params, manifest: dict) -> torch.optim.Adam:
    step = manifest["optimizer_step"]
    return torch.optim.Adam(params, lr=step["lr_at_step"], betas=tuple(step["betas"]), eps=step["eps"],
                            weight_decay=step["weight_decay"], amsgrad=step.get("amsgrad", False))


def _update_from(start: torch.Tensor, grad: torch.Tensor, manifest: dict) -> torch.Tensor:
    """The change our Adam step makes to ``start`` given ``grad``."""
    param = torch.nn.Parameter(start.clone())
    param.grad = grad.clone()
    _adam([param], manifest).step()
    return param.detach() - start


def _train(method, manifest, images, labels, start, names, reference) -> tuple[dict, dict, dict]:
    """One official ``forward_backward`` and Adam step, then one eval forward: (records, checks, per-copy grads)."""
    method.set_label_space(_space(manifest, "base"))
    fixed = _use_official_layout_descriptions(method)
    method.load_learnable_state_dict(start)
    method.train()
    vtrace, ttrace = Trace(), Trace()
    with per_copy_gradients(method) as copies, _official_mapped_prompts(method, reference) as used:
        terms, outputs, mapped = method.compute_terms(images, labels, Traces(image=vtrace, text=ttrace))
        method.zero_grad(set_to_none=True)
        terms["loss"].backward()
    rec = _train_records(method, images, terms, outputs, mapped, used, vtrace, ttrace)
    rec["frozen.text_features"] = fixed
    params = dict(method.named_parameters())
    before = {ours: params[ours].detach().clone() for ours in names}
    _adam(method.learnable_parameters(), manifest).step()
    without = set(manifest.get("grad_none", []))
    checks = {}
    for ours, official in names.items():
        grad = params[ours].grad
        if official in without:
            checks[f"grad_none.{official}"] = grad is None
            checks[f"unchanged.{official}"] = torch.equal(params[ours].detach(), start[ours])
            continue
        # A prompt no block uses (depth past the layers) has none; a stored zero gradient then matches.
        rec[f"grad.{official}"] = grad.clone() if grad is not None else torch.zeros_like(params[ours])
        rec[f"after_step.{official}"] = params[ours].detach().clone()
        rec[f"update.{official}"] = _update_from(before[ours], reference[f"grad.{official}"], manifest)
    method.eval()
    with torch.no_grad():
        rec["eval_after_step.output"] = method(images).logits
        text, vision = method.prompts_in_use()
    rec.update({"eval_after_step.text_prompts_used": _layers(text),
                "eval_after_step.visual_prompts_used": _layers(vision)})
    return rec, checks, {names[n]: torch.cat(g) for n, g in copies.items()}


def _description_tokens(method, manifest) -> torch.Tensor:
    names = manifest["class_names_base"] + manifest["class_names_new"]
    return torch.cat([method.backbone.tokenize(list(manifest["descriptions"][n])) for n in names])


def compute_outputs(fixture: Path, manifest: dict) -> tuple[dict[str, torch.Tensor], dict[str, bool], dict]:
    """Our tensors for a HiCroPL fixture, the gradient checks and the per-copy gradients (official names)."""
    name, config = method_from_manifest(manifest)
    # the official text tower runs all context positions
    backbone = ClipBackbone.from_file(fixture / "clip_tiny.safetensors", cut_text_padding=False)
    method = create_method(name, backbone, config)
    official = load_file(str(fixture / "learnable.safetensors"))
    start = convert_official_state(official, name)
    names = official_name_map("hicropl", list(official))
    inputs = load_file(str(fixture / "inputs.safetensors"))
    images, labels = inputs["images"], inputs["labels"]
    ours: dict[str, torch.Tensor] = {"tokens.descriptions": _description_tokens(method, manifest)}
    for half in ("base", "new"):  # fresh models from the start values, as the official test
        method.load_learnable_state_dict(start, source=str(fixture / "learnable.safetensors"))
        ours.update(_evaluate(method, manifest, images, half))
    records, checks, copies = _train(method, manifest, images, labels, start, names,
                                     load_file(str(fixture / "outputs.safetensors")))
    ours.update(records)
    checks["prompt_prefix"] = method.prompt_prefix == manifest.get("prompt_prefix", method.prompt_prefix)
    return ours, checks, copies


def reference_tensors(fixture: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """The fixture's outputs, its token ids, and the Adam update it implies (``update.*``)."""
    reference = load_file(str(fixture / "outputs.safetensors"))
    inputs = load_file(str(fixture / "inputs.safetensors"))
    reference.update({"tokens.base": inputs["tokenized_prompts"], "tokens.new": inputs["tokenized_prompts_new"],
                      "tokens.descriptions": inputs["tokenized_descriptions"]})
    used = {"text": reference["train.text_prompts_used"], "visual": reference["train.visual_prompts_used"]}
    learnable = load_file(str(fixture / "learnable.safetensors"))
    for key in [k for k in reference if k.startswith("after_step.")]:
        official = key.removeprefix("after_step.")
        tower = "visual" if ".cross_prompts_visual." in official else "text"
        layer = 0 if official.endswith(".ctx") else int(official.rsplit(".", 1)[1])
        start = used[tower][layer] if layer < used[tower].shape[0] else learnable[official]
        reference[f"update.{official}"] = reference[key] - start
    return reference


def _compare_all(ours: dict, reference: dict, copies: dict, tol: dict) -> dict[str, dict]:
    results = {}
    for key, ref in sorted(reference.items()):
        official = key.split(".", 1)[1]
        if key not in ours:
            results[key] = {"ok": False, "error": "not computed"}
        elif key.startswith("grad.") and official in copies:
            results[key] = compare_rounded_copies(ours[key], ref, copies[official], tol)
        elif key.startswith("update."):
            diff = float((ours[key] - ref).abs().max())
            results[key] = {"max_abs_diff": diff, "tolerance": UPDATE_ATOL, "ok": diff <= UPDATE_ATOL}
        else:
            results[key] = compare(key, ours[key], ref, tol)
    return results


def run_parity(fixture_dir: str | Path, threads: int | None = None) -> dict:
    """Compare our HiCroPL with a fixture; the report's ``ok`` is True iff all tensors and checks fit."""
    fixture, manifest = read_manifest(fixture_dir)
    with fixture_threads(manifest, threads):
        name, config = method_from_manifest(manifest)
        ours, checks, copies = compute_outputs(fixture, manifest)
        results = _compare_all(ours, reference_tensors(fixture, manifest), copies, tolerances(manifest))
        results.update({key: {"ok": bool(ok), "max_abs_diff": 0.0 if ok else float("inf"), "check": True}
                        for key, ok in sorted(checks.items())})
        return build_report(fixture, name, config, results)
