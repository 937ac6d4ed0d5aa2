"""``alignednorm export``: a self-contained shareable folder that loads and predicts like the run."""

import json
import shutil

import torch
from typer.testing import CliRunner

import alignednorm
from alignednorm.backbone.tiny import make_tiny_clip, save_openai_state_dict
from alignednorm.cli import app
from alignednorm.errors import AlignedNormError, CheckpointError

runner = CliRunner()


def test_export_load_and_predict(json_dataset, tmp_path):
    clip = save_openai_state_dict(make_tiny_clip(seed=3, layers=3), tmp_path / "clip.pt")
    args = ["train", "--method", "alignednorm", "--dataset", "oxford_pets", "--data-root", str(json_dataset.root),
            "--clip", str(clip), "--shots", "2", "--output", str(tmp_path / "runs"), "--set", "method.rep_layers=[2,3]",
            "--set", "method.rep_dim=16", "--set", "train.epochs=1", "--set", "train.batch_size=2"]
    assert runner.invoke(app, args, catch_exceptions=False).exit_code == 0
    (run_dir,) = (tmp_path / "runs").glob("base2new/oxford_pets/shots2/alignednorm/*/seed1")
    out = tmp_path / "shared"
    assert runner.invoke(app, ["export", str(run_dir), str(out)], catch_exceptions=False).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "alignednorm_config.json", "learnable.safetensors"]
    config = json.loads((out / "alignednorm_config.json").read_text())
    assert config["method"] == "alignednorm" and config["backbone"]["file"] == "clip.pt"
    assert set(config["metrics"]["oxford_pets"]) == {"base", "new"} and len(config["backbone"]["sha256"]) == 64
    card = (out / "README.md").read_text()
    assert "library_name: alignednorm" in card and "| oxford_pets | base " in card and "@inproceedings" in card
    assert "alignednorm train --method alignednorm" in card
    # The exported folder predicts exactly like the run it came from, also with the backbone moved.
    images = torch.randn(2, 3, 32, 32)
    moved = shutil.move(clip, tmp_path / "elsewhere.pt")
    expected = alignednorm.load(run_dir, clip=moved).predict(images, classes=["cat", "dog"])
    assert alignednorm.load(out, clip=moved).predict(images, classes=["cat", "dog"]) == expected
    image = json_dataset.image_dir / json_dataset.split["test"][0][0]
    result = runner.invoke(app, ["predict", str(out), str(image), "--clip", str(moved), "--classes", "cat,dog"],
                           catch_exceptions=False)
    assert result.exit_code == 0 and "cat" in result.output
    try:
        alignednorm.load(out)  # named only, and no clip.pt beside the folder: one line saying to pass it
        raise AssertionError("expected a CheckpointError")
    except CheckpointError as exc:
        assert "names its backbone 'clip.pt'" in str(exc) and "pass clip=PATH" in str(exc)
    shutil.copyfile(moved, tmp_path / "clip.pt")  # beside the exported folder: found by name and SHA-256
    assert alignednorm.load(out).predict(images, classes=["cat", "dog"]) == expected
    (tmp_path / "clip.pt").write_bytes(b"another file of that name")
    try:
        alignednorm.load(out)
        raise AssertionError("expected a CheckpointError")
    except CheckpointError as exc:
        assert "no file of that name and checksum" in str(exc)
    refused = runner.invoke(app, ["export", str(run_dir), str(out)])
    assert isinstance(refused.exception, AlignedNormError) and "not empty" in str(refused.exception)


def test_load_and_predict_name_the_shipped_clip_as_at_training(json_dataset, tmp_path):
    """``--clip mini`` trains; ``load(..., clip="mini")`` and ``predict --clip mini`` find the same file."""
    args = ["eval", "--method", "zeroshot", "--dataset", "oxford_pets", "--data-root", str(json_dataset.root),
            "--clip", "mini", "--output", str(tmp_path / "runs")]
    assert runner.invoke(app, args, catch_exceptions=False).exit_code == 0
    (run_dir,) = (tmp_path / "runs").glob("*/oxford_pets/*/zeroshot/*/seed1")
    images = torch.randn(2, 3, 32, 32)
    assert alignednorm.load(run_dir, clip="mini").predict(images, classes=["cat", "dog"]) == \
        alignednorm.load(run_dir).predict(images, classes=["cat", "dog"])
    image = json_dataset.image_dir / json_dataset.split["test"][0][0]
    result = runner.invoke(app, ["predict", str(run_dir), str(image), "--clip", "mini", "--classes", "cat,dog"],
                           catch_exceptions=False)
    assert result.exit_code == 0 and ("cat" in result.output or "dog" in result.output)


def test_exported_folder_holds_no_local_path_and_hub_metadata(tmp_path):
    """Own dataset, ``run`` command with --suite paper and absolute paths: none of it reaches the shared files."""
    from alignednorm.export import export_run, shareable_command

    run = tmp_path / "runs" / "base2new" / "mypets" / "shots2" / "zeroshot" / "default" / "seed1"
    run.mkdir(parents=True)
    clip = tmp_path / "weights" / "ViT-B-16.pt"  # export reads the record only
    command = (f"alignednorm run base2new --method zeroshot --suite paper --data-root {tmp_path}/data --clip {clip} "
               f"--seeds 1 --output {tmp_path}/runs --datasets mypets --config {tmp_path}/my.yaml")
    (run / "run.json").write_text(json.dumps({
        "method": "zeroshot", "dataset": "mypets", "shots": 2, "train_subset": "base", "classnames": ["a", "b"],
        "template": "a photo of a {}.", "clip": str(clip), "clip_sha256": "0" * 64, "command": command,
        "data_root": str(tmp_path / "data")}))
    (run / "config.yaml").write_text(f"method: {{}}\ndata:\n  descriptions: {tmp_path}/descriptions.json\n")
    out = export_run(run, tmp_path / "shared", license="apache-2.0")
    files = {p.name: p.read_text() for p in out.iterdir() if p.suffix in (".json", ".md")}
    assert all(str(tmp_path) not in text for text in files.values())
    config = json.loads(files["alignednorm_config.json"])
    assert config["backbone"]["name"] == "ViT-B-16.pt" and config["backbone"]["hub_id"] is None
    assert config["command"] == ("alignednorm run base2new --method zeroshot --data-root DATA --clip ViT-B-16.pt "
                                 "--seeds 1 --output runs --datasets mypets --config my.yaml")
    assert config["config"]["data"]["descriptions"] == "descriptions.json"
    card = files["README.md"]
    front = card.split("---\n")[1]
    assert 'license: "apache-2.0"' in front and "pipeline_tag: zero-shot-image-classification" in front
    assert "library_name: alignednorm" in front and '- "mypets"' in front and "base_model" not in front
    # OpenAI publishes each checkpoint under its SHA-256: such a backbone gets its hub copy as base_model.
    sha = "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"  # OpenAI's ViT-B-16.pt
    assert shareable_command(None, "mypets", "x") is None
    from alignednorm.export import backbone_record, front_matter

    record = backbone_record(clip, None, sha)
    assert record["hub_id"] == "timm/vit_base_patch16_clip_224.openai"
    assert 'base_model: "timm/vit_base_patch16_clip_224.openai"' in front_matter({**config, "backbone": record})
