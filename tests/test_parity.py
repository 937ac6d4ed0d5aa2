"""Parity with the official code on every fixture in shared/reference whose method has a parity module."""

import json
import subprocess
import sys

import pytest
from conftest import SHARED

from alignednorm.compat.parity import SECTIONS, run_parity

ALL_FIXTURES = sorted(p.parent for p in (SHARED / "reference").glob("*/manifest.json")) if SHARED.is_dir() else []


def _supported(fixture) -> bool:
    """Fixtures whose official config section has a parity module (``parity.SECTIONS``)."""
    return any(section in json.loads((fixture / "manifest.json").read_text())["config"] for section in SECTIONS)


FIXTURES = [f for f in ALL_FIXTURES if _supported(f)]


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f.name for f in FIXTURES])
def test_fixture_parity(fixture):
    report = run_parity(fixture)
    assert report["failed"] == []
    assert report["ok"]
    # Every tensor the fixture holds was compared.
    with open(fixture / "manifest.json") as handle:
        manifest = json.load(handle)
    assert report["num_compared"] >= len(manifest["tensors"]["outputs.safetensors"])


def test_parity_command_exit_status(shared_dir):
    fixture = shared_dir / "reference" / "alignednorm_a"
    proc = subprocess.run([sys.executable, "-m", "alignednorm.compat.parity", str(fixture)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["method"] == "alignednorm"
    assert report["tensors"]["loss.l_token"]["max_abs_diff"] < 5e-5


def test_fixture_list_is_not_empty(shared_dir):
    assert {f.name for f in FIXTURES} >= {"mmrlpp_a", "alignednorm_a", "nemesis_pun_a", "nemesis_pan_a"}


@pytest.mark.parametrize("source", ["mmrlpp_a", "alignednorm_a"])
def test_parity_reads_every_setting_from_the_manifest(source, shared_dir, tmp_path):
    """A fixture with other settings (as the held-back ones have) goes through the same code.

    Its outputs are our own, so this checks that nothing is tied to fixture A's numbers of
    classes, tokens, layers, batch or embedding width, not the official code's values.
    """
    import torch
    from safetensors.torch import load_file, save_file

    from alignednorm.backbone.clip import ClipBackbone
    from alignednorm.backbone.tiny import make_tiny_clip, save_openai_state_dict
    from alignednorm.compat.official import to_official_state
    from alignednorm.compat.parity import compute_outputs, method_from_manifest
    from alignednorm.methods import create_method

    manifest = json.loads((shared_dir / "reference" / source / "manifest.json").read_text())
    section = next(k for k in manifest["config"] if k.startswith("TRAINER."))
    manifest["config"][section].update(REP_LAYERS=[8, 9, 10, 11, 12], N_REP_TOKENS=3, BETA=0.6, ALPHA=0.6)
    if "SEQ_NORM" in manifest["config"][section]:
        manifest["config"][section].update(SEQ_NORM=0.05, FINAL_NORM=0.2)
    manifest["class_names_base"] = [f"shape number {i}" for i in range(9)]
    manifest["class_names_new"] = [f"new thing {i}" for i in range(5)]
    manifest["template"] = "a drawing of a {}."
    fixture = tmp_path / "variant"
    fixture.mkdir()
    (fixture / "manifest.json").write_text(json.dumps(manifest))
    save_openai_state_dict(make_tiny_clip(seed=11, layers=12, embed_dim=48), fixture / "clip_tiny.safetensors")

    name, config, _ = method_from_manifest(manifest)
    method = create_method(name, ClipBackbone.from_file(fixture / "clip_tiny.safetensors"), config)
    with torch.no_grad():  # perturbed low-rank factors and shifted biases, as in the held-back fixtures
        for key, param in method.named_parameters():
            if param.requires_grad and (".B." in key or key == "proj_B" or ".bias." in key):
                param.add_(0.05 * torch.randn_like(param))
    save_file({k: v.contiguous() for k, v in to_official_state(method.learnable_state_dict()).items()},
              str(fixture / "learnable.safetensors"))
    backbone = method.backbone
    save_file({"images": torch.randn(3, 3, 32, 32), "labels": torch.tensor([8, 0, 3]),
               "tokenized_prompts": backbone.tokenize(
                   [manifest["template"].format(c) for c in manifest["class_names_base"]]),
               "tokenized_prompts_new": backbone.tokenize(
                   [manifest["template"].format(c) for c in manifest["class_names_new"]])},
              str(fixture / "inputs.safetensors"))
    reference_keys = load_file(str(shared_dir / "reference" / source / "outputs.safetensors")).keys()
    ours = compute_outputs(fixture, manifest)
    names = {k.split(".", 1)[1] for k in reference_keys if k.startswith("grad.")}
    missing = [k for k in reference_keys if k not in ours and not k.startswith(("grad.", "after_step."))]
    assert missing == []
    save_file({k: ours[k].detach().clone().contiguous() for k in ours if not k.startswith("tokens.")},
              str(fixture / "outputs.safetensors"))
    report = run_parity(fixture)
    assert report["ok"] and report["failed"] == []
    assert report["tensors"]["vision.block_out.08"]["max_abs_diff"] == 0.0
    assert ours["vision.rep_hidden"].shape == (5, 3, 3, 64) and ours["train.z_p"].shape == (3, 48)
    assert ours["eval_new.output"].shape == (3, 5) and len(names) > 0
    grads = [k for k in ours if k.startswith("grad.")]
    assert len(grads) == len(method.learnable_state_dict()) and any(ours[k].abs().sum() > 0 for k in grads if ".A" in k)


def test_coupling_gradient_rule_holds_and_rejects_a_real_error(shared_dir):
    """MaPLe's coupling weights and biases: their gradients pass through the float16-rounded prompt copies,
    so they are compared within the interval those roundings allow; a 1% error of one entry is still caught."""
    from safetensors.torch import load_file

    from alignednorm.compat import parity_deep
    from alignednorm.compat.parity import fixture_threads, read_manifest, tolerances
    from alignednorm.compat.rounded_copies import compare_within_bounds

    fixture, manifest = read_manifest(shared_dir / "reference" / "maple_a")
    with fixture_threads(manifest):
        ours = parity_deep.compute_outputs(fixture, manifest)
    reference, tol = load_file(str(fixture / "outputs.safetensors")), tolerances(manifest)
    bounded = sorted(k.removeprefix("bounds.") for k in ours if k.startswith("bounds."))
    assert {"prompt_learner.proj.weight", "prompt_learner.proj.bias"} <= set(bounded)
    for name in bounded:
        ref, bounds = reference[f"grad.{name}"], ours[f"bounds.{name}"]
        assert compare_within_bounds(ours[f"grad.{name}"], ref, bounds, tol)["ok"], name
        wrong = ref.clone()
        wrong.view(-1)[ref.abs().argmax()] *= 1.01
        assert not compare_within_bounds(ours[f"grad.{name}"], wrong, bounds, tol)["ok"], name
