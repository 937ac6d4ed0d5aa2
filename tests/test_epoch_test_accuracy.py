"""Nemesis's Fig. 3 (issue #28): per-epoch test accuracy (train.eval_test_every_epoch) beside the prompt norms."""

import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    from alignednorm.backbone.tiny import make_tiny_clip, save_openai_state_dict

    return save_openai_state_dict(make_tiny_clip(seed=3, layers=2), tmp_path_factory.mktemp("clip") / "t.pt")


def nemesis_job(json_dataset, clip_file, out: Path, *sets: str):
    from alignednorm.protocols import expand
    from alignednorm.protocols.runner import SweepRequest

    request = SweepRequest("nemesis", str(json_dataset.root), str(clip_file), str(out), datasets=("oxford_pets",),
                           seeds=(1,), shots=(1,), device="cpu", progress=False,
                           sets=("train.epochs=2", "train.batch_size=4", "train.tensorboard=false",
                                 "method.n_ctx=4", "method.terms=pan", *sets))
    (job,) = expand("fewshot", request)
    return job


def test_eval_test_every_epoch_logs_accuracy_and_leaves_the_run_unchanged(json_dataset, clip_file, tmp_path):
    from safetensors.torch import load_file

    from alignednorm.analyze import epoch_test_accuracy
    from alignednorm.engine.run import read_run_info, run_identity
    from alignednorm.protocols.runner import run_job

    plain = nemesis_job(json_dataset, clip_file, tmp_path / "plain")
    logged = nemesis_job(json_dataset, clip_file, tmp_path / "logged", "train.eval_test_every_epoch=true")
    assert plain.run_spec().epoch_callback is None and logged.run_spec().epoch_callback is not None
    assert run_identity(plain.run_spec())["config"] == run_identity(logged.run_spec())["config"]  # not identity
    results = {name: run_job(job)[job.dataset] for name, job in (("plain", plain), ("logged", logged))}

    run = Path(logged.train_dir)
    accuracy = epoch_test_accuracy(run)
    assert list(accuracy) == [1, 2] and all(0.0 <= a <= 100.0 for a in accuracy.values())
    assert accuracy[2] == pytest.approx(results["logged"]["eval"]["all"]["accuracy"])  # the last epoch = the final test
    assert epoch_test_accuracy(Path(plain.train_dir)) == {}
    # Evaluating between epochs changes nothing the run learns or records as its result.
    learned = [load_file(Path(job.train_dir) / "learnable.safetensors") for job in (plain, logged)]
    assert learned[0].keys() == learned[1].keys()
    assert all(torch.equal(learned[0][k], learned[1][k]) for k in learned[0])
    assert results["plain"]["eval"]["all"]["accuracy"] == results["logged"]["eval"]["all"]["accuracy"]
    assert read_run_info(run)["identity"] == read_run_info(Path(plain.train_dir))["identity"]


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
