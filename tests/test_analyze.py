"""``alignednorm analyze`` end to end on tiny trained runs: every figure and number file is written."""

import json
import re

from typer.testing import CliRunner

from alignednorm.backbone.tiny import make_tiny_clip, save_openai_state_dict
from alignednorm.cli import app

runner = CliRunner()
SMALL = ["--set", "method.rep_layers=[2,3]", "--set", "method.rep_dim=16", "--set", "train.batch_size=2",
         "--set", "train.epochs=1"]


def _invoke(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_analyze_writes_every_figure_for_runs_of_any_method(json_dataset, tmp_path):
    clip = save_openai_state_dict(make_tiny_clip(seed=2, layers=3), tmp_path / "clip.pt")
    common = ["--dataset", "oxford_pets", "--data-root", json_dataset.root, "--clip", clip, "--output", tmp_path / "r"]
    _invoke("train", "--method", "alignednorm", *common, "--shots", 2, *SMALL)
    _invoke("train", "--method", "mmrlpp", *common, "--shots", 2, *SMALL, "--set", "method.inference=unified")
    _invoke("eval", *common)
    runs = sorted(p for p in (tmp_path / "r").glob("*/oxford_pets/shots*/*/*/seed1"))
    assert len(runs) == 3
    out = tmp_path / "analysis"
    _invoke("analyze", *runs, "--output", out, "--max-images", 6, "--zeroshot")
    page = (out / "index.html").read_text()
    for name in ("norm_ratio", "layer_norms", "attention_share", "attention_maps", "uniformity_tolerance", "tsne"):
        assert (out / f"{name}.png").read_bytes().startswith(b"\x89PNG"), name
        assert (out / f"{name}.json").is_file() and (out / f"{name}.csv").is_file(), name
    assert len(re.findall(r'<img[^>]+src="data:image/png;base64,', page)) == 6
    # r(x) exists for the two prompt-branch methods only; zero-shot is skipped with its reason.
    ratios = json.loads((out / "norm_ratio.json").read_text())
    assert len(ratios) == 2 and all(set(v) >= {"base", "new", "gap"} for v in ratios.values())
    assert "the method has no prompt branch" in page and "zeroshot" in page
    geometry = json.loads((out / "uniformity_tolerance.json").read_text())
    assert "zero-shot CLIP" in geometry and len(geometry) == 4
    assert all(v["new"]["n"] == 4 for v in geometry.values())  # the 4 new-class test images (fewer than 6)


def test_corrupt_prints_the_table_for_a_trained_coop_prompt(json_dataset, tmp_path):
    clip = save_openai_state_dict(make_tiny_clip(seed=2, layers=3), tmp_path / "clip.pt")
    common = ["--dataset", "oxford_pets", "--data-root", json_dataset.root, "--clip", clip, "--output", tmp_path / "r"]
    _invoke("train", "--method", "coop", *common, "--shots", 2, "--set", "train.epochs=1",
            "--set", "train.batch_size=2")  # base-to-new preset: "a photo of a" init, 4 context tokens
    (run,) = (tmp_path / "r").glob("base2new/oxford_pets/shots2/coop/*/seed1")
    out = _invoke("corrupt", run, "--output", tmp_path / "corrupt.json")
    assert "| replace | 0.01 |" in out and "| rescale↑ | 2 |" in out and "out of 16)" in out
    numbers = json.loads((tmp_path / "corrupt.json").read_text())
    (entry,) = numbers.values()
    assert len(entry["results"]) == 10 and all(len(r["accuracy"]) == 4 for r in entry["results"])
    assert 0 <= entry["low_norm_frequency"] <= 16
    result = runner.invoke(app, ["corrupt", str(next((tmp_path / "r").glob("base2new/oxford_pets/shots2/coop/*")))])
    assert result.exit_code != 0
