"""The official-code benchmark's own parts: it refuses what is not the official checkout in one line, and the
weight file it hands the official loader holds bench's random CLIP. Timing the official code needs its
checkouts, so it is not run here."""

import warnings

import pytest
import torch

from alignednorm.backbone.loading import load_clip
from alignednorm.bench import random_clip
from alignednorm.compat.bench_official import OFFICIAL_FILES, main, write_official_weights


def _error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_refuses_a_missing_or_wrong_official_repo(capsys, tmp_path):
    assert "--official-repo is required" in _error_line(capsys, ["--geometry", "tiny"])
    assert "no such folder" in _error_line(capsys, ["--official-repo", str(tmp_path / "absent")])
    (tmp_path / "train.py").write_text("")
    err = _error_line(capsys, ["--official-repo", str(tmp_path)])
    assert "not the official MMRL checkout" in err and "trainers/mmrlpp.py is missing" in err
    (tmp_path / "trainers").mkdir()
    (tmp_path / "trainers" / "mmrlpp.py").write_text("")
    assert "clip/clip.py is missing" in _error_line(capsys, ["--official-repo", str(tmp_path)])


def test_refuses_a_wrong_dassl_checkout(capsys, tmp_path):
    for name in OFFICIAL_FILES:  # looks like the checkout; nothing is imported before --dassl is checked
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    err = _error_line(capsys, ["--official-repo", str(tmp_path), "--dassl", str(tmp_path / "dassl")])
    assert "dassl/engine/trainer.py is missing" in err


def test_weight_file_holds_bench_random_clip(tmp_path):
    path = write_official_weights(random_clip("tiny"), tmp_path / "clip.pt")
    expected = random_clip("tiny").model.state_dict()
    loaded = load_clip(path).state_dict()  # read as OpenAI's (the size entries), QuickGELU
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    raw = torch.load(path, weights_only=True)
    assert (int(raw["input_resolution"]), int(raw["context_length"]), int(raw["vocab_size"])) == (32, 77, 49408)
    # The official load_clip_to_cpu tries torch.jit.load and falls back to torch.load on RuntimeError.
    with warnings.catch_warnings(), pytest.raises(RuntimeError):
        warnings.simplefilter("ignore")
        torch.jit.load(str(path), map_location="cpu")
