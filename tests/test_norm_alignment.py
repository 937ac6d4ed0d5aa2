"""AlignedNorm's losses against hand-computed values, and stop-gradient on the class side."""

import pytest
import torch

from alignednorm.backbone.clip import ClipBackbone
from alignednorm.backbone.tiny import make_tiny_clip
from alignednorm.losses.norm_alignment import gap_loss, proj_alignment, token_alignment
from alignednorm.methods import create_method


def test_proj_alignment_by_hand():
    z_p = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # norms 5, 1
    z_c = torch.tensor([[6.0, 8.0], [0.0, 3.0]])  # norms 10, 3
    assert proj_alignment(z_p, z_c).item() == pytest.approx((5 + 2) / 2)
    assert proj_alignment(z_p, z_c, "ring").item() == pytest.approx((25 / 2 + 4 / 2) / 2)
    assert proj_alignment(z_p, z_c, "smooth_l1").item() == pytest.approx((4.5 + 1.5) / 2)
    assert proj_alignment(z_p, z_c, "hinge", margin=3.0).item() == pytest.approx((2 + 0) / 2)


def test_token_alignment_code_and_paper_forms_by_hand():
    # One layer, batch 2, two prompt tokens, width 2.
    cls = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]])  # norms 5, 1 -> batch mean 3
    rep = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]], [[3.0, 0.0], [0.0, 4.0]]]])  # token norms b0: 1,2  b1: 3,4
    # code: token means over batch = (2, 3); |2-3| and |3-3| -> mean 0.5
    assert token_alignment(cls, rep, "code").item() == pytest.approx(0.5)
    # paper: per image ‖mean token‖: b0 ‖(0.5, 1)‖ = 1.1180, b1 ‖(1.5, 2)‖ = 2.5; gaps |1.118-5|, |2.5-1|
    expected = (abs(1.25**0.5 - 5) + abs(2.5 - 1)) / 2
    assert token_alignment(cls, rep, "paper").item() == pytest.approx(expected)
    assert token_alignment(cls, rep, "code").item() != pytest.approx(token_alignment(cls, rep, "paper").item())


def test_forms_differ_on_fixture_scale(shared_dir):
    from safetensors.torch import load_file

    out = load_file(str(shared_dir / "reference" / "alignednorm_a" / "outputs.safetensors"))
    cls, rep = out["vision.cls_hidden"], out["vision.rep_hidden"]
    assert token_alignment(cls, rep, "code").item() == pytest.approx(7.7277, abs=1e-3)
    assert token_alignment(cls, rep, "paper").item() == pytest.approx(54.35, abs=0.01)


def test_stop_gradient_on_class_side():
    z_c = torch.randn(3, 4, requires_grad=True)
    z_p = torch.randn(3, 4, requires_grad=True)
    proj_alignment(z_p, z_c).backward()
    assert z_c.grad is None and z_p.grad is not None
    cls = torch.randn(2, 3, 4, requires_grad=True)
    rep = torch.randn(2, 3, 2, 4, requires_grad=True)
    for form in ("code", "paper"):
        token_alignment(cls, rep, form).backward()
        assert cls.grad is None and rep.grad.abs().sum() > 0


def test_alignment_adds_no_gradient_to_text_side_or_class_path():
    backbone = ClipBackbone(make_tiny_clip(seed=2, layers=3))
    cfg = {"rep_layers": [2, 3], "n_rep_tokens": 2, "rep_dim": 16, "proj_lora_dim": 4, "res_lora_dim": 2}
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 0])
    grads = {}
    for weights in ((0.0, 0.0), (0.5, 0.7)):
        torch.manual_seed(0)
        method = create_method("alignednorm", backbone, {**cfg, "proj_align_weight": weights[0],
                                                          "token_align_weight": weights[1]})
        method.set_classnames(["a", "b"])
        method.train()
        method.training_step((images, labels))["loss"].backward()
        grads[weights] = {n: p.grad.clone() for n, p in method.named_parameters() if p.requires_grad}
    off, on = grads[(0.0, 0.0)], grads[(0.5, 0.7)]
    for name in off:
        if name.startswith("text_aligner"):
            assert torch.allclose(off[name], on[name], atol=1e-7), name
    assert not torch.allclose(off["vision_aligner.weight"], on["vision_aligner.weight"])
    assert gap_loss(torch.tensor([2.0]), torch.tensor([1.0])).item() == 1.0
