"""Sweeps through submitit: local processes, a SLURM job array (with a stand-in sbatch), and failures."""

import json
import multiprocessing
import os
import stat
import sys
from pathlib import Path

import pytest

from alignednorm.backbone.tiny import make_tiny_clip, save_openai_state_dict
from alignednorm.errors import AlignedNormError
from alignednorm.protocols import expand
from alignednorm.protocols.executor import process_context
from alignednorm.protocols.runner import SweepRequest
from alignednorm.protocols.sweep import ExecutorOptions, run_sweep, slurm_parameters

submitit = pytest.importorskip("submitit")

TINY = ("method.rep_layers=[2,3]", "train.epochs=1", "train.batch_size=2")


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    return save_openai_state_dict(make_tiny_clip(seed=5, layers=3), tmp_path_factory.mktemp("clip") / "tiny.pt")


def pets_request(json_dataset, clip_file, out, method="mmrlpp", sets=TINY, **kw) -> SweepRequest:
    return SweepRequest(method, str(json_dataset.root), str(clip_file), str(out), datasets=("oxford_pets",),
                        shots=(2,), sets=sets, **kw)


def test_local_executor_runs_each_job_in_its_own_process(json_dataset, clip_file, tmp_path):
    jobs = expand("base2new", pets_request(json_dataset, clip_file, tmp_path / "runs", seeds=(1, 2)))
    # Two GPU slots: both jobs run at once, each told its own device (CUDA is unused on this CPU machine).
    outcome = run_sweep(jobs, "local", output=str(tmp_path / "runs"), options=ExecutorOptions(gpu_ids=(0, 1)))
    assert sorted(outcome.finished) == [j.name for j in jobs] and not outcome.failed
    for job in jobs:
        metrics = json.loads((Path(job.evals[0].run_dir) / "metrics.json").read_text())
        assert metrics["seed"] == job.seed and metrics["eval"]["new"]["num_classes"] == 2
        assert (Path(job.train_dir) / "learnable.safetensors").is_file()
    logs = "".join(p.read_text() for p in (tmp_path / "runs" / ".submitit").rglob("*_log.err"))
    assert "CUDA_VISIBLE_DEVICES=0)" in logs and "CUDA_VISIBLE_DEVICES=1)" in logs
    # A second sweep finds everything finished and starts no process.
    again = run_sweep(jobs, "local", output=str(tmp_path / "runs"), options=ExecutorOptions(folder=str(tmp_path / "x")))
    assert sorted(again.finished) == sorted(outcome.finished) and not (tmp_path / "x").exists()


def test_slurm_executor_submits_one_job_array(json_dataset, clip_file, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", "print('Submitted batch job 4242')"), ("srun", "")):  # stand-ins for SLURM's
        tool = bin_dir / name
        tool.write_text(f"#!{sys.executable}\n{body}\n")
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    jobs = expand("fewshot", pets_request(json_dataset, clip_file, tmp_path / "runs", seeds=(1, 2, 3)))
    options = ExecutorOptions(partition="gpu", gpus=2, timeout_min=90, mem="32G", array_parallelism=2,
                              account="lab", slurm_args=("constraint=a100",))
    outcome = run_sweep(jobs, "slurm", options=options, output=str(tmp_path / "runs"))
    assert sorted(outcome.submitted.values()) == ["4242_0", "4242_1", "4242_2"] and not outcome.finished
    (script,) = (tmp_path / "runs" / ".submitit").rglob("*_submission.sh")
    text = script.read_text()
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --time=90", "#SBATCH --mem=32G", "#SBATCH --account=lab", "#SBATCH --constraint=a100",
                 "#SBATCH --job-name=alignednorm-fewshot"):
        assert line in text


def test_slurm_parameters_reject_malformed_extras():
    assert "partition" not in slurm_parameters(ExecutorOptions(), "x")
    with pytest.raises(AlignedNormError, match="key=value"):
        slurm_parameters(ExecutorOptions(slurm_args=("exclusive",)), "x")


def test_inline_sweep_keeps_going_after_a_failing_job(json_dataset, clip_file, tmp_path):
    request = pets_request(json_dataset, clip_file, tmp_path / "runs", method="zeroshot", sets=(), seeds=(1,))
    request.datasets = ("oxford_pets", "dtd")  # dtd is not in the data root
    outcome = run_sweep(expand("base2new", request), "inline")
    assert outcome.finished == ["base2new/oxford_pets/shots2/zeroshot/default/seed1"]
    (failed,) = outcome.failed
    assert failed.startswith("base2new/dtd/") and "dtd" in outcome.failed[failed]
    with pytest.raises(AlignedNormError, match="--executor"):
        run_sweep([], "cluster")


def test_a_sweep_never_skips_a_folder_finished_with_other_settings(json_dataset, clip_file, tmp_path):
    request = pets_request(json_dataset, clip_file, tmp_path / "runs", method="zeroshot", sets=(), seeds=(1,))
    jobs = expand("base2new", request)
    assert run_sweep(jobs, "inline").finished == [jobs[0].name]
    assert run_sweep(jobs, "inline").finished == [jobs[0].name]  # same settings: skipped, still finished
    info_path = Path(jobs[0].train_dir) / "run.json"
    info = json.loads(info_path.read_text())
    info["identity"]["config"]["data"]["crop_scale"] = [0.1, 1.0]  # as if finished by other presets
    info_path.write_text(json.dumps(info))
    outcome = run_sweep(jobs, "inline")
    (failed,) = outcome.failed.values()
    assert "other settings (config.data.crop_scale" in failed


def test_processes_executor_matches_inline_and_reports_failures(json_dataset, clip_file, tmp_path):
    """Parallel processes (one thread each here) give the numbers of the inline sweep; a broken job is reported."""
    results = {}
    for executor in ("inline", "processes"):
        out = tmp_path / executor
        jobs = expand("base2new", pets_request(json_dataset, clip_file, out, seeds=(1, 2), progress=False))
        broken = pets_request(json_dataset, clip_file, out, seeds=(3,), progress=False)
        broken.data_root = str(tmp_path / "missing")
        jobs += expand("base2new", broken)
        outcome = run_sweep(jobs, executor, options=ExecutorOptions(processes=2), output=str(out))
        assert sorted(outcome.finished) == sorted(j.name for j in jobs[:2])
        assert list(outcome.failed) == [jobs[2].name] and "missing" in outcome.failed[jobs[2].name]
        assert "\n" not in outcome.failed[jobs[2].name]
        if executor == "processes" and "forkserver" in multiprocessing.get_all_start_methods():
            assert process_context().get_start_method() == "forkserver"  # imports once, not per process
        results[executor] = {j.seed: json.loads((Path(j.evals[0].run_dir) / "metrics.json").read_text())["eval"]
                             for j in jobs[:2]}
    for seed, evals in results["inline"].items():
        for name, metrics in evals.items():
            other = results["processes"][seed][name]
            assert (metrics["accuracy"], metrics["per_class_accuracy"]) == (other["accuracy"],
                                                                          other["per_class_accuracy"])
