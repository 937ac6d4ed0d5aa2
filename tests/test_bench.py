"""``bench``: the optimisations it toggles change no number; the command prints every column."""

import json

from typer.testing import CliRunner

from alignednorm.bench import random_clip, run_bench
from alignednorm.cli import app
from alignednorm.methods import list_methods


def test_optimisations_change_no_logit_and_every_method_is_counted():
    result = run_bench("mmrlpp", "tiny", classes=(3,), batch=2, iters=1, backbone=random_clip("tiny"))
    assert [t.settings for t in result.timings] == [
        {"cut_text_padding": False, "share_text_prefix": False},
        {"cut_text_padding": True, "share_text_prefix": False},
        {"cut_text_padding": True, "share_text_prefix": True}]
    assert all(t.logits_max_diff < 1e-4 for t in result.timings)  # 100·cosine: cosines agree to 1e-6 (BLAS order)
    assert set(result.params) == set(list_methods()) and result.params["zeroshot"] == 0
    assert result.params["mmrlpp"] > 0


def test_bench_command_json():
    out = CliRunner().invoke(app, ["bench", "--method", "alignednorm", "--geometry", "tiny", "--classes", "2",
                                   "--batch", "2", "--iters", "1", "--json"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["method"] == "alignednorm" and len(data["timings"]) == 3
    assert all(t["train_s"] > 0 and t["eval_first_s"] > 0 for t in data["timings"])


def test_bench_settings_selection():
    result = run_bench("zeroshot", "tiny", classes=(2,), batch=2, iters=1, backbone=random_clip("tiny"), settings="on")
    assert [t.settings for t in result.timings] == [{"cut_text_padding": True, "share_text_prefix": True}]
    out = CliRunner().invoke(app, ["bench", "--geometry", "tiny", "--settings", "most"])
    assert out.exit_code != 0


def test_bench_data_measures_loader_and_model(tmp_path):
    """bench --data: real 500x375 JPEGs, one loader row per worker count, the model's rates, a verdict per row."""
    from PIL import Image

    from alignednorm.bench import DataBenchResult, LoaderTiming, format_data_result, write_jpegs

    items = write_jpegs(tmp_path / "jpegs", 3)
    with Image.open(items[0].impath) as image:
        assert image.size == (500, 375) and image.format == "JPEG"
    result = CliRunner().invoke(app, ["bench", "--data", "--geometry", "tiny", "--images", "6", "--workers", "0,1",
                                      "--classes", "5", "--batch", "4", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [row["workers"] for row in data["loaders"]] == [0, 1] and data["images"] == 6
    assert all(row["train_ips"] > 0 and row["eval_ips"] > 0 for row in data["loaders"])
    assert data["model_train_ips"] > 0 and data["model_eval_ips"] > 0 and data["default_workers"] >= 0

    text = format_data_result(DataBenchResult("tiny", "mmrlpp", "cpu", (500, 375), 6, 4, 0, 10.0, 100.0,
                                              [LoaderTiming(0, 5.0, 500.0), LoaderTiming(1, 20.0, 50.0)]))
    assert text.splitlines()[3].endswith("loader / model  <- default here")
    assert text.splitlines()[4].endswith("model / loader")
    bad = CliRunner().invoke(app, ["bench", "--data", "--workers", "-1"])
    assert bad.exit_code != 0
