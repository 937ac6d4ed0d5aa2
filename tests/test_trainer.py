"""The generic trainer: precision modes, gradient accumulation, resume bookkeeping."""

import json
import sys
import types

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
        trainer._loader = lambda ds, bs=batch_size: torch.utils.data.DataLoader(ds, batch_size=bs)
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


def test_tensorboard_events_and_jsonl_log(backbone, tmp_path, tensorboard_scalars):
    cfg = TrainConfig(epochs=2, batch_size=2, warmup_epochs=0, log_every=1)
    Trainer(_method(backbone), cfg, run_dir=tmp_path, progress=False).fit(_data())
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    # 4 steps per epoch, each logged at the global step it completes; epoch means at the epoch's last step
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, 9))
    assert [step for step, _ in scalars["epoch mean/loss"]] == [4, 8]
    assert {"train/learning rate", "train/cross-entropy, class-token branch", "epoch/seconds"} <= set(scalars)
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    step_losses = [line["loss"] for line in lines if "loss" in line]
    assert step_losses == pytest.approx([value for _, value in scalars["train/loss"]])


def test_wandb_logging_on_request(backbone, tmp_path, monkeypatch):
    cfg = TrainConfig(epochs=1, batch_size=4, warmup_epochs=0, log_every=1, tensorboard=False, wandb_project="mini")
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ConfigError, match=r"train.wandb_project = 'mini' needs the wandb package"):
        Trainer(_method(backbone), cfg, run_dir=tmp_path / "a", progress=False).fit(_data())

    calls = []

    class Run:  # records what the trainer sends; wandb itself needs an account and the network
        def log(self, scalars, step):
            calls.append(("log", step, scalars))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    Trainer(_method(backbone), cfg, run_dir=tmp_path / "b", progress=False).fit(_data())
    assert calls[0][0] == "init" and calls[0][1]["project"] == "mini" and calls[0][1]["resume"] == "allow"
    assert [c[1] for c in calls if c[0] == "log"] == [1, 2, 2]  # two steps, then epoch 1's means (steps never go back)
    assert "train/loss" in calls[1][2] and calls[-1] == ("finish",)
    assert not (tmp_path / "b" / "tensorboard").exists()


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimizer_is_config_and_matches_torch(backbone, name):
    """One step of each optimiser equals torch's own with the same settings (Dassl's names)."""
    cfg = TrainConfig(epochs=1, batch_size=8, warmup_epochs=0, lr=0.05, optimizer=name, momentum=0.8,
                      weight_decay=1e-3, adam_eps=1e-6)
    method = _method(backbone)
    trainer = Trainer(method, cfg, progress=False)
    trainer._loader = lambda ds: torch.utils.data.DataLoader(ds, batch_size=8)
    reference = _method(backbone)
    torch_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    extra = {"momentum": 0.8} if name == "sgd" else {"eps": 1e-6}
    optimizer = torch_cls(reference.learnable_parameters(), lr=0.05, weight_decay=1e-3, **extra)
    assert type(trainer.optimizer) is torch_cls
    trainer.fit(_data())
    images, labels = _data()[:]
    reference.train()
    reference.training_step((images, labels))["loss"].backward()
    optimizer.step()
    ours, theirs = method.learnable_state_dict(), reference.learnable_state_dict()
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)


def test_precision_auto_and_step_state_hooks(backbone):
    from alignednorm.engine.trainer import resolve_precision

    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert resolve_precision("bf16", torch.device("cuda")) == "bf16"
    method = _method(backbone)
    seen = []
    method.on_epoch_start = lambda state: seen.append(("start", state.epoch, state.max_epochs))
    method.on_epoch_end = lambda state: seen.append(("end", state.epoch, state.max_epochs))
    step = method.training_step
    method.training_step = lambda batch, state: seen.append(("step", state.epoch, state.step)) or step(batch, state)
    Trainer(method, TrainConfig(epochs=2, batch_size=4, warmup_epochs=0), progress=False).fit(_data())
    assert seen == [("start", 0, 2), ("step", 0, 0), ("step", 0, 1), ("end", 0, 2),
                    ("start", 1, 2), ("step", 1, 0), ("step", 1, 1), ("end", 1, 2)]
    with pytest.raises(ConfigError, match="train.optimizer = 'lamb'"):
        TrainConfig(optimizer="lamb")
    with pytest.raises(ConfigError, match="train.lr = inf; expected a finite number"):
        TrainConfig(lr=float("inf"))


def test_best_val_selection_keeps_the_best_epoch(backbone, tmp_path):
    method = _method(backbone)
    states, scores = [], iter([50.0, 80.0, 80.0, 60.0])

    def validate(m):
        states.append(m.learnable_state_dict())
        return next(scores)

    cfg = TrainConfig(epochs=4, batch_size=4, warmup_epochs=0, lr=1e-2, select="best-val")
    stats = Trainer(method, cfg, run_dir=tmp_path, progress=False).fit(_data(), validate=validate)
    assert stats["selected_epoch"] == 2 and stats["val_accuracy"] == 80.0  # a tie keeps the earlier epoch
    assert all(torch.equal(v, states[1][k]) for k, v in method.learnable_state_dict().items())
    assert not all(torch.equal(v, states[3][k]) for k, v in method.learnable_state_dict().items())
    with pytest.raises(ConfigError, match="best-val' needs a validation split"):
        Trainer(_method(backbone), cfg, progress=False).fit(_data())
    with pytest.raises(ConfigError, match="train.select = 'best'"):
        TrainConfig(select="best")


def test_compiled_forward_trains_to_the_eager_numbers(backbone):
    """``train.compile`` (here dynamo with the ``eager`` backend: tracing without code generation)."""
    results = []
    for backend in ("", "eager"):
        method = _method(backbone)
        trainer = Trainer(method, TrainConfig(epochs=1, batch_size=4, warmup_epochs=0, lr=1e-2, compile=backend),
                          progress=False)
        trainer._loader = lambda ds: torch.utils.data.DataLoader(ds, batch_size=4)
        stats = trainer.fit(_data())
        results.append((stats["loss"], method.learnable_state_dict()))
    (loss, eager), (compiled_loss, compiled) = results
    assert abs(loss - compiled_loss) < 1e-5
    assert eager.keys() == compiled.keys()
    assert all(torch.allclose(eager[k], compiled[k], atol=1e-6) for k in eager)
    with pytest.raises(ConfigError, match="train.compile = 'inductr'"):
        TrainConfig(compile="inductr")


@pytest.mark.parametrize("ties, kept", [("first", 1), ("last", 3)])
def test_best_val_ties_follow_the_configured_rule(ties, kept):
    """Dassl keeps the first of tied best epochs (strict >); HiCroPL's bundled Dassl the last (>=)."""
    method = create_method("coop", ClipBackbone(make_tiny_clip(seed=0, layers=2)), {"n_ctx": 2})
    method.set_classnames(["a", "b"])
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    accuracies = iter([50.0, 25.0, 50.0])
    cfg = TrainConfig(epochs=3, batch_size=4, lr=1e-2, warmup_epochs=0, select="best-val", select_ties=ties)
    stats = Trainer(method, cfg, None, progress=False).fit(list(zip(images, labels)), resume=False,
                                                            validate=lambda m: next(accuracies))
    assert stats["selected_epoch"] == kept and stats["val_accuracy"] == 50.0


def test_unknown_tie_rule_is_named():
    with pytest.raises(ConfigError, match="train.select_ties = 'middle'"):
        TrainConfig(select_ties="middle")
