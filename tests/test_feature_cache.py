"""Frozen image features cached on disk: the same numbers, reused only for exactly the same inputs."""

import json

import pytest
import torch
from conftest import write_image
from typer.testing import CliRunner

from alignednorm.backbone.clip import ClipBackbone
from alignednorm.backbone.tiny import make_tiny_clip, save_openai_state_dict
from alignednorm.cli import app
from alignednorm.config import DataConfig
from alignednorm.data.coop_layout import load_splits
from alignednorm.methods import create_method
from alignednorm.protocols.data import evaluate_split


@pytest.fixture
def backbone(tmp_path):
    clip = save_openai_state_dict(make_tiny_clip(seed=2, layers=2), tmp_path / "clip.pt")
    return ClipBackbone.from_file(clip)


def _evaluate(method, json_dataset, cache):
    split = load_splits(json_dataset.spec, json_dataset.root)
    return evaluate_split(method, split, "oxford_pets", "any", DataConfig(eval_batch_size=3), progress=False,
                          feature_cache=cache)


def _same_numbers(a: dict, b: dict) -> bool:
    keys = ("accuracy", "num_samples", "per_class_accuracy", "macro_accuracy", "skipped_images")
    return all(a[k] == b[k] for k in keys)


def test_zero_shot_features_are_computed_once_and_reused(backbone, json_dataset, tmp_path, monkeypatch):
    method = create_method("zeroshot", backbone)
    plain = _evaluate(method, json_dataset, None)
    cache = tmp_path / "cache"
    first = _evaluate(method, json_dataset, cache)
    assert first["image_features"] == "computed and cached" and first["seconds_per_batch"] > 0
    assert len(list(cache.glob("*.safetensors"))) == 1
    with monkeypatch.context() as patch:  # the reuse must not run the image tower
        patch.setattr(backbone, "encode_image", lambda *a, **k: pytest.fail("image tower ran on a cache hit"))
        again = _evaluate(method, json_dataset, cache)
    assert again["image_features"] == "reused from cache" and again["seconds_per_batch"] is None
    assert _same_numbers(plain, first) and _same_numbers(plain, again)


def test_a_changed_image_or_backbone_is_never_read_from_the_cache(backbone, json_dataset, tmp_path):
    cache = tmp_path / "cache"
    _evaluate(create_method("zeroshot", backbone), json_dataset, cache)
    write_image(json_dataset.image_dir / json_dataset.split["test"][0][0], shade=250)  # same path, new pixels
    changed = _evaluate(create_method("zeroshot", backbone), json_dataset, cache)
    assert changed["image_features"] == "computed and cached"
    other = ClipBackbone.from_file(save_openai_state_dict(make_tiny_clip(seed=9, layers=2), tmp_path / "other.pt"))
    assert _evaluate(create_method("zeroshot", other), json_dataset, cache)["image_features"] == "computed and cached"
    assert len(list(cache.glob("*.safetensors"))) == 3


def test_methods_that_prompt_the_image_tower_ignore_the_cache(backbone, json_dataset, tmp_path):
    cache = tmp_path / "cache"
    result = _evaluate(create_method("coop", backbone), json_dataset, cache)
    assert "image_features" not in result and not cache.exists()


def test_linear_probe_classifies_cached_features_like_images(backbone):
    probe = create_method("linear_probe", backbone)
    probe.resize(3)
    with torch.no_grad():
        probe.weight.normal_()
        probe.bias.normal_()
    images = torch.randn(2, 3, 32, 32)
    features = backbone.encode_image(images).features
    assert torch.allclose(probe.logits_from_image_features(features), probe(images).logits)


def test_protocol_evaluations_share_the_cache(json_dataset, tmp_path):
    clip = save_openai_state_dict(make_tiny_clip(seed=2, layers=2), tmp_path / "clip.pt")
    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, ["run", "fewshot", "--method", "zeroshot", "--datasets", "oxford_pets",
                                      "--data-root", str(json_dataset.root), "--clip", str(clip), "--seeds", "1",
                                      "--shots", "1,2", "--output", str(runs)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    records = [json.loads(p.read_text()) for p in sorted(runs.glob("fewshot/**/eval/**/metrics.json"))]
    states = sorted(r["eval"][name]["image_features"] for r in records for name in r["eval"])
    assert states == ["computed and cached", "reused from cache"]
    assert len({r["eval"][n]["accuracy"] for r in records for n in r["eval"]}) == 1
