"""Nemesis's Fig. 3 (issue #28): per-epoch test accuracy (train.eval_test_every_epoch) beside the prompt norms."""

import json
from pathlib import Path

import pytest


def test_prompt_norm_figure_pairs_norms_with_test_accuracy(tmp_path):
    from alignednorm.analysis import plots
    from alignednorm.analyze import AnalysisOptions, _figures, epoch_test_accuracy, prompt_norms_from_log

    run = tmp_path / "run"
    run.mkdir()
    lines = []
    for epoch in (1, 2, 3):
        lines.append({"epoch": epoch, "epoch_mean": {"loss": 1.0, **{f"ctx_norm_{j}": epoch + j for j in range(4)}}})
        lines.append({"epoch": epoch, "test_accuracy": 40.0 + epoch})
    (run / "log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{cut")
    norms, accuracy = prompt_norms_from_log(run), epoch_test_accuracy(run)
    assert accuracy == {1: 41.0, 2: 42.0, 3: 43.0}
    skipped: dict = {}
    figures = _figures({}, {"nemesis": norms, "coop": norms}, tmp_path / "out", AnalysisOptions(tsne=False), skipped,
                       {"nemesis": accuracy, "coop": {}})
    (figure,) = [f for f in figures if f.name == "prompt_norms"]
    assert Path(figure.png).is_file() and "Fig. 3" in figure.caption
    assert figure.numbers["nemesis"]["test_accuracy"].tolist() == [41.0, 42.0, 43.0]
    assert figure.numbers["coop"].shape == (3, 4)  # no accuracy logged: the norms alone, as before
    with pytest.raises(Exception, match="without prompt norms"):
        plots.plot_prompt_norms_over_epochs({"a": norms}, tmp_path / "x.png", test_accuracy={"b": accuracy})
