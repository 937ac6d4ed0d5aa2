"""PromptSRC: GPA weights and averaging, the self-regularisation terms, the teacher, official names."""

import json
import math
import re

import numpy as np
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import save_file

from alignednorm.backbone.clip import ClipBackbone
from alignednorm.backbone.tiny import make_tiny_clip, save_openai_state_dict
from alignednorm.compat.official import convert_official_state
from alignednorm.errors import ConfigError
from alignednorm.losses.self_regularization import mutual_agreement, template_mean_text_features
from alignednorm.methods import StepState, create_method
from alignednorm.prompts.deep import gaussian_epoch_weights

FITS = {"text_depth": 4, "vision_depth": 4}  # the official depth 9, within this 4-layer CLIP


@pytest.fixture(scope="module")
def backbone():
    return ClipBackbone(make_tiny_clip(seed=2, layers=4))


def test_gaussian_weights_over_epochs():
    w = gaussian_epoch_weights(mean=2, std=1, epochs=3)
    e = math.exp(-0.5)
    assert np.allclose(w, [e / (1 + 2 * e), 1 / (1 + 2 * e), e / (1 + 2 * e)])
    official = gaussian_epoch_weights(15, 1, 20)  # promptsrc_a's manifest values
    assert (official[0] == pytest.approx(1.0966065601943704e-43, rel=1e-9)
            and official[14] == pytest.approx(0.3989422807))


def test_gpa_averages_the_prompts_and_survives_a_resume(backbone):
    method = create_method("promptsrc", backbone, {"gpa_mean": 2.0, "gpa_std": 1.0, **FITS})
    w = gaussian_epoch_weights(2, 1, 3)
    values = []
    for epoch in range(3):
        with torch.no_grad():
            for p in method.learnable_parameters():
                p.fill_(float(epoch + 1))
        values.append(float(epoch + 1))
        if epoch == 1:  # resume from a checkpoint taken after epoch 1 into a fresh method
            saved = method.learnable_state_dict()
            assert any(k.startswith("gpa_sum.") for k in saved)
            method = create_method("promptsrc", backbone, {"gpa_mean": 2.0, "gpa_std": 1.0, **FITS})
            method.load_learnable_state_dict(saved)
        method.on_epoch_end(StepState(epoch=epoch, max_epochs=3))
    expected = float(np.dot(w, values))
    assert all(torch.allclose(p, torch.full_like(p, expected)) for p in method.learnable_parameters())
    assert not any(k.startswith("gpa_sum.") for k in method.learnable_state_dict())


def test_self_regularisation_terms_by_hand():
    text, frozen_text = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    image, frozen_image = torch.tensor([[0.6, 0.8]]), torch.tensor([[0.6, 0.4]])
    logits, teacher = torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]])
    terms = mutual_agreement(text, frozen_text, image, frozen_image, logits, teacher, 25.0, 10.0)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # Σ p_t (log p_t − log p), p_t = (3/4, 1/4), p = (1/2, 1/2)
    assert terms["l1_text"].item() == pytest.approx(1.0)
    assert terms["l1_image"].item() == pytest.approx(0.2)
    assert terms["kl_sum"].item() == pytest.approx(kl, rel=1e-6)
    assert terms["scl_logits"].item() == pytest.approx(kl / 2, rel=1e-6)  # divided by B·C, not B
    assert terms["scl"].item() == pytest.approx(25.0 + 2.0 + kl / 2, rel=1e-6)


def test_teacher_averages_unnormalised_features_over_templates(backbone):
    templates = ("a photo of a {}.", "a drawing of the {}.")
    mean, per_template = template_mean_text_features(backbone, ["red_circle", "dog"], templates)
    second = backbone.encode_text(backbone.tokenize(["a drawing of the red circle.", "a drawing of the dog."])).features
    assert torch.allclose(per_template[1], second) and torch.allclose(mean, per_template.mean(0))
    method = create_method("promptsrc", backbone, {"teacher_templates": "label_space", **FITS})
    method.set_classnames(["red_circle", "dog"], list(templates))
    assert torch.allclose(method.teacher_text_features(), mean)
    assert len(method.teacher_templates()) == 2
    default = create_method("promptsrc", backbone, FITS)
    default.set_classnames(["a"])
    assert len(default.teacher_templates()) == 60  # the official ImageNet set, whatever the dataset's template
    with pytest.raises(ConfigError, match="teacher_templates = 'cifar'"):
        create_method("promptsrc", backbone, {"teacher_templates": "cifar", **FITS})


def test_loss_is_ce_plus_scl_and_zero_shot_logits_round_the_classifier(backbone):
    method = create_method("promptsrc", backbone, {"official_fp16_rounding": True, "teacher_templates": "label_space",
                                                **FITS})
    method.set_classnames(["cat", "dog", "bird"])
    method.train()
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    terms, _, teacher = method.compute_terms(images, labels)
    assert torch.equal(terms["loss"], terms["ce"] + terms["scl"])
    classifier = teacher["frozen_text"].half().float()
    expected = method.logit_scale * teacher["frozen_image"] @ classifier.t()
    assert torch.allclose(teacher["zero_shot_logits"], expected, atol=1e-6)


def test_prompts_only_for_blocks_that_exist(backbone):
    with pytest.raises(ConfigError, match="PromptSRC.Config.text_depth = 9: the backbone has 4 blocks"):
        create_method("promptsrc", backbone, {"text_depth": 9, "vision_depth": 2})
    # As the official IVLP blocks, on request (parity fixtures on shallow CLIPs): every block there is.
    method = create_method("promptsrc", backbone, {"text_depth": 9, "vision_depth": 2, "unused_prompt_blocks": True})
    assert len(method.text_prompts) == 4 and sorted(method.vision_prompts.keys()) == ["1", "2"]
    assert sum(p.numel() for p in method.learnable_parameters()) == 4 * 4 * 64 + 2 * 4 * 64


def test_official_names(backbone):
    method = create_method("promptsrc", backbone, {"text_depth": 3, "vision_depth": 2})
    official = {"prompt_learner.ctx": torch.zeros(4, 64), "image_encoder.VPT": torch.zeros(4, 64),
                "image_encoder.transformer.resblocks.1.VPT_shallow": torch.ones(4, 64),
                "text_encoder.transformer.resblocks.1.VPT_shallow": torch.zeros(4, 64),
                "text_encoder.transformer.resblocks.2.VPT_shallow": 2 * torch.ones(4, 64),
                "image_encoder.proj": torch.zeros(64, 32), "prompt_learner.token_suffix": torch.zeros(1)}
    state = convert_official_state(official, "promptsrc")
    method.load_learnable_state_dict(state)
    assert method.text_prompts["3"].eq(2).all() and method.vision_prompts["2"].eq(1).all()


# ---------------------------------------------------------------- held-back-like variants
def _official_name(method: str, ours: str) -> str:
    block = int(re.search(r"\.(\d+)", ours)[1])
    if method == "maple":
        if ours.startswith("text_prompts."):
            return "prompt_learner.ctx" if block == 1 else f"prompt_learner.compound_prompts_text.{block - 2}"
        kind = ours.rsplit(".", 1)[1]
        return f"prompt_learner.proj.{kind}" if block == 1 else \
            f"prompt_learner.compound_prompt_projections.{block - 2}.{kind}"
    tower = "text_encoder" if ours.startswith("text_") else "image_encoder"
    if block == 1:
        return "prompt_learner.ctx" if tower == "text_encoder" else "image_encoder.VPT"
    return f"{tower}.transformer.resblocks.{block - 1}.VPT_shallow"


@pytest.mark.parametrize("source", ["maple_a", "promptsrc_a"])
def test_parity_reads_every_setting_from_the_manifest(source, shared_dir, tmp_path):
    """A fixture with the held-back fixtures' kind of settings goes through the same code.

    Its outputs are our own, so this checks that nothing is tied to fixture A's widths, heads,
    depth, context, classes or batch, not the official values.
    """
    from alignednorm.compat.parity_deep import compute_outputs, method_from_manifest, run_parity

    manifest = json.loads((shared_dir / "reference" / source / "manifest.json").read_text())
    section = next(k for k in manifest["config"] if k.startswith("TRAINER."))
    if source == "maple_a":
        manifest["config"][section].update(N_CTX=3, CTX_INIT="a small photo of the", PROMPT_DEPTH=3)
    else:
        manifest["config"][section].update(N_CTX_TEXT=3, N_CTX_VISION=2, CTX_INIT="a small photo of the",
                                           PROMPT_DEPTH_TEXT=3, PROMPT_DEPTH_VISION=3, TEXT_LOSS_WEIGHT=12,
                                           IMAGE_LOSS_WEIGHT=4, GPA_MEAN=6, GPA_STD=10)
        manifest["teacher_templates"] = manifest["teacher_templates"][:3]
    manifest["config"]["OPTIM"]["MAX_EPOCH"] = 2
    manifest["class_names_base"] = [f"shape_number {i}" for i in range(9)]
    manifest["class_names_new"] = [f"new thing {i}" for i in range(5)]
    fixture = tmp_path / "variant"
    fixture.mkdir()
    (fixture / "manifest.json").write_text(json.dumps(manifest))
    torch.manual_seed(3)
    clip = CLIP(48, CLIPVisionCfg(layers=5, width=192, patch_size=8, image_size=32, head_width=64),
                CLIPTextCfg(context_length=77, width=64, heads=1, layers=5), quick_gelu=True)
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(50))
    save_openai_state_dict(clip, fixture / "clip_tiny.safetensors")
    name, config = method_from_manifest(manifest)
    backbone = ClipBackbone.from_file(fixture / "clip_tiny.safetensors")
    method = create_method(name, backbone, config)
    with torch.no_grad():  # deep couplings perturbed away from their identical start, as held back
        for p in method.learnable_parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_file({_official_name(name, k): v.contiguous() for k, v in method.learnable_state_dict().items()},
              str(fixture / "learnable.safetensors"))
    prefix = manifest["config"][section]["CTX_INIT"]
    tokens = {half: backbone.tokenize([f"{prefix} {c.replace('_', ' ')}." for c in manifest[f"class_names_{half}"]])
              for half in ("base", "new")}
    inputs = {"images": torch.randn(3, 3, 32, 32), "labels": torch.tensor([8, 0, 3]),
              "tokenized_prompts": tokens["base"], "tokenized_prompts_new": tokens["new"]}
    save_file(inputs, str(fixture / "inputs.safetensors"))
    ours = compute_outputs(fixture, manifest)
    save_file({k: v.detach().clone().contiguous() for k, v in ours.items() if not k.startswith("tokens.")},
              str(fixture / "outputs.safetensors"))
    report = run_parity(fixture)
    assert report["ok"] and report["failed"] == []
    assert ours["vision.block_out.05"].shape == (3, 1 + 16 + (3 if name == "maple" else 2), 192)
    assert ours["eval_new.logits"].shape == (3, 5) and ours["train.logits"].shape == (3, 9)
    if name == "promptsrc":  # the last epoch loads the Gaussian average into the prompts
        w = gaussian_epoch_weights(6, 10, 2)
        after1, after2 = ours["after_step.prompt_learner.ctx"], ours["step2.after_step.prompt_learner.ctx"]
        assert torch.allclose(ours["gpa.after_step2.prompt_learner.ctx"], w[0] * after1 + w[1] * after2, atol=1e-6)
