"""Every registered method through every protocol, by the same entry the CLI uses (``alignednorm run``).

A micro world (three 4-class datasets of 8x8 images: a source with base/new halves, a cross-dataset
target and a shifted domain), a 12-layer tiny CLIP (deep enough for every method's default depths),
one epoch. One output folder is shared by all runs, so the frozen-feature cache is shared too. Each
run must write the protocol's evaluation keys (new classes of a class-specific prompt recorded as not
applicable, with the reason); ``report`` builds the tables; for one run of each method ``predict``,
``export`` + ``alignednorm.load`` and ``analyze`` work.
"""

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from alignednorm.backbone.tiny import make_tiny_clip, save_openai_state_dict
from alignednorm.cli import app
from alignednorm.data import catalog
from alignednorm.methods import get_method_class, list_methods

DATASETS = ("mx_source", "mx_target", "mx_shifted")
PROTOCOLS = ("base2new", "fewshot", "crossdataset", "domaingen")
# Evaluation keys each protocol writes, per evaluated dataset.
EXPECTED = {"base2new": {"mx_source": {"base", "new"}}, "fewshot": {"mx_source": {"all"}},
            "crossdataset": {"mx_source": {"all"}, "mx_target": {"all"}}, "domaingen": {"mx_shifted": {"all"}}}


def _write_world(root: Path) -> None:
    """Split-JSON datasets: 4 classes, 2 train / 2 val / 2 test images each; the shifted one shares the classes."""
    for d, name in enumerate(DATASETS):
        split = {"train": [], "val": [], "test": []}
        classes = [f"target thing {k}" for k in range(4)] if name == "mx_target" else [f"thing {k}" for k in range(4)]
        for label, cname in enumerate(classes):
            for part, items in split.items():
                for i in range(2):
                    rel = f"c{label}/{part}{i}.png"
                    shade = (60 * label + 9 * i + 25 * d) % 256
                    path = root / name / "images" / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.new("RGB", (8, 8), (shade, 255 - shade, 50 * label)).save(path)
                    items.append([rel, label, cname])
        (root / name / f"split_{name}.json").write_text(json.dumps(split))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The micro world, its datasets and suite registered for this module only."""
    root = tmp_path_factory.mktemp("matrix")
    _write_world(root / "data")
    clip = save_openai_state_dict(make_tiny_clip(seed=5, layers=12), root / "clip.pt")
    with pytest.MonkeyPatch.context() as mp:
        for name in DATASETS:
            mp.setitem(catalog._REGISTRY, name, catalog.DatasetSpec(name, name, name, "images",
                                                                    split_file=f"split_{name}.json",
                                                                    suites=("mx",)))
        mp.setitem(catalog._SUITES, "mx", catalog.Suite("mx", base2new=("mx_source",), source="mx_source",
                                                        cross_targets=("mx_target",), dg_targets=("mx_shifted",)))
        yield {"data": root / "data", "clip": clip, "out": root / "runs", "root": root}


def _cli(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _run(world, protocol: str, method: str) -> str:
    """``alignednorm run`` as a user types it (a finished run is reused, not trained again)."""
    return _cli("run", protocol, "--method", method, "--suite", "mx", "--data-root", world["data"],
                "--clip", world["clip"], "--output", world["out"], "--seeds", "1", "--shots", "2",
                "--set", "train.epochs=1", "--set", "train.batch_size=4", "--tag", "mx")


def _metrics(out: Path, protocol: str, method: str) -> dict[str, dict]:
    folder = "crossdataset" if protocol == "domaingen" else protocol
    run = out / folder / "mx_source" / "shots2" / method / "mx" / "seed1"
    return {target: json.loads((run / "eval" / target / "metrics.json").read_text())
            for target in EXPECTED[protocol]}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("method", list_methods())
def test_method_runs_protocol(method, protocol, world):
    _run(world, protocol, method)
    class_specific = get_method_class(method).traits.class_specific
    for target, metrics in _metrics(world["out"], protocol, method).items():
        assert (metrics["protocol"], metrics["method"], metrics["target"]) == (protocol, method, target)
        assert set(metrics["eval"]) == EXPECTED[protocol][target]
        for name, result in metrics["eval"].items():
            other_classes = name == "new" or target == "mx_target"
            if class_specific and other_classes:
                assert result["accuracy"] is None and result["not_applicable"]
            else:
                assert 0.0 <= result["accuracy"] <= 100.0 and result["num_samples"] > 0


def test_report_predict_export_load_analyze(world):
    out = world["out"]
    for method in list_methods():  # each method's base2new run (reused when the matrix above made it)
        _run(world, "base2new", method)
    for protocol in ("crossdataset", "domaingen"):  # so the report has every table, whatever ran before
        _run(world, protocol, "zeroshot")
    runs = sorted(out.glob("base2new/mx_source/shots2/*/mx/seed1"))
    assert {r.parts[-3] for r in runs} == set(list_methods())
    report = _cli("report", out)
    for method in list_methods():
        assert method in report
    assert "Base-to-new" in report and "Cross-dataset" in report and "Domain generalisation" in report

    import alignednorm

    image = world["data"] / "mx_source" / "images" / "c1" / "test0.png"
    for run in runs:
        method = run.parts[-3]
        assert str(image) in _cli("predict", run, image)
        exported = world["root"] / "exported" / method
        _cli("export", run, exported)
        loaded = alignednorm.load(exported, clip=world["clip"])  # an export names its backbone only
        top = loaded.predict([Image.open(image).convert("RGB")], ["thing 0", "thing 1"], 2)[0]
        assert [name for name, _ in top] and abs(sum(p for _, p in top) - 1.0) < 1e-4
    page = _cli("analyze", *runs, "--output", world["root"] / "analysis", "--max-images", 8, "--no-tsne",
                "--data-root", world["data"])
    assert (world["root"] / "analysis" / "index.html").is_file() and "wrote" in page
