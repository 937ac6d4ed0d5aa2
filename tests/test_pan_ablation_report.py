"""Nemesis's Table 3 (issue #28): the PAN ablation (N corrupted positions, with and without selection) in `report`."""

import json
from pathlib import Path

import pytest
import yaml

from alignednorm.protocols.tables import build_report


def write_pan_eval(root: Path, variant: str, dataset: str, shots: int, seed: int, accuracy: float,
                   method_cfg: dict | None, method: str = "nemesis", in_train_run: bool = False,
                   suite: str = "mini") -> None:
    """A few-shot metrics.json as the protocols write it, with the method section of its config.yaml."""
    run = root / "fewshot" / dataset / f"shots{shots}" / method / variant / f"seed{seed}"
    folder = run / "eval" / dataset
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "protocol": "fewshot", "method": method, "variant": variant, "suite": suite, "dataset": dataset,
        "target": dataset, "shots": shots, "seed": seed, "eval": {"all": {"accuracy": accuracy}}}))
    if method_cfg is not None:
        (run if in_train_run else folder).joinpath("config.yaml").write_text(yaml.safe_dump({"method": method_cfg}))


def pan(n: int, search: bool = True, terms: str = "pan", **extra) -> dict:
    return {"terms": terms, "pan_positions": n, "pan_search": search, "omega": 1.0, **extra}


def tables_by_key(root, compare=None):
    return {t.key: t for t in build_report(root, compare=compare)}


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


def test_pan_ablation_beside_the_papers_table3(tmp_path):
    write_pan_eval(tmp_path, "pan", "fgvc_aircraft", 1, 1, 10.0, pan(1), suite="paper")
    write_pan_eval(tmp_path, "pan-n16-random", "fgvc_aircraft", 1, 1, 9.0, pan(16, search=False), suite="paper")
    write_pan_eval(tmp_path, "pan-n3", "fgvc_aircraft", 1, 1, 8.0, pan(3), suite="paper")  # not in the paper
    t = tables_by_key(tmp_path, compare="paper")["table_ablation_pan_nemesis_fgvc_aircraft"]
    names = [name for name, _ in t.rows]
    assert names == ["N = 1 (default)", "N = 1 (default) (paper)", "Δ N = 1 (default)", "N = 3",
                     "N = 16 w/o selection", "N = 16 w/o selection (paper)", "Δ N = 16 w/o selection"]
    assert [c.mean for c in t.rows[1][1]] == [9.88, 18.52, 20.94, 27.50, 32.32]
    assert t.rows[2][1][0].mean == pytest.approx(0.12) and t.rows[2][1][1].missing
    assert t.rows[5][1][4].mean == 31.12 and "RN50" in t.notes[-1]
    assert not any("(paper)" in name
                   for name, _ in tables_by_key(tmp_path)["table_ablation_pan_nemesis_fgvc_aircraft"].rows)
    # Runs of the mini suite are not the paper's benchmark: no published rows, and the note says why.
    write_pan_eval(tmp_path / "mini", "pan", "mini_shapes", 1, 1, 10.0, pan(1))
    write_pan_eval(tmp_path / "mini", "pan-n2", "mini_shapes", 1, 1, 10.0, pan(2))
    mini = tables_by_key(tmp_path / "mini", compare="paper")["table_ablation_pan_nemesis_mini_shapes"]
    assert len(mini.rows) == 2 and "not the paper's benchmark" in mini.notes[-1]
