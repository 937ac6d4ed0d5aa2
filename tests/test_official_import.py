"""Importing prompts trained with the official MMRL / MMRL++ / AlignedNorm code (Dassl files)."""

import pytest
import torch
from safetensors.torch import load_file

from alignednorm.backbone.clip import ClipBackbone
from alignednorm.backbone.tiny import make_tiny_clip
from alignednorm.compat.official import import_official, official_to_ours
from alignednorm.errors import CheckpointError
from alignednorm.methods import create_method


def test_dassl_checkpoint_of_mmrlpp(shared_dir, tmp_path):
    fixture = shared_dir / "reference" / "mmrlpp_a"
    learnable = load_file(str(fixture / "learnable.safetensors"))
    clip_state = load_file(str(fixture / "clip_tiny.safetensors"))
    # As Dassl saves it: the whole CustomCLIP state dict (frozen CLIP included) plus trainer state.
    state = {**learnable, **{f"image_encoder.{k[7:]}": v for k, v in clip_state.items() if k.startswith("visual.")},
             "representation_learner.prompt_embeddings": torch.zeros(6, 77, 64),
             "text_encoder.ln_final.weight": clip_state["ln_final.weight"]}
    torch.save({"state_dict": state, "epoch": 10, "optimizer": {"state": {}, "param_groups": []}},
               tmp_path / "model.pth.tar-10")
    method = create_method("mmrlpp", ClipBackbone.from_file(fixture / "clip_tiny.safetensors"))
    import_official(method, tmp_path / "model.pth.tar-10")
    ours = method.learnable_state_dict()
    assert len(ours) == len(learnable)
    for name, value in learnable.items():
        assert torch.equal(ours[official_to_ours(name)], value), name


def test_mmrl_v1_names_and_bad_files(tmp_path):
    backbone = ClipBackbone(make_tiny_clip(seed=0, layers=3))
    method = create_method("mmrl", backbone, {"rep_layers": [2, 3], "rep_dim": 8})
    official = {"representation_learner.compound_rep_tokens": torch.randn(5, 8),
                "image_encoder.proj_rep": torch.randn(64, 32)}
    for i in range(2):
        for side, width in (("v", 64), ("t", 64)):
            official[f"representation_learner.compound_rep_tokens_r2{side}proj.{i}.weight"] = torch.randn(width, 8)
            official[f"representation_learner.compound_rep_tokens_r2{side}proj.{i}.bias"] = torch.randn(width)
    torch.save({"state_dict": official}, tmp_path / "model.pth.tar-5")
    import_official(method, tmp_path / "model.pth.tar-5")
    assert torch.equal(method.text_aligner.layers[1].bias,
                       official["representation_learner.compound_rep_tokens_r2tproj.1.bias"])
    torch.save({"state_dict": {"foo": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no mmrl learnable tensors found .*compound_rep_tokens"):
        import_official(method, tmp_path / "other.pth")
    del official["image_encoder.proj_rep"]
    torch.save({"state_dict": official}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \['proj_rep'\]"):
        import_official(method, tmp_path / "partial.pth")


def test_import_official_command_writes_a_loadable_folder(shared_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    import alignednorm
    from alignednorm.cli import app

    fixture = shared_dir / "reference" / "mmrlpp_a"
    learnable = load_file(str(fixture / "learnable.safetensors"))
    torch.save({"state_dict": learnable, "epoch": 5}, tmp_path / "model.pth.tar-5")
    args = ["import-official", "mmrlpp", str(tmp_path / "model.pth.tar-5"), str(tmp_path / "out"),
            "--clip", str(fixture / "clip_tiny.safetensors"), "--classes", "cat,dog,bird"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "out" / "alignednorm_config.json").read_text())
    assert config["classnames"] == ["cat", "dog", "bird"] and config["method"] == "mmrlpp"
    predictor = alignednorm.load(tmp_path / "out", clip=fixture / "clip_tiny.safetensors")  # recorded by name
    ours = predictor.method.learnable_state_dict()
    assert all(torch.equal(ours[official_to_ours(k)], v) for k, v in learnable.items())
    assert len(predictor.predict(torch.zeros(1, 3, 32, 32), topk=2)[0]) == 2
    # A checkpoint that does not fit the config is refused with the keys that differ.
    bad = CliRunner().invoke(app, [*args[:3], str(tmp_path / "out2"), *args[4:], "--set", "method.n_rep_tokens=3"])
    assert isinstance(bad.exception, CheckpointError) and "wrong shapes" in str(bad.exception)
