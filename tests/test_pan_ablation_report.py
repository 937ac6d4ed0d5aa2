"""Nemesis's Table 3 (issue #28): the PAN ablation (N corrupted positions, with and without selection) in `report`."""

import json
from pathlib import Path

import pytest
import yaml

from alignednorm.protocols.tables import build_report


def write_pan_eval(root: Path, variant: str, dataset: str, shots: int, seed: int, accuracy: float,
                   method_cfg: dict | None, method: str = "nemesis", in_train_run: bool = False) -> None:
    """A few-shot metrics.json as the protocols write it, with the method section of its config.yaml."""
    run = root / "fewshot" / dataset / f"shots{shots}" / method / variant / f"seed{seed}"
    folder = run / "eval" / dataset
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "protocol": "fewshot", "method": method, "variant": variant, "suite": "mini", "dataset": dataset,
        "target": dataset, "shots": shots, "seed": seed, "eval": {"all": {"accuracy": accuracy}}}))
    if method_cfg is not None:
        (run if in_train_run else folder).joinpath("config.yaml").write_text(yaml.safe_dump({"method": method_cfg}))


def pan(n: int, search: bool = True, terms: str = "pan", **extra) -> dict:
    return {"terms": terms, "pan_positions": n, "pan_search": search, "omega": 1.0, **extra}


def tables_by_key(root):
    return {t.key: t for t in build_report(root)}


def test_pan_ablation_table_rows_variants_columns_shots(tmp_path):
    for shots in (1, 16):
        for seed, bump in ((1, 0.0), (2, 2.0)):
            write_pan_eval(tmp_path, "pan", "mini_shapes", shots, seed, 50.0 + shots + bump, pan(1))
        write_pan_eval(tmp_path, "pan-n2", "mini_shapes", shots, 1, 40.0 + shots, pan(2))
        write_pan_eval(tmp_path, "pan-n1-random", "mini_shapes", shots, 1, 30.0 + shots, pan(1, search=False),
                       in_train_run=True)  # an evaluation without its own config.yaml: the training run's
    write_pan_eval(tmp_path, "default", "mini_shapes", 16, 1, 99.0, {"terms": "pun", "pan_positions": 1})  # PUN
    write_pan_eval(tmp_path, "noconfig", "mini_shapes", 16, 1, 98.0, None)  # settings unknown: left out
    tables = tables_by_key(tmp_path)
    t = tables["table_ablation_pan_nemesis_mini_shapes"]
    assert t.header == ["K=1", "K=2", "K=4", "K=8", "K=16"]
    assert [name for name, _ in t.rows] == ["N = 1 w/o selection", "N = 1 (default)", "N = 2"]
    k1, k2, *_, k16 = t.rows[1][1]
    assert (k1.mean, k1.n, k1.std) == (52.0, 2, 1.0) and k2.missing and k16.mean == 67.0
    assert t.rows[0][1][0].mean == 31.0 and t.rows[2][1][-1].mean == 56.0
    assert "pan_search=false" in t.notes[0]
    assert "table_ablation_pan_nemesis_average" not in tables  # one dataset: no average table


def test_pan_ablation_needs_two_settings_and_averages_datasets(tmp_path):
    write_pan_eval(tmp_path, "pan", "mini_shapes", 4, 1, 60.0, pan(1))
    assert not any(k.startswith("table_ablation_pan") for k in tables_by_key(tmp_path))  # nothing to ablate
    write_pan_eval(tmp_path, "pan", "mini_textures", 4, 1, 70.0, pan(1))
    write_pan_eval(tmp_path, "pan-n4", "mini_shapes", 4, 1, 50.0, pan(4))
    write_pan_eval(tmp_path, "pan-n4-w10", "mini_shapes", 4, 1, 40.0, pan(4, omega=10.0))  # same N, other ω
    tables = tables_by_key(tmp_path)
    assert {"table_ablation_pan_nemesis_mini_shapes", "table_ablation_pan_nemesis_mini_textures"} <= set(tables)
    average = tables["table_ablation_pan_nemesis_average"]
    names = [name for name, _ in average.rows]
    assert names == ["N = 1 (default)", "N = 4 [nemesis-pan-n4]", "N = 4 [nemesis-pan-n4-w10]"]
    assert average.rows[0][1][2].mean == 65.0 and average.rows[1][1][2].mean == 50.0
    assert "datasets present" in average.notes[-1]


def test_pan_ablation_of_plot_nemesis_with_both_terms(tmp_path):
    write_pan_eval(tmp_path, "both-n1", "mini_shapes", 2, 1, 60.0, pan(1, terms="both"), method="plot_nemesis")
    write_pan_eval(tmp_path, "both-n8", "mini_shapes", 2, 1, 61.0, pan(8, terms="both"), method="plot_nemesis")
    t = tables_by_key(tmp_path)["table_ablation_pan_plot_nemesis_mini_shapes"]
    assert [name for name, _ in t.rows] == ["N = 1 (default)", "N = 8"]
    assert t.rows[1][1][1].mean == pytest.approx(61.0)
