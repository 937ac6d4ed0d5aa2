"""Linear probe: CoOp's C search by hand on separable features, the binary case, and the run path."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from alignednorm.backbone.clip import ClipBackbone
from alignednorm.backbone.tiny import make_tiny_clip, save_openai_state_dict
from alignednorm.cli import app
from alignednorm.errors import ConfigError
from alignednorm.methods import create_method


@pytest.fixture(scope="module")
def backbone():
    return ClipBackbone(make_tiny_clip(seed=5, layers=2))


def test_fit_copies_sklearn_and_searches_c_on_val(backbone, monkeypatch):
    from sklearn.linear_model import LogisticRegression

    probe = create_method("linear_probe", backbone, {"search_steps": 2})
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 32)) * 3
    x = np.concatenate([centers[k] + rng.normal(size=(6, 32)) for k in range(3)])
    y = np.repeat(np.arange(3), 6)
    monkeypatch.setattr(probe, "features", lambda loader: (x, y) if loader == "train" else (x[::2], y[::2]))
    stats = probe.fit("train", "val")
    assert stats["val_accuracy"] == 100.0 and stats["C"] > 0
    reference = LogisticRegression(solver="lbfgs", max_iter=1000, C=stats["C"]).fit(x, y)
    assert np.allclose(probe.weight.detach().numpy(), reference.coef_, atol=1e-4)
    assert np.allclose(probe.bias.detach().numpy(), reference.intercept_, atol=1e-4)
    with pytest.raises(ConfigError, match="chooses C on the validation split"):
        probe.fit("train", None)


def test_binary_classifier_is_a_two_row_softmax(backbone):
    from sklearn.linear_model import LogisticRegression

    x = np.random.default_rng(1).normal(size=(6, 32))
    model = LogisticRegression().fit(x, [0, 1, 0, 1, 0, 1])
    probe = create_method("linear_probe", backbone)
    probe.set_classifier(model, 2)
    expected = model.predict_proba(x)[:, 1]
    logits = torch.as_tensor(x) @ probe.weight.detach().double().t() + probe.bias.detach().double()
    assert np.allclose(torch.softmax(logits, dim=-1)[:, 1].numpy(), expected, atol=1e-6)


def test_run_path_fits_and_new_classes_are_not_applicable(json_dataset, tmp_path):
    clip = save_openai_state_dict(make_tiny_clip(seed=2, layers=3), tmp_path / "clip.pt")
    args = ["train", "--method", "linear_probe", "--dataset", "oxford_pets", "--data-root", str(json_dataset.root),
            "--clip", str(clip), "--shots", "2", "--output", str(tmp_path / "runs"), "--set", "method.search_steps=1"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "runs").glob("base2new/oxford_pets/shots2/linear_probe/*/seed1")
    train = json.loads((run_dir / "metrics.json").read_text())["train"]
    assert train["C"] > 0 and train["train_images"] == 6  # 2 shots × 3 base classes
    evals = json.loads((run_dir / "eval" / "oxford_pets" / "metrics.json").read_text())["eval"]
    assert 0 <= evals["base"]["accuracy"] <= 100
    assert evals["new"]["accuracy"] is None and "one prompt per class" in evals["new"]["not_applicable"]
