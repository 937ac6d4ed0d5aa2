"""Issue #29, the researcher's front door: packaging, analyze labels and Fig. 3c's traced layers."""

import tomllib
from pathlib import Path

import numpy as np

from alignednorm import data as D
from alignednorm.backbone.clip import ClipBackbone
from alignednorm.backbone.tiny import make_tiny_clip
from alignednorm.methods import create_method

ROOT = Path(__file__).resolve().parents[1]


def test_analysis_dependencies_come_with_the_plain_install():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {dep.split(">")[0].split("=")[0].split("<")[0].strip() for dep in project["dependencies"]}
    assert {"matplotlib", "scikit-learn"} <= names
    assert project["optional-dependencies"]["analysis"] == []  # kept as an alias: old install commands still work


def test_attention_to_prompts_traces_every_prompted_layer(json_dataset):
    """Deep prompts in layers 2..6 of a 6-layer tower: Fig. 3c gets all five, not the last four."""
    from alignednorm.analyze import record_subset
    from alignednorm.config import build, resolve_config

    backbone = ClipBackbone(make_tiny_clip(seed=0, layers=6, width=64))
    cfg = resolve_config("mmrlpp", "base2new", None, None, ["method.rep_layers=[2,3,4,5,6]", "method.rep_dim=16"])
    method = create_method("mmrlpp", backbone, build("mmrlpp", cfg)[0])
    split = D.subsample_classes(D.load_splits("oxford_pets", json_dataset.root), "base")
    record = record_subset(method, split, "oxford_pets", "seen", batch_size=2, progress=False)
    np.testing.assert_array_equal(record.attention["layers"], [2, 3, 4, 5, 6])
    assert np.isfinite(record.attention["cls"]).all() and record.overlays is not None


def test_analyze_labels_custom_variants_by_their_settings(tmp_path):
    import json
    from types import SimpleNamespace

    from alignednorm.analyze import run_label

    run = tmp_path / "base2new" / "dtd" / "shots16" / "coop" / "custom-1234abcd" / "seed2"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"command": "alignednorm train --method coop --set train.epochs=5"}))
    assert run_label(SimpleNamespace(info={"method": "coop"}, run_dir=run)) == "coop [train.epochs=5]/seed2"
    default = tmp_path / "base2new" / "dtd" / "shots16" / "coop" / "default" / "seed1"
    assert run_label(SimpleNamespace(info={"method": "coop"}, run_dir=default)) == "coop/seed1"


def test_tensorboard_gets_readable_tags_validation_per_epoch_and_hparams(tmp_path, caplog):
    """Readable term tags, ``val/accuracy (%)`` each epoch, the config in HPARAMS, one progress line per epoch."""
    import logging

    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    from alignednorm.config import build, resolve_config, to_yaml
    from alignednorm.engine.trainer import TrainConfig, Trainer

    cfg = resolve_config("alignednorm", "base2new", None, None, ["method.rep_layers=[2,3]", "method.rep_dim=16"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))  # as a run folder holds it while training
    method = create_method("alignednorm", ClipBackbone(make_tiny_clip(seed=3, layers=3)), build("alignednorm", cfg)[0])
    method.set_classnames(["a", "b"])
    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.arange(4) % 2)
    accuracies = iter([40.0, 60.0])
    train = TrainConfig(epochs=2, batch_size=2, warmup_epochs=0, log_every=1, select="best-val")
    with caplog.at_level(logging.INFO, logger="alignednorm.progress"):
        Trainer(method, train, run_dir=tmp_path, progress=False).fit(data, validate=lambda m: next(accuracies))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert [e.value for e in events.Scalars("val/accuracy (%)")] == [40.0, 60.0]
    assert "train/L_proj after ln_post x 0.1 (logged only)" in scalars and "epoch mean/loss" in scalars
    assert not any("l_proj_ln_logged" in tag for tag in scalars)
    start = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["method.rep_dim"].number_value == 16 and hparams["method.rep_layers"].string_value == "[2, 3]"
    lines = [r.getMessage() for r in caplog.records if r.name == "alignednorm.progress"]
    assert len(lines) == 2 and "epoch 1/2, loss " in lines[0] and "val 40.00%" in lines[0]
    assert "val 60.00%" in lines[1]
    assert "l_proj_ln_logged" in (tmp_path / "log.jsonl").read_text()  # the file keeps the methods' own names
