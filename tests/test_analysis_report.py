"""Every figure is written as a valid PNG; the HTML page embeds each one and escapes all text.

The pages in a real browser: tests/test_browser.py."""

import base64
import csv
import io
import json
import re

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from matplotlib.image import imread

from alignednorm.analysis import plots
from alignednorm.analysis.html_report import FigureEntry, write_numbers, write_report
from alignednorm.analysis.norms import ratio_summary
from alignednorm.errors import DataError

PNG = b"\x89PNG\r\n\x1a\n"
RUNS = ("mmrlpp", "alignednorm")


def _ratios(rng) -> dict:
    base, new = rng.gamma(4, 0.3, 200), rng.gamma(4, 0.25, 150)
    return {"base": base, "new": new, "summary": ratio_summary(base, new)}


def _numbers() -> dict[str, dict]:
    """Numbers shaped like the compute functions' outputs, one entry per figure."""
    rng = np.random.default_rng(0)
    layer = {"layers": np.arange(6, 13), "cls": np.linspace(10, 30, 7), "prompt_mean": np.linspace(5, 60, 7),
             "prompt_of_mean": np.linspace(4, 50, 7), "prompt_tokens": rng.uniform(5, 60, (7, 5))}
    share = {"layers": np.arange(9, 13), "cls": rng.uniform(0, 0.1, (4, 12)), "patch": rng.uniform(0, 0.1, (4, 12)),
             "uniform": np.full(4, 5 / 202)}
    share_nan = dict(share, cls=np.full((4, 12), np.nan))
    tsne = {"coords": rng.normal(size=(30, 2)), "labels": np.arange(30) % 6,
            "group": np.array(["base"] * 15 + ["new"] * 15), "perplexity": np.array(9.7)}
    geometry = {"uniformity": -0.0195, "tolerance": 0.71, "t": 0.01, "n": 100, "classes": 5}
    return {
        "norm_ratio": {r: _ratios(rng) for r in RUNS},
        "layer_norms": {r: {"base": layer, "new": layer} for r in RUNS},
        "attention_share": {"mmrlpp": share, "alignednorm": share_nan},
        "uniformity": {r: {"base": geometry, "new": dict(geometry, tolerance=0.5)} for r in ("zero-shot", *RUNS)},
        "tsne": {r: tsne for r in RUNS},
        "prompt_norms": {"coop": [rng.uniform(0.5, 2, 16) + e for e in range(5)],
                         "coop+pun": [rng.uniform(0.5, 1, (3, 16)) for _ in range(5)]},
    }


def _draw(out, numbers) -> list[FigureEntry]:
    images = np.random.default_rng(1).uniform(0, 1, (3, 32, 32, 3))
    maps = {"layer 11": np.random.default_rng(2).uniform(0, 1, (3, 14, 14)), "layer 12": np.ones((3, 14, 14))}
    drawn = {
        "norm_ratio": plots.plot_norm_ratio(numbers["norm_ratio"], out / "norm_ratio.png"),
        "layer_norms": plots.plot_layer_norms(numbers["layer_norms"], out / "layer_norms.png"),
        "attention_share": plots.plot_attention_share(numbers["attention_share"], out / "attention_share.png"),
        "attention_maps": plots.plot_attention_overlays(images, maps, out / "attention_maps.png", titles=["a", "b"]),
        "uniformity": plots.plot_uniformity_tolerance(numbers["uniformity"], out / "uniformity.png"),
        "tsne": plots.plot_tsne(numbers["tsne"], out / "tsne.png"),
        "prompt_norms": plots.plot_prompt_norms_over_epochs(numbers["prompt_norms"], out / "prompt_norms.png"),
    }
    numbers["attention_maps"] = maps
    return [FigureEntry(name, name.replace("_", " "), png, numbers[name], caption=f"caption <{name}>")
            for name, png in drawn.items()]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    figures = _draw(out / "figures", _numbers())
    configs = {"mmrlpp": "method: mmrlpp\nnote: <b>&amp;</b>", "<script>alert(1)</script>": "x: 1"}
    page = write_report(out / "report.html", figures, configs, title="runs <A & B>",
                        skipped={"norm_ratio:zeroshot": "zero-shot has no prompt branch"})
    return out, figures, page


def test_every_figure_is_a_valid_png(report):
    _, figures, _ = report
    for entry in figures:
        data = entry.png.read_bytes()
        assert data.startswith(PNG), entry.name
        image = imread(entry.png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0.01, f"{entry.name} is blank"


def test_numbers_written_beside_each_png(report):
    _, figures, _ = report
    for entry in figures:
        data = json.loads(entry.png.with_suffix(".json").read_text())
        rows = list(csv.DictReader(io.StringIO(entry.png.with_suffix(".csv").read_text())))
        assert data and rows and set(rows[0]) == {"key", "index", "value"}, entry.name
    share = json.loads(figures[2].png.with_suffix(".json").read_text())
    assert share["alignednorm"]["cls"][0][0] is None  # NaN -> null, strict JSON
    rows = list(csv.DictReader(io.StringIO(figures[0].png.with_suffix(".csv").read_text())))
    assert rows[0]["key"] == "mmrlpp.base" and rows[0]["index"] == "0" and float(rows[0]["value"]) > 0
    assert sum(r["key"] == "mmrlpp.new" for r in rows) == 150
    assert any(r["key"] == "mmrlpp.summary.gap" and r["index"] == "" for r in rows)


def test_html_embeds_one_image_per_figure_and_escapes_text(report):
    _, figures, page = report
    text = page.read_text()
    uris = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(uris) == text.count("<img") == len(figures)
    for uri, entry in zip(uris, figures, strict=True):
        assert base64.b64decode(uri) == entry.png.read_bytes()
    assert not re.search(r'(src|href)="(https?:)?//', text) and "<link" not in text and "<script" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "runs &lt;A &amp; B&gt;" in text
    assert "&lt;b&gt;&amp;amp;&lt;/b&gt;" in text and "caption &lt;norm_ratio&gt;" in text
    assert "zero-shot has no prompt branch" in text
    assert 'href="figures/norm_ratio.csv"' in text


def test_report_and_plot_errors(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="not a PNG"):
        write_report(tmp_path / "r.html", [FigureEntry("x", "x", bad)])
    with pytest.raises(DataError, match="does not exist"):
        write_report(tmp_path / "r.html", [FigureEntry("x", "x", tmp_path / "missing.png")], numbers_files=False)
    with pytest.raises(DataError, match="repeat"):
        write_report(tmp_path / "r.html", [FigureEntry("x", "x", bad), FigureEntry("x", "y", bad)])
    with pytest.raises(DataError, match="mapping"):
        write_numbers([1, 2], tmp_path / "n.png")
    with pytest.raises(DataError, match="at least one run"):
        plots.plot_norm_ratio({}, tmp_path / "n.png")
    with pytest.raises(DataError, match="epochs has 2"):
        plots.plot_prompt_norms_over_epochs([np.ones(4)] * 3, tmp_path / "p.png", epochs=[1, 2])
    with pytest.raises(DataError, match="one map per image"):
        plots.plot_attention_overlays(np.ones((2, 8, 8)), np.ones((3, 2, 2)), tmp_path / "o.png")


def test_numbers_tables_hold_no_rows_of_dashes(tmp_path):
    from alignednorm.analysis.html_report import _numbers_table

    numbers = {"run": {"prompt_mean": np.r_[np.full(5, np.nan), np.arange(7.0)], "cls": np.full((4, 2), np.nan),
                       "tokens": np.r_[np.full((5, 3), np.nan), np.ones((2, 3))], "base": {"mean": 1.0, "n": 4}}}
    html = _numbers_table(numbers)
    assert "— ×5, 0, 1, 2" in html and "not applicable" in html and "5 of 7 rows have no values" in html
    assert "<td>—</td>" not in html and "<th>mean</th>" in html  # scalars pivoted: one column per name


def test_tsne_colours_base_and_new_classes_apart(tmp_path):
    coords = np.random.default_rng(0).normal(size=(8, 2))
    res = {"coords": coords, "labels": np.array([0, 1, 0, 1] * 2), "group": np.array(["base"] * 4 + ["new"] * 4)}
    png = plots.plot_tsne({"run": res}, tmp_path / "t.png")
    assert png.read_bytes().startswith(PNG)
    base, new = (plots.colormaps[plots.TSNE_PALETTES[g]](0.35) for g in ("base", "new"))
    assert base != new  # class 0 of base and class 0 of new get different colours


def test_dataset_bars_with_missing_values(tmp_path):
    values = {"datasets": ["dtd", "Average"], "ours": {"a": {k: [70.0, None] for k in ("Base", "New", "HM")}},
              "paper": {"a": {k: [72.0, None] for k in ("Base", "New", "HM")}}}
    assert plots.plot_dataset_bars(values, tmp_path / "b.png").read_bytes().startswith(PNG)
