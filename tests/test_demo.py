"""`alignednorm demo` end to end on CPU, restricted to one mini dataset to stay fast."""

import json

from typer.testing import CliRunner

from alignednorm.cli import app


def test_demo_on_one_mini_dataset(tmp_path):
    args = ["demo", "--output", str(tmp_path / "runs"), "--data-root", str(tmp_path / "data"),
            "--datasets", "mini_relations", "--methods", "zeroshot,mmrlpp", "--set", "train.epochs=2"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Base-to-new: mmrlpp" in result.output and "Base-to-new: zeroshot" in result.output
    assert (tmp_path / "data" / "mini" / "relations" / "split_mini_relations.json").is_file()
    for method in ("zeroshot", "mmrlpp"):
        method_dir = tmp_path / "runs" / "base2new" / "mini_relations" / "shots16" / method
        (metrics_file,) = method_dir.glob("*/seed1/eval/mini_relations/metrics.json")
        metrics = json.loads(metrics_file.read_text())
        base, new = metrics["eval"]["base"], metrics["eval"]["new"]
        assert base["num_classes"] == 12 and new["num_classes"] == 12
        # The tiny CLIP knows these spatial relations well: far above the 1-in-12 chance.
        assert base["accuracy"] > 50 and new["accuracy"] > 50
