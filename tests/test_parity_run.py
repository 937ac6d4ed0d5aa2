"""Run-level parity: whole official CoOp and MMRL++ runs reproduced through the training path."""

import copy
import json

import pytest
import torch
from PIL import Image

from alignednorm.compat.parity import parity_module, run_parity
from alignednorm.compat.parity_run import FixtureError, plan_from_manifest
from alignednorm.data.transforms import build_transform


@pytest.mark.parametrize("name, method", [("coop_run_a", "coop"), ("mmrlpp_run_a", "mmrlpp")])
def test_run_level_fixture_reproduced(shared_dir, name, method):
    report = run_parity(shared_dir / "reference" / name)
    assert report["ok"], report["failed"]
    assert report["method"] == method
    manifest = json.loads((shared_dir / "reference" / name / "manifest.json").read_text())
    assert [e["epoch"] for e in report["per_epoch"]] == [e["epoch"] for e in manifest["per_epoch"]]
    # every recorded learned tensor and optimiser entry of every epoch was compared
    assert sum(k.startswith(("learnable.", "optimizer.")) for k in report["tensors"]) == sum(
        k.startswith("epoch") for k in _learnable_keys(shared_dir / "reference" / name))
    assert report["tensors"]["final.test.accuracy"]["ok"]


def _learnable_keys(fixture):
    from safetensors import safe_open

    with safe_open(str(fixture / "learnable.safetensors"), "pt") as f:
        return list(f.keys())


def test_run_level_kind_is_routed_before_the_config_section(shared_dir):
    manifest = json.loads((shared_dir / "reference" / "coop_run_a" / "manifest.json").read_text())
    assert parity_module(manifest).__name__ == "alignednorm.compat.parity_run"
    step_level = json.loads((shared_dir / "reference" / "coop_a" / "manifest.json").read_text())
    assert parity_module(step_level).__name__ == "alignednorm.compat.parity_coop"


def test_plan_reads_the_official_config(shared_dir):
    manifest = json.loads((shared_dir / "reference" / "coop_run_a" / "manifest.json").read_text())
    plan = plan_from_manifest(manifest, 32)
    assert (plan.method, plan.protocol, plan.subset, plan.shots, plan.dataset) == (
        "coop", "fewshot", "all", 4, "eurosat")
    assert plan.config["train"]["select"] == "best-val" and plan.config["train"]["lr"] == 0.05
    assert plan.config["data"]["random_resized_crop"] is False and plan.config["data"]["hflip"] is False
    other = copy.deepcopy(manifest)
    other["config"]["OPTIM"].update(MAX_EPOCH=3, LR=0.01)
    other["config"]["DATASET"].update(NUM_SHOTS=2, SUBSAMPLE_CLASSES="base")
    other["config"]["TRAINER"]["COOP"]["N_CTX"] = 4
    plan = plan_from_manifest(other, 32)
    assert (plan.protocol, plan.shots, plan.config["train"]["epochs"], plan.config["method"]["n_ctx"]) == \
        ("base2new", 2, 3, 4)


@pytest.mark.parametrize("key, value, named", [
    (("OPTIM", "LR_SCHEDULER"), "single_step", "config.OPTIM.LR_SCHEDULER"),
    (("INPUT", "TRANSFORMS"), ["random_crop", "normalize"], "config.INPUT.TRANSFORMS"),
    (("INPUT", "SIZE"), [224, 224], "config.INPUT.SIZE"),
    (("TRAINER", "NAME"), "NoSuchTrainer", "NoSuchTrainer"),
])
def test_unsupported_settings_fail_with_the_key(shared_dir, key, value, named):
    manifest = json.loads((shared_dir / "reference" / "coop_run_a" / "manifest.json").read_text())
    manifest["config"][key[0]][key[1]] = value
    with pytest.raises(FixtureError, match="manifest.json") as info:
        plan_from_manifest(manifest, 32)
    assert named in str(info.value) and "\n" not in str(info.value)


def test_training_transform_without_augmentation_is_a_plain_resize():
    image = Image.new("RGB", (40, 24), (10, 200, 30))
    for x in range(40):
        image.putpixel((x, x % 24), (x * 6, 0, 255 - x * 6))
    plain = build_transform(16, train=True, hflip=False, random_resized_crop=False)
    first = plain(image)
    assert first.shape == (3, 16, 16)
    assert all(torch.equal(first, plain(image)) for _ in range(5))  # nothing random
    augmented = build_transform(16, train=True)
    torch.manual_seed(0)
    assert not all(torch.equal(augmented(image), augmented(image)) for _ in range(5))


def test_other_settings_go_through_the_same_run(shared_dir, tmp_path):
    """A held-back fixture's settings (seed, shots, epochs, classes, selection) all come from its manifest."""
    from alignednorm.compat.parity_run import run_ours

    source = shared_dir / "reference" / "coop_run_a"
    fixture = tmp_path / "fixture"
    fixture.mkdir()
    for f in source.iterdir():
        if f.name != "manifest.json":
            (fixture / f.name).symlink_to(f)
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["config"].update(SEED=2)
    manifest["config"]["OPTIM"].update(MAX_EPOCH=3, WARMUP_EPOCH=0)
    manifest["config"]["DATASET"].update(NUM_SHOTS=2, SUBSAMPLE_CLASSES="base")
    manifest["config"]["TEST"]["FINAL_MODEL"] = "last_step"
    manifest["config"]["DATALOADER"]["TRAIN_X"]["BATCH_SIZE"] = 6
    ours = run_ours(fixture, manifest, tmp_path / "work")
    assert [e["epoch"] for e in ours["epochs"]] == [1, 2, 3]
    assert ours["epochs"][0]["lr"] == pytest.approx(0.05)  # no warm-up: the cosine from epoch 1
    assert "val_logits" not in ours["epochs"][0] and "selected_epoch" not in ours["train"]
    assert len(ours["fewshot"].train) == 2 * 5  # all classes sampled, then the 3 base ones trained
    assert set(ours["eval"]) == {"base", "new"}
    assert ours["final_logits"]["base"].shape == (15, 3) and ours["final_logits"]["new"].shape == (10, 2)


def test_bad_fixture_folder_is_named(tmp_path):
    from alignednorm.compat.parity_run import read_fixture

    with pytest.raises(FixtureError, match="manifest.json is missing"):
        read_fixture(tmp_path)
