"""Import prompts trained with the official MMRL / MMRL++ / AlignedNorm / MaPLe / PromptSRC / CoOp / Nemesis code.

Dassl saves the whole ``CustomCLIP`` state dict (frozen CLIP included) in
``<output>/MultiModalRepresentationLearner/model.pth.tar-<epoch>``. We keep only the learned
tensors and rename them onto our modules; the frozen CLIP weights in the file are ignored
(ours come from the backbone checkpoint) and ``prompt_embeddings`` (class-specific) is dropped,
as the official loader does.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from alignednorm.errors import CheckpointError
from alignednorm.methods.base import Method

# (official name pattern, our name) — applied in order, first match wins.
_RULES = [
    (r"representation_learner\.compound_rep_tokens$", "rep_tokens"),
    (r"representation_learner\.srra_r2vproj\.weight$", "vision_aligner.weight"),
    (r"representation_learner\.srra_r2tproj\.weight$", "text_aligner.weight"),
    (r"representation_learner\.srra_r2vproj\.srra\.(\d+)\.(A|B|bias)$", r"vision_aligner.\2.\1"),
    (r"representation_learner\.srra_r2tproj\.srra\.(\d+)\.(A|B|bias)$", r"text_aligner.\2.\1"),
    (r"representation_learner\.compound_rep_tokens_r2vproj\.(\d+)\.(weight|bias)$", r"vision_aligner.layers.\1.\2"),
    (r"representation_learner\.compound_rep_tokens_r2tproj\.(\d+)\.(weight|bias)$", r"text_aligner.layers.\1.\2"),
    (r"image_encoder\.A$", "proj_A"),
    (r"image_encoder\.B$", "proj_B"),
    (r"image_encoder\.proj_rep$", "proj_rep"),
]


def official_to_ours(name: str) -> str | None:
    """Our parameter name for an official learnable tensor, or ``None`` for frozen / unknown ones."""
    name = name.removeprefix("module.")
    for pattern, target in _RULES:
        if re.match(pattern, name):
            return re.sub(pattern, target, name)
    return None


# (our name pattern, official name) — the inverse of _RULES.
_REVERSE = [
    (r"rep_tokens$", "representation_learner.compound_rep_tokens"),
    (r"vision_aligner\.weight$", "representation_learner.srra_r2vproj.weight"),
    (r"text_aligner\.weight$", "representation_learner.srra_r2tproj.weight"),
    (r"vision_aligner\.(A|B|bias)\.(\d+)$", r"representation_learner.srra_r2vproj.srra.\2.\1"),
    (r"text_aligner\.(A|B|bias)\.(\d+)$", r"representation_learner.srra_r2tproj.srra.\2.\1"),
    (r"vision_aligner\.layers\.(\d+)\.(weight|bias)$", r"representation_learner.compound_rep_tokens_r2vproj.\1.\2"),
    (r"text_aligner\.layers\.(\d+)\.(weight|bias)$", r"representation_learner.compound_rep_tokens_r2tproj.\1.\2"),
    (r"proj_A$", "image_encoder.A"),
    (r"proj_B$", "image_encoder.B"),
    (r"proj_rep$", "image_encoder.proj_rep"),
]


def ours_to_official(name: str, official_names: list[str] | None = None) -> str | None:
    """The official name of one of our learnable tensors (``None`` if it has none)."""
    for pattern, target in _REVERSE:
        if re.match(pattern, name):
            official = re.sub(pattern, target, name)
            return official if official_names is None or official in official_names else None
    return None


def to_official_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our learnable tensors under the official code's names (for its ``load_model``)."""
    return {ours_to_official(k) or k: v for k, v in state.items()}


# Deep prompt methods (MaPLe, PromptSRC): official name pattern -> our name; block indices shift
# (official ``compound_prompts_text[i]`` / ``resblocks.{i}.VPT_shallow`` -> our 1-based block number).
_DEEP_RULES: dict[str, list[tuple[str, object]]] = {
    "maple": [
        (r"prompt_learner\.ctx$", lambda m: "text_prompts.1"),
        (r"prompt_learner\.compound_prompts_text\.(\d+)$", lambda m: f"text_prompts.{int(m[1]) + 2}"),
        (r"prompt_learner\.proj\.(weight|bias)$", lambda m: f"couplings.1.{m[1]}"),
        (r"prompt_learner\.compound_prompt_projections\.(\d+)\.(weight|bias)$",
         lambda m: f"couplings.{int(m[1]) + 2}.{m[2]}"),
    ],
    "promptsrc": [
        (r"prompt_learner\.ctx$", lambda m: "text_prompts.1"),
        (r"image_encoder\.VPT$", lambda m: "vision_prompts.1"),
        (r"text_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow$", lambda m: f"text_prompts.{int(m[1]) + 1}"),
        (r"image_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow$", lambda m: f"vision_prompts.{int(m[1]) + 1}"),
    ],
}


# CoOp and Nemesis (KaiyangZhou/CoOp, ShyFoo/Nemesis): only the context learns. Dassl saves the prompt
# learner alone (``prompt_learner/model.pth.tar-N``, keys ``ctx``, ``token_prefix``, ``token_suffix``);
# a whole-model state dict names it ``prompt_learner.ctx``. The token buffers are dropped (rebuilt from
# the current class names, as the official loader does).
_COOP_RULES: list[tuple[str, object]] = [(r"(?:prompt_learner\.)?ctx$", lambda m: "context.ctx")]
_DEEP_RULES.update(coop=_COOP_RULES, nemesis=_COOP_RULES)
# CoCoOp (KaiyangZhou/CoOp ``trainers/cocoop.py``): the context plus the meta-net ``linear1``/``linear2``,
# our ``meta_net.0`` / ``meta_net.2`` (a ReLU sits between them).
_DEEP_RULES["cocoop"] = _COOP_RULES + [
    (r"(?:prompt_learner\.)?meta_net\.linear([12])\.(weight|bias)$", lambda m: f"meta_net.{2 * int(m[1]) - 2}.{m[2]}"),
]

# HiCroPL (zzeoZheng/HiCroPL): prompts and cross-tower nets of ``prompt_learner`` (``ctx`` is
# ``cross_prompts_text.0``). Visual proxies are numbered from layer k + 1 in the official lists; their
# names get a ``+`` mark here and the layer once k (the number of text proxies) is known.
_DEEP_RULES["hicropl"] = [
    (r"prompt_learner\.ctx$", lambda m: "text_prompts.1"),
    (r"prompt_learner\.cross_prompts_text\.(\d+)$", lambda m: f"text_prompts.{int(m[1]) + 1}"),
    (r"prompt_learner\.cross_prompts_visual\.(\d+)$", lambda m: f"vision_prompts.{int(m[1]) + 1}"),
    (r"prompt_learner\.text2visual_net\.(.+)$", lambda m: f"cross.text_to_vision.{m[1]}"),
    (r"prompt_learner\.visual2text_net\.(.+)$", lambda m: f"cross.vision_to_text.{m[1]}"),
    (r"prompt_learner\.attn_pooling_text_nets\.(\d+)\.(.+)$", lambda m: f"cross.text_proxies.{int(m[1]) + 1}.{m[2]}"),
    (r"prompt_learner\.text_proxy_token\.(\d+)$", lambda m: f"cross.text_proxies.{int(m[1]) + 1}.query"),
    (r"prompt_learner\.attn_pooling_visual_nets\.(\d+)\.(.+)$", lambda m: f"cross.vision_proxies.+{m[1]}.{m[2]}"),
    (r"prompt_learner\.visual_proxy_token\.(\d+)$", lambda m: f"cross.vision_proxies.+{m[1]}.query"),
]


def _hicropl_layers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Number HiCroPL's visual proxies by layer: official index j is layer k + 1 + j."""
    k = len({n.split(".")[2] for n in state if n.startswith("cross.text_proxies.")})
    return {re.sub(r"\.\+(\d+)\.", lambda m: f".{k + 1 + int(m[1])}.", n): t for n, t in state.items()}


def deep_official_to_ours(method: str, name: str) -> str | None:
    """Our name for an official MaPLe / PromptSRC / CoOp / Nemesis learnable tensor (``None`` for frozen ones)."""
    name = name.removeprefix("module.")
    for pattern, target in _DEEP_RULES[method]:
        match = re.match(pattern, name)
        if match:
            return target(match)
    return None


def convert_official_state(state: dict[str, torch.Tensor], method: str | None = None) -> dict[str, torch.Tensor]:
    """Keep the learned tensors of an official state dict, under our names.

    ``method`` picks the naming of a prompt method (``maple``, ``promptsrc``, ``coop``, ``nemesis``,
    ``hicropl``); otherwise the MMRL / MMRL++ / AlignedNorm names are read.
    """
    convert = (lambda n: deep_official_to_ours(method, n)) if method in _DEEP_RULES else official_to_ours
    out = {}
    for name, tensor in state.items():
        ours = convert(name)
        if ours is not None:
            out[ours] = tensor
    if method == "hicropl":
        out = _hicropl_layers(out)
    if not out:
        expected = ("'prompt_learner.ctx'" if method in _DEEP_RULES
                    else "'representation_learner.compound_rep_tokens'")
        raise CheckpointError(f"no {method or 'MMRL/MMRL++/AlignedNorm'} learnable tensors found "
                              f"(expected names such as {expected})")
    return out


def read_official_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a Dassl ``model.pth.tar-N`` (or a bare state dict / safetensors) of the official code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"official checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable Dassl checkpoint ({type(exc).__name__}: {exc})") from exc
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict with a 'state_dict' entry (Dassl's save_checkpoint format)")
    return state


def import_official(method: Method, path: str | Path) -> None:
    """Load learned values from an official checkpoint into ``method`` (strict on what it needs)."""
    state = convert_official_state(read_official_checkpoint(path), method.name if method.name in _DEEP_RULES else None)
    method.load_learnable_state_dict(state, source=str(path))
