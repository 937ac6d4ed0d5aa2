"""``check_data_root``: an ok, a missing and a broken dataset, and the printed table."""

import dataclasses

import pytest

from alignednorm.data import check_data_root, format_check, get_dataset
from alignednorm.data.catalog import list_datasets
from alignednorm.errors import DataError


def test_ok_missing_and_broken(json_dataset, aircraft_dataset):
    (aircraft_dataset.folder / "images" / "1000002.jpg").unlink()
    dtd = get_dataset("dtd")
    results = check_data_root(json_dataset.root, [json_dataset.spec, dtd, aircraft_dataset.spec])
    ok, missing, broken = results
    assert (ok.name, ok.status, ok.num_classes, ok.num_train, ok.num_val, ok.num_test, ok.problem) == (
        "oxford_pets", "ok", 5, 20, 10, 10, None)
    assert missing.status == "missing" and missing.problem == f"folder {json_dataset.root / 'dtd'} not found"
    assert broken.status == "broken" and broken.num_train is None
    assert "1 of 18 images" in broken.problem and (
        str(aircraft_dataset.folder / "images" / "1000002.jpg") in broken.problem)

    table = format_check(results)
    lines = table.splitlines()
    assert lines[0].split() == ["dataset", "status", "classes", "train", "val", "test", "problem"]
    assert lines[1].split() == ["oxford_pets", "ok", "5", "20", "10", "10"]
    assert lines[2].split()[:6] == ["dtd", "missing", "-", "-", "-", "-"]
    assert lines[3].split()[:2] == ["fgvc_aircraft", "broken"]
    assert "dtd (missing)" in table and "split_zhou_DescribableTextures.json" in table
    assert "fgvc_aircraft (broken): dataset 'fgvc_aircraft': 1 of 18 images" in table


def test_wrong_class_count_is_broken(json_dataset):
    (result,) = check_data_root(json_dataset.root, [dataclasses.replace(json_dataset.spec, num_classes=37)])
    assert (result.status == "broken" and result.problem.startswith("found 5 classes")
            and "expected 37" in result.problem)
    assert result.num_classes == 5


def test_whole_catalog_and_bad_root(data_root, tmp_path):
    results = check_data_root(data_root)
    # The paper's 15 datasets are always there (extra registered suites may add more).
    paper = set(list_datasets("paper"))
    assert len(paper) == 15 and paper <= {r.name for r in results}
    assert {r.status for r in results} == {"missing"}
    with pytest.raises(DataError, match="does not exist"):
        check_data_root(tmp_path / "nowhere")
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        check_data_root(data_root, ["nope"])


def test_cli_exit_status_gates_a_script(json_dataset, monkeypatch):
    from typer.testing import CliRunner

    from alignednorm.cli import app
    from alignednorm.data import catalog

    # The fixture's pets have 5 classes; a catalog entry saying so makes them "ok".
    spec = dataclasses.replace(json_dataset.spec, name="pets_five", dassl_name="PetsFive")
    monkeypatch.setitem(catalog._REGISTRY, spec.name, spec)
    runner = CliRunner()

    def check(*names):
        result = runner.invoke(app, ["datasets", "check", str(json_dataset.root),
                                     *[arg for name in names for arg in ("--dataset", name)]])
        return result.exit_code, result.output

    code, out = check("pets_five")
    assert code == 0 and out.splitlines()[1].split()[:2] == ["pets_five", "ok"]
    code, out = check("pets_five", "dtd")  # dtd: no folder
    assert code == 1 and "dtd (missing)" in out and "pets_five" in out
    code, out = check("oxford_pets")  # 5 classes where the catalog expects 37
    assert code == 1 and "oxford_pets (broken): found 5 classes" in out
