"""The report and analysis pages in a real browser (headless chromium): every embedded image decodes.

``.ci/run`` installs Debian's ``chromium`` when it is missing; without a browser these tests fail (never
skip). Each page is checked on a copy with a small script appended that records, after the load event,
each image's ``naturalWidth`` in the DOM that ``--dump-dom`` prints; the pages themselves hold no script.
"""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from matplotlib.image import imread

from alignednorm.analysis import plots
from alignednorm.analysis.html_report import FigureEntry, write_report
from alignednorm.protocols.tables import build_tables, run_accuracy_table, write_results_page
from alignednorm.results import collect

PROBE = """<script>
window.addEventListener("load", () => {
  for (const img of document.images) {
    img.setAttribute("data-width", String(img.complete ? img.naturalWidth : 0));
  }
  document.body.setAttribute("data-images", String(document.images.length));
});
</script>"""


def _browser() -> str:
    found = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if found is None:
        pytest.fail("no chromium on PATH: `apt-get install chromium` (.ci/run does it when missing)")
    return found


def _chromium(*args: str) -> str:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=20000"]
    done = subprocess.run([_browser(), *flags, *args], check=True, timeout=180, capture_output=True, text=True)
    return done.stdout


def decoded_widths(page: Path, tmp_path: Path) -> tuple[int, list[int]]:
    """``(images on the page, naturalWidth of each)`` as the browser saw them after loading ``page``."""
    probe = tmp_path / f"probe_{page.name}"
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = _chromium("--dump-dom", probe.as_uri())
    counted = re.search(r'<body[^>]*data-images="(\d+)"', dom)
    assert counted, "the probe did not run: no data-images on <body>"
    return int(counted.group(1)), [int(w) for w in re.findall(r'data-width="(\d+)"', dom)]


def write_eval(root: Path, method: str, dataset: str, seed: int, base: float, new: float, variant="default") -> None:
    run = root / "base2new" / dataset / "shots16" / method / variant / f"seed{seed}"
    (run / "eval" / dataset).mkdir(parents=True, exist_ok=True)
    (run / "eval" / dataset / "metrics.json").write_text(json.dumps({
        "protocol": "base2new", "method": method, "variant": variant, "suite": "paper", "dataset": dataset,
        "target": dataset, "shots": 16, "seed": seed,
        "eval": {"base": {"accuracy": base}, "new": {"accuracy": new}}}))
    (run / "run.json").write_text(json.dumps({"command": f"alignednorm run base2new --method {method} "
                                                         "--set train.epochs=5"}))


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("browser")
    runs = root / "runs"
    for seed in (1, 2):
        for dataset, shift in (("dtd", 0.0), ("eurosat", 5.0)):
            write_eval(runs, "alignednorm", dataset, seed, 80.0 + seed + shift, 70.0 - seed)
            write_eval(runs, "mmrlpp", dataset, seed, 82.0 + shift, 66.0 + seed, variant="custom-0123abcd")
    run_dirs = sorted(runs.glob("base2new/dtd/shots16/*/*/seed1"))
    rng = np.random.default_rng(0)
    out = runs / "analysis" / "dtd"
    share = {"layers": np.arange(6, 13), "cls": rng.uniform(0, 0.2, (7, 12)), "patch": rng.uniform(0, 0.2, (7, 12)),
             "uniform": np.full(7, 0.02)}
    tsne = {"coords": rng.normal(size=(40, 2)), "labels": np.arange(40) % 5,
            "group": np.array(["base"] * 20 + ["new"] * 20), "perplexity": np.array(5.0)}
    figures = [
        FigureEntry("attention_share", "Fig. 3c", plots.plot_attention_share({"alignednorm": share},
                                                                             out / "attention_share.png"), share),
        FigureEntry("tsne", "Fig. 4", plots.plot_tsne({"alignednorm": tsne}, out / "tsne.png"), {"n": 40}),
        FigureEntry("norm_ratio", "Fig. 3a", plots.plot_norm_ratio(
            {"alignednorm": {"base": rng.gamma(4, 0.3, 12), "new": rng.gamma(4, 0.25, 12)}}, out / "norm_ratio.png")),
    ]
    labels = {f"run {i}": d for i, d in enumerate(run_dirs)}
    analysis = write_report(out / "index.html", figures, tables=[run_accuracy_table(labels)], runs=run_dirs,
                            skipped={"attention to prompts of coop": "no prompt tokens in the image tower"})
    records = collect(runs)
    report = write_results_page(runs, records, build_tables(records, compare="paper"), runs / "report")
    return {"report": report, "analysis": analysis}


@pytest.mark.parametrize("name,images", [("report", 1), ("analysis", 3)])
def test_every_image_decodes_in_chromium(pages, tmp_path, name, images):
    total, widths = decoded_widths(pages[name], tmp_path)
    assert total == images == len(widths), (total, widths)
    assert all(w > 100 for w in widths), f"{name}: images that did not decode: {widths}"


def test_pages_screenshot_is_not_blank(pages, tmp_path):
    for name, page in pages.items():
        shot = tmp_path / f"{name}.png"
        _chromium(f"--screenshot={shot}", "--window-size=1280,3000", page.as_uri())
        image = imread(shot)
        assert image.shape[0] >= 2700 and image[..., :3].std() > 0.05, name


def test_report_page_links_the_analysis_page_and_names_variants_by_settings(pages):
    text = pages["report"].read_text()
    assert 'href="../analysis/dtd/index.html"' in text
    assert "mmrlpp [train.epochs=5]" in text and "mmrlpp-custom-0123abcd" not in text  # the folder path may say it
    assert "a --set/--config variant is not the paper&#x27;s setting" in text  # the stated reason, not a silent —
    assert "Base-to-new, method × dataset (16 shots)" in text
