"""The generic trainer: precision modes, gradient accumulation, resume bookkeeping."""

import pytest
import torch

from alignednorm.backbone.clip import ClipBackbone
from alignednorm.backbone.tiny import make_tiny_clip
from alignednorm.engine.trainer import TrainConfig, Trainer
from alignednorm.errors import ConfigError
from alignednorm.methods import create_method

CFG = {"rep_layers": [2, 3], "rep_dim": 16, "n_rep_tokens": 2}


@pytest.fixture(scope="module")
def backbone():
    return ClipBackbone(make_tiny_clip(seed=3, layers=3))


def _data(n=8):
    gen = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(n, 3, 32, 32, generator=gen), torch.arange(n) % 2)


def _method(backbone):
    torch.manual_seed(0)
    method = create_method("mmrlpp", backbone, CFG)
    method.set_classnames(["a", "b"])
    return method


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(backbone, precision):
    method = _method(backbone)
    before = method.learnable_state_dict()
    trainer = Trainer(method, TrainConfig(epochs=2, batch_size=2, warmup_epochs=0, precision=precision),
                      progress=False)
    stats = trainer.fit(_data())
    assert torch.isfinite(torch.tensor(stats["loss"]))
    after = method.learnable_state_dict()
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in after.values())  # fp32 master weights
    changed = any(not torch.equal(before[k], after[k]) for k in before)
    # fp16: the loss scaler may skip overflowing steps (and then lowers its scale) instead of corrupting weights.
    assert changed or (precision == "fp16" and trainer.scaler.get_scale() < 2.0**16)


def test_gradient_accumulation_matches_a_large_batch(backbone):
    """MMRL++'s loss is a batch mean, so 2 × 4 accumulated equals one batch of 8 (one step each)."""
    results = []
    for batch_size, accum in ((8, 1), (4, 2)):
        method = _method(backbone)
        cfg = TrainConfig(epochs=1, batch_size=batch_size, grad_accum=accum, warmup_epochs=0, lr=1e-2)
        trainer = Trainer(method, cfg, progress=False)
        dataset = _data()
        # Same sample order for both: an unshuffled loader replaces the seeded sampler.
        trainer._loader = lambda ds, epoch, bs=batch_size: torch.utils.data.DataLoader(ds, batch_size=bs)
        # SGD: the step is proportional to the gradient (Adam's first step is ~sign(g), too sensitive).
        trainer.optimizer = torch.optim.SGD(method.learnable_parameters(), lr=1e-2)
        trainer.fit(dataset)
        assert trainer.global_step == 1
        results.append(method.learnable_state_dict())
    for key in results[0]:
        assert torch.allclose(results[0][key], results[1][key], atol=1e-6), key


def test_bad_train_config_values():
    with pytest.raises(ConfigError, match="train.precision = 'fp8'"):
        TrainConfig(precision="fp8")
    with pytest.raises(ConfigError, match="train.batch_size = 0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="train.lr = -0.1"):
        TrainConfig(lr=-0.1)
