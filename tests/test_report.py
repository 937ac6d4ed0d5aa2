"""Report math and formats on hand-written metrics.json files, and the published numbers shipped as data."""

import csv
import io
import json
import math
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from alignednorm.cli.runs import report_cmd
from alignednorm.protocols.tables import build_report
from alignednorm.results import (
    Cell,
    collect,
    harmonic_mean,
    load_paper_results,
    render_all,
    seed_stat,
    to_csv,
    to_latex,
    to_markdown,
    write_report,
)

PAPER_11 = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
            "sun397", "dtd", "eurosat", "ucf101"]


def write_eval(root: Path, protocol: str, method: str, dataset: str, seed: int, evals: dict, target=None,
               variant="default", shots=16, suite="paper") -> Path:
    """A metrics.json as the protocols write it (accuracies only)."""
    target = target or dataset
    folder = "crossdataset" if protocol == "domaingen" else protocol
    path = root / folder / dataset / f"shots{shots}" / method / variant / f"seed{seed}" / "eval" / target
    path.mkdir(parents=True, exist_ok=True)
    data = {"protocol": protocol, "method": method, "variant": variant, "suite": suite, "dataset": dataset,
            "target": target, "shots": shots, "seed": seed,
            "eval": {k: {"accuracy": v, "dataset": target} for k, v in evals.items()}}
    (path / "metrics.json").write_text(json.dumps(data))
    # the training run's own metrics.json has no evaluations and must be ignored
    (path.parent.parent / "metrics.json").write_text(json.dumps({"method": method, "dataset": dataset, "seed": seed,
                                                                  "shots": shots, "eval": {}}))
    return path


def table(tables, prefix):
    (found,) = [t for t in tables if t.key.startswith(prefix)]
    return found


def row(t, label):
    return next(cells for name, cells in t.rows if name == label)


def test_seed_stat_and_harmonic_mean():
    cell = seed_stat([70.0, 72.0, 74.0])
    assert (cell.mean, cell.n) == (72.0, 3) and cell.std == pytest.approx(math.sqrt(8 / 3))  # population std
    assert seed_stat([]).missing
    # the paper's average row (from unrounded means)
    assert harmonic_mean(85.46, 77.79) == pytest.approx(81.45, abs=0.01)
    assert harmonic_mean(None, 3.0) is None


def test_base_to_new_table_means_hm_of_means_and_missing(tmp_path):
    for seed, base in zip((1, 2, 3), (70.0, 72.0, 74.0)):
        write_eval(tmp_path, "base2new", "alignednorm", "imagenet", seed, {"base": base})
    for seed, new in zip((1, 2), (60.0, 62.0)):
        write_eval(tmp_path, "base2new", "alignednorm", "imagenet", seed, {"base": [70.0, 72.0][seed - 1], "new": new})
    write_eval(tmp_path, "base2new", "alignednorm", "caltech101", 1, {"base": 90.0, "new": 80.0})
    tables = build_report(tmp_path)
    t = table(tables, "table1_base2new_alignednorm")
    assert [name for name, _ in t.rows] == [*PAPER_11, "Average (2 of 11 datasets)"]
    base, new, hm = row(t, "imagenet")
    assert (base.mean, base.n) == (72.0, 3) and (new.mean, new.n, new.std) == (61.0, 2, 1.0)
    assert hm.mean == pytest.approx(2 * 72 * 61 / 133) and hm.n is None  # HM of the seed means
    assert all(c.missing for c in row(t, "dtd"))
    avg_base, avg_new, avg_hm = row(t, "Average (2 of 11 datasets)")
    assert (avg_base.mean, avg_new.mean) == (81.0, 70.5)
    assert avg_hm.mean == pytest.approx(2 * 81 * 70.5 / 151.5)  # not the mean of per-dataset HMs

    md = to_markdown(t)
    assert "| imagenet | 72.00 ± 1.63 | 61.00 ± 1.00 | 66.05 | 2–3 |" in md
    assert "| dtd | — | — | — |  |" in md and "| 0.00" not in md
    rows = list(csv.reader(io.StringIO(to_csv(t))))
    assert rows[0] == ["dataset", "Base", "Base_std", "Base_n", "New", "New_std", "New_n", "HM"]
    assert rows[1][:4] == ["imagenet", "72.0000", "1.6330", "3"]
    assert next(r for r in rows if r[0] == "dtd")[1:] == [""] * 7
    tex = to_latex(t)
    assert r"72.00$\pm$1.63" in tex and r"dtd & -- & -- & -- &  \\" in tex and r"\toprule" in tex


def test_transfer_tables_average_over_targets_only(tmp_path):
    for seed, acc in ((1, 71.0), (2, 73.0)):
        write_eval(tmp_path, "crossdataset", "mmrlpp", "imagenet", seed, {"all": acc})
        write_eval(tmp_path, "crossdataset", "mmrlpp", "imagenet", seed, {"all": 90.0 + seed}, target="caltech101")
    write_eval(tmp_path, "crossdataset", "mmrlpp", "imagenet", 1, {"all": 40.0}, target="eurosat")
    write_eval(tmp_path, "domaingen", "mmrlpp", "imagenet", 1, {"all": 64.0}, target="imagenetv2")
    tables = build_report(tmp_path)
    cd, dg = table(tables, "table2_crossdataset"), table(tables, "table3_domaingen")
    assert cd.header == ["imagenet (source)", *PAPER_11[1:], "Average"]
    assert dg.header == ["imagenet (source)", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r", "Average"]
    cells = row(cd, "mmrlpp")
    assert (cells[0].mean, cells[0].n) == (72.0, 2) and cells[1].mean == 91.5
    assert cells[-1].mean == pytest.approx((91.5 + 40.0) / 2) and cells[-1].n is None
    assert sum(c.missing for c in cells) == 8
    assert any("2 of 10 targets" in note for note in cd.notes)
    assert row(dg, "mmrlpp")[0].mean == 72.0 and row(dg, "mmrlpp")[-1].mean == 64.0


def test_few_shot_table_per_k(tmp_path):
    for shots, acc in ((1, 50.0), (16, 80.0)):
        for seed in (1, 2):
            write_eval(tmp_path, "fewshot", "alignednorm", "eurosat", seed, {"all": acc + seed}, shots=shots)
    write_eval(tmp_path, "fewshot", "alignednorm", "dtd", 1, {"all": 60.0}, shots=16)
    t = table(build_report(tmp_path), "table4_fewshot_alignednorm")
    assert t.header == ["K=1", "K=2", "K=4", "K=8", "K=16"]
    k1, k2, *_, k16 = row(t, "eurosat")
    assert (k1.mean, k1.n, k1.std) == (51.5, 2, 0.5) and k2.missing and k16.mean == 81.5
    average = row(t, "Average (datasets present)")
    assert average[0].mean == 51.5 and average[-1].mean == pytest.approx((81.5 + 60.0) / 2)
    assert "K=1: 1 of 11" in t.notes[0]


def test_compare_with_the_paper(tmp_path):
    for seed in (1, 2, 3):
        write_eval(tmp_path, "base2new", "alignednorm", "imagenet", seed, {"base": 77.6, "new": 71.47 + seed - 2})
        write_eval(tmp_path, "base2new", "mmrlpp", "eurosat", seed, {"base": 95.0, "new": 80.0}, variant="unified")
    write_eval(tmp_path, "crossdataset", "alignednorm", "imagenet", 1, {"all": 72.0}, target="caltech101")
    tables = build_report(tmp_path, compare="paper")
    t = table(tables, "table1_base2new_alignednorm")
    assert t.header[:3] == ["Base", "Base (paper)", "Δ Base"]
    _, paper_base, delta, _, paper_new, delta_new, *_ = row(t, "imagenet")
    assert (paper_base.mean, paper_new.mean) == (77.60, 71.47)
    assert delta.mean == pytest.approx(0.0, abs=1e-9) and delta_new.mean == pytest.approx(0.0, abs=1e-9)
    assert "| imagenet | 77.60 ± 0.00 | 77.60 | +0.00 | 71.47 ± 0.82 | 71.47 | +0.00 |" in to_markdown(t)
    assert row(t, "Average (1 of 11 datasets)")[1].mean == 85.46
    unified = table(tables, "table1_base2new_mmrlpp-unified")  # --tag unified ↔ the paper's unified MMRL++
    assert row(unified, "eurosat")[1].mean == 95.73 and row(unified, "eurosat")[2].mean == pytest.approx(-0.73)
    cd = table(tables, "table2_crossdataset")
    assert [name for name, _ in cd.rows] == ["alignednorm", "alignednorm (paper)", "Δ alignednorm"]
    assert row(cd, "alignednorm (paper)")[1].mean == 94.50 and row(cd, "Δ alignednorm")[1].mean == pytest.approx(-22.5)
    assert row(cd, "Δ alignednorm")[0].missing  # no source run: no difference either
    summary = table(tables, "table_ablation_base2new")
    assert [name for name, _ in summary.rows][:3] == ["alignednorm", "alignednorm (paper)", "Δ alignednorm"]


def test_paper_numbers_are_consistent_with_their_averages():
    paper = load_paper_results()
    assert set(paper) >= {"base2new", "crossdataset", "domaingen", "fewshot", "missing", "variants"}
    for label in ("mmrlpp", "mmrlpp-unified", "alignednorm"):
        rows = paper["base2new"][label]
        assert set(rows) == {*PAPER_11, "average"}
        for key in ("base", "new"):
            assert sum(rows[d][key] for d in PAPER_11) / 11 == pytest.approx(rows["average"][key], abs=0.015)
        for values in rows.values():
            assert harmonic_mean(values["base"], values["new"]) == pytest.approx(values["hm"], abs=0.015)
    for protocol, targets in (("crossdataset", PAPER_11[1:]),
                              ("domaingen", ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"])):
        for values in paper[protocol].values():
            assert sum(values[t] for t in targets) / len(targets) == pytest.approx(values["average"], abs=0.015)
    for values in paper["fewshot"].values():
        for k in ("1", "2", "4", "8", "16"):
            assert sum(values[d][k] for d in PAPER_11) / 11 == pytest.approx(values["average"][k], abs=0.015)
    assert paper["base2new"]["zeroshot"]["average"] == {"base": 69.34, "new": 74.22, "hm": 71.70}
    assert paper["crossdataset"]["alignednorm"]["average"] == 67.61
    assert [paper["fewshot"]["alignednorm"]["average"][k] for k in ("1", "2", "4", "8", "16")] == [
        72.93, 75.57, 79.11, 81.35, 84.08]


def test_ablation_summary_groups_config_variants(tmp_path):
    write_eval(tmp_path, "base2new", "alignednorm", "dtd", 1, {"base": 80.0, "new": 60.0})
    write_eval(tmp_path, "base2new", "alignednorm", "dtd", 1, {"base": 82.0, "new": 58.0}, variant="proj-only")
    summary = table(build_report(tmp_path), "table_ablation_base2new")
    assert [name for name, _ in summary.rows] == ["alignednorm", "alignednorm-proj-only"]
    assert row(summary, "alignednorm-proj-only")[:2] == [Cell(82.0), Cell(58.0)]
    assert row(summary, "alignednorm")[3] == "1/11"


def test_single_run_layout_and_broken_files(tmp_path, caplog):
    run = tmp_path / "base2new" / "oxford_pets" / "mmrlpp" / "seed1"  # `alignednorm train` writes this
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({
        "method": "mmrlpp", "dataset": "oxford_pets", "shots": 16, "seed": 1,
        "eval": {"base": {"accuracy": 95.0, "dataset": "oxford_pets"}, "new": {"accuracy": 96.0}}}))
    (tmp_path / "base2new" / "broken").mkdir()
    (tmp_path / "base2new" / "broken" / "metrics.json").write_text("{not json")
    records = collect(tmp_path)
    assert {(r.protocol, r.target, r.metric, r.accuracy) for r in records} == {
        ("base2new", "oxford_pets", "base", 95.0), ("base2new", "oxford_pets", "new", 96.0)}
    assert "broken" in caplog.text


def test_report_command(tmp_path):
    write_eval(tmp_path, "base2new", "alignednorm", "dtd", 1, {"base": 80.0, "new": 60.0})
    app = typer.Typer()
    app.command("report")(report_cmd)
    app.command("other")(lambda: None)  # two commands, so `report` stays a sub-command as in alignednorm.cli
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(tmp_path), "--compare", "paper"])
    assert result.exit_code == 0, result.output
    assert "| dtd | 80.00 | 84.63 | -4.63 |" in result.output  # one seed: no ±
    written = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"report.md", "table1_base2new_alignednorm_shots16.csv",
            "table1_base2new_alignednorm_shots16.tex"} <= written
    result = runner.invoke(app, ["report", str(tmp_path), "--format", "csv", "--no-write", "--report-dir", "x"])
    assert result.output.startswith("# Base-to-new: alignednorm (16 shots)\ndataset,Base,Base_std,Base_n,")
    assert runner.invoke(app, ["report", str(tmp_path), "--format", "latex"]).output.count(r"\begin{table}") == 1
    assert runner.invoke(app, ["report", str(tmp_path), "--format", "html"]).exit_code == 2
    assert runner.invoke(app, ["report", str(tmp_path), "--compare", "arxiv"]).exit_code == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no evaluated runs" in runner.invoke(app, ["report", str(empty)]).output


def test_write_report_with_no_tables(tmp_path):
    written = write_report([], tmp_path / "r")
    assert [p.name for p in written] == ["report.md"] and render_all([], "md") == ""


def test_compare_shows_no_paper_numbers_for_another_suite(tmp_path):
    from alignednorm.data.catalog import Suite, register_suite

    register_suite(Suite("report_test", base2new=("dtd", "eurosat"), source="dtd", cross_targets=("eurosat",),
                         dg_targets=()))
    write_eval(tmp_path, "base2new", "alignednorm", "dtd", 1, {"base": 80.0, "new": 60.0}, suite="report_test")
    t = table(build_report(tmp_path, compare="paper"), "table1_base2new_alignednorm")
    assert [name for name, _ in t.rows] == ["dtd", "eurosat", "Average (1 of 2 datasets)"]
    assert all(cell.missing for _, cells in t.rows for cell in cells[1:3])  # not the 11-dataset paper average


def test_cost_table_from_real_runs(json_dataset, tmp_path):
    """``report --cost`` on a tiny base-to-new sweep: every column filled from the run folders."""
    from alignednorm.backbone.tiny import make_tiny_clip, save_openai_state_dict

    clip = save_openai_state_dict(make_tiny_clip(seed=2, layers=3), tmp_path / "clip.pt")
    args = ["run", "base2new", "--method", "mmrlpp", "--datasets", "oxford_pets", "--data-root",
            str(json_dataset.root), "--clip", str(clip), "--seeds", "1", "--shots", "2",
            "--output", str(tmp_path / "r"),
            "--set", "method.rep_layers=[2,3]", "--set", "method.rep_dim=16", "--set", "train.epochs=1",
            "--set", "train.batch_size=2", "--tag", "tiny"]
    from alignednorm.cli import app

    assert CliRunner().invoke(app, args, catch_exceptions=False).exit_code == 0
    info = json.loads(next((tmp_path / "r").rglob("run.json")).read_text())
    assert info["environment"]["torch"] and info["learnable_parameters"] > 0
    result = CliRunner().invoke(app, ["report", str(tmp_path / "r"), "--cost", "--no-write"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (head,) = [x for x in result.output.splitlines() if x.startswith("| method")]
    header = [c.strip() for c in head.strip("|").split("|")]
    assert header[1:5] == ["train s/iter", "batch size", "test s/batch", "learnable params"]
    (line,) = [x for x in result.output.splitlines() if x.startswith("| mmrlpp-tiny")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert float(cells[1]) > 0 and cells[2] == "2" and float(cells[3]) > 0
    assert cells[4] == f"{info['learnable_parameters']:,}"  # a count, never 0.000 M
    assert cells[6] != "-" and cells[7] == "1" and cells[8] == "CPU"


def test_cost_rows_name_custom_variants_by_their_settings(tmp_path):
    """A ``custom-<hash>`` row says its --set values; parameters are counts, a range when runs differ."""
    from alignednorm.protocols.cost import cost_table

    for seed, params in ((1, 8192), (2, 16384)):
        run = tmp_path / "base2new" / "dtd" / "shots16" / "coop" / "custom-1234abcd" / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "run.json").write_text(json.dumps({
            "method": "coop", "learnable_parameters": params, "command": "alignednorm run base2new --method coop "
            "--set train.epochs=5", "identity": {"config": {"train": {"batch_size": 32}}}}))
        (run / "metrics.json").write_text(json.dumps({"cost": {"seconds_per_iter": 0.5}}))
    table = cost_table(tmp_path)
    ((label, cells),) = table.rows
    assert label == "coop [train.epochs=5]" and cells[1] == "32" and cells[3] == "8,192–16,384"


def test_description_fallback_is_its_own_report_row(tmp_path):
    from alignednorm.results import records_from

    data = {"protocol": "base2new", "method": "hicropl", "variant": "default", "dataset": "dtd", "seed": 1,
            "shots": 16, "description_fallback": True, "eval": {"base": {"accuracy": 70.0}}}
    (record,) = records_from(data, tmp_path / "metrics.json", tmp_path)
    assert record.variant == "default+templates-no-descriptions"


def test_report_rows_carry_a_methods_note(tmp_path):
    write_eval(tmp_path, "base2new", "empl", "dtd", 1, {"base": 70.0, "new": 60.0})
    tables = build_report(tmp_path)
    (table,) = [t for t in tables if t.key.startswith("table1")]
    assert table.title == "Base-to-new: empl (unofficial reconstruction) (16 shots)"
    written = {p.name for p in write_report(tables, tmp_path / "out")}
    assert "table1_base2new_empl_unofficial_reconstruction_shots16.md" in written


def test_compare_states_why_published_numbers_are_missing(tmp_path):
    from alignednorm.protocols.tables import base_to_new_matrix

    write_eval(tmp_path, "base2new", "alignednorm", "dtd", 1, {"base": 80.0, "new": 60.0}, shots=4)
    write_eval(tmp_path, "base2new", "coop", "dtd", 1, {"base": 80.0, "new": 60.0})
    run = write_eval(tmp_path, "base2new", "mmrlpp", "dtd", 1, {"base": 81.0, "new": 61.0}, variant="custom-12345678")
    (run.parent.parent / "run.json").write_text(json.dumps({"command": "alignednorm run base2new --method mmrlpp "
                                                                       "--set method.beta=0.2 --config /x/my.yaml"}))
    tables = build_report(tmp_path, compare="paper")
    four = table(tables, "table1_base2new_alignednorm_shots4")
    assert all(c.missing for c in row(four, "dtd")[1:3])  # never the 16-shot numbers beside 4-shot runs
    assert "the paper's numbers are for 16 shots, these runs used 4" in four.notes[-1]
    assert "publishes no base2new row" in table(tables, "table1_base2new_coop").notes[-1]
    custom = table(tables, "table1_base2new_mmrlpp [method.beta=0.2, config my.yaml]")  # settings, not the hash
    assert "--set/--config variant is not the paper's setting" in custom.notes[-1]
    (matrix,) = [m for m in base_to_new_matrix(tables) if m.meta["shots"] == 16]
    assert [(name, cells[0]) for name, cells in matrix.rows][:2] == [("dtd", "coop"),
                                                                     ("", "mmrlpp [method.beta=0.2, config my.yaml]")]
    assert "not run by any method: imagenet" in matrix.notes[-1]  # no rows of "—" for datasets nobody ran


def test_html_table_and_run_accuracy_table(tmp_path):
    from alignednorm.protocols.tables import run_accuracy_table
    from alignednorm.results import to_html

    for seed in (1, 2):
        write_eval(tmp_path, "base2new", "alignednorm", "dtd", seed, {"base": 80.0 + seed, "new": 60.0})
    html = to_html(table(build_report(tmp_path), "table1_base2new_alignednorm"))
    assert "<td>81.50 ± 0.50</td>" in html and '<td class="missing">—</td>' in html and '<tr class="avg">' in html
    run = tmp_path / "base2new" / "dtd" / "shots16" / "alignednorm" / "default" / "seed1"
    accuracy = run_accuracy_table({"a": run})
    assert accuracy.header == ["variant", "dtd base", "dtd new", "dtd HM"]
    assert row(accuracy, "a")[0] == "alignednorm, base2new, 16 shots" and row(accuracy, "a")[3].mean == pytest.approx(
        2 * 81 * 60 / 141)
    assert "±" not in to_html(accuracy)  # one seed: no spread
