"""Pretraining of the tiny CLIP: the shared-positive loss, the image pool and exact resuming."""

from __future__ import annotations

import numpy as np
import torch

from alignednorm.mini.model import MINI_CLIP
from alignednorm.mini.pretrain import ImagePool, PretrainConfig, contrastive_loss, lr_at, train


def _tiny_config() -> PretrainConfig:
    arch = {**MINI_CLIP, "vision_layers": 1, "text_layers": 1, "patch_size": 8}
    return PretrainConfig(steps=4, batch_size=16, pool_per_class=2, refresh_per_step=5, warmup=2, eval_every=1000,
                          eval_per_class=1, checkpoint_every=1000, threads=1, arch=arch)


def test_loss_treats_same_class_images_as_shared_positives():
    text = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    images = text[[0, 0, 1, 2]]  # each image equals its caption
    targets = torch.tensor([0, 0, 1, 2])
    scale = torch.tensor(np.log(100.0))
    assert contrastive_loss(images, text, targets, scale) < contrastive_loss(images, text, targets[[1, 2, 3, 0]], scale)


def test_schedule_warms_up_then_decays():
    cfg = PretrainConfig(steps=100, warmup=10, lr=1e-3)
    assert lr_at(0, cfg) < lr_at(9, cfg) == cfg.lr
    assert lr_at(50, cfg) < cfg.lr and lr_at(99, cfg) < 1e-5


def test_pool_can_be_rebuilt_at_any_step():
    cfg = _tiny_config()
    walked = ImagePool(cfg)
    for step in range(7):
        walked.refresh(step)
    assert np.array_equal(walked.images, ImagePool(cfg, step=7).images)


def test_resume_is_exact(tmp_path):
    cfg = _tiny_config()
    straight, _ = train(cfg, tmp_path / "a")
    train(cfg, tmp_path / "b", until=2)
    resumed, record = train(cfg, tmp_path / "b")
    assert record["step"] == cfg.steps
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
