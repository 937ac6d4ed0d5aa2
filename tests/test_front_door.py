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


# ---------------------------------------------------------------------------------------- the command line
def _cli(*args, expect: int = 0):
    from typer.testing import CliRunner

    from alignednorm.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=expect != 0)
    assert result.exit_code == expect, result.output
    return result


TINY = ["--set", "method.rep_layers=[2,3]", "--set", "method.rep_dim=16", "--set", "train.epochs=2",
        "--set", "train.batch_size=2"]


def test_python_api_train_then_embeddings_logits_and_repr(json_dataset, tmp_path):
    import torch

    import alignednorm
    from alignednorm.backbone.tiny import save_openai_state_dict

    clip = save_openai_state_dict(make_tiny_clip(seed=3, layers=3), tmp_path / "clip.pt")
    model = alignednorm.train("alignednorm", "oxford_pets", data_root=json_dataset.root, clip=clip, shots=2,
                              output=tmp_path / "runs", sets=TINY[1::2], progress=False, device="cpu")
    assert set(model.metrics["oxford_pets"]["eval"]) == {"base", "new"} and not model.metrics["oxford_pets"]["reused"]
    text = repr(model)
    assert text.startswith("Predictor(method='alignednorm', backbone='clip.pt'") and "classes=3 [" in text
    images = torch.randn(2, 3, 32, 32)
    image_features, text_features = model.encode_image(images), model.encode_text(["cat", "dog", "bird"])
    assert image_features.shape == (2, 32) and text_features.shape == (3, 32)
    torch.testing.assert_close(text_features.norm(dim=-1), torch.ones(3))
    logits = model.logits(images, classes=["cat", "dog", "bird"])
    assert logits.shape == (2, 3)
    top = model.predict(images, classes=["cat", "dog", "bird"], topk=1)
    assert [row[0][0] for row in top] == [["cat", "dog", "bird"][i] for i in logits.argmax(-1).tolist()]
    again = alignednorm.train("alignednorm", "oxford_pets", data_root=json_dataset.root, clip=clip, shots=2,
                              output=tmp_path / "runs", sets=TINY[1::2], progress=False, device="cpu")
    assert again.metrics["oxford_pets"]["reused"]
    result = _cli("train", "--method", "alignednorm", "--dataset", "oxford_pets", "--data-root", json_dataset.root,
                  "--clip", clip, "--shots", 2, "--output", tmp_path / "runs", *TINY)
    assert result.output.startswith("reused: ")


def test_predict_json_and_csv_output(json_dataset, tmp_path):
    import csv
    import json

    _cli("eval", "--dataset", "oxford_pets", "--data-root", json_dataset.root, "--clip", "mini",
         "--output", tmp_path / "runs")
    (run,) = (tmp_path / "runs").glob("eval/oxford_pets/*/zeroshot/*/seed1")
    image = json_dataset.image_dir / json_dataset.split["test"][0][0]
    lines = _cli("predict", run, image, "--classes", "cat,dog,bird", "--topk", 2, "--json",
                 "--output", tmp_path / "p.csv").stdout.splitlines()
    row = json.loads(lines[0])
    assert row["image"] == str(image) and row["labels"][0]["label"] in {"cat", "dog", "bird"}
    table = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert [r["rank"] for r in table] == ["1", "2"] and table[0]["label"] == row["labels"][0]["label"]
    _cli("predict", run, image, "--output", tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text())[0]["image"] == str(image)
    refused = _cli("predict", run, image, "--output", tmp_path / "p.txt", expect=1)
    assert "expected a .csv or .json file name" in str(refused.exception)


def test_datasets_check_judges_the_datasets_present_or_asked(tmp_path, monkeypatch):
    """Only the user's own dataset in the folder: exit 0, the catalog's others listed as not present."""
    from PIL import Image

    for label in ("cat", "dog"):
        for k in range(6):
            (tmp_path / "photos" / label).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (40 * k, 90, 200)).save(tmp_path / "photos" / label / f"{k}.png")
    data = tmp_path / "data"
    data.mkdir()
    _cli("datasets", "create", "mypets", "--from", tmp_path / "photos", "--data-root", data)
    out = _cli("datasets", "check", data).stdout
    assert "mypets" in out and "not present, not checked" in out and "dtd" in out.split("not present")[1]
    monkeypatch.setenv("DATA_ROOT", str(data))
    assert "mypets" in _cli("datasets", "check", "--datasets", "mypets").stdout
    missing = _cli("datasets", "check", "--data-root", data, "--datasets", "mypets", "dtd", expect=1)
    assert "dtd" in missing.stdout and "not present, not checked" not in missing.stdout


def test_list_options_take_commas_or_spaces_everywhere(tmp_path, monkeypatch):
    """``--datasets a b`` and ``--datasets a,b`` mean the same to run, demo and mini generate."""
    from alignednorm.cli.options import GreedyListCommand, split_values

    assert split_values(["a,b", "c"]) == split_values(["a b c"]) == ["a", "b", "c"]
    calls = {}
    monkeypatch.setattr("alignednorm.mini.generate_world",
                        lambda root, names, processes=1: calls.update(root=root, names=names))
    monkeypatch.setenv("DATA_ROOT", str(tmp_path / "d"))
    _cli("mini", "generate", "--datasets", "mini_shapes", "mini_textures")
    assert calls == {"root": tmp_path / "d", "names": ["mini_shapes", "mini_textures"]}
    _cli("mini", "generate", "--datasets", "mini_shapes,mini_textures", "--data-root", tmp_path / "e")
    assert calls == {"root": tmp_path / "e", "names": ["mini_shapes", "mini_textures"]}
    assert issubclass(GreedyListCommand, object)


def test_sweep_prints_job_and_epoch_lines_without_a_terminal(json_dataset, tmp_path):
    """stderr is not a terminal under the test runner: one line per job start and end (accuracies), per epoch."""
    from alignednorm.backbone.tiny import save_openai_state_dict

    clip = save_openai_state_dict(make_tiny_clip(seed=3, layers=3), tmp_path / "clip.pt")
    args = ["run", "base2new", "--method", "alignednorm", "--datasets", "oxford_pets", "--data-root",
            json_dataset.root, "--clip", clip, "--seeds", 1, "--shots", 2, "--output", tmp_path / "r", *TINY]
    result = _cli(*args)
    err = result.stderr.splitlines()
    started = [line for line in err if "] started base2new/oxford_pets/shots2/alignednorm/" in line]
    finished = [line for line in err if "] finished base2new/oxford_pets/" in line]
    epochs = [line for line in err if line.strip().startswith("epoch ")]
    assert len(started) == 1 and len(finished) == 1 and "oxford_pets base " in finished[0] and "%, new " in finished[0]
    assert [line.split(",")[0].strip() for line in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert "| oxford_pets |" in result.stdout  # stdout: the results only
    assert not any(line.strip().startswith(("epoch ", "[1/1]")) for line in result.stdout.splitlines())
    again = _cli(*args)
    assert "1 of 1 jobs finished (1 reused" in again.stdout


def test_ctrl_c_says_the_same_command_resumes(monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("alignednorm.protocols.sweep.run_sweep", interrupted)
    result = _cli("run", "fewshot", "--method", "zeroshot", "--suite", "mini", "--datasets", "mini_shapes",
                  "--data-root", tmp_path, "--clip", "mini", "--seeds", 1, "--shots", 1, "--output", tmp_path / "r",
                  expect=130)
    assert "run the same command again to resume" in result.stderr
